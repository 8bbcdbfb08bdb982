"""The category breakdown at each finished step's peak, for a callback that asks
once a step (the Lightning, Hugging Face and TensorBoard callbacks).

``steps.step_categories`` (``breakdown(by="category", at=step)``) reads every
event held each time it is asked: once a step, a run's cost grows with the
square of its length. ``StepCategoryTracker`` reads the events since the
previous call once (analysis.windows: the allocations live across the
boundary carried, their marks kept) and gives the same values as
``step_categories`` would at the moment of the call.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .breakdown import _Moments
from .categories import CATEGORIES
from .windows import LifetimeWindows

__all__ = ["StepCategoryTracker"]


class StepCategoryTracker:
    """Live bytes by category at the peaks of the steps finished since the last call."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self._windows = LifetimeWindows(profiler)
        #: Events read so far (each about once: the step in progress is read again).
        self.events_read = 0

    def categories(self, steps: Sequence[int]) -> dict[int, dict[str, int] | None] | None:
        """For each step of ``steps`` (finished since the last call, ascending):
        every category's bytes at its peak (0 when it holds nothing), or None for
        a step none of whose events are held. None for a profiler that cannot
        attribute memory to categories."""
        p = self.profiler
        if getattr(p, "breakdown", None) is None:
            return None
        lw = self._windows
        rows = p.event_rows_from(lw.boundary + 1)
        if len(rows) and int(rows["seq"][0]) != lw.boundary + 1:
            # Events between the calls are gone (a ring without storage): start
            # again from what is held, as breakdown would.
            lw = self._windows = LifetimeWindows(p)
        self.events_read += len(rows)
        w = lw.window(rows)
        m = _Moments(p, w.lt, marks=w.marks)
        out: dict[int, dict[str, int] | None] = {}
        for step in steps:
            try:
                seq = m.seq_of(int(step))
            except ValueError:  # no events of this step are held
                out[int(step)] = None
                continue
            d = dict.fromkeys(CATEGORIES, 0)
            if seq is not None:
                d.update(m.groups(seq, "category"))
            out[int(step)] = d
        if steps and len(rows):
            # The boundary: the last event of the last step asked for. The step in
            # progress is read again next time, with what it has by then.
            k = int(np.searchsorted(rows["step"], np.uint64(max(steps)), side="right"))
            if k:
                lw.advance(w, int(rows["seq"][k - 1]))
        return out
