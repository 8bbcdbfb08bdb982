"""The storage protocol, the error for unreadable traces, and delta merging.

A storage backend receives every ``TraceDelta`` the profiler's pump hands
it (``append``), answers queries for events older than the profiler's
in-memory retention (``read_events``) and gives the whole trace back as one
delta (``read_trace``) for ``MemoryProfiler.from_trace``.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

import numpy as np

from .._events import EVENT_DTYPE, STACK_NODE_DTYPE, empty_events
from ..trace import TraceDelta

__all__ = ["StorageBackend", "TraceFormatError", "TraceLockedError", "merge_deltas",
           "select_events"]


class TraceFormatError(Exception):
    """A file is missing, not a torchmem trace, corrupt or truncated.

    ``str(error)`` is one line naming the file and what is wrong with it.
    """


class TraceLockedError(FileExistsError):
    """A trace file is being written by another writer (in this process or another),
    so it cannot be written, or replaced (``overwrite=True``), now.

    A FileExistsError, so code that caught "the file exists" still does;
    ``str(error)`` names the file and, when known, the writer's pid.
    """


@runtime_checkable
class StorageBackend(Protocol):
    """Where a profiler's events go besides its in-memory ring.

    Backends must never raise into the training run from ``append``: a
    write error is reported once and the backend stops storing.
    """

    def open(self, metadata: dict[str, Any]) -> None:
        """Records run metadata (torch version, devices, start time, settings).

        May be called again while the run lasts: each call adds or replaces
        keys (the epoch check keeps its results under ``epoch_checks``).
        """

    def append(self, delta: TraceDelta) -> None:
        """Stores everything new in ``delta`` (called every flush interval).

        Optional: a backend class may also define
        ``append_from_recorder(profiler, start_seq, end_seq, delta)``, which
        the pump then calls instead: the events are [start_seq, end_seq) of
        ``profiler``, read from the recorder by the backend; the delta gives
        the side records (and, when a publisher needed them, the events as
        rows, to be ignored). See SQLiteStorage.
        """

    def read_events(self, *, before_seq: int, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Stored events with ``seq < before_seq``, filtered, as an EVENT_DTYPE array by seq.

        Steps are inclusive; ``since_ns`` keeps events at or after that
        wall-clock time (ns since the epoch).
        """

    def read_trace(self) -> TraceDelta:
        """Everything stored, as one delta starting at seq 0.

        Optional: a backend class may also define
        ``read_side_records(kind, start, end)`` (``"marks"``, ``"gc"``,
        ``"snapshots"``: the records with index in [start, end); marks as a
        MARK_DTYPE array, the others as lists); a live profiler then keeps only the latest
        of those in memory once the backend has them, and reads the rest
        back (SQLiteStorage, InMemoryStorage).
        """

    @property
    def metadata(self) -> dict[str, Any]:
        """The run metadata given to ``open``."""

    def flush(self) -> None:
        """Blocks until everything appended so far is stored."""

    def close(self) -> None:
        """Flushes and releases the backend; later appends are ignored."""


def select_events(events: np.ndarray, *, before_seq: int, start_step: int | None = None,
                  end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
    """The rows of ``events`` that ``StorageBackend.read_events`` would return."""
    keep = events["seq"] < np.uint64(before_seq)
    if start_step is not None:
        keep &= events["step"] >= np.uint64(start_step)
    if end_step is not None:
        keep &= events["step"] <= np.uint64(end_step)
    if since_ns is not None:
        keep &= events["timestamp_ns"] >= np.int64(since_ns)
    return events[keep]


def merge_deltas(deltas: Iterable[TraceDelta]) -> TraceDelta:
    """One delta holding all of ``deltas`` (consecutive, oldest first).

    Frames, stack nodes and side records are placed by their start index,
    so a delta that repeats entries (it never should) cannot shift the rest.
    """
    events: list[np.ndarray] = []
    frames: list[tuple[str, int, str]] = []
    nodes: list[np.ndarray] = []
    n_nodes = 0
    contexts: list[tuple[str, str]] = []
    marks: list[Any] = []
    gc: list[Any] = []
    snaps: list[Any] = []
    ooms: list[Any] = []
    out = TraceDelta()
    for d in deltas:
        if len(d.events):
            events.append(np.asarray(d.events, dtype=EVENT_DTYPE))
        if len(d.type_names) >= len(out.type_names):
            out.type_names = list(d.type_names)
        del frames[d.frames_start:]
        frames.extend(tuple(f) for f in d.frames)
        if len(d.stack_nodes):
            start = d.nodes_start
            if start < n_nodes:  # overlap: cut what we had from ``start`` on
                keep, acc = [], 0
                for chunk in nodes:
                    take = max(0, min(len(chunk), start - acc))
                    if take:
                        keep.append(chunk[:take])
                    acc += len(chunk)
                nodes, n_nodes = keep, start
            elif start > n_nodes:  # a gap (node 0, the root, is implicit)
                nodes.append(np.zeros(start - n_nodes, STACK_NODE_DTYPE))
                n_nodes = start
            nodes.append(np.asarray(d.stack_nodes, dtype=STACK_NODE_DTYPE))
            n_nodes += len(d.stack_nodes)
        del contexts[d.contexts_start:]
        contexts.extend(d.contexts)
        del marks[d.marks_start:]
        marks.extend(d.marks)
        del gc[d.gc_start:]
        gc.extend(d.gc_records)
        del snaps[d.snapshots_start:]
        snaps.extend(d.snapshots)
        del ooms[d.ooms_start:]
        ooms.extend(d.ooms)
        if d.anomalies:
            out.anomalies = dict(d.anomalies)
        if d.anomaly_examples:
            out.anomaly_examples = list(d.anomaly_examples)
    out.events = np.concatenate(events) if events else empty_events()
    out.frames = frames
    out.stack_nodes = (np.concatenate(nodes) if nodes
                       else np.zeros(0, STACK_NODE_DTYPE))
    out.gc_records, out.snapshots, out.ooms = gc, snaps, ooms
    out.contexts, out.marks = contexts, marks
    return out
