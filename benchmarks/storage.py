"""SQLite storage throughput and its cost per tracked event.

    python benchmarks/storage.py [--events N]

Prints:
- sustained events/s the SQLite writer stores (appends of ready deltas,
  timed until committed);
- the time per tracked event (track_allocation + track_deallocation pairs,
  addresses reused) with in-memory only vs SQLite on, two ways: the
  tracking loop alone (what the training thread pays while it runs; the
  writer works on its own thread) and end to end (loop + close, until every
  event is committed). Goal: loop cost with SQLite <= 1.10x in-memory.
Each configuration runs 3 times; the best run counts (2-core machines are noisy).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torchmem
from torchmem.storage import SQLiteStorage


def _track(p, n: int) -> float:
    ta, td = p.track_allocation, p.track_deallocation
    t0 = time.perf_counter()
    for i in range(n // 2):
        a = 0x10000 + (i & 1023) * 64
        ta(a, 64)
        td(a)
    return time.perf_counter() - t0


def run_tracking(n: int, sqlite_dir: str | None) -> tuple[float, float]:
    """(loop seconds, end-to-end seconds) for n tracked events."""
    storage = None
    if sqlite_dir is not None:
        storage = SQLiteStorage(os.path.join(sqlite_dir, f"t{time.monotonic_ns()}.db"))
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    t0 = time.perf_counter()
    loop = _track(p, n)
    p.close()
    return loop, time.perf_counter() - t0


def writer_throughput(n: int, directory: str) -> float:
    """Events per second SQLiteStorage commits when handed ready deltas."""
    p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=n + 1)
    _track(p, n)
    cursors: dict = {}
    deltas = []
    for _ in range(10):  # ten flush-sized deltas
        p._set_consumer_seq(cursors.get("seq", 0))
        d = p._sink_delta(cursors)
        deltas.append(d)
    rest = p._sink_delta(cursors)
    deltas.append(rest)
    storage = SQLiteStorage(os.path.join(directory, "w.db"))
    t0 = time.perf_counter()
    for d in deltas:
        storage.append(d)
    storage.flush(timeout=None)
    dt = time.perf_counter() - t0
    total = storage.events_written
    storage.close()
    p.close()
    return total / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as d:
        rate = max(writer_throughput(n, d) for _ in range(1))
        print(f"SQLite writer, sustained: {rate / 1e3:,.0f} k events/s "
              f"({1e9 / rate:,.0f} ns per stored event)")
        mem = [run_tracking(n, None) for _ in range(3)]
        sql = [run_tracking(n, d) for _ in range(3)]
    m_loop, m_all = min(x for x, _ in mem), min(y for _, y in mem)
    s_loop, s_all = min(x for x, _ in sql), min(y for _, y in sql)
    print(f"{n:,} tracked events (alloc/free pairs):")
    print(f"  in-memory  loop {m_loop * 1e3:8.1f} ms = {m_loop / n * 1e9:6.1f} ns/event; "
          f"end to end {m_all * 1e3:8.1f} ms")
    print(f"  SQLite on  loop {s_loop * 1e3:8.1f} ms = {s_loop / n * 1e9:6.1f} ns/event; "
          f"end to end {s_all * 1e3:8.1f} ms")
    print(f"  added cost while tracking: {(s_loop / m_loop - 1) * 100:+.1f}% "
          f"({(s_loop - m_loop) / n * 1e9:+.1f} ns/event; goal <= +10%)")
    print(f"  added cost end to end (until committed): {(s_all / m_all - 1) * 100:+.1f}% "
          f"({(s_all - m_all) / n * 1e9:+.1f} ns/event)")


if __name__ == "__main__":
    main()
