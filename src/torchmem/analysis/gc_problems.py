"""Garbage-collection problems: the patterns in a run's GC records worth telling a user about.

``find_gc_problems(profiler)`` reads the profiler's ``gc_records`` (recorded by
``torchmem.sources.gc_monitor``) and reports:

- ``frequent_gen2``: more than ``gen2_per_minute`` full (generation 2)
  collections per minute within some ``window_s`` window. A full collection
  walks every tracked object; many of them mean an explicit ``gc.collect()``
  in the loop or a flood of long-lived container objects.
- ``long_pause``: a collection that took longer than ``long_pause_ms``; the
  whole program (every thread holding the GIL) stood still that long.
- ``high_gc_time_share``: in some ``window_s`` window, GC ran for more than
  ``time_share`` of the window's wall time. The denominator is always the
  full window, so a run shorter than one window is judged against a whole
  window (never over-reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GCProblem",
    "find_gc_problems",
    "DEFAULT_GEN2_PER_MINUTE",
    "DEFAULT_LONG_PAUSE_MS",
    "DEFAULT_TIME_SHARE",
    "DEFAULT_WINDOW_S",
]

#: More full collections per minute than this is "frequent" (CPython's own
#: heuristics make a full collection every few minutes at most in a steady
#: training loop).
DEFAULT_GEN2_PER_MINUTE = 10.0
#: A pause longer than this (ms) is visible as a stall in a training step.
DEFAULT_LONG_PAUSE_MS = 100.0
#: GC taking more than this fraction of wall time in a window is a problem.
DEFAULT_TIME_SHARE = 0.05
#: Length of the sliding window, in seconds, for the rate and share checks.
DEFAULT_WINDOW_S = 60.0

_NS = 1_000_000_000


@dataclass(frozen=True)
class GCProblem:
    """One finding of ``find_gc_problems``.

    ``value`` and ``threshold`` are in the unit of the kind: collections per
    minute (frequent_gen2), milliseconds (long_pause) or a fraction of wall
    time (high_gc_time_share). ``start_ns`` / ``end_ns`` bound the window or
    pause (time.time_ns scale); ``records`` are the collections involved.
    """

    kind: str
    message: str
    value: float
    threshold: float
    start_ns: int = 0
    end_ns: int = 0
    records: tuple = ()


def _window_max(records: Sequence[Any], window_ns: int, timed: bool) -> tuple[float, int, int]:
    """Busiest window [r.start_ns, r.start_ns + window_ns) over sorted records.

    Sums 1 per record (``timed`` False) or GC nanoseconds inside the window
    (``timed`` True: collections never overlap, so only the last one can
    straddle the window's end and is cut there). Returns (sum, first index,
    index past last). O(n) with prefix sums.
    """
    n = len(records)
    prefix = [0]
    for r in records:
        prefix.append(prefix[-1] + max(0, r.end_ns - r.start_ns))
    best = (0.0, 0, 0)
    j = 0
    for i in range(n):
        hi = records[i].start_ns + window_ns
        j = max(j, i)
        while j < n and records[j].start_ns < hi:
            j += 1
        if timed:
            last = records[j - 1]
            total = float(prefix[j - 1] - prefix[i]
                          + max(0, min(last.end_ns, hi) - last.start_ns))
        else:
            total = float(j - i)
        if total > best[0]:
            best = (total, i, j)
    return best


def find_gc_problems(
    source: Any,
    *,
    gen2_per_minute: float = DEFAULT_GEN2_PER_MINUTE,
    long_pause_ms: float = DEFAULT_LONG_PAUSE_MS,
    time_share: float = DEFAULT_TIME_SHARE,
    window_s: float = DEFAULT_WINDOW_S,
) -> list[GCProblem]:
    """Bad garbage-collection patterns of a profiler (its ``gc_records``).

    Args:
        source: a profiler, or a sequence of GCRecord-like objects (with
            generation, start_ns, end_ns, duration_ns).
        gen2_per_minute: rate of full collections above which they are
            "frequent" (counted in the busiest ``window_s`` window).
        long_pause_ms: duration above which one collection is a long pause.
        time_share: fraction (0..1) of a window's wall time spent in GC above
            which the share is high.
        window_s: sliding-window length in seconds for the two windowed checks.

    Returns at most one finding per kind (the worst), in the order
    frequent_gen2, long_pause, high_gc_time_share. Thresholds are strict:
    a value equal to its threshold is not a problem.
    """
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s!r}")
    for name, v in (("gen2_per_minute", gen2_per_minute), ("long_pause_ms", long_pause_ms),
                    ("time_share", time_share)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v!r}")
    records = source.gc_records if hasattr(source, "gc_records") else source
    recs = sorted(records, key=lambda r: r.start_ns)
    window_ns = int(window_s * _NS)
    problems: list[GCProblem] = []

    full = [r for r in recs if r.generation >= 2]
    if full:
        count, i, j = _window_max(full, window_ns, False)
        rate = count * 60.0 / window_s
        if rate > gen2_per_minute:
            chosen = tuple(full[i:j])
            problems.append(GCProblem(
                "frequent_gen2",
                f"{int(count)} full (generation 2) garbage collections within {window_s:g} s "
                f"({rate:.1f} per minute, threshold {gen2_per_minute:g}); each walks every "
                "tracked object. Look for gc.collect() in the training loop or many "
                "long-lived container objects (lists/dicts of tensors) created per step.",
                rate, float(gen2_per_minute), chosen[0].start_ns, chosen[-1].end_ns, chosen))

    if recs:
        worst = max(recs, key=lambda r: r.duration_ns)
        ms = worst.duration_ns / 1e6
        if ms > long_pause_ms:
            slow = tuple(r for r in recs if r.duration_ns / 1e6 > long_pause_ms)
            problems.append(GCProblem(
                "long_pause",
                f"{len(slow)} garbage collection(s) paused the program for more than "
                f"{long_pause_ms:g} ms; the longest, generation {worst.generation}, took "
                f"{ms:.1f} ms and collected {getattr(worst, 'collected', '?')} objects.",
                ms, float(long_pause_ms), worst.start_ns, worst.end_ns, slow))

        gc_ns, i, j = _window_max(recs, window_ns, True)
        share = gc_ns / window_ns
        if share > time_share:
            chosen = tuple(recs[i:j])
            problems.append(GCProblem(
                "high_gc_time_share",
                f"garbage collection took {share:.1%} of wall time in a {window_s:g} s window "
                f"({gc_ns / 1e6:.1f} ms over {len(chosen)} collections; threshold "
                f"{time_share:.1%}). Fewer short-lived container objects per step, or "
                "gc.freeze() after setup, reduce it.",
                share, float(time_share), chosen[0].start_ns,
                chosen[0].start_ns + window_ns, chosen))
    return problems
