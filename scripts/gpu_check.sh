#!/usr/bin/env bash
# GPU check for a fresh GPU machine without network: torch, nanobind and
# scikit-build-core must already be installed in the active Python.
# Builds torchmem, runs tests/gpu, then benchmarks/gpu_overhead.py.
# Each stage has its own time limit; together under 8 minutes on an H100.
#   usage: scripts/gpu_check.sh [results.json]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-gpu_overhead.json}"
status=0

stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  echo "=== ${name} (limit ${limit}s)"
  timeout --kill-after=10 "${limit}" "$@"
  local rc=$?
  echo "=== ${name}: rc=${rc} in $((SECONDS - t0))s"
  [ "${rc}" -eq 0 ] || status=1
  return "${rc}"
}

"${PY}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

stage build 150 "${PY}" -m pip install --no-build-isolation --no-deps -e . -q || exit 1
stage tests/gpu 150 "${PY}" -m pytest tests/gpu -q -rs
stage gpu_overhead 170 "${PY}" benchmarks/gpu_overhead.py --budget 155 --json "${OUT}"
echo "=== gpu_check: $([ ${status} -eq 0 ] && echo passed || echo FAILED) in ${SECONDS}s"
exit "${status}"
