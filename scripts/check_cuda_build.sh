#!/usr/bin/env bash
# Compiles and links every line of torchmem's CUDA C++ against real CUDA
# builds of torch, with the project's warnings as errors, and runs the
# allocator class as far as it runs without a GPU. No GPU needed.
#
#   1. tests/native/cuda_abi_check.cpp: csrc/cuda_runtime.hpp's hand-written
#      CUDA declarations (csrc/cuda_* build without CUDA headers) against the
#      CUDA runtime's headers, linked against its libcudart.
#   2. src/torchmem/_hook/*.cpp (the CUDA allocator class and trace tracker,
#      the pinned-memory wrapper, the CPU hook) against torch 2.11's CUDA 13
#      wheel, linked with -Wl,--no-undefined against that torch's libraries:
#      a symbol torch does not export fails here.
#   3. The same sources against the installed torch's headers (2.13, a CPU
#      wheel: its c10/cuda headers are compiled, its libraries linked where
#      it has them).
#   4. csrc/cuda_*.cpp with -Werror (the normal build only warns).
#   5. The CUDA library of (2) again with CUDA 13's crt/ headers taken from
#      triton's bundled copy (what a stock torch install has: torch does not
#      install nvidia-cuda-crt; torchmem/sources/_cuda_headers.py), which must
#      give the same bytes as with nvidia-cuda-crt.
#   6. tests/native/cuda_class_check.cpp: the allocator class of (2) run
#      without a GPU through torch 2.11's own entry points over a fake table
#      of torchmem's (statistics fields, snapshot, cacheInfo, refusals,
#      registration for torch.cuda and torch.accelerator; the trace tracker
#      attached to it, forwarding entries).
#
# The torch wheel (~530 MB), the CUDA runtime / crt wheels it depends on and
# the triton wheel it pins (~190 MB) are fetched once with
# `pip download --no-deps`, and only the headers and the few libraries needed
# are unpacked, into $TORCHMEM_CI_CACHE (default ~/.cache/torchmem-ci),
# outside the repository. About a minute on 2 cores once cached.
#
#   bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CXX=${CXX:-g++}
CACHE=${TORCHMEM_CI_CACHE:-$HOME/.cache/torchmem-ci}
TORCH_CUDA_VERSION=${TORCHMEM_CI_TORCH:-2.11.0}
OUT=build/check_cuda
mkdir -p "$CACHE" "$OUT"
start=$(date +%s)

# -- fetch and unpack (cached) -------------------------------------------------
# Prints: torch root, cuda include dir, crt include dir, cuda lib dir, triton's include dir.
mapfile -t paths < <("$PY" - "$CACHE" "$TORCH_CUDA_VERSION" <<'EOF'
import glob, os, re, subprocess, sys, zipfile

cache, version = sys.argv[1], sys.argv[2]
known = os.path.join(cache, f"paths-torch-{version}.txt")
if os.path.exists(known):  # unpacked before: skip reading the wheels again
    lines = open(known).read().split()
    if len(lines) == 5 and all(os.path.isdir(p) for p in lines):
        print("\n".join(lines))
        sys.exit(0)


def download(requirement: str, pattern: str) -> str:
    found = sorted(glob.glob(os.path.join(cache, pattern)))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", cache, requirement], check=True)
        found = sorted(glob.glob(os.path.join(cache, pattern)))
    if not found:
        sys.exit(f"check_cuda_build: {requirement} did not download")
    return found[-1]


def unpack(wheel: str, dest: str, keep) -> None:
    stamp = os.path.join(dest, ".unpacked")
    if os.path.exists(stamp):
        return
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if keep(name):
                z.extract(name, dest)
    open(stamp, "w").close()


def requires(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]


def pin(reqs: list[str], name: str) -> str:
    for r in reqs:
        m = re.match(rf"{re.escape(name)}(\[[^\]]*\])?\s*==\s*([^;\s]+)", r)
        if m:
            return m.group(2)
    sys.exit(f"check_cuda_build: no pin of {name} in {reqs}")


torch_whl = download(f"torch=={version}", f"torch-{version}-*manylinux*x86_64.whl")
torch_dir = os.path.join(cache, f"torch-{version}-unpacked")
libs = {"libc10.so", "libc10_cuda.so", "libtorch_cpu.so"}
unpack(torch_whl, torch_dir, lambda n: n.startswith("torch/include/") or n == "torch/version.py"
       or (n.startswith("torch/lib/") and os.path.basename(n) in libs))
# torch -> cuda-toolkit[cudart,...]==X -> nvidia-cuda-runtime==Y, nvidia-cuda-crt==Z
toolkit = pin(requires(torch_whl), "cuda-toolkit")
toolkit_whl = download(f"cuda-toolkit=={toolkit}", f"cuda_toolkit-{toolkit}-*.whl")
treqs = requires(toolkit_whl)
cuda_dir = os.path.join(cache, f"cuda-toolkit-{toolkit}-unpacked")
for name in ("nvidia-cuda-runtime", "nvidia-cuda-crt"):
    v = pin(treqs, name).rstrip(".*")
    whl = download(f"{name}=={v}", f"{name.replace('-', '_')}-{v}*.whl")
    unpack(whl, os.path.join(cuda_dir, name), lambda n: "/include/" in n or "/lib/libcudart.so" in n)
include = glob.glob(os.path.join(cuda_dir, "nvidia-cuda-runtime", "nvidia", "*", "include"))[0]
crt = glob.glob(os.path.join(cuda_dir, "nvidia-cuda-crt", "nvidia", "*", "include"))[0]
lib = glob.glob(os.path.join(cuda_dir, "nvidia-cuda-runtime", "nvidia", "*", "lib"))[0]
# torch -> triton==V (its CUDA headers, crt/ included, under backends/nvidia/include)
triton = pin(requires(torch_whl), "triton")
py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
triton_whl = download(f"triton=={triton}", f"triton-{triton}-{py}-*.whl")
triton_dir = os.path.join(cache, f"triton-{triton}-unpacked")
unpack(triton_whl, triton_dir, lambda n: n.startswith("triton/backends/nvidia/include/"))
lines = [os.path.join(torch_dir, "torch"), include, crt, lib,
         os.path.join(triton_dir, "triton", "backends", "nvidia", "include")]
with open(known, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
)
[ "${#paths[@]}" -eq 5 ] || { echo "check_cuda_build: fetching failed"; exit 1; }
T211=${paths[0]}
CUDA_INC=${paths[1]}
CRT_INC=${paths[2]}
CUDA_LIB=${paths[3]}
TRITON_INC=${paths[4]}
CUDART=$(basename "$(ls "$CUDA_LIB"/libcudart.so.* | head -1)")
read -r T213 ABI V213 < <("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__), \
int(torch._C._GLIBCXX_USE_CXX11_ABI), torch.__version__)")
echo "check_cuda_build: torch $(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$T211/version.py") and \
$V213, $CUDART; fetched in $(( $(date +%s) - start )) s"

WARN=(-Wall -Wextra -Wno-missing-field-initializers -Werror)
BASE=(-std=c++17 -O1 -fPIC -fvisibility=hidden "-D_GLIBCXX_USE_CXX11_ABI=$ABI" "${WARN[@]}")
torch_inc() { echo "-isystem $1/include -isystem $1/include/torch/csrc/api/include"; }
HOOK=src/torchmem/_hook
# CXX_LAUNCHER (e.g. ccache; .ci/run sets it when ccache is installed) runs
# each compile: the unchanged ones are replayed from its cache. Only -c
# compiles can be, so every library below is compiled a source at a time,
# then linked.
read -r -a LAUNCH <<< "${CXX_LAUNCHER:-}"
# so OUT SRC... -- FLAG... -- LINK_FLAG...: the sources compiled with FLAGs,
# then linked into OUT with LINK_FLAGs.
so() {
  local out=$1 srcs=() flags=() objs=() src obj
  shift
  while [ "$1" != -- ]; do srcs+=("$1"); shift; done
  shift
  while [ "$1" != -- ]; do flags+=("$1"); shift; done
  shift
  for src in "${srcs[@]}"; do
    obj="${out%.*}.$(basename "${src%.cpp}").o"
    "${LAUNCH[@]}" "$CXX" "${flags[@]}" -c "$src" -o "$obj" || return 1
    objs+=("$obj")
  done
  "$CXX" "${flags[@]}" "${objs[@]}" -o "$out" "$@"
}
status=0
pids=()
names=()
run() {  # run NAME COMMAND...: two at a time (CI machines here have two cores)
  local name=$1
  shift
  ( "$@" > "$OUT/$name.log" 2>&1 ) &
  pids+=($!)
  names+=("$name")
  if [ "${#pids[@]}" -ge 2 ]; then reap_one; fi
}
reap_one() {  # waits for whichever job ends first (not for both of a pair)
  local pid rc i
  if wait -n -p pid "${pids[@]}"; then rc=0; else rc=$?; fi
  for i in "${!pids[@]}"; do [ "${pids[$i]}" = "$pid" ] && break; done
  if [ "$rc" -eq 0 ]; then
    echo "  ok      ${names[$i]}"
  else
    echo "  FAILED  ${names[$i]}"
    sed 's/^/    /' "$OUT/${names[$i]}.log" | tail -25
    status=1
  fi
  unset "pids[$i]" "names[$i]"
  pids=("${pids[@]}")
  names=("${names[@]}")
}
collect() {
  while [ "${#pids[@]}" -gt 0 ]; do reap_one; done
}

# 1. csrc/cuda_runtime.hpp against the real headers and libcudart.
run abi-check so "$OUT/cuda_abi_check" tests/native/cuda_abi_check.cpp -- \
  -std=c++17 "${WARN[@]}" -isystem "$CUDA_INC" -isystem "$CRT_INC" -Icsrc -- \
  -L "$CUDA_LIB" "-l:$CUDART" -Wl,--no-undefined

# 2. The run-time-built libraries against torch 2.11 (CUDA 13), every symbol resolved.
# shellcheck disable=SC2046
run cuda-hook-2.11 so "$OUT/cuda_hook-2.11.so" "$HOOK/cuda_allocator.cpp" \
  "$HOOK/cuda_trace_tracker.cpp" -- "${BASE[@]}" $(torch_inc "$T211") -isystem "$CUDA_INC" \
  -isystem "$CRT_INC" -I "$HOOK" -- -shared -L "$T211/lib" -lc10 -lc10_cuda -L "$CUDA_LIB" \
  "-l:$CUDART" -Wl,--no-undefined
# 5. The same with crt/ from triton instead of nvidia-cuda-crt (compared below).
# shellcheck disable=SC2046
run cuda-hook-2.11-triton-crt so "$OUT/cuda_hook-2.11-triton-crt.so" "$HOOK/cuda_allocator.cpp" \
  "$HOOK/cuda_trace_tracker.cpp" -- "${BASE[@]}" $(torch_inc "$T211") -isystem "$CUDA_INC" \
  -isystem "$TRITON_INC" -I "$HOOK" -- -shared -L "$T211/lib" -lc10 -lc10_cuda -L "$CUDA_LIB" \
  "-l:$CUDART" -Wl,--no-undefined
# shellcheck disable=SC2046
run pinned-2.11 so "$OUT/pinned-2.11.so" "$HOOK/pinned_host_allocator.cpp" -- "${BASE[@]}" \
  $(torch_inc "$T211") -I "$HOOK" -- -shared -L "$T211/lib" -lc10 -ltorch_cpu -Wl,--no-undefined
# shellcheck disable=SC2046
run cpu-hook-2.11 so "$OUT/cpu_hook-2.11.so" "$HOOK/cpu_allocator_hook.cpp" -- "${BASE[@]}" \
  $(torch_inc "$T211") -- -shared -L "$T211/lib" -lc10 -Wl,--no-undefined
# A CPython extension: Python's and libtorch_python's symbols (not unpacked
# here) resolve when it is imported; its compile is what is checked.
# shellcheck disable=SC2046
run autograd-hook-2.11 so "$OUT/autograd_hook-2.11.so" "$HOOK/autograd_context_hook.cpp" \
  "$HOOK/module_forward.cpp" \
  "$HOOK/tensor_marks.cpp" -- \
  "${BASE[@]}" $(torch_inc "$T211") -isystem "$("$PY" -c "import sysconfig; \
print(sysconfig.get_paths()['include'])")" -- -shared -L "$T211/lib" -lc10 -ltorch_cpu

# 3. The installed torch (2.13, CPU build: no libc10_cuda to link, and no
#    generated cuda_cmake_macros.h, which only matters on Windows).
# shellcheck disable=SC2046
run cuda-hook-2.13 "${LAUNCH[@]}" "$CXX" "${BASE[@]}" -c -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $(torch_inc "$T213") \
  -isystem "$CUDA_INC" -isystem "$CRT_INC" -I "$HOOK" "$HOOK/cuda_allocator.cpp" \
  -o "$OUT/cuda_allocator-2.13.o"
# shellcheck disable=SC2046
run tracker-2.13 "${LAUNCH[@]}" "$CXX" "${BASE[@]}" -c -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $(torch_inc "$T213") \
  -isystem "$CUDA_INC" -isystem "$CRT_INC" -I "$HOOK" "$HOOK/cuda_trace_tracker.cpp" \
  -o "$OUT/cuda_trace_tracker-2.13.o"
# shellcheck disable=SC2046
run pinned-2.13 so "$OUT/pinned-2.13.so" "$HOOK/pinned_host_allocator.cpp" -- "${BASE[@]}" \
  $(torch_inc "$T213") -I "$HOOK" -- -shared -L "$T213/lib" -lc10 -ltorch_cpu -Wl,--no-undefined

# 4. The plugin's C entry points, warnings as errors (Python's headers; the
#    nanobind glue of cuda_bindings.cpp only where nanobind is installed:
#    pip's isolated build has it, a CI venv need not).
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NBINC=$("$PY" -m nanobind --include_dir 2>/dev/null || true)
for src in csrc/cuda_*.cpp; do
  name=$(basename "${src%.cpp}")
  if [ "$name" = cuda_bindings ] && [ -z "$NBINC" ]; then
    echo "  skip    cuda_bindings (nanobind is not installed here; the build compiles it)"
    continue
  fi
  run "$name" "${LAUNCH[@]}" "$CXX" "${BASE[@]}" -O2 -c -isystem "$PYINC" ${NBINC:+-isystem "$NBINC"} \
    ${NBINC:+-isystem "$NBINC/../ext/robin_map/include"} -Icsrc "$src" -o "$OUT/$name.o"
done
collect
if [ "$status" -eq 0 ]; then
  if cmp -s "$OUT/cuda_hook-2.11.so" "$OUT/cuda_hook-2.11-triton-crt.so"; then
    echo "  ok      crt/ from triton gives the same library"
  else
    echo "  FAILED  crt/ from triton gives another library than nvidia-cuda-crt's"
    status=1
  fi
  # 6. The class run on this machine (no GPU needed for what it checks).
  # shellcheck disable=SC2046
  run class-check-build so "$OUT/cuda_class_check" tests/native/cuda_class_check.cpp -- \
    "${BASE[@]}" $(torch_inc "$T211") -isystem "$CUDA_INC" -isystem "$CRT_INC" -I "$HOOK" -- \
    "$PWD/$OUT/cuda_hook-2.11.so" -L "$T211/lib" -lc10 -lc10_cuda -L "$CUDA_LIB" "-l:$CUDART" \
    -Wl,--no-undefined
  collect
  if [ "$status" -eq 0 ]; then
    if LD_LIBRARY_PATH="$T211/lib:$CUDA_LIB:$PWD/$OUT" "$OUT/cuda_class_check" \
        > "$OUT/class-check.log" 2>&1; then
      sed 's/^/  /' "$OUT/class-check.log"
    else
      sed 's/^/    /' "$OUT/class-check.log"
      echo "  FAILED  the allocator class run without a GPU"
      status=1
    fi
  fi
fi

if [ "$status" -ne 0 ]; then
  echo "check_cuda_build: FAILED (logs in $OUT)"
  exit 1
fi
echo "check_cuda_build: passed in $(( $(date +%s) - start )) s"
