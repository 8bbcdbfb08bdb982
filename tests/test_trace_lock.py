"""A trace being written is locked: a second writer is refused whatever the flags, and the
first writer is never deleted under without a word (issue 13 item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

import torchmem
from torchmem.storage import SQLiteStorage, load
TraceLockedError = FileExistsError


def _profiler(path: str, **kw) -> torchmem.MemoryProfiler:
    return torchmem.MemoryProfiler(SQLiteStorage(path, **kw), auto_snapshot=False)


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    path = str(tmp_path / "t.db")
    first = _profiler(path)
    first.track_allocation(0x10, 100)
    first.flush()
    for overwrite in (False, True):
        with pytest.raises(TraceLockedError, match="being written") as exc:
            SQLiteStorage(path, overwrite=overwrite)
        assert path in str(exc.value)
        assert isinstance(exc.value, FileExistsError)  # code that caught it still does
    first.track_allocation(0x20, 200)
    first.close()
    assert load(path).get_statistics().total_allocated_bytes == 300  # nothing deleted under it
    # Once the first writer has finished, --overwrite replaces the trace.
    deadline = time.monotonic() + 60
    while True:
        try:
            second = _profiler(path, overwrite=True)
            break
        except TraceLockedError:  # the writer child may still be finishing the file
            assert time.monotonic() < deadline
            time.sleep(0.05)
    second.track_allocation(0x30, 7)
    second.close()
    assert load(path).get_statistics().total_allocated_bytes == 7


SLOW = textwrap.dedent("""
    import os, sys, time, torchmem
    p = torchmem.get_profiler()
    p.track_allocation(0x10, 1000)
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1]):  # until the test has tried the second writers
        time.sleep(0.01)
    p.track_allocation(0x20, 24)
""")


def test_cli_overwrite_from_another_process_is_refused(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "other.py").write_text("print('other ran')\n")
    trace = str(tmp_path / "shared.db")
    first = subprocess.Popen([sys.executable, "-m", "torchmem", "run", "--no-stacks", "-o",
                              trace, "slow.py", str(tmp_path / "go")], cwd=tmp_path,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"
        for flags in ([], ["--overwrite"]):
            r = subprocess.run([sys.executable, "-m", "torchmem", "run", *flags, "-o", trace,
                                "other.py"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 2, r.stderr
            assert "other ran" not in r.stdout
            assert "being written by another process" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert load(trace).get_statistics().total_allocated_bytes == 1024


def test_deleting_the_trace_under_a_writer_is_reported(tmp_path):
    path = str(tmp_path / "gone.db")
    p = _profiler(path)
    try:
        p.track_allocation(0x10, 1)
        p.flush()
        os.remove(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deadline = time.monotonic() + 30
            while p.storage.write_error is None and time.monotonic() < deadline:
                p.track_allocation(0x20, 1)
                p.track_deallocation(0x20)
                p.flush()
                time.sleep(0.05)
        assert p.storage.write_error and "deleted" in p.storage.write_error
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(said) == 1 and path in said[0] and "deleted" in said[0], said
        assert p.get_statistics().allocation_count >= 2  # profiling goes on in memory
    finally:
        p.close()
