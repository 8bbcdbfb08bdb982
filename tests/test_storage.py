"""Storage backends: memory -> SQLite -> load is lossless; bad files give TraceFormatError."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import warnings

import numpy as np
import pytest

import torchmem
from torchmem.storage import InMemoryStorage, SQLiteStorage, TraceFormatError, TraceReader, load

from _trace_helpers import KB, make_workload


def _record(storage, **kw):
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False,
                                capture_stack_traces=True, **kw)
    make_workload(p)
    p.close()
    return p


def _same_profile(a, b):
    ra, rb = a.get_event_rows(), b.get_event_rows()
    assert len(ra) == len(rb) == 15
    for name in ra.dtype.names:
        if name != "_pad":
            np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)
    assert a.get_events() == b.get_events()
    assert a.get_statistics() == b.get_statistics()
    for t in ("CPU", "GPU", "Pinned"):
        assert a.get_statistics_for_type(t) == b.get_statistics_for_type(t)
    for sid in np.unique(ra["stack_id"]).tolist():
        assert a.resolve_stack(sid) == b.resolve_stack(sid)
    assert a.detect_potential_leaks() == b.detect_potential_leaks()
    assert a.gc_records == b.gc_records
    assert a.oom_events == b.oom_events
    assert [s.usage_by_type for s in a.snapshots] == [s.usage_by_type for s in b.snapshots]


def test_sqlite_roundtrip_is_identical(tmp_path):
    path = tmp_path / "run.db"
    live = _record(SQLiteStorage(path))
    loaded = load(path)
    _same_profile(live, loaded)
    s = loaded.get_statistics()
    assert (s.total_allocated_bytes, s.total_freed_bytes) == (35 * KB, 26 * KB)
    assert s.current_usage_bytes == 9 * KB and s.peak_usage_bytes == 28 * KB
    assert s.usage_by_type == {"CPU": 4 * KB, "GPU": 2 * KB, "Pinned": 3 * KB}
    assert s.gc_count == 1 and s.gc_count_by_generation == {2: 1}
    assert [(l.address, l.size_bytes) for l in loaded.detect_potential_leaks()] == [
        (0x1000, 4 * KB), (0x6000, 3 * KB), (0x9000, 2 * KB)]
    frames = loaded.detect_potential_leaks()[0].stack_trace.frames
    assert frames[0][2] == "make_workload" and frames[0][0].endswith("_trace_helpers.py")
    assert loaded.oom_events[0].requested_bytes == 1 << 30
    assert loaded.oom_events[0].device_free_bytes == 512 * KB
    assert loaded.snapshots[0].current_usage_bytes == 24 * KB
    assert [e.step for e in loaded.get_events(3, 3)] == [3, 3]
    meta = loaded.trace_metadata
    assert meta["format"] == "torchmem-trace" and meta["schema_version"] == 5
    assert meta["pid"] == os.getpid() and meta["torch_version"]
    assert meta["settings"]["capture_stack_traces"] is True


class _Tee:
    """Hands every call to both backends, so both hold one and the same run."""

    def __init__(self, *backends):
        self.backends = backends

    def __getattr__(self, name):
        return lambda *a, **k: [getattr(b, name)(*a, **k) for b in self.backends][0]


def test_memory_and_sqlite_hold_the_same_trace(tmp_path):
    mem = InMemoryStorage()
    sql = SQLiteStorage(tmp_path / "b.db")
    _record(_Tee(mem, sql))
    a, b = mem.read_trace(), TraceReader(tmp_path / "b.db").read_trace()
    for name in ("kind", "address", "size", "step", "type_id", "device", "stream"):
        np.testing.assert_array_equal(a.events[name], b.events[name])
    assert a.type_names == b.type_names
    assert len(a.gc_records) == len(b.gc_records) == 1
    _same_profile(torchmem.MemoryProfiler.from_trace(a), load(tmp_path / "b.db"))


class _RowsOnly:
    """A storage that forwards to SQLiteStorage but offers only ``append``: the pump
    then hands it Python rows (as it does any other storage)."""

    def __init__(self, storage):
        self._storage = storage

    def __getattr__(self, name):
        if name == "append_from_recorder":
            raise AttributeError(name)
        return getattr(self._storage, name)


class _CountingSQLite(SQLiteStorage):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"append": 0, "append_from_recorder": 0}

    def append(self, delta):
        self.calls["append"] += 1
        super().append(delta)

    def append_from_recorder(self, *args):
        self.calls["append_from_recorder"] += 1
        super().append_from_recorder(*args)


def test_events_sent_straight_from_the_recorder(tmp_path):
    # The pump hands SQLiteStorage a range of the recorder, written to the
    # pipe natively as column chunks, with or without a publisher (which
    # gets rows of its own); a storage without append_from_recorder gets rows.
    direct = SQLiteStorage(tmp_path / "direct.db")
    p = _record(direct)
    assert getattr(type(direct), "append_from_recorder", None) is not None
    published = []
    publisher = torchmem.EventPublisher()
    publisher.subscribe(published.extend)
    with_publisher = _CountingSQLite(tmp_path / "pub.db")
    _record(with_publisher, publisher=publisher)
    assert len(published) == 15
    assert with_publisher.calls["append_from_recorder"] > 0
    assert with_publisher.calls["append"] == 0
    _record(_RowsOnly(SQLiteStorage(tmp_path / "rows.db")))
    a = TraceReader(tmp_path / "direct.db").read_trace()
    for other in ("pub.db", "rows.db"):
        b = TraceReader(tmp_path / other).read_trace()
        assert len(a.events) == len(b.events) == 15
        # Stacks differ (the _record calls are on different lines), the rest not.
        for name in a.events.dtype.names:
            if name not in ("_pad", "timestamp_ns", "thread_id", "stack_id"):
                np.testing.assert_array_equal(a.events[name], b.events[name], err_msg=name)
        assert len(a.gc_records) == len(b.gc_records) == 1
    _same_profile(p, load(tmp_path / "direct.db"))


def test_plain_sql_reads_the_trace(tmp_path):
    _record(SQLiteStorage(tmp_path / "c.db"))
    con = sqlite3.connect(tmp_path / "c.db")
    rows = con.execute("SELECT e.address, e.size, t.name FROM events e JOIN types t USING "
                       "(type_id) WHERE e.kind = 0 AND e.step = 1 ORDER BY seq").fetchall()
    assert rows == [(0x8000, KB, "GPU"), (0x9000, 2 * KB, "GPU"), (0x5000, KB, "Pinned")]
    peak = con.execute("SELECT MAX(total_allocated - total_freed) FROM events").fetchone()
    assert peak == (28 * KB,)


def test_queries_older_than_retention_come_from_storage(tmp_path):
    storage = SQLiteStorage(tmp_path / "d.db")
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False, retention_events=1000)
    ref = torchmem.MemoryProfiler(auto_snapshot=False)
    for prof in (p, ref):
        for step in range(10):
            for i in range(1000):
                prof.track_allocation(0x10000 + i * 64, 64)
                prof.track_deallocation(0x10000 + i * 64)
            prof.step()
            if prof is p:
                p.flush()  # lets the ring drop what storage holds
    assert p.first_retained_seq > 2000, "the ring should have dropped old events"
    old = p.get_event_rows(0, 1)
    assert len(old) == 4000
    np.testing.assert_array_equal(old["address"], ref.get_event_rows(0, 1)["address"])
    assert len(p.get_event_rows(0)) == 20000
    since = p.get_allocations_since(0)
    assert len(since) == 10000 and since[0].address == 0x10000
    p.close()


def test_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        storage = SQLiteStorage(tmp_path / "e.db")
        p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
        p.track_allocation(1, 1)
        p.flush()
        storage.flush()
        for suffix in ("", "-wal", "-shm"):
            f = tmp_path / f"e.db{suffix}"
            if f.exists():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, suffix
        p.close()
    finally:
        os.umask(old)


def test_existing_file_is_not_clobbered(tmp_path):
    f = tmp_path / "f.db"
    f.write_text("keep me")
    with pytest.raises(FileExistsError):
        SQLiteStorage(f)
    assert f.read_text() == "keep me"
    SQLiteStorage(f, overwrite=True).close()
    assert load(f).get_statistics().allocation_count == 0


def test_disk_full_warns_once_and_profiling_goes_on(tmp_path):
    # max_page_count makes SQLite answer SQLITE_FULL, like a full disk; the
    # writer child reports it and the warning is raised in this process.
    storage = SQLiteStorage(tmp_path / "g.db", _pragmas={"max_page_count": 8})
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(20000):
            p.track_allocation(0x1000 + i * 16, 16)
        p.flush()
        storage.flush()
        for i in range(100):
            p.track_allocation(0x100000000 + i * 16, 16)
        p.flush()
        storage.flush()
    full = [w for w in caught if "g.db" in str(w.message)]
    assert len(full) == 1 and "full" in str(full[0].message)
    assert p.get_statistics().allocation_count == 20100
    p.close()  # must not raise either
    assert storage.write_error and "full" in storage.write_error


def _one_line_error(path):
    with pytest.raises(TraceFormatError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_give_one_line_errors(tmp_path):
    assert "no such file" in _one_line_error(tmp_path / "missing.db")
    assert "directory" in _one_line_error(tmp_path)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database\n" * 100)
    assert "not an SQLite database" in _one_line_error(text)
    foreign = tmp_path / "other.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    assert "not a torchmem trace" in _one_line_error(foreign)


def _saved(tmp_path, name, n=3000):
    path = tmp_path / name
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(path), auto_snapshot=False)
    for i in range(n):
        p.track_allocation(0x1000 + i * 16, 16)
    p.close()
    return path


def test_truncated_and_corrupt_traces(tmp_path):
    path = _saved(tmp_path, "t.db")
    data = path.read_bytes()
    assert len(data) > 8192
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) // 2 + 100])
    assert "truncated" in _one_line_error(cut)
    short = tmp_path / "short.db"
    short.write_bytes(data[:60])
    assert "truncated" in _one_line_error(short)
    bad = tmp_path / "bad.db"
    bad.write_bytes(data[:4096] + b"\xa5" * (len(data) - 4096))
    assert "corrupt" in _one_line_error(bad)


def test_newer_schema_is_refused(tmp_path):
    path = _saved(tmp_path, "n.db", 10)
    con = sqlite3.connect(path)
    con.execute("UPDATE metadata SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    assert "newer" in _one_line_error(path)


# -- the step / time side tables -------------------------------------------------
def _steps_trace(path, steps=6, per_step=700):
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(path), auto_snapshot=False,
                                flush_interval_ms=20)
    for s in range(steps):
        for i in range(per_step):
            p.track_allocation(0x10000 + i * 64, 64)
            p.track_deallocation(0x10000 + i * 64)
        if s % 2:
            p.flush()  # a step spread over several hand-overs
        p.step()
    p.close()
    return p


def test_side_tables_cover_every_step_and_time(tmp_path):
    path = tmp_path / "s.db"
    _steps_trace(path)
    con = sqlite3.connect(path)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert "step_index" in names and "time_index" in names
    assert "events_by_step" not in names and "events_by_time" not in names
    spans = con.execute("SELECT step, MIN(seq), MAX(seq) FROM events GROUP BY step").fetchall()
    assert con.execute("SELECT step, first_seq, last_seq FROM step_index ORDER BY step"
                       ).fetchall() == spans
    assert len(spans) == 6
    chunks = con.execute("SELECT first_seq, last_seq, min_timestamp_ns, max_timestamp_ns "
                         "FROM time_index ORDER BY first_seq").fetchall()
    # Chunks tile the events without gaps or overlaps and bound their times.
    assert chunks[0][0] == 0 and chunks[-1][1] == 6 * 1400 - 1
    for (a0, a1, _, _), (b0, _, _, _) in zip(chunks, chunks[1:]):
        assert b0 == a1 + 1
    for first, last, lo, hi in chunks:
        assert (lo, hi) == con.execute("SELECT MIN(timestamp_ns), MAX(timestamp_ns) FROM events "
                                       "WHERE seq BETWEEN ? AND ?", (first, last)).fetchone()
        assert last - first < 8192  # at most one event-log chunk


def test_documented_plain_sql_uses_rowid_ranges(tmp_path):
    path = tmp_path / "q.db"
    _steps_trace(path)
    con = sqlite3.connect(path)
    by_step = ("SELECT e.* FROM step_index s JOIN events e ON e.seq BETWEEN s.first_seq "
               "AND s.last_seq WHERE s.step = ? AND e.step = ? ORDER BY e.seq")
    since = ("SELECT * FROM events WHERE seq >= (SELECT MIN(first_seq) FROM time_index "
             "WHERE max_timestamp_ns >= :t) AND timestamp_ns >= :t ORDER BY seq")
    for step in range(6):
        assert con.execute(by_step, (step, step)).fetchall() == con.execute(
            "SELECT * FROM events WHERE step = ? ORDER BY seq", (step,)).fetchall()
    ts = con.execute("SELECT timestamp_ns FROM events ORDER BY seq").fetchall()
    for t in (ts[0][0], ts[len(ts) // 3][0], ts[-1][0], ts[-1][0] + 1):
        assert con.execute(since, {"t": t}).fetchall() == con.execute(
            "SELECT * FROM events WHERE timestamp_ns >= ? ORDER BY seq", (t,)).fetchall()
    # Neither query scans the whole events table: both are rowid range searches.
    for sql, args in ((by_step, (3, 3)), (since, {"t": ts[-1][0]})):
        plan = " ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "SCAN e" not in plan and "SCAN events" not in plan, plan
        assert "INTEGER PRIMARY KEY" in plan, plan


def test_storage_queries_match_a_full_scan(tmp_path):
    from torchmem.storage._event_reads import seq_bounds
    from torchmem.storage.base import select_events

    path = tmp_path / "r.db"
    _steps_trace(path)
    with TraceReader(path) as reader:
        every = reader.read_events()
        ts = every["timestamp_ns"]
        cases = [dict(start_step=2, end_step=3), dict(start_step=5), dict(end_step=0),
                 dict(start_step=9), dict(since_ns=int(ts[3000])), dict(since_ns=int(ts[-1]) + 1),
                 dict(start_step=1, end_step=4, since_ns=int(ts[2500]), before_seq=6000)]
        for q in cases:
            got = reader.read_events(**q)
            want = select_events(every, before_seq=q.pop("before_seq", 2**62), **q)
            np.testing.assert_array_equal(got, want)
        assert seq_bounds(reader._con, start_step=9) is None
        lo, hi = seq_bounds(reader._con, start_step=3, end_step=3)
        assert (lo, hi) == (3 * 1400, 4 * 1400 - 1)


def test_schema_1_traces_without_side_tables_still_answer(tmp_path):
    path = tmp_path / "v1.db"
    _steps_trace(path)
    con = sqlite3.connect(path)
    con.execute("DROP TABLE step_index")
    con.execute("DROP TABLE time_index")
    con.execute("UPDATE metadata SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with TraceReader(path) as reader:
        assert len(reader.read_events(start_step=2, end_step=2)) == 1400
    assert len(load(path).get_event_rows(2, 2)) == 1400


# -- the writer process ------------------------------------------------------------
def _gone(pid):
    """Whether process ``pid`` has exited (a zombie of another parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_flush_is_a_handshake_with_the_writer(tmp_path, monkeypatch, capsys):
    import signal

    from torchmem._pump import SinkPump

    storage = SQLiteStorage(tmp_path / "h.db")
    assert storage.writer_pid and not storage.in_process
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False, flush_interval_ms=100000)
    try:
        for i in range(5000):
            p.track_allocation(0x1000 + i * 16, 16)
        p.flush()
        assert storage.flush() is True and storage.events_written == 5000
        con = sqlite3.connect(tmp_path / "h.db")
        # Committed events are rows or still in their chunk (docs/trace-format.md).
        count = ("SELECT (SELECT COUNT(*) FROM events) + "
                 "(SELECT COALESCE(SUM(n), 0) FROM event_chunks)")
        assert con.execute(count).fetchone() == (5000,)
        assert capsys.readouterr().err == ""
        # profiler.flush() waits this long for the commit the stopped writer
        # cannot make (60 s by default), then says so and returns.
        monkeypatch.setattr(SinkPump, "commit_timeout_s", 0.3)
        os.kill(storage.writer_pid, signal.SIGSTOP)  # a writer that cannot answer
        try:
            p.track_allocation(0x900000, 16)
            p.flush()
            assert "flush: the events recorded so far are not all committed" in \
                capsys.readouterr().err
            assert storage.flush(timeout=0.3) is False
        finally:
            os.kill(storage.writer_pid, signal.SIGCONT)
        assert storage.flush() is True and storage.events_written == 5001
        assert con.execute(count).fetchone() == (5001,)
        con.close()
    finally:
        p.close()


def test_no_writer_process_or_thread_remains_after_close(tmp_path):
    import threading

    storage = SQLiteStorage(tmp_path / "z.db")
    pid = storage.writer_pid
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    make_workload(p)
    p.close()
    assert _gone(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: no zombie left
    assert not [t for t in threading.enumerate() if t.name.startswith("torchmem-sqlite")]
    assert not os.path.exists(tmp_path / "z.db-wal"), "a clean close checkpoints the WAL"
    assert load(tmp_path / "z.db").get_statistics() == p.get_statistics()


@pytest.mark.parametrize("command", [["/nonexistent/python"],
                                     [sys.executable, "-c", "import sys; sys.exit(3)"],
                                     [sys.executable, "-c", "import time; time.sleep(60)"]])
def test_writer_that_cannot_start_falls_back_to_a_thread(tmp_path, monkeypatch, command):
    import torchmem.storage.sqlite as sqlite_mod

    monkeypatch.setattr(sqlite_mod, "_writer_command", lambda path, options: command)
    monkeypatch.setattr(sqlite_mod, "START_TIMEOUT_S", 1.0)  # the silent one is killed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = SQLiteStorage(tmp_path / "fb.db")
    msgs = [str(w.message) for w in caught if "writer process" in str(w.message)]
    assert len(msgs) == 1 and "thread in this process" in msgs[0]
    assert storage.in_process and storage.writer_pid is None
    live = _record(storage)
    _same_profile(live, load(tmp_path / "fb.db"))


def test_killed_writer_process_warns_once_and_profiling_goes_on(tmp_path):
    import signal

    storage = SQLiteStorage(tmp_path / "k.db")
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False, flush_interval_ms=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3000):
            p.track_allocation(0x1000 + i * 16, 16)
        p.flush()
        storage.flush()
        os.kill(storage.writer_pid, signal.SIGKILL)
        for i in range(3000):
            p.track_allocation(0x100000 + i * 16, 16)
            if i % 500 == 0:
                p.flush()
                storage.flush()
        p.close()
    msgs = [str(w.message) for w in caught if "k.db" in str(w.message)]
    assert len(msgs) == 1 and "exited unexpectedly" in msgs[0], msgs
    assert "goes on in memory" in msgs[0]
    assert p.get_statistics().allocation_count == 6000
    loaded = load(tmp_path / "k.db").get_event_rows()
    assert len(loaded) >= 3000
    np.testing.assert_array_equal(loaded["seq"], np.arange(len(loaded)))


def test_every_documented_query_runs(tmp_path):
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "trace-format.md")
    text = open(doc).read()
    block = text.split("## Example queries", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    queries = ["\n".join(ln for ln in q.splitlines() if not ln.lstrip().startswith("--"))
               for q in queries]
    assert len(queries) >= 6
    path = tmp_path / "doc.db"
    live = _record(SQLiteStorage(path))
    con = sqlite3.connect(path)
    stamps = live.get_event_rows()["timestamp_ns"].tolist()
    t0 = stamps[5]
    results = [con.execute(q, {"t": t0} if ":t" in q else {}).fetchall() for q in queries]
    assert all(results[i] for i in range(len(results)) if "step = 10" not in queries[i])
    since = next(r for q, r in zip(queries, results) if ":t" in q)
    assert [row[0] for row in since] == [i for i, t in enumerate(stamps) if t >= t0]



def test_oom_events_are_dataclasses_with_the_old_dict_access_deprecated():
    from torchmem import OomEvent

    p = torchmem.MemoryProfiler(auto_snapshot=False)
    p.record_oom(1 << 20, 0, 7, 100, 1000)
    [o] = p.oom_events
    assert isinstance(o, OomEvent)
    assert (o.requested_bytes, o.device, o.stream, o.device_free_bytes, o.device_total_bytes) == (
        1 << 20, 0, 7, 100, 1000)
    with pytest.warns(DeprecationWarning, match="OomEvent"):
        assert o["requested_bytes"] == 1 << 20
    with pytest.warns(DeprecationWarning):
        assert dict(o)["device"] == 0
    assert o.as_dict()["live_bytes"] == 0
    p.close()
