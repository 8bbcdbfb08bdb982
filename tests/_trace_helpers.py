"""A deterministic profiler workload shared by the storage and export tests."""

from __future__ import annotations

import torchmem

# (address, size, type, device) of the allocations make_workload performs.
KB = 1024


def make_workload(profiler: torchmem.MemoryProfiler) -> None:
    """Allocations on host and two GPUs across 4 steps, a realloc, frees, a snapshot,
    a GC and an OOM. Live at the end: 0x1000 (CPU 4 KiB), 0x9000 (GPU:1 2 KiB) and
    0x5000 (Pinned, reallocated to 0x6000, 3 KiB)."""
    p = profiler
    p.track_allocation(0x1000, 4 * KB, "CPU")
    p.track_allocation(0x2000, 8 * KB, "CPU")
    p.track_allocation(0x7000, 16 * KB, "GPU", device=0, stream=7)
    p.step()  # step 1
    p.track_deallocation(0x2000)
    p.track_allocation(0x8000, 1 * KB, "GPU", device=0, stream=7)
    p.track_allocation(0x9000, 2 * KB, "GPU", device=1)
    p.track_allocation(0x5000, 1 * KB, "Pinned")
    p.track_snapshot()
    p.step()  # step 2
    p.track_reallocation(0x5000, 0x6000, 3 * KB)
    p.track_deallocation(0x7000)
    p.record_gc_start(2)
    p.record_gc_end(2, 5, 0)
    p.step()  # step 3
    p.track_deallocation(0x8000)
    p.record_oom(1 << 30, 0, 7, 512 * KB, 80 << 30)
