"""A training loop with a leak, and the epoch check that catches it.

The bug: every step keeps the per-sample errors "for later analysis", so the
loop holds one more tensor per step, forever. The first epoch is the
baseline; at the end of the second, torchmem names the line (the one marked
LEAK below) and the bytes it added.

    python examples/leaky_loop.py
"""

from __future__ import annotations

import torch

import torchmem
from torchmem.epoch import epoch

BATCH, FEATURES, OUT = 64, 32, 8


def main(epochs: int = 3, steps: int = 10, raise_on_leak: bool = False,
         profiler: torchmem.MemoryProfiler | None = None) -> list:
    """Trains a small MLP; returns one ``epoch`` check per epoch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, OUT))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(BATCH, FEATURES), torch.randn(BATCH, OUT)
    kept_errors = []  # grows by one (BATCH, OUT) float tensor per step
    checks = []
    for _ in range(epochs):
        with epoch(raise_on_leak=raise_on_leak, profiler=profiler) as e:
            for _ in range(steps):
                opt.zero_grad()
                pred = model(x)
                loss = torch.nn.functional.mse_loss(pred, y)
                loss.backward()
                opt.step()
                kept_errors.append((pred.detach() - y).abs())  # LEAK
        checks.append(e)
        print(e.report())
    return checks


if __name__ == "__main__":
    torchmem.enable(trace=False)
    main()
