"""Shared by the CUDA tests that drive the plugin's entry points on the fake
backend (it logs every call the plugin makes and fails on demand)."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import Iterator

import torchmem
from torchmem import _native
from torchmem import cuda as tcuda

GiB = 1 << 30
lib = tcuda._clib()
UNIFYING = 0xf000  # the fake backend's per-device unifying stream: 0xf000 + device

# The C-function interface as torch's CUDAPluggableAllocator calls it.
malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(
    tcuda._address("torchmem_malloc"))
free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(
    tcuda._address("torchmem_free"))
record_stream = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(
    tcuda._address("torchmem_record_stream"))


def alloc(size: int, device: int = 0, stream: int = 0, flags: int = 0) -> tuple[int, int]:
    """The compiled allocator class's call: (status, pointer)."""
    out = ctypes.c_void_p()
    status = lib.torchmem_cuda_alloc(ctypes.byref(out), size, device, stream, flags)
    return status, out.value or 0


def detach_recorder() -> None:
    try:
        _native.set_gpu_recorder(None)
    except TypeError:  # a binding that does not take None: attach an idle recorder
        idle = _native.Recorder(1024)
        idle.enabled = False
        _native.set_gpu_recorder(idle)


def fake_log() -> list[str]:
    return tcuda._read_text(lib.torchmem_fake_log).splitlines()


@contextmanager
def fake_backend_profiler() -> Iterator[torchmem.MemoryProfiler]:
    """A profiler the plugin feeds, on a fresh fake backend; checks nothing leaks."""
    tcuda.set_backend("fake")
    tcuda._set_oom_throws(False)
    lib.torchmem_fake_fail_next(0)
    lib.torchmem_fake_set_mem_info(0, 0)
    lib.torchmem_fake_set_capture(1)
    lib.torchmem_fake_clear()
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    _native.set_gpu_recorder(p)
    try:
        yield p
    finally:
        detach_recorder()
        for d in range(4):
            lib.torchmem_set_memory_fraction(1.0, d)
        lib.torchmem_fake_fail_next(0)
        lib.torchmem_fake_fail_fences(0)
        lib.torchmem_fake_fail_syncs(0)
        lib.torchmem_fake_set_capture(1)
        p.close()
        assert tcuda.live_blocks() == 0, "a test left plugin blocks live"
        tcuda.set_backend("host")
