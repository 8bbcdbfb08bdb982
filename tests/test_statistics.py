"""Statistics on hand-computed sequences: totals, current, peak, counts, average, per type."""

import datetime

import pytest

import torchmem


def test_empty_profiler_statistics(profiler):
    s = profiler.get_statistics()
    assert (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes,
            s.peak_usage_bytes, s.allocation_count, s.deallocation_count) == (0, 0, 0, 0, 0, 0)
    assert s.average_allocation_size_bytes == 0.0
    assert s.usage_by_type == {}
    assert s.gc_count == 0 and s.total_gc_time_ns == 0


def test_hand_computed_sequence(profiler):
    p = profiler
    p.track_allocation(0x1000, 100)                    # current 100
    p.track_allocation(0x2000, 300, "GPU", 0, 7)       # 400
    p.track_allocation(0x3000, 50, "Pinned")           # 450 <- peak
    p.track_deallocation(0x2000)                       # 150
    p.track_allocation(0x4000, 200, "GPU", 1)          # 350
    p.track_deallocation(0x1000, 100)                  # 250
    s = p.get_statistics()
    assert s.total_allocated_bytes == 650
    assert s.total_freed_bytes == 400
    assert s.current_usage_bytes == 250
    assert s.peak_usage_bytes == 450
    assert s.allocation_count == 4
    assert s.deallocation_count == 2
    assert s.average_allocation_size_bytes == 162.5
    assert s.usage_by_type == {"GPU": 200, "CPU": 0, "Pinned": 50}
    assert s.usage_by_device == {-1: 50, 0: 0, 1: 200}


def test_statistics_per_type(profiler):
    p = profiler
    p.track_allocation(1, 10, "GPU", 0)
    p.track_allocation(2, 30, "GPU", 0)
    p.track_deallocation(1)
    p.track_allocation(3, 5, "my-pool")
    gpu = p.get_statistics_for_type("GPU")
    assert (gpu.total_allocated_bytes, gpu.total_freed_bytes, gpu.current_usage_bytes,
            gpu.peak_usage_bytes, gpu.allocation_count, gpu.deallocation_count) == (40, 10, 30, 40, 2, 1)
    assert gpu.average_allocation_size_bytes == 20.0
    assert gpu.usage_by_device == {0: 30}
    user = p.get_statistics_for_type("my-pool")
    assert (user.current_usage_bytes, user.allocation_count) == (5, 1)
    assert p.get_statistics_for_type("never-used").allocation_count == 0
    with pytest.raises(TypeError, match="allocation_type"):
        p.get_statistics_for_type(3)


def test_statistics_per_device_and_reset_peak(profiler):
    p = profiler
    p.track_allocation(1, 100, "GPU", 0)
    p.track_allocation(2, 100, "GPU", 1)
    p.track_deallocation(1)
    d0 = p.get_statistics_for_device(0)
    assert (d0.current_usage_bytes, d0.peak_usage_bytes) == (0, 100)
    # Only the slices the filters name are reset: (GPU, device 0) here.
    p.reset_peak("GPU", 0)
    assert p.counters("GPU", 0).peak_bytes == 0
    assert p.get_statistics_for_device(0).peak_usage_bytes == 100
    p.reset_peak(device=0)
    assert p.get_statistics_for_device(0).peak_usage_bytes == 0
    assert p.get_statistics_for_device(1).peak_usage_bytes == 100
    assert p.get_statistics().peak_usage_bytes == 200
    p.reset_peak()
    assert p.get_statistics().peak_usage_bytes == 100



def test_reset_peak_device_minus_one_is_the_host_and_none_is_every_device(profiler):
    p = profiler
    p.track_allocation(1, 100, "CPU", -1)
    p.track_allocation(2, 300, "GPU", 0)
    p.track_deallocation(1)
    p.track_deallocation(2)
    p.reset_peak(device=-1)  # the host only
    assert p.get_statistics_for_device(-1).peak_usage_bytes == 0
    assert p.get_statistics_for_device(0).peak_usage_bytes == 300
    assert p.get_statistics().peak_usage_bytes == 400
    p.reset_peak(device=None)  # every device
    assert p.get_statistics_for_device(0).peak_usage_bytes == 0
    assert p.get_statistics().peak_usage_bytes == 0
    assert p.get_statistics_for_device(None) == p.get_statistics()


def test_named_counters_per_type_and_device(profiler):
    p = profiler
    p.track_allocation(1, 100, "CPU", -1)
    p.track_allocation(2, 300, "GPU", 0)
    p.track_allocation(3, 50, "GPU", 1)
    p.track_deallocation(2)
    assert p.counters() == (450, 300, 150, 450, 3, 1)
    gpu0 = p.counters("GPU", 0)
    assert (gpu0.allocated_bytes, gpu0.freed_bytes, gpu0.current_bytes, gpu0.peak_bytes,
            gpu0.allocation_count, gpu0.deallocation_count) == (300, 300, 0, 300, 1, 1)
    assert p.counters("GPU").current_bytes == 50
    assert p.counters(device=-1).current_bytes == 100
    assert p.counters("no such type") == (0, 0, 0, 0, 0, 0)
    by_pair = p.counters_by_type_and_device()
    assert list(by_pair) == [("GPU", 0), ("GPU", 1), ("CPU", -1)]  # type id, then device
    assert by_pair[("GPU", 1)].peak_bytes == 50
    assert p.type_names[:3] == ["GPU", "CPU", "Pinned"]


def test_row_slices_by_seq_and_time(profiler):
    p = profiler
    for i in range(5):
        p.track_allocation(i + 1, 10 * (i + 1))
    assert p.next_seq == 5 and p.first_retained_seq == 0
    rows = p.read_rows()
    assert rows["size"].tolist() == [10, 20, 30, 40, 50]
    assert p.read_rows(1, 3)["seq"].tolist() == [1, 2]
    assert p.read_rows(3)["seq"].tolist() == [3, 4]
    assert len(p.read_rows(4, 2)) == 0
    t = int(rows["timestamp_ns"][2])
    assert p.read_rows(since_ns=t)["seq"].tolist()[0] <= 2
    assert len(p.read_rows(since_ns=int(rows["timestamp_ns"][-1]) + 1)) == 0


def test_reallocation_moves_bytes(profiler):
    p = profiler
    p.track_allocation(0x10, 100, "GPU", 2)
    p.track_reallocation(0x10, 0x20, 250)
    s = p.get_statistics()
    assert (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes) == (350, 100, 250)
    assert s.usage_by_type == {"GPU": 250}
    assert s.usage_by_device == {2: 250}
    kinds = [e.event_type for e in p.get_events()]
    assert kinds == [torchmem.MemoryEventType.ALLOCATION, torchmem.MemoryEventType.DEALLOCATION,
                     torchmem.MemoryEventType.REALLOCATION]
    assert p.detect_potential_leaks() == [torchmem.Leak(0x20, 250, None)]


def test_disabled_profiler_ignores_tracking(profiler):
    p = profiler
    assert p.is_enabled
    p.track_allocation(1, 10)
    p.disable()
    assert not p.is_enabled
    p.track_allocation(2, 20)
    p.track_deallocation(1)
    p.track_reallocation(1, 3, 5)
    assert p.get_statistics().current_usage_bytes == 10
    p.enable()
    p.track_deallocation(1)
    s = p.get_statistics()
    assert (s.allocation_count, s.deallocation_count, s.current_usage_bytes) == (1, 1, 0)
    assert len(p.get_events()) == 2


def test_total_gc_time_is_a_deprecated_timedelta_of_total_gc_time_ns():
    s = torchmem.MemoryStatistics(total_gc_time_ns=2_500_000)
    with pytest.warns(DeprecationWarning, match="total_gc_time_ns"):
        assert s.total_gc_time == datetime.timedelta(milliseconds=2.5)
