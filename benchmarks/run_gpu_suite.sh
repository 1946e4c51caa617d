#!/usr/bin/env bash
# Build dffkit with its CUDA engine on the GPU machine and run `dffkit bench --suite gpu`.
#
#   bash benchmarks/run_gpu_suite.sh            # from the repository root
#
# Writes under $OUT (default: benchmarks/results/): <name>.json, <name>.md, <name>.png and
# <name>.log, where <name> = gpu-<UTC date>-<GPU model>. Environment:
#   DFFKIT_CUDA_ARCHITECTURES  CUDA architectures to build (default 90: H100/H200)
#   BENCH_ARGS                 extra `dffkit bench` arguments, e.g. "--problems 'dff-*,tall-200k'"
#   SKIP_BUILD=1               use the dffkit already installed
# Needs python3 with numpy, scikit-build-core, pybind11 (build), and torch / cupy / scikit-learn /
# matplotlib for the peers and the plot (missing ones are reported as skipped).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

gpu_slug="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 \
            | sed -e 's/NVIDIA //' -e 's/[^A-Za-z0-9]\+/-/g' -e 's/-$//' | tr 'A-Z' 'a-z' || true)"
NAME="gpu-$(date -u +%Y-%m-%d)-${gpu_slug:-nogpu}"
LOG="$OUT/$NAME.log"
exec > >(tee "$LOG") 2>&1

echo "== dffkit GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not on PATH"
python3 --version

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  export DFFKIT_CUDA_ARCHITECTURES="${DFFKIT_CUDA_ARCHITECTURES:-90}"
  t0=$(date +%s)
  echo "== building dffkit (CUDA architectures $DFFKIT_CUDA_ARCHITECTURES)"
  (cd "$ROOT" && python3 -m pip install --no-build-isolation --no-deps . 2>&1 | tail -n 25)
  echo "== build took $(( $(date +%s) - t0 )) s"
fi

DFFKIT_COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
[[ -n "$DFFKIT_COMMIT" && -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]] \
  && DFFKIT_COMMIT="$DFFKIT_COMMIT+local changes"
export DFFKIT_COMMIT

# run from outside the source tree so that the installed package (with _cuda) is imported
cd /tmp
python3 - <<'EOF'
import dffkit
print("dffkit", dffkit.__version__, "from", dffkit.__file__)
print("backends:", dffkit.available_backends(), "unavailable:", dffkit.unavailable_reasons())
EOF

t0=$(date +%s)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
python3 -m dffkit bench --suite gpu \
  --json "$OUT/$NAME.json" --markdown "$OUT/$NAME.md" --plot "$OUT/$NAME.png" ${BENCH_ARGS:-}
echo "== suite took $(( $(date +%s) - t0 )) s; results in $OUT/$NAME.{json,md,png,log}"
