"""Stress: many threads hammering one profiler; exact counters, no crash, no deadlock.

Scenarios (each in this process; run each in its own process, since the
plugin's backend and the process-wide GPU recorder are per process):

  track   16 threads: workers mixing track_allocation / track_deallocation /
          track_reallocation on their own address ranges (with sizes and
          anomalies they count themselves), plus threads taking snapshots,
          advancing steps and querying (statistics, events, live set, leaks).
  plugin  the same, with half the workers calling the CUDA plugin's C entry
          points (torchmem_malloc / torchmem_free, host backend) through
          ctypes, which releases the GIL as torch does.
  host    the plugin scenario while the main thread runs a GC-heavy torch
          workload (tensors in reference cycles, low GC thresholds) under the
          host tracker and the GC monitor.
  sinks   the track scenario with a SQLite trace and an EventPublisher whose
          subscriber is slow; the saved trace must load with the same counters.

Every scenario checks at the end that the profiler's counters equal the sum
of what the threads did, that the live set is exactly the survivors, and
that no anomaly was counted; a thread still running after its deadline is a
deadlock. The process exits 0 on success and prints one JSON line per
scenario.

  python benchmarks/stress.py                     # 30 s x 16 threads, all scenarios
  python benchmarks/stress.py --seconds 3 --scenario plugin

tests/test_stress.py runs a CI-sized version of each scenario.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

SCENARIOS = ("track", "plugin", "host", "sinks")


class Tally:
    """What one worker did, in the profiler's terms."""

    def __init__(self) -> None:
        self.allocated = self.freed = 0
        self.n_alloc = self.n_free = 0
        self.by_type: dict[str, list[int]] = {}  # type -> [allocated, freed]
        self.live: dict[int, int] = {}  # address -> size
        self.anomalies = dict.fromkeys(("unknown_free", "double_free", "size_mismatch",
                                        "alloc_over_live"), 0)
        self.plugin_bytes = self.plugin_calls = 0
        self.ops = 0

    def alloc(self, address: int, size: int, type_name: str) -> None:
        self.allocated += size
        self.n_alloc += 1
        self.by_type.setdefault(type_name, [0, 0])[0] += size
        self.live[address] = size

    def free(self, address: int, type_name: str) -> None:
        size = self.live.pop(address)
        self.freed += size
        self.n_free += 1
        self.by_type.setdefault(type_name, [0, 0])[1] += size


def _plugin_lib() -> Any:
    import torchmem.cuda as tcuda

    tcuda.set_backend("host")
    lib = ctypes.CDLL(tcuda.plugin_path())
    lib.torchmem_malloc.restype = ctypes.c_void_p
    lib.torchmem_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.torchmem_free.restype = None
    lib.torchmem_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                  ctypes.c_void_p]
    lib.torchmem_plugin_set_oom_throws(0)
    return lib


def _detach_gpu_recorder() -> None:
    from torchmem import _native

    try:
        _native.set_gpu_recorder(None)
    except TypeError:  # the binding does not take None yet: give it a disabled recorder
        idle = _native.Recorder(1024)
        idle.enabled = False
        _native.set_gpu_recorder(idle)


def track_worker(p: Any, index: int, deadline: float, tally: Tally, errors: list,
                 pause: float = 0.0) -> None:
    """track_* calls on addresses [index << 40, ...): alloc, free, realloc, anomalies."""
    rng = random.Random(index)
    base = (index + 1) << 40
    # Never "CPU": in the host scenario that type is the host tracker's alone.
    type_name = ("manual", "GPU", "Pinned", "arena")[index % 4]
    device = index % 3 if type_name == "GPU" else -1
    slots = 256
    try:
        while time.monotonic() < deadline:
            if pause:
                time.sleep(pause)
            for _ in range(200):
                address = base + rng.randrange(slots) * 64
                r = rng.random()
                if address not in tally.live:
                    size = rng.randrange(1, 4096)
                    p.track_allocation(address, size, type_name, device, index)
                    tally.alloc(address, size, type_name)
                elif r < 0.6:
                    p.track_deallocation(address)
                    tally.free(address, type_name)
                elif r < 0.7:
                    # Wrong size: counted, the recorded size is freed.
                    p.track_deallocation(address, tally.live[address] + 1)
                    tally.anomalies["size_mismatch"] += 1
                    tally.free(address, type_name)
                elif r < 0.8:
                    new = base + (slots + rng.randrange(slots)) * 64
                    if new in tally.live:
                        continue
                    size = rng.randrange(1, 4096)
                    p.track_reallocation(address, new, size)
                    tally.free(address, type_name)
                    tally.alloc(new, size, type_name)
                elif r < 0.85:
                    # A free of an address this thread never used: unknown.
                    p.track_deallocation(base + (1 << 39) + rng.randrange(1 << 20) * 64)
                    tally.anomalies["unknown_free"] += 1
                else:
                    size = rng.randrange(1, 4096)
                    p.track_allocation(address, size, type_name, device, index)
                    tally.anomalies["alloc_over_live"] += 1
                    tally.free(address, type_name)
                    tally.alloc(address, size, type_name)
                tally.ops += 1
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(f"track worker {index}: {exc!r}")


def plugin_worker(lib: Any, index: int, deadline: float, tally: Tally, errors: list,
                  pause: float = 0.0) -> None:
    """torchmem_malloc / torchmem_free through ctypes (the GIL is released per call)."""
    rng = random.Random(1000 + index)
    device = index % 2
    stream = ctypes.c_void_p(index)
    held: list[tuple[int, int]] = []
    try:
        while time.monotonic() < deadline:
            if pause:
                time.sleep(pause)
            for _ in range(200):
                if held and (len(held) > 64 or rng.random() < 0.5):
                    ptr, size = held.pop(rng.randrange(len(held)))
                    lib.torchmem_free(ptr, size, device, stream)
                    tally.free(ptr, "GPU")
                else:
                    size = rng.randrange(1, 1 << 16)
                    ptr = lib.torchmem_malloc(size, device, stream)
                    if not ptr:
                        raise RuntimeError("torchmem_malloc returned NULL on the host backend")
                    ctypes.memset(ptr, index & 0xFF, min(size, 64))
                    held.append((ptr, size))
                    tally.alloc(ptr, size, "GPU")
                    tally.plugin_bytes += size
                    tally.plugin_calls += 1
                tally.ops += 1
        for ptr, size in held:
            lib.torchmem_free(ptr, size, device, stream)
            tally.free(ptr, "GPU")
    except BaseException as exc:  # noqa: BLE001
        errors.append(f"plugin worker {index}: {exc!r}")


def snapshot_worker(p: Any, deadline: float, counts: dict, errors: list) -> None:
    try:
        while time.monotonic() < deadline:
            p.track_snapshot()
            p.step()
            counts["snapshots"] = counts.get("snapshots", 0) + 1
            time.sleep(0.002)
    except BaseException as exc:  # noqa: BLE001
        errors.append(f"snapshot worker: {exc!r}")


def query_worker(p: Any, deadline: float, counts: dict, errors: list) -> None:
    """Reads everything while it changes; each answer must be self-consistent."""
    import numpy as np

    try:
        while time.monotonic() < deadline:
            s = p.get_statistics()
            if s.current_usage_bytes != s.total_allocated_bytes - s.total_freed_bytes:
                errors.append(f"inconsistent statistics {s}")
            step = p.current_step
            rows = p.get_event_rows(step)
            if len(rows):
                seq = rows["seq"].astype(np.int64)
                if not bool(np.all(np.diff(seq) == 1)):
                    errors.append("event seq numbers not consecutive")
                if not bool(np.all(np.diff(rows["timestamp_ns"]) >= 0)):
                    errors.append("event timestamps go back")
                if bool(np.any(rows["total_allocated"] < rows["total_freed"])):
                    errors.append("cumulative freed exceeds allocated")
            live = p.live_allocations()
            if len(live) and not bool(np.all(np.diff(live["seq"].astype(np.int64)) > 0)):
                errors.append("live allocations not ordered by seq")
            p.detect_potential_leaks(min_age_steps=2)[:5]
            p.get_allocations_since(time.time() - 0.01)
            p.get_statistics_for_type("GPU")
            p.anomalies
            counts["queries"] = counts.get("queries", 0) + 1
    except BaseException as exc:  # noqa: BLE001
        errors.append(f"query worker: {exc!r}")


def gc_heavy_workload(deadline: float) -> dict[str, int]:
    """Torch tensors in reference cycles, on the calling thread, with frequent GC."""
    import torch

    class Node:
        def __init__(self, t: Any) -> None:
            self.t = t
            self.other: Any = None

    made = collections = rounds = 0
    keep: list[Any] = []
    old = gc.get_threshold()
    gc.set_threshold(50, 5, 5)
    try:
        # At least 10 rounds, however little of the GIL the workers leave us.
        while time.monotonic() < deadline or rounds < 10:
            for _ in range(20):
                a = Node(torch.empty(256 + made % 1024))
                b = Node(torch.ones(64) * made)
                a.other, b.other = b, a  # a cycle only the collector frees
                if made % 10 == 0:
                    keep.append(a)
                made += 2
            if len(keep) > 50:
                keep = keep[25:]
            rounds += 1
            if rounds % 5 == 0:
                gc.collect()
                collections += 1
        keep.clear()
    finally:
        gc.set_threshold(*old)
    return {"tensors_made": made, "explicit_collections": collections}


def run(scenario: str, seconds: float, threads: int) -> dict[str, Any]:
    import torchmem
    from torchmem import _native

    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}")
    if scenario == "host":
        import torch  # noqa: F401 - imported before the clock starts
        from torchmem.sources.gc_monitor import GCMonitor
        from torchmem.sources.host import HostTracker
    storage = publisher = trace_path = None
    delivered = [0]
    if scenario == "sinks":
        import tempfile

        from torchmem.publisher import EventPublisher
        from torchmem.storage import SQLiteStorage

        trace_path = os.path.join(tempfile.mkdtemp(prefix="torchmem-stress-"), "trace.db")
        storage = SQLiteStorage(trace_path)
        publisher = EventPublisher(max_queue_batches=4)

        def slow_subscriber(events: list) -> None:
            delivered[0] += len(events)
            time.sleep(0.05)

        publisher.subscribe(slow_subscriber)
    p = torchmem.MemoryProfiler(storage, publisher, auto_snapshot=False,
                                retention_events=1 << 16)
    lib = None
    if scenario in ("plugin", "host"):
        lib = _plugin_lib()
        _native.set_gpu_recorder(p)
    errors: list[str] = []
    counts: dict[str, int] = {}
    n_aux = 2 if threads >= 4 else 0  # one snapshot/step thread, one query thread
    n_workers = threads - n_aux
    tallies = [Tally() for _ in range(n_workers)]
    deadline = time.monotonic() + seconds
    workers = []
    # A short sleep per 200 calls hands the GIL round, so snapshots, queries and
    # (host) the main thread's GC-heavy workload get their share.
    # Sinks: keep the event rate to what a SQLite writer can store meanwhile.
    pause = {"host": 0.002, "sinks": 0.02}.get(scenario, 0.0005)
    for i in range(n_workers):
        if lib is not None and i % 2 == 1:
            workers.append(threading.Thread(target=plugin_worker,
                                            args=(lib, i, deadline, tallies[i], errors, pause)))
        else:
            workers.append(threading.Thread(target=track_worker,
                                            args=(p, i, deadline, tallies[i], errors, pause)))
    if n_aux:
        workers.append(threading.Thread(target=snapshot_worker, args=(p, deadline, counts, errors)))
        workers.append(threading.Thread(target=query_worker, args=(p, deadline, counts, errors)))
    for w in workers:
        w.daemon = True
    tracker = monitor = None
    if scenario == "host":
        monitor = GCMonitor(p).start()
        tracker = HostTracker(p).start()
    t0 = time.monotonic()
    for w in workers:
        w.start()
    workload: dict[str, int] = {}
    if scenario == "host":
        try:
            workload = gc_heavy_workload(deadline)
        finally:
            tracker.stop()
        gc.collect()
    for w in workers:
        w.join(timeout=max(deadline - time.monotonic(), 0) + 60)
    stuck = [w.name for w in workers if w.is_alive()]
    elapsed = time.monotonic() - t0
    if monitor is not None:
        monitor.stop()
    if lib is not None:
        _detach_gpu_recorder()

    # -- exact checks --------------------------------------------------------------
    problems = list(errors)
    if stuck:
        problems.append(f"deadlock: threads still running after the deadline: {stuck}")
    s = p.get_statistics()
    want_alloc = sum(t.allocated for t in tallies)
    want_freed = sum(t.freed for t in tallies)
    want_n = sum(t.n_alloc for t in tallies)
    want_nf = sum(t.n_free for t in tallies)
    host_part = None
    if scenario == "host":
        # The host tracker's storages are "CPU"; the workers here use other types.
        cpu = p.get_statistics_for_type("CPU")
        host_part = {"allocations": cpu.allocation_count, "bytes": cpu.total_allocated_bytes,
                     "live_bytes_after_gc": cpu.current_usage_bytes}
        if cpu.allocation_count == 0:
            problems.append("host tracker recorded nothing")
        want_alloc += cpu.total_allocated_bytes
        want_freed += cpu.total_freed_bytes
        want_n += cpu.allocation_count
        want_nf += cpu.deallocation_count
        if cpu.current_usage_bytes != tracker.live_bytes:
            problems.append(f"host tracker: {cpu.current_usage_bytes} B live in the profiler, "
                            f"{tracker.live_bytes} B in the tracker")
    got = (s.total_allocated_bytes, s.total_freed_bytes, s.allocation_count,
           s.deallocation_count)
    want = (want_alloc, want_freed, want_n, want_nf)
    if got != want:
        problems.append(f"counters {got} != expected {want}")
    for type_name in ("GPU", "Pinned", "manual", "arena"):
        ts = p.get_statistics_for_type(type_name)
        a = sum(t.by_type.get(type_name, [0, 0])[0] for t in tallies)
        f = sum(t.by_type.get(type_name, [0, 0])[1] for t in tallies)
        if (ts.total_allocated_bytes, ts.total_freed_bytes) != (a, f):
            problems.append(f"{type_name}: ({ts.total_allocated_bytes}, "
                            f"{ts.total_freed_bytes}) != expected ({a}, {f})")
    want_anomalies = {k: sum(t.anomalies[k] for t in tallies) for k in tallies[0].anomalies}
    got_anomalies = {k: v for k, v in p.anomalies["counts"].items() if k in want_anomalies}
    if got_anomalies != want_anomalies:
        problems.append(f"anomalies {got_anomalies} != expected {want_anomalies}")
    live = p.live_allocations()
    worker_live = {a: s_ for t in tallies for a, s_ in t.live.items()}
    if scenario == "host":  # leave out what the host tracker still holds
        live = live[live["type_id"] != p.type_names.index("CPU")]
    live_map = dict(zip(live["address"].tolist(), live["size"].tolist()))
    if live_map != worker_live:
        problems.append(f"live set: {len(live_map)} entries, expected {len(worker_live)}")
    if lib is not None:
        import torchmem.cuda as tcuda

        stats = tcuda.plugin_stats()
        want_calls = sum(t.plugin_calls for t in tallies)
        want_bytes = sum(t.plugin_bytes for t in tallies)
        if (stats["alloc_count"], stats["allocated"], stats["live_blocks"]) != \
                (want_calls, want_bytes, 0):
            problems.append(f"plugin stats {stats} != {want_calls} calls, {want_bytes} B, 0 live")
    sinks = None
    if scenario == "sinks":
        from torchmem.storage import load

        n_events = p.next_seq
        p.close()
        saved = load(trace_path)
        ss = saved.get_statistics()
        if (ss.total_allocated_bytes, ss.total_freed_bytes, ss.allocation_count,
                ss.deallocation_count) != got:
            problems.append(f"saved trace counters differ: {ss} vs {got}")
        if saved.next_seq != n_events:
            problems.append(f"saved trace holds {saved.next_seq} of {n_events} events")
        if storage.write_error:
            problems.append(f"storage failed: {storage.write_error}")
        sinks = {"events_written": storage.events_written, "delivered": delivered[0],
                 "dropped_batches": publisher.dropped_batches}
        publisher.close(timeout=5)
    result = {
        "scenario": scenario, "threads": threads, "seconds": round(elapsed, 2),
        "ops": sum(t.ops for t in tallies), "events": p.next_seq,
        "allocations": s.allocation_count, "snapshots": counts.get("snapshots", 0),
        "queries": counts.get("queries", 0), "gc_records": len(p.gc_records),
        "host": host_part, "workload": workload, "sinks": sinks, "problems": problems,
    }
    p.close()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--scenario", choices=SCENARIOS + ("all",), default="all")
    ap.add_argument("--timeout", type=float, default=None,
                    help="dump every thread's stack and exit 3 after this many seconds "
                         "(default: seconds + 120)")
    args = ap.parse_args(argv)
    if args.scenario == "all":
        # One process per scenario: the plugin's backend is process-wide.
        rc = 0
        for name in SCENARIOS:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--seconds",
                                   str(args.seconds), "--threads", str(args.threads),
                                   "--scenario", name])
            rc = rc or proc.returncode
        return rc
    faulthandler.dump_traceback_later(args.timeout or args.seconds + 120, exit=True)
    result = run(args.scenario, args.seconds, args.threads)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(result), flush=True)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
