"""The figures of a trace being written, brought up to date at each ``refresh()``.

The trace is replayed into a read-only MemoryProfiler as it grows
(``from_trace`` once, ``extend_from_trace`` after), so every figure is the
one the training process's own profiler had at the same event: the same
counters, the same live allocations, the same sites.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._types import GCRecord
from ..analysis.sites import group_by_site, merge_by_label
from ..profiler import MemoryProfiler
from ..storage.base import TraceFormatError
from ..storage.follow import TraceFollower

__all__ = ["LiveFigures", "LiveTrace", "TypeDeviceRow"]

#: Trace time over which steps per second are measured (ns).
RATE_WINDOW_NS = 10 * 10**9


@dataclass(frozen=True)
class TypeDeviceRow:
    """Live and peak bytes of one allocation type on one device (-1 = host)."""

    allocation_type: str
    device: int
    current_bytes: int
    peak_bytes: int


@dataclass
class LiveFigures:
    """What the live view shows (sizes in bytes, times in ns)."""

    path: str
    state: str = "waiting"  # waiting | catching up | following | finished
    argv: list[str] = field(default_factory=list)
    events: int = 0
    step: int = 0
    steps_per_second: float | None = None
    start_ns: int | None = None
    last_event_ns: int | None = None
    current_bytes: int = 0
    peak_bytes: int = 0
    allocated_bytes: int = 0
    allocation_count: int = 0
    by_type_device: list[TypeDeviceRow] = field(default_factory=list)
    #: (site label, live bytes, live allocations), largest first.
    sites: list[tuple[str, int, int]] = field(default_factory=list)
    #: (module path, live bytes), largest first; None when the trace has no attribution.
    modules: list[tuple[str, int]] | None = None
    gc_count: int = 0
    gc_time_ns: int = 0
    gc_last: list[GCRecord] = field(default_factory=list)
    gc_longest: GCRecord | None = None
    #: The last epoch check (the trace's ``epoch_checks`` metadata), or None.
    epoch_check: dict[str, Any] | None = None
    anomalies: int = 0
    ooms: int = 0


class LiveTrace:
    """Follows the trace at ``path``; ``refresh()`` reads what is new and returns the figures.

    Args:
        path: the SQLite trace (it may not exist yet).
        top: how many sites and modules to keep.
        retention_events: events the replaying profiler keeps in memory (the
            figures need only its counters and live allocations).
        max_events: the most events read per refresh (a long trace is
            caught up over several).
    """

    def __init__(self, path: str | os.PathLike, *, top: int = 10,
                 retention_events: int = 1 << 20, max_events: int = 500_000) -> None:
        self.path = os.fspath(path)
        self.top = top
        self.follower = TraceFollower(self.path, max_events=max_events)
        self.retention_events = retention_events
        self.profiler: MemoryProfiler | None = None
        self._step_starts: collections.deque = collections.deque(maxlen=4096)
        self._last_ts: int | None = None
        self._last_step = -1
        self._anomalies: dict[str, int] = {}

    def refresh(self) -> LiveFigures:
        """Reads what was committed since the last refresh; the figures as of now."""
        delta = self.follower.poll()
        if delta is not None:
            try:
                if self.profiler is None:
                    self.profiler = MemoryProfiler.from_trace(
                        delta, retention_events=self.retention_events)
                else:
                    self.profiler.extend_from_trace(delta)
            except (ValueError, TypeError, IndexError, OverflowError) as exc:
                # As torchmem.load says it: content no recorder could have written.
                raise TraceFormatError(f"{self.path}: corrupt trace "
                                       f"({' '.join(str(exc).split())})") from None
            self._note_steps(delta.events)
            self._anomalies = dict(delta.anomalies)
        return self.figures()

    def _note_steps(self, events: np.ndarray) -> None:
        if not len(events):
            return
        steps = events["step"].astype(np.int64)
        ts = events["timestamp_ns"]
        new = np.flatnonzero(np.r_[steps[0] > self._last_step, steps[1:] > steps[:-1]])
        for i in new.tolist():
            self._step_starts.append((int(ts[i]), int(steps[i])))
        self._last_step = int(steps[-1])
        self._last_ts = int(ts[-1])

    def steps_per_second(self) -> float | None:
        """Steps started per second over the last RATE_WINDOW_NS of trace time (None: too few)."""
        if self._last_ts is None or not self._step_starts:
            return None
        window = [(t, s) for t, s in self._step_starts if t >= self._last_ts - RATE_WINDOW_NS]
        if len(window) < 2:
            return 0.0 if self._last_ts - self._step_starts[-1][0] >= RATE_WINDOW_NS else None
        (t0, s0), (_, s1) = window[0], window[-1]
        # Up to the latest event, not the latest step start: a run that
        # stopped stepping slows down on screen.
        span = self._last_ts - t0
        return (s1 - s0) * 1e9 / span if span > 0 else None

    def figures(self) -> LiveFigures:
        """The figures as of the last refresh."""
        f = LiveFigures(self.path)
        meta = self.follower.metadata
        prof = self.profiler
        if prof is None:
            return f
        f.state = ("finished" if self.follower.finished and self.follower.caught_up
                   else "following" if self.follower.caught_up else "catching up")
        argv = meta.get("argv")
        f.argv = [str(a) for a in argv] if isinstance(argv, list) else []
        f.events = self.follower.events_read
        f.step = prof.current_step
        f.steps_per_second = self.steps_per_second()
        start = meta.get("start_time_ns")
        f.start_ns = int(start) if isinstance(start, int) else None
        f.last_event_ns = self._last_ts
        stats = prof.get_statistics()
        f.current_bytes, f.peak_bytes = stats.current_usage_bytes, stats.peak_usage_bytes
        f.allocated_bytes, f.allocation_count = stats.total_allocated_bytes, stats.allocation_count
        f.by_type_device = [TypeDeviceRow(t, d, c.current_bytes, c.peak_bytes)
                            for (t, d), c in prof.counters_by_type_and_device().items()]
        f.sites = merge_by_label(group_by_site(prof).values())[:self.top]
        f.modules = self._modules(prof)
        records = prof.gc_records
        f.gc_count, f.gc_time_ns = len(records), sum(r.duration_ns for r in records)
        f.gc_last = records[-3:][::-1]
        f.gc_longest = max(records, key=lambda r: r.duration_ns) if records else None
        checks = meta.get("epoch_checks")
        f.epoch_check = checks[-1] if isinstance(checks, list) and checks \
            and isinstance(checks[-1], dict) else None
        f.anomalies = sum(self._anomalies.values())
        f.ooms = len(prof.oom_events)
        return f

    def _modules(self, prof: MemoryProfiler) -> list[tuple[str, int]] | None:
        breakdown = getattr(prof, "breakdown", None)
        if breakdown is None:
            return None
        by_module = breakdown(by="module", at="now")
        return sorted(((str(k), int(v)) for k, v in by_module.items() if v),
                      key=lambda kv: (-kv[1], kv[0]))[:self.top]

    def close(self) -> None:
        self.follower.close()
