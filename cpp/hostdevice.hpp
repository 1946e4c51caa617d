#pragma once
/// DFFKIT_HD marks functions that both backends call: __host__ __device__ under nvcc, inline
/// otherwise, so each formula is written once.
#if defined(__CUDACC__)
#define DFFKIT_HD __host__ __device__ __forceinline__
#else
#define DFFKIT_HD inline
#endif
