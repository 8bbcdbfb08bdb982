"""torch's CUDA allocator as the trace tracker sees it, for the summary and OOM reports.

The trace tracker (:mod:`torchmem.sources.cuda_tracker`) keeps a model of
torch's segments for the process; this module picks what a report about a
profiler shows of it: per device the profiler recorded GPU memory on,
reserved vs allocated bytes, the segments, the largest free range, and
fragmentation, and at an OOM the same figures for the failed request.
Without the tracker (the plugin, the history source, a loaded trace) there
is nothing to show and the functions return nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sources import cuda_tracker

__all__ = ["GpuAllocatorView", "gpu_allocator_views", "oom_segment_view"]


@dataclass(frozen=True)
class GpuAllocatorView:
    """One device of torch's caching allocator (bytes).

    ``fragmentation``: 1 - largest free range / free bytes (0 when nothing is
    free): how much of the free memory is in pieces smaller than the largest.
    """

    device: int
    reserved_bytes: int
    allocated_bytes: int
    segment_count: int
    largest_free_bytes: int
    free_bytes: int

    @property
    def fragmentation(self) -> float:
        if self.free_bytes <= 0:
            return 0.0
        return 1.0 - self.largest_free_bytes / self.free_bytes


def gpu_allocator_views(profiler: Any) -> list[GpuAllocatorView]:
    """The tracker's view of each device ``profiler`` recorded GPU memory on."""
    devices = sorted({int(device) for (type_name, device) in profiler.counters_by_type_and_device()
                      if type_name == "GPU" and int(device) >= 0})
    views = []
    for device in devices:
        s = cuda_tracker.gpu_memory_state(device)
        if s.events == 0 and s.reserved_bytes == 0:
            continue  # the tracker did not see this device
        views.append(GpuAllocatorView(device, s.reserved_bytes, s.allocated_bytes,
                                      s.segment_count, s.largest_free_bytes, s.free_bytes))
    return views


def oom_segment_view(profiler: Any, device: int | None,
                     requested_bytes: int | None) -> dict[str, Any] | None:
    """The segments at an OOM on ``device``: what the tracker saw at the failure
    when it was this one, else now; None without the tracker.

    Keys (bytes): segments, reserved, allocated, largest_free, free,
    fragmented (free bytes in ranges smaller than the request), at_failure.
    """
    del profiler  # the model is the process's, not a profiler's
    if device is None or device < 0:
        return None
    s = cuda_tracker.gpu_memory_state(device)
    if s.events == 0 and s.reserved_bytes == 0:
        return None
    last = cuda_tracker.last_oom_state()
    if last is not None and last.device == device and (
            requested_bytes is None or last.requested_bytes == requested_bytes):
        return {"segments": s.segment_count, "reserved": last.reserved_bytes,
                "allocated": last.allocated_bytes, "largest_free": last.largest_free_bytes,
                "free": last.free_bytes,
                "fragmented": last.fragmented_bytes, "at_failure": True}
    fragmented = (cuda_tracker.fragmented_bytes(requested_bytes, device)
                  if requested_bytes else 0)
    return {"segments": s.segment_count, "reserved": s.reserved_bytes,
            "allocated": s.allocated_bytes, "largest_free": s.largest_free_bytes,
            "free": s.free_bytes, "fragmented": fragmented, "at_failure": False}
