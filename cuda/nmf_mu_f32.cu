// The engines for float32 on CUDA cores: one translation unit per precision mode, so that the
// modes compile in parallel.
#include "nmf_engine.cuh"

DFFKIT_DEFINE_ENGINES(f32, float, float, 0)
