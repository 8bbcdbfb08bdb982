"""What fills memory at the peak, and which layer: attribution on a small CPU model.

    python examples/attribution_cpu.py [--steps 5]

A two-block transformer-style model trained with AdamW under
``torchmem.enable()``, its loss an ``nn.CrossEntropyLoss`` module (so the
loss's own backward is attributed too: a loss function called outside any
module has its backward counted as "other" until autograd reaches the
model). After training it prints the peak report (the peak,
when, in which phase and module, by category, module and site), the
breakdown at the last step's peak by category and by module, and the
per-step peaks by phase; the HTML report (memory over time by category, the
table by module, the peak's flame graph) goes beside the trace. A few
seconds on two cores, no GPU.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import torchmem
from torchmem.units import format_bytes


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trace-dir", default=None, help="default: ./torchmem-traces")
    args = parser.parse_args()

    profiler = torchmem.enable(trace_dir=args.trace_dir, summary=False)

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(args.steps):
        tokens = torch.randint(0, 512, (8, 64))
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = loss_fn(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()  # also ends torchmem's step

    print(profiler.peak_report(top=5).format())
    last = profiler.current_step - 1
    print(f"\nat the peak of step {last}:")
    for by in ("category", "module"):
        parts = profiler.breakdown(by, at=last)
        print(f"  by {by}: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in
                                           list(parts.items())[:6]))
    trace = torchmem.trace_path()
    if trace:
        from torchmem.export import export_html

        report = os.path.splitext(trace)[0] + ".html"
        export_html(profiler, report)
        print(f"\nHTML report: {os.path.abspath(report)}")


if __name__ == "__main__":
    main()
