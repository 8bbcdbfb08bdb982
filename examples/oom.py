"""An out-of-memory error and the report torchmem writes for it.

    python examples/oom.py            # GPU: allocates until CUDA runs out
    python examples/oom.py --simulate # any machine: a simulated OOM

On a GPU the torchmem CUDA allocator records the failed request and the
device's free/total bytes, torch raises torch.OutOfMemoryError, and
``torchmem.oom_guard()`` writes the report (text and HTML) before the error
propagates; its path is printed on stderr. ``--simulate`` records the same
event through the profiler's OOM hook and raises the same error, so the
report can be seen on a CPU-only machine.
"""

from __future__ import annotations

import argparse

import torch

import torchmem
from torchmem.oom import oom_guard


def grow_on_gpu(chunks: list) -> None:
    while True:  # 1 GiB at a time until the device is full
        chunks.append(torch.empty(1 << 28, dtype=torch.float32, device="cuda"))


def simulate(profiler: torchmem.MemoryProfiler, chunks: list) -> None:
    for _ in range(8):
        chunks.append(torch.empty(1 << 20))  # 4 MiB of host tensors, on record
    want = 2 << 30
    profiler.record_oom(want, 0, 0, 512 << 20, 16 << 30, "GPU")
    raise torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB on device 0 (simulated by torchmem)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true",
                        help="simulate the OOM (default when CUDA is not available)")
    args = parser.parse_args()
    profiler = torchmem.enable()
    chunks: list = []
    try:
        with oom_guard():
            if args.simulate or not torch.cuda.is_available():
                simulate(profiler, chunks)
            else:
                grow_on_gpu(chunks)
    except torch.OutOfMemoryError as exc:
        print(f"caught: {str(exc).splitlines()[0]}  (see the report path above)")


if __name__ == "__main__":
    main()
