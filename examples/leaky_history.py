"""The classic leak: a list of losses that keeps every step's autograd graph.

``history.append(loss)`` instead of ``history.append(loss.item())`` keeps the
loss tensor, and with it the graph that produced it (backward with
``retain_graph=True`` leaves the saved activations in place): every step's
activations stay alive. The epoch check names the lines that allocated them
and, for each, who holds them: ``history[i] -> Tensor.grad_fn -> ... ->
saved tensor``.

    python examples/leaky_history.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchmem
from torchmem.epoch import epoch

history = []  # grows by one loss, and its graph, per step


def train_one_epoch(model, opt, steps: int = 20) -> None:
    for _ in range(steps):
        x, y = torch.randn(32, 64), torch.randn(32, 8)
        pred = model(x)
        loss = F.mse_loss(pred, y)
        history.append(loss)  # LEAK: should be loss.item()
        opt.zero_grad()
        loss.backward(retain_graph=True)
        opt.step()


def main(epochs: int = 3, profiler: torchmem.MemoryProfiler | None = None,
         holders_budget_s: float = 2.0) -> list:
    """Trains a small MLP; returns one ``epoch`` check per epoch.

    ``holders_budget_s`` is the holder search's wall-time budget per epoch end (s).
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history.clear()
    checks = []
    for _ in range(epochs):
        with epoch(profiler=profiler, holders_budget_s=holders_budget_s) as e:
            train_one_epoch(model, opt)
        checks.append(e)
    return checks


if __name__ == "__main__":
    torchmem.enable(trace=False, summary=False)
    print(main()[-1].report())
