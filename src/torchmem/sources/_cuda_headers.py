"""Where the CUDA runtime headers come from, for the CUDA library built at first use.

The CUDA allocator class and the trace tracker (``torchmem/_hook/``) include
``cuda_runtime_api.h`` (directly and through c10's CUDA headers). In order:

1. ``$CUDA_HOME`` / ``$CUDA_PATH`` (a CUDA toolkit);
2. the CUDA runtime package CUDA builds of torch depend on
   (``nvidia-cuda-runtime`` for CUDA 13, ``nvidia-cuda-runtime-cu12`` for
   12; the one of torch's CUDA major first): its ``include`` directory and
   its ``libcudart``, the copy torch loads;
3. ``/usr/local/cuda``.

CUDA 13 moved ``crt/host_defines.h`` and ``crt/host_config.h``, which the
runtime headers include, into ``nvidia-cuda-crt``, which torch does not
install. Under (2) they are looked for, in order, next to the runtime's
headers (where ``nvidia-cuda-crt`` installs them), in an installed
``nvidia-cuda-crt``, in triton's bundled CUDA headers
(``triton/backends/nvidia/include``; triton comes with every CUDA build of
torch on Linux), and in ``/usr/local/cuda/include``. That directory is
searched after the runtime's, so only what the runtime package lacks (the
``crt/`` headers: macros for host compilation) comes from it; with triton
3.6's CUDA 12.8 ``crt/`` the library is byte for byte the one built with
``nvidia-cuda-crt`` 13.0 (``scripts/check_cuda_build.sh`` checks it on every
CI run).

Standard library only, torch imported lazily: ``scripts/gpu_check.sh`` runs
this file before torchmem is built (``python src/torchmem/sources/_cuda_headers.py``
prints the directories, or why there are none, and exits 1 then).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["CudaHeaders", "HeadersMissing", "find_cuda_headers"]

_CRT = Path("crt") / "host_defines.h"
_TRITON_INCLUDE = Path("triton") / "backends" / "nvidia" / "include"


class HeadersMissing(Exception):
    """No usable CUDA runtime headers (the message says what to install)."""


@dataclass(frozen=True)
class CudaHeaders:
    """Include directories (``include`` first, then ``extra``) and the libcudart to link."""

    include: str
    extra: tuple[str, ...]
    cudart: Path | None
    crt_from: str  # where crt/ comes from, for messages ("" = with the headers)


def _name(dist: Any) -> str:
    return (dist.metadata.get("Name") or "").lower().replace("_", "-")


def _files(dist: Any) -> list[Path]:
    return [Path(dist.locate_file(f)) for f in (dist.files or [])]


def _runtime_dists(dists: list[Any], cuda_major: str | None) -> list[Any]:
    """The CUDA runtime packages, those of torch's CUDA major first."""
    found = []
    for dist in dists:
        name = _name(dist)
        if name.startswith("nvidia-cuda-runtime"):
            version = dist.version or ""
            matches = cuda_major is not None and (version.split(".")[0] == cuda_major
                                                  or name.endswith(f"-cu{cuda_major}"))
            found.append((0 if matches else 1, dist))
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def _crt_dir(include: Path, dists: list[Any], system: Path) -> tuple[Path, str] | None:
    """A directory holding crt/host_defines.h for the runtime headers in ``include``."""
    if (include / _CRT).is_file():
        return include, ""
    for dist in dists:
        name = _name(dist)
        if name.startswith("nvidia-cuda-crt"):
            for f in _files(dist):
                if f.name == "host_defines.h" and f.parent.name == "crt":
                    return f.parent.parent, f"{name} {dist.version}"
    for dist in dists:
        if _name(dist) == "triton":
            candidate = Path(dist.locate_file(_TRITON_INCLUDE))
            if (candidate / _CRT).is_file():
                return candidate, f"triton {dist.version}"
    if (system / "include" / _CRT).is_file():
        return system / "include", str(system)
    return None


def _crt_pin(dists: list[Any]) -> str:
    """The nvidia-cuda-crt requirement cuda-toolkit pins, for the message."""
    for dist in dists:
        if _name(dist) == "cuda-toolkit":
            for req in dist.requires or []:
                m = re.match(r"\s*(nvidia-cuda-crt\s*[=<>!~]=?\s*[^;\s]+)", req)
                if m:
                    return m.group(1).replace(" ", "")
    return "nvidia-cuda-crt"


def find_cuda_headers(cuda_major: str | None, *, dists: Iterable[Any] | None = None,
                      environ: Mapping[str, str] | None = None,
                      system: Path = Path("/usr/local/cuda")) -> CudaHeaders:
    """The CUDA headers to build against (see the module notes for the order).

    ``cuda_major``: torch's CUDA major ("13"), None for a CPU build. ``dists``
    (the installed distributions), ``environ`` and ``system`` are for tests.
    Raises HeadersMissing saying what to install.
    """
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            lib = next(iter(sorted((Path(home) / "lib64").glob("libcudart.so*"))), None)
            return CudaHeaders(str(Path(home) / "include"), (), lib, "")
    installed = list(metadata.distributions() if dists is None else dists)
    without_crt = None
    for dist in _runtime_dists(installed, cuda_major):
        files = _files(dist)
        header = next((f for f in files if f.name == "cuda_runtime_api.h"), None)
        if header is None:
            continue
        include = header.parent
        lib = next((f for f in files if f.name.startswith("libcudart.so")), None)
        crt = _crt_dir(include, installed, system)
        if crt is not None:
            extra = () if crt[0] == include else (str(crt[0]),)
            return CudaHeaders(str(include), extra, lib, crt[1])
        without_crt = without_crt or include
    if (system / "include" / "cuda_runtime_api.h").is_file() and \
            (system / "include" / _CRT).is_file():
        lib = next(iter(sorted((system / "lib64").glob("libcudart.so*"))), None)
        return CudaHeaders(str(system / "include"), (), lib, "")
    if without_crt is not None:
        raise HeadersMissing(
            f"the CUDA runtime headers in {without_crt} include crt/host_defines.h, which "
            f"CUDA 13 ships in another package, and neither it nor triton's copy is installed: "
            f"pip install \"{_crt_pin(installed)}\" (or set CUDA_HOME to a CUDA toolkit)")
    raise HeadersMissing(
        "no CUDA runtime headers found (cuda_runtime_api.h): install the CUDA runtime package "
        "of torch's CUDA version (nvidia-cuda-runtime), or set CUDA_HOME to a CUDA toolkit")


def _main() -> int:
    try:
        import torch

        cuda = getattr(torch.version, "cuda", None)
    except ImportError:
        cuda = None
    try:
        found = find_cuda_headers(cuda.split(".")[0] if cuda else None)
    except HeadersMissing as exc:
        print(f"no CUDA headers: {exc}")
        return 1
    crt = f"; crt/ from {found.crt_from} ({found.extra[0]})" if found.extra else ""
    print(f"{found.include}{crt}; libcudart {found.cudart or '(by name)'}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
