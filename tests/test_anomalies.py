"""Every anomaly kind is counted, kept as an example, and never raised."""

from torchmem import MemoryEventType


def test_unknown_free(profiler):
    p = profiler
    p.track_deallocation(0xDEAD)
    a = p.anomalies
    assert a["counts"]["unknown_free"] == 1 and a["total"] == 1
    (ex,) = a["examples"]
    assert (ex["kind"], ex["address"]) == ("unknown_free", 0xDEAD)
    assert p.get_statistics().deallocation_count == 0
    assert p.get_events() == []


def test_double_free(profiler):
    p = profiler
    p.track_allocation(0x10, 64)
    p.track_deallocation(0x10)
    p.track_deallocation(0x10)
    assert p.anomalies["counts"]["double_free"] == 1
    assert p.anomalies["counts"]["unknown_free"] == 0
    s = p.get_statistics()
    assert (s.total_freed_bytes, s.deallocation_count, s.current_usage_bytes) == (64, 1, 0)
    # Reusing the address makes a later free legitimate again.
    p.track_allocation(0x10, 8)
    p.track_deallocation(0x10)
    assert p.anomalies["counts"]["double_free"] == 1


def test_size_mismatch_uses_the_recorded_size(profiler):
    p = profiler
    p.track_allocation(0x10, 64)
    p.track_deallocation(0x10, 32)
    a = p.anomalies
    assert a["counts"]["size_mismatch"] == 1
    ex = a["examples"][0]
    assert (ex["size_bytes"], ex["expected_size_bytes"]) == (32, 64)
    s = p.get_statistics()
    assert (s.total_freed_bytes, s.current_usage_bytes) == (64, 0)


def test_allocation_over_live_address_closes_the_old_one(profiler):
    p = profiler
    p.track_allocation(0x10, 64)
    p.track_allocation(0x10, 16)
    assert p.anomalies["counts"]["alloc_over_live"] == 1
    s = p.get_statistics()
    assert (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes) == (80, 64, 16)
    kinds = [(e.event_type, e.size_bytes) for e in p.get_events()]
    assert kinds == [(MemoryEventType.ALLOCATION, 64), (MemoryEventType.DEALLOCATION, 64),
                     (MemoryEventType.ALLOCATION, 16)]


def test_examples_are_bounded_per_kind(profiler):
    p = profiler
    for i in range(100):
        p.track_deallocation(1_000_000 + i)
    a = p.anomalies
    assert a["counts"]["unknown_free"] == 100
    assert len(a["examples"]) == 8
    assert a["examples"][-1]["address"] == 1_000_099
