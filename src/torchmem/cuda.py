"""torchmem.cuda: where GPU events come from, and torchmem's CUDA allocator.

Three GPU sources (docs/gpu-sources.md has what each records, changes and costs):

- ``"tracker"`` (the default): torch's own caching allocator stays; a native
  trace tracker records every allocation, free and segment action
  (:mod:`torchmem.sources.cuda_tracker`). Works before or after CUDA is
  initialised and changes nothing in torch.
- ``"plugin"``: torchmem's allocator replaces torch's (once per process,
  before CUDA is initialised): a C++ class compiled against the installed
  torch (``torchmem/_hook/cuda_allocator.cpp``) over the C entry points of
  torchmem's own module (backends ``async`` = cudaMallocAsync, the default,
  ``sync`` = cudaMalloc; ``host`` / ``fake`` for CPU tests). Where the class
  cannot be built, torch's C-function ``CUDAPluggableAllocator`` is used, with
  a warning listing what then does not work (:data:`FALLBACK_LIMITS`).
- ``"history"``: torch's ``_record_memory_history`` read in batches
  (:mod:`torchmem.sources.cuda_history`); needs no compiler.

``choose_gpu_source`` is the (pure) decision; ``start_gpu_recording`` acts on
it for ``torchmem.enable()``.

(Over 400 lines because this is the one public module of the GPU path: the
source choice, the plugin's controls and counters, the install. The parts
with logic of their own live in ``torchmem.sources``: ``cuda_tracker``,
``cuda_hook``, ``cuda_stats``, ``_cuda_native``.)
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Any, NamedTuple

from .sources._build import BuildUnavailable
from .sources._cuda_native import BLOCK, clib, read_text
from .sources.cuda_stats import memory_stats_dict, patch_torch_stats

__all__ = [
    "BACKENDS",
    "FALLBACK_LIMITS",
    "GPU_SOURCES",
    "GpuRecording",
    "GpuSourceChoice",
    "backend",
    "choose_gpu_source",
    "empty_cache",
    "install_allocator",
    "installed_kind",
    "is_installed",
    "largest_free_block",
    "last_message",
    "last_oom_message",
    "live_block_list",
    "live_blocks",
    "memory_stats_dict",
    "plugin_path",
    "plugin_stats",
    "reset_accumulated",
    "reset_peak",
    "runtime_description",
    "set_backend",
    "start_gpu_recording",
]

BACKENDS = ("async", "sync", "host", "fake")
GPU_SOURCES = ("auto", "tracker", "plugin", "history", "none")
_TORCH_BACKENDS = ("async", "sync")
STAT_NAMES = ("current", "peak", "allocated", "freed", "alloc_count", "free_count",
              "oom_count", "retry_count", "reserved", "reserved_peak", "live_blocks",
              "unknown_frees", "peak_live_blocks", "deferred_frees", "unfenced_blocks", "limit")

# What does not work when only the C functions could be registered.
FALLBACK_LIMITS = (
    "out of memory is a RuntimeError, not torch.OutOfMemoryError (cuDNN's smaller-workspace "
    "retry does not see it)",
    "torch.backends.cudnn.benchmark fails (cacheInfo)",
    "C++ callers of getDeviceStats and torch.accelerator.memory_* fail; torch.cuda.memory_* "
    "are patched in Python",
    "torch.cuda.memory._snapshot() and memory_viz fail",
    "CUDA graph capture is not supported (no graph-pool hooks)",
    "multi-GPU device-to-device copies of pool memory fail (no per-pool peer access)",
    "record_stream from torch gives no stream device: a stream on another device is "
    "waited for on the host",
)

_lock = threading.RLock()
_installed: str | None = None  # "class" or "functions"
_backend_choice: str | None = None
_allocator: Any = None  # keeps torch's wrapper alive for the process (functions)


def plugin_path() -> str:
    """Path of the shared library holding the plugin's C entry points (torchmem._native)."""
    from . import _native

    return _native.__file__


def _clib() -> ctypes.CDLL:
    return clib()


def _read_text(fn: Any) -> str:
    return read_text(fn)


def _address(symbol: str) -> int:
    return ctypes.cast(getattr(clib(), symbol), ctypes.c_void_p).value


# -- backend ---------------------------------------------------------------------
def backend() -> str:
    """The backend in use, or the one the first allocation will start."""
    with _lock:
        current = clib().torchmem_plugin_backend().decode()
        if current:
            return current
        return _backend_choice or os.environ.get("TORCHMEM_CUDA_BACKEND") or "async"


def set_backend(name: str) -> None:
    """Chooses the plugin's backend; call before the first allocation.

    ``host`` and ``fake`` take effect at once (CPU tests drive the entry
    points with them). ``async`` and ``sync`` are started by
    ``install_allocator()``, once torch has loaded the CUDA runtime.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    global _backend_choice
    with _lock:
        if _installed:
            if name == backend():
                return
            raise RuntimeError(
                f"the torchmem allocator is already installed with backend {backend()!r}; "
                "set_backend() must run before install_allocator()/torchmem.enable()")
        if name in _TORCH_BACKENDS:
            _backend_choice = name
            return
        _start_backend(name)
        _backend_choice = name


def _start_backend(name: str) -> None:
    rc = clib().torchmem_plugin_set_backend(name.encode())
    if rc == -2:
        raise RuntimeError(
            f"cannot switch the plugin to {name!r}: {live_blocks()} blocks of backend "
            f"{backend()!r} are still live")
    if rc == -3:
        raise RuntimeError(f"plugin backend {name!r} cannot start: {runtime_description()}")
    if rc != 0:
        raise ValueError(f"unknown plugin backend {name!r}")


def runtime_description() -> str:
    """Which libcudart the plugin resolved, or why none was found."""
    return read_text(clib().torchmem_cuda_runtime_description)


# -- counters ------------------------------------------------------------------------
def plugin_stats(device: int = -1) -> dict[str, int]:
    """The plugin's counters for ``device`` (-1: all): bytes and counts.

    current/peak/allocated/freed are bytes of live blocks; reserved /
    reserved_peak are what the backend holds from the driver (the async
    pool's reservation; equal to current/peak for the other backends);
    live_blocks / peak_live_blocks count blocks; deferred_frees are blocks
    freed during a CUDA graph capture and released after it; unfenced_blocks
    are blocks kept for good because their free could not be ordered after
    their other streams; limit is the memory-fraction limit (0: none).
    allocated, freed, the counts, oom_count and retry_count start from 0
    again at :func:`reset_accumulated`.
    """
    values = (ctypes.c_uint64 * len(STAT_NAMES))()
    n = clib().torchmem_plugin_stats(int(device), values, len(STAT_NAMES))
    return {STAT_NAMES[i]: int(values[i]) for i in range(n)}


def reset_peak(device: int = -1) -> None:
    """Peak := current for ``device`` (-1: all devices), bytes and block counts."""
    clib().torchmem_plugin_reset_peak(int(device))


def reset_accumulated(device: int = -1) -> None:
    """Cumulative counters of ``device`` (-1: all) start from 0 (torch's reset_accumulated)."""
    clib().torchmem_plugin_reset_accumulated(int(device))


def live_blocks() -> int:
    """Number of blocks the plugin has handed out and not had back."""
    return int(clib().torchmem_plugin_live_blocks())


def live_block_list() -> list[dict[str, int]]:
    """The plugin's live blocks by address: what its snapshot() reports to torch.

    Each: address, size (bytes), stream, device, captured (allocated during a
    CUDA graph capture), deferred (freed during one, released after it).
    """
    lib = clib()
    n = lib.torchmem_cuda_live_blocks(None, 0)
    buf = (BLOCK * max(n, 1))()
    n = min(n, lib.torchmem_cuda_live_blocks(ctypes.cast(buf, ctypes.c_void_p), n))
    return [{"address": int(b.address), "size": int(b.size), "stream": int(b.stream),
             "device": int(b.device), "captured": int(bool(b.flags & 1)),
             "deferred": int(bool(b.flags & 2))} for b in buf[:n]]


def largest_free_block(device: int) -> int:
    """The largest block one allocation on ``device`` could get now (cacheInfo), bytes."""
    return int(clib().torchmem_cuda_largest_free_block(int(device)))


def memory_fraction(device: int) -> float:
    """The memory fraction set for ``device`` (1.0 when none)."""
    return float(clib().torchmem_cuda_memory_fraction(int(device)))


def empty_cache() -> None:
    """Returns the backend's cached memory to the driver (what torch.cuda.empty_cache does)."""
    clib().torchmem_reset()


def last_oom_message() -> str:
    """The text of the plugin's last out-of-memory error ('' when none)."""
    return read_text(clib().torchmem_plugin_last_oom_message)


def last_message() -> str:
    """Why this thread's last failed plugin call failed ('' when none)."""
    return read_text(clib().torchmem_cuda_last_message)


def _set_oom_throws(on: bool) -> None:
    # 1 under torch's C-function interface (the error must reach Python); 0
    # for ctypes callers, whose foreign frames an exception cannot cross.
    clib().torchmem_plugin_set_oom_throws(1 if on else 0)


# -- choosing the GPU source -----------------------------------------------------------
class GpuSourceChoice(NamedTuple):
    """Where GPU events come from: ``source`` is "tracker", "plugin", "history" or "none"."""

    source: str
    message: str
    fallback: bool = False  # the user's or the default choice could not be honoured


def choose_gpu_source(cuda_available: bool, cuda_initialized: bool,
                      user_choice: str | None = None, plugin_installed: bool = False,
                      tracker_available: bool = True,
                      tracker_reason: str = "") -> GpuSourceChoice:
    """Decides how GPU allocations get recorded (pure; no torch calls).

    ``user_choice``: None or "auto" (the tracker, else the history source),
    "tracker", "plugin", "history", or "none". ``tracker_available``: whether
    the trace tracker could be built here (``tracker_reason`` says why not).
    """
    choice = (user_choice or "auto").lower()
    if choice not in GPU_SOURCES:
        raise ValueError(f"gpu_source must be one of {GPU_SOURCES}, got {user_choice!r}")
    if choice == "none":
        return GpuSourceChoice("none", "GPU recording is off (gpu_source='none').")
    if not cuda_available:
        return GpuSourceChoice("none", "CUDA is not available: no GPU allocations to record.")
    if plugin_installed:
        return GpuSourceChoice("plugin", "the torchmem CUDA allocator is already installed "
                               "in this process; GPU allocations are recorded by it.")
    why_not_tracker = f" ({tracker_reason})" if tracker_reason else ""
    if choice == "history":
        return GpuSourceChoice("history", "recording GPU allocations from torch's allocation "
                               "history (gpu_source='history').")
    if choice == "plugin":
        if not cuda_initialized:
            return GpuSourceChoice("plugin", "installing the torchmem CUDA allocator: every GPU "
                                   "allocation and free is recorded natively.")
        if tracker_available:
            return GpuSourceChoice(
                "tracker", "CUDA was already initialised when torchmem started, so torch's "
                "allocator can no longer be swapped for the torchmem plugin. Recording torch's "
                "own caching allocator with the trace tracker instead. Call torchmem.enable() "
                "before any CUDA work to use the plugin.", fallback=True)
        return GpuSourceChoice(
            "history", "CUDA was already initialised when torchmem started, so torch's "
            "allocator can no longer be swapped for the torchmem plugin, and the trace tracker "
            f"cannot be built here{why_not_tracker}. Recording GPU allocations from torch's "
            "allocation history instead (events arrive in batches, timestamped when read). "
            "Call torchmem.enable() before any CUDA work to use the plugin.", fallback=True)
    if tracker_available:
        return GpuSourceChoice("tracker", "recording torch's CUDA caching allocator with the "
                               "trace tracker: every GPU allocation, free and segment natively.")
    return GpuSourceChoice(
        "history", f"the CUDA trace tracker cannot be built here{why_not_tracker}; recording "
        "GPU allocations from torch's allocation history instead (events arrive in batches, "
        "timestamped when read).", fallback=True)


# -- installing ---------------------------------------------------------------------
def is_installed() -> bool:
    """Whether this process's CUDA allocator is the torchmem plugin."""
    return _installed is not None


def installed_kind() -> str | None:
    """"class" (the compiled allocator), "functions" (the C-function fallback) or None."""
    return _installed


def install_allocator() -> bool:
    """Makes the torchmem plugin torch's CUDA allocator (once per process).

    Uses the compiled allocator class; where it cannot be built, torch's
    C-function CUDAPluggableAllocator with a RuntimeWarning listing what
    then does not work. Returns False when CUDA is not available. Raises
    RuntimeError when CUDA is already initialised (torch cannot swap its
    allocator then) or the chosen backend cannot start.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        import torch

        if not torch.cuda.is_available():
            return False
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "CUDA is already initialised: torch's allocator can no longer be swapped "
                "(install the torchmem allocator before any CUDA work, or use the "
                "'tracker' GPU source)")
        name = _backend_choice or os.environ.get("TORCHMEM_CUDA_BACKEND") or "async"
        if name not in _TORCH_BACKENDS:
            raise RuntimeError(f"backend {name!r} hands torch host memory; torch needs "
                               f"one of {_TORCH_BACKENDS}")
        if live_blocks():
            raise RuntimeError(f"{live_blocks()} plugin blocks from tests are still live")
        _start_backend(name)
        _set_oom_throws(True)
        try:
            _install_class()
            _installed = "class"
        except BuildUnavailable as exc:
            warnings.warn(
                f"torchmem: the compiled CUDA allocator is not available ({exc}); using torch's "
                "C-function CUDAPluggableAllocator, under which: " + "; ".join(FALLBACK_LIMITS)
                + ".", RuntimeWarning, stacklevel=3)
            _install_functions(torch)
            _installed = "functions"
        return True


def _install_class() -> None:
    from .sources.cuda_hook import CudaHookUnavailable, call_with_error, load_cuda_hook

    lib = load_cuda_hook()
    if lib.torchmem_cuda_allocator_supported() != 1:
        raise CudaHookUnavailable("the CUDA allocator class needs torch >= 2.11")
    status, err = call_with_error(lib.torchmem_cuda_allocator_install)
    if status == -1:
        raise RuntimeError(f"the torchmem CUDA allocator cannot be installed: {err}")
    if status != 0:
        raise CudaHookUnavailable(err)


def _install_functions(torch: Any) -> None:
    global _allocator
    allocator = torch.cuda.memory.CUDAPluggableAllocator(
        plugin_path(), "torchmem_malloc", "torchmem_free")
    hooks = allocator.allocator()
    setters = (("set_init_fn", "torchmem_init"), ("set_reset_fn", "torchmem_reset"),
               ("set_memory_fraction_fn", "torchmem_set_memory_fraction"),
               ("set_base_alloc_fn", "torchmem_base_alloc"),
               ("set_record_stream_fn", "torchmem_record_stream"))
    # A hook torch does not let us set would silently change behaviour
    # (record_stream unfenced, empty_cache a no-op): refuse instead.
    missing = [setter for setter, _ in setters if not hasattr(hooks, setter)]
    if missing:
        raise RuntimeError(f"this torch's CUDAPluggableAllocator has no {', '.join(missing)}: "
                           "the torchmem C-function plugin cannot be installed")
    for setter, symbol in setters:
        getattr(hooks, setter)(_address(symbol))
    torch.cuda.memory.change_current_allocator(allocator)
    _allocator = allocator
    patch_torch_stats(torch, plugin_stats, reset_peak, reset_accumulated, memory_fraction)


def _patch_torch_stats(torch: Any) -> None:
    """The fallback's Python patch of torch.cuda's stats functions (tests call it)."""
    patch_torch_stats(torch, plugin_stats, reset_peak, reset_accumulated, memory_fraction)


# -- one call for torchmem.enable() -------------------------------------------------------
class GpuRecording(NamedTuple):
    """What start_gpu_recording set up: the choice and the source object, if any."""

    choice: GpuSourceChoice
    history: Any = None  # CudaHistorySource
    tracker: Any = None  # CudaTraceTracker

    @property
    def source_object(self) -> Any:
        """The running source that stops with disable() (None for the plugin)."""
        return self.history if self.history is not None else self.tracker

    def stop(self) -> None:
        """Stops the history source or the tracker (the plugin cannot be removed)."""
        if self.source_object is not None:
            self.source_object.stop()


def _tracker_status() -> tuple[bool, str]:
    try:
        from .sources.cuda_hook import load_cuda_hook

        load_cuda_hook()
        return True, ""
    except BuildUnavailable as exc:
        return False, str(exc)


def start_gpu_recording(profiler: Any, gpu_source: str | None = None, *,
                        history_interval_s: float = 1.0, warn: bool = True) -> GpuRecording:
    """Routes GPU allocations into ``profiler`` the best way this process allows.

    The trace tracker by default; the plugin when asked for (and CUDA is not
    initialised yet); the history source when asked for or when neither can
    be built. A fallback is announced with a RuntimeWarning.
    """
    from . import _native

    try:
        import torch

        available = bool(torch.cuda.is_available())
        initialized = bool(torch.cuda.is_initialized()) if available else False
    except Exception:
        available = initialized = False
    choice_name = (gpu_source or "auto").lower()
    tracker_ok, tracker_why = True, ""
    if available and not _installed and choice_name in ("auto", "tracker", "plugin"):
        if choice_name != "plugin" or initialized:
            tracker_ok, tracker_why = _tracker_status()
    choice = choose_gpu_source(available, initialized, gpu_source, _installed is not None,
                               tracker_ok, tracker_why)
    if choice_name == "tracker" and choice.source != "tracker" and choice.source != "none":
        choice = choice._replace(fallback=True)
    if choice.source == "plugin":
        try:
            install_allocator()
        except RuntimeError as exc:
            choice = GpuSourceChoice("history", f"the torchmem plugin could not be installed "
                                     f"({exc}); recording torch's allocation history instead.",
                                     fallback=True)
    if choice.fallback and warn:
        warnings.warn("torchmem: " + choice.message, RuntimeWarning, stacklevel=3)
    stacks = bool(getattr(profiler, "capture_stack_traces", False))
    if choice.source == "plugin":
        _native.set_gpu_recorder(profiler)
        profiler.attach_native_source("gpu")  # the plugin reads the stack settings natively
        return GpuRecording(choice)
    if choice.source == "tracker":
        from .sources.cuda_tracker import CudaTraceTracker

        try:
            return GpuRecording(choice, tracker=CudaTraceTracker(profiler, stacks=stacks).start())
        except BuildUnavailable as exc:  # raced with a failed build: degrade to history
            choice = GpuSourceChoice("history", f"the CUDA trace tracker could not start ({exc});"
                                     " recording torch's allocation history instead.",
                                     fallback=True)
            if warn:
                warnings.warn("torchmem: " + choice.message, RuntimeWarning, stacklevel=2)
    if choice.source == "history":
        from .sources.cuda_history import CudaHistorySource

        history = CudaHistorySource(profiler, interval_s=history_interval_s, stacks=stacks)
        try:
            history.start()
        except Exception as exc:  # a torch without allocation history
            choice = GpuSourceChoice("none", f"{choice.message} But torch's allocation history "
                                     f"could not be started ({exc}): GPU allocations are not "
                                     "recorded.", fallback=True)
            if warn:
                warnings.warn("torchmem: " + choice.message, RuntimeWarning, stacklevel=2)
            return GpuRecording(choice)
        return GpuRecording(choice, history=history)
    return GpuRecording(choice)
