"""torchmem: a memory profiler for PyTorch training.

``torchmem.enable()`` at the top of a training script records every tensor
allocation and free; ``MemoryProfiler`` is the API behind it.
"""

from __future__ import annotations

import os as _os

from . import _recorder
from ._types import (
    Counters,
    Event,
    GCRecord,
    Leak,
    MemoryEvent,
    MemoryEventType,
    MemoryStatistics,
    OomEvent,
    Snapshot,
    StackTrace,
)
from ._session import disable, enable, get_profiler, is_enabled, trace_path
from .epoch import LeakError, epoch, epoch_results, mark_epoch
from .oom import oom_guard
from .profiler import MemoryProfiler
from .analysis import breakdown as _breakdown  # noqa: F401  (MemoryProfiler.breakdown)
from .publisher import EventPublisher
from .storage import InMemoryStorage, SQLiteStorage, TraceFormatError, load
from .trace import TraceDelta
from . import _compat  # noqa: F401  (deprecated MemoryProfiler methods)
from ._version import __version__

# Frames inside the package are torchmem's own machinery, never a user's
# allocation site.
_recorder.set_skip_prefixes([_os.path.dirname(_os.path.abspath(__file__)) + _os.sep])


__all__ = [
    "enable",
    "disable",
    "get_profiler",
    "is_enabled",
    "trace_path",
    "epoch",
    "mark_epoch",
    "epoch_results",
    "LeakError",
    "oom_guard",
    "Counters",
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
    "OomEvent",
    "Snapshot",
    "StackTrace",
    "TraceDelta",
]
