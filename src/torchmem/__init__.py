"""torchmem: a memory profiler for PyTorch training.

``torchmem.enable()`` at the top of a training script records every tensor
allocation and free; ``MemoryProfiler`` is the API behind it.
"""

from __future__ import annotations

import os as _os

from . import _native
from ._types import (
    Event,
    GCRecord,
    Leak,
    MemoryEvent,
    MemoryEventType,
    MemoryStatistics,
    Snapshot,
    StackTrace,
)
from ._session import disable, enable, get_profiler, is_enabled, trace_path
from .analysis.epoch import LeakError, epoch, mark_epoch
from .oom import oom_guard
from .profiler import MemoryProfiler
from .publisher import EventPublisher
from .storage import InMemoryStorage, SQLiteStorage, TraceFormatError, load
from .trace import TraceDelta

# Frames inside the package are torchmem's own machinery, never a user's
# allocation site.
_native.set_skip_prefixes([_os.path.dirname(_os.path.abspath(__file__)) + _os.sep])

__version__ = "0.1.0"

__all__ = [
    "enable",
    "disable",
    "get_profiler",
    "is_enabled",
    "trace_path",
    "epoch",
    "mark_epoch",
    "LeakError",
    "oom_guard",
    "Event",
    "EventPublisher",
    "InMemoryStorage",
    "SQLiteStorage",
    "TraceFormatError",
    "load",
    "GCRecord",
    "Leak",
    "MemoryEvent",
    "MemoryEventType",
    "MemoryProfiler",
    "MemoryStatistics",
    "Snapshot",
    "StackTrace",
    "TraceDelta",
]
