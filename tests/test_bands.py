"""The band layout of the HTML report's allocation timeline (export._bands), exact."""

from __future__ import annotations

import numpy as np

from torchmem.export._bands import layout_bands


def _totals(alloc, free, size, s):
    return np.array([sum(z for a, f, z in zip(alloc, free, size) if a <= k < f) for k in s])


def test_largest_allocations_are_bands_the_rest_one_band_on_top():
    alloc, free, size = [0, 2, 4], [10, 6, 8], [100, 50, 30]
    s = np.arange(10)
    b = layout_bands(alloc, free, size, s, _totals(alloc, free, size, s), max_bands=2)
    assert b.index.tolist() == [0, 1] and b.rest_count == 1
    # Each polygon: the bottom edge left to right, then the top edge back.
    assert b.xs[0].tolist() == [0, 0, 9, 9, 9, 9, 0, 0]
    assert b.ys[0].tolist() == [0, 0, 0, 0, 100, 100, 100, 100]
    assert b.xs[1].tolist() == [2, 2, 5, 6, 6, 5, 2, 2]  # freed at 6: live after 2..5
    assert b.ys[1].tolist() == [100] * 4 + [150] * 4
    assert b.rest_bottom.tolist() == [100, 100, 150, 150, 150, 150, 100, 100, 100, 100]
    assert b.rest_top.tolist() == [100, 100, 150, 150, 180, 180, 130, 130, 100, 100]


def test_a_band_drops_when_one_below_is_freed():
    alloc, free, size = [0, 1], [5, 9], [10, 20]
    s = np.arange(9)
    b = layout_bands(alloc, free, size, s, _totals(alloc, free, size, s))
    # B sits on A until A's free (after event 5, so from sample 5 on): vertices
    # only where its bottom changes, on both sides of the change.
    assert b.xs[1].tolist() == [1, 1, 4, 5, 8, 8, 8, 8, 5, 4, 1, 1]
    assert b.ys[1].tolist() == [10, 10, 10, 0, 0, 0, 20, 20, 20, 30, 30, 30]
    assert b.rest_count == 0 and (b.rest_top == b.rest_bottom).all()


def test_at_every_sample_the_bands_and_the_rest_add_up_to_the_live_bytes():
    rng = np.random.default_rng(3)
    n = 400
    alloc = np.sort(rng.integers(-1, 1000, n))
    free = np.where(rng.random(n) < 0.1, 2**62, alloc + rng.integers(1, 300, n))
    size = rng.integers(1, 10_000, n)
    s = np.unique(rng.integers(0, 1000, 150))
    total = _totals(alloc, free, size, s)
    b = layout_bands(alloc, free, size, s, total, max_bands=50, max_vertices=3000)
    assert 0 < len(b.index) <= 50
    assert sum(len(x) for x in b.xs) <= 3000
    live_at = lambda i, k: alloc[i] <= k < free[i]  # noqa: E731
    seen = [i for i in range(n) if any(live_at(i, k) for k in s)]
    assert b.rest_count == len(seen) - len(b.index)
    # The drawn ones are the largest (ties: the earlier).
    drawn = set(b.index.tolist())
    assert min(size[list(drawn)]) >= max(size[[i for i in seen if i not in drawn]], default=0)
    for j, k in enumerate(s):
        heights = sum(size[i] for i in b.index if live_at(i, k))
        assert b.rest_bottom[j] == heights and b.rest_top[j] == total[j]
    # Stacked in the order they were made, no two overlapping at a sample.
    assert (np.diff(alloc[b.index]) >= 0).all()
    for bx, by, i in zip(b.xs, b.ys, b.index):
        half = len(bx) // 2
        assert (by[half:] - by[:half][::-1] == size[i]).all()


def test_no_samples_no_bands():
    b = layout_bands([0], [5], [8], np.array([], np.int64), np.array([], np.int64))
    assert len(b.index) == 0 and b.xs == [] and b.rest_count == 0
