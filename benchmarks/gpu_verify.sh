#!/usr/bin/env bash
# A short lease's checks after a change to the CUDA engine (one command of 3 to 4 minutes, no
# onnxruntime): build from the packed objects (gpu_final.sh --pack, carry .gpu_pack), then, in
# this order, each under its own limit and only while DEADLINE (seconds, default 200) allows:
#   1. tests/test_cuda.py                                   (TEST_TIMEOUT, 60 s)
#   2. cuda_bench.py --ab --cases BENCH_CASES --variants BENCH_VARIANTS  (BENCH_TIMEOUT, 50 s)
#      (each one word, commas between: a variant's name may hold spaces)
#   3. compute-sanitizer racecheck over SAN_ONLY's cases of the driver (default: the column-split
#      kernel's and DFF's map kernels, "fast cols,dff maps")  (SAN_TIMEOUT, 50 s)
#   3b. the fast path's phase clocks (gpu_variants.sh with the "prof" objects, when .gpu_pack holds
#      them for these sources: benchmarks/cuda_profile_small.py)  (PROF_TIMEOUT, 0 s: off unless set)
#   3c. benchmarks/profile_dff_joint_nmf.py --reps 3: joint DFF's NMF per engine and precision
#      (JOINT_TIMEOUT, 0 s: off unless set)
#   4. benchmarks/profile_dff_device.py: one image's DFF after the extractor (DFF_PROFILE_TIMEOUT, 30 s)
#   5. the gpu-marked tests of the NMF modules and of DFF    (what is left)
#   6. compute-sanitizer memcheck over the whole driver     (what is left)
# Everything under $OUT (logs, cuda_bench.json).
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE="${DEADLINE:-200}"
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }
# the limit for a stage: its own, cut to what is left before DEADLINE; 0 when under 10 s are left
limit() { local l=$(( DEADLINE - SECONDS )); (( l > $1 )) && l=$1; (( l < 10 )) && l=0; echo $l; }

source "$ROOT/benchmarks/gpu_prebuilt.sh"
GPU_CHECK_STAGES="build test" TEST_TIMEOUT="${TEST_TIMEOUT:-60}" source "$ROOT/benchmarks/gpu_check.sh"
stamp "build and tests/test_cuda.py done"
cd /tmp || exit 1

t=$(limit "${BENCH_TIMEOUT:-50}")
if (( t > 0 )); then
  OUT="$OUT" timeout "$t" python3 "$ROOT/benchmarks/cuda_bench.py" --ab \
    --cases "${BENCH_CASES:-one,batch,tall,square}" \
    --variants "${BENCH_VARIANTS:-rows,gemm split}" 2>&1 | tee "$OUT/cuda_bench.log" | tail -n 25
  stamp "cuda_bench: rc=$?"
fi

# the sanitizers through gpu_check.sh's stage (cuda_sanitize_driver.py reads SAN_ONLY)
sanitize() {  # tool seconds [SAN_ONLY]
  OUT="$OUT" SAN_ONLY="${3:-}" GPU_CHECK_STAGES="$1" SAN_TIMEOUT="$2" bash "$ROOT/benchmarks/gpu_check.sh" 2>&1 \
    | grep "compute-sanitizer $1" | tail -n 1
  stamp "$1 done"
}

t=$(limit "${SAN_TIMEOUT:-50}")
(( t > 0 )) && sanitize racecheck "$t" "${SAN_ONLY:-fast cols,dff maps}"

t=$(limit "${PROF_TIMEOUT:-0}")
if (( t > 0 )); then
  OUT="$OUT" VARIANTS=prof VARIANT_TIMEOUT="$t" bash "$ROOT/benchmarks/gpu_variants.sh" \
    "$ROOT/benchmarks/cuda_profile_small.py" > "$OUT/cuda_profile_small.log" 2>&1
  stamp "phase clocks: rc=$?"
  grep -E "^(--|dffkit|time|column|row)" "$OUT/cuda_profile_small.log" | tail -n 40
fi

t=$(limit "${JOINT_TIMEOUT:-0}")
if (( t > 0 )); then
  timeout "$t" python3 "$ROOT/benchmarks/profile_dff_joint_nmf.py" --reps 3 2>&1 \
    | tee "$OUT/profile_dff_joint_nmf.log" | tail -n 8
  stamp "joint DFF NMF: rc=$?"
fi

t=$(limit "${DFF_PROFILE_TIMEOUT:-30}")
if (( t > 0 )); then
  timeout "$t" python3 "$ROOT/benchmarks/profile_dff_device.py" > "$OUT/profile_dff_device.log" 2>&1
  stamp "profile_dff_device: rc=$?"
  head -n 12 "$OUT/profile_dff_device.log"
fi

t=$(limit 90)
if (( t > 0 )); then
  timeout "$t" python3 -m pytest -q -ra -p no:cacheprovider -m gpu \
    "$ROOT/tests/test_nmf.py" "$ROOT/tests/test_batched_api.py" "$ROOT/tests/test_group_sparse.py" \
    "$ROOT/tests/test_nmf_inputs.py" "$ROOT/tests/test_dff.py" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 8
  stamp "gpu-marked NMF and DFF tests: rc=$?"
fi

t=$(limit 60)
(( t > 0 )) && sanitize memcheck "$t"
stamp "all done"
