#!/usr/bin/env bash
# The GPU check, for a fresh GPU machine without network (torch, numpy,
# nvidia-ml-py, nanobind and scikit-build-core already installed in the
# active Python). In order, each stage with its own time limit, the limits
# adding up to 410 s (under 7 minutes on an H100):
#   prerequisites   25 s  a line for each one missing; stops if any is
#   build          100 s  torchmem itself (pip install -e, all cores)
#   hooks           60 s  the libraries built against this torch on first use:
#                         CUDA allocator class + trace tracker, pinned-memory
#                         wrapper, CPU allocator hook (says why one cannot build)
#   tests/gpu      170 s  every GPU behaviour (plugin, tracker, pinned, NVML)
#   gpu_overhead    55 s  benchmarks/gpu_overhead.py: step time of a transformer
#                         block and a small conv net under torch's caching
#                         allocator, the tracker, the plugin (with and without
#                         stacks), torch's cudaMallocAsync backend and
#                         torch's _record_memory_history
#   usage: scripts/gpu_check.sh [results.json]
# The table it prints goes into docs/performance.md with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-gpu_overhead.json}"
status=0
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  echo "=== ${name} (limit ${limit}s)"
  # Through bash -c: the stages that are shell functions (exported below)
  # run under timeout too.
  timeout --kill-after=10 "${limit}" bash -c '"$@"' "${name}" "$@"
  local rc=$?
  echo "=== ${name}: rc=${rc} in $((SECONDS - t0))s"
  [ "${rc}" -eq 0 ] || status=1
  return "${rc}"
}

prerequisites() {
  local missing=0
  need() {  # need WHAT HOW-TO-CHECK...
    local what="$1"
    shift
    if "$@" >/dev/null 2>&1; then
      echo "  ok       ${what}"
    else
      echo "  MISSING  ${what}"
      missing=1
    fi
  }
  need "python (${PY})" command -v "${PY}"
  need "g++ (the C++ compiler; or set CXX)" sh -c 'command -v "${CXX:-g++}"'
  need "Python.h (python3-dev)" "${PY}" -c \
    "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))"
  need "numpy" "${PY}" -c "import numpy"
  need "nvidia-ml-py (import pynvml)" "${PY}" -c "import pynvml"
  need "nanobind" "${PY}" -c "import nanobind"
  need "scikit-build-core" "${PY}" -c "import scikit_build_core"
  need "cmake" sh -c 'command -v cmake || "$0" -c "import cmake"' "${PY}"
  # torch, the device and the CUDA headers in one interpreter (importing
  # torch is most of this stage's time). The allocator class and the tracker
  # compile against the CUDA runtime's headers (CUDA_HOME, or torch's
  # nvidia-cuda-runtime with crt/ from nvidia-cuda-crt or triton): without
  # them both fall back, and the check would measure the fallbacks.
  "${PY}" - <<'EOF' || missing=1
import runpy
ok = True
def line(good, what):
    global ok
    ok = ok and good
    print(f"  {'ok      ' if good else 'MISSING '} {what}")
try:
    import torch
except Exception as exc:
    line(False, f"torch ({exc})")
    raise SystemExit(1)
cuda = torch.version.cuda
line(bool(cuda), f"torch, a CUDA build (torch {torch.__version__}, CUDA {cuda})")
line(torch.cuda.is_available(), "a CUDA device visible to torch"
     + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available() else ""))
headers = runpy.run_path("src/torchmem/sources/_cuda_headers.py")
try:
    found = headers["find_cuda_headers"](cuda.split(".")[0] if cuda else None)
    crt = f", crt/ from {found.crt_from}" if found.extra else ""
    line(True, f"CUDA headers ({found.include}{crt})")
except headers["HeadersMissing"] as exc:
    line(False, f"CUDA headers: {exc}")
raise SystemExit(0 if ok else 1)
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    | sed 's/^/  /' || true
  return "${missing}"
}

hooks() {
  "${PY}" - <<'EOF'
import time
ok = True
for label, module, fn in (("CUDA allocator class + trace tracker", "torchmem.sources.cuda_hook", "load_cuda_hook"),
                          ("pinned-memory wrapper", "torchmem.sources.pinned", "load_pinned_hook"),
                          ("CPU allocator hook", "torchmem.sources.cpu_allocator", "load_hook")):
    t0 = time.monotonic()
    try:
        lib = getattr(__import__(module, fromlist=[fn]), fn)()
        extra = ""
        if fn == "load_cuda_hook" and lib.torchmem_cuda_allocator_supported() != 1:
            extra = " (trace tracker only: the allocator class needs torch >= 2.11)"
        print(f"  ok       {label} in {time.monotonic() - t0:.1f}s{extra}")
    except Exception as exc:
        ok = False
        print(f"  FAILED   {label}: {exc}")
raise SystemExit(0 if ok else 1)
EOF
}

export PY
export -f prerequisites hooks
stage prerequisites 25 prerequisites || { echo "=== gpu_check: prerequisites missing"; exit 1; }
stage build 100 "${PY}" -m pip install --no-build-isolation --no-deps -e . -q || exit 1
stage hooks 60 hooks
stage tests/gpu 170 "${PY}" -m pytest tests/gpu -q -rs -p no:cacheprovider
stage gpu_overhead 55 "${PY}" benchmarks/gpu_overhead.py --budget 50 --steps 20 --json "${OUT}"
echo "=== gpu_check: $([ ${status} -eq 0 ] && echo passed || echo FAILED) in ${SECONDS}s"
exit "${status}"
