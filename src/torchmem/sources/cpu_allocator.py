"""CPU tensor tracking through a hook on c10's CPU allocator.

The hook (``torchmem/_hook/cpu_allocator_hook.cpp``) wraps the allocator
torch uses for every CPU storage and reports each allocation and free to the
recorder in C++: no Python runs per allocation (unless stacks are captured),
nothing runs per op, every thread is seen, and temporaries that never leave
an op are counted. It is the default host source; the dispatch-mode
:class:`~torchmem.sources.host.HostTracker` is the fallback.

c10's Allocator is a C++ class whose layout belongs to one torch build, so
the hook is compiled against the installed torch the first time it is needed
(about 1-2 s with g++) and cached per torch build and hook source in
``$TORCHMEM_CACHE_DIR`` (default ``~/.cache/torchmem``), by the builder all
run-time-built modules share (:mod:`torchmem.sources._build`). Without a C++
compiler or torch's headers, :func:`load_hook` raises
:class:`HookUnavailable` saying which.

Pinned memory comes from the accelerator's host allocator, not this one: on
CUDA builds of torch >= 2.8 the hook also wraps torch's CUDA host allocator
(:mod:`torchmem.sources.pinned`) while it runs, so pinned tensors are
recorded as "Pinned". What it does not see: pinned memory on older torch,
storages over memory torch does not own (``from_numpy``, shared memory from
DataLoader workers, mmap'ed loads).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from .. import _native
from . import _build
from ._build import BuildUnavailable

__all__ = ["CPUAllocatorHook", "HookUnavailable", "build_hook", "load_hook"]

_SOURCE = _build.HOOK_DIR / "cpu_allocator_hook.cpp"

# The CPU hook's name for the builder's error (one class for every module).
HookUnavailable = BuildUnavailable

cache_dir = _build.cache_dir

_SPEC = _build.ModuleSpec(name="cpu_allocator_hook", what="the CPU allocator hook",
                          sources=(_SOURCE,))


def build_hook(*, force: bool = False) -> Path:
    """Compiles the hook for the installed torch (once; cached) and returns its path.

    Raises HookUnavailable when there is no compiler, no torch headers, or
    the compiler fails (its last lines are in the message).
    """
    return _build.build_module(_SPEC, force=force)


def _setup(lib: ctypes.CDLL) -> None:
    lib.torchmem_cpu_hook_install.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.torchmem_cpu_hook_install.restype = ctypes.c_int
    lib.torchmem_cpu_hook_uninstall.argtypes = []
    lib.torchmem_cpu_hook_uninstall.restype = None
    lib.torchmem_cpu_hook_active.argtypes = []
    lib.torchmem_cpu_hook_active.restype = ctypes.c_int


def load_hook() -> ctypes.CDLL:
    """The hook library, built if needed and loaded once per process.

    A cached library that does not load (truncated, foreign) is rebuilt once.
    A failure is remembered: later calls raise it again without rebuilding.
    """
    return _build.load_module(_SPEC, _setup)


# Set once a hook has recorded anything in this process: from then on live
# storages may carry the hook's deleter, and adopting them through weak
# references as well would report their frees twice.
_started_once = False
# Started hooks, the one fed last: a hook started while another runs feeds
# its profiler until it stops, then the one below is fed again.
_stack: list[CPUAllocatorHook] = []


_pinned_running = False


def _start_pinned() -> str:
    """Wraps torch's CUDA host allocator where torch allows it; says what happened."""
    global _pinned_running
    from . import pinned

    why = pinned.pinned_unavailable_reason()
    if why is not None:
        return f"not recorded: {why}"
    try:
        pinned.install()
    except BuildUnavailable as exc:  # the CPU hook keeps running without it
        return f"not recorded: {exc}"
    _pinned_running = True
    return "recorded"


def _stop_pinned() -> None:
    global _pinned_running
    if _pinned_running:
        from . import pinned

        pinned.uninstall()
        _pinned_running = False


class CPUAllocatorHook:
    """Records every CPU storage allocation and free into ``profiler``.

    ``start()`` makes ``profiler`` the recorder the hook feeds and installs
    the hook; ``stop()`` stops recording allocations and restores torch's
    allocator, while frees of blocks recorded so far keep being reported,
    so the counters fall back to what is really live. One profiler is fed
    at a time: a hook started while another runs takes over until it stops,
    then the other is fed again (like nested context managers); each free
    goes to the profiler that recorded the allocation.

    ``adopt_existing``: on the first start in a process, CPU tensors that
    already exist are reported too (found through the garbage collector;
    their frees come from weak references on their storages).

    ``pinned``: on CUDA builds of torch, also wrap torch's CUDA host
    allocator while a hook runs (:mod:`torchmem.sources.pinned`), so pinned
    blocks are recorded as "Pinned". ``pinned_status`` says whether it runs,
    or why not.
    """

    def __init__(self, profiler: Any, *, adopt_existing: bool = True,
                 pinned: bool = True) -> None:
        self.profiler = profiler
        self.adopt_existing = adopt_existing
        self.pinned = pinned
        self.pinned_status = "not started"
        self._lib = load_hook()
        self._active = False

    @property
    def active(self) -> bool:
        """True between start() and stop() (fed, or waiting under a later hook)."""
        return self._active

    @property
    def fed(self) -> bool:
        """True while this hook's profiler is the one receiving allocations."""
        return bool(_stack) and _stack[-1] is self

    def _feed(self) -> None:
        _native.set_host_recorder(self.profiler)
        self.profiler.attach_native_source("cpu")

    def start(self) -> CPUAllocatorHook:
        """Begin recording CPU allocations of every thread. Idempotent."""
        global _started_once
        if self._active:
            return self
        below = _stack[-1] if _stack else None
        self._feed()
        if self.adopt_existing and not _started_once:
            from .host import HostTracker, tensors_in_gc

            HostTracker(self.profiler).adopt(tensors_in_gc(with_grads=True))
        alloc, free = _native.host_bridge_addresses()
        status = self._lib.torchmem_cpu_hook_install(alloc, free)
        if status != 0:
            if below is not None:
                below._feed()
            why = ("an allocator of higher priority is set" if status == -1
                   else "another allocator replaced torchmem's")
            raise HookUnavailable(f"torch's CPU allocator cannot be hooked: {why}")
        _started_once = True
        _stack.append(self)
        self._active = True
        self.pinned_status = _start_pinned() if self.pinned else "off (pinned=False)"
        return self

    def stop(self) -> None:
        """Stop recording allocations (frees of recorded blocks still count). Idempotent."""
        if not self._active:
            return
        self._active = False
        was_fed = self.fed
        _stack.remove(self)
        if not _stack:
            self._lib.torchmem_cpu_hook_uninstall()
            _stop_pinned()
        elif was_fed:
            _stack[-1]._feed()

    def __enter__(self) -> CPUAllocatorHook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
