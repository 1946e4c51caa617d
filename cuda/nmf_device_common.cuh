#pragma once
// Device pieces that every kernel file uses, written so that the CPU emulator
// (cuda/emu/cuda_emu.hpp, used by the tests) compiles them too: under DFFKIT_EMULATE the CUDA
// keywords and built-ins come from the emulator instead of the CUDA headers.
#if defined(DFFKIT_EMULATE)
#include "emu/cuda_emu.hpp"
#define DFFKIT_DYNAMIC_SMEM(name) unsigned char* name = ::dffkit_emu::block_smem()
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define DFFKIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cstdint>

namespace dffkit {
namespace cuda_detail {

using i64 = std::int64_t;

constexpr int NT = 256;   // threads per block

template <class T, class XS>
__device__ __forceinline__ T xget(const XS* p) {
  return T(*p);
}
template <>
__device__ __forceinline__ float xget<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

/// Loss, penalties and options, by value in every launch.
struct KParams {
  int kl = 0;
  double l1_W = 0, l2_W = 0, l1_H = 0, l2_H = 0, lam = 0, mu = 0;
  int groups = 0;  // group term active (offsets given and lam > 0)
  int update_H = 1, max_iter = 200, record_obj = 0;
  double tol = 1e-4;
  int profile = 0;  // DFFKIT_CUDA_PROFILE=1: the fast path prints its phase times (block 0)
};

__device__ __forceinline__ i64 group_of_row(const i64* goff, i64 ngroups, i64 row) {
  i64 lo = 0, hi = ngroups;  // last g with goff[g] <= row
  while (hi - lo > 1) {
    const i64 mid = (lo + hi) / 2;
    if (goff[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

/// Sum of v over the block in a fixed tree order; every thread gets the result.
__device__ __forceinline__ double block_sum(double v, double* red) {
  const int tid = threadIdx.x;
  __syncthreads();
  red[tid] = v;
  __syncthreads();
  for (int s = NT / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const double r = red[0];
  __syncthreads();
  return r;
}

}  // namespace cuda_detail
}  // namespace dffkit
