"""The run-time-built CUDA library: torchmem's CUDA allocator class and trace tracker.

``torchmem/_hook/cuda_allocator.cpp`` (a subclass of torch's
``c10::cuda::CUDACachingAllocator::CUDAAllocator``) and
``torchmem/_hook/cuda_trace_tracker.cpp`` (an ``AllocatorTraceTracker``) are
compiled together into one library against the installed torch and the CUDA
runtime headers, at first use, by the shared builder
(:mod:`torchmem.sources._build`: cached, built once under a lock). Neither
holds allocator logic: they get the table of torchmem._native's entry points
(``torchmem/_hook/cuda_hook_api.h``) and translate torch's calls.

Where the CUDA headers come from, in order:

1. ``$CUDA_HOME`` / ``$CUDA_PATH`` (a CUDA toolkit);
2. the CUDA runtime package CUDA builds of torch depend on (found from the
   installed distributions torch requires, e.g. ``nvidia-cuda-runtime`` for
   CUDA 13, ``nvidia-cuda-runtime-cu12`` for CUDA 12): its ``include``
   directory. CUDA 13 moved ``crt/host_defines.h``, which the runtime headers
   include, into ``nvidia-cuda-crt``, which torch does not install: without
   it the message names the package and version to install;
3. ``/usr/local/cuda``.

The library links against torch's ``libc10`` / ``libc10_cuda`` and the
``libcudart`` of that runtime package, which is the copy torch loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
from importlib import metadata
from pathlib import Path

from . import _build
from ._cuda_native import native
from ._build import BuildUnavailable

__all__ = ["CudaHookUnavailable", "cuda_headers", "load_cuda_hook"]


class CudaHookUnavailable(BuildUnavailable):
    """The CUDA allocator class and trace tracker cannot be built here (message says why)."""


def _dist_files(dist: metadata.Distribution) -> list[Path]:
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def _torch_cuda_major() -> str | None:
    import torch

    cuda = getattr(torch.version, "cuda", None)
    return cuda.split(".")[0] if cuda else None


def _runtime_dists() -> list[metadata.Distribution]:
    """The installed CUDA runtime packages, the ones torch's CUDA major matches first."""
    major = _torch_cuda_major()
    found = []
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name.startswith("nvidia-cuda-runtime"):
            version = dist.version or ""
            matches = major is not None and (version.split(".")[0] == major
                                             or name.endswith(f"-cu{major}"))
            found.append((0 if matches else 1, dist))
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def _crt_pin() -> str:
    """The nvidia-cuda-crt requirement cuda-toolkit pins, for the message."""
    try:
        for req in metadata.requires("cuda-toolkit") or []:
            m = re.match(r"\s*(nvidia-cuda-crt\s*[=<>!~]=?\s*[^;\s]+)", req)
            if m:
                return m.group(1).replace(" ", "")
    except metadata.PackageNotFoundError:
        pass
    return "nvidia-cuda-crt"


def cuda_headers() -> tuple[str, list[str], Path | None]:
    """(include directory, extra include directories, libcudart to link or None).

    Raises CudaHookUnavailable saying what is missing.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            lib = next((p for p in sorted((Path(home) / "lib64").glob("libcudart.so*"))), None)
            return str(Path(home) / "include"), [], lib
    missing_crt = None
    for dist in _runtime_dists():
        files = _dist_files(dist)
        header = next((f for f in files if f.name == "cuda_runtime_api.h"), None)
        if header is None:
            continue
        include = header.parent
        lib = next((f for f in files if f.name.startswith("libcudart.so")), None)
        if (include / "crt" / "host_defines.h").is_file():
            return str(include), [], lib
        missing_crt = (include, lib)
    system = Path("/usr/local/cuda/include")
    if (system / "cuda_runtime_api.h").is_file() and (system / "crt" / "host_defines.h").is_file():
        lib = next(iter(sorted(Path("/usr/local/cuda/lib64").glob("libcudart.so*"))), None)
        return str(system), [], lib
    if missing_crt is not None:
        raise CudaHookUnavailable(
            f"the CUDA runtime headers in {missing_crt[0]} include crt/host_defines.h, which "
            f"CUDA 13 ships in another package: pip install \"{_crt_pin()}\" (or set CUDA_HOME "
            "to a CUDA toolkit)")
    raise CudaHookUnavailable(
        "no CUDA runtime headers found (cuda_runtime_api.h): install the CUDA runtime package "
        "of torch's CUDA version (nvidia-cuda-runtime), or set CUDA_HOME to a CUDA toolkit")


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
