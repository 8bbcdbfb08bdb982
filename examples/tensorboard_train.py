"""torchmem's per-step memory in TensorBoard, from a plain training loop.

    pip install torchmem[tensorboard]
    python examples/tensorboard_train.py
    tensorboard --logdir runs/torchmem-example

The callback writes, after every optimizer step, the step's live and peak
bytes (also by allocation type and device), its GC time and, where the
profiler attributes memory, the categories at the step's peak. The same
scalars come from a saved trace with
``torchmem export TRACE --format tensorboard -o DIR``.
"""

from __future__ import annotations

import torch

from torchmem.integrations.tensorboard import TorchmemCallback


def main() -> None:
    tb = TorchmemCallback("runs/torchmem-example")  # enables torchmem; SummaryWriter inside
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(50):
        x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # ends torchmem's step; the callback writes its scalars
    tb.close()
    print(f"{tb.steps_written} steps written to runs/torchmem-example "
          "(tensorboard --logdir runs/torchmem-example)")


if __name__ == "__main__":
    main()
