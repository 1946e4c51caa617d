#!/usr/bin/env bash
# gpu_verify.sh, then DFF end to end on onnxruntime-gpu (issue 7), in one command on a machine
# where an earlier call of the same lease left the first part of onnxruntime-gpu in /tmp/ortw
# (carry .ortslim1: `mkdir -p /tmp/ortw && cp .ortslim1/* /tmp/ortw/`); this call carries
# .ortslim2 and .gpu_pack. onnxruntime is unpacked in the background while the CUDA checks run.
# Everything lands in $OUT/gpu_out.tgz, packed again after each stage (a command stopped at its
# limit keeps the last archive). VERIFY_DEADLINE (default 230) bounds gpu_verify.sh,
# DFF_BENCH_TIMEOUT (default 120) the DFF bench; PROFILE_ENVS: one image's DFF profile again per
# kernel switch ("DFFKIT_CUDA_SMALL_COLS_GATHER=1 DFFKIT_CUDA_SMALL_COLS=0"); STEPS_TIMEOUT bounds
# benchmarks/profile_dff_steps.py (STEPS_ARGS; 0: not run).
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FINAL_OUT="${OUT:-$ROOT/gpu_out}"
STAGE=/tmp/gpu_verify_out
rm -rf "$STAGE" && mkdir -p "$STAGE" "$FINAL_OUT"
pack() { tar czf "$FINAL_OUT/gpu_out.tgz.part" -C "$STAGE" . && mv "$FINAL_OUT/gpu_out.tgz.part" "$FINAL_OUT/gpu_out.tgz"; }
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }

source "$ROOT/benchmarks/ort_unpack.sh"
ort_unpack_start  # ort_ready=0 (said why): no DFF bench

OUT="$STAGE" DEADLINE="${VERIFY_DEADLINE:-230}" bash "$ROOT/benchmarks/gpu_verify.sh" 2>&1 | tee "$STAGE/verify.log"
pack
stamp "gpu_verify.sh done"

# the module gpu_verify.sh built (gpu_check.sh's prebuilt route installs it there)
[[ -f /tmp/dffkit_site/dffkit/__init__.py ]] && export PYTHONPATH="/tmp/dffkit_site${PYTHONPATH:+:$PYTHONPATH}"
if (( ort_ready )); then
  wait
  if [[ -f /tmp/site/.done ]]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    stamp "onnxruntime: $(python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1)"
    (cd /tmp && timeout "${DFF_BENCH_TIMEOUT:-120}" python3 "$ROOT/benchmarks/bench_dff.py" --device cuda \
       ${DFF_BENCH_ARGS:---models vgg16} --out "$STAGE/dff_cuda" 2>&1 | tee "$STAGE/bench_dff.log" | tail -n 30)
    stamp "bench_dff: rc=$?"
  else
    stamp "onnxruntime-gpu did not unpack"
  fi
  pack
fi
# each step of one image's DFF alone (STEPS_TIMEOUT, default 40 s; 0: skipped)
if (( ${STEPS_TIMEOUT:-40} > 0 )); then
  (cd /tmp && timeout "${STEPS_TIMEOUT:-40}" python3 "$ROOT/benchmarks/profile_dff_steps.py" ${STEPS_ARGS:---reps 150} \
     2>&1 | tee "$STAGE/profile_dff_steps.log")
  stamp "profile_dff_steps: rc=$?"
  pack
fi
# one image's DFF profile again under each of PROFILE_ENVS (space-separated NAME=VALUE: a kernel
# variant's switch), next to gpu_verify.sh's default one
for e in ${PROFILE_ENVS:-}; do
  (cd /tmp && env "$e" timeout 30 python3 "$ROOT/benchmarks/profile_dff_device.py" > "$STAGE/profile_dff_device.$e.log" 2>&1)
  stamp "profile_dff_device with $e: rc=$?"
  head -n 8 "$STAGE/profile_dff_device.$e.log"
done
pack
stamp "all done"
