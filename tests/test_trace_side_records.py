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


# -- hostile side tables (item 6) --------------------------------------------------

def _side_trace(path: str) -> None:
    """Three snapshots, two GC records, two OOMs, anomalies: every side table used."""
    from _trace_helpers import make_workload

    p = torchmem.MemoryProfiler(SQLiteStorage(path), auto_snapshot=False,
                                capture_stack_traces=True)
    make_workload(p)
    p.track_snapshot()
    p.record_gc_start(0)
    p.record_gc_end(0, 1, 0)
    p.record_oom(4096, -1)
    p.track_snapshot()
    _bad_input(p)
    p.close()


HOSTILE_SIDE = [
    # snapshots: each JSON column of the wrong shape, or not JSON at all
    ("UPDATE snapshots SET devices = '5' WHERE snapshot_index = 0", "snapshots"),
    ("UPDATE snapshots SET devices = '[1, 2]' WHERE snapshot_index = 0", "snapshots"),
    ("UPDATE snapshots SET devices = '[{\"index\": \"x\", \"name\": 3}]' "
     "WHERE snapshot_index = 0", "snapshots"),
    ("UPDATE snapshots SET devices = '{\"a\": 1}' WHERE snapshot_index = 1", "snapshots"),
    ("UPDATE snapshots SET devices = '[{\"index\": 0, \"name\": \"x\", \"total_bytes\": \"a\", "
     "\"used_bytes\": \"b\", \"free_bytes\": 1, \"process_used_bytes\": null}]' "
     "WHERE snapshot_index = 0", "snapshots"),
    ("UPDATE snapshots SET usage_by_type = '[1, 2]' WHERE snapshot_index = 1", "snapshots"),
    ("UPDATE snapshots SET usage_by_type = '{\"CPU\": \"lots\"}' WHERE snapshot_index = 1",
     "snapshots"),
    ("UPDATE snapshots SET usage_by_type = '5'", "snapshots"),
    ("UPDATE snapshots SET usage_by_device = '{\"cuda\": 1}' WHERE snapshot_index = 0",
     "snapshots"),
    ("UPDATE snapshots SET usage_by_device = 'null' WHERE snapshot_index = 2", "snapshots"),
    ("UPDATE snapshots SET usage_by_device = '{' WHERE snapshot_index = 2", "snapshots"),
    ("UPDATE snapshots SET current_usage_bytes = 'many' WHERE snapshot_index = 0", "snapshots"),
    ("UPDATE snapshots SET timestamp_ns = 1e300 WHERE snapshot_index = 0", "snapshots"),
    # GC records
    ("UPDATE gc_records SET duration_ns = 'long' WHERE gc_index = 0", "GC records"),
    ("UPDATE gc_records SET generation = 7", "GC records"),
    ("UPDATE gc_records SET duration_ns = -5 WHERE gc_index = 1", "GC records"),
    ("UPDATE gc_records SET start_ns = 1e300 WHERE gc_index = 1", "GC records"),
    # OOM records
    ("UPDATE ooms SET extra = '[1]' WHERE oom_index = 0", "OOM records"),
    ("UPDATE ooms SET extra = '{' WHERE oom_index = 0", "OOM records"),
    ("UPDATE ooms SET requested_bytes = 'big' WHERE oom_index = 1", "OOM records"),
    ("UPDATE ooms SET device = 1e300 WHERE oom_index = 1", "OOM records"),
    # anomalies and their examples
    ("UPDATE anomalies SET count = 'some' WHERE kind = 'unknown_free'", "anomaly counts"),
    ("UPDATE anomalies SET count = -3 WHERE kind = 'double_free'", "anomaly counts"),
    ("UPDATE anomalies SET count = 1.5 WHERE kind = 'size_mismatch'", "anomaly counts"),
    ("UPDATE metadata SET value = '5' WHERE key = 'anomaly_examples'", "anomaly examples"),
    ("UPDATE metadata SET value = '[1, {\"kind\": 3}]' WHERE key = 'anomaly_examples'",
     "anomaly examples"),
    ("UPDATE metadata SET value = '{' WHERE key = 'anomaly_examples'", "anomaly examples"),
]


def _exercise(prof, out_dir) -> None:
    """Everything that reads side records: queries, every exporter, the text reports."""
    from torchmem.reports.summary import format_summary

    prof.get_events()  # marker details of every event
    prof.anomalies
    format_summary(prof)
    for name, export in FORMATS.items():
        export(prof, os.path.join(out_dir, f"out.{name}"))


@pytest.mark.parametrize("statement, what", HOSTILE_SIDE, ids=lambda s: s[:60])
def test_hostile_side_tables_are_skipped_and_counted(tmp_path, statement, what):
    path = str(tmp_path / "side.db")
    _side_trace(path)
    good = load(path)
    counts = {"snapshots": len(good.snapshots), "GC records": len(good.gc_records),
              "OOM records": len(good.oom_events)}
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(statement)
    con.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prof = load(path)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1, said
    assert path in said[0] and "skipped" in said[0] and what in said[0], said[0]
    assert prof.skipped_side_records and sum(prof.skipped_side_records.values()) >= 1
    assert what in prof.skipped_side_records
    if what in counts:
        left = {"snapshots": len(prof.snapshots), "GC records": len(prof.gc_records),
                "OOM records": len(prof.oom_events)}[what]
        assert left == counts[what] - prof.skipped_side_records[what]
    _exercise(prof, str(tmp_path))
    # The marker of a skipped record has no details, never another record's.
    for ev in prof.get_events():
        if ev.details and "snapshot" in ev.details:
            assert ev.details["snapshot"].timestamp_ns <= ev.timestamp_ns


def test_the_cli_reads_hostile_side_tables(tmp_path):
    path = str(tmp_path / "side.db")
    _side_trace(path)
    con = sqlite3.connect(path, isolation_level=None)
    for statement in ("UPDATE snapshots SET devices = '[1, 2]' WHERE snapshot_index = 0",
                      "UPDATE snapshots SET usage_by_type = '[1]' WHERE snapshot_index = 1",
                      "UPDATE gc_records SET generation = 7 WHERE gc_index = 0",
                      "UPDATE ooms SET extra = '[1]' WHERE oom_index = 0",
                      "UPDATE anomalies SET count = 'x' WHERE kind = 'unknown_free'"):
        con.execute(statement)
    con.close()
    for args in (["summary", path], ["leaks", path], ["diff", path, path],
                 *(["export", path, "-f", f, "-o", str(tmp_path / f"cli.{f}")]
                   for f in FORMATS)):
        r = subprocess.run([sys.executable, "-m", "torchmem", *args], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "skipped malformed side records (snapshots: 2, GC records: 1, OOM records: 1, " \
               "anomaly counts: 1)" in r.stderr, r.stderr


def test_structural_tables_are_refused(tmp_path):
    path = str(tmp_path / "s.db")
    _side_trace(path)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("UPDATE frames SET lineno = 'seven'")
    con.close()
    with pytest.raises(TraceFormatError, match=path):
        load(path)


def test_a_clean_trace_loads_without_a_warning(tmp_path):
    path = str(tmp_path / "c.db")
    _side_trace(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = load(path)
    assert prof.skipped_side_records == {}
    assert len(prof.snapshots) == 3 and len(prof.gc_records) == 2 and len(prof.oom_events) == 2
    _exercise(prof, str(tmp_path))
