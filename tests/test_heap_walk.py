"""The native half of the holder search: a set of walked objects, and the walk's two questions."""

from __future__ import annotations

from torchmem._native import HeapWalk


def test_heap_walk_native_set():
    a, b, c = [1], {"k": 2}, 3.5  # a float is not GC-tracked: a leaf, never walked
    outer = [a, b, c, None, "s"]
    w = HeapWalk()
    assert w.add(outer) and not w.add(outer) and outer in w and len(w) == 1
    assert w.add(None) and None in w
    new = w.expand([outer], 0, 1)
    assert sorted(map(id, new)) == sorted(map(id, [a, b])) and len(w) == 4
    assert w.expand([outer], 0, 1) == []  # walked already
    assert w.unseen([outer, a, c, [9]]) == [c, [9]]
    assert HeapWalk.first_referrers([[], outer, [a]], [a, b, [7]]) == [outer, outer, None]
    w.clear()
    assert len(w) == 0 and outer not in w


def test_heap_walk_grows_past_its_first_table():
    objs = [[i] for i in range(50_000)]  # the table starts at 4096 slots
    w = HeapWalk()
    new = w.expand([objs], 0, 1)
    assert len(new) == len(w) == 50_000 and {id(o) for o in new} == {id(o) for o in objs}
    assert w.unseen(objs) == [] and all(o in w for o in objs)
    assert w.expand([objs, objs], 0, 2) == []
    assert w.expand([objs], 5, 9) == []  # a range past the end is empty
