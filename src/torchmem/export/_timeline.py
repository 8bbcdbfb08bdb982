"""What the HTML report draws and counts, gathered from the events a batch at a time.

``Timeline.of(profiler)`` reads the profiler's events once, in batches
(``MemoryProfiler.iter_event_rows``), and keeps only what the report needs:
the event count, memory over time (the total and each allocation type)
already reduced to the chart's resolution, the step starts, and the
allocation totals by site. Memory is bounded by the chart's resolution and
the number of sites, not by the events.

The chart's reduction is ``_svg.downsample``'s (each time bucket's max and
last value), computed as the batches arrive: a series of at most
``2 * BUCKETS`` points is kept whole, as before; a longer one is bucketed
over the whole trace's time span (``downsample`` used the series' own span,
the same for the total).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._events import allocation_sums, merge_key_sums
from ._common import signed_sizes

__all__ = ["BUCKETS", "Timeline"]

BUCKETS = 1200  # _svg.downsample's default


class _Series:
    """One line of the chart: (t seconds, bytes) points, reduced as they come."""

    def __init__(self, t_end: float) -> None:
        self.t_end = t_end
        self.raw: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_raw = 0
        self.has: np.ndarray | None = None  # bucket mode once set

    def add(self, t: np.ndarray, y: np.ndarray) -> None:
        if not len(t):
            return
        if self.has is None:
            self.raw.append((t, y))
            self.n_raw += len(t)
            if self.n_raw <= 2 * BUCKETS:
                return
            self._to_buckets()
            return
        self._bucket(t, y)

    def _to_buckets(self) -> None:
        self.edges = np.linspace(0.0, self.t_end, BUCKETS + 1)
        self.has = np.zeros(BUCKETS, bool)
        self.first_t = np.zeros(BUCKETS)
        self.last_t = np.zeros(BUCKETS)
        self.max_y = np.zeros(BUCKETS)
        self.last_y = np.zeros(BUCKETS)
        raw, self.raw = self.raw, []
        for t, y in raw:
            self._bucket(t, y)

    def _bucket(self, t: np.ndarray, y: np.ndarray) -> None:
        assert self.has is not None
        idx = np.clip(np.searchsorted(self.edges, t, side="right") - 1, 0, BUCKETS - 1)
        starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
        lasts = np.r_[starts[1:] - 1, len(t) - 1]
        b = idx[starts]
        maxes = np.maximum.reduceat(y, starts)
        seen = self.has[b]
        self.first_t[b[~seen]] = t[starts][~seen]
        self.max_y[b] = np.where(seen, np.maximum(self.max_y[b], maxes), maxes)
        self.last_t[b], self.last_y[b] = t[lasts], y[lasts]
        self.has[b] = True

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        if self.has is None:
            if not self.raw:
                return np.zeros(0), np.zeros(0)
            return (np.concatenate([t for t, _ in self.raw]),
                    np.concatenate([y for _, y in self.raw]))
        bs = np.flatnonzero(self.has)
        t, y = np.empty(2 * len(bs)), np.empty(2 * len(bs))
        t[0::2], t[1::2] = self.first_t[bs], self.last_t[bs]
        y[0::2], y[1::2] = self.max_y[bs], self.last_y[bs]
        return t, y


class Timeline:
    """The report's view of every event (see the module doc): ``feed`` it the
    events in seq order, a batch at a time, then ``finish``; or ``of``."""

    def __init__(self, profiler: Any = None) -> None:
        self.n_events = 0
        self.series: list[tuple[str, np.ndarray, np.ndarray]] = []  # total first, then types
        self.step_starts: list[float] = []  # seconds since the first event
        self.site_sums: tuple[np.ndarray, np.ndarray, np.ndarray] = merge_key_sums([])
        self._profiler = profiler
        self._t0: int | None = None
        self._t_end = 0.0
        self._total: _Series | None = None
        self._by_type: dict[int, _Series] = {}
        self._offset: dict[int, float] = {}
        self._prev_step: int | None = None
        self._sums: list[Any] = []
        # A loaded trace's pass sums them already (the first read is its pass).
        self._own_sums = not getattr(profiler, "events_are_final", False)

    @classmethod
    def of(cls, profiler: Any) -> "Timeline":
        out = cls(profiler)
        for rows in profiler.iter_event_rows():
            out.feed(rows)
        return out.finish()

    def feed(self, rows: np.ndarray) -> None:
        """The next events (EVENT_DTYPE, by seq)."""
        if not len(rows):
            return
        p = self._profiler
        if self._t0 is None:
            self._t0 = int(rows["timestamp_ns"][0])
            last = p.read_rows(max(p.next_seq - 1, 0))
            self._t_end = ((int(last["timestamp_ns"][-1]) - self._t0) / 1e9 if len(last)
                           else 0.0)
            self._total = _Series(self._t_end)
        self.n_events += len(rows)
        t = (rows["timestamp_ns"].astype(np.int64) - self._t0) / 1e9
        self._total.add(t, (rows["total_allocated"].astype(np.int64)
                            - rows["total_freed"].astype(np.int64)).astype(np.float64))
        delta = signed_sizes(rows)
        # A type's line has every event of that type once any of them
        # moved memory (a later zero-size one included), as before.
        for type_id in np.unique(rows["type_id"][delta != 0]).tolist():
            if type_id not in self._by_type:
                self._by_type[type_id] = _Series(self._t_end)
                self._offset[type_id] = 0.0
        for type_id, series in self._by_type.items():
            mask = rows["type_id"] == type_id
            if not mask.any():
                continue
            y = self._offset[type_id] + np.cumsum(delta[mask]).astype(np.float64)
            self._offset[type_id] = float(y[-1])
            series.add(t[mask], y)
        steps = rows["step"]
        change = np.flatnonzero(np.r_[self._prev_step is not None and steps[0] != self._prev_step,
                                      steps[1:] != steps[:-1]])
        self.step_starts.extend(t[change].tolist())
        self._prev_step = int(steps[-1])
        if self._own_sums:
            self._sums.append(allocation_sums(rows))
        if len(self._sums) > 64:  # keep the per-batch sums few
            self._sums = [merge_key_sums(self._sums)]

    def finish(self) -> "Timeline":
        """Completes the lines and sums; returns self."""
        self.site_sums = (merge_key_sums(self._sums) if self._own_sums
                          else self._profiler.allocation_totals_by_stack())
        self._sums = []
        if self._total is not None:
            self.series.append(("total", *self._total.points()))
            # Types in type-id order, as np.unique gave them before.
            for type_id in sorted(self._by_type):
                self.series.append((self._profiler.type_name(type_id),
                                    *self._by_type[type_id].points()))
        return self
