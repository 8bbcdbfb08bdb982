#!/usr/bin/env bash
# Longer fuzzing of the trace loader (torchmem.storage.load) than CI's 1000 cases.
#
#   bash scripts/fuzz.sh [SECONDS] [SEED]     # mutation fuzzer (bytes and SQL rows)
#   ATHERIS=1 bash scripts/fuzz.sh 600        # coverage-guided, when atheris is installed
#
# Findings (inputs that raised anything but TraceFormatError, or crashed) are
# kept in $TORCHMEM_FUZZ_OUT (default /tmp/torchmem-fuzz-findings); replay one
# with: python tests/test_fuzz_traces.py --replay FILE
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-600}
SEED=${2:-$RANDOM}
OUT=${TORCHMEM_FUZZ_OUT:-/tmp/torchmem-fuzz-findings}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ "${ATHERIS:-0}" = 1 ] && "$PY" -c "import atheris" 2>/dev/null; then
  exec "$PY" tests/test_fuzz_traces.py --atheris --seconds "$SECONDS_TO_RUN" --out "$OUT"
fi
echo "fuzz: mutation fuzzer, $SECONDS_TO_RUN s, seed $SEED, findings in $OUT"
exec "$PY" tests/test_fuzz_traces.py --seconds "$SECONDS_TO_RUN" --seed "$SEED" --out "$OUT"
