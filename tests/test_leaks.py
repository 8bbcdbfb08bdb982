"""detect_potential_leaks with both age filters."""

import time

import pytest

from torchmem import Leak


def test_leaks_largest_first_with_step_filter(profiler):
    p = profiler
    p.track_allocation(1, 100)          # step 0
    p.track_allocation(2, 300)          # step 0
    p.step()
    p.track_allocation(3, 500)          # step 1
    p.track_allocation(4, 50)           # step 1, freed
    p.track_deallocation(4)
    p.step()
    p.track_allocation(5, 1000)         # step 2
    assert p.detect_potential_leaks() == [Leak(5, 1000, None), Leak(3, 500, None),
                                          Leak(2, 300, None), Leak(1, 100, None)]
    assert p.detect_potential_leaks(min_age_steps=1) == [Leak(3, 500, None), Leak(2, 300, None),
                                                         Leak(1, 100, None)]
    assert p.detect_potential_leaks(min_age_steps=2) == [Leak(2, 300, None), Leak(1, 100, None)]
    assert p.detect_potential_leaks(min_age_steps=3) == []


def test_leaks_age_filter_seconds(profiler):
    p = profiler
    p.track_allocation(1, 10)
    time.sleep(0.3)
    p.track_allocation(2, 20)
    assert p.detect_potential_leaks(min_age_seconds=0.2) == [Leak(1, 10, None)]
    assert p.detect_potential_leaks(min_age_seconds=60) == []
    assert [l.address for l in p.detect_potential_leaks(min_age_seconds=0.0)] == [2, 1]
    with pytest.raises(ValueError):
        p.detect_potential_leaks(min_age_seconds=-1)
    with pytest.raises(TypeError):
        p.detect_potential_leaks(min_age_steps=1.5)


def test_equal_sizes_keep_allocation_order(profiler):
    p = profiler
    for a in (30, 10, 20):
        p.track_allocation(a, 8)
    assert [l.address for l in p.detect_potential_leaks()] == [30, 10, 20]
