"""Where traces go: in memory (default) or a durable SQLite file; ``load`` reads one back.

``load`` lives here, with the formats it reads: a sink may import the
profiler below it (``MemoryProfiler.from_trace``), never the other way round.
"""

from __future__ import annotations

import os
from typing import Any

from ..profiler import MemoryProfiler
from .base import StorageBackend, TraceFormatError, TraceLockedError, merge_deltas
from .memory import InMemoryStorage
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
    """
    with TraceReader(path) as reader:
        delta = reader.read_trace()
        meta = reader.metadata
    try:
        profiler = MemoryProfiler.from_trace(delta, source=os.fspath(path))
    except (ValueError, TypeError, IndexError, OverflowError, AttributeError) as exc:
        raise TraceFormatError(f"{os.fspath(path)}: corrupt trace ({' '.join(str(exc).split())})") \
            from None
    profiler.trace_metadata = meta
    profiler.trace_path = os.fspath(path)
    return profiler
