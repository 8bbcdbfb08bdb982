"""A saved trace's events, read from the file a range at a time when a query asks.

``load`` hands a ``SavedEvents`` to ``SavedTraceProfiler.from_saved``: the
profiler reads events by seq range, step or time from it, and makes its one
pass over every event (statistics, live allocations, allocation totals by
site) in batches of ``BATCH`` events, so memory stays bounded whatever the
trace's size. Every problem in the file is a one-line TraceFormatError,
raised by the query that read it.
"""

from __future__ import annotations

import threading
from typing import Iterator, NoReturn

import numpy as np

from .base import TraceFormatError
from ._sqlite_schema import TraceReader, one_line

__all__ = ["SavedEvents"]

#: Events per batch of the profiler's pass (80 bytes each as rows).
BATCH = 1 << 16


class SavedEvents:
    """The events of one open trace file (``reader``), by seq range or filter.

    ``end_seq`` is fixed when the trace is opened: events a live writer adds
    later are not part of this view.
    """

    def __init__(self, reader: TraceReader) -> None:
        self._reader = reader
        self._lock = threading.Lock()  # one sqlite3 connection, any thread
        self.path = reader.path
        self.end_seq = reader.end_seq()

    def read(self, *, from_seq: int = 0, before_seq: int | None = None,
             start_step: int | None = None, end_step: int | None = None,
             since_ns: int | None = None) -> np.ndarray:
        """Events with ``from_seq <= seq < before_seq`` (default: to ``end_seq``)
        matching the filters (steps inclusive, time in epoch ns), by seq."""
        before = self.end_seq if before_seq is None else min(int(before_seq), self.end_seq)
        if from_seq >= before:
            from .._events import empty_events
            return empty_events()
        with self._lock:
            return self._reader.read_seq_range(from_seq, before, start_step=start_step,
                                               end_step=end_step, since_ns=since_ns)

    def batches(self, batch: int | None = None) -> Iterator[np.ndarray]:
        """Every event, by seq, ``batch`` seqs at a time (a gap in the seqs,
        which only a damaged file has, is skipped, not walked)."""
        batch = batch or BATCH
        start = 0
        while start < self.end_seq:
            rows = self.read(from_seq=start, before_seq=start + batch)
            if len(rows):
                yield rows
                start += batch
                continue
            with self._lock:
                nxt = self._reader.first_seq_from(start + batch)
            if nxt is None:
                return
            start = nxt

    def fail(self, exc: BaseException) -> NoReturn:
        """Raises the one-line TraceFormatError for content no recorder wrote."""
        raise TraceFormatError(f"{self.path}: corrupt trace ({one_line(exc)})") from None

    def close(self) -> None:
        with self._lock:
            self._reader.close()
