#!/usr/bin/env bash
# The CUDA engine's checks on a GPU machine, in one go: build, tests/test_cuda.py,
# compute-sanitizer memcheck + racecheck over a small driver, and the timing against a plain
# PyTorch MU loop (benchmarks/cuda_bench.py). Logs and JSON go under $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_check.sh                  # from the repository root
#
# Environment:
#   DFFKIT_CUDA_ARCHITECTURES  default 90 (H100/H200)
#   GPU_CHECK_PREBUILT=DIR     link the CUDA objects compiled elsewhere (DIR/*.o, same nvcc) into
#                              the module instead of `pip install .` (saves the nvcc time on a
#                              leased machine); falls back to pip install when that fails
#   GPU_CHECK_STAGES           default "build test test_nocluster memcheck bench racecheck"
#                              (also: test_general = the general resident kernel, fast path off)
#                              (run in that order)
#   TEST_TIMEOUT, BENCH_TIMEOUT, SAN_TIMEOUT  seconds per stage (100, 100, 60)
#   BENCH_ARGS                 e.g. --quick (skips the 16384^2 case)
# Each stage runs under its own time limit and the script goes on after a failure; the last
# lines are a summary.
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export DFFKIT_CUDA_ARCHITECTURES="${DFFKIT_CUDA_ARCHITECTURES:-90}"
export PYTHONUNBUFFERED=1
STAGES="${GPU_CHECK_STAGES:-build test test_nocluster memcheck bench racecheck}"
SUMMARY=()
note() { SUMMARY+=("$1"); echo "== $1"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 --version
PY=python3
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"

build_prebuilt() {
  local pkg=/tmp/dffkit_site
  rm -rf "$pkg" && mkdir -p "$pkg" && cp -r "$ROOT/python/dffkit" "$pkg/" || return 1
  rm -f "$pkg"/dffkit/_c*.so
  local inc pbinc ext
  inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  pbinc=$($PY -c "import pybind11; print(pybind11.get_include())")
  ext=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  bash "$ROOT/benchmarks/link_cuda_module.sh" "$pkg/dffkit" "$GPU_CHECK_PREBUILT"/*.o &
  local p1=$!
  # the CPU module from CMakeLists.txt's sources (dffkit_core + the bindings), as CMake builds it
  g++ -O3 -march=native -fopenmp -std=gnu++17 -fPIC -fvisibility=hidden -shared -I"$ROOT/cpp" \
      -I"$inc" -I"$pbinc" "$ROOT/cpp/nmf_mu_cpu.cpp" "$ROOT/cpp/nmf_mu_sparse.cpp" "$ROOT/cpp/resample.cpp" \
      "$ROOT/cpp/bindings/module_cpu.cpp" \
      -o "$pkg/dffkit/_cpu$ext" &
  local p2=$!
  wait $p1 && wait $p2 || return 1
  export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
}

if has build; then
  t0=$(date +%s)
  ok=0
  if [[ -n "${GPU_CHECK_PREBUILT:-}" ]]; then
    build_prebuilt 2>&1 | tail -n 20 | tee "$OUT/build.log" && ok=1
    [[ $ok == 1 ]] && export PYTHONPATH="/tmp/dffkit_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [[ $ok != 1 ]]; then
    (cd "$ROOT" && timeout 400 $PY -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 20) \
      | tee -a "$OUT/build.log" && ok=1
  fi
  note "build: $([[ $ok == 1 ]] && echo ok || echo FAILED) in $(( $(date +%s) - t0 )) s"
fi

cd /tmp || exit 1
$PY -c "import dffkit, dffkit._cuda as c; print('dffkit from', dffkit.__file__); print(c.probe(), c.device_info(0))" 2>&1 | tee "$OUT/probe.txt"

stage_test() {
  local t0=$(date +%s)
  timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -q -ra -p no:cacheprovider "$ROOT/tests/test_cuda.py" 2>&1 | tee "$OUT/test_cuda.log"
  local rc=$?
  note "tests/test_cuda.py: rc=$rc, $(tail -n 1 "$OUT/test_cuda.log") ($(( $(date +%s) - t0 )) s)"
}

stage_bench() {
  local t0=$(date +%s)
  OUT="$OUT" timeout "${BENCH_TIMEOUT:-100}" $PY "$ROOT/benchmarks/cuda_bench.py" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  note "bench: rc=$? ($(( $(date +%s) - t0 )) s)"
}

stage_sanitizer() {
  local tool=$1 t0=$(date +%s)
  timeout "${SAN_TIMEOUT:-60}" "$SAN" --tool "$tool" --error-exitcode 9 $PY "$ROOT/benchmarks/cuda_sanitize_driver.py" \
    > "$OUT/sanitizer_$tool.log" 2>&1
  local rc=$?
  tail -n 6 "$OUT/sanitizer_$tool.log"
  note "compute-sanitizer $tool: rc=$rc, $(grep -c 'BAD' "$OUT/sanitizer_$tool.log") wrong results, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1) ($(( $(date +%s) - t0 )) s)"
}

stage_test_nocluster() {  # the general resident kernel, one block per problem, on its own
  local t0=$(date +%s)
  DFFKIT_CUDA_SMALL=0 DFFKIT_CUDA_NO_CLUSTER=1 timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -q -ra -p no:cacheprovider \
    -k "resident or batched or threads" "$ROOT/tests/test_cuda.py" 2>&1 | tee "$OUT/test_cuda_nocluster.log"
  local rc=$?
  note "tests/test_cuda.py with DFFKIT_CUDA_SMALL=0 DFFKIT_CUDA_NO_CLUSTER=1: rc=$rc, $(tail -n 1 "$OUT/test_cuda_nocluster.log") ($(( $(date +%s) - t0 )) s)"
}

stage_test_general() {  # the general resident kernel with its clusters (the fast path off)
  local t0=$(date +%s)
  DFFKIT_CUDA_SMALL=0 timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -q -ra -p no:cacheprovider \
    -k "resident or batched" "$ROOT/tests/test_cuda.py" 2>&1 | tee "$OUT/test_cuda_general.log"
  local rc=$?
  note "tests/test_cuda.py with DFFKIT_CUDA_SMALL=0: rc=$rc, $(tail -n 1 "$OUT/test_cuda_general.log") ($(( $(date +%s) - t0 )) s)"
}

for stage in $STAGES; do
  case $stage in
    test) stage_test ;;
    test_general) stage_test_general ;;
    test_nocluster) stage_test_nocluster ;;
    bench) stage_bench ;;
    memcheck|racecheck) stage_sanitizer "$stage" ;;
  esac
done

echo
echo "== summary"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
