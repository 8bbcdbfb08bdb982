"""What a trace keeps beside its events: anomalies (issue 13 item 2) and hostile side tables (item 6)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import warnings

import pytest

import torchmem
from torchmem.export import FORMATS
from torchmem.storage import InMemoryStorage, SQLiteStorage, TraceFormatError, load


def _bad_input(p: torchmem.MemoryProfiler) -> None:
    p.track_deallocation(0x10)  # unknown_free
    p.track_allocation(0x20, 5)
    p.track_deallocation(0x20, 7)  # size_mismatch
    p.track_deallocation(0x20)  # double_free
    p.track_allocation(0x30, 1)
    p.track_allocation(0x30, 2)  # alloc_over_live
    for i in range(12):  # more than the 8 examples kept per kind
        p.track_deallocation(0x1000 + i)


def test_a_loaded_trace_answers_anomalies_as_the_live_profiler(tmp_path):
    path = str(tmp_path / "a.db")
    p = torchmem.MemoryProfiler(SQLiteStorage(path), auto_snapshot=False)
    _bad_input(p)
    live = p.anomalies
    assert live["counts"]["unknown_free"] == 13 and live["total"] == 16
    p.close()
    loaded = load(path)
    assert loaded.anomalies == live
    assert loaded.anomalies() == live  # callable too
    assert loaded.anomalies["counts"]["double_free"] == 1


def test_anomalies_survive_in_memory_storage():
    st = InMemoryStorage()
    p = torchmem.MemoryProfiler(st, auto_snapshot=False)
    _bad_input(p)
    p.flush()
    again = torchmem.MemoryProfiler.from_trace(st.read_trace())
    assert again.anomalies == p.anomalies
    p.close()


KILLED = """
import json, os, sys, torchmem
from torchmem.storage import SQLiteStorage
st = SQLiteStorage(sys.argv[1])
p = torchmem.MemoryProfiler(st, auto_snapshot=False)
p.track_deallocation(0x10)
p.track_deallocation(0x18)
p.track_allocation(0x20, 5)
p.track_deallocation(0x20, 9)
p.flush()
st.flush()
print(json.dumps(p.anomalies), flush=True)
os.kill(os.getpid(), 9)
"""


def test_anomalies_of_a_killed_run(tmp_path):
    path = str(tmp_path / "k.db")
    r = subprocess.run([sys.executable, "-c", KILLED, path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -9, r.stderr
    live = json.loads(r.stdout)
    assert live["total"] == 3
    assert load(path).anomalies == live


def test_summary_shows_the_anomalies(tmp_path):
    path = str(tmp_path / "s.db")
    p = torchmem.MemoryProfiler(SQLiteStorage(path), auto_snapshot=False)
    _bad_input(p)
    p.close()
    r = subprocess.run([sys.executable, "-m", "torchmem", "summary", path], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    header, _, row = r.stdout.splitlines()[:3]
    assert header.split()[-1] == "anomalies" and row.split()[-1] == "16"
    assert ("anomalies: unknown_free 13, double_free 1, size_mismatch 1, alloc_over_live 1"
            in r.stdout)
