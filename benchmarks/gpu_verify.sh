#!/usr/bin/env bash
# A short lease's checks after a change to the CUDA engine (one command of about 4 minutes, no
# onnxruntime): build from the packed objects (gpu_final.sh --pack, carry .gpu_pack), then
#   1. tests/test_cuda.py                                   (TEST_TIMEOUT, 100 s)
#   2. the gpu-marked tests of the NMF modules              (PYTEST_GPU_TIMEOUT, 60 s)
#   3. compute-sanitizer memcheck over the whole driver, racecheck over SAN_ONLY's cases
#      (default: the column-split kernel's, "fast cols")    (SAN_TIMEOUT each, 90 s)
#   4. cuda_bench.py --ab on CUDA_BENCH_ARGS                (BENCH_TIMEOUT, 90 s)
# Everything under $OUT (logs, cuda_bench.json).
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }

if [[ -f "$ROOT/.gpu_pack/objs.tar.xz" ]]; then
  tar -xJf "$ROOT/.gpu_pack/objs.tar.xz" -C "$ROOT" && stamp "CUDA objects unpacked"
fi
if [[ "$(cat "$ROOT/.gpu_prebuilt/SOURCES" 2>/dev/null)" == "$(bash "$ROOT/benchmarks/gpu_final.sh" --sources-hash)" ]]; then
  export GPU_CHECK_PREBUILT="$ROOT/.gpu_prebuilt"
else
  stamp "the prebuilt objects are stale: building with pip"
fi
GPU_CHECK_STAGES="build test" TEST_TIMEOUT="${TEST_TIMEOUT:-100}" source "$ROOT/benchmarks/gpu_check.sh"
stamp "build and tests/test_cuda.py done"

cd /tmp || exit 1
timeout "${PYTEST_GPU_TIMEOUT:-60}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu \
  "$ROOT/tests/test_nmf.py" "$ROOT/tests/test_batched_api.py" "$ROOT/tests/test_group_sparse.py" \
  "$ROOT/tests/test_nmf_inputs.py" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 15
stamp "gpu-marked NMF tests done"

SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
timeout "${SAN_TIMEOUT:-90}" "$SAN" --tool memcheck --error-exitcode 9 python3 \
  "$ROOT/benchmarks/cuda_sanitize_driver.py" > "$OUT/sanitizer_memcheck.log" 2>&1
stamp "memcheck: rc=$?, $(grep -c '^ok' "$OUT/sanitizer_memcheck.log") ok, $(grep -c '^BAD' "$OUT/sanitizer_memcheck.log") BAD, $(grep 'ERROR SUMMARY' "$OUT/sanitizer_memcheck.log" | tail -n 1)"
SAN_ONLY="${SAN_ONLY:-fast cols}" timeout "${SAN_TIMEOUT:-90}" "$SAN" --tool racecheck --error-exitcode 9 python3 \
  "$ROOT/benchmarks/cuda_sanitize_driver.py" > "$OUT/sanitizer_racecheck.log" 2>&1
stamp "racecheck (${SAN_ONLY:-fast cols}): rc=$?, $(grep -c '^ok' "$OUT/sanitizer_racecheck.log") ok, $(grep -c '^BAD' "$OUT/sanitizer_racecheck.log") BAD, $(grep 'RACECHECK SUMMARY' "$OUT/sanitizer_racecheck.log" | tail -n 1)"

# shellcheck disable=SC2086
OUT="$OUT" timeout "${BENCH_TIMEOUT:-90}" python3 "$ROOT/benchmarks/cuda_bench.py" --ab \
  ${CUDA_BENCH_ARGS:---cases one,batch,square --variants rows} 2>&1 | tee "$OUT/cuda_bench.log" | tail -n 25
stamp "all done"
