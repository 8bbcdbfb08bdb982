"""Setters validate as the constructor does (issue 13 item 5); query arguments are
checked with a clear TypeError / ValueError naming them (item 14)."""

from __future__ import annotations

import datetime
import math
import time

import numpy as np
import pytest

import torchmem
from torchmem import MemoryProfiler
from torchmem._snapshots import AutoSnapshotter

BAD_INTERVALS = [math.nan, math.inf, -math.inf, -1, -0.5, 0, True, False, "100", None, 1e300,
                 10**20]


@pytest.mark.parametrize("value", BAD_INTERVALS)
def test_snapshot_interval_setter_refuses_what_the_constructor_refuses(profiler, value):
    with pytest.raises((TypeError, ValueError), match="snapshot_interval_ms"):
        MemoryProfiler(snapshot_interval_ms=value)
    with pytest.raises((TypeError, ValueError), match="snapshot_interval_ms"):
        profiler.snapshot_interval_ms = value
    assert profiler.snapshot_interval_ms == 1000  # unchanged


@pytest.mark.parametrize("value", [math.nan, math.inf, -5, 0, True, "10"])
def test_flush_interval_and_the_snapshotter_refuse_bad_intervals(value):
    with pytest.raises((TypeError, ValueError), match="flush_interval_ms"):
        MemoryProfiler(torchmem.InMemoryStorage(), flush_interval_ms=value)
    with pytest.raises((TypeError, ValueError), match="interval_ms"):
        AutoSnapshotter(MemoryProfiler(auto_snapshot=False), value)
    s = AutoSnapshotter(MemoryProfiler(auto_snapshot=False), 50)
    with pytest.raises((TypeError, ValueError), match="interval_ms"):
        s.interval_ms = value
    assert s.interval_ms == 50


def test_a_running_snapshotter_keeps_ticking_after_a_refused_interval():
    p = MemoryProfiler(snapshot_interval_ms=10)
    try:
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError):
                p.snapshot_interval_ms = value
        deadline = time.monotonic() + 20
        while len(p.snapshots) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(p.snapshots) >= 3
        assert p._snapshotter.errors == 0
    finally:
        p.close()


@pytest.mark.parametrize("name", ["capture_stack_traces", "auto_snapshot"])
@pytest.mark.parametrize("value", ["no", "False", None, 2, 0.5, [], "yes"])
def test_bool_settings_refuse_non_bools(name, value):
    with pytest.raises((TypeError, ValueError), match=name):
        MemoryProfiler(**{name: value})
    p = MemoryProfiler(auto_snapshot=False)
    before = getattr(p, name)
    with pytest.raises((TypeError, ValueError), match=name):
        setattr(p, name, value)
    assert getattr(p, name) == before
    p.close()


@pytest.mark.parametrize("value", [True, False, 1, 0, np.bool_(True)])
def test_bool_settings_accept_bools(value):
    p = MemoryProfiler(capture_stack_traces=value, auto_snapshot=False)
    assert p.capture_stack_traces is bool(value)
    p.auto_snapshot = value
    assert p.auto_snapshot is bool(value)
    p.close()


@pytest.mark.parametrize("value", [0, 129, 2.5, True, "3", None, math.nan])
def test_stack_depth_setter_and_constructor(value):
    with pytest.raises((TypeError, ValueError), match="max_stack_trace_depth"):
        MemoryProfiler(max_stack_trace_depth=value)
    p = MemoryProfiler(auto_snapshot=False)
    with pytest.raises((TypeError, ValueError), match="max_stack_trace_depth"):
        p.max_stack_trace_depth = value
    assert p.max_stack_trace_depth == 10


def test_enable_refuses_bad_settings_too():
    from torchmem import _session

    _session._reset_for_tests()
    try:
        for bad in ({"snapshot_interval_ms": math.nan}, {"gc": "no"}, {"trace": "off"},
                    {"auto_step": None}, {"summary": 3}):
            with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
                _session.enable(**{"trace": False, **bad})
            assert _session.get_profiler() is None
        p = _session.enable(trace=False, summary=False, host=False, gc=False,
                            gpu_source="none", auto_snapshot=False)
        with pytest.raises(ValueError, match="snapshot_interval_ms"):
            _session.enable(snapshot_interval_ms=math.inf)
        assert p.snapshot_interval_ms == 1000
    finally:
        _session._reset_for_tests()


# -- queries (item 14) ---------------------------------------------------------

@pytest.mark.parametrize("call, exc, name", [
    (lambda p: p.get_events(0, 2**64), ValueError, "end_step"),
    (lambda p: p.get_events(2**64), ValueError, "start_step"),
    (lambda p: p.get_event_rows(0, 2**70), ValueError, "end_step"),
    (lambda p: p.get_events(0, 1.5), TypeError, "end_step"),
    (lambda p: p.get_allocations_since(time.time_ns()), ValueError, "since_ns"),
    (lambda p: p.get_allocations_since(1e30), ValueError, "t"),
    (lambda p: p.get_allocations_since(math.inf), ValueError, "t"),
    (lambda p: p.get_allocations_since(-math.inf), ValueError, "t"),
    (lambda p: p.get_allocations_since(math.nan), ValueError, "t"),
    (lambda p: p.get_allocations_since(datetime.datetime.max), ValueError, "t"),
    (lambda p: p.get_allocations_since(datetime.datetime.max.replace(
        tzinfo=datetime.timezone.utc)), ValueError, "t"),
    (lambda p: p.get_allocations_since(since_ns=2**63), ValueError, "since_ns"),
    (lambda p: p.get_allocations_since(since_ns=1.5), TypeError, "since_ns"),
    (lambda p: p.get_allocations_since(), TypeError, "since_ns"),
    (lambda p: p.get_allocations_since(1.0, since_ns=1), TypeError, "since_ns"),
    (lambda p: p.get_statistics_for_device("x"), TypeError, "device"),
    (lambda p: p.get_statistics_for_device(1.0), TypeError, "device"),
    (lambda p: p.get_statistics_for_device(True), TypeError, "device"),
    (lambda p: p.get_statistics_for_device(-2), ValueError, "device"),
    (lambda p: p.get_statistics_for_device(2**40), ValueError, "device"),
    (lambda p: p.counters(device="x"), TypeError, "device"),
    (lambda p: p.reset_peak(device="x"), TypeError, "device"),
    (lambda p: p.reset_peak(device=-7), ValueError, "device"),
    (lambda p: p.detect_potential_leaks(math.inf), ValueError, "min_age_seconds"),
    (lambda p: p.detect_potential_leaks(math.nan), ValueError, "min_age_seconds"),
    (lambda p: p.detect_potential_leaks("1"), TypeError, "min_age_seconds"),
    (lambda p: p.detect_potential_leaks(0, 2**64), ValueError, "min_age_steps"),
    (lambda p: p.read_rows(since_ns=2**63), ValueError, "since_ns"),
])
def test_query_arguments_give_clear_errors(profiler, call, exc, name):
    profiler.track_allocation(16, 1)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call(profiler)


def test_time_ns_as_seconds_suggests_since_ns(profiler):
    with pytest.raises(ValueError, match="since_ns="):
        profiler.get_allocations_since(time.time_ns())


def test_a_query_from_an_events_own_float_timestamp_finds_it(profiler):
    for i in range(2000):
        profiler.track_allocation(0x1000 + 16 * i, 8)
    events = profiler.get_events()
    # The answers' rows are read as arrays: making ~1000 MemoryEvents an
    # answer, 3 answers for each of ~300 events, was most of this test's 15 s.
    for ev in events[::7]:
        got = profiler.get_allocations_since(ev.timestamp_ns / 1e9)
        assert got and got[0].timestamp_ns <= ev.timestamp_ns
        assert ev.address in got.rows["address"], ev
        exact = profiler.get_allocations_since(since_ns=ev.timestamp_ns)
        assert exact[0].timestamp_ns == ev.timestamp_ns
        assert (exact.rows["timestamp_ns"] >= ev.timestamp_ns).all()
        dt = datetime.datetime.fromtimestamp(ev.timestamp_ns / 1e9)
        assert ev.address in profiler.get_allocations_since(dt).rows["address"]
    # Integer ns reach every query that takes a time.
    last = events[-1].timestamp_ns
    assert profiler.read_rows(since_ns=last)["timestamp_ns"].min() == last


def test_queries_still_take_the_values_they_took(profiler):
    profiler.track_allocation(16, 1)
    assert len(profiler.get_allocations_since(0)) == 1
    assert len(profiler.get_allocations_since(-5)) == 1  # before 1970: everything
    assert profiler.get_allocations_since(datetime.datetime(2100, 1, 1)) == []
    assert profiler.get_allocations_since(np.float64(time.time() + 60)) == []
    assert len(profiler.get_events(0, 2**64 - 1)) == 1
    assert len(profiler.get_events(np.int64(0), np.int64(5))) == 1
    assert profiler.get_statistics_for_device(np.int32(-1)).current_usage_bytes == 1
    assert profiler.get_statistics_for_device(None).current_usage_bytes == 1
    assert profiler.detect_potential_leaks(1e9) == []


def test_allocation_type_limit_counts_characters_not_bytes(profiler):
    for name in ("é" * 64, "✓" * 64, "🙂" * 64, "a" * 64):
        profiler.track_allocation(0x10 + 16 * len(name.encode()), 1, name)
        assert profiler.get_statistics_for_type(name).allocation_count == 1
    for name in ("é" * 65, "a" * 65):
        with pytest.raises(ValueError, match="allocation_type"):
            profiler.track_allocation(0x9000, 1, name)


@pytest.mark.parametrize("args", [["leaks", "T", "--min-age-steps", "-5"],
                                  ["leaks", "T", "--top", "-1"],
                                  ["leaks", "T", "--top", "many"],
                                  ["diff", "T", "T", "--top", "-3"]])
def test_cli_refuses_negative_counts(tmp_path, args, capsys):
    from torchmem.cli import main
    from torchmem.storage import SQLiteStorage

    trace = str(tmp_path / "t.db")
    p = MemoryProfiler(SQLiteStorage(trace), auto_snapshot=False)
    p.track_allocation(16, 8)
    p.close()
    with pytest.raises(SystemExit) as exc:
        main([trace if a == "T" else a for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("must be >= 0" in err or "whole number" in err), err
