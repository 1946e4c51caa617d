#!/usr/bin/env bash
# A short lease for onnxruntime-gpu experiments (issue 7), on a machine where an earlier call of
# the same lease left the first part of onnxruntime-gpu in /tmp/ortw (carry .ortslim1:
# `mkdir -p /tmp/ortw && cp .ortslim1/* /tmp/ortw/`); this call carries .ortslim2 and .gpu_pack.
# Builds from the packed objects while onnxruntime unpacks, then (CHECKS=1) the gpu-marked tests
# with onnxruntime-gpu and memcheck of the driver's SAN_ONLY cases, benchmarks/ort_cuda_graph_probe.py,
# benchmarks/bench_dff.py (DFF_BENCH_ARGS, DFF_BENCH_TIMEOUT) and (BREAKDOWN_TIMEOUT > 0)
# benchmarks/profile_dff_breakdown.py. Logs under $OUT.
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }
source "$ROOT/benchmarks/ort_unpack.sh"
ort_unpack_start
(( ort_ready )) || exit 2
source "$ROOT/benchmarks/gpu_prebuilt.sh"
GPU_CHECK_STAGES="build" source "$ROOT/benchmarks/gpu_check.sh" > "$OUT/build_stage.log" 2>&1
stamp "build: $(grep -m1 'build:' "$OUT/build_stage.log")"
wait
[[ -f /tmp/site/.done ]] || { stamp "onnxruntime-gpu did not unpack"; exit 3; }
[[ -f /tmp/dffkit_site/dffkit/__init__.py ]] && export PYTHONPATH="/tmp/dffkit_site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
cd /tmp || exit 1
# CHECKS=1: first the gpu-marked tests with onnxruntime-gpu on the path (DFF, the extractor, the
# NMF front end) and compute-sanitizer memcheck over the driver's SAN_ONLY cases (default "dff maps")
if [[ "${CHECKS:-0}" == 1 ]]; then
  timeout "${PYTEST_TIMEOUT:-90}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu "$ROOT/tests/test_dff.py" \
    "$ROOT/tests/test_features.py" "$ROOT/tests/test_nmf.py" "$ROOT/tests/test_batched_api.py" \
    "$ROOT/tests/test_device_views.py" 2>&1 | tee "$OUT/pytest_gpu_ort.log" | tail -n 6
  stamp "gpu-marked tests with onnxruntime-gpu: rc=$?"
  export SAN_ONLY="${SAN_ONLY:-dff maps}"
  timeout "${SAN_TIMEOUT:-40}" "$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)" --tool memcheck --error-exitcode 9 \
    python3 "$ROOT/benchmarks/cuda_sanitize_driver.py" > "$OUT/sanitizer_memcheck.log" 2>&1
  stamp "memcheck ($SAN_ONLY): rc=$?, $(grep -c '^ok' "$OUT/sanitizer_memcheck.log") ok, $(grep -c '^BAD' "$OUT/sanitizer_memcheck.log") BAD, $(grep 'ERROR SUMMARY' "$OUT/sanitizer_memcheck.log")"
fi
timeout "${PROBE_TIMEOUT:-60}" python3 "$ROOT/benchmarks/ort_cuda_graph_probe.py" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/ort_cuda_graph_probe.log"
stamp "probe: rc=$?"
if (( ${DFF_BENCH_TIMEOUT:-100} > 0 )); then
  timeout "${DFF_BENCH_TIMEOUT:-100}" python3 "$ROOT/benchmarks/bench_dff.py" --device cuda ${DFF_BENCH_ARGS:---models vgg16} \
    --out "$OUT/dff_cuda" > "$OUT/bench_dff.log" 2>&1
  stamp "bench_dff: rc=$?"
  tail -n 16 "$OUT/bench_dff.log"
fi
if (( ${BREAKDOWN_TIMEOUT:-0} > 0 )); then
  timeout "$BREAKDOWN_TIMEOUT" python3 "$ROOT/benchmarks/profile_dff_breakdown.py" 2>&1 | tee "$OUT/profile_dff_breakdown.log" | head -n 12
  stamp "profile_dff_breakdown: rc=$?"
fi
