"""Who holds a leak: the shortest reference paths from a root to the tensors owning given allocations.

``find_holders({address: size_bytes, ...})`` finds, for each allocation, the
Python tensors whose storage is that allocation
(``t.untyped_storage().data_ptr() == address``) and the shortest chain of
references from a root to one of them, written so a person reads it at once::

    __main__.history[12] -> Tensor
    <frame main() local 'trainer'> -> Trainer.cache['step7'] -> Tensor
    __main__.history[3] -> Tensor.grad_fn -> MseLossBackward0 -> ... -> AddmmBackward0._saved_mat1 -> saved tensor

How (one breadth-first walk, so the first path found to a tensor is a
shortest one):

1. Roots, in this order: ``__main__``'s globals, the locals of every live
   frame of every thread (torchmem's own frames excepted), every other
   module's globals, the attributes of every class.
2. From the roots, every object's referents (its type's tp_traverse, as
   ``gc.get_referents`` reads them: no Python code runs) plus the edges the
   GC does not show: a frame
   root's locals, a tensor's ``grad_fn`` and ``.grad``, an autograd node's
   ``next_functions`` and saved tensors (read as ``_raw_saved_*``'s data, so
   no saved-tensor unpack hook runs). Each tensor met is checked against the
   wanted storages. The walk ends when every allocation has a tensor, when
   the reachable heap is done, or at the time budget.
3. Allocations no reachable tensor owns, when the walk finished in time:
   the GC's objects that no root reaches are searched the other way
   (referrers): a tensor held by a reference cycle is reported with the
   cycle (``<reference cycle no root reaches: Node.partner -> Node.partner>
   -> Node.payload -> Tensor``: the GC frees it at its next full collection
   unless C code holds it), one held by an object nothing Python-visible
   refers to is reported from that object (held from C code), and memory no
   Python object owns at all (a C++ cache, a graph Python cannot reach) is
   said plainly.

The walk runs with the GC paused (it allocates; a collection in the middle
would cost time and show as a pause of the program's), keeps the objects it
meets only while it runs, and names edges with type-level lookups only. Its
cost is one visit per reachable object, the per-edge work native
(``_heap.HeapWalk``, csrc/heap_walk.cpp): measured in
``benchmarks/holders.py`` and docs/performance.md.

Modules: this one (the API), ``_holder_walk`` (roots and the walk),
``_holder_unreached`` (step 3), ``_holder_names`` (naming an edge without
running user code), ``_holder_paths`` (writing a path).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping

from ..units import format_bytes
from ._holder_names import NO_OBJECT, NOT_FOUND
from ._holder_walk import Walk

__all__ = [
    "DEFAULT_BUDGET_S",
    "DEFAULT_MAX_HOLDERS",
    "Holder",
    "HolderSearch",
    "find_holders",
    "holders_by_group",
]

#: Seconds the search may take before it stops and says so.
DEFAULT_BUDGET_S = 2.0
#: Holders listed per allocation site.
DEFAULT_MAX_HOLDERS = 3

class Holder(str):
    """One holder of leaked memory: the path (the string itself) and what it holds.

    ``held_bytes`` and ``allocation_count`` add up the allocations held
    through paths of the same shape (``history[0]``, ``history[1]`` ... are
    one holder); the string is one of them, the largest. ``root_kind`` is
    "module", "frame", "class", "cycle" (a reference cycle no root reaches),
    "unreached" (an object no root reaches, held from C code), "no_object"
    (no Python object owns the memory) or "not_found" (the search stopped
    at its time budget first).
    """

    held_bytes: int
    allocation_count: int
    root_kind: str

    def __new__(cls, path: str, held_bytes: int = 0, allocation_count: int = 0,
                root_kind: str = "") -> "Holder":
        self = super().__new__(cls, path)
        self.held_bytes = int(held_bytes)
        self.allocation_count = int(allocation_count)
        self.root_kind = root_kind
        return self

    @property
    def path(self) -> str:
        """The reference path as plain text."""
        return str.__str__(self)

    def format(self) -> str:
        """The path with what it holds: ``path  (10 allocations, 20.00 KiB)``."""
        n = self.allocation_count
        return (f"{self.path}  ({n} allocation{'s' if n != 1 else ''}, "
                f"{format_bytes(self.held_bytes)})")

    def __reduce__(self) -> Any:
        return (Holder, (self.path, self.held_bytes, self.allocation_count, self.root_kind))

    def __repr__(self) -> str:
        return (f"Holder({self.path!r}, held_bytes={self.held_bytes}, "
                f"allocation_count={self.allocation_count}, root_kind={self.root_kind!r})")


@dataclass
class HolderSearch:
    """The outcome of one ``find_holders`` call.

    ``paths`` maps each allocation address found to (path, shape, root
    kind). ``stopped_early`` is True when the time budget ran out before
    every allocation was accounted for; ``objects_visited`` counts the
    objects walked, ``elapsed_s`` the wall time taken.
    """

    budget_s: float
    sizes: dict[int, int] = field(default_factory=dict)
    paths: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    objects_visited: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False
    error: str | None = None

    def holders(self, addresses: Iterable[int] | None = None,
                max_holders: int = DEFAULT_MAX_HOLDERS) -> list[Holder]:
        """The holders of ``addresses`` (default: all searched), most bytes first.

        Paths of one shape (``history[0]``, ``history[1]``, ...) are one
        holder, written as the path of its largest allocation (of equal ones,
        the last in ``addresses``: the newest when they come oldest first).
        """
        groups: dict[tuple[str, str], list[Any]] = {}
        for addr in (self.sizes if addresses is None else addresses):
            size = self.sizes.get(addr, 0)
            path, shape, kind = self.paths.get(addr) or self._missing()
            g = groups.get((shape, kind))
            if g is None:
                groups[(shape, kind)] = [size, 1, (size, path)]
            else:
                g[0] += size
                g[1] += 1
                if size >= g[2][0]:  # the largest, the last given of equals (the newest)
                    g[2] = (size, path)
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        return [Holder(g[2][1], g[0], g[1], kind) for (_shape, kind), g in ranked[:max_holders]]

    def _missing(self) -> tuple[str, str, str]:
        if self.error is not None:
            text = f"<not found: the holder search failed ({self.error})>"
            return text, text, NOT_FOUND
        if self.stopped_early:
            text = f"<not found before the holder search's {self.budget_s:g} s budget ran out>"
            return text, text, NOT_FOUND
        text = ("<no Python object holds it: C++ owns it (an autograd graph or a cache "
                "Python cannot see, or a tensor freed by Python but kept by C++)>")
        return text, text, NO_OBJECT

    def note(self) -> str:
        """One line on the search itself (and whether it stopped early)."""
        found = len(self.paths)
        head = (f"holder search: {self.objects_visited:,} objects walked in "
                f"{self.elapsed_s:.2f} s, {found} of {len(self.sizes)} allocations' tensors found")
        if self.error is not None:
            return head + f"; it failed: {self.error}"
        if self.stopped_early:
            return head + f"; stopped early at its {self.budget_s:g} s time budget"
        return head


def find_holders(allocations: Mapping[int, int], *,
                 budget_s: float = DEFAULT_BUDGET_S) -> HolderSearch:
    """Searches the holders of ``allocations`` (storage address -> size in bytes).

    Returns a HolderSearch; ``.holders(addresses)`` groups them. Never
    raises (a failure is in ``.error``) and keeps no reference to any
    object it met once it returns. ``budget_s`` bounds the wall time (the
    search stops, and says so, when it is spent).
    """
    if not isinstance(budget_s, (int, float)) or budget_s != budget_s or budget_s < 0:
        raise ValueError(f"budget_s must be a number of seconds >= 0, got {budget_s!r}")
    search = HolderSearch(float(budget_s), sizes={int(a): int(s) for a, s in allocations.items()})
    if not search.sizes:
        return search
    start = time.perf_counter()
    was_enabled = gc.isenabled()
    gc.disable()
    walk = None
    try:
        walk = Walk(set(search.sizes), start + float(budget_s))
        walk.run(search)
    except Exception as exc:  # the finder must never break the run it observes
        search.error = f"{type(exc).__name__}: {exc}"
    finally:
        if walk is not None:
            walk.clear()
        if was_enabled:
            gc.enable()
    search.elapsed_s = time.perf_counter() - start
    return search


def holders_by_group(groups: Mapping[Hashable, Mapping[int, int]], *,
                     budget_s: float = DEFAULT_BUDGET_S,
                     max_holders: int = DEFAULT_MAX_HOLDERS,
                     ) -> tuple[dict[Hashable, list[Holder]], HolderSearch]:
    """One search for several groups of allocations (e.g. one per site).

    Returns ({group: holders, most bytes first, at most ``max_holders``}, the search).
    """
    every: dict[int, int] = {}
    for allocs in groups.values():
        every.update(allocs)
    search = find_holders(every, budget_s=budget_s)
    return {k: search.holders(list(v), max_holders) for k, v in groups.items()}, search


