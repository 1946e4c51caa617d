#!/usr/bin/env bash
# One image's DFF on the GPU, step by step (a short lease, no onnxruntime): build from the packed
# objects (carry .gpu_pack), then benchmarks/profile_dff_steps.py (each step alone),
# benchmarks/profile_dff_breakdown.py (the whole call, function by function), benchmarks/profile_dff_device.py
# (the whole call, cProfile; DEVICE_PROFILE_TIMEOUT=0 skips it), the gpu-marked tests of DFF and
# the NMF front end, and a part of tests/test_cuda.py (PYTEST_CUDA_K). Logs under $OUT.
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }
source "$ROOT/benchmarks/gpu_prebuilt.sh"
GPU_CHECK_STAGES="build" source "$ROOT/benchmarks/gpu_check.sh"
cd /tmp || exit 1
timeout "${STEPS_TIMEOUT:-60}" python3 "$ROOT/benchmarks/profile_dff_steps.py" 2>&1 | tee "$OUT/profile_dff_steps.log"
stamp "profile_dff_steps: rc=$?"
timeout "${BREAKDOWN_TIMEOUT:-60}" python3 "$ROOT/benchmarks/profile_dff_breakdown.py" 2>&1 \
  | tee "$OUT/profile_dff_breakdown.log"
stamp "profile_dff_breakdown: rc=$?"
if (( ${DEVICE_PROFILE_TIMEOUT:-30} > 0 )); then
  timeout "${DEVICE_PROFILE_TIMEOUT:-30}" python3 "$ROOT/benchmarks/profile_dff_device.py" > "$OUT/profile_dff_device.log" 2>&1
  stamp "profile_dff_device: rc=$?"
  head -n 8 "$OUT/profile_dff_device.log"
fi
# and tests/test_cuda.py's tests of PYTEST_CUDA_K (a -k expression; default: the random init's
# bits, the batches, the float64 oracle: what the engine's fixed-order sums feed)
timeout "${PYTEST_TIMEOUT:-60}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu "$ROOT/tests/test_dff.py" \
  "$ROOT/tests/test_nmf.py" "$ROOT/tests/test_batched_api.py" "$ROOT/tests/test_device_views.py" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -n 8
timeout "${PYTEST_TIMEOUT:-60}" python3 -m pytest -q -ra -p no:cacheprovider "$ROOT/tests/test_cuda.py" \
  -k "${PYTEST_CUDA_K:-random_init or batched or float64 or check or nan or finite}" 2>&1 \
  | tee "$OUT/pytest_cuda.log" | tail -n 8
stamp "gpu-marked tests: rc=$?"
