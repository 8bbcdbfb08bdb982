"""A GPU training run under torchmem (a small transformer block).

    python examples/train_gpu.py

``torchmem.enable()`` runs before any CUDA work, so it installs the torchmem
CUDA allocator: every GPU allocation and free is recorded natively, with the
Python stack that asked for it, and torch.cuda.memory_allocated() and friends
keep working. Had CUDA been used first, torchmem would say so and record
torch's allocation history instead. Falls back to the CPU when no GPU exists.
"""

from __future__ import annotations

import argparse

import torch

import torchmem
from torchmem.epoch import epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()

    profiler = torchmem.enable()  # first: before anything touches CUDA
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    block = torch.nn.TransformerEncoderLayer(args.dim, nhead=8, dim_feedforward=4 * args.dim,
                                             batch_first=True).to(device)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)
    x = torch.randn(16, 128, args.dim, device=device)
    for ep in range(args.epochs):
        with epoch() as e:
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = block(x).pow(2).mean()
                loss.backward()
                opt.step()
        gpu = profiler.get_statistics_for_type("GPU")
        print(f"epoch {ep + 1}: GPU live {gpu.current_usage_bytes / 2**20:.1f} MiB, peak "
              f"{gpu.peak_usage_bytes / 2**20:.1f} MiB; "
              f"{'baseline' if ep == 0 else f'{len(e.leaks)} growing sites'}")
    if device == "cuda":
        print(f"torch.cuda.max_memory_allocated(): {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
