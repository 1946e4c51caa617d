// The engines for X stored as bfloat16, float32 arithmetic: one translation unit per precision
// mode, so that the modes compile in parallel.
#include "nmf_engine.cuh"

DFFKIT_DEFINE_ENGINES(bf16x, float, __nv_bfloat16, 0)
