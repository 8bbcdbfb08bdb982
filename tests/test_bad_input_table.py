"""The rows of docs/bad-input.md that tests/test_bad_input.py does not already cover.

Each test name is the row's id in the table. Inputs that could crash the
interpreter run in a child process, so a crash fails one test instead of
taking pytest down.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import torchmem
from torchmem import MemoryEvent, MemoryEventType, MemoryProfiler
from torchmem.storage import SQLiteStorage, TraceFormatError, load


def nothing_recorded(p: MemoryProfiler) -> bool:
    s = p.get_statistics()
    return (s.allocation_count, s.deallocation_count, p.anomalies["total"]) == (0, 0, 0)


# -- API arguments ------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, word", [
    (lambda p: p.track_allocation(16, 1, "x" * 65), ValueError, "allocation_type"),
    (lambda p: p.track_allocation(16, 1, b"CPU"), TypeError, "allocation_type"),
    (lambda p: p.track_allocation(16, 1, None), TypeError, "allocation_type"),
    (lambda p: p.track_allocation(16, 1, "CPU", 32768), ValueError, "device"),
    (lambda p: p.track_allocation(16, 1, "CPU", 2**70), ValueError, "device"),
    (lambda p: p.track_allocation(16, 1, "CPU", -1, 2**63), ValueError, "stream"),
    (lambda p: p.track_allocation(16, np.float64(8)), TypeError, "size_bytes"),
    (lambda p: p.track_allocation(16, 2**48), ValueError, "size_bytes"),
    (lambda p: p.track_deallocation(16, 2**64), ValueError, "size_bytes"),
    (lambda p: p.track_deallocation(), TypeError, "address"),
    (lambda p: p.track_reallocation(16, 32, 2**63), ValueError, "new_size_bytes"),
    (lambda p: p.track_reallocation(16, 32, 1.0), TypeError, "new_size_bytes"),
])
def test_api_bad_arguments(profiler, call, exc, word):
    with pytest.raises(exc, match=word):
        call(profiler)
    assert nothing_recorded(profiler)


def test_bad_arguments_while_disabled_are_ignored(profiler):
    profiler.disable()
    profiler.track_allocation(-1, "nonsense", 3.5)
    profiler.track_deallocation("0x10")
    profiler.track_reallocation(None, None, None)
    profiler.enable()
    assert nothing_recorded(profiler)


def test_user_allocation_types_and_limits(profiler):
    p = profiler
    p.track_allocation(16, 10, "my-arena")
    p.track_allocation(32, 20, "t" * 64)
    p.track_allocation(48, 30, "caché-λ")
    s = p.get_statistics()
    assert s.usage_by_type == {"my-arena": 10, "t" * 64: 20, "caché-λ": 30}
    assert p.get_statistics_for_type("never-seen").allocation_count == 0
    with pytest.raises(TypeError, match="allocation_type"):
        p.get_statistics_for_type(3)


def test_zero_size_and_extreme_values(profiler):
    p = profiler
    p.track_allocation(0, 0)  # address 0, size 0: an ordinary allocation
    p.track_allocation(2**63 - 1, 2**48 - 1, "GPU", 32767, 2**63 - 1)
    s = p.get_statistics()
    assert (s.allocation_count, s.current_usage_bytes) == (2, 2**48 - 1)
    assert s.usage_by_device == {-1: 0, 32767: 2**48 - 1}
    p.track_deallocation(2**63 - 1, 0)  # wrong size: counted, the recorded size freed
    p.track_deallocation(0)
    assert p.get_statistics().current_usage_bytes == 0
    assert p.anomalies["counts"]["size_mismatch"] == 1
    ev = p.get_events()[1]
    assert (ev.address, ev.size_bytes, ev.device, ev.stream) == (2**63 - 1, 2**48 - 1, 32767, 2**63 - 1)


def test_numpy_integers_accepted(profiler):
    profiler.track_allocation(np.uint64(16), np.int64(8), "CPU", np.int16(-1), np.int32(0))
    profiler.track_deallocation(np.int64(16), np.int32(8))
    s = profiler.get_statistics()
    assert (s.total_allocated_bytes, s.total_freed_bytes, s.allocation_count) == (8, 8, 1)


def test_int_subclasses_accepted(profiler):
    import enum

    class Size(enum.IntEnum):
        SMALL = 64

    profiler.track_allocation(16, Size.SMALL)
    assert profiler.get_statistics().total_allocated_bytes == 64


@pytest.mark.parametrize("call, exc", [
    (lambda p: p.get_events(-1), ValueError),
    (lambda p: p.get_events(0, -1), ValueError),
    (lambda p: p.get_events(1.5), TypeError),
    (lambda p: p.get_allocations_since("yesterday"), TypeError),
    (lambda p: p.get_allocations_since(True), TypeError),
    (lambda p: p.detect_potential_leaks(-1.0), ValueError),
    (lambda p: p.detect_potential_leaks(0, -1), ValueError),
    (lambda p: setattr(p, "max_stack_trace_depth", 129), ValueError),
    (lambda p: setattr(p, "max_stack_trace_depth", 2.5), ValueError),
    (lambda p: setattr(p, "snapshot_interval_ms", 0), ValueError),
])
def test_query_and_setting_arguments(profiler, call, exc):
    with pytest.raises(exc):
        call(profiler)


def test_query_ranges_that_are_empty(profiler):
    profiler.track_allocation(16, 1)
    assert profiler.get_events(5, 2) == []
    assert profiler.get_events(10**6) == []
    assert profiler.get_allocations_since(datetime.datetime(2100, 1, 1)) == []
    assert len(profiler.get_allocations_since(0)) == 1


def test_constructor_arguments():
    with pytest.raises(ValueError, match="retention_events"):
        MemoryProfiler(retention_events=-1)
    with pytest.raises(TypeError, match="retention_events"):
        MemoryProfiler(retention_events="many")
    with pytest.raises(ValueError, match="size_bytes"):
        MemoryEvent(timestamp_ns=0, event_type=MemoryEventType.ALLOCATION, size_bytes=-1)
    with pytest.raises(TypeError, match="size_bytes"):
        MemoryEvent(timestamp_ns=0, event_type=MemoryEventType.ALLOCATION, size_bytes=1.0)
    with pytest.raises(ValueError):
        MemoryEvent(timestamp_ns=0, event_type=99)


# -- trace files ----------------------------------------------------------------------
@pytest.fixture
def trace(tmp_path):
    """A small valid trace with stacks, snapshots and several types."""
    path = str(tmp_path / "good.db")
    st = SQLiteStorage(path)
    p = MemoryProfiler(st, auto_snapshot=False, capture_stack_traces=True)
    for i in range(20):
        p.track_allocation(4096 + i * 64, 100 + i, ("CPU", "GPU", "user")[i % 3],
                           (-1, 0, 2)[i % 3])
        if i % 4 == 0:
            p.track_deallocation(4096 + i * 64)
        if i % 5 == 4:
            p.step()
            p.track_snapshot()
    p.close()
    return path


def load_fails_cleanly(path: str, *words: str) -> str:
    with pytest.raises(TraceFormatError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and os.fspath(path) in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_trace_good_loads(trace):
    prof = load(trace)
    s = prof.get_statistics()
    assert (s.allocation_count, s.deallocation_count) == (20, 5)
    assert any(e.stack_trace for e in prof.get_events())
    prof.close()


def test_trace_missing(tmp_path):
    load_fails_cleanly(str(tmp_path / "nope.db"), "no such file")


def test_trace_directory(tmp_path):
    load_fails_cleanly(str(tmp_path), "directory")


def test_trace_empty(tmp_path):
    path = tmp_path / "empty.db"
    path.write_bytes(b"")
    load_fails_cleanly(str(path), "empty")


def test_trace_foreign_text(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("hello, not a database\n" * 100)
    load_fails_cleanly(str(path), "not a torchmem trace")


def test_trace_foreign_sqlite(tmp_path):
    path = str(tmp_path / "other.db")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    load_fails_cleanly(path, "not a torchmem trace")


def test_trace_pickle_is_never_unpickled(tmp_path):
    # A pickle that would run code if unpickled: loading it must only say "not a trace".
    path = tmp_path / "snapshot.pickle"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(type("X", (), {"__reduce__": lambda self: (
        open, (str(marker), "w"))})())
    path.write_bytes(payload)
    load_fails_cleanly(str(path), "not a torchmem trace")
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_trace_truncated(trace, tmp_path, fraction):
    data = open(trace, "rb").read()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[:int(len(data) * fraction)])
    load_fails_cleanly(str(cut), "truncated")


def test_trace_header_only(trace, tmp_path):
    cut = tmp_path / "header.db"
    cut.write_bytes(open(trace, "rb").read()[:60])
    load_fails_cleanly(str(cut), "truncated")


def _with_sql(path: str, *statements: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    for s in statements:
        con.execute(s)
    con.close()


@pytest.mark.parametrize("statement, words", [
    ("UPDATE metadata SET value = '\"other-format\"' WHERE key = 'format'",
     ("not a torchmem trace",)),
    ("UPDATE metadata SET value = '99' WHERE key = 'schema_version'", ("newer",)),
    ("UPDATE metadata SET value = '{' WHERE key = 'schema_version'", ("corrupt",)),
    ("DROP TABLE events", ("not a torchmem trace",)),
    ("DROP TABLE frames", ("corrupt",)),
])
def test_trace_corrupt_rows(trace, statement, words):
    _with_sql(trace, statement)
    load_fails_cleanly(trace, *words)


def test_trace_corrupt_page(trace, tmp_path):
    data = bytearray(open(trace, "rb").read())
    page = int.from_bytes(data[16:18], "big")
    for p in range(1, len(data) // page):  # every page but the header's
        data[p * page:p * page + 16] = b"\xff" * 16
    bad = tmp_path / "pages.db"
    bad.write_bytes(bytes(data))
    load_fails_cleanly(str(bad), "corrupt")


# Rows a loader must refuse (or load safely): each runs in a child process,
# because before the fixes in the issue 7 report some of them crashed it.
LOAD_CHILD = textwrap.dedent("""
    import sys
    from torchmem.storage import load, TraceFormatError
    try:  # load() is lazy: a bad event is refused by the first query that reads it
        prof = load(sys.argv[1])
        prof.get_statistics(); prof.get_events(); prof.live_allocations()
        prof.detect_potential_leaks()
    except TraceFormatError as exc:
        print("rejected:", exc)
        sys.exit(0)
    print("loaded")
""")


@pytest.mark.parametrize("statement", [
    "UPDATE events SET device = -2 WHERE seq = 0",          # segfault in replay (bug)
    "UPDATE events SET device = -300",                       # ValueError from C++ (bug)
    "UPDATE events SET kind = 200 WHERE seq = 1",            # loads; get_events raised
    "UPDATE stack_nodes SET node_id = 1099511627776 WHERE node_id = 1",  # 8 TiB array
    "UPDATE stack_nodes SET parent = -1",                    # OverflowError
    "UPDATE snapshots SET usage_by_type = '5'",              # AttributeError
    "UPDATE events SET size = 1e300 WHERE seq = 2",          # OverflowError
    "UPDATE events SET address = 'text' WHERE seq = 3",
    "UPDATE events SET type_id = 60000",
    "UPDATE events SET step = -1",
    "UPDATE types SET name = 5",
    "UPDATE frames SET lineno = 'seven'",
    "DELETE FROM events WHERE seq % 2 = 0",
    "UPDATE stack_nodes SET parent = node_id",
], ids=lambda s: s[:48])
def test_trace_hostile_values(trace, statement):
    _with_sql(trace, statement)
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, trace], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.startswith(("loaded", "rejected:"))


# -- hostile strings in the HTML export ---------------------------------------------------
HOSTILE = ['<script>alert("f")</script>', "</td></tr><img src=x onerror=alert(1)>",
           "\u202egnp.exe", "a\x00b", "&amp;&lt;", "x" * 20000, "'\"`${}"]


def test_html_export_escapes_hostile_frames_and_types(trace, tmp_path):
    from torchmem.export.html import export_html

    con = sqlite3.connect(trace, isolation_level=None)
    n = con.execute("SELECT count(*) FROM frames").fetchone()[0]
    assert n > 0
    for i in range(n):
        con.execute("UPDATE frames SET filename = ?, function = ? WHERE frame_id = ?",
                    (HOSTILE[i % len(HOSTILE)], HOSTILE[(i + 1) % len(HOSTILE)], i))
    con.execute("UPDATE types SET name = ? WHERE name = 'user'", (HOSTILE[1],))
    con.close()
    prof = load(trace)
    out = tmp_path / "report.html"
    export_html(prof, str(out), title=HOSTILE[0])
    html = out.read_text(encoding="utf-8")
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(&quot;f&quot;)&lt;/script&gt;" in html
    assert "\x00" not in html or "a\x00b" not in html.split("<body>")[0]
    prof.close()


def test_html_export_live_hostile_code_names(tmp_path):
    """Frames captured from code objects with hostile file and function names."""
    from torchmem.export.html import export_html

    p = MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    src = "def f(p, a):\n    p.track_allocation(a, 64)\n"
    ns: dict = {}
    exec(compile(src, HOSTILE[0], "exec"), ns)
    f = ns["f"]
    f.__code__ = f.__code__.replace(co_name="evil", co_qualname=HOSTILE[1])
    f(p, 16)
    frames = p.get_events()[0].stack_trace.frames
    assert frames[0][0] == HOSTILE[0] and HOSTILE[1] in frames[0][2]
    out = tmp_path / "live.html"
    export_html(p, str(out))
    html = out.read_text(encoding="utf-8")
    assert "<script>alert" not in html and "<img src=x" not in html
    p.close()
