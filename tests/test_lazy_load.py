"""torchmem.load is lazy: events stay in the file, one bounded pass gives the totals,
and every answer is the one the eager load (MemoryProfiler.from_trace) gave."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

import torchmem
from torchmem._events import EventList
from torchmem.analysis.sites import bytes_by_site_name, group_by_site
from torchmem.analysis.summary import allocation_sites, growing_sites
from torchmem.export import to_html, to_memory_viz, to_perfetto
from torchmem.reports.summary import format_summary
from torchmem.storage import SQLiteStorage, TraceFormatError, TraceReader, load
from torchmem.storage import _saved

from _trace_helpers import KB, make_workload

STEPS = 40


def _site_a(p, addr):
    p.track_allocation(addr, 256)


def _site_b(p, addr):
    p.track_allocation(addr, 1000, "GPU", device=0)


def _kept(p, addr):
    p.track_allocation(addr, 64)


def _write(path):
    """make_workload, then 40 steps that allocate at two sites and keep one
    64-byte tensor per step from a third (the "history" leak)."""
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(path), auto_snapshot=False,
                                capture_stack_traces=True)
    make_workload(p)
    for step in range(STEPS):
        for i in range(50):
            _site_a(p, 0x100000 + i * 0x100)
            _site_b(p, 0x200000 + i * 0x1000)
        for i in range(50):
            p.track_deallocation(0x100000 + i * 0x100)
            p.track_deallocation(0x200000 + i * 0x1000)
        _kept(p, 0x300000 + step * 0x40)
        p.step()
    storage = p.storage
    p.close()
    storage.wait()
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return str(_write(tmp_path_factory.mktemp("lazy") / "t.db"))


@pytest.fixture
def pair(trace, monkeypatch):
    """(eager, lazy) over the same trace; the lazy one reads 500 events a batch,
    so the pass crosses many batch boundaries."""
    monkeypatch.setattr(_saved, "BATCH", 500)
    with TraceReader(trace) as r:
        eager = torchmem.MemoryProfiler.from_trace(r.read_trace())
    lazy = load(trace)
    yield eager, lazy
    eager.close()
    lazy.close()


def test_totals_and_live_allocations_are_the_eager_ones(pair):
    eager, lazy = pair
    n_events = 15 + STEPS * 201  # make_workload: 15 events (a snapshot, a GC, an OOM); 201 a step
    assert lazy.next_seq == eager.next_seq == n_events
    assert lazy.get_statistics() == eager.get_statistics()
    stats = lazy.get_statistics()
    assert stats.allocation_count == 7 + STEPS * 101
    assert stats.current_usage_bytes == 9 * KB + STEPS * 64
    assert stats.usage_by_type == {"CPU": 4 * KB + STEPS * 64, "GPU": 2 * KB, "Pinned": 3 * KB}
    assert lazy.counters_by_type_and_device() == eager.counters_by_type_and_device()
    assert lazy.get_statistics_for_type("GPU") == eager.get_statistics_for_type("GPU")
    assert lazy.get_statistics_for_device(0) == eager.get_statistics_for_device(0)
    np.testing.assert_array_equal(lazy.live_allocations(), eager.live_allocations())
    assert len(lazy.live_allocations()) == 3 + STEPS
    assert lazy.current_step == eager.current_step == 2 + STEPS  # the last step() had no event
    assert lazy.anomalies == eager.anomalies
    assert lazy.gc_records == eager.gc_records and lazy.snapshots == eager.snapshots
    assert lazy.oom_events == eager.oom_events


def test_event_queries_are_the_eager_ones(pair):
    eager, lazy = pair
    np.testing.assert_array_equal(lazy.get_event_rows(), eager.get_event_rows())
    for a, b in [(0, None), (5, 7), (2, 2), (10**6, None), (7, 5)]:
        np.testing.assert_array_equal(lazy.get_event_rows(a, b), eager.get_event_rows(a, b))
    assert lazy.get_events(5, 6) == eager.get_events(5, 6)
    assert len(lazy.get_events(5, 5)) == 201
    t = lazy.get_events(20, 20)[0].timestamp_ns / 1e9
    assert lazy.get_allocations_since(t) == eager.get_allocations_since(t)
    np.testing.assert_array_equal(lazy.read_rows(100, 2000), eager.read_rows(100, 2000))
    np.testing.assert_array_equal(lazy.read_rows(), eager.read_rows())


def test_leaks_and_sites_are_the_eager_ones(pair):
    eager, lazy = pair
    assert lazy.detect_potential_leaks() == eager.detect_potential_leaks()
    assert lazy.detect_potential_leaks(min_age_steps=30) == eager.detect_potential_leaks(
        min_age_steps=30)
    top = lazy.detect_potential_leaks(top=3)
    assert top == eager.detect_potential_leaks()[:3]
    assert [(leak.address, leak.size_bytes) for leak in top] == [
        (0x1000, 4 * KB), (0x6000, 3 * KB), (0x9000, 2 * KB)]
    rows = lazy.potential_leak_rows(min_age_steps=10)
    assert len(rows) == 3 + STEPS - 10 + 1 - 1  # the history tensors of steps 3..32, and 3
    assert lazy.detect_potential_leaks(min_age_steps=10) == eager.detect_potential_leaks(
        min_age_steps=10)
    assert allocation_sites(lazy, 100) == allocation_sites(eager, 100)
    sites = {s.name.split(" in ")[-1]: (b, c) for s, b, c in allocation_sites(lazy, 100)}
    assert sites["_site_a"] == (STEPS * 50 * 256, STEPS * 50)
    assert sites["_site_b"] == (STEPS * 50 * 1000, STEPS * 50)
    assert sites["_kept"] == (STEPS * 64, STEPS)
    assert group_by_site(lazy) == group_by_site(eager)
    assert growing_sites(lazy) == growing_sites(eager)
    assert bytes_by_site_name(lazy) == bytes_by_site_name(eager)
    assert format_summary(lazy) == format_summary(eager)


def test_reports_and_exports_are_the_eager_ones(pair):
    eager, lazy = pair
    eager.trace_metadata = lazy.trace_metadata

    def strip(html: str) -> str:  # the time, and Bokeh's per-document ids (a global counter, uuids)
        html = re.sub(r"generated [^<]*", "", html)
        html = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "U", html)
        return re.sub(r'"p\d+"', '"P"', html)

    assert strip(to_html(lazy)) == strip(to_html(eager))
    assert to_perfetto(lazy) == to_perfetto(eager)
    assert to_memory_viz(lazy) == to_memory_viz(eager)


def test_load_reads_no_event_until_asked(trace, monkeypatch):
    reads = []
    real = _saved.SavedEvents.read
    monkeypatch.setattr(_saved.SavedEvents, "read",
                        lambda self, **q: reads.append(q) or real(self, **q))
    p = load(trace)
    assert reads == []
    assert len(p.get_events(4, 4)) == 201
    assert reads[0] == {"start_step": 4, "end_step": 4}  # a range query for the events
    p.get_statistics()  # the pass: every batch once
    n = len(reads)
    p.get_statistics(), p.live_allocations(), p.detect_potential_leaks(top=1)
    # The pass is made once (attribution may still read the last events).
    assert not [r for r in reads[n:] if "before_seq" in r]
    p.close()


def test_iterating_the_events_is_the_pass(trace, monkeypatch):
    monkeypatch.setattr(_saved, "BATCH", 1000)
    p = load(trace)
    seen = []
    for rows in p.iter_event_rows():
        seen.append(len(rows))
        if len(seen) == 2:
            break  # stopping early still completes the pass
    assert seen == [1000, 1000]
    assert p.get_statistics().allocation_count == 7 + STEPS * 101
    assert sum(len(r) for r in p.iter_event_rows()) == p.next_seq
    p.close()


def test_corrupt_event_is_a_one_line_error_at_the_first_query(trace, tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(open(trace, "rb").read())
    con = sqlite3.connect(bad)
    con.execute("UPDATE events SET kind = 200 WHERE seq = 3000")
    con.commit()
    con.close()
    p = load(bad)  # lazy: the events are not read yet
    for _ in range(2):  # and the same error each time
        with pytest.raises(TraceFormatError, match=r"corrupt trace \(event seq 3000: "
                                                   r"impossible kind"):
            p.get_statistics()
    with pytest.raises(TraceFormatError, match="impossible kind"):
        p.get_events(17, 17)  # seq 3000 is in step 3 + (3000 - 15) // 201
    assert len(p.get_events(0, 2)) == 13  # events before it still read
    p.close()


def test_event_list_makes_objects_only_when_read(pair):
    _, lazy = pair
    events = lazy.get_events(5, 6)
    assert isinstance(events, EventList) and len(events.rows) == 402
    made = []
    make = events._make
    events._make = lambda rows: made.append(len(rows)) or make(rows)
    first, last = events[0], events[-1]
    assert made == [1, 1]
    assert (first.step, last.step) == (5, 6)
    part = events[10:20]
    assert isinstance(part, EventList) and len(part) == 10 and made == [1, 1]
    assert list(part) == [events[i] for i in range(10, 20)]
    with pytest.raises(IndexError):
        events[402]
    assert events == list(events) and events != list(events)[:-1]
    assert lazy.get_events(10**6) == [] and "EventList" in repr(events)


def test_detect_potential_leaks_top_must_be_a_count(pair):
    _, lazy = pair
    with pytest.raises(ValueError):
        lazy.detect_potential_leaks(top=-1)
    assert lazy.detect_potential_leaks(top=0) == []


def test_a_report_on_a_saved_trace_does_not_import_torch(trace):
    code = ("import sys, torchmem; from torchmem.reports.summary import format_summary; "
            "from torchmem.export import to_html; p = torchmem.load(sys.argv[1]); "
            "assert '_site_a' in format_summary(p); to_html(p); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, trace], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
