"""MemoryProfiler.add_marks: bad marks are refused whole, before anything is kept."""

from __future__ import annotations

import pytest

from torchmem import MemoryProfiler


@pytest.mark.parametrize("mark, exc, word", [
    (("0x10", "parameter", 0), TypeError, "a mark is"),
    ((16, "parameter", 1.5), TypeError, "a mark is"),
    ((-1, "parameter", 0), ValueError, "address"),
    ((2**64, "parameter", 0), ValueError, "address"),
    ((16, "parameter", 2**16), ValueError, "context id"),
    ((16, "gradients", 0), ValueError, "unknown mark category 'gradients'"),
])
def test_a_bad_mark_is_refused_with_the_good_ones_beside_it(mark, exc, word):
    p = MemoryProfiler(auto_snapshot=False)
    try:
        with pytest.raises(exc, match=word):
            p.add_marks([(32, "buffer", 0), mark])
        assert len(p.attribution_marks()) == 0
        p.add_marks([(32, "buffer", 3), (48, "input", 0)])
        p.add_marks([(64, "gradient", 2)], validate=False)  # the context source's own
        marks = p.attribution_marks()
        assert [(int(a), int(c), int(x)) for a, c, x in
                zip(marks["address"], marks["category"], marks["context_id"])] == [
            (32, 2, 3), (48, 5, 0), (64, 3, 2)]
    finally:
        p.close()
