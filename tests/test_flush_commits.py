"""When ``disable()`` and ``MemoryProfiler.flush()`` return, every event recorded before is
committed and readable by another process (issue 13 item 3)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import torchmem
from torchmem import _session
from torchmem.storage import SQLiteStorage, load

COUNT = """
import sys
from torchmem.storage import load
print(len(load(sys.argv[1]).get_event_rows()))
"""


def _record(p: torchmem.MemoryProfiler, n: int, base: int = 0x10000) -> None:
    for i in range(n):
        a = base + 64 * (i % 5000)
        p.track_allocation(a, 8 + i % 100)
        p.track_deallocation(a)


@pytest.fixture
def session(tmp_path):
    _session._reset_for_tests()
    yield tmp_path
    _session._reset_for_tests()


def test_load_right_after_disable_sees_every_event(session):
    for run in range(8):
        p = _session.enable(trace_dir=str(session / f"r{run}"), summary=False, host=False,
                            gc=False, gpu_source="none", auto_snapshot=False,
                            oom_report=False, auto_step=False)
        _record(p, 20_029)
        _session.disable()
        expected = p.next_seq
        assert expected == 40_058
        assert len(load(_session.trace_path()).get_event_rows()) == expected, f"run {run}"
        _session._reset_for_tests()


def test_flush_commits_for_another_process(tmp_path):
    path = str(tmp_path / "f.db")
    p = torchmem.MemoryProfiler(SQLiteStorage(path), auto_snapshot=False,
                                flush_interval_ms=60_000)  # no hand-over of its own
    try:
        for k in range(20):
            _record(p, 3000, base=0x100000 * (k + 1))
            p.flush()
            # A connection of its own sees what another process would.
            assert len(load(path).get_event_rows()) == p.next_seq == 6000 * (k + 1), k
        r = subprocess.run([sys.executable, "-c", COUNT, path], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == p.next_seq
    finally:
        p.close()
