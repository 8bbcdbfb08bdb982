"""A stalled writer (issue 13 item 13): what the recorder holds for it is bounded, and so is
the WAL when readers are attached; the user is warned once, naming the trace and what is
held."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import warnings

import pytest

import torchmem
from torchmem._pump import SinkPump
from torchmem.storage import SQLiteStorage, load


def _runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_stopped_writer_cannot_make_the_ring_grow_without_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(SinkPump, "max_held_events", 200_000)
    monkeypatch.setattr(SinkPump, "watch_s", 0.05)
    monkeypatch.setattr(SinkPump, "stall_s", 0.2)
    path = str(tmp_path / "stalled.db")
    storage = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(storage, auto_snapshot=False, retention_events=1 << 15,
                                flush_interval_ms=20)
    try:
        for i in range(1000):
            p.track_allocation(0x1000 + 16 * i, 8)
        p.flush()
        assert load(path).get_statistics().allocation_count == 1000
        os.kill(storage.writer_pid, signal.SIGSTOP)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            n = 1000
            deadline = time.monotonic() + 120
            while storage.write_error is None and time.monotonic() < deadline:
                for _ in range(20_000):
                    p.track_allocation(0x1000 + 16 * n, 8)
                    n += 1
                time.sleep(0.01)
                # Without a bound, what the ring holds grows with every event.
                assert p.next_seq - p.first_retained_seq < 2_000_000
        assert storage.write_error and "given up" in storage.write_error
        said = _runtime_warnings(caught)
        assert len(said) == 1 and path in said[0] and "events" in said[0], said
        # The ring is back to its retention once the pump hands over again (chunks
        # are dropped as new ones fill).
        p.flush()
        for _ in range(4 * 8192):
            p.track_allocation(0x1000 + 16 * n, 8)
            n += 1
        assert p.next_seq - p.first_retained_seq <= 2 * (1 << 15) + 8192
        assert p.get_statistics().allocation_count == n  # the counters stay exact
    finally:
        try:
            os.kill(storage.writer_pid, signal.SIGCONT)
        except (OSError, TypeError):
            pass
        p.close()
    trace = load(path)  # the trace keeps what was committed, as after a crash
    assert 1000 <= trace.get_statistics().allocation_count <= n


def test_a_reader_cannot_make_the_wal_grow_without_bound(tmp_path):
    path = str(tmp_path / "read.db")
    limit = 4 << 20
    storage = SQLiteStorage(path, _wal_limit_bytes=limit)
    p = torchmem.MemoryProfiler(storage, auto_snapshot=False, flush_interval_ms=100000)
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    n = 0

    def record(count: int) -> None:
        nonlocal n
        for _ in range(count):
            p.track_allocation(0x10_0000 + 64 * n, 1 + n % 1000)
            n += 1
        p.flush()

    try:
        record(1000)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM metadata").fetchone()  # holds a snapshot
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(40):
                record(20_000)
                if _runtime_warnings(caught):
                    break
        said = _runtime_warnings(caught)
        assert len(said) == 1 and f"{path}-wal" in said[0] and "reader" in said[0], said
        held = os.path.getsize(path + "-wal")
        assert held > limit
        reader.rollback()  # the reader lets go: the writer resets the WAL
        record(20_000)
        assert os.path.getsize(path + "-wal") < held
        assert os.path.getsize(path + "-wal") <= limit
        assert storage.write_error is None
    finally:
        reader.close()
        p.close()
    assert load(path).get_statistics().allocation_count == n
