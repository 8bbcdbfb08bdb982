"""1M allocations + 1M frees through MemoryProfiler, against a plain-Python tracker.

Patterns: "pairs" (allocate, free, allocate, free, ...) and "batched"
(allocate 1000, free those 1000, ...); addresses are reused in both.
Each figure is the best of --repeat runs (default 5); the dict baseline runs in the same
process, so the ratio holds on any machine. Also prints the cost of the bare
Python loop (two no-op calls per pair), the floor any per-call API pays.

    python benchmarks/track_1m.py [--n 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np

import torchmem


class DictTracker:
    """What a careful pure-Python tracker does per call: live dict, counters, event log."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, str, int]] = {}
        self.events: list[tuple] = []
        self.allocated = self.freed = self.current = self.peak = 0
        self.n_alloc = self.n_free = 0

    def track_allocation(self, address, size_bytes, allocation_type="CPU", device=-1, stream=0):
        now = time.time_ns()
        self.live[address] = (size_bytes, allocation_type, device)
        self.allocated += size_bytes
        self.current += size_bytes
        self.n_alloc += 1
        if self.current > self.peak:
            self.peak = self.current
        self.events.append((now, 0, address, size_bytes, allocation_type, device, stream))

    def track_deallocation(self, address, size_bytes=None):
        now = time.time_ns()
        entry = self.live.pop(address, None)
        if entry is None:
            return
        self.freed += entry[0]
        self.current -= entry[0]
        self.n_free += 1
        self.events.append((now, 1, address, entry[0], entry[1], entry[2], 0))


def run_pairs(tracker, n: int) -> float:
    alloc, free = tracker.track_allocation, tracker.track_deallocation
    addrs = [0x7F0000000000 + (i % 4096) * 256 for i in range(n)]
    t = time.perf_counter()
    for a in addrs:
        alloc(a, 256)
        free(a)
    return time.perf_counter() - t


def run_batched(tracker, n: int, batch: int = 1000) -> float:
    alloc, free = tracker.track_allocation, tracker.track_deallocation
    block = [0x7F0000000000 + i * 256 for i in range(batch)]
    t = time.perf_counter()
    for _ in range(n // batch):
        for a in block:
            alloc(a, 256)
        for a in block:
            free(a)
    return time.perf_counter() - t


class NoOp:
    """Two C-level no-op calls per pair: the interpreter's own floor."""

    def __init__(self) -> None:
        p = torchmem.MemoryProfiler(auto_snapshot=False)
        p.disable()
        self.track_allocation, self.track_deallocation = p.track_allocation, p.track_deallocation


def best(fn, make, n: int, repeat: int) -> tuple[float, object]:
    times, last = [], None
    for _ in range(repeat):
        tracker = make()
        gc.collect()
        gc.disable()
        try:
            times.append(fn(tracker, n))
        finally:
            gc.enable()
        last = tracker
    return min(times), last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.n
    print(f"torchmem {torchmem.__version__}, python {sys.version.split()[0]}, {n} pairs, best of {args.repeat}")

    def profiler(stacks: bool):
        def make():
            p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=2 * n,
                                        capture_stack_traces=stacks, max_stack_trace_depth=10)
            return p
        return make

    rows = []
    for name, fn in (("pairs", run_pairs), ("batched", run_batched)):
        floor, _ = best(fn, NoOp, n, args.repeat)
        base, _ = best(fn, DictTracker, n, args.repeat)
        off, p = best(fn, profiler(False), n, args.repeat)
        s = p.get_statistics()
        assert s.allocation_count == n and s.deallocation_count == n and s.current_usage_bytes == 0
        on, _ = best(fn, profiler(True), n, args.repeat)
        rows.append((name, floor, base, off, on))

    print(f"\n{'pattern':8} {'loop floor':>11} {'dict':>9} {'torchmem':>9} {'+stacks':>9}"
          f" {'ns/event':>9} {'x dict':>7} {'stack ns/alloc':>15}")
    for name, floor, base, off, on in rows:
        print(f"{name:8} {floor*1e3:9.0f}ms {base*1e3:7.0f}ms {off*1e3:7.0f}ms {on*1e3:7.0f}ms"
              f" {off/(2*n)*1e9:9.0f} {base/off:7.2f} {(on-off)/n*1e9:15.0f}")
    print("(ns/event: per track_* call, interpreter loop included; 'loop floor' is the same loop"
          " calling a disabled profiler)")

    # Memory, from the recorder's own accounting (event log chunks, live map,
    # recently-freed filter). Events alone: allocate and free one address.
    p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=n)
    before = p._memory_bytes()
    for _ in range(n // 2):
        p.track_allocation(0x10000, 64)
        p.track_deallocation(0x10000)
    per_event = (p._memory_bytes() - before) / len(p.get_event_rows())
    p.close()
    # Live allocations: n live at once (their n events counted at per_event).
    p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=n)
    before = p._memory_bytes()
    for i in range(n):
        p.track_allocation(0x10000 + i * 64, 64)
    per_live = (p._memory_bytes() - before - n * per_event) / n
    p.close()
    print(f"\nprofiler memory per retained event: {per_event:.1f} bytes (goal <= 48)")
    print(f"profiler memory per live allocation: {per_live:.0f} bytes "
          f"(live map at its load factor, {n} live)")

if __name__ == "__main__":
    main()
