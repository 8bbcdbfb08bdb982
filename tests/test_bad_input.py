"""Bad arguments raise errors that name the argument; nothing is recorded."""

import pytest


@pytest.mark.parametrize("call, exc, word", [
    (lambda p: p.track_allocation(-1, 10), ValueError, "address"),
    (lambda p: p.track_allocation(1, -10), ValueError, "size_bytes"),
    (lambda p: p.track_allocation(1.5, 10), TypeError, "address"),
    (lambda p: p.track_allocation(1, "10"), TypeError, "size_bytes"),
    (lambda p: p.track_allocation(1, None), TypeError, "size_bytes"),
    (lambda p: p.track_allocation(1, True), TypeError, "size_bytes"),
    (lambda p: p.track_allocation(1, 2**63), ValueError, "size_bytes"),
    (lambda p: p.track_allocation(2**70, 1), ValueError, "address"),
    (lambda p: p.track_allocation(1, 10, 3), TypeError, "allocation_type"),
    (lambda p: p.track_allocation(1, 10, ""), ValueError, "allocation_type"),
    (lambda p: p.track_allocation(1, 10, "CPU", -2), ValueError, "device"),
    (lambda p: p.track_allocation(1, 10, "CPU", "cuda:0"), TypeError, "device"),
    (lambda p: p.track_allocation(1, 10, "CPU", -1, -5), ValueError, "stream"),
    (lambda p: p.track_allocation(1), TypeError, "size_bytes"),
    (lambda p: p.track_allocation(1, 2, "CPU", -1, 0, 9), TypeError, "at most 5"),
    (lambda p: p.track_allocation(1, 2, colour="red"), TypeError, "colour"),
    (lambda p: p.track_allocation(1, 2, size_bytes=3), TypeError, "size_bytes"),
    (lambda p: p.track_deallocation("0x10"), TypeError, "address"),
    (lambda p: p.track_deallocation(16, -1), ValueError, "size_bytes"),
    (lambda p: p.track_reallocation(1, 2, -3), ValueError, "new_size_bytes"),
    (lambda p: p.track_reallocation(1, None, 3), TypeError, "new_address"),
])
def test_bad_arguments(profiler, call, exc, word):
    with pytest.raises(exc, match=word):
        call(profiler)
    s = profiler.get_statistics()
    assert (s.allocation_count, s.deallocation_count) == (0, 0)
    assert profiler.anomalies["total"] == 0


def test_keyword_arguments_work(profiler):
    p = profiler
    p.track_allocation(address=1, size_bytes=10, allocation_type="GPU", device=0, stream=3)
    p.track_deallocation(address=1, size_bytes=None)
    p.track_reallocation(old_address=5, new_address=6, new_size_bytes=7)
    s = p.get_statistics()
    assert (s.allocation_count, s.deallocation_count, s.current_usage_bytes) == (2, 1, 7)


def test_profiler_settings_validated(profiler):
    with pytest.raises(ValueError):
        profiler.max_stack_trace_depth = 0
    with pytest.raises(ValueError):
        profiler.snapshot_interval_ms = -5
