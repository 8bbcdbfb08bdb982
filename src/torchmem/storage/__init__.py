"""Where traces go: in memory (default) or a durable SQLite file; ``load`` reads one back.

``load`` lives here, with the formats it reads: a sink may import the
profiler below it (``MemoryProfiler.from_trace``), never the other way round.
"""

from __future__ import annotations

import os
from typing import Any

from .._saved_trace import SavedTraceProfiler
from .base import StorageBackend, TraceFormatError, TraceLockedError, merge_deltas
from .memory import InMemoryStorage
from ._saved import SavedEvents
from .sqlite import SQLiteStorage, TraceReader

__all__ = [
    "InMemoryStorage",
    "SQLiteStorage",
    "StorageBackend",
    "TraceFormatError",
    "TraceLockedError",
    "TraceReader",
    "load",
    "merge_deltas",
]


def load(path: str | os.PathLike) -> Any:
    """Opens a saved SQLite trace as a read-only ``MemoryProfiler``.

    The result answers the same queries as the live profiler
    (get_statistics, get_events, get_allocations_since,
    detect_potential_leaks, live_allocations, resolve_stack) and carries the
    run metadata as ``trace_metadata`` and the file as ``trace_path``.
    A missing, foreign, corrupt or truncated file raises TraceFormatError
    with a one-line message. Nothing in the file is ever unpickled.

    Loading is lazy: it reads the metadata and the side tables (types,
    stacks, GC, snapshots, OOMs), never the events. Event queries read the
    range they need; the first query that needs the run's totals
    (statistics, live allocations, allocation sites) makes one pass over
    the events, in batches, in bounded memory. A corrupt event is then a
    TraceFormatError raised by that query. ``close()`` releases the file.
    """
    reader = TraceReader(path)
    try:
        side = reader.read_side()
        meta = reader.metadata
        events = SavedEvents(reader)
    except BaseException:
        reader.close()
        raise
    try:
        profiler = SavedTraceProfiler.from_saved(side, events, source=os.fspath(path))
    except (ValueError, TypeError, IndexError, OverflowError, AttributeError) as exc:
        reader.close()
        raise TraceFormatError(f"{os.fspath(path)}: corrupt trace ({' '.join(str(exc).split())})") \
            from None
    profiler.trace_metadata = meta
    profiler.trace_path = os.fspath(path)
    return profiler
