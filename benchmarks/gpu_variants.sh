#!/usr/bin/env bash
# Build variants of the CUDA module side by side on a GPU machine and run one script with each:
# .gpu_variants/<name>/*.o replace the same-named objects of .gpu_prebuilt/ (both compiled here,
# see gpu_final.sh --prepare). Used for A/B runs of kernel build options (e.g. the fast path's
# register budget, its phase clock).
#   bash benchmarks/gpu_variants.sh SCRIPT.py [args]
#   VARIANTS="pad8 minb2" bash benchmarks/gpu_variants.sh ...   (only those)
set -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
now="$(bash "$ROOT/benchmarks/gpu_final.sh" --sources-hash)"
for vdir in "$ROOT"/.gpu_variants/*/; do
  name=$(basename "$vdir")
  [[ -n "${VARIANTS:-}" && " $VARIANTS " != *" $name "* ]] && continue
  # objects of other sources than these (and than .gpu_prebuilt's) would link into a mixed module
  if [[ "$(cat "$vdir/SOURCES" 2>/dev/null)" != "$now" || "$(cat "$ROOT/.gpu_prebuilt/SOURCES" 2>/dev/null)" != "$now" ]]; then
    echo "== variant $name: skipped (compiled from other sources; gpu_final.sh --prepare with PREPARE_VARIANTS)"
    continue
  fi
  pkg=/tmp/variant_$name
  rm -rf "$pkg" && mkdir -p "$pkg" && cp -r "$ROOT/python/dffkit" "$pkg/" && rm -f "$pkg"/dffkit/_cuda*.so
  objs=()
  for o in "$ROOT"/.gpu_prebuilt/*.o; do
    b=$(basename "$o"); [[ -f "$vdir/$b" ]] && objs+=("$vdir/$b") || objs+=("$o")
  done
  bash "$ROOT/benchmarks/link_cuda_module.sh" "$pkg/dffkit" "${objs[@]}" \
      || { echo "== variant $name: link failed"; continue; }
  # the CPU module of the main build
  cp /tmp/dffkit_site/dffkit/_cpu*.so "$pkg/dffkit/" 2>/dev/null
  echo "== variant $name"
  # each variant's files (cuda_bench.py's JSON) in its own folder under $OUT
  vout="${OUT:-$ROOT/gpu_out}/variant_$name"
  mkdir -p "$vout"
  (cd /tmp && OUT="$vout" PYTHONPATH="$pkg" timeout "${VARIANT_TIMEOUT:-60}" $PY "$@" 2>&1 | tee "$vout/log.txt")
done
