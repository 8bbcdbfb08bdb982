"""Memory per training step: live bytes at each step's end and its peak, by type and device.

The event log carries the step of every event and the running totals, so a
step's figures come from its rows alone: its peak is the highest live bytes
after any of its events (trace-format.md's "peak per step", and the moment
``MemoryProfiler.breakdown(at=step)`` describes). Per allocation type and
device the running usage is the cumulative sum of the signed sizes of that
pair's events, and a pair's peak is its highest level after any event of the
step. Both are exact: they are the counters the recorder kept, at each
event.

Each step's peak is also split by phase (the highest live bytes after its
forward, backward, optimizer and other events, from the context id every
event carries) and located (the seq and time of the first event that reached
it), so ``MemoryProfiler.step_peaks`` and ``peak_report`` are these records.

``StepSeries`` turns rows fed in seq order (from the first event of the
trace) into one ``StepMemory`` per step; ``step_memory`` does it for a
whole profiler; ``StepTracker`` for a running one, between steps. The
TensorBoard export, the framework callbacks and the peak report are built
on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .._events import TYPE_NONE
from .._types import GCRecord, MemoryEventType
from .categories import CATEGORIES

__all__ = ["StepMemory", "StepSeries", "StepTracker", "signed_sizes", "step_categories",
           "step_memory"]

_ALLOC = (int(MemoryEventType.ALLOCATION), int(MemoryEventType.REALLOCATION))
_FREE = int(MemoryEventType.DEALLOCATION)


def signed_sizes(rows: np.ndarray) -> np.ndarray:
    """+size for allocations and reallocations, -size for frees, 0 for markers (int64)."""
    kind = rows["kind"]
    size = rows["size"].astype(np.int64)
    return np.where(np.isin(kind, _ALLOC), size, np.where(kind == _FREE, -size, 0))


def step_categories(profiler: Any, step: int) -> dict[str, int] | None:
    """Live bytes by category at the peak of ``step`` (``breakdown(by="category", at=step)``),
    every category named (0 when it holds nothing, so each one's series has a
    point at every step), or None for a profiler that cannot attribute memory
    to categories."""
    breakdown = getattr(profiler, "breakdown", None)
    if breakdown is None:
        return None
    out = dict.fromkeys(CATEGORIES, 0)
    out.update((str(k), int(v)) for k, v in breakdown(by="category", at=step).items())
    return out


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training step (sizes in bytes, times in ns since the epoch).

    ``current_bytes`` is what was live after the step's last event,
    ``peak_bytes`` the highest live bytes after any of its events: first
    reached after event ``peak_seq`` at ``peak_timestamp_ns``;
    ``peak_by_phase`` the highest after its events of each phase
    (``forward``, ``backward``, ``optimizer``, ``other``; a phase the step
    did not enter is absent). The two dicts map
    (allocation type, device) (device -1 = host) to the same figures for
    that pair, for every pair seen up to this step. ``gc_count`` and
    ``gc_time_ns`` are the garbage collections that ended in this step.
    """

    step: int
    current_bytes: int
    peak_bytes: int
    current_by_type_device: dict[tuple[str, int], int] = field(default_factory=dict)
    peak_by_type_device: dict[tuple[str, int], int] = field(default_factory=dict)
    allocation_count: int = 0
    first_timestamp_ns: int = 0
    last_timestamp_ns: int = 0
    gc_count: int = 0
    gc_time_ns: int = 0
    peak_seq: int = -1
    peak_timestamp_ns: int = 0
    peak_by_phase: dict[str, int] = field(default_factory=dict)


class _Step:
    """A step being accumulated (it may span several batches of rows)."""

    def __init__(self, step: int, pairs: dict[int, int], ts: int) -> None:
        self.step = step
        self.peak = 0
        self.current = 0
        self.pair_peak: dict[int, int] = {}
        self.pair_current = dict(pairs)
        self.allocations = 0
        self.first_ts = ts
        self.last_ts = ts
        self.peak_seq = -1
        self.peak_ts = 0
        self.by_phase: dict[str, int] = {}


class StepSeries:
    """One StepMemory per step, from event rows fed in seq order.

    Feed every row from the trace's first on (the per-type-and-device usage
    is a running sum). A step is complete once a row of a later step
    arrives, or at ``close_through`` / ``finish``.

    Args:
        type_name: the allocation type's name for a type id
            (``profiler.type_name``).
        context: ``(module, phase)`` of a context id
            (``profiler.resolve_context``); without it every event's phase
            is ``other``.
    """

    def __init__(self, type_name: Callable[[int], str],
                 context: Callable[[int], tuple[str, str]] | None = None) -> None:
        self._type_name = type_name
        self._context = context
        self._pairs: dict[int, int] = {}  # pair key -> live bytes now
        self._open: _Step | None = None
        self._last_step = -1
        self._gc: dict[int, list[int]] = {}  # step -> [count, total ns]

    def add_gc(self, records: Iterable[GCRecord]) -> None:
        """Counts garbage collections into the step they ended in (call before
        feeding that step's rows)."""
        for r in records:
            tally = self._gc.setdefault(int(r.step), [0, 0])
            tally[0] += 1
            tally[1] += int(r.duration_ns)

    def feed(self, rows: np.ndarray) -> list[StepMemory]:
        """Takes the next rows (EVENT_DTYPE, by seq); returns the steps they completed."""
        n = len(rows)
        if not n:
            return []
        steps = rows["step"].astype(np.int64)
        if steps[0] < self._last_step or (n > 1 and (np.diff(steps) < 0).any()):
            raise ValueError("event rows must be fed in seq order (steps never decrease)")
        kind = rows["kind"]
        signed = signed_sizes(rows)
        after = (rows["total_allocated"] - rows["total_freed"]).astype(np.int64)
        starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        ends = np.r_[starts[1:], n]
        seg_peak = np.maximum.reduceat(after, starts)
        seg_allocs = np.add.reduceat(np.isin(kind, _ALLOC).astype(np.int64), starts)
        continued = self._open is not None and self._open.step == int(steps[0])
        pair_segs = self._pair_segments(rows, signed, starts, continued)
        ts = rows["timestamp_ns"]
        seqs = rows["seq"]
        phases = self._phases(rows)
        done: list[StepMemory] = []
        for j, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            step = int(steps[a])
            acc = self._open
            if acc is None or acc.step != step:
                if acc is not None:
                    done.append(self._emit(acc))
                acc = self._open = _Step(step, self._pairs, int(ts[a]))
            if acc.peak_seq < 0 or int(seg_peak[j]) > acc.peak:  # the first event at it
                i = a + int(np.argmax(after[a:b]))
                acc.peak, acc.peak_seq, acc.peak_ts = int(seg_peak[j]), int(seqs[i]), int(ts[i])
            seg_after, seg_phase = after[a:b], phases[a:b]
            for name in np.unique(seg_phase).tolist():
                top = int(seg_after[seg_phase == name].max())
                acc.by_phase[name] = max(acc.by_phase.get(name, top), top)
            acc.current = int(after[b - 1])
            acc.allocations += int(seg_allocs[j])
            acc.last_ts = int(ts[b - 1])
            touched = pair_segs[j]
            for key, level in self._pairs.items():
                if key not in touched:  # no event of its own: its level all along
                    acc.pair_peak[key] = max(acc.pair_peak.get(key, 0), level)
            for key, (peak, last) in touched.items():
                acc.pair_peak[key] = max(acc.pair_peak.get(key, 0), peak)
                self._pairs[key] = last
            acc.pair_current = dict(self._pairs)
            self._last_step = step
        return done

    def _phases(self, rows: np.ndarray) -> np.ndarray:
        """The phase name of each row's context."""
        if self._context is None:
            return np.full(len(rows), "other", dtype=object)
        ctx = rows["context_id"]
        uniq, inverse = np.unique(ctx, return_inverse=True)
        names = np.array([self._context(int(c))[1] for c in uniq.tolist()], dtype=object)
        return names[inverse.reshape(-1)]

    def close_through(self, step: int) -> list[StepMemory]:
        """Completes the open step if it is ``step`` or earlier (no more rows of it will come)."""
        if self._open is not None and self._open.step <= step:
            acc, self._open = self._open, None
            return [self._emit(acc)]
        return []

    def finish(self) -> list[StepMemory]:
        """Completes the open step (the trace ended)."""
        return self.close_through(2**63)

    def _pair_segments(self, rows: np.ndarray, signed: np.ndarray, starts: np.ndarray,
                       continued: bool) -> list[dict[int, tuple[int, int]]]:
        """Per segment (step) of the batch: pair key -> (peak, last usage) of the pairs it
        touched. A pair's level before its first event of the segment counts when
        another pair's event came first (it was the pair's level after that one);
        ``continued``: the first segment goes on with a step of earlier rows."""
        out: list[dict[int, tuple[int, int]]] = [{} for _ in range(len(starts))]
        valid = (rows["type_id"] != TYPE_NONE) & (signed != 0)
        if not valid.any():
            return out
        keys = (rows["type_id"].astype(np.int64) << 16) | (rows["device"].astype(np.int64) + 1)
        for key in np.unique(keys[valid]).tolist():
            idx = np.flatnonzero(valid & (keys == key))
            d = signed[idx]
            usage = self._pairs.get(key, 0) + np.cumsum(d)
            seg = np.searchsorted(starts, idx, side="right") - 1
            seg_ids, first = np.unique(seg, return_index=True)
            peaks = np.maximum.reduceat(usage, first)
            befores = usage[first] - d[first]
            later = idx[first] > starts[seg_ids]  # not the step's first event
            if continued:
                later |= seg_ids == 0
            lasts = usage[np.r_[first[1:], len(idx)] - 1]
            for s, pk, bf, lt, last in zip(seg_ids.tolist(), peaks.tolist(), befores.tolist(),
                                           later.tolist(), lasts.tolist()):
                out[s][key] = (max(pk, bf) if lt else pk, last)
        return out

    def _emit(self, acc: _Step) -> StepMemory:
        def named(d: dict[int, int]) -> dict[tuple[str, int], int]:
            return {(self._type_name(k >> 16), (k & 0xFFFF) - 1): int(v)
                    for k, v in sorted(d.items())}

        gc_count, gc_ns = self._gc.pop(acc.step, (0, 0))
        order = ("forward", "backward", "optimizer", "other")
        by_phase = {k: acc.by_phase[k] for k in sorted(acc.by_phase, key=lambda k: (
            order.index(k) if k in order else len(order), k))}
        return StepMemory(acc.step, acc.current, acc.peak, named(acc.pair_current),
                          named(acc.pair_peak), acc.allocations, acc.first_ts, acc.last_ts,
                          gc_count, gc_ns, acc.peak_seq, acc.peak_ts, by_phase)


def step_memory(profiler: Any, *, steps_per_read: int = 256) -> Iterator[StepMemory]:
    """Every step of ``profiler`` (live or loaded), oldest first.

    Rows are read ``steps_per_read`` steps at a time, so memory is bounded
    by the events of that many steps, not by the trace.
    """
    series = StepSeries(profiler.type_name, profiler.resolve_context)
    series.add_gc(profiler.gc_records)
    last = profiler.current_step
    for a in range(0, last + 1, steps_per_read):
        yield from series.feed(profiler.get_event_rows(a, min(a + steps_per_read - 1, last)))
    yield from series.finish()


class StepTracker:
    """Per-step memory of a running profiler, read between steps.

    ``update()``, called from the training thread (a callback at a batch's
    end), returns the steps finished since the last call: every step below
    ``profiler.current_step``. The first call reads the run from its first
    step.
    """

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self._series = StepSeries(profiler.type_name, profiler.resolve_context)
        self._next_step = 0
        self._gc_seen = 0

    def update(self, final: bool = False) -> list[StepMemory]:
        """The steps completed since the previous call, oldest first.

        ``final=True`` also ends the step in progress (training is over: its
        events so far are all it has); later calls return nothing.
        """
        prof = self.profiler
        if self._next_step < 0:
            return []
        end = prof.current_step if final else prof.current_step - 1
        if end < self._next_step:
            return []
        records = prof.gc_records
        self._series.add_gc(records[self._gc_seen:])
        self._gc_seen = len(records)
        out = self._series.feed(prof.get_event_rows(self._next_step, end))
        out += self._series.close_through(end)
        self._next_step = -1 if final else end + 1
        return out
