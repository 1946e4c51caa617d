#!/usr/bin/env bash
# A short lease for onnxruntime-gpu experiments (issue 7), on a machine where an earlier call of
# the same lease left the first part of onnxruntime-gpu in /tmp/ortw (carry .ortslim1:
# `mkdir -p /tmp/ortw && cp .ortslim1/* /tmp/ortw/`); this call carries .ortslim2 and .gpu_pack.
# Builds from the packed objects while onnxruntime unpacks, then benchmarks/ort_cuda_graph_probe.py
# and benchmarks/bench_dff.py (DFF_BENCH_ARGS, DFF_BENCH_TIMEOUT). Logs under $OUT.
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }
for d in "$ROOT"/.ortslim*/; do [[ -d "$d" ]] && mkdir -p /tmp/ortw && cp "$d"/* /tmp/ortw/; done
if [[ "$(ls /tmp/ortw/ort_slim.tar.xz.part* 2>/dev/null | wc -l)" != "$(cat /tmp/ortw/NPARTS 2>/dev/null)" ]]; then
  stamp "onnxruntime-gpu: not every part is here (was the machine the same warm one?)"; exit 2
fi
mkdir -p /tmp/site
(cat /tmp/ortw/ort_slim.tar.xz.part* | xz -d -T4 | tar -x -C /tmp/site && touch /tmp/site/.done) &
source "$ROOT/benchmarks/gpu_prebuilt.sh"
GPU_CHECK_STAGES="build" source "$ROOT/benchmarks/gpu_check.sh" > "$OUT/build_stage.log" 2>&1
stamp "build: $(grep -m1 'build:' "$OUT/build_stage.log")"
wait
[[ -f /tmp/site/.done ]] || { stamp "onnxruntime-gpu did not unpack"; exit 3; }
[[ -f /tmp/dffkit_site/dffkit/__init__.py ]] && export PYTHONPATH="/tmp/dffkit_site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
cd /tmp || exit 1
timeout "${PROBE_TIMEOUT:-60}" python3 "$ROOT/benchmarks/ort_cuda_graph_probe.py" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/ort_cuda_graph_probe.log"
stamp "probe: rc=$?"
if (( ${DFF_BENCH_TIMEOUT:-100} > 0 )); then
  timeout "${DFF_BENCH_TIMEOUT:-100}" python3 "$ROOT/benchmarks/bench_dff.py" --device cuda ${DFF_BENCH_ARGS:---models vgg16} \
    --out "$OUT/dff_cuda" > "$OUT/bench_dff.log" 2>&1
  stamp "bench_dff: rc=$?"
  tail -n 16 "$OUT/bench_dff.log"
fi
