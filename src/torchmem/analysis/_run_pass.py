"""analysis.run_moments' first read of a run: the timeline's points (per bucket of
events, the first moment of the highest live bytes), every step's peak and
by-phase peaks (what analysis.steps.StepSeries gives, computed here for all
of a batch's steps at once: a Python loop per step cost 45 us a step, 7.7 s
on a 10M-event trace), each step's first event, and the moment
breakdown(at=step) names; kept as arrays, a few dozen bytes a step."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


__all__ = ["RunPass", "first_pass"]

_PHASES = ("forward", "backward", "optimizer", "other")
_STEP = np.dtype([("step", "<i8"), ("peak_seq", "<i8"), ("peak_bytes", "<i8"),
                  ("phase_bytes", "<i8", (len(_PHASES),))])  # -1: the phase was not entered
_HIGH = np.dtype([("key", "<i8"), ("usage", "<i8"), ("seq", "<i8"), ("timestamp_ns", "<i8"),
                  ("step", "<i8")])


def _run_starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal ``keys`` begins (``keys`` not empty)."""
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


def _first_at_max(values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run beginning at ``starts``: its largest value, and the index of the first
    value equal to it."""
    maxes = np.maximum.reduceat(values, starts)
    at_max = np.flatnonzero(values == np.repeat(maxes, np.diff(np.r_[starts, len(values)])))
    return maxes, at_max[np.searchsorted(at_max, starts)]


class _Highest:
    """Per key (keys come in runs, in seq order), the first event of the highest
    live bytes, as arrays (a few bytes per key, whatever the number of keys)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def feed(self, keys: np.ndarray, usage: np.ndarray, rows: np.ndarray) -> None:
        starts = _run_starts(keys)
        maxes, first = _first_at_max(usage, starts)
        out = np.zeros(len(starts), _HIGH)
        out["key"], out["usage"] = keys[starts], maxes
        for name in ("seq", "timestamp_ns", "step"):
            out[name] = rows[name][first]
        if self.chunks and len(self.chunks[-1]) and self.chunks[-1]["key"][-1] == out["key"][0]:
            prev = self.chunks[-1]  # a key that goes on from the previous batch
            if out["usage"][0] > prev["usage"][-1]:
                prev[-1] = out[0]
            out = out[1:]
        self.chunks.append(out)

    def array(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, _HIGH)


class RunPass:
    """The first read: the moments (analysis.run_moments' module doc)."""

    def __init__(self, profiler: Any, points: int) -> None:
        self.points = points
        self.profiler = profiler
        self._steps: list[np.ndarray] = []  # _STEP chunks
        self._step_first: list[np.ndarray] = []  # (step, its first seq) chunks
        self.steps = np.zeros(0, _STEP)
        self.step_first = np.zeros((0, 2), np.int64)
        self.first = -1
        self.last = -1
        self.n = 0
        self.edges: np.ndarray | None = None
        self.buckets = _Highest()  # per bucket of events: the timeline's points
        self.step_best = _Highest()  # per step: breakdown(at=step)'s moment

    def feed(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        if self.first < 0:
            self.first = int(rows["seq"][0])
            total = max(int(self.profiler.next_seq) - self.first, len(rows))
            self.edges = (np.arange(total + 1) if total <= self.points
                          else np.linspace(0, total, self.points + 1).astype(np.int64))
        self.n += len(rows)
        self.last = int(rows["seq"][-1])
        steps = rows["step"].astype(np.int64)
        if (self._steps and steps[0] < self._steps[-1]["step"][-1]) or (
                len(steps) > 1 and (np.diff(steps) < 0).any()):
            raise ValueError("event rows must be fed in seq order (steps never decrease)")
        change = np.flatnonzero(np.r_[not self._step_first
                                      or steps[0] != self._step_first[-1][-1, 0],
                                      steps[1:] != steps[:-1]])
        if len(change):
            self._step_first.append(np.stack([steps[change],
                                              rows["seq"][change].astype(np.int64)], axis=1))
        usage = rows["total_allocated"].astype(np.int64) - rows["total_freed"].astype(np.int64)
        idx = rows["seq"].astype(np.int64) - self.first
        bucket = np.clip(np.searchsorted(self.edges, idx, side="right") - 1, 0,
                         len(self.edges) - 2)
        self.buckets.feed(bucket, usage, rows)
        self.step_best.feed(steps, usage, rows)
        self._steps.append(_step_peaks(rows, steps, usage, self._phase_codes(rows)))

    def _phase_codes(self, rows: np.ndarray) -> np.ndarray:
        """Each row's phase as an index into _PHASES (len(_PHASES) for another name)."""
        uniq, inverse = np.unique(rows["context_id"], return_inverse=True)
        names = [self.profiler.resolve_context(int(c))[1] for c in uniq.tolist()]
        codes = np.array([_PHASES.index(n) if n in _PHASES else len(_PHASES) for n in names],
                         np.int64)
        return codes[inverse.reshape(-1)]

    def finish(self) -> None:
        if self._steps:
            self.steps = _merge_steps(np.concatenate(self._steps))
        if self._step_first:
            self.step_first = np.concatenate(self._step_first)
        self._steps, self._step_first = [], []

    def by_phase(self, i: int) -> dict[str, int]:
        """Step ``i``'s peak_by_phase."""
        return {ph: int(v) for ph, v in zip(_PHASES, self.steps["phase_bytes"][i].tolist())
                if v >= 0}

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq, timestamp_ns, step) of the timeline's points."""
        pts = self.buckets.array()
        return pts["seq"].copy(), pts["timestamp_ns"].copy(), pts["step"].copy()

    def boxes(self, max_steps: int) -> list[tuple[int, int, int, int, int]]:
        """(first seq, end seq, first step, last step, index into steps of the peak)."""
        n = len(self.steps)
        if not n:
            return []
        group = -(-n // max_steps)
        firsts = self.step_first
        out = []
        for g in range(0, n, group):
            end = min(g + group, n)
            top = g + int(np.argmax(self.steps["peak_bytes"][g:end]))  # the first highest
            step0 = int(self.steps["step"][g])
            k = int(np.searchsorted(firsts[:, 0], step0))
            first_seq = (int(firsts[k, 1]) if k < len(firsts) and firsts[k, 0] == step0
                         else int(self.steps["peak_seq"][g]))
            out.append([first_seq, 0, step0, int(self.steps["step"][end - 1]), top])
        for a, b in zip(out, out[1:]):
            a[1] = b[0]
        out[-1][1] = self.last + 1
        return [tuple(b) for b in out]


def _step_peaks(rows: np.ndarray, steps: np.ndarray, usage: np.ndarray,
                phases: np.ndarray) -> np.ndarray:
    """Per run of one step in the batch: its peak (live bytes after an event), the seq
    of the first event at it, and the peak after the events of each phase
    (-1 where none); a step cut by the batch's edge is joined by _merge_steps."""
    starts = _run_starts(steps)
    peaks, first = _first_at_max(usage, starts)
    out = np.zeros(len(starts), _STEP)
    out["step"], out["peak_bytes"] = steps[starts], peaks
    out["peak_seq"] = rows["seq"][first]
    run = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(steps)]))
    low = np.iinfo(np.int64).min
    by_phase = np.full((len(starts), len(_PHASES)), low, np.int64)
    for k in range(len(_PHASES)):
        mask = phases == k
        if mask.any():
            np.maximum.at(by_phase[:, k], run[mask], usage[mask])
    out["phase_bytes"] = np.where(by_phase == low, -1, by_phase)
    return out


def _merge_steps(parts: np.ndarray) -> np.ndarray:
    """One _STEP record per step from runs in order (a step's runs are adjacent)."""
    starts = _run_starts(parts["step"])
    if len(starts) == len(parts):
        return parts
    _, first = _first_at_max(parts["peak_bytes"], starts)  # the earliest run at the peak
    out = parts[first].copy()
    out["phase_bytes"] = np.maximum.reduceat(parts["phase_bytes"], starts, axis=0)
    return out


def first_pass(p: Any, points: int, batch: int,
               on_rows: Callable[[np.ndarray], None] | None = None) -> RunPass:
    """Every event of ``p`` read once, ``batch`` at a time, into a RunPass
    (``points``: the timeline's); ``on_rows`` gets each batch too."""
    p.flush()
    pass1 = RunPass(p, points)
    for rows in p.iter_event_rows(batch):
        pass1.feed(rows)
        if on_rows is not None:
            on_rows(rows)
    pass1.finish()
    return pass1
