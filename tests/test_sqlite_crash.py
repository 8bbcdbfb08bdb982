"""A process killed with SIGKILL leaves a trace that opens and holds every flushed event.

The trace is written by a writer child process: when the training process is
killed, the child still stores everything it was sent, commits and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from torchmem.storage import load

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

# The child tracks allocation i at address 0x1000 + 16 * i and prints, after
# each batch, how many it has tracked and (with explicit flushes) that they
# are committed. It never stops by itself.
CHILD = textwrap.dedent("""
    import sys, time
    import torchmem
    from torchmem.storage import SQLiteStorage
    explicit = sys.argv[2] == "explicit"
    storage = SQLiteStorage(sys.argv[1])
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    n = 0
    while True:
        for _ in range(500):
            p.track_allocation(0x1000 + 16 * n, 16)
            n += 1
        if explicit:
            p.flush()
            storage.flush()
        print(n, time.monotonic(), flush=True)
        time.sleep(0.01)
""")


def _run_and_kill(tmp_path, mode, min_lines):
    path = tmp_path / f"{mode}.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode],
                             stdout=subprocess.PIPE, text=True)
    lines = []
    try:
        while len(lines) < min_lines:
            line = child.stdout.readline()
            assert line, "child died"
            lines.append(line.split())
    finally:
        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return path, [(int(n), float(t)) for n, t in lines], killed_at


def _check_prefix(path, n_expected_at_least):
    prof = load(path)
    rows = prof.get_event_rows()
    assert len(rows) >= n_expected_at_least
    # Exactly the first len(rows) allocations, in order, nothing torn.
    np.testing.assert_array_equal(rows["seq"], np.arange(len(rows)))
    np.testing.assert_array_equal(rows["address"], 0x1000 + 16 * np.arange(len(rows)))
    assert prof.get_statistics().allocation_count == len(rows)
    return len(rows)


def test_killed_writer_keeps_everything_explicitly_flushed(tmp_path):
    path, lines, _ = _run_and_kill(tmp_path, "explicit", 20)
    assert os.path.exists(str(path) + "-wal"), "a killed writer leaves its WAL behind"
    _check_prefix(path, lines[-1][0])


def test_killed_writer_keeps_events_older_than_the_flush_interval(tmp_path):
    path, lines, killed_at = _run_and_kill(tmp_path, "timed", 200)
    # The pump flushes every 200 ms and the writer commits at once; allow
    # 800 ms more for a loaded 2-core machine.
    old_enough = [n for n, t in lines if t <= killed_at - 1.0]
    assert old_enough, "the child should have run for more than a second"
    _check_prefix(path, old_enough[-1])


# Sends a large backlog (the writer is still storing it when the parent dies)
# and prints the writer's pid and how many events are in the pipe; never
# flushes the storage, so only the writer's drain on EOF can store them all.
SENDER = textwrap.dedent("""
    import sys, time
    import torchmem
    from torchmem.storage import SQLiteStorage
    storage = SQLiteStorage(sys.argv[1])
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False, flush_interval_ms=100000)
    n = int(sys.argv[2])
    for i in range(n):
        p.track_allocation(0x1000 + 16 * i, 16)
    p.flush()
    assert storage._wait_sent(60)
    print(storage.writer_pid, n, flush=True)
    time.sleep(3600)
""")


def _wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # exited; its new parent has yet to reap it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_killed_training_process_leaves_everything_it_sent(tmp_path):
    path = tmp_path / "sent.db"
    child = subprocess.Popen([sys.executable, "-c", SENDER, str(path), "200000"],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, "child died"
        writer_pid, sent = map(int, line.split())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The writer outlives the training process only to drain, then exits.
    assert _wait_gone(writer_pid, 60), "the writer child did not exit after its parent died"
    assert os.path.exists(str(path) + "-wal"), "drained after EOF: no checkpoint, like a crash"
    assert _check_prefix(path, sent) == sent


# -- events still in event_chunks (a live run, or a writer killed before expanding) --
def _columns_blob(part, layout=2) -> bytes:
    """``part`` (EVENT_DTYPE) as a COLUMNS chunk (layout 2; 1: schema 4's, without
    context_id), encoded here from docs/trace-format.md."""
    from torchmem.storage import _chunks

    first = part[0]
    before_alloc = int(first["total_allocated"]) - (int(first["size"]) if first["kind"] in (0, 2)
                                                    else 0)
    before_freed = int(first["total_freed"]) - (int(first["size"]) if first["kind"] == 1 else 0)
    mask, body = 0, b""
    columns = _chunks.CHUNK_COLUMNS if layout == 2 else _chunks.CHUNK_COLUMNS_V1
    for bit, (name, code) in enumerate(columns):
        values = part[name].astype(np.dtype("<" + code))
        if len(set(values.tolist())) > 1:
            mask |= 1 << bit
            body += values.tobytes()
        else:
            body += values[:1].tobytes()
    ts = part["timestamp_ns"]
    head = _chunks.COLUMNS_HEAD.pack(int(first["seq"]), len(part), mask, 0, before_alloc,
                                     before_freed, int(ts.min()), int(ts.max()))
    return head + body


def _rechunk_tail(path, first_seq, layout=0):
    """Moves the rows from ``first_seq`` on back into chunks of 3 events (``layout``
    0: rows, 1: schema 4's columns, 2: columns), as a writer killed before
    expanding them leaves them."""
    import sqlite3

    from torchmem.storage import TraceReader

    with TraceReader(path) as r:
        tail = r.read_events(start_step=None)[first_seq:]
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("DELETE FROM events WHERE seq >= ?", (first_seq,))
    for i in range(0, len(tail), 3):
        part = tail[i:i + 3]
        blob = part.tobytes() if layout == 0 else _columns_blob(part, layout)
        con.execute("INSERT INTO event_chunks VALUES (?, ?, ?, ?)",
                    (int(part["seq"][0]), len(part), blob, layout))
    con.execute("UPDATE metadata SET value = '0' WHERE key = 'expanded'")
    con.close()


def _workload_trace(tmp_path, name="w.db"):
    from _trace_helpers import make_workload

    import torchmem
    from torchmem.storage import SQLiteStorage

    path = tmp_path / name
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(path), auto_snapshot=False)
    make_workload(p)
    p.close()
    return path


@pytest.mark.parametrize("layout", [0, 1, 2], ids=["rows", "columns-v1", "columns"])
def test_unexpanded_chunks_load_identically(tmp_path, layout):
    from torchmem.storage import TraceReader
    from torchmem.storage.base import select_events

    path = _workload_trace(tmp_path)
    with TraceReader(path) as r:
        assert r.metadata["expanded"] == 1
        want, want_trace = r.read_events(), r.read_trace()
    before = load(path)
    _rechunk_tail(path, 4, layout)
    with TraceReader(path) as r:
        assert r.metadata["expanded"] == 0
        np.testing.assert_array_equal(r.read_events(), want)
        np.testing.assert_array_equal(r.read_trace().events, want_trace.events)
        t = int(want["timestamp_ns"][len(want) // 2])
        for q in ({"start_step": 2, "end_step": 2}, {"since_ns": t}, {"before_seq": 6},
                  {"start_step": 1, "since_ns": t, "before_seq": 9}):
            np.testing.assert_array_equal(
                r.read_events(**q),
                select_events(want, before_seq=q.pop("before_seq", 2**62), **q))
    after = load(path)
    assert after.get_statistics() == before.get_statistics()
    assert after.get_events() == before.get_events()


def test_schema_3_traces_with_row_chunks_still_load(tmp_path):
    # Schema 3 had no event_chunks.layout: every chunk was rows.
    import sqlite3

    from torchmem.storage import TraceReader

    path = _workload_trace(tmp_path)
    with TraceReader(path) as r:
        want = r.read_events()
    _rechunk_tail(path, 4, layout=0)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("ALTER TABLE event_chunks DROP COLUMN layout")
    con.execute("UPDATE metadata SET value = '3' WHERE key = 'schema_version'")
    con.close()
    with TraceReader(path) as r:
        assert r.metadata["schema_version"] == 3
        np.testing.assert_array_equal(r.read_events(), want)


@pytest.mark.parametrize("statement", [
    "UPDATE event_chunks SET rows = substr(rows, 1, 79)",
    "UPDATE event_chunks SET n = n + 1",
    "UPDATE event_chunks SET n = 0",
    "UPDATE event_chunks SET rows = 'text'",
    "UPDATE event_chunks SET first_seq = first_seq + 1000",
    "UPDATE event_chunks SET rows = zeroblob(length(rows))",
    "INSERT INTO events SELECT * FROM events WHERE seq = 0",  # no-op: already a row
    "UPDATE event_chunks SET first_seq = 0 WHERE first_seq = 4",  # seq 0 twice
    "UPDATE event_chunks SET layout = 1 - layout",
    "UPDATE event_chunks SET layout = 7",
], ids=lambda s: s[:40])
@pytest.mark.parametrize("layout", [0, 1, 2], ids=["rows", "columns-v1", "columns"])
def test_corrupt_chunks_give_one_line_errors(tmp_path, statement, layout):
    import sqlite3

    from torchmem.storage import TraceFormatError

    path = _workload_trace(tmp_path)
    _rechunk_tail(path, 4, layout)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute(statement)
    except sqlite3.IntegrityError:
        pass
    con.close()
    if statement.startswith("INSERT INTO events"):  # refused by SQLite: the trace is intact
        assert load(path).get_statistics().total_allocated_bytes > 0
        return
    with pytest.raises(TraceFormatError) as info:
        load(path).get_statistics()
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def _streamed(path, n):
    """A live profiler with SQLite storage at ``path`` that has handed over ``n`` allocations."""
    import torchmem
    from torchmem.storage import SQLiteStorage

    storage = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    for i in range(n):
        p.track_allocation(0x1000 + 16 * i, 16)
    p.flush()
    return p, storage


def test_close_without_waiting_leaves_the_child_to_expand(tmp_path):
    from torchmem.storage import TraceReader

    path = tmp_path / "nw.db"
    p, storage = _streamed(path, 200_000)
    storage.close(wait=False)  # returns once committed, before the expansion
    with TraceReader(path) as r:  # readable meanwhile: rows plus chunks
        assert len(r.read_events()) == 200_000
    assert storage.wait(timeout=120)
    with TraceReader(path) as r:
        assert r.metadata["expanded"] == 1
        assert len(r.read_events()) == 200_000
    import sqlite3

    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*), MAX(seq) FROM events").fetchone() == (200_000, 199_999)
    assert con.execute("SELECT COUNT(*) FROM event_chunks").fetchone() == (0,)
    con.close()
    p.close()


def test_the_writer_leaves_chunks_until_the_run_ends(tmp_path):
    """Expansion costs the training run CPU (issue 12): an idle run keeps its
    events in chunks, each exactly once; closing expands every one."""
    import sqlite3

    path = tmp_path / "idle.db"
    p, storage = _streamed(path, 20_000)
    assert storage.flush()  # committed as chunks
    time.sleep(0.5)  # the profiler is open and idle meanwhile (the old writer expanded here)

    def counts():
        con = sqlite3.connect(path)
        try:
            return con.execute("SELECT (SELECT COUNT(*) FROM events), "
                               "(SELECT COALESCE(SUM(n), 0) FROM event_chunks)").fetchone()
        finally:
            con.close()

    assert counts() == (0, 20_000)
    assert storage.writer_pid is not None
    p.close()
    storage.close(wait=True)
    assert counts() == (20_000, 0)
