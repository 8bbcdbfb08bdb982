"""InMemoryStorage: keeps every delta in this process (the default backend)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .._contexts import marks_array
from .._events import empty_events
from ..trace import TraceDelta
from .base import merge_deltas, select_events

__all__ = ["InMemoryStorage"]


class InMemoryStorage:
    """Holds the whole trace in memory: unbounded, gone with the process.

    Useful to keep every event of a short run beyond the recorder's
    retention, and as the reference the SQLite backend is tested against.
    Costs 80 bytes per event plus the side records.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deltas: list[TraceDelta] = []
        self._merged: TraceDelta | None = None
        self._metadata: dict[str, Any] = {}
        self.closed = False

    def open(self, metadata: dict[str, Any] | None = None) -> None:
        """Records run metadata (a JSON-like dict); later calls add or replace keys."""
        with self._lock:
            self._metadata.update(metadata or {})

    @property
    def metadata(self) -> dict[str, Any]:
        """The run metadata given to ``open``."""
        return dict(self._metadata)

    def append(self, delta: TraceDelta) -> None:
        """Keeps ``delta`` (its arrays are copied: the recorder may reuse them)."""
        if self.closed:
            return
        copy = TraceDelta(**{**delta.__dict__, "events": np.array(delta.events, copy=True),
                             "stack_nodes": np.array(delta.stack_nodes, copy=True)})
        with self._lock:
            self._deltas.append(copy)
            self._merged = None

    def _all(self) -> TraceDelta:
        with self._lock:
            if self._merged is None:
                # Merge once and keep the result as the only delta, so repeated
                # queries cost one concatenation, not one per flush.
                self._merged = merge_deltas(self._deltas)
                self._deltas = [self._merged]
            return self._merged

    def read_events(self, *, before_seq: int, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Stored events with ``seq < before_seq`` matching the filters, by seq."""
        events = self._all().events
        if not len(events):
            return empty_events()
        return select_events(events, before_seq=before_seq, start_step=start_step,
                             end_step=end_step, since_ns=since_ns)

    def read_side_records(self, kind: str, start: int, end: int) -> Any:
        """Stored side records with index in [start, end): ``"marks"`` as a
        MARK_DTYPE array, ``"gc"`` a list of GCRecords, ``"snapshots"`` of
        Snapshots (see SQLiteStorage.read_side_records)."""
        d = self._all()
        if kind == "marks":
            return marks_array(d.marks[start:end])
        records = d.gc_records if kind == "gc" else d.snapshots
        return list(records[start:end])

    def read_trace(self) -> TraceDelta:
        """Everything stored, as one delta."""
        return self._all()

    def flush(self) -> None:
        """Nothing to do: appends are stored at once."""

    def close(self) -> None:
        """Stops storing; what is held stays readable."""
        self.closed = True
