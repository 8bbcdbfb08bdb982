"""torchmem.cuda: the CUDA plugin allocator and the choice of GPU source.

Over 400 lines for now: the plugin's ctypes interface, its backends, torch's
stats functions patched under it, and the choice of GPU source; the CUDA
rewrite under way splits them by job.

The plugin is a set of C functions exported from torchmem's own native module
(``plugin_path()``); ``install_allocator()`` hands them to
``torch.cuda.memory.CUDAPluggableAllocator`` so that every CUDA allocation and
free of the process goes through torchmem (no Python code per event). The
swap is process-wide, happens at most once, and only before torch initialises
CUDA. Afterwards torch's stats functions (which raise under any pluggable
allocator, pytorch issue 133281) are patched to answer from the plugin's
counters.

Backends (``set_backend`` or ``TORCHMEM_CUDA_BACKEND``, before first use):
``async`` (default; cudaMallocAsync on the device's default pool), ``sync``
(cudaMalloc / cudaFree), ``host`` (malloc / free: CPU tests) and ``fake``
(logs its calls, fails on demand: tests only).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Any, NamedTuple

__all__ = [
    "BACKENDS",
    "GpuSourceChoice",
    "backend",
    "choose_gpu_source",
    "empty_cache",
    "install_allocator",
    "is_installed",
    "last_oom_message",
    "live_blocks",
    "plugin_path",
    "plugin_stats",
    "reset_peak",
    "runtime_description",
    "set_backend",
    "start_gpu_recording",
]

BACKENDS = ("async", "sync", "host", "fake")
_TORCH_BACKENDS = ("async", "sync")
STAT_NAMES = ("current", "peak", "allocated", "freed", "alloc_count", "free_count",
              "oom_count", "retry_count", "reserved", "reserved_peak", "live_blocks",
              "unknown_frees")

_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_installed = False
_backend_choice: str | None = None
_allocator: Any = None  # keeps torch's wrapper alive for the process
_originals: list[tuple[Any, str, Any]] = []  # (namespace, name, torch's function)


def plugin_path() -> str:
    """Path of the shared library torch loads the allocator from (torchmem._native)."""
    from . import _native

    return _native.__file__


def _clib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(plugin_path())
        u64, i32, sz = ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t
        lib.torchmem_malloc.restype = ctypes.c_void_p
        lib.torchmem_malloc.argtypes = (sz, i32, ctypes.c_void_p)
        lib.torchmem_free.restype = None
        lib.torchmem_free.argtypes = (ctypes.c_void_p, sz, i32, ctypes.c_void_p)
        lib.torchmem_record_stream.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        lib.torchmem_set_memory_fraction.argtypes = (ctypes.c_double, i32)
        lib.torchmem_plugin_set_backend.restype = i32
        lib.torchmem_plugin_set_backend.argtypes = (ctypes.c_char_p,)
        lib.torchmem_plugin_backend.restype = ctypes.c_char_p
        lib.torchmem_plugin_set_oom_throws.argtypes = (i32,)
        for name in ("torchmem_plugin_last_oom_message", "torchmem_cuda_runtime_description",
                     "torchmem_fake_log"):
            getattr(lib, name).restype = sz
            getattr(lib, name).argtypes = (ctypes.c_char_p, sz)
        lib.torchmem_plugin_stats.restype = i32
        lib.torchmem_plugin_stats.argtypes = (i32, ctypes.POINTER(u64), i32)
        lib.torchmem_plugin_reset_peak.argtypes = (i32,)
        lib.torchmem_plugin_live_blocks.restype = u64
        lib.torchmem_plugin_bench.restype = u64
        lib.torchmem_plugin_bench.argtypes = (u64,)
        lib.torchmem_plugin_bench_batched.restype = u64
        lib.torchmem_plugin_bench_batched.argtypes = (u64, u64)
        lib.torchmem_fake_fail_next.argtypes = (i32,)
        lib.torchmem_fake_set_mem_info.argtypes = (u64, u64)
        _lib = lib
    return _lib


def _read_text(fn: Any) -> str:
    n = fn(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    fn(buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def _address(symbol: str) -> int:
    return ctypes.cast(getattr(_clib(), symbol), ctypes.c_void_p).value


# -- backend ---------------------------------------------------------------------
def backend() -> str:
    """The backend in use, or the one the first allocation will start."""
    with _lock:
        current = _clib().torchmem_plugin_backend().decode()
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
    rc = _clib().torchmem_plugin_set_backend(name.encode())
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
    return _read_text(_clib().torchmem_cuda_runtime_description)


# -- counters ------------------------------------------------------------------------
def plugin_stats(device: int = -1) -> dict[str, int]:
    """The plugin's counters for ``device`` (-1: all): bytes and counts.

    current/peak/allocated/freed are bytes of live blocks; reserved /
    reserved_peak are what the backend holds from the driver (the async
    pool's reservation; equal to current/peak for the other backends).
    """
    values = (ctypes.c_uint64 * len(STAT_NAMES))()
    n = _clib().torchmem_plugin_stats(int(device), values, len(STAT_NAMES))
    return {STAT_NAMES[i]: int(values[i]) for i in range(n)}


def reset_peak(device: int = -1) -> None:
    """Peak := current for ``device`` (-1: all devices)."""
    _clib().torchmem_plugin_reset_peak(int(device))


def live_blocks() -> int:
    """Number of blocks the plugin has handed out and not had back."""
    return int(_clib().torchmem_plugin_live_blocks())


def empty_cache() -> None:
    """Returns the backend's cached memory to the driver (what torch.cuda.empty_cache does)."""
    _clib().torchmem_reset()


def last_oom_message() -> str:
    """The text of the plugin's last out-of-memory error ('' when none)."""
    return _read_text(_clib().torchmem_plugin_last_oom_message)


def _set_oom_throws(on: bool) -> None:
    # 1 under torch (the error must reach Python); 0 for ctypes callers, whose
    # foreign frames an exception cannot cross.
    _clib().torchmem_plugin_set_oom_throws(1 if on else 0)


# -- choosing the GPU source -----------------------------------------------------------
class GpuSourceChoice(NamedTuple):
    """Where GPU events come from: ``source`` is "plugin", "history" or "none"."""

    source: str
    message: str
    fallback: bool = False  # the user's or the default choice could not be honoured


def choose_gpu_source(cuda_available: bool, cuda_initialized: bool,
                      user_choice: str | None = None,
                      plugin_installed: bool = False) -> GpuSourceChoice:
    """Decides how GPU allocations get recorded (pure; no torch calls).

    ``user_choice``: None or "auto" (plugin when possible, else history),
    "plugin", "history", or "none".
    """
    choice = (user_choice or "auto").lower()
    if choice not in ("auto", "plugin", "history", "none"):
        raise ValueError(f"gpu_source must be 'auto', 'plugin', 'history' or 'none', got {user_choice!r}")
    if choice == "none":
        return GpuSourceChoice("none", "GPU recording is off (gpu_source='none').")
    if not cuda_available:
        return GpuSourceChoice("none", "CUDA is not available: no GPU allocations to record.")
    if plugin_installed:
        return GpuSourceChoice("plugin", "the torchmem CUDA allocator is already installed "
                               "in this process; GPU allocations are recorded by it.")
    if choice == "history":
        return GpuSourceChoice("history", "recording GPU allocations from torch's allocation "
                               "history (gpu_source='history').")
    if not cuda_initialized:
        return GpuSourceChoice("plugin", "installing the torchmem CUDA allocator: every GPU "
                               "allocation and free is recorded natively.")
    return GpuSourceChoice(
        "history",
        "CUDA was already initialised when torchmem started (something used the GPU "
        "first), so torch's allocator can no longer be swapped for the torchmem plugin. "
        "Recording GPU allocations from torch's allocation history instead (events "
        "arrive in batches, timestamped when read). Call torchmem.enable() before any "
        "CUDA work to use the plugin.",
        fallback=True)


# -- installing ---------------------------------------------------------------------
def is_installed() -> bool:
    """Whether this process's CUDA allocator is the torchmem plugin."""
    return _installed


def install_allocator() -> bool:
    """Makes the torchmem plugin torch's CUDA allocator (once per process).

    Returns False when CUDA is not available. Raises RuntimeError when CUDA is
    already initialised (torch cannot swap its allocator then) or the chosen
    backend cannot start.
    """
    global _installed, _allocator
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
                "'history' GPU source)")
        name = _backend_choice or os.environ.get("TORCHMEM_CUDA_BACKEND") or "async"
        if name not in _TORCH_BACKENDS:
            raise RuntimeError(f"backend {name!r} hands torch host memory; torch needs "
                               f"one of {_TORCH_BACKENDS}")
        if live_blocks():
            raise RuntimeError(f"{live_blocks()} plugin blocks from tests are still live")
        _start_backend(name)
        _set_oom_throws(True)
        allocator = torch.cuda.memory.CUDAPluggableAllocator(
            plugin_path(), "torchmem_malloc", "torchmem_free")
        hooks = allocator.allocator()
        for setter, symbol in (("set_init_fn", "torchmem_init"),
                               ("set_reset_fn", "torchmem_reset"),
                               ("set_memory_fraction_fn", "torchmem_set_memory_fraction"),
                               ("set_base_alloc_fn", "torchmem_base_alloc"),
                               ("set_record_stream_fn", "torchmem_record_stream")):
            if hasattr(hooks, setter):
                getattr(hooks, setter)(_address(symbol))
        torch.cuda.memory.change_current_allocator(allocator)
        _allocator = allocator
        _installed = True
        _patch_torch_stats(torch)
        return True


# -- torch.cuda stats under the plugin -----------------------------------------------------
def memory_stats_dict(stats: dict[str, int]) -> dict[str, int]:
    """torch.cuda.memory_stats()-shaped dict built from plugin counters.

    Every key torch.cuda.memory_summary reads is present; the plugin has no
    pools or splits, so everything lands in ``.all.`` and ``large_pool`` /
    ``small_pool`` / ``inactive_split`` stay 0.
    """
    out: dict[str, int] = {}

    def put(metric: str, current: int, peak: int, allocated: int, freed: int) -> None:
        for pool in ("all", "large_pool", "small_pool"):
            vals = (current, peak, allocated, freed) if pool == "all" else (0, 0, 0, 0)
            for key, v in zip(("current", "peak", "allocated", "freed"), vals):
                out[f"{metric}.{pool}.{key}"] = v

    s = stats
    for metric in ("allocated_bytes", "active_bytes", "requested_bytes"):
        put(metric, s["current"], s["peak"], s["allocated"], s["freed"])
    put("reserved_bytes", s["reserved"], s["reserved_peak"], 0, 0)
    for metric in ("allocation", "active"):
        put(metric, s["live_blocks"], s["live_blocks"], s["alloc_count"], s["free_count"])
    put("segment", 0, 0, 0, 0)
    put("inactive_split", 0, 0, 0, 0)
    put("inactive_split_bytes", 0, 0, 0, 0)
    out["num_alloc_retries"] = s["retry_count"]
    out["num_ooms"] = s["oom_count"]
    out["num_sync_all_streams"] = 0
    out["num_device_alloc"] = s["alloc_count"]
    out["num_device_free"] = s["free_count"]
    out["max_split_size"] = -1
    for metric in ("oversize_allocations", "oversize_segments"):
        for key in ("current", "peak", "allocated", "freed"):
            out[f"{metric}.{key}"] = 0
    return out


def _patch_torch_stats(torch: Any) -> None:
    memory = torch.cuda.memory

    def index(device: Any) -> int:
        return memory._get_device_index(device, optional=True)

    def memory_stats(device: Any = None) -> dict[str, int]:
        return memory_stats_dict(plugin_stats(index(device)))

    def memory_allocated(device: Any = None) -> int:
        return plugin_stats(index(device))["current"]

    def max_memory_allocated(device: Any = None) -> int:
        return plugin_stats(index(device))["peak"]

    def memory_reserved(device: Any = None) -> int:
        return plugin_stats(index(device))["reserved"]

    def max_memory_reserved(device: Any = None) -> int:
        return plugin_stats(index(device))["reserved_peak"]

    def reset_peak_memory_stats(device: Any = None) -> None:
        reset_peak(index(device))

    patches = {
        "memory_stats": memory_stats,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_reserved,
        "max_memory_reserved": max_memory_reserved,
        "reset_peak_memory_stats": reset_peak_memory_stats,
    }
    for name, fn in patches.items():
        fn.__doc__ = f"torchmem plugin version of torch.cuda.{name} (plugin counters)."
        original = getattr(memory, name, None)
        for module in (memory, torch.cuda):
            if getattr(module, name, None) is original:
                _originals.append((module, name, original))
                setattr(module, name, fn)


# -- one call for torchmem.enable() -------------------------------------------------------
class GpuRecording(NamedTuple):
    """What start_gpu_recording set up: the choice and the history source if any."""

    choice: GpuSourceChoice
    history: Any = None


def start_gpu_recording(profiler: Any, gpu_source: str | None = None, *,
                        history_interval_s: float = 1.0, warn: bool = True) -> GpuRecording:
    """Routes GPU allocations into ``profiler`` the best way this process allows.

    Installs the plugin (and makes ``profiler`` the recorder it feeds) when
    CUDA is present and not yet initialised; otherwise starts the CUDA
    history source. A fallback is announced with a RuntimeWarning.
    """
    from . import _native

    try:
        import torch

        available = bool(torch.cuda.is_available())
        initialized = bool(torch.cuda.is_initialized()) if available else False
    except Exception:
        available = initialized = False
    choice = choose_gpu_source(available, initialized, gpu_source, _installed)
    if choice.source == "plugin":
        try:
            install_allocator()
        except RuntimeError as exc:
            choice = GpuSourceChoice("history", f"the torchmem plugin could not be installed "
                                     f"({exc}); recording torch's allocation history instead.",
                                     fallback=True)
    if choice.fallback and warn:
        warnings.warn("torchmem: " + choice.message, RuntimeWarning, stacklevel=3)
    if choice.source == "plugin":
        _native.set_gpu_recorder(profiler)
        return GpuRecording(choice)
    if choice.source == "history":
        from .sources.cuda_history import CudaHistorySource

        history = CudaHistorySource(profiler, interval_s=history_interval_s,
                                    stacks=bool(getattr(profiler, "capture_stack_traces", False)))
        try:
            history.start()
        except Exception as exc:  # a torch without allocation history
            choice = GpuSourceChoice("none", f"{choice.message} But torch's allocation history "
                                     f"could not be started ({exc}): GPU allocations are not "
                                     "recorded.", fallback=True)
            if warn:
                warnings.warn("torchmem: " + choice.message, RuntimeWarning, stacklevel=2)
            return GpuRecording(choice)
        return GpuRecording(choice, history)
    return GpuRecording(choice)
