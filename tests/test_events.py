"""The event log: order, cumulative totals, queries by step and by time, retention."""

import datetime
import time

import pytest

from torchmem import MemoryEvent, MemoryEventType, MemoryProfiler

A, D, R = MemoryEventType.ALLOCATION, MemoryEventType.DEALLOCATION, MemoryEventType.REALLOCATION


def test_events_carry_everything(profiler):
    p = profiler
    p.track_allocation(0xA0, 64, "GPU", 3, 0xBEEF)
    (e,) = p.get_events()
    assert e.event_type == A
    assert (e.address, e.size_bytes, e.allocation_type, e.device, e.stream) == (0xA0, 64, "GPU", 3, 0xBEEF)
    assert (e.total_allocated_bytes, e.total_freed_bytes, e.current_usage_bytes) == (64, 0, 64)
    assert e.step == 0 and e.stack_trace is None
    assert e.thread_id > 0
    assert abs(e.timestamp_ns - time.time_ns()) < 5e9


def test_cumulative_totals_follow_each_event(profiler):
    p = profiler
    p.track_allocation(1, 10)
    p.track_allocation(2, 20)
    p.track_deallocation(1)
    p.track_reallocation(2, 3, 5)
    got = [(e.event_type, e.address, e.size_bytes, e.total_allocated_bytes, e.total_freed_bytes)
           for e in p.get_events()]
    assert got == [(A, 1, 10, 10, 0), (A, 2, 20, 30, 0), (D, 1, 10, 30, 10),
                   (D, 2, 20, 30, 30), (R, 3, 5, 35, 30)]


def test_get_events_by_step_range_inclusive(profiler):
    p = profiler
    for step in range(5):
        p.track_allocation(100 + step, step + 1)
        p.track_deallocation(100 + step)
        assert p.current_step == step
        assert p.step() == step + 1
    evs = p.get_events(1, 3)
    assert [(e.step, e.event_type, e.address) for e in evs] == [
        (1, A, 101), (1, D, 101), (2, A, 102), (2, D, 102), (3, A, 103), (3, D, 103)]
    assert [e.address for e in p.get_events(4, 4)] == [104, 104]
    assert p.get_events(3, 1) == []
    assert len(p.get_events()) == 10
    assert p.get_events(7) == []
    with pytest.raises(ValueError, match="start_step"):
        p.get_events(-1, 2)


def test_timestamps_non_decreasing_across_steps(profiler):
    p = profiler
    for i in range(20000):
        p.track_allocation(i + 1, 8)
    ts = [e.timestamp_ns for e in p.get_events()]
    assert ts == sorted(ts)


def test_get_allocations_since_time(profiler):
    p = profiler
    p.track_allocation(1, 10)
    time.sleep(0.02)
    cut = time.time()
    time.sleep(0.02)
    p.track_allocation(2, 20)
    p.track_deallocation(1)
    p.track_reallocation(2, 3, 30)
    since = p.get_allocations_since(cut)
    assert [(e.event_type, e.address) for e in since] == [(A, 2), (R, 3)]
    dt = datetime.datetime.fromtimestamp(cut)
    assert [e.address for e in p.get_allocations_since(dt)] == [2, 3]
    assert [e.address for e in p.get_allocations_since(0)] == [1, 2, 3]
    assert p.get_allocations_since(time.time() + 60) == []
    with pytest.raises(TypeError):
        p.get_allocations_since("yesterday")


def test_retention_keeps_the_newest_events():
    p = MemoryProfiler(retention_events=10000, auto_snapshot=False)
    n = 100_000
    for i in range(n):
        p.track_allocation(i + 1, 1)
    rows = p.get_event_rows()
    assert 10000 <= len(rows) < 10000 + 8192 * 2
    assert rows["seq"][-1] == n - 1
    assert list(rows["seq"]) == list(range(n - len(rows), n))
    # Totals stay exact for events whose predecessors left the ring.
    assert rows["total_allocated"][-1] == n
    assert p.get_statistics().allocation_count == n
    p.close()


def test_memory_event_validation():
    ok = MemoryEvent(timestamp_ns=1, event_type=A, address=5, size_bytes=3)
    assert ok.current_usage_bytes == 0
    with pytest.raises(ValueError, match="size_bytes"):
        MemoryEvent(timestamp_ns=1, event_type=A, address=5, size_bytes=-1)
    with pytest.raises(TypeError, match="size_bytes"):
        MemoryEvent(timestamp_ns=1, event_type=A, address=5, size_bytes=1.5)
    with pytest.raises(ValueError):
        MemoryEvent(timestamp_ns=1, event_type=42)


def test_old_field_names_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning) as warned:
        e = MemoryEvent(timestamp=7, event_type=MemoryEventType.ALLOCATION, total_free_bytes=3,
                        total_allocated_bytes=5)
    assert sorted(str(w.message).split(" is ")[0] for w in warned) == [
        "MemoryEvent(timestamp=...)", "MemoryEvent(total_free_bytes=...)"]
    assert (e.timestamp_ns, e.total_freed_bytes, e.current_usage_bytes) == (7, 3, 2)
    with pytest.warns(DeprecationWarning, match="Event.timestamp_ns"):
        assert e.timestamp == 7
    with pytest.warns(DeprecationWarning, match="total_freed_bytes"):
        assert e.total_free_bytes == 3
