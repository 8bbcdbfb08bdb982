"""Step 3 of holders.py's docstring: tensors no root reaches, searched from their referrers.

Only after a walk that reached the whole heap in time: every object the GC
tracks that the walk did not reach is indexed by its referrers (the walk's own
containers are emptied first, so they are not among them), and each wanted
tensor is followed back to the nearest object on a reference cycle (Tarjan's
strongly connected components over its referrers), or else to an object
nothing Python-visible refers to.
"""

from __future__ import annotations

import gc
import time
from itertools import repeat
from operator import rshift
from typing import Any, Iterable

from . import _holder_names as hn
from ._holder_names import CYCLE, UNREACHED
from ._holder_paths import render

_CHECK_EVERY = 256  # objects between two looks at the clock


def _keys(objs: Iterable[Any]) -> Iterable[int]:
    # Dicts keyed by id(obj) >> 4, still unique (objects are 16-byte aligned and
    # at least 16 bytes long): CPython probes from an int hash's low bits, and raw
    # ids made inserts 4-5x slower (1.2M ids: 0.55-1.1 s raw, 0.11-0.2 s shifted).
    return map(rshift, map(id, objs), repeat(4))


class Unreached:
    """The unreached objects of one search, indexed by referrer."""

    def __init__(self, walk: Any, missing: set[int]) -> None:
        self.walk, self.missing = walk, missing

    def run(self, search: Any) -> None:
        walk = self.walk
        objs = gc.get_objects()
        unreached = walk.heap.unseen(objs)  # what the GC tracks and no root reaches
        del objs
        walk.heap.clear()
        pool = dict(zip(_keys(unreached), unreached))
        del unreached
        rev: dict[int, list[Any]] = {}
        queue = list(pool.values())
        clock, deadline = time.perf_counter, walk.deadline
        if clock() > deadline:  # listing the GC's objects took the rest of the budget
            walk.stopped = True
            pool.clear()
            queue.clear()
            return
        try:
            i = 0
            while i < len(queue):
                o = queue[i]
                i += 1
                walk.visited += 1
                if not i % _CHECK_EVERY and clock() > deadline:
                    walk.stopped = True
                    break
                kind = walk._kind(type(o))
                extra = walk._extra(o, kind, 0) if kind is not None else ()
                for child, ekind, name in extra:
                    if id(child) >> 4 not in pool:
                        pool[id(child) >> 4] = child
                        queue.append(child)
                        walk.namer.virtual[id(child)] = (id(o), ekind, name)
                    rev.setdefault(id(child), []).append(o)
                for child in gc.get_referents(o):
                    if id(child) >> 4 in pool:
                        rev.setdefault(id(child), []).append(o)
            del queue
            for addr, (tensor, _d) in list(walk.found.items()):
                if addr in self.missing and not walk.stopped:
                    search.paths[addr] = self._path(tensor, rev)
                    if clock() > deadline:
                        walk.stopped = True
        finally:
            pool.clear()
            rev.clear()

    def _path(self, tensor: Any, rev: dict[int, list[Any]]) -> tuple[str, str, str]:
        # Referrers of the tensor, nearest first; ``toward`` leads back to it.
        toward: dict[int, Any] = {id(tensor): None}
        order = [tensor]
        j = 0
        while j < len(order) and len(order) < 100_000:
            x = order[j]
            j += 1
            for r in rev.get(id(x), ()):
                if id(r) not in toward:
                    toward[id(r)] = x
                    order.append(r)
        members = {id(o): o for o in order}
        cyclic = _cyclic(order, rev, members)
        namer = self.walk.namer
        if len(order) == 1:
            name = hn.type_name(type(tensor))
            text = (f"<a {name} no Python object refers to: held from C++ "
                    "(an autograd graph or a cache Python cannot see)>")
            return text, text, UNREACHED
        start = next((o for o in order if id(o) in cyclic), None)
        if start is not None:
            loop = _loop(start, rev, cyclic)
            cyc, _ = render(namer, loop, hn.type_name(type(start)), True) if loop else ("?", "")
            cyc = cyc.rsplit(" -> ", 1)[0] if loop else cyc
            label, kind = f"<reference cycle no root reaches: {cyc}>", CYCLE
        else:
            tops = [o for o in order if not rev.get(id(o))]
            start = tops[0] if tops else order[-1]
            label = f"<{hn.type_name(type(start))} that no root reaches: held from C code>"
            kind = UNREACHED
        chain = [start]
        nxt = toward.get(id(start))
        while nxt is not None:
            chain.append(nxt)
            nxt = toward.get(id(nxt))
        path, shape = render(namer, chain, label, False)
        return path, shape, kind


def _cyclic(order: list[Any], rev: dict[int, list[Any]], members: dict[int, Any]) -> set[int]:
    """Ids of the objects of ``order`` that lie on a reference cycle (iterative Tarjan)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    out: set[int] = set()
    counter = 0
    for root in order:
        if id(root) in index:
            continue
        work = [(id(root), iter([id(r) for r in rev.get(id(root), ())]))]
        index[id(root)] = low[id(root)] = counter
        counter += 1
        stack.append(id(root))
        on_stack.add(id(root))
        while work:
            v, it = work[-1]
            for w in it:
                if w not in members:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter([id(r) for r in rev.get(w, ())])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or any(r is members[v] for r in rev.get(v, ())):
                        out.update(comp)
    return out


def _loop(start: Any, rev: dict[int, list[Any]], cyclic: set[int]) -> list[Any]:
    """A shortest reference loop from ``start`` back to itself, as [start, ..., start]."""
    # Forward edges inside the cycle: a -> b where a refers to b.
    members = {i for i in cyclic}
    prev: dict[int, Any] = {}
    frontier = [start]
    objs = {id(start): start}
    while frontier:
        nxt = []
        for b in frontier:
            for a in rev.get(id(b), ()):  # a refers to b: walking referrers walks the loop backwards
                if id(a) not in members:
                    continue
                if a is start:
                    chain = [b]
                    while chain[-1] is not start:
                        chain.append(prev[id(chain[-1])])
                    return [start] + chain
                if id(a) not in objs:
                    objs[id(a)] = a
                    prev[id(a)] = b
                    nxt.append(a)
        frontier = nxt
    return []
