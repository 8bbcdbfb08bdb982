"""The trace format's constants: defined once in C++ (csrc/trace_format.hpp), exported
as ``_native.trace_format()``, copied into ``torchmem/_trace_format.py`` for the writer
child, and used by every Python reader and writer. These tests fail on any drift."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

import torchmem
from torchmem import _native, _trace_format
from torchmem._contexts import PHASES
from torchmem._events import EVENT_DTYPE
from torchmem.storage import SQLiteStorage, TraceReader, _chunks, _writer, load

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "scripts" / "gen_trace_format.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_trace_format", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_copy_is_what_the_native_module_exports():
    assert _trace_format.VALUES == _native.trace_format()
    gen = _generator()
    assert Path(_trace_format.__file__).read_text() == gen.render(_native.trace_format())
    assert gen.main(["--check"]) == 0


def test_the_check_fails_on_a_stale_copy(tmp_path, monkeypatch):
    gen = _generator()
    stale = dict(_native.trace_format(), chunk_events=4096)
    target = tmp_path / "_trace_format.py"
    target.write_text(gen.render(stale))
    monkeypatch.setattr(gen, "TARGET", target)
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0  # rewrites it
    assert target.read_text() == gen.render(_native.trace_format())


def test_python_layouts_are_built_from_the_constants():
    fmt = _native.trace_format()
    # EVENT_DTYPE is the native row: names, order, offsets, size.
    assert [n for n in EVENT_DTYPE.names] == [name for name, _ in fmt["row_fields"]]
    assert EVENT_DTYPE.itemsize == fmt["row_bytes"] == _native.EVENT_ROW_BYTES
    assert EVENT_DTYPE.fields["kind"][1] == 76 and EVENT_DTYPE.fields["context_id"][1] == 78
    assert _chunks.ROW_BYTES == struct.calcsize("<" + _chunks.ROW_FMT) == fmt["row_bytes"]
    assert _chunks.EVENT_COLUMNS == tuple(n for n in EVENT_DTYPE.names if n != "_pad")
    assert _chunks.CHUNK_COLUMNS == tuple(tuple(c) for c in fmt["columns"])
    assert _chunks.COLUMNS_HEAD.size == 48
    assert _chunks.CHUNK_EVENTS == fmt["chunk_events"] == _native.CHUNK_EVENTS
    assert (_chunks.ROWS, _chunks.COLUMNS_V1, _chunks.COLUMNS) == (0, 1, 2)
    kinds = fmt["frame_kinds"]
    assert (_writer.EVENTS, _writer.COLUMNS, _writer.SIDE, _writer.FLUSH, _writer.CLOSE) == \
        tuple(kinds[k].encode() for k in ("events", "columns", "side", "flush", "close"))
    assert _writer.HEADER.format == fmt["frame_header"]
    assert [k.name for k in torchmem.MemoryEventType] == fmt["event_kinds"]
    assert list(PHASES) == fmt["phases"]


def test_the_writer_child_reads_the_same_constants():
    # The child runs with -I -S: no torchmem package, only files beside _writer.py.
    script = ("import json, sys; sys.path.append(sys.argv[1]); import _writer, _chunks; "
              "print(json.dumps([_chunks.FORMAT, _chunks.ROW_FMT, _chunks.CHUNK_COLUMNS, "
              "_writer.COLUMNS.decode(), _writer.SCHEMA_VERSION]))")
    storage_dir = os.path.dirname(_writer.__file__)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", script, storage_dir],
                         capture_output=True, text=True, check=True).stdout
    values, row_fmt, columns, kind, version = json.loads(out)
    assert values == json.loads(json.dumps(_native.trace_format()))
    assert row_fmt == _chunks.ROW_FMT and [tuple(c) for c in columns] == list(_chunks.CHUNK_COLUMNS)
    assert kind == "K" and version == _writer.SCHEMA_VERSION


def test_recorder_frames_carry_the_context_column(tmp_path):
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    for i in range(20):
        _native.set_context(i % 4)
        p.track_allocation(0x1000 + 64 * i, 64)
    _native.set_context(0)
    path = tmp_path / "frames"
    with open(path, "wb") as f:
        assert p._write_event_columns(f.fileno(), 0, 20, _writer.COLUMNS) == 20
    data = path.read_bytes()
    kind, n = _writer.HEADER.unpack_from(data)
    assert kind == _writer.COLUMNS and n == len(data) - _writer.HEADER.size
    chunk = _chunks.parse(data[_writer.HEADER.size:], _chunks.COLUMNS)
    assert list(chunk.column("context_id", 0, 20)) == [i % 4 for i in range(20)]


def _attributed_trace(tmp_path, name="t.db"):
    path = tmp_path / name
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(path), auto_snapshot=False)
    net = _native.intern_context("Net.fc1", PHASES.index("forward"))
    _native.set_context(net)
    p.track_allocation(0x1000, 100)
    p.track_allocation(0x2000, 200)
    _native.set_context(0)
    p.track_deallocation(0x1000)
    p.add_marks([(0x2000, "parameter", net)])
    p.close()
    p.storage.wait()
    return path, net


def test_contexts_and_marks_are_kept_in_a_saved_trace(tmp_path):
    path, net = _attributed_trace(tmp_path)
    con = sqlite3.connect(path)
    rows = con.execute("SELECT kind, context_id FROM events ORDER BY seq").fetchall()
    assert rows == [(0, net), (0, net), (1, 0)]
    assert con.execute("SELECT module, phase FROM contexts WHERE context_id = ?",
                       (net,)).fetchone() == ("Net.fc1", "forward")
    assert con.execute("SELECT seq, address, category, context_id FROM marks").fetchall() == \
        [(3, 0x2000, "parameter", net)]
    con.close()
    back = load(path)
    assert back.get_event_rows()["context_id"].tolist() == [net, net, 0]
    assert back.resolve_context(net) == ("Net.fc1", "forward")
    assert back.resolve_context(0) == ("", "other")
    assert back.live_allocations()["context_id"].tolist() == [net]
    marks = back.attribution_marks()
    assert marks["seq"].tolist() == [3] and marks["address"].tolist() == [0x2000]


def test_schema_4_traces_still_load_with_context_0(tmp_path):
    # Schema 4: no events.context_id, no contexts or marks tables.
    path, net = _attributed_trace(tmp_path)
    with TraceReader(path) as r:
        want = r.read_events()
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("ALTER TABLE events DROP COLUMN context_id")
    con.execute("DROP TABLE contexts")
    con.execute("DROP TABLE marks")
    con.execute("DROP TABLE event_columns")  # a schema 4 writer kept no copies
    con.execute("UPDATE metadata SET value = '4' WHERE key = 'schema_version'")
    con.close()
    back = load(path)
    assert back.trace_metadata["schema_version"] == 4
    got = back.get_event_rows()
    assert got["context_id"].tolist() == [0, 0, 0]
    for name in ("seq", "address", "size", "kind", "total_allocated", "total_freed"):
        np.testing.assert_array_equal(got[name], want[name])
    assert back.resolve_context(net) == ("", "other")
    assert len(back.attribution_marks()) == 0
