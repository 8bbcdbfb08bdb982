"""Pinned host memory: a wrapper of torch's CUDA host allocator.

torch >= 2.8 allocates every pinned block (``pin_memory()``,
``torch.empty(..., pin_memory=True)``, DataLoader's pin-memory thread)
through ``at::getHostAllocator(kCUDA)``, which ``at::setHostAllocator`` can
replace. The wrapper (``torchmem/_hook/pinned_host_allocator.cpp``, built
against the installed torch on first use) calls torch's allocator and reports
each block handed out and given back as "Pinned" host memory (device -1) to
the recorder the CPU allocator hook feeds, with the caller's stack when stack
capture is on. It sees every thread; no Python runs per block.

:class:`~torchmem.sources.cpu_allocator.CPUAllocatorHook` starts it on CUDA
builds of torch, so ``torchmem.enable()`` records pinned memory by default.

What it does not see, exactly:

- on torch < 2.8 (no ``at::setHostAllocator``): nothing; the dispatch-mode
  tracker (``enable(host="dispatch")``) labels pinned tensors on its thread;
- memory pinned by ``cudaHostRegister`` outside torch, or by another library;
- the caching: torch's host allocator keeps freed pinned blocks for reuse;
  torchmem records the blocks in use (``torch.cuda.host_memory_stats()``
  has torch's reserved figures).
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import _build
from ._cuda_native import native
from ._build import BuildUnavailable

__all__ = ["PinnedMemoryHook", "PinnedUnavailable", "load_pinned_hook", "pinned_unavailable_reason"]

_SPEC = _build.ModuleSpec(
    name="pinned_host_allocator", what="the pinned-memory wrapper",
    sources=(_build.HOOK_DIR / "pinned_host_allocator.cpp",),
    headers=(_build.HOOK_DIR / "cuda_hook_api.h",),
    libraries=("c10", "torch_cpu"))


class PinnedUnavailable(BuildUnavailable):
    """torch's CUDA host allocator cannot be wrapped here (the message says why)."""


def pinned_unavailable_reason() -> str | None:
    """Why pinned memory cannot be recorded with this torch, or None when it can."""
    import torch

    if getattr(torch.version, "cuda", None) is None:
        return "torch is a CPU-only build: it has no CUDA host allocator"
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 8):
        return (f"torch {torch.__version__} has no at::setHostAllocator (torch >= 2.8): pinned "
                "memory is not recorded; enable(host='dispatch') labels pinned tensors")
    return None


def _setup(lib: ctypes.CDLL) -> None:
    for name in ("torchmem_pinned_install", "torchmem_pinned_active", "torchmem_pinned_supported"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    lib.torchmem_pinned_uninstall.argtypes = []
    lib.torchmem_pinned_uninstall.restype = None
    lib.torchmem_pinned_attach.argtypes = [ctypes.c_void_p]
    lib.torchmem_pinned_attach.restype = ctypes.c_int
    if lib.torchmem_pinned_attach(native().cuda_hook_api_address()) != 0:
        raise PinnedUnavailable("the pinned-memory wrapper was built for another torchmem")


def load_pinned_hook() -> ctypes.CDLL:
    """The wrapper's library, built if needed and loaded once per process."""
    return _build.load_module(_SPEC, _setup)


_INSTALL_ERRORS = {
    -1: "torch has no CUDA host allocator registered (a CPU-only build)",
    -2: "another host allocator replaced torchmem's",
    -3: "a CUDA host allocator of higher priority is set",
    -4: "torch < 2.8 has no at::setHostAllocator",
}


def install() -> None:
    """Makes the wrapper torch's CUDA host allocator and records (idempotent)."""
    lib = load_pinned_hook()
    status = lib.torchmem_pinned_install()
    if status != 0:
        raise PinnedUnavailable("torch's CUDA host allocator cannot be wrapped: "
                                + _INSTALL_ERRORS.get(status, f"status {status}"))


def uninstall() -> None:
    """Stops recording pinned allocations (frees of recorded blocks still count)."""
    lib = load_pinned_hook()
    lib.torchmem_pinned_uninstall()


class PinnedMemoryHook:
    """Records pinned host blocks into ``profiler`` (type "Pinned", device -1).

    For use without the CPU allocator hook; ``CPUAllocatorHook`` already
    starts the wrapper on CUDA builds. ``start()`` makes ``profiler`` the
    recorder host hooks feed.
    """

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> "PinnedMemoryHook":
        why = pinned_unavailable_reason()
        if why is not None:
            raise PinnedUnavailable(why)
        native().set_host_recorder(self.profiler)
        self.profiler.attach_native_source("cpu")
        install()
        self._active = True
        return self

    def stop(self) -> None:
        if self._active:
            uninstall()
            self._active = False

    def __enter__(self) -> "PinnedMemoryHook":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
