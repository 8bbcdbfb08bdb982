"""The run-time-built CUDA library: torchmem's CUDA allocator class and trace tracker.

``torchmem/_hook/cuda_allocator.cpp`` (a subclass of torch's
``c10::cuda::CUDACachingAllocator::CUDAAllocator``) and
``torchmem/_hook/cuda_trace_tracker.cpp`` (an ``AllocatorTraceTracker``) are
compiled together into one library against the installed torch and the CUDA
runtime headers, at first use, by the shared builder
(:mod:`torchmem.sources._build`: cached, built once under a lock). Neither
holds allocator logic: they get the table of torchmem._native's entry points
(``torchmem/_hook/cuda_hook_api.h``) and translate torch's calls.

The CUDA headers: ``$CUDA_HOME``, else the CUDA runtime package torch
depends on (with CUDA 13's ``crt/`` headers from ``nvidia-cuda-crt`` or
triton's bundled copy), else ``/usr/local/cuda``
(:mod:`torchmem.sources._cuda_headers`).

The library links against torch's ``libc10`` / ``libc10_cuda`` and the
``libcudart`` of that runtime package, which is the copy torch loaded.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from . import _build
from ._cuda_native import native
from ._build import BuildUnavailable
from ._cuda_headers import HeadersMissing, find_cuda_headers

__all__ = ["CudaHookUnavailable", "cuda_headers", "load_cuda_hook"]


class CudaHookUnavailable(BuildUnavailable):
    """The CUDA allocator class and trace tracker cannot be built here (message says why)."""


def _torch_cuda_major() -> str | None:
    import torch

    cuda = getattr(torch.version, "cuda", None)
    return cuda.split(".")[0] if cuda else None


def cuda_headers() -> tuple[str, list[str], Path | None]:
    """(include directory, extra include directories, libcudart to link or None).

    Raises CudaHookUnavailable saying what is missing (:mod:`._cuda_headers`
    has the search order).
    """
    try:
        found = find_cuda_headers(_torch_cuda_major())
    except HeadersMissing as exc:
        raise CudaHookUnavailable(str(exc)) from None
    return found.include, list(found.extra), found.cudart


def _check() -> None:
    if _torch_cuda_major() is None:
        raise CudaHookUnavailable("torch is a CPU-only build: there is no CUDA allocator to "
                                  "replace or trace")
    _, lib = _build.torch_paths()
    if not (lib / "libc10_cuda.so").is_file():
        raise CudaHookUnavailable(f"torch's libc10_cuda.so is missing under {lib}")


def _spec() -> _build.ModuleSpec:
    _check()
    include, extra, cudart = cuda_headers()
    libraries = ["c10", "c10_cuda"]
    library_dirs: list[str] = []
    if cudart is not None:
        library_dirs.append(str(cudart.parent))
        libraries.append(f":{cudart.name}")
    else:
        libraries.append("cudart")
    return _build.ModuleSpec(
        name="cuda_hook", what="torchmem's CUDA allocator and trace tracker",
        sources=(_build.HOOK_DIR / "cuda_allocator.cpp", _build.HOOK_DIR / "cuda_trace_tracker.cpp"),
        headers=(_build.HOOK_DIR / "cuda_hook_api.h", _build.HOOK_DIR / "cuda_hook_common.h"),
        include_dirs=(include, *extra), library_dirs=tuple(library_dirs),
        libraries=tuple(libraries))


def _setup(lib: ctypes.CDLL) -> None:
    errbuf = (ctypes.c_char_p, ctypes.c_size_t)
    lib.torchmem_cuda_hook_attach.argtypes = [ctypes.c_void_p]
    lib.torchmem_cuda_hook_attach.restype = ctypes.c_int
    lib.torchmem_cuda_allocator_supported.argtypes = []
    lib.torchmem_cuda_allocator_supported.restype = ctypes.c_int
    lib.torchmem_cuda_allocator_install.argtypes = list(errbuf)
    lib.torchmem_cuda_allocator_install.restype = ctypes.c_int
    lib.torchmem_cuda_allocator_active.argtypes = []
    lib.torchmem_cuda_allocator_active.restype = ctypes.c_int
    lib.torchmem_cuda_tracker_attach.argtypes = list(errbuf)
    lib.torchmem_cuda_tracker_attach.restype = ctypes.c_int
    lib.torchmem_cuda_tracker_set_stacks.argtypes = [ctypes.c_int, *errbuf]
    lib.torchmem_cuda_tracker_set_stacks.restype = ctypes.c_int
    if lib.torchmem_cuda_hook_attach(native().cuda_hook_api_address()) != 0:
        raise CudaHookUnavailable("the CUDA library was built for another torchmem")


_spec_error: CudaHookUnavailable | None = None


def load_cuda_hook() -> ctypes.CDLL:
    """The library, built if needed and loaded once per process.

    Raises CudaHookUnavailable (or BuildUnavailable) saying why it cannot be
    had; the failure is remembered.
    """
    global _spec_error
    if _spec_error is not None:
        raise _spec_error
    try:
        spec = _spec()
    except CudaHookUnavailable as exc:
        _spec_error = exc
        raise
    return _build.load_module(spec, _setup)


def call_with_error(fn, *args: object) -> tuple[int, str]:
    """Calls a library function whose last two arguments are an error buffer."""
    buf = ctypes.create_string_buffer(1024)
    status = fn(*args, buf, len(buf))
    return int(status), buf.value.decode("utf-8", "replace")
