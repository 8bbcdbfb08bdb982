"""GC monitoring: every collection seen, tensor bytes freed by cycles, GC problems."""

from __future__ import annotations

import gc

import pytest
import torch

from torchmem import GCRecord, MemoryEventType, MemoryProfiler
from torchmem.analysis.gc_problems import (
    DEFAULT_GEN2_PER_MINUTE,
    DEFAULT_LONG_PAUSE_MS,
    DEFAULT_TIME_SHARE,
    DEFAULT_WINDOW_S,
    find_gc_problems,
)
from torchmem.sources.gc_monitor import GCMonitor
from torchmem.sources.host import HostTracker


@pytest.fixture
def prof():
    p = MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()


class Cycle:
    def __init__(self, payload=None):
        self.me = self
        self.payload = payload


def test_every_collection_is_seen(prof):
    mon = GCMonitor(prof)
    # Automatic collections are paused only while reading the counters, so
    # both sides count exactly the same collections.
    gc.disable()
    mon.start()
    before = gc.get_stats()
    gc.enable()
    junk = []
    for i in range(30_000):
        junk.append(Cycle([i]))
        if i % 1000 == 0:
            junk.clear()
    gc.collect(0)
    gc.collect(1)
    gc.collect()
    gc.disable()
    after = gc.get_stats()
    mon.stop()
    gc.enable()
    expected = {g: after[g]["collections"] - before[g]["collections"] for g in range(3)}
    expected = {g: n for g, n in expected.items() if n}
    stats = prof.get_statistics()
    assert stats.gc_count_by_generation == expected
    assert stats.gc_count == sum(expected.values())
    assert expected[0] > 10  # the workload did trigger automatic collections
    collected = sum(r.collected for r in prof.gc_records)
    assert collected == sum(after[g]["collected"] - before[g]["collected"] for g in range(3))
    assert stats.total_gc_time_ns == pytest.approx(
        sum(r.duration_ns for r in prof.gc_records), abs=1000)
    assert all(r.end_ns >= r.start_ns for r in prof.gc_records)
    kinds = [e.event_type for e in prof.get_events()]
    assert kinds.count(MemoryEventType.GC_START) == kinds.count(MemoryEventType.GC_END) \
        == stats.gc_count



def test_collections_torchmem_runs_itself_are_not_recorded(prof):
    # The epoch check's gc.collect() would otherwise show as the program's
    # pause (a full collection with torch loaded takes ~100 ms and more).
    import torchmem

    mon = GCMonitor(prof)
    gc.disable()  # no automatic collection in between
    try:
        mon.start()
        gc.collect()  # the program's own: recorded
        assert prof.get_statistics().gc_count_by_generation == {2: 1}
        torchmem.mark_epoch(prof)
        torchmem.sources.gc_monitor.collect_unreported(0)
        assert prof.get_statistics().gc_count_by_generation == {2: 1}
        assert prof.get_statistics().gc_count == 1
        gc.collect(1)
        assert prof.get_statistics().gc_count_by_generation == {1: 1, 2: 1}
    finally:
        mon.stop()
        gc.enable()


def test_collection_reports_the_tensor_bytes_it_freed(prof):
    mon = GCMonitor(prof).start()
    gc.disable()
    try:
        with HostTracker(prof):
            cycles = [Cycle(torch.zeros(1000)) for _ in range(3)]  # 3 x 4000 bytes
            cycles[0].view = cycles[0].payload[:10]  # a view adds no bytes
            plain = torch.zeros(10)  # not in a cycle: not freed by GC
        assert prof.get_statistics().current_usage_bytes == 12040
        del cycles
        assert prof.get_statistics().current_usage_bytes == 12040  # cycles hold them
        gc.collect()
        record = prof.gc_records[-1]
        assert record.generation == 2
        assert record.tensor_bytes_freed == 12000
        assert record.collected > 0
        assert prof.get_statistics().current_usage_bytes == 40
        gc.collect()
        assert prof.gc_records[-1].tensor_bytes_freed == 0
        del plain
    finally:
        gc.enable()
        mon.stop()


def test_start_stop_idempotent(prof):
    mon = GCMonitor(prof)
    n = len(gc.callbacks)
    mon.start()
    mon.start()
    assert len(gc.callbacks) == n + 1 and mon.active
    mon.stop()
    mon.stop()
    assert len(gc.callbacks) == n and not mon.active
    gc.collect()
    assert prof.get_statistics().gc_count == 0
    with mon:
        gc.collect()
    gc.collect()
    assert prof.get_statistics().gc_count == 1


def test_disabled_profiler_gets_no_gc_events(prof):
    with GCMonitor(prof):
        prof.disable()
        gc.collect()
        prof.enable()
        gc.collect()
    assert prof.get_statistics().gc_count_by_generation == {2: 1}


def test_monitor_does_not_keep_profiler_alive():
    n = len(gc.callbacks)
    p = MemoryProfiler(auto_snapshot=False)
    GCMonitor(p).start()
    assert len(gc.callbacks) == n + 1
    p.close()
    del p
    gc.collect()
    assert len(gc.callbacks) == n


# -- find_gc_problems on synthetic records ------------------------------------
S = 1_000_000_000
MS = 1_000_000


def rec(generation: int, start_s: float, duration_ms: float) -> GCRecord:
    start = int(start_s * S)
    dur = int(duration_ms * MS)
    return GCRecord(generation, start, start + dur, dur, 10, 0, 0)


def kinds(problems) -> list[str]:
    return [p.kind for p in problems]


def test_defaults_are_documented_values():
    assert (DEFAULT_GEN2_PER_MINUTE, DEFAULT_LONG_PAUSE_MS, DEFAULT_TIME_SHARE,
            DEFAULT_WINDOW_S) == (10.0, 100.0, 0.05, 60.0)
    assert find_gc_problems([]) == []


def test_frequent_gen2_triggers():
    records = [rec(2, 5.0 * i, 1) for i in range(11)]  # 11 in 50 s
    (p,) = find_gc_problems(records)
    assert p.kind == "frequent_gen2"
    assert p.value == pytest.approx(11.0) and p.threshold == 10.0
    assert len(p.records) == 11
    assert p.start_ns == records[0].start_ns and p.end_ns == records[-1].end_ns


def test_frequent_gen2_does_not_trigger():
    assert find_gc_problems([rec(2, 5.0 * i, 1) for i in range(10)]) == []  # 10/min: not above
    assert find_gc_problems([rec(2, 7.0 * i, 1) for i in range(11)]) == []  # spread over 70 s
    assert find_gc_problems([rec(0, 0.1 * i, 1) for i in range(500)]) == []  # young gens only
    # a custom threshold and window
    assert kinds(find_gc_problems([rec(2, 0.0, 1), rec(2, 1.0, 1)], gen2_per_minute=100,
                                  window_s=1.5)) == []
    assert kinds(find_gc_problems([rec(2, 0.0, 1), rec(2, 1.0, 1)], gen2_per_minute=60,
                                  window_s=1.5)) == ["frequent_gen2"]


def test_long_pause_triggers():
    records = [rec(0, 1.0, 5), rec(2, 2.0, 150), rec(1, 3.0, 120)]
    (p,) = find_gc_problems(records)
    assert p.kind == "long_pause"
    assert p.value == pytest.approx(150.0) and p.threshold == 100.0
    assert p.records == (records[1], records[2])
    assert "150.0 ms" in p.message


def test_long_pause_does_not_trigger():
    assert find_gc_problems([rec(2, 1.0, 100), rec(0, 2.0, 99)]) == []  # equal is fine
    assert find_gc_problems([rec(2, 1.0, 150)], long_pause_ms=200) == []


def test_high_time_share_triggers():
    # 31 pauses of 99 ms within 60 s: 3.069 s of GC, 5.1% of the window
    records = [rec(0, 1.5 * i, 99) for i in range(31)]
    (p,) = find_gc_problems(records)
    assert p.kind == "high_gc_time_share"
    assert p.value == pytest.approx(31 * 0.099 / 60)
    assert p.threshold == 0.05


def test_high_time_share_does_not_trigger():
    # 30 x 99 ms = 2.97 s in 60 s: 4.95%
    assert find_gc_problems([rec(0, 1.5 * i, 99) for i in range(30)]) == []
    # the same GC time spread over two windows
    assert find_gc_problems([rec(0, 4.0 * i, 99) for i in range(31)]) == []
    # a pause straddling the window end only counts its part inside
    records = [rec(0, 0.0, 50), rec(0, 0.9, 200)]
    assert find_gc_problems(records, time_share=0.2, window_s=1.0, long_pause_ms=1e9) == []
    assert kinds(find_gc_problems(records, time_share=0.14, window_s=1.0,
                                  long_pause_ms=1e9)) == ["high_gc_time_share"]


def test_all_three_at_once_and_through_the_profiler(prof):
    records = [rec(2, 0.5 * i, 300) for i in range(20)]
    assert kinds(find_gc_problems(records)) == [
        "frequent_gen2", "long_pause", "high_gc_time_share"]
    prof._gc.items.extend(records)
    assert kinds(find_gc_problems(prof, long_pause_ms=1000, time_share=0.9)) == ["frequent_gen2"]
    with pytest.warns(DeprecationWarning, match="find_gc_problems"):
        assert kinds(prof.find_gc_problems(long_pause_ms=1000)) == ["frequent_gen2",
                                                                    "high_gc_time_share"]


def test_the_old_gc_monitor_names_still_work_with_a_warning():
    import torchmem.sources.gc_monitor as gc_monitor

    with pytest.warns(DeprecationWarning, match="torchmem.analysis.gc_problems.find_gc_problems"):
        assert gc_monitor.find_gc_problems is find_gc_problems


def test_bad_thresholds_raise():
    with pytest.raises(ValueError):
        find_gc_problems([], window_s=0)
    with pytest.raises(ValueError):
        find_gc_problems([], long_pause_ms=-1)
