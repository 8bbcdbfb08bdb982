"""ctypes declarations of the C entry points the CUDA sources use in torchmem._native.

The plugin's and the trace tracker's native halves are plain C functions of
torchmem's own extension module (csrc/cuda_plugin.hpp, csrc/cuda_trace.hpp);
torchmem.cuda and torchmem.sources.cuda_tracker call them through this one
table of declarations. It is also the CUDA sources' one door to the module
itself (:func:`native`): import-linter cannot see a C++ extension and reads
``from .. import _native`` as an import of the whole package (pyproject.toml
lists this module among those it ignores for that).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

__all__ = ["BLOCK", "HOOK_API", "TRACE_SEGMENT", "clib", "hook_api", "native", "read_text"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def native() -> Any:
    """torchmem._native, the C++ extension."""
    from .. import _native

    return _native


class BLOCK(ctypes.Structure):
    """TorchmemBlock (torchmem/_hook/cuda_hook_api.h)."""

    _fields_ = [("address", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("stream", ctypes.c_uint64), ("device", ctypes.c_int32),
                ("flags", ctypes.c_uint32)]


class TRACE_SEGMENT(ctypes.Structure):
    """TorchmemTraceSegment (csrc/cuda_trace.hpp)."""

    _fields_ = [("address", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("stream", ctypes.c_uint64), ("allocated", ctypes.c_uint64),
                ("largest_free", ctypes.c_uint64), ("blocks", ctypes.c_uint32),
                ("device", ctypes.c_int32), ("expandable", ctypes.c_uint32),
                ("reserved_", ctypes.c_uint32)]


_u64, _i32, _sz, _vp = ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p


class HOOK_API(ctypes.Structure):
    """TorchmemCudaHookApi (torchmem/_hook/cuda_hook_api.h), field for field."""

    _fields_ = [
        ("version", ctypes.c_uint32), ("size", ctypes.c_uint32),
        ("alloc", ctypes.CFUNCTYPE(_i32, ctypes.POINTER(_vp), _sz, _i32, _vp, ctypes.c_uint)),
        ("free", ctypes.CFUNCTYPE(None, _vp)),
        ("record_stream", ctypes.CFUNCTYPE(None, _vp, _vp, _i32)),
        ("init", ctypes.CFUNCTYPE(None, _i32)),
        ("empty_cache", ctypes.CFUNCTYPE(None)),
        ("set_memory_fraction", ctypes.CFUNCTYPE(None, ctypes.c_double, _i32)),
        ("memory_fraction", ctypes.CFUNCTYPE(ctypes.c_double, _i32)),
        ("largest_free_block", ctypes.CFUNCTYPE(_u64, _i32)),
        ("base_allocation", ctypes.CFUNCTYPE(_vp, _vp, ctypes.POINTER(_sz))),
        ("stats", ctypes.CFUNCTYPE(_i32, _i32, ctypes.POINTER(_u64), _i32)),
        ("reset_peak", ctypes.CFUNCTYPE(None, _i32)),
        ("reset_accumulated", ctypes.CFUNCTYPE(None, _i32)),
        ("live_blocks", ctypes.CFUNCTYPE(_sz, _vp, _sz)),
        ("capture_begin", ctypes.CFUNCTYPE(_i32, _i32)),
        ("capture_end", ctypes.CFUNCTYPE(None, _i32, _vp)),
        ("enable_peer_access", ctypes.CFUNCTYPE(_i32, _i32, _i32)),
        ("mem_info", ctypes.CFUNCTYPE(_i32, _i32, ctypes.POINTER(_u64), ctypes.POINTER(_u64))),
        ("last_message", ctypes.CFUNCTYPE(_sz, ctypes.c_char_p, _sz)),
        ("backend_name", ctypes.CFUNCTYPE(ctypes.c_char_p)),
        ("trace_event", ctypes.CFUNCTYPE(None, _i32, _i32, _u64, _u64, _u64)),
        ("stash_stack", ctypes.CFUNCTYPE(None)),
        ("pinned_alloc", ctypes.CFUNCTYPE(_i32, _vp, _sz)),
        ("pinned_free", ctypes.CFUNCTYPE(None, _vp)),
    ]


def hook_api() -> HOOK_API:
    """The table torchmem._native hands to the run-time-built libraries."""
    return HOOK_API.from_address(native().cuda_hook_api_address())


def _declare(lib: ctypes.CDLL) -> None:
    u64, i32, sz, vp = ctypes.c_uint64, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
    sigs: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "torchmem_malloc": (vp, (sz, i32, vp)),
        "torchmem_free": (None, (vp, sz, i32, vp)),
        "torchmem_init": (None, (i32,)),
        "torchmem_reset": (None, ()),
        "torchmem_record_stream": (None, (vp, vp)),
        "torchmem_set_memory_fraction": (None, (ctypes.c_double, i32)),
        "torchmem_base_alloc": (vp, (vp, ctypes.POINTER(sz))),
        "torchmem_plugin_set_backend": (i32, (ctypes.c_char_p,)),
        "torchmem_plugin_backend": (ctypes.c_char_p, ()),
        "torchmem_plugin_set_oom_throws": (None, (i32,)),
        "torchmem_plugin_stats": (i32, (i32, ctypes.POINTER(u64), i32)),
        "torchmem_plugin_reset_peak": (None, (i32,)),
        "torchmem_plugin_reset_accumulated": (None, (i32,)),
        "torchmem_plugin_live_blocks": (u64, ()),
        "torchmem_plugin_bench": (u64, (u64,)),
        "torchmem_plugin_bench_batched": (u64, (u64, u64)),
        "torchmem_fake_clear": (None, ()),
        "torchmem_fake_fail_next": (None, (i32,)),
        "torchmem_fake_fail_fences": (None, (i32,)),
        "torchmem_fake_fail_syncs": (None, (i32,)),
        "torchmem_fake_set_mem_info": (None, (u64, u64)),
        "torchmem_fake_set_capture": (None, (i32,)),
        "torchmem_cuda_alloc": (i32, (ctypes.POINTER(vp), sz, i32, vp, ctypes.c_uint)),
        "torchmem_cuda_free": (None, (vp,)),
        "torchmem_cuda_record_stream": (None, (vp, vp, i32)),
        "torchmem_cuda_memory_fraction": (ctypes.c_double, (i32,)),
        "torchmem_cuda_largest_free_block": (u64, (i32,)),
        "torchmem_cuda_capture_begin": (i32, (i32,)),
        "torchmem_cuda_capture_end": (None, (i32, vp)),
        "torchmem_cuda_enable_peer_access": (i32, (i32, i32)),
        "torchmem_cuda_mem_info": (i32, (i32, ctypes.POINTER(u64), ctypes.POINTER(u64))),
        "torchmem_cuda_live_blocks": (sz, (vp, sz)),
        "torchmem_cuda_hook_api": (vp, ()),
        "torchmem_pinned_alloc": (i32, (vp, sz)),
        "torchmem_pinned_free": (None, (vp,)),
        "torchmem_cuda_trace_event": (None, (i32, i32, u64, u64, u64)),
        "torchmem_cuda_trace_set_recording": (None, (i32,)),
        "torchmem_cuda_trace_set_adopting": (None, (i32,)),
        "torchmem_cuda_trace_adopt_block": (i32, (i32, u64, u64, u64)),
        "torchmem_cuda_trace_adopt_segment": (i32, (i32, u64, u64, u64, i32)),
        "torchmem_cuda_trace_reset": (None, ()),
        "torchmem_cuda_trace_replay_live": (_sz, ()),
        "torchmem_cuda_trace_stats": (i32, (i32, ctypes.POINTER(u64), i32)),
        "torchmem_cuda_trace_reset_peak": (None, (i32,)),
        "torchmem_cuda_trace_fragmentation": (u64, (i32, u64)),
        "torchmem_cuda_trace_segments": (sz, (i32, vp, sz)),
        "torchmem_cuda_trace_last_oom": (i32, (ctypes.POINTER(u64), i32)),
        "torchmem_cuda_trace_bench": (u64, (u64,)),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    for name in ("torchmem_plugin_last_oom_message", "torchmem_cuda_runtime_description",
                 "torchmem_fake_log", "torchmem_cuda_last_message"):
        getattr(lib, name).restype = sz
        getattr(lib, name).argtypes = (ctypes.c_char_p, sz)


def clib() -> ctypes.CDLL:
    """torchmem._native opened with ctypes, every CUDA entry point declared."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(native().__file__)
            _declare(lib)
            _lib = lib
        return _lib


def read_text(fn: Any) -> str:
    """The text of a (buf, len) -> full length C function."""
    n = fn(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    fn(buf, n + 1)
    return buf.value.decode("utf-8", "replace")


def u64_array(fn: Any, device: int, count: int) -> list[int]:
    """A (device, uint64_t* out, len) -> written C function's values."""
    values = (ctypes.c_uint64 * count)()
    n = fn(int(device), values, count)
    return [int(values[i]) for i in range(n)]
