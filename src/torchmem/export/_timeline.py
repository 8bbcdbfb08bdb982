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
    """The report's view of every event (see the module doc)."""

    def __init__(self) -> None:
        self.n_events = 0
        self.series: list[tuple[str, np.ndarray, np.ndarray]] = []  # total first, then types
        self.step_starts: list[float] = []  # seconds since the first event
        self.site_sums: tuple[np.ndarray, np.ndarray, np.ndarray] = merge_key_sums([])

    @classmethod
    def of(cls, profiler: Any) -> "Timeline":
        out = cls()
        t0: int | None = None
        t_end = 0.0
        total = None
        by_type: dict[int, _Series] = {}
        offset: dict[int, float] = {}
        prev_step: int | None = None
        sums = []
        for rows in profiler.iter_event_rows():
            if t0 is None:
                t0 = int(rows["timestamp_ns"][0])
                last = profiler.read_rows(max(profiler.next_seq - 1, 0))
                t_end = ((int(last["timestamp_ns"][-1]) - t0) / 1e9 if len(last)
                         else 0.0)
                total = _Series(t_end)
            out.n_events += len(rows)
            t = (rows["timestamp_ns"].astype(np.int64) - t0) / 1e9
            total.add(t, (rows["total_allocated"].astype(np.int64)
                          - rows["total_freed"].astype(np.int64)).astype(np.float64))
            delta = signed_sizes(rows)
            # A type's line has every event of that type once any of them
            # moved memory (a later zero-size one included), as before.
            for type_id in np.unique(rows["type_id"][delta != 0]).tolist():
                if type_id not in by_type:
                    by_type[type_id] = _Series(t_end)
                    offset[type_id] = 0.0
            for type_id in by_type:
                mask = rows["type_id"] == type_id
                if not mask.any():
                    continue
                y = offset[type_id] + np.cumsum(delta[mask]).astype(np.float64)
                offset[type_id] = float(y[-1])
                by_type[type_id].add(t[mask], y)
            steps = rows["step"]
            change = np.flatnonzero(np.r_[prev_step is not None and steps[0] != prev_step,
                                          steps[1:] != steps[:-1]])
            out.step_starts.extend(t[change].tolist())
            prev_step = int(steps[-1])
            sums.append(allocation_sums(rows))
        out.site_sums = merge_key_sums(sums)
        if total is not None:
            out.series.append(("total", *total.points()))
            # Types in type-id order, as np.unique gave them before.
            for type_id in sorted(by_type):
                out.series.append((profiler.type_name(type_id), *by_type[type_id].points()))
        return out
