"""Storage backends: memory -> SQLite -> load is lossless; bad files give TraceFormatError."""

from __future__ import annotations

import os
import sqlite3
import stat
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
    assert loaded.oom_events[0]["requested_bytes"] == 1 << 30
    assert loaded.oom_events[0]["device_free_bytes"] == 512 * KB
    assert loaded.snapshots[0].current_usage_bytes == 24 * KB
    assert [e.step for e in loaded.get_events(3, 3)] == [3, 3]
    meta = loaded.trace_metadata
    assert meta["format"] == "torchmem-trace" and meta["schema_version"] == 1
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
    assert p._first_retained_seq() > 2000, "the ring should have dropped old events"
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
    storage = SQLiteStorage(tmp_path / "g.db")
    # max_page_count makes SQLite answer SQLITE_FULL, like a full disk.
    storage._con.execute("PRAGMA max_page_count = 8")
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
