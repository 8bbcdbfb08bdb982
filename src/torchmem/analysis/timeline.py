"""Attribution over a whole run, for reports: memory over time by category, each
module's bytes, and what was live at the peak by stack.

All of it is exact at the moments it names (the same categories and modules
as ``breakdown``); the timeline samples, per bucket of events, the moment of
the bucket's highest live bytes, so no peak falls between two points.
``moments`` (breakdown.read_moments) lets several of them share one reading
of the events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .breakdown import _Moments
from .categories import CATEGORIES, NO_MODULE, Segments

__all__ = ["CategoryTimeline", "ModuleRow", "StackNode", "allocation_categories",
           "category_timeline", "module_table", "peak_stacks", "stack_tree"]


@dataclass
class CategoryTimeline:
    """Live bytes by category at sampled moments: ``seq``, ``timestamp_ns`` and
    ``step`` of each point, and per category (CATEGORIES order) the bytes there;
    the categories of a point add up to the live bytes then."""

    seq: np.ndarray
    timestamp_ns: np.ndarray
    step: np.ndarray
    bytes: dict[str, np.ndarray]

    def total(self) -> np.ndarray:
        return sum(self.bytes.values()) if self.bytes else np.zeros(len(self.seq), np.int64)


def _bytes_at(seg: Segments, size: np.ndarray, select: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Live bytes of the segments in ``select`` right after each seq in ``at``."""
    starts, ends = seg.start[select], seg.end[select]
    sizes = size[seg.alloc[select]]
    order_s, order_e = np.argsort(starts, kind="stable"), np.argsort(ends, kind="stable")
    cum_s = np.concatenate([[0], np.cumsum(sizes[order_s])])
    cum_e = np.concatenate([[0], np.cumsum(sizes[order_e])])
    began = cum_s[np.searchsorted(starts[order_s], at, side="right")]
    ended = cum_e[np.searchsorted(ends[order_e], at, side="right")]
    return (began - ended).astype(np.int64)


def _samples(m: _Moments, points: int) -> np.ndarray:
    """Row indices: per bucket of events, the one after which live bytes were highest."""
    usage = m.lt.usage()
    n = len(usage)
    if n <= points:
        return np.arange(n)
    edges = np.linspace(0, n, points + 1).astype(np.int64)
    idx = [a + int(np.argmax(usage[a:b])) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return np.array(idx, np.int64)


def category_timeline(profiler: Any, points: int = 400, *, moments: Any = None
                      ) -> CategoryTimeline:
    """Live bytes by category at up to ``points`` moments across the events held."""
    m = moments if moments is not None else _Moments(profiler)
    rows = m.lt.rows
    pick = _samples(m, points)
    seqs = rows["seq"][pick].astype(np.int64)
    seg = m.segments
    out = {name: _bytes_at(seg, m.lt.size, seg.category == i, seqs)
           for i, name in enumerate(CATEGORIES)}
    return CategoryTimeline(seqs, rows["timestamp_ns"][pick].astype(np.int64),
                            rows["step"][pick].astype(np.int64), out)


@dataclass
class ModuleRow:
    """One module's bytes: its own highest live bytes over the run, and its live
    bytes at the overall peak, by category."""

    module: str
    peak_bytes: int
    at_peak_bytes: int
    at_peak_by_category: dict[str, int] = field(default_factory=dict)


def module_table(profiler: Any, *, moments: Any = None) -> list[ModuleRow]:
    """Every module that held bytes, largest at the overall peak first."""
    m = moments if moments is not None else _Moments(profiler)
    seg = m.segments
    if not len(seg.alloc):
        return []
    size = m.lt.size[seg.alloc]
    # Contexts that name one module (its phases; "" and the optimizer's) count
    # together: a module id per context, then per module its live bytes over
    # time (+size at a segment's start, -size at its end, in seq order), whose
    # maximum is its peak.
    names = sorted({m.context(c)[0] or NO_MODULE for c in np.unique(seg.module_ctx).tolist()})
    name_id = {n: i for i, n in enumerate(names)}
    ctx_ids = np.unique(seg.module_ctx)
    lookup = {c: name_id[m.context(c)[0] or NO_MODULE] for c in ctx_ids.tolist()}
    of_ctx = np.array([lookup[c] for c in ctx_ids.tolist()], np.int64)
    module_of = of_ctx[np.searchsorted(ctx_ids, seg.module_ctx)]
    mod = np.concatenate([module_of, module_of])
    when = np.concatenate([seg.start, seg.end])
    delta = np.concatenate([size, -size])
    # At the same moment ends go before starts (a moment is "after the event").
    order = np.lexsort((delta, when, mod))
    mod, delta = mod[order], delta[order]
    bounds = np.flatnonzero(np.r_[True, mod[1:] != mod[:-1]])
    running = np.cumsum(delta)
    base = np.r_[0, running[bounds[1:] - 1]] if len(bounds) > 1 else np.zeros(1, np.int64)
    peaks = np.maximum.reduceat(running - np.repeat(base, np.diff(np.r_[bounds, len(mod)])),
                                bounds)
    by_name = {names[i]: peak for i, peak in zip(mod[bounds].tolist(), peaks.tolist())}
    seq = profiler.peak_seq
    at_peak: dict[str, dict[str, int]] = {}
    if seq is not None and seq >= m.lt.first_seq - 1:
        c = seg.at(seq)
        sizes = m.lt.size[c.index]
        for ctx, cat, nbytes in zip(c.module_ctx.tolist(), c.category.tolist(), sizes.tolist()):
            d = at_peak.setdefault(m.context(ctx)[0] or NO_MODULE, {})
            d[CATEGORIES[cat]] = d.get(CATEGORIES[cat], 0) + nbytes
    rows = [ModuleRow(name, peak, sum(at_peak.get(name, {}).values()),
                      dict(sorted(at_peak.get(name, {}).items(), key=lambda kv: -kv[1])))
            for name, peak in by_name.items() if peak > 0]
    return sorted(rows, key=lambda r: (-r.at_peak_bytes, -r.peak_bytes, r.module))


@dataclass
class StackNode:
    """A node of the tree of what was live at a moment by stack: a frame
    (outermost at the root), the bytes of allocations whose stack passes
    through it, and its children, largest first."""

    frame: tuple[str, int, str] | None
    bytes: int = 0
    children: list[StackNode] = field(default_factory=list)


def peak_stacks(profiler: Any, at: Any = "peak", *, moments: Any = None) -> StackNode:
    """The live bytes at ``at`` (as in breakdown) as a tree of stacks, outermost
    frame first (the root holds everything; allocations without a stack are a
    child with no frame)."""
    m = moments if moments is not None else _Moments(profiler)
    seq = m.seq_of(at)
    root = StackNode(None)
    if seq is None:
        return root
    m.check_held(seq)
    c = m.segments.at(seq)
    return stack_tree(profiler, m.lt.stack_id[c.index], m.lt.size[c.index])


def stack_tree(profiler: Any, stack_ids: np.ndarray, sizes: np.ndarray) -> StackNode:
    """The tree of ``sizes`` (bytes) by their stacks (``stack_ids``, 0: none)."""
    root = StackNode(None)
    stacks = np.asarray(stack_ids).astype(np.int64)
    if not len(stacks):
        return root
    uniq, inverse = np.unique(stacks, return_inverse=True)
    sums = np.zeros(len(uniq), np.int64)
    np.add.at(sums, inverse, np.asarray(sizes, np.int64))
    children: dict[Any, tuple[StackNode, dict]] = {}
    for stack_id, nbytes in zip(uniq.tolist(), sums.tolist()):
        root.bytes += nbytes
        trace = profiler.resolve_stack(stack_id) if stack_id else None
        frames = list(reversed(trace.frames)) if trace is not None and trace.frames else [None]
        node, kids = root, children
        for frame in frames:
            entry = kids.get(frame)
            if entry is None:
                child = StackNode(frame)
                entry = kids[frame] = (child, {})
                node.children.append(child)
            node, kids = entry
            node.bytes += nbytes
    _sort(root)
    return root


def _sort(node: StackNode) -> None:
    node.children.sort(key=lambda n: -n.bytes)
    for child in node.children:
        _sort(child)


def allocation_categories(profiler: Any, *, moments: Any = None) -> dict[int, str]:
    """The category of each allocation when it was made: seq of its ALLOCATION or
    REALLOCATION event -> category name (memory_viz colours allocations by it)."""
    m = moments if moments is not None else _Moments(profiler)
    seg = m.segments
    alloc_seq = m.lt.alloc_seq[seg.alloc]
    first = (seg.start == alloc_seq) & (alloc_seq >= 0)
    names = np.array(CATEGORIES, dtype=object)[seg.category[first]]
    return dict(zip(alloc_seq[first].tolist(), names.tolist()))
