"""Faults: SIGKILL during SQLite writes, a full disk, a subscriber that never returns.

The profiler watches other people's training runs: none of these may crash
the run, block its allocations, or leave a trace that does not open.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest

import torchmem
from torchmem.publisher import EventPublisher
from torchmem.storage import SQLiteStorage, TraceFormatError, load

# Event k of the writer below: pairs of (allocation, free) of a known address
# and size, so any prefix of the log is checkable row by row.
WRITER = textwrap.dedent("""
    import sys
    import torchmem
    from torchmem.storage import SQLiteStorage

    def write(path, say, committed):
        st = SQLiteStorage(path)
        p = torchmem.MemoryProfiler(st, auto_snapshot=False, flush_interval_ms=5)
        k = 0
        say("ready")
        while True:
            for _ in range(250):
                a = 4096 + (k % 1000) * 64
                p.track_allocation(a, k % 777 + 1)
                p.track_deallocation(a)
                k += 1
            p.flush()
            st.flush()
            committed(st.events_written)
""")

# The writer's runs forked from one process that imported torchmem once
# (what cost ~1 s a run as a fresh interpreter): for each PATH line on stdin
# a child runs write(), says "ready PID" and its committed counts go to
# PATH.committed; the zygote says "exit PID STATUS" once it has reaped it.
ZYGOTE = WRITER + textwrap.dedent("""
    import os
    for line in sys.stdin:
        path = line.strip()
        pid = os.fork()
        if pid == 0:
            try:
                with open(path + ".committed", "w") as out:
                    write(path, lambda m: print(m, os.getpid(), flush=True),
                          lambda n: print(n, file=out, flush=True))
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)
""")


def expected_row(seq: int) -> tuple[int, int, int]:
    k = seq // 2
    return seq % 2, 4096 + (k % 1000) * 64, k % 777 + 1


def check_prefix(prof, at_least: int) -> int:
    rows = prof.get_event_rows()
    n = len(rows)
    assert n >= at_least, f"trace holds {n} events, {at_least} were committed"
    seq = np.arange(n)
    assert np.array_equal(rows["seq"], seq)
    # expected_row(i) for every row at once.
    want = np.stack([seq % 2, 4096 + (seq // 2 % 1000) * 64, seq // 2 % 777 + 1])
    got = np.stack([rows["kind"], rows["address"], rows["size"]]).astype(np.int64)
    wrong = np.flatnonzero((got != want).any(axis=0))
    assert wrong.size == 0, f"row {wrong[0]}: {tuple(got[:, wrong[0]])} != " \
        f"{expected_row(int(wrong[0]))}"
    s = prof.get_statistics()
    assert s.allocation_count == (n + 1) // 2
    assert s.deallocation_count == n // 2
    assert s.current_usage_bytes == (expected_row(n - 1)[2] if n % 2 else 0)
    return n


def test_sigkill_during_sqlite_writes_20_times(tmp_path):
    rng = random.Random(7)
    held = []
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for run in range(20):
            path = str(tmp_path / f"killed-{run}.db")
            print(path, file=zygote.stdin, flush=True)
            said = zygote.stdout.readline().split()
            assert said[0] == "ready", said
            pid = said[1]
            try:
                # Random moments: right at the start, mid-commit, after many commits.
                time.sleep(rng.choice([0.0, 0.001, 0.01]) + rng.random() * 0.15)
            finally:
                os.kill(int(pid), signal.SIGKILL)
            assert zygote.stdout.readline().split() == ["exit", pid, str(-signal.SIGKILL)]
            with open(path + ".committed") as f:
                committed = [int(x) for x in f.read().split()]
            last = committed[-1] if committed else 0
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                assert last == 0  # killed before SQLite wrote anything
                continue
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            prof = load(path)
            held.append(check_prefix(prof, last))
            prof.close()
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert len(held) >= 15 and max(held) > 0


DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys, warnings
    path, limit = sys.argv[1], int(sys.argv[2])
    if limit:
        # A file-size limit stands in for a full disk: writes past it fail
        # with EFBIG instead of killing the process with SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    caught = []
    warnings.simplefilter("always")
    warnings.showwarning = lambda msg, *a, **k: caught.append(str(msg))
    import torchmem
    from torchmem.storage import SQLiteStorage
    st = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(st, auto_snapshot=False, flush_interval_ms=5)
    n = 60000
    for k in range(n):
        a = 4096 + (k % 1000) * 64
        p.track_allocation(a, k % 777 + 1)
        p.track_deallocation(a)
        if k % 2000 == 0:
            p.flush()
            st.flush()
    p.track_allocation(1, 123)  # still profiling in memory
    s = p.get_statistics()
    p.close()
    print(json.dumps({"warnings": caught, "write_error": st.write_error,
                      "written": st.events_written,
                      "stats": [s.allocation_count, s.deallocation_count,
                                s.current_usage_bytes, s.total_allocated_bytes],
                      "expected": [n + 1, n, 123,
                                   sum(k % 777 + 1 for k in range(n)) + 123]}))
""")


def run_disk_full(path: str, limit: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, path, str(limit)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Profiling went on in memory, exactly.
    assert result["stats"] == result["expected"]
    # One clear warning, naming the file and what happens next.
    assert result["write_error"]
    assert len(result["warnings"]) == 1, result["warnings"]
    text = result["warnings"][0]
    assert path in text and "goes on in memory" in text
    assert "Traceback" not in proc.stderr
    # The trace holds what was committed before the failure.
    try:
        prof = load(path)
    except TraceFormatError as exc:  # a file cut mid-page is still a clear error
        assert path in str(exc)
        return result
    check_prefix(prof, 0)
    assert len(prof.get_event_rows()) == result["written"]
    prof.close()
    return result


def test_file_size_limit_acts_as_disk_full(tmp_path):
    # 4 MiB: room for the empty schema and its WAL (64 KiB pages), not for
    # 120K events (9.6 MB of rows).
    result = run_disk_full(str(tmp_path / "limited.db"), 4 * 1024 * 1024)
    assert 0 < result["written"] < 120001


def _mount_tmpfs(where: str, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                       capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_small_tmpfs():
    where = tempfile.mkdtemp(prefix="torchmem-full-")
    if not _mount_tmpfs(where, "4m"):
        os.rmdir(where)
        pytest.skip("cannot mount a tmpfs here (needs root); "
                    "test_file_size_limit_acts_as_disk_full covers the same path")
    try:
        result = run_disk_full(os.path.join(where, "full.db"), 0)
        assert result["written"] < 120001
    finally:
        subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


def test_subscriber_that_blocks_forever():
    release = threading.Event()
    entered = threading.Event()

    def stuck(events):
        entered.set()
        release.wait()  # "forever": until the test ends

    pub = EventPublisher(max_queue_batches=2)
    pub.subscribe(stuck)
    p = torchmem.MemoryProfiler(None, pub, auto_snapshot=False, flush_interval_ms=100000)
    try:
        p.track_allocation(16, 1)
        p.flush()  # batch 1: the subscriber takes it and blocks
        assert entered.wait(10)
        t0 = time.perf_counter()
        n_batches = 12
        for b in range(n_batches):
            for i in range(1000):
                p.track_allocation(1 << 20 | (b * 1000 + i) * 16, 8)
            p.flush()  # never waits for the subscriber
        elapsed = time.perf_counter() - t0
        assert elapsed < 5, f"12 flushes took {elapsed:.1f} s behind a stuck subscriber"
        # Two batches wait in the queue; every later one is dropped and counted.
        assert pub.dropped_batches == n_batches - 2
        assert pub.dropped_events == (n_batches - 2) * 1000
        s = p.get_statistics()
        assert s.allocation_count == 1 + n_batches * 1000
        assert p.anomalies["total"] == 0
        # The allocation path does not wait on the publisher.
        t0 = time.perf_counter()
        for i in range(100_000):
            p.track_allocation(1 << 40 | i * 16, 8)
        assert time.perf_counter() - t0 < 2.0
    finally:
        release.set()
        p.close()
        pub.close(timeout=5)
