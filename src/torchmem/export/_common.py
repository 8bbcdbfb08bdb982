"""What the exporters share: event kinds, signed sizes, progress (they read a
profiler's events with ``MemoryProfiler.iter_event_rows``, a batch at a time)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional


from .._types import MemoryEventType
from ..analysis.steps import signed_sizes  # noqa: F401  (the exporters' one definition)

#: progress(done, total) callback; exporters call it a few hundred times at most.
Progress = Optional[Callable[[int, int], None]]

ALLOC = int(MemoryEventType.ALLOCATION)
FREE = int(MemoryEventType.DEALLOCATION)
REALLOC = int(MemoryEventType.REALLOCATION)
SNAPSHOT = int(MemoryEventType.SNAPSHOT)
GC_START = int(MemoryEventType.GC_START)
GC_END = int(MemoryEventType.GC_END)
OOM = int(MemoryEventType.OUT_OF_MEMORY)


def chunks(n: int, progress: Progress, parts: int = 200):
    """Yields (start, stop) ranges over ``n`` items, reporting progress after each."""
    step = max(1, -(-n // parts))
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield start, stop
        if progress is not None:
            progress(stop, n)
    if n == 0 and progress is not None:
        progress(0, 0)


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal
    (or ``force``), at most every 0.1 s."""

    def __init__(self, label: str, force: bool = False, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}%")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
