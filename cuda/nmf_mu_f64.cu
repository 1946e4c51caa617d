// The engines for float64: one translation unit per precision mode, so that the modes compile in
// parallel.
#include "nmf_engine.cuh"

DFFKIT_DEFINE_ENGINES(f64, double, double, 0)
