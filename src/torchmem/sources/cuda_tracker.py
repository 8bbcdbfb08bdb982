"""The "tracker" GPU source: torch's own caching allocator, traced natively.

torch's CUDA caching allocator calls every attached ``AllocatorTraceTracker``
for each allocation, free and segment action. torchmem attaches one
(``torchmem/_hook/cuda_trace_tracker.cpp``, built against the installed torch
by :mod:`torchmem.sources.cuda_hook`) that forwards each entry to the
recorder in C++ (device, stream, size, and the Python stack when stack
capture is on), and keeps a model of torch's segments. Nothing in torch
changes: same allocator, same caching, graphs, expandable segments, IPC,
``torch.cuda.memory_stats`` and ``_snapshot`` as without torchmem.

- Works whether or not CUDA is initialised: before, the tracker attaches as
  torch initialises CUDA (``torch.cuda._lazy_call``), so enabling torchmem
  does not initialise CUDA; after, blocks and segments that already exist are
  adopted from ``torch.cuda.memory._snapshot()``.
- Events: ``alloc`` -> allocation (requested size, device, stream, stack),
  ``free_completed`` -> free (the moment torch may reuse the block),
  torch's OOM entry -> an OUT_OF_MEMORY event with the device's free and
  total bytes.
- Stacks (``stacks=True``): read before torch's allocator lock, where
  torch's own history reads them; this uses torch's context-recorder hook, so
  a program that calls ``torch.cuda.memory._record_memory_history`` itself
  replaces it and its allocations are then recorded without stacks.

The segment model answers what the plugin cannot: reserved vs allocated per
device, the segments, the largest free range, and fragmentation
(:func:`gpu_memory_state`, :func:`gpu_segments`, :func:`fragmented_bytes`,
:func:`last_oom_state`). Blocks are known by their requested size rounded
to torch's 512 bytes, so a block's unsplit tail counts as free.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from ._cuda_native import TRACE_SEGMENT, clib, native, u64_array

__all__ = ["CudaTraceTracker", "GpuMemoryState", "GpuOomState", "GpuSegment", "fragmented_bytes",
           "gpu_memory_state", "gpu_segments", "last_oom_state"]

_TRACE_STATS = ("reserved_bytes", "allocated_bytes", "reserved_peak_bytes", "allocated_peak_bytes",
                "segment_count", "block_count", "largest_free_bytes", "free_bytes", "alloc_count",
                "free_count", "unknown_frees", "oom_count", "events")


@dataclass(frozen=True)
class GpuMemoryState:
    """torch's caching allocator on one device (or all: ``device`` None), as traced.

    Bytes: ``reserved_bytes`` (segments torch holds from CUDA),
    ``allocated_bytes`` (requested sizes of live blocks), their peaks,
    ``free_bytes`` (reserved bytes no block covers), ``largest_free_bytes``
    (the largest contiguous free range: the largest block torch can hand out
    without asking CUDA for more). Counts: segments, live blocks, allocations
    and frees seen, frees of blocks from before the tracker, OOMs, events.
    """

    device: int | None
    reserved_bytes: int
    allocated_bytes: int
    reserved_peak_bytes: int
    allocated_peak_bytes: int
    segment_count: int
    block_count: int
    largest_free_bytes: int
    free_bytes: int
    alloc_count: int
    free_count: int
    unknown_frees: int
    oom_count: int
    events: int

    def fragmented_bytes(self, request_bytes: int) -> int:
        """Free bytes no request of ``request_bytes`` could use (free ranges smaller than it)."""
        return fragmented_bytes(request_bytes, self.device)


@dataclass(frozen=True)
class GpuSegment:
    """One segment (an expandable segment's mapped ranges coalesced), bytes."""

    device: int
    address: int
    size_bytes: int
    allocated_bytes: int
    largest_free_bytes: int
    block_count: int
    stream: int
    expandable: bool


@dataclass(frozen=True)
class GpuOomState:
    """The segment model when torch's allocator last ran out of memory.

    ``fragmented_bytes``: free bytes in ranges too small for the request;
    ``free_bytes``: reserved bytes no block covered.
    """

    device: int
    requested_bytes: int
    device_free_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    largest_free_bytes: int
    fragmented_bytes: int
    oom_count: int
    free_bytes: int


def gpu_memory_state(device: int | None = None) -> GpuMemoryState:
    """The traced state of torch's allocator on ``device`` (None: all devices summed)."""
    lib = clib()
    values = u64_array(lib.torchmem_cuda_trace_stats, -1 if device is None else device,
                       len(_TRACE_STATS))
    return GpuMemoryState(device, *values)


def gpu_segments(device: int | None = None) -> list[GpuSegment]:
    """torch's segments on ``device`` (None: all), by device then address."""
    lib = clib()
    d = -1 if device is None else int(device)
    n = lib.torchmem_cuda_trace_segments(d, None, 0)
    buf = (TRACE_SEGMENT * max(n, 1))()
    n = min(n, lib.torchmem_cuda_trace_segments(d, ctypes.cast(buf, ctypes.c_void_p), n))
    return [GpuSegment(int(s.device), int(s.address), int(s.size), int(s.allocated),
                       int(s.largest_free), int(s.blocks), int(s.stream), bool(s.expandable))
            for s in buf[:n]]


def fragmented_bytes(request_bytes: int, device: int | None = None) -> int:
    """Reserved, free bytes of ``device`` that no request of ``request_bytes`` can use."""
    if request_bytes < 0:
        raise ValueError(f"request_bytes must be >= 0, got {request_bytes}")
    return int(clib().torchmem_cuda_trace_fragmentation(-1 if device is None else device,
                                                        int(request_bytes)))


def last_oom_state() -> GpuOomState | None:
    """The model at torch's last out-of-memory error, or None before any."""
    values = u64_array(lambda _d, out, n: clib().torchmem_cuda_trace_last_oom(out, n), 0, 9)
    return GpuOomState(*values) if values else None


# torch cannot detach a trace tracker: the process attaches one and points it
# at the profiler of the running source.
_attach_lock = threading.Lock()


class CudaTraceTracker:
    """Feeds torch's caching-allocator trace into ``profiler`` (the "tracker" source).

    ``stacks``: record each allocation's Python stack (see the module notes).
    ``start()`` raises :class:`~torchmem.sources.cuda_hook.CudaHookUnavailable`
    (a BuildUnavailable) when the tracker cannot be built here.
    """

    def __init__(self, profiler: Any, *, stacks: bool = False) -> None:
        self.profiler = profiler
        self.stacks = bool(stacks)
        self.error: str | None = None  # why attaching failed (a deferred attach cannot raise)
        self.attached = False
        self.adopted_blocks = 0
        self._started = False
        self._lib: Any = None

    def start(self) -> "CudaTraceTracker":
        """Starts recording; attaches now, or as torch initialises CUDA."""
        from .cuda_hook import load_cuda_hook

        if self._started:
            return self
        self._lib = load_cuda_hook()
        native().set_gpu_recorder(self.profiler)
        # The stack settings the native side reads follow this profiler's.
        self.profiler.attach_native_source("gpu")
        lib = clib()
        lib.torchmem_cuda_trace_set_recording(1)
        # Blocks an earlier tracker saw (another profiler's run) are live here too.
        lib.torchmem_cuda_trace_replay_live()
        self._started = True
        import torch

        # Attaching needs torch's per-device allocators, made when torch
        # initialises CUDA; initialising it here would change the program
        # (forked children could no longer use CUDA), so before that the
        # attach waits for torch's own initialisation (called at once after it).
        torch.cuda._lazy_call(self._attach)
        return self

    def stop(self) -> None:
        """Stops recording (torch keeps the tracker, which records nothing)."""
        if not self._started:
            return
        self._started = False
        clib().torchmem_cuda_trace_set_recording(0)
        if self.stacks and self.attached:
            from .cuda_hook import call_with_error

            call_with_error(self._lib.torchmem_cuda_tracker_set_stacks, 0)

    def _attach(self) -> None:
        # Runs inside torch's CUDA initialisation when deferred: it must not
        # raise (torch would fail the program's first CUDA call).
        from .cuda_hook import call_with_error

        try:
            with _attach_lock:
                status, err = call_with_error(self._lib.torchmem_cuda_tracker_attach)
                if status != 0:
                    self._fail(f"torchmem: the CUDA trace tracker could not attach ({err}); GPU "
                               "allocations are not recorded")
                    return
                self.attached = True
                self._adopt()
                if self.stacks:
                    status, err = call_with_error(self._lib.torchmem_cuda_tracker_set_stacks, 1)
                    if status != 0:
                        warnings.warn(f"torchmem: GPU allocations are recorded without stacks: "
                                      f"{err}", RuntimeWarning, stacklevel=2)
        except Exception as exc:  # never into torch's initialisation
            self._fail(f"torchmem: the CUDA trace tracker failed: {exc!r}")

    def _fail(self, message: str) -> None:
        self.error = message
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _adopt(self) -> None:
        """Blocks and segments live before the tracker: from torch's snapshot."""
        import torch

        lib = clib()
        lib.torchmem_cuda_trace_set_adopting(1)
        try:
            self.adopted_blocks = adopt_snapshot(torch.cuda.memory._snapshot())
        finally:
            lib.torchmem_cuda_trace_set_adopting(0)


def adopt_snapshot(snap: dict[str, Any]) -> int:
    """Feeds the segments and active blocks of a torch snapshot to the model; blocks adopted."""
    lib = clib()
    adopted = 0
    for seg in snap.get("segments") or []:
        device, stream = int(seg.get("device", 0)), int(seg.get("stream", 0))
        address = int(seg["address"])
        lib.torchmem_cuda_trace_adopt_segment(device, address, int(seg["total_size"]), stream,
                                              int(bool(seg.get("is_expandable", False))))
        for block in seg.get("blocks") or []:
            if block.get("state") == "active_allocated":
                size = int(block.get("requested_size", block["size"]))
                adopted += lib.torchmem_cuda_trace_adopt_block(device, int(block["address"]),
                                                               size, stream)
    return adopted
