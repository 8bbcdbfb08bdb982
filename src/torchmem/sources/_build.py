"""Building, caching and loading the C++ torchmem compiles against the user's torch.

c10's and ATen's allocator classes have a layout that belongs to one torch
build, and torchmem's own module is built without torch, so the code that
subclasses them (``torchmem/_hook/*.cpp``: the CPU allocator hook, the CUDA
allocator class and trace tracker, the pinned-memory wrapper) is compiled the
first time it is needed, with the installed torch's headers:

- one ``c++ -O2 -std=c++17 -shared ...`` per module (1-20 s with g++);
- cached in ``$TORCHMEM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/torchmem`` or
  ``~/.cache/torchmem``), named by the module, torch's version and a hash of
  the sources, torch's build and the command;
- built once by concurrent processes (the ranks of a distributed job): the
  build holds a lock file and publishes the library with an atomic rename;
  a process forked while its parent builds waits for that build, or builds
  itself, but never for a lock no thread of its own will release;
- a cached library that fails to load is rebuilt once.

Without a compiler or headers, :func:`build_module` raises
:class:`BuildUnavailable` saying which; callers fall back and say so.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["BuildUnavailable", "ModuleSpec", "build_module", "cache_dir", "compiler",
           "load_module", "torch_paths"]

HOOK_DIR = Path(__file__).resolve().parent.parent / "_hook"
_BUILD_TIMEOUT_S = 300


class BuildUnavailable(RuntimeError):
    """A run-time-built module cannot be built or loaded here (the message says why)."""


@dataclass(frozen=True)
class ModuleSpec:
    """What to compile into one shared library, and how to name it in messages.

    ``sources`` are compiled; ``headers`` only go into the cache key.
    ``include_dirs`` are searched as system headers (their warnings are not
    ours). ``libraries`` are ``-l`` arguments (``"c10"`` or ``":libcudart.so.13"``).
    """

    name: str
    what: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    include_dirs: tuple[str, ...] = ()
    library_dirs: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ("c10",)
    defines: tuple[str, ...] = ()
    check: Callable[[], None] | None = field(default=None, compare=False)


def cache_dir() -> Path:
    """Where built libraries are kept: $TORCHMEM_CACHE_DIR, else $XDG_CACHE_HOME/torchmem."""
    explicit = os.environ.get("TORCHMEM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchmem"


def compiler() -> str:
    """$CXX, else the first of c++, g++, clang++ on PATH."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise BuildUnavailable("no C++ compiler found (set CXX, or install g++)")


def torch_paths() -> tuple[Path, Path]:
    """torch's include and library directories."""
    import torch

    torch_dir = Path(torch.__file__).resolve().parent
    return torch_dir / "include", torch_dir / "lib"


def _command(spec: ModuleSpec, cxx: str, out: Path) -> list[str]:
    import torch

    include, lib = torch_paths()
    if not (include / "c10" / "core" / "Allocator.h").is_file():
        raise BuildUnavailable(f"torch's C++ headers are missing under {include}")
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-D{d}" for d in spec.defines)]
    for d in (str(include), str(include / "torch" / "csrc" / "api" / "include"),
              *spec.include_dirs):
        cmd += ["-isystem", d]
    cmd += ["-I", str(HOOK_DIR), *(str(s) for s in spec.sources), "-o", str(out)]
    for d in (str(lib), *spec.library_dirs):
        cmd += ["-L", d, f"-Wl,-rpath,{d}"]
    cmd += [f"-l{name}" for name in spec.libraries]
    return cmd


def _library_path(spec: ModuleSpec, cxx: str) -> Path:
    import torch

    key = hashlib.sha256()
    for path in (*spec.sources, *spec.headers):
        key.update(Path(path).read_bytes())
    probe = _command(spec, cxx, Path("OUT"))
    for part in (torch.__version__, str(getattr(torch.version, "git_version", "")), *probe):
        key.update(part.encode() + b"\0")
    version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return cache_dir() / f"{spec.name}-torch{version}-{key.hexdigest()[:16]}.so"


def build_module(spec: ModuleSpec, *, force: bool = False) -> Path:
    """Compiles ``spec`` for the installed torch (once; cached) and returns its path.

    Raises BuildUnavailable when a prerequisite is missing (``spec.check``),
    there is no compiler, no torch headers, or the compiler fails (its last
    lines are in the message).
    """
    if spec.check is not None:
        spec.check()
    cxx = compiler()
    out = _library_path(spec, cxx)
    if out.is_file() and not force:
        return out
    directory = out.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(directory / ".build.lock", "w") as lock:
            _lock_file(lock, spec)
            try:
                if out.is_file() and not force:
                    return out  # another process built it while we waited
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                try:
                    returncode, output = _compile(_command(spec, cxx, tmp))
                    if returncode != 0:
                        tail = "\n".join(output.strip().splitlines()[-5:])
                        raise BuildUnavailable(f"{cxx} failed to build {spec.what}:\n{tail}")
                    os.replace(tmp, out)
                finally:
                    tmp.unlink(missing_ok=True)
            finally:
                # Explicitly: a child forked during the build holds this file
                # open too, and closing our copy would leave it locked.
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as exc:
        raise BuildUnavailable(f"cannot build {spec.what} in {directory}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildUnavailable(f"building {spec.what} took over {exc.timeout} s") from exc
    return out


# Held while the compiler is being started, and taken by os.fork(): a child
# forked in between would inherit the pipe subprocess uses to learn that the
# exec succeeded, and the build thread's read of it would then wait for that
# child to exit (while the child waits for the build).
_spawning = threading.RLock()


def _compile(cmd: list[str]) -> tuple[int, str]:
    # Output to a file, not a pipe, for the same reason: nothing here waits
    # for every copy of a descriptor to close, only for the compiler.
    with tempfile.TemporaryFile(mode="w+") as log:
        with _spawning:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        log.seek(0)
        return returncode, log.read()


def _lock_file(lock: Any, spec: ModuleSpec) -> None:
    # Bounded: the holder may be a process that stopped mid-build, or a
    # forked child that inherited the open file and never closes it.
    deadline = time.monotonic() + _BUILD_TIMEOUT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BuildUnavailable(f"another process has been building {spec.what} for "
                                       f"over {_BUILD_TIMEOUT_S} s (lock file {lock.name})")
            time.sleep(0.05)


_loaded: dict[str, Any] = {}
_failed: dict[str, BuildUnavailable] = {}  # a failure is not retried in this process
# One lock per module, so the CPU hook never waits for the autograd hook's
# 15 s build; replaced in a forked child, whose copies may be held by a
# parent thread that does not exist there.
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _module_lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def _after_fork_in_child() -> None:
    global _locks_guard, _spawning
    _locks_guard = threading.Lock()
    _locks.clear()
    _spawning = threading.RLock()


def _before_fork() -> None:
    _spawning.acquire()


def _after_fork_in_parent() -> None:
    _spawning.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _open_cdll(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))


def load_module(spec: ModuleSpec, setup: Callable[[Any], None] | None = None,
                open_library: Callable[[Path], Any] = _open_cdll) -> Any:
    """The library of ``spec``, built if needed and loaded once per process.

    ``open_library`` loads the built file (default: ``ctypes.CDLL``; a CPython
    extension is imported instead) and raises OSError or ImportError when it
    cannot. ``setup`` declares the library's functions (argtypes, restype)
    and may raise BuildUnavailable. A cached library that does not load
    (truncated, foreign) is rebuilt once. A failure is remembered: later
    calls raise it again without rebuilding.
    """
    with _module_lock(spec.name):
        if spec.name in _loaded:
            return _loaded[spec.name]
        if spec.name in _failed:
            raise _failed[spec.name]
        try:
            path = build_module(spec)
            try:
                lib = open_library(path)
            except (OSError, ImportError):
                path = build_module(spec, force=True)
                try:
                    lib = open_library(path)
                except (OSError, ImportError) as exc:
                    raise BuildUnavailable(f"{spec.what} does not load: {exc}") from exc
            if setup is not None:
                setup(lib)
        except BuildUnavailable as exc:
            _failed[spec.name] = exc
            raise
        _loaded[spec.name] = lib
        return lib
