"""What each byte is for: allocation lifetimes, and their category at a moment.

An allocation is an interval of the event log: from its ALLOCATION (or
REALLOCATION) event to the DEALLOCATION that frees it. It is live at the
moment *s* (right after event *s*) when ``alloc_seq <= s < free_seq``; the
live sizes at any moment add up exactly to the usage the events report then.

Its category at a moment, exact where torch says what it is:

1. marks (torchmem.sources.context): ``parameter``, ``buffer``, ``gradient``,
   ``optimizer_state``, ``input``. An allocation's marks apply from the
   moment each was made; its first mark also back to the allocation itself
   (a parameter was one from its creation; a .grad from the backward op that
   made it). A later mark changes the category from then on ("none": no
   longer any of them).
2. otherwise, from its lifetime and the context of its events:
   ``activation``: allocated in a forward, and alive when the next backward
   pass starts (what autograd saved, and the forward's outputs still held);
   ``temporary``: allocated and freed in the same phase of the same step;
   ``other``: everything else (allocations outside any module, made in one
   phase and freed in another...).
   While an allocation is still live its future is unknown: a forward
   allocation counts as an activation until its step ends without a
   backward, one of the current phase and step as a temporary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._contexts import MARK_INDEX, PHASE_INDEX
from .._events import allocating

__all__ = ["CATEGORIES", "Categorized", "Lifetimes", "NO_MODULE", "Segments", "categorize",
           "lifetimes", "lifetimes_of", "live_now", "opened_before", "segments"]

#: Every category, in the order reports list them.
CATEGORIES = ("parameter", "buffer", "gradient", "optimizer_state", "input", "activation",
              "temporary", "other")
_CAT = {name: i for i, name in enumerate(CATEGORIES)}
#: The module key of bytes no module accounts for.
NO_MODULE = "(none)"

_INF = np.int64(2**62)  # free_seq of an allocation still live
_FORWARD = PHASE_INDEX["forward"]
_ROLE_CODES = {MARK_INDEX[c]: _CAT[c] for c in ("parameter", "buffer", "gradient",
                                                "optimizer_state", "input")}
_BACKWARD_START = MARK_INDEX["backward_start"]
_NONE = MARK_INDEX["none"]


@dataclass
class Lifetimes:
    """Allocations as parallel arrays (one entry per allocation), plus the events
    they came from. ``alloc_seq`` is -1 for one made before the first event held;
    ``free_seq`` is 2**62 for one still live; steps are -1 where unknown."""

    alloc_seq: np.ndarray
    free_seq: np.ndarray
    address: np.ndarray
    size: np.ndarray
    type_id: np.ndarray
    device: np.ndarray
    stack_id: np.ndarray
    alloc_ctx: np.ndarray
    free_ctx: np.ndarray
    alloc_step: np.ndarray
    free_step: np.ndarray
    alloc_ns: np.ndarray  # wall-clock ns of the allocation (0 where unknown)
    free_ns: np.ndarray  # of its free (0 while live)
    rows: np.ndarray  # the events, EVENT_DTYPE, consecutive seqs

    def __len__(self) -> int:
        return len(self.alloc_seq)

    @property
    def first_seq(self) -> int:
        return int(self.rows["seq"][0]) if len(self.rows) else 0

    def usage(self) -> np.ndarray:
        """Live bytes right after each event of ``rows`` (int64)."""
        r = self.rows
        return r["total_allocated"].astype(np.int64) - r["total_freed"].astype(np.int64)

    def live_at(self, seq: int) -> np.ndarray:
        """Indices of the allocations live right after event ``seq``."""
        return np.flatnonzero((self.alloc_seq <= seq) & (self.free_seq > seq))


def _table(n: int) -> dict[str, np.ndarray]:
    return {"alloc_seq": np.zeros(n, np.int64), "free_seq": np.full(n, _INF),
            "address": np.zeros(n, np.uint64), "size": np.zeros(n, np.int64),
            "type_id": np.zeros(n, np.uint16), "device": np.zeros(n, np.int16),
            "stack_id": np.zeros(n, np.uint32), "alloc_ctx": np.zeros(n, np.uint16),
            "free_ctx": np.zeros(n, np.uint16), "alloc_step": np.full(n, -1, np.int64),
            "free_step": np.full(n, -1, np.int64), "alloc_ns": np.zeros(n, np.int64),
            "free_ns": np.zeros(n, np.int64)}


def _live_table(live: np.ndarray) -> dict[str, np.ndarray]:
    """Live-map rows (LIVE_DTYPE) as a table of Lifetimes' fields, none freed."""
    t = _table(len(live))
    t["alloc_seq"][:] = live["seq"]
    for name in ("address", "size", "type_id", "device", "stack_id"):
        t[name][:] = live[name]
    t["alloc_ctx"][:] = live["context_id"]
    t["alloc_step"][:] = live["step"]
    t["alloc_ns"][:] = live["timestamp_ns"]
    return t


def live_now(profiler: Any) -> Lifetimes:
    """The allocations live now, from the live map alone (no event is read)."""
    return Lifetimes(**_live_table(profiler.live_allocations()),
                     rows=profiler.event_rows_from(max(profiler.next_seq - 1, 0)))


def lifetimes(profiler: Any, storage: bool = True) -> Lifetimes:
    """Every allocation live at some moment of the events the profiler still has
    (its ring, and its storage for older ones unless ``storage`` is False; all
    of a loaded trace)."""
    rows = profiler.event_rows_from(0) if storage else profiler.read_rows()
    return lifetimes_of(rows, opened_before(profiler, rows))


def opened_before(profiler: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The allocations live now that were made before ``rows``' first event (all
    of them when there is none), from the live map: lifetimes_of's ``opened``."""
    first = int(rows["seq"][0]) if len(rows) else profiler.next_seq
    if first == 0:  # nothing before the first event: no need to ask (a loaded trace's pass)
        return _table(0)
    live = profiler.live_allocations()
    return _live_table(live[live["seq"].astype(np.int64) < first])


def lifetimes_of(rows: np.ndarray, opened: dict[str, np.ndarray]) -> Lifetimes:
    """The allocations live at some moment of ``rows`` (EVENT_DTYPE, consecutive
    seqs): those made in them, and ``opened`` (a table as Lifetimes' fields of
    allocations made before the first of them and live right before it), each
    paired with its free in ``rows`` if there is one. A free of an allocation in
    neither (made before the events held) becomes one with ``alloc_seq`` -1.
    Order: the allocations made in ``rows``, those -1 ones, then ``opened``."""
    kind = rows["kind"]
    is_a = allocating(kind)
    is_f = kind == 1
    a_idx, f_idx = np.flatnonzero(is_a), np.flatnonzero(is_f)
    n_new, n_open, n_f = len(a_idx), len(opened["alloc_seq"]), len(f_idx)
    # Pair each free with the allocation of its address just before it: per
    # address the events alternate allocation, free (the recorder logs a free
    # only of a live address). ``opened`` first, then the events in seq
    # order: one stable sort by address keeps each address's entries in seq
    # order (every opened one was made before the rows), cheaper than a
    # lexsort by (address, seq). Allocation j < n_new is rows[a_idx[j]], one
    # past it opened[j - n_new].
    ev = np.flatnonzero(is_a | is_f)
    ev_free = is_f[ev]
    addr = np.concatenate([opened["address"], rows["address"][ev]])
    is_free = np.concatenate([np.zeros(n_open, bool), ev_free])
    ev_which = np.empty(len(ev), np.int64)
    ev_which[~ev_free] = np.arange(n_new)
    ev_which[ev_free] = np.arange(n_f)
    which = np.concatenate([np.arange(n_new, n_new + n_open), ev_which])
    order = np.argsort(addr, kind="stable")
    addr, is_free, which = addr[order], is_free[order], which[order]
    prev_alloc = np.zeros(len(order), bool)
    prev_alloc[1:] = (~is_free[:-1]) & (addr[1:] == addr[:-1])
    pos = np.flatnonzero(is_free & prev_alloc)  # free at i, its allocation at i - 1
    alloc_of_free = np.full(n_f, -1, np.int64)
    alloc_of_free[which[pos]] = which[pos - 1]

    old_free = f_idx[alloc_of_free < 0]  # frees of allocations made before the events held
    n_freed = len(old_free)
    t = _table(n_new + n_freed + n_open)
    # Columns gathered, not rows: copying whole 80-byte rows cost a third.
    col = {name: rows[name] for name in ("seq", "address", "size", "type_id", "device",
                                         "stack_id", "context_id", "step", "timestamp_ns")}
    new = slice(0, n_new)
    t["alloc_seq"][new] = col["seq"][a_idx]
    for name in ("address", "size", "type_id", "device", "stack_id"):
        t[name][new] = col[name][a_idx]
    t["alloc_ctx"][new] = col["context_id"][a_idx]
    t["alloc_step"][new] = col["step"][a_idx]
    t["alloc_ns"][new] = col["timestamp_ns"][a_idx]
    kept = slice(n_new + n_freed, None)
    for name, column in opened.items():
        t[name][kept] = column
    freed = alloc_of_free >= 0
    fi = f_idx[freed]
    target = alloc_of_free[freed]
    target = np.where(target < n_new, target, target + n_freed)  # opened ones sit after -1 ones
    t["free_seq"][target] = col["seq"][fi]
    t["free_ctx"][target] = col["context_id"][fi]
    t["free_step"][target] = col["step"][fi]
    t["free_ns"][target] = col["timestamp_ns"][fi]
    old = slice(n_new, n_new + n_freed)
    t["alloc_seq"][old] = -1
    for name in ("address", "size", "type_id", "device", "stack_id"):
        t[name][old] = col[name][old_free]
    t["free_seq"][old] = col["seq"][old_free]
    t["free_ctx"][old] = col["context_id"][old_free]
    t["free_step"][old] = col["step"][old_free]
    t["free_ns"][old] = col["timestamp_ns"][old_free]
    return Lifetimes(**t, rows=rows)


@dataclass
class _Roles:
    """Marks matched to allocations, sorted by (allocation, seq)."""

    alloc: np.ndarray  # allocation index of each mark
    seq: np.ndarray
    category: np.ndarray  # category code (CATEGORIES index), -1 for "none"
    ctx: np.ndarray
    starts: np.ndarray  # first mark of each allocation that has marks
    owners: np.ndarray  # the allocation of each group


def _roles(lt: Lifetimes, marks: np.ndarray) -> _Roles:
    keep = np.isin(marks["category"], list(_ROLE_CODES) + [_NONE])
    m = marks[keep]
    n = len(lt)
    if not n or not len(m):
        none = np.zeros(0, np.int64)
        return _Roles(none, none, none, np.zeros(0, np.uint16), none, none)
    # Sort allocations and marks together by (address, moment): a mark at
    # seq q follows the allocations made before it (alloc_seq < q).
    addr = np.concatenate([lt.address, m["address"]])
    key = np.concatenate([lt.alloc_seq * 2, (m["seq"].astype(np.int64) - 1) * 2 + 1])
    order = np.lexsort((key, addr))
    is_alloc = order < n
    last = np.maximum.accumulate(np.where(is_alloc, np.arange(len(order)), -1))
    mark_pos = np.flatnonzero(~is_alloc)
    cand = last[mark_pos]
    mi = order[mark_pos] - n
    ok = cand >= 0
    ai = np.where(ok, order[np.maximum(cand, 0)], 0)
    ok &= lt.address[ai] == m["address"][mi]
    ok &= lt.free_seq[ai] >= m["seq"][mi].astype(np.int64)
    ai, mi = ai[ok], mi[ok]
    o = np.lexsort((mi, m["seq"][mi], ai))  # by allocation, then seq, then arrival
    ai, mi = ai[o], mi[o]
    codes = np.array([_ROLE_CODES.get(c, -1) for c in range(256)], np.int64)
    starts = np.flatnonzero(np.r_[True, ai[1:] != ai[:-1]]) if len(ai) else np.zeros(0, int)
    return _Roles(ai, m["seq"][mi].astype(np.int64), codes[m["category"][mi]],
                  m["context_id"][mi], starts, ai[starts] if len(ai) else ai)


@dataclass
class Segments:
    """Each allocation's category over its life, as segments: from moment ``start``
    (inclusive) to ``end`` (exclusive), the allocation ``alloc`` (an index into
    the Lifetimes) has category ``category`` (a CATEGORIES index) and belongs to
    the module of context ``module_ctx``. An allocation without marks is one
    segment; each later mark starts a new one."""

    alloc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    category: np.ndarray
    module_ctx: np.ndarray

    def at(self, seq: int) -> Categorized:
        """The live allocations right after event ``seq``."""
        live = (self.start <= seq) & (self.end > seq)
        return Categorized(self.alloc[live], self.category[live], self.module_ctx[live])


@dataclass
class Categorized:
    """The live allocations at a moment: indices into the Lifetimes, each one's
    category code (CATEGORIES index) and the context id naming its module."""

    index: np.ndarray
    category: np.ndarray
    module_ctx: np.ndarray


def _lifetime_categories(lt: Lifetimes, marks: np.ndarray, phase_of: np.ndarray,
                         current_step: int, current_ctx: int) -> np.ndarray:
    """The category of every allocation from its lifetime alone (rule 2 above)."""

    def phase(ctx: np.ndarray) -> np.ndarray:
        c = ctx.astype(np.int64)
        return np.where(c < len(phase_of), phase_of[np.minimum(c, len(phase_of) - 1)], 0)

    a_phase, f_phase = phase(lt.alloc_ctx), phase(lt.free_ctx)
    a_step, f_step = lt.alloc_step, lt.free_step
    live = lt.free_seq >= _INF
    starts = np.sort(marks["seq"][marks["category"] == _BACKWARD_START].astype(np.int64))
    nxt = np.searchsorted(starts, lt.alloc_seq, side="right")  # first start after it
    has_next = nxt < len(starts)
    next_start = (starts[np.minimum(nxt, len(starts) - 1)] if len(starts)
                  else np.zeros(len(lt), np.int64))
    cur_phase = int(phase(np.array([current_ctx]))[0])
    cat = np.full(len(lt), _CAT["other"], np.int64)
    temporary = np.where(live, (a_step == current_step) & (a_phase == cur_phase),
                         (a_phase == f_phase) & (a_step == f_step) & (a_step >= 0))
    cat[temporary] = _CAT["temporary"]
    activation = (a_phase == _FORWARD) & ((has_next & (next_start <= lt.free_seq))
                                          | (live & ~has_next & (a_step == current_step)))
    cat[activation] = _CAT["activation"]
    return cat


def segments(lt: Lifetimes, marks: np.ndarray, contexts: list[tuple[str, str]], *,
             current_step: int, current_ctx: int) -> Segments:
    """Every allocation's category and module over its life.

    ``current_step`` / ``current_ctx``: the step and context of the latest
    event, for allocations whose future is not known yet (still live).
    """
    phase_of = np.array([PHASE_INDEX.get(p, 0) for _, p in contexts] or [0], np.int64)
    base = _lifetime_categories(lt, marks, phase_of, current_step, current_ctx)
    n = len(lt)
    roles = _roles(lt, marks)
    has = np.zeros(n, bool)
    has[roles.owners] = True
    plain = np.flatnonzero(~has)
    # One segment per mark: the first from the allocation on (retroactive),
    # each later one from the moment it was made (a mark made when `q` events
    # had been recorded holds right after event q - 1).
    first = np.zeros(len(roles.alloc), bool)
    first[roles.starts] = True
    start = np.where(first, lt.alloc_seq[roles.alloc], roles.seq - 1)
    end = np.empty(len(roles.alloc), np.int64)
    if len(end):
        end[:-1] = np.where(first[1:], lt.free_seq[roles.alloc[:-1]], start[1:])
        end[-1] = lt.free_seq[roles.alloc[-1]]
    has_role = roles.category >= 0
    category = np.where(has_role, roles.category, base[roles.alloc])
    owned = has_role & (roles.ctx != 0)
    module = np.where(owned, roles.ctx, lt.alloc_ctx[roles.alloc]).astype(np.int64)
    return Segments(
        alloc=np.concatenate([plain, roles.alloc]),
        start=np.concatenate([lt.alloc_seq[plain], start]),
        end=np.concatenate([lt.free_seq[plain], end]),
        category=np.concatenate([base[plain], category]),
        module_ctx=np.concatenate([lt.alloc_ctx[plain].astype(np.int64), module]))


def categorize(lt: Lifetimes, marks: np.ndarray, contexts: list[tuple[str, str]],
               seq: int, *, current_step: int, current_ctx: int) -> Categorized:
    """Category and module of every allocation live right after event ``seq``."""
    return segments(lt, marks, contexts, current_step=current_step,
                    current_ctx=current_ctx).at(seq)
