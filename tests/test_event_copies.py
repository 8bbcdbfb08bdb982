"""The column copies of expanded chunks (``event_columns``): readers decode them
instead of fetching rows, and the rows stay the truth whoever changes them
(issue 12 goal 3)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import torchmem
from torchmem.storage import SQLiteStorage, TraceReader, _event_reads, _writer
from torchmem.storage._chunks import CHUNK_EVENTS

PAIRS = 20_000  # 40,000 events: five chunks of up to CHUNK_EVENTS


def _write(path) -> None:
    storage = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(storage, auto_snapshot=False)
    for i in range(PAIRS):
        if i % 2000 == 0:
            p.step()
        p.track_allocation(0x10000 + (i % 64) * 0x100, 256 + i % 7)
        p.track_deallocation(0x10000 + (i % 64) * 0x100)
    p.close()
    storage.close(wait=True)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("copies") / "t.db"
    _write(path)
    return path


@pytest.fixture
def copy_of(trace, tmp_path):
    def make():
        path = tmp_path / "copy.db"
        path.write_bytes(trace.read_bytes())
        return path
    return make


def _rows(path) -> np.ndarray:
    """Every event as plain SQL sees it (EVENT_COLUMNS order)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = ", ".join(_writer.EVENT_COLUMNS)
        return _event_reads.fetch_events(con.execute(f"SELECT {cols} FROM events ORDER BY seq"))
    finally:
        con.close()


def _read(path, monkeypatch, **filters) -> tuple[np.ndarray, int]:
    """(events the reader returns, rows it fetched from ``events`` doing so)."""
    fetched = []
    real = _event_reads.fetch_events
    monkeypatch.setattr(_event_reads, "fetch_events",
                        lambda cursor: fetched.append(len(r := real(cursor))) or r)
    with TraceReader(path) as reader:
        events = reader.read_events(**filters)
    monkeypatch.setattr(_event_reads, "fetch_events", real)
    return events, sum(fetched)


def _sql(path, *statements) -> None:
    con = sqlite3.connect(path)
    for s in statements:
        con.execute(s)
    con.commit()
    con.close()


def test_a_closed_trace_keeps_a_copy_of_every_chunk_guarded_by_the_triggers(trace):
    con = sqlite3.connect(f"file:{trace}?mode=ro", uri=True)
    copied = con.execute("SELECT COUNT(*), SUM(n), MIN(first_seq), MAX(first_seq + n) "
                         "FROM event_columns").fetchone()
    chunks = con.execute("SELECT COUNT(*) FROM event_chunks").fetchone()[0]
    triggers = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    con.close()
    assert copied == (5, 2 * PAIRS, 0, 2 * PAIRS)
    assert chunks == 0
    assert triggers == set(_writer.COPY_TRIGGERS)


def test_the_reader_decodes_the_copies_and_fetches_no_row(trace, monkeypatch):
    events, fetched = _read(trace, monkeypatch)
    assert fetched == 0
    assert np.array_equal(events, _rows(trace))
    # A filtered read is the rows' same selection.
    events, fetched = _read(trace, monkeypatch, start_step=3, end_step=4)
    rows = _rows(trace)
    assert fetched == 0
    assert np.array_equal(events, rows[(rows["step"] >= 3) & (rows["step"] <= 4)])
    with TraceReader(trace) as reader:
        part = reader.read_seq_range(8000, 8200)
    assert part["seq"].tolist() == list(range(8000, 8200))


def test_an_updated_row_drops_its_chunks_copy_and_is_read_as_it_is_now(copy_of, monkeypatch):
    path = copy_of()
    _sql(path, "UPDATE events SET size = 12345 WHERE seq = 9000")
    con = sqlite3.connect(path)
    left = [r[0] for r in con.execute("SELECT first_seq FROM event_columns ORDER BY first_seq")]
    con.close()
    assert left == [0, 2 * CHUNK_EVENTS, 3 * CHUNK_EVENTS, 4 * CHUNK_EVENTS]
    events, fetched = _read(path, monkeypatch)
    assert fetched == CHUNK_EVENTS  # only the changed chunk's rows
    assert int(events["size"][9000]) == 12345
    assert np.array_equal(events, _rows(path))


def test_deleted_and_inserted_rows_are_read_as_they_are_now(copy_of, monkeypatch):
    path = copy_of()
    end = 2 * PAIRS
    cols = ", ".join(_writer.EVENT_COLUMNS)
    _sql(path, "DELETE FROM events WHERE seq = 100",
         f"INSERT INTO events ({cols}) SELECT {cols.replace('seq', f'{end} AS seq', 1)} "
         f"FROM events WHERE seq = 101")
    events, _ = _read(path, monkeypatch)
    rows = _rows(path)
    assert 100 not in events["seq"] and end in events["seq"]
    assert np.array_equal(events, rows)


def test_without_the_triggers_the_copies_are_not_used(copy_of, monkeypatch):
    path = copy_of()
    _sql(path, "DROP TRIGGER event_columns_on_update",
         "UPDATE events SET size = 777 WHERE seq = 5")
    events, fetched = _read(path, monkeypatch)
    assert fetched == 2 * PAIRS
    assert int(events["size"][5]) == 777


@pytest.mark.parametrize("value", ["X'00'", "'not a blob'", "12"])
def test_a_copy_that_does_not_decode_is_read_from_its_rows(copy_of, monkeypatch, value):
    path = copy_of()
    _sql(path, f"UPDATE event_columns SET rows = {value} WHERE first_seq = {CHUNK_EVENTS}")
    events, fetched = _read(path, monkeypatch)
    assert fetched == CHUNK_EVENTS
    assert np.array_equal(events, _rows(path))


def test_the_copies_read_the_same_without_incremental_blob_io(trace):
    con = sqlite3.connect(f"file:{trace}?mode=ro", uri=True)

    class WithoutBlobopen:  # Python 3.10's sqlite3.Connection
        def execute(self, *args):
            return con.execute(*args)

    firsts = [r[0] for r in con.execute("SELECT first_seq FROM event_columns")]
    assert len(firsts) == 5
    for first in firsts:
        (direct,) = con.execute("SELECT rows FROM event_columns WHERE first_seq = ?",
                                (first,)).fetchone()
        assert _event_reads._copy_blob(con, first) == direct
        assert _event_reads._copy_blob(WithoutBlobopen(), first) == direct
    con.close()


def test_a_loaded_trace_gives_the_same_answers_with_and_without_the_copies(copy_of):
    path = copy_of()
    with_copies = torchmem.load(path)
    expected = (with_copies.get_statistics(), with_copies.detect_potential_leaks(top=5),
                with_copies.breakdown(by="site", at="peak"))
    with_copies.close()
    _sql(path, "DELETE FROM event_columns")
    without = torchmem.load(path)
    assert (without.get_statistics(), without.detect_potential_leaks(top=5),
            without.breakdown(by="site", at="peak")) == expected
    without.close()


def test_overlapping_copies_are_not_used_where_they_overlap(copy_of, monkeypatch):
    path = copy_of()
    # A copy of seqs 8192.. renumbered to start inside the copy before it.
    con = sqlite3.connect(path)
    first, n, blob, layout = con.execute(
        f"SELECT * FROM event_columns WHERE first_seq = {CHUNK_EVENTS}").fetchone()
    con.close()
    _sql(path, f"DELETE FROM event_columns WHERE first_seq = {CHUNK_EVENTS}")
    shifted = CHUNK_EVENTS - 100
    con = sqlite3.connect(path)
    blob = shifted.to_bytes(8, "little") + blob[8:]  # first_seq is the header's first field
    con.execute("INSERT INTO event_columns VALUES (?, ?, ?, ?)", (shifted, n, blob, layout))
    con.commit()
    con.close()
    events, fetched = _read(path, monkeypatch)
    assert fetched == CHUNK_EVENTS  # seqs 8192..16383 from their rows
    assert np.array_equal(events, _rows(path))
