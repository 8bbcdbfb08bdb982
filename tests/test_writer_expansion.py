"""When the SQLite writer turns event chunks into rows: after the run, not
during it (issue 12), at a lower priority when the parent does not wait."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

import torchmem
from torchmem.storage import SQLiteStorage, _writer


def _counts(path) -> tuple[int, int, str]:
    """(rows in events, events in event_chunks, metadata 'expanded') as sqlite3 sees them."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        chunked = con.execute("SELECT COALESCE(SUM(n), 0) FROM event_chunks").fetchone()[0]
        expanded = con.execute("SELECT value FROM metadata WHERE key = 'expanded'").fetchone()[0]
    finally:
        con.close()
    return rows, chunked, expanded


def _track(p: torchmem.MemoryProfiler, pairs: int) -> None:
    for i in range(pairs):
        p.track_allocation(0x10000 + (i % 64) * 0x100, 256)
        p.track_deallocation(0x10000 + (i % 64) * 0x100)


def test_nothing_is_expanded_while_the_run_lasts(tmp_path):
    path = tmp_path / "t.db"
    storage = SQLiteStorage(path)
    p = torchmem.MemoryProfiler(storage, auto_snapshot=False)
    _track(p, 10_000)
    p.flush()
    assert storage.flush()
    # The old writer expanded after 50 ms without a frame; this one waits
    # for the end of the run whatever the pipe does.
    time.sleep(10 * _writer.EXPAND_QUIET_S)
    assert _counts(path) == (0, 20_000, "0")
    p.close()
    storage.close(wait=True)
    assert _counts(path) == (20_000, 0, "1")


def test_expand_idle_still_expands_during_the_run(tmp_path):
    """The option keeps the old behaviour: chunks expanded while the pipe is idle."""
    path = str(tmp_path / "t.db")
    open(path, "ab").close()  # the writer opens the file its storage made, never creates one
    r_data, w_data = os.pipe()
    r_reply, w_reply = os.pipe()
    server = threading.Thread(target=_writer.serve,
                              args=(r_data, w_reply, path, {"expand_idle": True}))
    server.start()
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    _track(p, 500)
    rows = p._read_events(0, 1000)
    os.write(w_data, _writer.HEADER.pack(_writer.EVENTS, len(rows)) + rows)
    deadline = time.monotonic() + 60
    while _counts(path)[0] < 1000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counts(path) == (1000, 0, "0")  # expanded while the run lasts
    os.close(w_data)
    server.join()
    for fd in (r_data, r_reply, w_reply):
        os.close(fd)
    p.close()


def _serve_and_close(tmp_path, monkeypatch, *, child: bool, backlog_limit: int) -> list[int]:
    """Runs ``serve`` in a thread on 1,000 events then CLOSE; returns the priority changes."""
    calls: list[int] = []
    monkeypatch.setattr(_writer, "_lower_priority", lambda: calls.append(_writer.EXPAND_NICE))
    monkeypatch.setattr(_writer, "BACKGROUND_BACKLOG", backlog_limit)
    path = str(tmp_path / f"t{child}{backlog_limit}.db")
    open(path, "ab").close()  # the writer opens the file its storage made, never creates one
    r_data, w_data = os.pipe()
    r_reply, w_reply = os.pipe()
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    _track(p, 500)
    rows = p._read_events(0, 1000)
    p.close()
    frames = (_writer.HEADER.pack(_writer.EVENTS, len(rows)) + rows
              + _writer.HEADER.pack(_writer.CLOSE, 0))
    server = threading.Thread(target=_writer.serve, args=(r_data, w_reply, path, {}),
                              kwargs={"child": child})
    server.start()
    os.write(w_data, frames)
    server.join()
    for fd in (r_data, w_data, r_reply, w_reply):
        os.close(fd)
    assert _counts(path) == (1000, 0, "1")
    return calls


@pytest.mark.parametrize("child, backlog_limit, nice", [
    (True, 999, [_writer.EXPAND_NICE]),  # 1,000 events left: expanded in the background
    (True, 1000, []),                    # at the limit: the parent waits for it
    (False, 0, []),                      # a thread of the training process: never
])
def test_the_writer_process_lowers_its_priority_for_a_big_backlog(tmp_path, monkeypatch,
                                                                  child, backlog_limit, nice):
    assert _serve_and_close(tmp_path, monkeypatch, child=child,
                            backlog_limit=backlog_limit) == nice


def test_close_waits_exactly_up_to_the_writers_background_limit():
    from torchmem.storage import sqlite

    assert sqlite.CLOSE_WAIT_BACKLOG == _writer.BACKGROUND_BACKLOG == 50_000
