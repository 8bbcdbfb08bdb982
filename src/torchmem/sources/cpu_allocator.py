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
``$TORCHMEM_CACHE_DIR`` (default ``~/.cache/torchmem``). Without a C++
compiler or torch's headers, :func:`load_hook` raises
:class:`HookUnavailable` saying which.

What it does not see: pinned memory (CUDA's host allocator is another
allocator), storages over memory torch does not own (``from_numpy``, shared
memory from DataLoader workers, mmap'ed loads).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch

from .. import _native

__all__ = ["CPUAllocatorHook", "HookUnavailable", "build_hook", "load_hook"]

_SOURCE = Path(__file__).resolve().parent.parent / "_hook" / "cpu_allocator_hook.cpp"
_BUILD_TIMEOUT_S = 180


class HookUnavailable(RuntimeError):
    """The CPU allocator hook cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    """Where built hooks are kept: $TORCHMEM_CACHE_DIR, else $XDG_CACHE_HOME/torchmem."""
    explicit = os.environ.get("TORCHMEM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchmem"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise HookUnavailable("no C++ compiler found (set CXX, or install g++)")


def _build_command(cxx: str, out: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    if not (include / "c10" / "core" / "CPUAllocator.h").is_file():
        raise HookUnavailable(f"torch's C++ headers are missing under {include}")
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", str(include), str(_SOURCE),
            "-o", str(out), "-L", str(lib), "-lc10", f"-Wl,-rpath,{lib}"]


def build_hook(*, force: bool = False) -> Path:
    """Compiles the hook for the installed torch (once; cached) and returns its path.

    Concurrent processes (the ranks of a distributed job) build it once: the
    build holds a lock file and publishes the library with an atomic rename.
    Raises HookUnavailable when there is no compiler, no torch headers, or
    the compiler fails (its last lines are in the message).
    """
    cxx = _compiler()
    directory = cache_dir()
    probe = _build_command(cxx, Path("OUT"))
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    for part in (torch.__version__, str(getattr(torch.version, "git_version", "")), *probe):
        key.update(part.encode() + b"\0")
    version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    out = directory / f"cpu_allocator_hook-torch{version}-{key.hexdigest()[:16]}.so"
    if out.is_file() and not force:
        return out
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(directory / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out.is_file() and not force:
                return out  # another process built it while we waited
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            try:
                done = subprocess.run(_build_command(cxx, tmp), capture_output=True, text=True,
                                      timeout=_BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                    raise HookUnavailable(f"{cxx} failed to build the CPU allocator hook:\n{tail}")
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise HookUnavailable(f"cannot build the CPU allocator hook in {directory}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HookUnavailable(f"building the CPU allocator hook took over {exc.timeout} s") from exc
    return out


_lib: ctypes.CDLL | None = None
_lib_error: HookUnavailable | None = None  # a failure is not retried in this process
_lib_lock = threading.Lock()


def load_hook() -> ctypes.CDLL:
    """The hook library, built if needed and loaded once per process.

    A cached library that does not load (truncated, foreign) is rebuilt once.
    A failure is remembered: later calls raise it again without rebuilding.
    """
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise _lib_error
        try:
            _lib = _load_locked()
        except HookUnavailable as exc:
            _lib_error = exc
            raise
        return _lib


def _load_locked() -> ctypes.CDLL:
    path = build_hook()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        path = build_hook(force=True)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise HookUnavailable(f"the CPU allocator hook does not load: {exc}") from exc
    lib.torchmem_cpu_hook_install.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.torchmem_cpu_hook_install.restype = ctypes.c_int
    lib.torchmem_cpu_hook_uninstall.argtypes = []
    lib.torchmem_cpu_hook_uninstall.restype = None
    lib.torchmem_cpu_hook_active.argtypes = []
    lib.torchmem_cpu_hook_active.restype = ctypes.c_int
    return lib


# Set once a hook has recorded anything in this process: from then on live
# storages may carry the hook's deleter, and adopting them through weak
# references as well would report their frees twice.
_started_once = False
# Started hooks, the one fed last: a hook started while another runs feeds
# its profiler until it stops, then the one below is fed again.
_stack: list[CPUAllocatorHook] = []


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
    """

    def __init__(self, profiler: Any, *, adopt_existing: bool = True) -> None:
        self.profiler = profiler
        self.adopt_existing = adopt_existing
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
        elif was_fed:
            _stack[-1]._feed()

    def __enter__(self) -> CPUAllocatorHook:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
