#!/usr/bin/env bash
# The native tests (tests/native/test_recorder.cpp) built with the recorder's
# sources (and the CUDA plugin's, when present) under AddressSanitizer and
# UndefinedBehaviorSanitizer, then run. Exits non-zero on any failed check or
# sanitizer report. CI (.ci/run) calls it; about a minute on 2 cores.
#
#   bash scripts/sanitize.sh            # build into build/sanitize and run
#   CXX=clang++ bash scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
# CXX_LAUNCHER (e.g. ccache; .ci/run sets it when ccache is installed) runs
# each compile, so the unchanged ones are replayed from its cache.
read -r -a LAUNCH <<< "${CXX_LAUNCHER:-}"
OUT=build/sanitize
mkdir -p "$OUT"
# -fdebug-prefix-map: the debug info names sources relative to the checkout,
# so ccache (CXX_LAUNCHER) can replay an object compiled in another clone.
FLAGS=(-std=c++17 -O1 -g "-fdebug-prefix-map=$PWD=." -fsanitize=address,undefined
       -fno-omit-frame-pointer -fno-sanitize-recover=undefined -pthread -Icsrc -Wall -Wextra
       -Wno-missing-field-initializers)

# The recorder proper: no Python anywhere.
SOURCES=(csrc/recorder.cpp csrc/recorder_slots.cpp csrc/event_log.cpp csrc/clock.cpp
         csrc/trace_frames.cpp csrc/context_table.cpp)
DEFINES=()
LIBS=()

# The plugin's entry points need Python's headers and library (the optional
# stack capture takes the GIL); the test never starts an interpreter.
PLUGIN=(csrc/cuda_plugin.cpp csrc/cuda_plugin_stats.cpp csrc/cuda_backends.cpp
        csrc/cuda_backends_cuda.cpp csrc/cuda_runtime.cpp csrc/cuda_trace.cpp
        csrc/cuda_pinned_bridge.cpp
        csrc/stack_capture.cpp csrc/frame_walk.cpp csrc/stack_table.cpp csrc/host_bridge.cpp)
PY=${PYTHON:-python3}
have_plugin=1
for f in "${PLUGIN[@]}"; do [ -f "$f" ] || have_plugin=0; done
if [ "$have_plugin" = 1 ] && PYINFO=$("$PY" - <<'EOF'
import os, sysconfig
inc = sysconfig.get_paths()["include"]
libdir = sysconfig.get_config_var("LIBDIR") or ""
ver = sysconfig.get_config_var("LDVERSION") or sysconfig.get_config_var("VERSION")
lib = os.path.join(libdir, f"libpython{ver}.so")
if not os.path.exists(os.path.join(inc, "Python.h")) or not os.path.exists(lib):
    raise SystemExit(1)
print(inc)
print(libdir)
print(ver)
EOF
); then
  mapfile -t info <<<"$PYINFO"
  SOURCES+=("${PLUGIN[@]}")
  [ -f csrc/cuda_bench.cpp ] && SOURCES+=(csrc/cuda_bench.cpp)
  DEFINES+=(-DTORCHMEM_TEST_PLUGIN -I"${info[0]}")
  LIBS+=(-L"${info[1]}" -Wl,-rpath,"${info[1]}" -l"python${info[2]}" -ldl)
else
  echo "sanitize: plugin sources or libpython missing; testing the recorder alone"
fi

start=$(date +%s)
objs=()
pids=()
for src in "${SOURCES[@]}"; do
  obj="$OUT/$(basename "${src%.cpp}").o"
  objs+=("$obj")
  # Two compiles at a time: CI machines here have two cores.
  "${LAUNCH[@]}" "$CXX" "${FLAGS[@]}" "${DEFINES[@]}" -c "$src" -o "$obj" &
  pids+=($!)
  if [ "${#pids[@]}" -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
"${LAUNCH[@]}" "$CXX" "${FLAGS[@]}" "${DEFINES[@]}" -c tests/native/test_recorder.cpp \
  -o "$OUT/test_recorder.o"
for p in "${pids[@]}"; do wait "$p"; done
"$CXX" "${FLAGS[@]}" "$OUT/test_recorder.o" "${objs[@]}" -o "$OUT/test_recorder" "${LIBS[@]}"
echo "sanitize: built in $(( $(date +%s) - start )) s"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
log="$OUT/test_recorder.log"
set +e
timeout 300 "$OUT/test_recorder" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: (Address|Leak)Sanitizer|runtime error:" "$log"; then
  echo "sanitize: sanitizer report (see $log)"
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  echo "sanitize: test_recorder failed (exit $rc)"
  exit 1
fi
echo "sanitize: passed in $(( $(date +%s) - start )) s"
