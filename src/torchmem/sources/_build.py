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
import threading
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
            fcntl.flock(lock, fcntl.LOCK_EX)
            if out.is_file() and not force:
                return out  # another process built it while we waited
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            try:
                done = subprocess.run(_command(spec, cxx, tmp), capture_output=True, text=True,
                                      timeout=_BUILD_TIMEOUT_S)
                if done.returncode != 0:
                    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
                    raise BuildUnavailable(f"{cxx} failed to build {spec.what}:\n{tail}")
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise BuildUnavailable(f"cannot build {spec.what} in {directory}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildUnavailable(f"building {spec.what} took over {exc.timeout} s") from exc
    return out


_loaded: dict[str, Any] = {}
_failed: dict[str, BuildUnavailable] = {}  # a failure is not retried in this process
_lock = threading.Lock()


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
    with _lock:
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
