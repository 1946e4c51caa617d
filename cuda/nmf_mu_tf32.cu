// The engines for float32, the products with X on tf32 tensor cores: one translation unit per
// precision mode, so that the modes compile in parallel.
#include "nmf_engine.cuh"

DFFKIT_DEFINE_ENGINES(tf32, float, float, 1)
