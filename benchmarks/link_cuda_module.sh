#!/usr/bin/env bash
# Link dffkit's CUDA module from CUDA objects compiled ahead (gpu_final.sh --prepare) and the
# bindings, for the python3 on PATH:  link_cuda_module.sh PACKAGE_DIR OBJECT.o...
# writes PACKAGE_DIR/_cuda<EXT_SUFFIX>. Used by gpu_check.sh and gpu_variants.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest=$1
shift
inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pbinc=$(python3 -c "import pybind11; print(pybind11.get_include())")
ext=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
nvbin="$(dirname "$(command -v nvcc)")"
libs=()  # where libcudart_static.a may be: beside nvcc (GPU machine) or under /usr/local/cuda
for d in "$nvbin/../lib64" "$nvbin/../lib" /usr/local/cuda/lib64 /usr/local/cuda/lib; do
  [[ -d "$d" ]] && libs+=("-L$d")
done
g++ -O1 -std=c++17 -fPIC -fvisibility=hidden -shared -I"$ROOT/cpp" -I"$ROOT/cuda" -I"$inc" \
    -I"$pbinc" "$ROOT/cuda/bindings/module_cuda.cpp" "$@" \
    "${libs[@]}" -lcudart_static -lrt -lpthread -ldl -o "$dest/_cuda$ext"
