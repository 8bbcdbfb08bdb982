"""Where the CUDA allocator class's headers come from (torchmem.sources._cuda_headers),
on fake installations: the layouts of torch's CUDA 13 wheels, with and
without nvidia-cuda-crt, triton's bundled copy, CUDA_HOME, /usr/local/cuda."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torchmem.sources import _cuda_headers
from torchmem.sources._cuda_headers import HeadersMissing, find_cuda_headers


class FakeDist:
    """What find_cuda_headers reads of an importlib.metadata.Distribution."""

    def __init__(self, root: Path, name: str, version: str, files: list[str],
                 requires: list[str] | None = None) -> None:
        self.root, self.metadata, self.version = root, {"Name": name}, version
        self.files, self.requires = files, requires
        for f in files:
            path = root / f
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def locate_file(self, path: object) -> Path:
        return self.root / str(path)


def runtime(site: Path, version: str = "13.0.96") -> FakeDist:
    return FakeDist(site, "nvidia-cuda-runtime", version,
                    ["nvidia/cu13/include/cuda_runtime_api.h", "nvidia/cu13/lib/libcudart.so.13"])


def crt(site: Path) -> FakeDist:
    return FakeDist(site, "nvidia-cuda-crt", "13.0.88", ["nvidia/cu13/include/crt/host_defines.h"])


def triton(site: Path) -> FakeDist:
    return FakeDist(site, "triton", "3.6.0",
                    ["triton/backends/nvidia/include/crt/host_defines.h",
                     "triton/backends/nvidia/include/cuda_runtime_api.h"])


def toolkit(site: Path) -> FakeDist:
    return FakeDist(site, "cuda-toolkit", "13.0.2", [], requires=[
        "nvidia-cuda-runtime==13.0.96.*; extra == 'cudart'",
        "nvidia-cuda-crt==13.0.88.*; extra == 'crt'"])


def find(dists: list[FakeDist], tmp_path: Path, **kw: object):
    kw.setdefault("environ", {})
    kw.setdefault("system", tmp_path / "no-system-cuda")
    return find_cuda_headers("13", dists=dists, **kw)


def test_crt_installed_next_to_the_runtime_headers(tmp_path: Path) -> None:
    site = tmp_path / "site"
    found = find([runtime(site), crt(site)], tmp_path)
    assert found.include == str(site / "nvidia/cu13/include")
    assert found.extra == ()  # nvidia-cuda-crt installs into the same directory
    assert found.cudart == site / "nvidia/cu13/lib/libcudart.so.13"


def test_crt_from_triton_is_searched_after_the_runtime_headers(tmp_path: Path) -> None:
    site = tmp_path / "site"
    found = find([runtime(site), triton(site), toolkit(site)], tmp_path)
    # The runtime's own headers first: only crt/ (which it lacks) comes from triton.
    assert found.include == str(site / "nvidia/cu13/include")
    assert found.extra == (str(site / "triton/backends/nvidia/include"),)
    assert found.crt_from == "triton 3.6.0"
    assert found.cudart == site / "nvidia/cu13/lib/libcudart.so.13"


def test_a_crt_package_elsewhere_wins_over_triton(tmp_path: Path) -> None:
    rt_site, crt_site = tmp_path / "a", tmp_path / "b"
    found = find([triton(rt_site), runtime(rt_site), crt(crt_site)], tmp_path)
    assert found.extra == (str(crt_site / "nvidia/cu13/include"),)
    assert found.crt_from == "nvidia-cuda-crt 13.0.88"


def test_system_crt_completes_the_runtime_package_and_keeps_its_libcudart(tmp_path: Path) -> None:
    site, system = tmp_path / "site", tmp_path / "cuda"
    (system / "include" / "crt").mkdir(parents=True)
    (system / "include" / "crt" / "host_defines.h").write_text("")
    (system / "include" / "cuda_runtime_api.h").write_text("")
    found = find([runtime(site)], tmp_path, system=system)
    # The runtime torch loads, not the system toolkit's (possibly another CUDA).
    assert found.include == str(site / "nvidia/cu13/include")
    assert found.extra == (str(system / "include"),)
    assert found.cudart == site / "nvidia/cu13/lib/libcudart.so.13"


def test_without_any_crt_the_message_names_the_package_to_install(tmp_path: Path) -> None:
    site = tmp_path / "site"
    with pytest.raises(HeadersMissing, match=r'pip install "nvidia-cuda-crt==13\.0\.88\.\*"'):
        find([runtime(site), toolkit(site)], tmp_path)


def test_nothing_installed(tmp_path: Path) -> None:
    with pytest.raises(HeadersMissing, match="no CUDA runtime headers found"):
        find([], tmp_path)


def test_cuda_home_first(tmp_path: Path) -> None:
    home, site = tmp_path / "toolkit", tmp_path / "site"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime_api.h").write_text("")
    (home / "lib64").mkdir()
    (home / "lib64" / "libcudart.so.12").write_text("")
    found = find([runtime(site), crt(site)], tmp_path, environ={"CUDA_HOME": str(home)})
    assert (found.include, found.extra, found.cudart) == (
        str(home / "include"), (), home / "lib64" / "libcudart.so.12")


def test_the_runtime_of_torchs_cuda_major_first(tmp_path: Path) -> None:
    old = FakeDist(tmp_path / "old", "nvidia-cuda-runtime-cu12", "12.8.90",
                   ["nvidia/cuda_runtime/include/cuda_runtime_api.h",
                    "nvidia/cuda_runtime/include/crt/host_defines.h"])
    site = tmp_path / "site"
    found = find([old, runtime(site), crt(site)], tmp_path)
    assert found.include == str(site / "nvidia/cu13/include")


def test_runs_as_a_script_before_torchmem_is_built() -> None:
    # gpu_check.sh runs the file itself: it must need nothing of torchmem.
    done = subprocess.run([sys.executable, "-I", _cuda_headers.__file__], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert done.stdout.startswith("no CUDA headers: " if done.returncode else "/"), done.stdout
