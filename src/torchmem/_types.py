"""The value types of torchmem's public API: events, statistics, stacks, leaks."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "MemoryEventType",
    "Event",
    "MemoryEvent",
    "MemoryStatistics",
    "StackTrace",
    "Leak",
    "GCRecord",
    "Snapshot",
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
        """The innermost frame: the allocation site."""
        return self.frames[0] if self.frames else None

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True, kw_only=True)
class Event:
    """Anything that happened at a moment of a run.

    ``timestamp`` is wall-clock nanoseconds (``time.time_ns`` scale),
    non-decreasing within a process; ``step`` is the training step.
    """

    timestamp: int
    step: int = 0


@dataclass(frozen=True, kw_only=True)
class MemoryEvent(Event):
    """One allocation, free, reallocation, snapshot, GC or OOM event.

    Sizes are bytes. ``total_allocated_bytes`` and ``total_free_bytes`` are
    the cumulative bytes allocated and freed when the event happened, so the
    usage at that moment is their difference. ``device`` is -1 for host
    memory. ``details`` holds what a snapshot, GC or OOM event adds.
    """

    event_type: MemoryEventType
    address: int = 0
    size_bytes: int = 0
    total_allocated_bytes: int = 0
    total_free_bytes: int = 0
    allocation_type: str = "CPU"
    device: int = -1
    stream: int = 0
    thread_id: int = 0
    stack_trace: StackTrace | None = None
    details: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("size_bytes", "address", "total_allocated_bytes", "total_free_bytes"):
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
        return self.total_allocated_bytes - self.total_free_bytes


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
    total_gc_time: datetime.timedelta = datetime.timedelta(0)
    gc_count_by_generation: dict[int, int] = field(default_factory=dict)


class Leak(NamedTuple):
    """A live allocation old enough to be suspect (bytes; stack if captured)."""

    address: int
    size_bytes: int
    stack_trace: StackTrace | None


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
class Snapshot:
    """The counters at one moment plus device totals from NVML.

    ``devices`` is a list of ``torchmem.sources.nvml.DeviceMemory`` or, when
    NVML cannot answer, a string saying why ("unavailable: ...").
    """

    timestamp_ns: int
    step: int
    current_usage_bytes: int
    peak_usage_bytes: int
    usage_by_type: dict[str, int]
    usage_by_device: dict[int, int]
    devices: Any = None
