"""The interactive HTML report on a trace of about a million events: export
time, file size, and time to open in headless Chromium (until Bokeh has drawn
every view), against opening the report of an empty profiler in the same
browser in the same run (the page and Bokeh's own start-up).

The trace: a training-like loop through MemoryProfiler.track_* with stacks
captured: 50 long-lived "parameters", then per step 100 "activations" freed
in reverse, 100 short "temporaries"; 2,500 steps for 1M events.

    python benchmarks/html_report.py [--events 1000000] [--repeat 5]

Goals (issue 16): under ~20 MB, opens in under 3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import torchmem
from torchmem.export import export_html

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _browser import CHROMIUM, chromium, open_report  # noqa: E402


def make_trace(n_events: int, seed: int = 0) -> torchmem.MemoryProfiler:
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True,
                                retention_events=max(2**21, 2 * n_events))
    rng = np.random.default_rng(seed)
    base = 0x7F0000000000

    def parameters(k: int) -> None:
        for i in range(k):
            p.track_allocation(base + i * 4096, int(rng.integers(1, 64)) * 65536, "CPU")

    def forward(addrs: list[int], sizes: list[int]) -> None:
        for a, s in zip(addrs, sizes):
            p.track_allocation(a, s, "CPU")

    def backward(addrs: list[int]) -> None:
        for a in reversed(addrs):
            p.track_deallocation(a)

    def temporary(a: int, s: int) -> None:
        p.track_allocation(a, s, "CPU")
        p.track_deallocation(a)

    parameters(50)
    act = base + (1 << 36)
    while p.next_seq < n_events:
        addrs = [act + i * 256 for i in range(100)]
        forward(addrs, (rng.integers(1, 2048, len(addrs)) * 1024).tolist())
        for i in range(100):
            temporary(act + (1 << 30) + i * 256, 4096)
        backward(addrs)
        p.step()
    return p


def open_times(browser, path: str, repeat: int) -> tuple[list[float], list[float]]:
    """Wall seconds from navigation to every view drawn, and Chromium's main-thread
    busy seconds (TaskDuration) for the same, per run."""
    wall, busy = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        with open_report(browser, path) as r:
            wall.append(time.perf_counter() - t)
            busy.append(r.busy_s()["TaskDuration"])
            assert not r.errors and not r.refused, (r.errors, r.refused)
    return wall, busy


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if CHROMIUM is None:
        sys.exit("chromium not found (scripts/install-chromium.sh)")
    tmp = tempfile.mkdtemp(prefix="torchmem-html-bench-")
    t = time.perf_counter()
    prof = make_trace(args.events)
    print(f"trace: {prof.next_seq:,} events, {prof.current_step} steps, "
          f"built in {time.perf_counter() - t:.1f} s")
    big, empty = os.path.join(tmp, "big.html"), os.path.join(tmp, "empty.html")
    cpu, t = time.process_time(), time.perf_counter()
    export_html(prof, big)
    print(f"export: {time.perf_counter() - t:.1f} s wall, {time.process_time() - cpu:.1f} s CPU; "
          f"file {os.path.getsize(big) / 1e6:.1f} MB (goal < 20 MB)")
    prof.close()
    bare = torchmem.MemoryProfiler(auto_snapshot=False)
    export_html(bare, empty)
    bare.close()
    with chromium() as browser:
        open_times(browser, empty, 1)  # the browser's own first-page warm-up
        base = open_times(browser, empty, args.repeat)
        full = open_times(browser, big, args.repeat)
    for what, (wall, busy) in (("empty report (baseline)", base),
                               (f"{args.events:,}-event report", full)):
        print(f"open, {what}: wall {spread(wall)}; main thread busy {spread(busy)}")
    print(f"goal < 3 s; the large report's wall median is "
          f"{statistics.median(full[0]) / statistics.median(base[0]):.1f}x the baseline's, "
          f"its busy median {statistics.median(full[1]) / statistics.median(base[1]):.1f}x")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
