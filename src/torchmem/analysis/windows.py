"""A run's lifetimes a window of events at a time, with the same categories as the
whole run's: what lets a reader hold a window and the allocations live across
it, not every event.

An allocation's category (analysis.categories) depends only on its own
events, the marks made on it while it lived and the backward passes that
started meanwhile. So a window of events plus what was live right before it
(``opened``), the marks of those allocations, the marks since, and every
backward start, gives each allocation live in the window the category and
module the whole run gives it: exactly, once the allocation is freed in the
window (``final``); one still live at the window's end is categorised as the
run's latest moment would (``current_step``/``current_ctx``), which is exact
at the end of the events read.

``LifetimeWindows.window(rows)`` reads the events after the boundary;
``advance(w, seq)`` moves the boundary to right after event ``seq`` of that
window, keeping what is live then. The events after ``seq`` are read again
by the next window, so a reader may look past the boundary (a callback reads
the step in progress, and keeps the boundary at the last finished step).
Memory: a window, the allocations live across it, their marks and one mark
per backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .._contexts import MARK_DTYPE, MARK_INDEX
from .categories import Lifetimes, Segments, lifetimes_of, opened_before, segments

__all__ = ["NOT_AN_ALLOCATION", "LifetimeWindows", "Window", "creation_categories", "windows"]

_BACKWARD_START = MARK_INDEX["backward_start"]
_INF = np.int64(2**62)
_NO_MARKS = np.zeros(0, MARK_DTYPE)
_OPEN_FIELDS = ("alloc_seq", "address", "size", "type_id", "device", "stack_id",
                "alloc_ctx", "alloc_step", "alloc_ns")


@dataclass
class Window:
    """One window: its lifetimes, the marks that bear on them, and each one's
    category and module over its life (``segments``, indices into ``lt``)."""

    lt: Lifetimes
    marks: np.ndarray  # MARK_DTYPE
    segments: Segments
    current_step: int
    current_ctx: int
    last: bool  # no events follow: every allocation's category is the run's

    @property
    def final(self) -> np.ndarray:
        """Per allocation of ``lt``: whether its category is the whole run's (it was
        freed in the window, or no events follow)."""
        return (self.lt.free_seq < _INF) | self.last

    def made_categories(self) -> np.ndarray:
        """Per allocation of ``lt``: its category (a CATEGORIES index) when it was
        made, from its first segment; -1 for one made before the events held."""
        seg, lt = self.segments, self.lt
        out = np.full(len(lt), -1, np.int64)
        alloc_seq = lt.alloc_seq[seg.alloc]
        first = (seg.start == alloc_seq) & (alloc_seq >= 0)
        out[seg.alloc[first]] = seg.category[first]
        return out


class LifetimeWindows:
    """Windows of one profiler's events in seq order (see the module doc)."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        #: The seq of the last event before the next window (-1: none yet).
        self.boundary = -1
        self._opened: dict[str, np.ndarray] | None = None
        self._marks = _NO_MARKS  # the role marks that still bear on what follows
        self._pending = _NO_MARKS  # role marks read for moments after the window
        self._backward = _NO_MARKS  # every backward start read
        self._marks_read = 0  # the profiler's marks consumed, by index
        self._contexts: list[tuple[str, str]] = []

    def window(self, rows: np.ndarray, *, last: bool = False,
               current_step: int | None = None) -> Window:
        """The window of ``rows``: the events right after the boundary, in seq order
        (the first window: the first events held). ``last``: no events follow
        (every mark left bears on it, and its live allocations are categorised
        as of the run's end). ``current_step``: the step its live allocations
        are categorised at (default: the profiler's, or the last row's if later;
        a loaded trace's is known only after its events were read)."""
        p = self.profiler
        if self._opened is None:
            self._opened = opened_before(p, rows)
        new = p.attribution_marks(self._marks_read)
        self._marks_read += len(new)
        back = new["category"] == _BACKWARD_START
        if back.any():
            self._backward = np.concatenate([self._backward, new[back]])
            new = new[~back]
        roles = np.concatenate([self._marks, new]) if len(new) else self._marks
        if not last and len(rows):  # marks of moments after the window wait for theirs
            soon = roles["seq"].astype(np.int64) - 1 <= int(rows["seq"][-1])
            roles, self._pending = roles[soon], roles[~soon]
        else:
            self._pending = _NO_MARKS
        marks = np.concatenate([self._backward, roles])
        if len(self._contexts) < len(p.context_table()):
            self._contexts = p.context_table()
        lt = lifetimes_of(rows, self._opened)
        end = rows[-1] if len(rows) else None
        step = max(int(end["step"]) if end is not None else 0,
                   p.current_step if current_step is None else current_step)
        ctx = int(end["context_id"]) if end is not None else 0
        seg = segments(lt, marks, self._contexts, current_step=step, current_ctx=ctx)
        return Window(lt, marks, seg, step, ctx, last)

    def advance(self, w: Window, seq: int) -> None:
        """Moves the boundary to right after event ``seq`` of window ``w``: the
        next window starts with event ``seq + 1``."""
        lt = w.lt
        live = (lt.alloc_seq <= seq) & (lt.free_seq > seq)
        opened = {name: getattr(lt, name)[live] for name in _OPEN_FIELDS}
        n = int(live.sum())
        opened.update(free_seq=np.full(n, _INF), free_ctx=np.zeros(n, np.uint16),
                      free_step=np.full(n, -1, np.int64), free_ns=np.zeros(n, np.int64))
        # Role marks kept: those of moments after the boundary (read again with
        # their events), and those on an allocation live across it, made while
        # it lived (a mark made when q events were recorded holds after q - 1).
        roles = w.marks[w.marks["category"] != _BACKWARD_START]
        moment = roles["seq"].astype(np.int64) - 1
        later = moment > seq
        order = np.argsort(opened["address"], kind="stable")
        addr, born = opened["address"][order], opened["alloc_seq"][order]
        at = np.minimum(np.searchsorted(addr, roles["address"]), max(len(addr) - 1, 0))
        on_live = ((addr[at] == roles["address"]) & (moment >= born[at])
                   if len(addr) else np.zeros(len(roles), bool))
        self._marks = np.concatenate([roles[later | on_live], self._pending])
        self._pending = _NO_MARKS
        self._opened = opened
        self.boundary = int(seq)


def windows(profiler: Any, batch: int = 1 << 15) -> Iterator[Window]:
    """Every event of ``profiler`` as consecutive windows of about ``batch`` events
    (``iter_event_rows``); the last one's ``current_step`` is the run's."""
    lw = LifetimeWindows(profiler)
    held: np.ndarray | None = None
    for rows in profiler.iter_event_rows(batch):
        if held is not None:  # more events follow: its live allocations are not final
            w = lw.window(held, current_step=0)
            yield w
            lw.advance(w, int(held["seq"][-1]))
        held = rows
    if held is not None:
        yield lw.window(held, last=True)


#: creation_categories' code of an event that is not an allocation.
NOT_AN_ALLOCATION = 255


def creation_categories(profiler: Any, batch: int = 1 << 15) -> np.ndarray:
    """Per event seq, the category (a CATEGORIES index) of the allocation an
    ALLOCATION or REALLOCATION event made, as when it was made (the whole run's,
    as allocation_categories says); NOT_AN_ALLOCATION for every other event and
    for events no longer held. One byte per event; the events are read a window
    of ``batch`` at a time."""
    out = np.full(max(int(profiler.next_seq), 0), NOT_AN_ALLOCATION, np.uint8)
    for w in windows(profiler, batch):
        codes = w.made_categories()
        made = (codes >= 0) & w.final
        seqs = w.lt.alloc_seq[made]
        if len(seqs) and int(seqs.max()) >= len(out):  # events recorded meanwhile
            out = np.concatenate([out, np.full(int(seqs.max()) + 1 - len(out),
                                               NOT_AN_ALLOCATION, np.uint8)])
        out[seqs] = codes[made]
    return out
