"""Small models, training loops and independent byte counts for the attribution tests."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from torchmem import MemoryProfiler
from torchmem.sources.context import ContextSource
from torchmem.sources.cpu_allocator import CPUAllocatorHook


class MLP(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class CNN(nn.Module):
    """ResNet-style: conv, BatchNorm, ReLU(inplace=True), a residual block, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = x + self.block(x)
        return self.head(self.pool(x).flatten(1))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def exact_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, int]:
    """What the breakdown at a step end must say, computed from torch's objects."""
    return {
        "parameter": storage_bytes(model.parameters()),
        "buffer": storage_bytes(model.buffers()),
        "gradient": storage_bytes(p.grad for p in model.parameters()),
        "optimizer_state": storage_bytes(state_tensors(opt)) if opt is not None else 0,
    }


@contextlib.contextmanager
def attributed(**kw: Any) -> Iterator[MemoryProfiler]:
    """A profiler fed by the CPU allocator hook, with attribution."""
    p = MemoryProfiler(auto_snapshot=False, **kw)
    try:
        with CPUAllocatorHook(p, adopt_existing=False), ContextSource(p):
            yield p
    finally:
        p.close()


def train(make_model, make_opt, batches: list[tuple[torch.Tensor, torch.Tensor]],
          profiler: MemoryProfiler | None = None, check=None, loss_fn=None,
          accumulate: int = 1) -> tuple[list[float], list[torch.Tensor]]:
    """Trains a fresh model (seed 0) on ``batches``; ``check(model, opt, step)`` runs
    at each step end. Returns the losses and the final gradients."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model.parameters())
    loss_fn = loss_fn or nn.functional.cross_entropy
    losses = []
    for i, (x, y) in enumerate(batches):
        if i % accumulate == 0:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) / accumulate
        loss.backward()
        losses.append(loss.item())
        if (i + 1) % accumulate == 0:
            opt.step()
            if profiler is not None:
                profiler.step()
            if check is not None:
                check(model, opt, i // accumulate)
    return losses, [p.grad.clone() for p in model.parameters()]


def batches(shape: tuple[int, ...], classes: int, n: int = 3) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],),
                                                             generator=g)) for _ in range(n)]


def same_run(a: tuple, b: tuple) -> bool:
    """Bit-identical losses and gradients."""
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
