"""The value types of torchmem's public API: events, statistics, stacks, leaks."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ._deprecation import warn_deprecated

__all__ = [
    "MemoryEventType",
    "Event",
    "MemoryEvent",
    "MemoryStatistics",
    "Counters",
    "OomEvent",
    "StackTrace",
    "Leak",
    "GCRecord",
    "Snapshot",
    "DeviceMemory",
    "NvmlUnavailable",
    "AnomalyReport",
]


class MemoryEventType(enum.IntEnum):
    """Kinds of events in the log; the values are the native event kinds."""

    ALLOCATION = 0
    DEALLOCATION = 1
    REALLOCATION = 2
    SNAPSHOT = 3
    GC_START = 4
    GC_END = 5
    OUT_OF_MEMORY = 6


@dataclass(frozen=True)
class StackTrace:
    """A captured Python stack.

    ``frames`` holds ``(filename, lineno, function)`` tuples, innermost
    (the code that allocated) first.
    """

    frames: tuple[tuple[str, int, str], ...]

    def format(self) -> str:
        """The stack as traceback-like text, innermost frame first."""
        return "\n".join(f'  File "{f}", line {line}, in {fn}' for f, line, fn in self.frames)

    @property
    def top(self) -> tuple[str, int, str] | None:
        """The innermost frame (often torch's own code; the allocation site, the
        user's line, is ``torchmem.analysis.sites.user_frame(stack)``)."""
        return self.frames[0] if self.frames else None

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True, kw_only=True)
class Event:
    """Anything that happened at a moment of a run.

    ``timestamp_ns`` is wall-clock nanoseconds (``time.time_ns`` scale),
    non-decreasing within a process; ``step`` is the training step.
    (``timestamp`` is the deprecated name of ``timestamp_ns``.)
    """

    timestamp_ns: int
    step: int = 0

    @property
    def timestamp(self) -> int:
        """Deprecated name of ``timestamp_ns``."""
        warn_deprecated("Event.timestamp", "Event.timestamp_ns")
        return self.timestamp_ns


@dataclass(frozen=True, kw_only=True)
class MemoryEvent(Event):
    """One allocation, free, reallocation, snapshot, GC or OOM event.

    Sizes are bytes. ``total_allocated_bytes`` and ``total_freed_bytes`` are
    the cumulative bytes allocated and freed when the event happened, so the
    usage at that moment is their difference (``total_free_bytes`` is the
    deprecated name of ``total_freed_bytes``). ``device`` is -1 for host
    memory. ``module`` and ``phase`` are what the recording thread was
    running (torchmem.sources.context: the module's path, "" for none; the
    phase "forward", "backward", "optimizer" or "other"). ``details`` holds
    what a snapshot, GC or OOM event adds.
    """

    event_type: MemoryEventType
    address: int = 0
    size_bytes: int = 0
    total_allocated_bytes: int = 0
    total_freed_bytes: int = 0
    allocation_type: str = "CPU"
    device: int = -1
    stream: int = 0
    thread_id: int = 0
    stack_trace: StackTrace | None = None
    module: str = ""
    phase: str = "other"
    details: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("size_bytes", "address", "total_allocated_bytes", "total_freed_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not isinstance(self.allocation_type, str):
            raise TypeError("allocation_type must be a str")
        object.__setattr__(self, "event_type", MemoryEventType(self.event_type))

    @property
    def current_usage_bytes(self) -> int:
        """Bytes live right after this event."""
        return self.total_allocated_bytes - self.total_freed_bytes

    @property
    def total_free_bytes(self) -> int:
        """Deprecated name of ``total_freed_bytes``."""
        warn_deprecated("MemoryEvent.total_free_bytes", "MemoryEvent.total_freed_bytes")
        return self.total_freed_bytes


def _accept_old_keywords(cls: type, renamed: dict[str, str]) -> None:
    """Lets ``cls(...)`` take the deprecated keyword names in ``renamed`` (old -> new)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for old, new in renamed.items():
            if old in kwargs:
                warn_deprecated(f"{cls.__name__}({old}=...)", f"{cls.__name__}({new}=...)")
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__


_accept_old_keywords(Event, {"timestamp": "timestamp_ns"})
_accept_old_keywords(MemoryEvent, {"timestamp": "timestamp_ns",
                                   "total_free_bytes": "total_freed_bytes"})


class Counters(NamedTuple):
    """One slice of the recorder's exact counters (bytes and counts)."""

    allocated_bytes: int = 0
    freed_bytes: int = 0
    current_bytes: int = 0
    peak_bytes: int = 0
    allocation_count: int = 0
    deallocation_count: int = 0


@dataclass(frozen=True)
class MemoryStatistics:
    """Exact counters, in bytes, for the whole run or one allocation type."""

    total_allocated_bytes: int = 0
    total_freed_bytes: int = 0
    current_usage_bytes: int = 0
    peak_usage_bytes: int = 0
    allocation_count: int = 0
    deallocation_count: int = 0
    average_allocation_size_bytes: float = 0.0
    usage_by_type: dict[str, int] = field(default_factory=dict)
    usage_by_device: dict[int, int] = field(default_factory=dict)
    gc_count: int = 0
    total_gc_time_ns: int = 0
    gc_count_by_generation: dict[int, int] = field(default_factory=dict)

    @property
    def total_gc_time(self) -> datetime.timedelta:
        """Deprecated: ``total_gc_time_ns`` as a timedelta."""
        warn_deprecated("MemoryStatistics.total_gc_time", "MemoryStatistics.total_gc_time_ns")
        return datetime.timedelta(microseconds=self.total_gc_time_ns / 1000)


class Leak(NamedTuple):
    """A live allocation old enough to be suspect (bytes; stack if captured)."""

    address: int
    size_bytes: int
    stack_trace: StackTrace | None


class AnomalyReport(dict):
    """``profiler.anomalies``: ``{"counts": {kind: n}, "total": n, "examples": [...]}``.

    A plain dict; calling it (``profiler.anomalies()``) returns the same, for
    code that reads it like the other queries.
    """

    def __call__(self) -> "AnomalyReport":
        return self


@dataclass(frozen=True)
class GCRecord:
    """One garbage collection: times in ns, what it collected, tensor bytes it freed."""

    generation: int
    start_ns: int
    end_ns: int
    duration_ns: int
    collected: int
    uncollectable: int
    tensor_bytes_freed: int
    step: int = 0


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory as NVML reports it, in bytes.

    ``process_used_bytes`` is this process's usage summed over its NVML
    compute-process entries; None when NVML does not report it (the value
    is "not available", or this pid is not in the list: in a container NVML
    lists host pids, which never match ``os.getpid()``).
    """

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    process_used_bytes: int | None


class NvmlUnavailable(str):
    """Why NVML gave no answer; a str reading "unavailable: <reason>"."""

    def __new__(cls, reason: str) -> NvmlUnavailable:
        self = super().__new__(cls, f"unavailable: {reason}")
        self.reason = reason
        return self

    available = False


@dataclass(frozen=True)
class Snapshot:
    """The counters at one moment plus device totals from NVML.

    ``devices`` is a list of ``DeviceMemory`` (from NVML) or, when
    NVML cannot answer, a string saying why ("unavailable: ...").
    """

    timestamp_ns: int
    step: int
    current_usage_bytes: int
    peak_usage_bytes: int
    usage_by_type: dict[str, int]
    usage_by_device: dict[int, int]
    devices: Any = None


@dataclass(frozen=True)
class OomEvent:
    """One out-of-memory failure the recorder saw (bytes, ns, device -1 = host).

    ``seq`` is the OUT_OF_MEMORY event's place in the log; ``live_bytes`` is
    what torchmem had live on ``device`` at the failure; ``stack_id`` the
    requesting stack (0: none captured); ``extra`` holds fields a newer
    trace added. Reading it like a dict (``oom["requested_bytes"]``) still
    works for one release, with a DeprecationWarning.
    """

    seq: int
    timestamp_ns: int
    requested_bytes: int
    device: int
    stream: int = 0
    device_free_bytes: int = 0
    device_total_bytes: int = 0
    live_bytes: int = 0
    stack_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Any) -> "OomEvent":
        """An OomEvent from a mapping with its field names (unknown keys go to ``extra``)."""
        if isinstance(d, OomEvent):
            return d
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in dict(d).items() if k in names}
        extra = {k: v for k, v in dict(d).items() if k not in names}
        extra.update(known.pop("extra", None) or {})
        return cls(**{"seq": 0, "timestamp_ns": 0, "requested_bytes": 0, "device": -1, **known},
                   extra=extra)

    def as_dict(self) -> dict[str, Any]:
        """The fields (and ``extra``'s keys) as a plain dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    # -- the dict interface oom_events had before 0.2 (deprecated) ----------------
    def __getitem__(self, key: str) -> Any:
        warn_deprecated("oom_events[i][key]", "the OomEvent attribute")
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: ``getattr(oom, key, default)``."""
        warn_deprecated("oom_events[i].get(key)", "the OomEvent attribute")
        return self.as_dict().get(key, default)

    def keys(self) -> Any:
        """Deprecated: the field names (so ``dict(oom)`` still works)."""
        warn_deprecated("dict(oom_event)", "OomEvent.as_dict()")
        return self.as_dict().keys()
