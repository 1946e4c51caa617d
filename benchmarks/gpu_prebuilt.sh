# Sourced by the short lease scripts (gpu_verify.sh, gpu_profile_dff.sh) with ROOT and stamp()
# set: unpacks the CUDA objects carried in .gpu_pack (gpu_final.sh --pack) and exports
# GPU_CHECK_PREBUILT when they were compiled from these sources (gpu_check.sh then links them
# instead of running pip's nvcc build).
if [[ -f "$ROOT/.gpu_pack/objs.tar.xz" ]]; then
  tar -xJf "$ROOT/.gpu_pack/objs.tar.xz" -C "$ROOT" && stamp "CUDA objects unpacked"
fi
if [[ "$(cat "$ROOT/.gpu_prebuilt/SOURCES" 2>/dev/null)" == "$(bash "$ROOT/benchmarks/gpu_final.sh" --sources-hash)" ]]; then
  export GPU_CHECK_PREBUILT="$ROOT/.gpu_prebuilt"
else
  stamp "the prebuilt objects are stale: building with pip"
fi
