#!/usr/bin/env bash
# Every GPU check of the project in one lease, stages in order of importance, each with its own
# time limit (the script goes on after a failure; what each stage wrote is under $OUT):
#   1. build (CUDA objects compiled ahead, see below) and tests/test_cuda.py  (gpu_check.sh);
#      1b. benchmarks/cuda_bench.py --ab (every kernel variant next to PyTorch)
#   2. every test marked `gpu` across the suite
#   3. dffkit bench --suite gpu (issues 4, 5, 8): JSON, Markdown, PNG
#   4. onnxruntime CUDA: VGG-16 conv5_3 throughput/latency (issue 6), DFF end to end (issue 7)
#   5. compute-sanitizer memcheck + racecheck over benchmarks/cuda_sanitize_driver.py (SANITIZE=0: off)
#
# Before the lease, here:  bash benchmarks/gpu_final.sh --prepare   (compiles cuda/*.cu for sm_90
# into .gpu_prebuilt/, an ignored folder to carry). PREPARE_VARIANTS="pad8:-DDFFKIT_GEMM_PAD8=1
# minb2:-DDFFKIT_GEMM_MINB=2 both:-DDFFKIT_GEMM_PAD8=1,-DDFFKIT_GEMM_MINB=2" also compiles the
# gemm engine's objects with those build switches into .gpu_variants/<name>/ (carry it too; on
# the machine: bash benchmarks/gpu_variants.sh benchmarks/cuda_bench.py --large); a variant with
# a DFFKIT_SMALL_* switch (prof:-DDFFKIT_SMALL_PROFILE=1: the fast path's phase clock) compiles
# the fast path's float32 object instead (bash benchmarks/gpu_variants.sh
# benchmarks/cuda_profile_small.py).
#
# bash benchmarks/gpu_final.sh --lease: every stage in one command (LEASE_LIMIT seconds), in the
# order 1, 4, 1b, 5 (memcheck, racecheck), 2, 5c (the build-switch variants), 3, 5b (ncu), each
# skipped or cut short when the time left is too little. For a 15-minute lease that also brings
# onnxruntime-gpu: here, `python3 benchmarks/ort_slim.py` (the wheel trimmed to sm_90, two parts)
# and `bash benchmarks/gpu_final.sh --pack` (the objects, compressed); there, one call carrying
# .ortslim1 (`mkdir -p /tmp/ortw && cp .ortslim1/* /tmp/ortw/`), then at once, on the same warm
# machine, one carrying .ortslim2 and .gpu_pack that runs this with --lease.
# bash benchmarks/gpu_final.sh --ort: stage 4 alone (after the build), for the lease that brought
# onnxruntime-gpu in chunks: issues 6 and 7, the nearest to their targets.
# bash benchmarks/gpu_final.sh --short: for a lease of 15 minutes (one command of at most 600 s):
# stage 1 (tests/test_cuda.py, 200 s), 1b (cuda_bench.py --ab, 200 s), memcheck (90 s), in that
# order; every row of the bench is in cuda_bench_ab.log as soon as it is timed. onnxruntime-gpu arrives in chunks
# (../shared/tools/ort-gpu-chunks.sh) and is installed here when /tmp/ortw holds them.
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# what CUDA objects are compiled from (the locale fixed: it orders the globs), as 16 hex digits;
# `gpu_final.sh --sources-hash` prints it (gpu_variants.sh asks)
sources_hash() {
  (cd "$ROOT" && export LC_ALL=C && cat cuda/*.cu cuda/*.cuh cuda/*.hpp cpp/*.hpp | sha256sum | cut -c1-16)
}
if [[ "${1:-}" == "--sources-hash" ]]; then
  sources_hash
  exit 0
fi
# one translation unit for sm_90: sm90_compile SOURCE OBJECT [extra nvcc flags]
sm90_compile() {
  nvcc -c "$1" -o "$2" -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC \
    -gencode arch=compute_90,code=sm_90 -I"$ROOT/cpp" -I"$ROOT/cuda" "${@:3}"
}

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$ROOT/.gpu_prebuilt"
  grep -qx "/.gpu_prebuilt/" "$ROOT/.git/info/exclude" || echo "/.gpu_prebuilt/" >> "$ROOT/.git/info/exclude"
  for f in "$ROOT"/cuda/*.cu; do
    sm90_compile "$f" "$ROOT/.gpu_prebuilt/$(basename "${f%.cu}").o" &
  done
  wait
  # build-switch variants for benchmarks/gpu_variants.sh (PREPARE_VARIANTS="name:-DFLAG ...";
  # the gemm engine's switches live in the nmf_mu_{f32,tf32,bf16x} objects): .gpu_variants/<name>/
  for spec in ${PREPARE_VARIANTS:-}; do
    vname=${spec%%:*}; vflags=${spec#*:}; vflags=${vflags//,/ }
    mkdir -p "$ROOT/.gpu_variants/$vname"
    grep -qx "/.gpu_variants/" "$ROOT/.git/info/exclude" || echo "/.gpu_variants/" >> "$ROOT/.git/info/exclude"
    # the fast path's switches (DFFKIT_SMALL_*: its phase clock, its register budget) live in the
    # nmf_small_* objects, the gemm engine's in nmf_mu_*
    files=("$ROOT"/cuda/nmf_mu_f32.cu "$ROOT"/cuda/nmf_mu_tf32.cu "$ROOT"/cuda/nmf_mu_bf16x.cu)
    [[ "$vflags" == *DFFKIT_SMALL* ]] && files=("$ROOT"/cuda/nmf_small_f32.cu)
    for f in "${files[@]}"; do
      sm90_compile "$f" "$ROOT/.gpu_variants/$vname/$(basename "${f%.cu}").o" $vflags &
    done
    wait
    sources_hash > "$ROOT/.gpu_variants/$vname/SOURCES"
  done
  # what the objects were compiled from: the next lease links them only if the sources match
  sources_hash > "$ROOT/.gpu_prebuilt/SOURCES"
  ls -la "$ROOT/.gpu_prebuilt"
  exit 0
fi

# --pack: .gpu_prebuilt and .gpu_variants into .gpu_pack/objs.tar.xz (about a quarter of their
# size; the next lease unpacks it before anything else), for a call that carries other things too
if [[ "${1:-}" == "--pack" ]]; then
  mkdir -p "$ROOT/.gpu_pack"
  grep -qx "/.gpu_pack/" "$ROOT/.git/info/exclude" || echo "/.gpu_pack/" >> "$ROOT/.git/info/exclude"
  dirs=(.gpu_prebuilt); [[ -d "$ROOT/.gpu_variants" ]] && dirs+=(.gpu_variants)
  tar -C "$ROOT" -cf - "${dirs[@]}" | xz -9 -T2 > "$ROOT/.gpu_pack/objs.tar.xz"
  ls -la "$ROOT/.gpu_pack"
  exit 0
fi

SHORT=0
LEASE=0
if [[ "${1:-}" == "--short" ]]; then
  SHORT=1
  : "${TEST_TIMEOUT_1:=200}" "${AB_BENCH_TIMEOUT:=200}"
fi
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
# --lease: every stage in one command of at most LEASE_LIMIT seconds (default 560), in the order
# 1, 1b, 5 (memcheck, racecheck), 2, 4, 3, each under its own limit and 3 on what is left; the
# logs are written to a staging folder and packed into $OUT/gpu_out.tgz after every stage (a
# lease hands back at most 8 files, and a command stopped at its limit keeps the last archive)
if [[ "${1:-}" == "--lease" ]]; then
  LEASE=1
  FINAL_OUT="$OUT"
  export OUT=/tmp/gpu_stage_out
  rm -rf "$OUT" && mkdir -p "$OUT"
  : "${LEASE_LIMIT:=560}" "${TEST_TIMEOUT_1:=100}" "${AB_BENCH_TIMEOUT:=130}" "${SAN_TIMEOUT:=60}" \
    "${PYTEST_GPU_TIMEOUT:=50}"
fi
pack() {
  [[ $LEASE == 1 ]] && tar czf "$FINAL_OUT/gpu_out.tgz.part" -C "$OUT" . \
    && mv "$FINAL_OUT/gpu_out.tgz.part" "$FINAL_OUT/gpu_out.tgz"
  return 0
}
export PYTHONUNBUFFERED=1
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }

# the CUDA objects packed here (--pack: .gpu_pack/objs.tar.xz, a quarter of their size, so that
# onnxruntime's second chunk travels with them)
if [[ -f "$ROOT/.gpu_pack/objs.tar.xz" ]]; then
  tar -xJf "$ROOT/.gpu_pack/objs.tar.xz" -C "$ROOT" && stamp "CUDA objects unpacked from .gpu_pack"
fi
# onnxruntime-gpu trimmed to sm_90 (benchmarks/ort_slim.py): its parts come in .ortslim1, .ortslim2
# (the first by an earlier call on the same warm machine, copied to /tmp/ortw)
for d in "$ROOT"/.ortslim*/; do [[ -d "$d" ]] && mkdir -p /tmp/ortw && cp "$d"/* /tmp/ortw/; done
if ls /tmp/ortw/ort_slim.tar.xz.part* > /dev/null 2>&1; then
  nparts=$(ls /tmp/ortw/ort_slim.tar.xz.part* | wc -l)
  if [[ "$nparts" == "$(cat /tmp/ortw/NPARTS 2>/dev/null)" ]]; then
    mkdir -p /tmp/site && cat /tmp/ortw/ort_slim.tar.xz.part* | xz -d -T0 | tar -x -C /tmp/site \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    stamp "onnxruntime-gpu (sm_90 only): $(python3 -c 'import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())' 2>&1)"
  else
    stamp "onnxruntime-gpu: $nparts of $(cat /tmp/ortw/NPARTS 2>/dev/null || echo '?') parts here (the machine was not the same warm one): not installed"
  fi
fi
if [[ -f /tmp/ortw/NAME ]]; then
  (cd /tmp/ortw && cat part* > "$(cat NAME)" && python3 -m pip install -q --no-index --no-deps \
     --no-compile --target /tmp/site "$(cat NAME)") && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  stamp "onnxruntime-gpu: $(python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' 2>&1)"
fi

if [[ -d "$ROOT/.gpu_prebuilt" ]]; then
  now="$(sources_hash)"
  if [[ "$(cat "$ROOT/.gpu_prebuilt/SOURCES" 2>/dev/null)" == "$now" ]]; then
    export GPU_CHECK_PREBUILT="$ROOT/.gpu_prebuilt"
  else
    stamp "the prebuilt CUDA objects are stale (sources changed since --prepare): building with pip"
  fi
fi

# 4. onnxruntime on CUDA: the extractor (issue 6) and DFF end to end (issue 7)
stage4() {
  if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    timeout "${ORT_TIMEOUT:-90}" python3 "$ROOT/benchmarks/bench_features.py" --device cuda --out "$OUT" 2>&1 | tail -n 20
    timeout "${ORT_TIMEOUT:-90}" python3 "$ROOT/benchmarks/bench_dff.py" --device cuda --out "$OUT/dff_cuda" 2>&1 | tail -n 20
  else
    stamp "no onnxruntime CUDA provider here: stage 4 skipped"
  fi
  stamp "stage 4 done"
}

# --ort: issues 6 and 7 alone, for a lease of 15 minutes that has just staged onnxruntime-gpu in
# /tmp/ortw (the chunk calls): build (prebuilt objects), stage 4, into $OUT; no CUDA tests
if [[ "${1:-}" == "--ort" ]]; then
  GPU_CHECK_STAGES="build" source "$ROOT/benchmarks/gpu_check.sh"
  (cd /tmp && stage4)
  exit 0
fi

# 1. build + the CUDA engine's own tests
GPU_CHECK_STAGES="build test" TEST_TIMEOUT="${TEST_TIMEOUT_1:-180}" source "$ROOT/benchmarks/gpu_check.sh"
stamp "stage 1 done"
pack
if [[ $LEASE == 1 ]]; then
  (cd /tmp && stage4)
  pack
fi

# 1b. issue 5's four shapes with every kernel variant side by side (cuda_bench.py --ab): the
#     fast path on CUDA or tensor cores, the general resident kernel, the sweep and the gemm
#     engine (CUDA cores, split tf32, tf32, bf16x), PyTorch: the data for the defaults
(cd /tmp && OUT="$OUT" timeout "${AB_BENCH_TIMEOUT:-240}" python3 "$ROOT/benchmarks/cuda_bench.py" --ab 2>&1 \
   | tee "$OUT/cuda_bench_ab.log" | tail -n 40)
stamp "stage 1b done"
pack

if [[ $LEASE == 1 ]]; then
  GPU_CHECK_STAGES="memcheck racecheck" bash "$ROOT/benchmarks/gpu_check.sh" 2>&1 | tail -n 8
  stamp "stage 5 (sanitizers) done"
  pack
  SANITIZE=0
fi

if [[ $SHORT == 1 ]]; then
  GPU_CHECK_STAGES="memcheck" SAN_TIMEOUT="${SAN_TIMEOUT:-90}" bash "$ROOT/benchmarks/gpu_check.sh" 2>&1 | tail -n 8
  stamp "short plan done (stages 2-4 and racecheck: a further lease)"
  exit 0
fi

# 2. every gpu-marked test
cd /tmp
timeout "${PYTEST_GPU_TIMEOUT:-150}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu "$ROOT/tests" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
stamp "stage 2 done"
pack
# 4. (before 3, which takes what is left; a lease ran it after stage 1)
if [[ $LEASE != 1 ]]; then
  stage4
  pack
fi
if [[ $LEASE == 1 ]]; then
  # 5c. the build-switch variants (.gpu_variants, gpu_final.sh --prepare with PREPARE_VARIANTS)
  #     next to the main build, each in its own folder under $OUT: the large shapes for the gemm
  #     engine's switches, the fast path's phase clock for prof
  if [[ -d "$ROOT/.gpu_variants" ]] && (( LEASE_LIMIT - SECONDS > 200 )); then
    (cd /tmp && mkdir -p "$OUT/variant_main" && OUT="$OUT/variant_main" timeout "${VARIANT_TIMEOUT:-60}" \
       python3 "$ROOT/benchmarks/cuda_bench.py" --large 2>&1 | tee "$OUT/variant_main/log.txt" | tail -n 12)
    VARIANTS="${LARGE_VARIANTS:-pad8 minb2}" bash "$ROOT/benchmarks/gpu_variants.sh" \
      "$ROOT/benchmarks/cuda_bench.py" --large 2>&1 | tail -n 30
    VARIANTS=prof bash "$ROOT/benchmarks/gpu_variants.sh" "$ROOT/benchmarks/cuda_profile_small.py" 2>&1 | tail -n 30
    stamp "stage 5c (variants) done"
    pack
  fi
  BENCH_SUITE_TIMEOUT=$(( LEASE_LIMIT - SECONDS - 15 - ${NCU_RESERVE:-60} ))
  (( BENCH_SUITE_TIMEOUT < 30 )) && BENCH_SUITE_TIMEOUT=30
fi

# 3. the GPU benchmark suite
DATE="$(date -u +%Y-%m-%d)"
set -f  # BENCH_ARGS holds globs for the bench, not for the shell
timeout "${BENCH_SUITE_TIMEOUT:-400}" python3 -m dffkit bench --suite gpu \
  --json "$OUT/gpu-$DATE-h200.json" --markdown "$OUT/gpu-$DATE-h200.md" --plot "$OUT/gpu-$DATE-h200.png" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log" | tail -n 60
set +f
stamp "stage 3 done"
pack

# 5b. (a lease, with what is left) Nsight Compute on the gemm engine's kernels at issue 5's two
#     large shapes (NCU_TIMEOUT each; NCU=0: off): where their time goes (pipes, stalls,
#     shared-memory conflicts)
if [[ $LEASE == 1 ]] && (( LEASE_LIMIT - SECONDS > 40 )); then
  if [[ "${NCU:-1}" == 1 ]]; then
    ncu_bin="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
    sec="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats
         --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
         --section MemoryWorkloadAnalysis_Tables"
    ncu_one() {  # name fused-switch kernel-regex count args...
      local name=$1 fused=$2 kre=$3 cnt=$4; shift 4
      (( LEASE_LIMIT - SECONDS > ${NCU_TIMEOUT:-45} + 5 )) || { stamp "ncu $name: no time left"; return; }
      (cd /tmp && DFFKIT_CUDA_GEMM_FUSED=$fused timeout "${NCU_TIMEOUT:-45}" "$ncu_bin" --clock-control none \
         -k "regex:$kre" -c "$cnt" $sec python3 "$ROOT/benchmarks/cuda_one_fit.py" "$@" \
         > "$OUT/ncu_$name.txt" 2>&1)
      stamp "ncu $name: rc=$?"
    }
    ncu_one tall_fp32_1pass 1 gemm_fused 1 200000 512 20 2 fp32 gemm
    ncu_one tall_tf32_1pass 1 gemm_fused 1 200000 512 20 2 tf32 gemm
    ncu_one tall_fp32_2pass 0 "gemm_(n|p)_kernel" 2 200000 512 20 2 fp32 gemm
    ncu_one square_fp32 0 "gemm_(n|p)_kernel" 2 16384 16384 64 1 fp32 gemm
    pack
  fi
fi

# 5. compute-sanitizer memcheck and racecheck over the driver (every kernel path, tiny problems)
if [[ "${SANITIZE:-1}" == 1 ]]; then
  GPU_CHECK_STAGES="memcheck racecheck" SAN_TIMEOUT="${SAN_TIMEOUT:-100}" bash "$ROOT/benchmarks/gpu_check.sh" 2>&1 | tail -n 8
  stamp "stage 5 done"
fi
stamp "all stages done"
pack
