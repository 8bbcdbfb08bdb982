"""What the framework-callback tests share: the session fixture and per-step truth from SQL."""

from __future__ import annotations

import sqlite3

import pytest

from torchmem import _session


@pytest.fixture
def session(tmp_path):
    """A fresh process-wide profiler for the test; closed (trace complete) afterwards."""
    _session._reset_for_tests()
    yield tmp_path
    _session._reset_for_tests()


def close_session() -> str:
    """Closes the session's profiler (its trace is then complete); returns the trace path."""
    path = _session.trace_path()
    _session._reset_for_tests()
    return path


def sql_step_peaks(path: str) -> dict[int, int]:
    """Each step's peak live bytes, computed by SQLite from the trace file (the highest
    level after any event of the step: trace-format.md's "peak per step")."""
    con = sqlite3.connect(path)
    try:
        return dict(con.execute("SELECT step, MAX(total_allocated - total_freed) FROM events "
                                "GROUP BY step"))
    finally:
        con.close()
