#pragma once
// Device pieces that every kernel file uses, written so that the CPU emulator
// (cuda/emu/cuda_emu.hpp, used by the tests) compiles them too: under DFFKIT_EMULATE the CUDA
// keywords and built-ins come from the emulator instead of the CUDA headers.
#if defined(DFFKIT_EMULATE)
#include "emu/cuda_emu.hpp"
#define DFFKIT_DYNAMIC_SMEM(name) unsigned char* name = ::dffkit_emu::block_smem()
// a statically sized shared array: DFFKIT_SHARED(double, red, [8][33]) is __shared__ double red[8][33]
#define DFFKIT_SHARED(T, name, dims)                                                           \
  T(&name) dims = *reinterpret_cast<T(*) dims>(::dffkit_emu::static_smem(                     \
      [] { static const char key = 0; return &key; }(), sizeof(T dims)))
// a vector access the GPU would fault on ("misaligned address") stops the emulator
#define DFFKIT_EMU_ALIGNED(p, bytes) ::dffkit_emu::check_aligned(p, bytes, __FILE__, __LINE__)
#else
#define DFFKIT_EMU_ALIGNED(p, bytes) ((void)0)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define DFFKIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define DFFKIT_SHARED(T, name, dims) __shared__ T name dims
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
  // DFFKIT_CUDA_SMALL_TC=1: the fast path's products on tensor cores (split tf32, float32
  // accuracy; off: slower on the H200, one image 2.41 against 1.44 ms in session 15's run 6).
  // DFFKIT_CUDA_SMALL_ONE_PER_SM=1: its blocks sized one to
  // an SM instead of two (fewer, larger blocks per problem; for side-by-side timings).
  int small_tc = 0, small_one_per_sm = 0;
  // DFFKIT_CUDA_SMALL_REGS=1 / 2: the CUDA-core fast path's register budget forced to one / two
  // blocks per SM (0: chosen per call from the number of blocks, nmf_small.cuh)
  int small_regs = 0;
  // the fast path's column-split kernel (one cluster barrier per iteration;
  // nmf_small_cols_kernel.cuh): the default since session 15 (timed on the H200); off with
  // DFFKIT_CUDA_SMALL_COLS=0 or a switch of the row-split kernel. DFFKIT_CUDA_SMALL_COLS_C=C
  // (1, 2, 4, 8, 16) takes that cluster size where the problem fits it (0: from the shape).
  int small_cols = 0, small_cols_c = 0;
  // DFFKIT_CUDA_SMALL_COLS_GATHER=1: the column-split kernel's W update split over the cluster's
  // blocks (each block its slice of the rows from the C shares of X H^T, one more cluster
  // barrier, then the other rows copied from their owners: about 2 m k distributed-shared-memory
  // loads per block and iteration instead of C m k); the same bits. Not yet timed: off by default.
  int small_cols_gather = 0;
  // DFFKIT_CUDA_SMALL_COLS_VEC=1 (session 19): the column-split kernel's W update reads the C
  // shares of X H^T four floats a distributed-shared-memory request (a quarter of the requests:
  // 245 float4 loads per peer for one image instead of 980 floats, one round of loads instead of
  // four), the first round issued before G_H's sums; the same bits. Not yet timed: off.
  int small_cols_vec = 0;
  // DFFKIT_CUDA_SMALL_COLS_PUSH=1 (session 19): the column-split kernel's blocks store their
  // shares of X H^T into every block's shared memory (2 C m K floats more a block) instead of
  // each block loading all of them from its peers; the same bits. The host sets it per launch
  // where that layout fits (nmf_small.cuh); not yet timed: off.
  int small_cols_push = 0;
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

struct ResOut {
  int n_iter;
  double error_init, error;
};

// Thread-block clusters (sm_90): the C blocks of one problem share their partial sums through
// distributed shared memory. With C = 1 these are a plain block barrier and the identity.
#if defined(DFFKIT_EMULATE)
__device__ __forceinline__ unsigned cluster_rank(int C) { return C > 1 ? ::dffkit_emu::cluster_rank() : 0; }
__device__ __forceinline__ void cluster_barrier(int C) {
  if (C > 1) ::dffkit_emu::cluster_sync();
  else __syncthreads();
}
template <class U>
__device__ __forceinline__ U* cluster_peer(U* p, int rank, int C) {
  return C > 1 ? ::dffkit_emu::map_shared_rank(p, rank) : p;
}
#else
__device__ __forceinline__ unsigned cluster_rank(int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) return cooperative_groups::this_cluster().block_rank();
#endif
  (void)C;
  return 0;
}
__device__ __forceinline__ void cluster_barrier(int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) {
    cooperative_groups::this_cluster().sync();
    return;
  }
#endif
  (void)C;
  __syncthreads();
}
template <class U>
__device__ __forceinline__ U* cluster_peer(U* p, int rank, int C) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (C > 1) return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#endif
  (void)rank; (void)C;
  return p;
}
#endif

// ---- tf32 tensor cores (mma.sync m16n8k8, float32 accumulation) --------------------------------
#if defined(DFFKIT_EMULATE)
__device__ __forceinline__ std::uint32_t to_tf32(float x) { return ::dffkit_emu::to_tf32(x); }
__device__ __forceinline__ void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                                         const std::uint32_t (&b)[2]) {
  ::dffkit_emu::mma_m16n8k8_tf32(d, a, b);
}
#else
/// x rounded to tf32 as cvt.rna.tf32.f32 rounds a finite value (to nearest, ties away from zero:
/// the same bits; the emulator computes it this way too), in two integer instructions instead of
/// one conversion: type conversions issue at a lower rate than integer arithmetic (recalled from
/// the programming guide's throughput table, not checked in session 5), and the split-tf32
/// products convert every operand twice. The speed effect is to be measured (ncu's pipe
/// utilisation of the tensor-core kernels before and after).
__device__ __forceinline__ std::uint32_t to_tf32(float x) {
  return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}

/// d += a (16 x 8, row-major fragments) * b (8 x 8, column-major fragments)
__device__ __forceinline__ void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                                         const std::uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

/// v as its tf32 part (SPLIT: and the tf32 part of the remainder in lo).
template <bool SPLIT>
__device__ __forceinline__ void tf32_parts(float v, std::uint32_t& hi, std::uint32_t& lo) {
  if constexpr (SPLIT) {
    hi = to_tf32(v);
    lo = to_tf32(v - __uint_as_float(hi));
  } else {
    hi = __float_as_uint(v);  // rounded when staged
    lo = 0;
  }
}

/// d += t with t's four values added in float32, rounded to nearest.
__device__ __forceinline__ void add4(float (&d)[4], const float (&t)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) d[e] += t[e];
}

/// d += a b to float32 accuracy from split operands (a = ah + al, b = bh + bl, tf32 parts):
/// al bh + ah bl + ah bh, the small terms first; the dropped al bl is below 2^-22 of a b.
/// The three products go into a fresh accumulator, added to d by an ordinary float32 add: the
/// tensor cores drop the low bits of the addends they align instead of rounding to nearest
/// (cuda/NOTES.md, session 6), so a long chain of mma into d loses low bits of d at every step,
/// downwards for positive sums (measured on the H200: ~1e-5 relative over a 520-long
/// reduction, up to 1e-3 in the factors after 100 iterations). Summed this way, each step's
/// loss is of the order of an ulp of that step's eight products, and d's additions round to
/// nearest.
__device__ __forceinline__ void mma_tf32x3(float (&d)[4], const std::uint32_t (&ah)[4],
                                           const std::uint32_t (&al)[4], const std::uint32_t (&bh)[2],
                                           const std::uint32_t (&bl)[2]) {
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  mma_tf32(t, al, bh);
  mma_tf32(t, ah, bl);
  mma_tf32(t, ah, bh);
  add4(d, t);
}

/// The same with one operand exact in tf32 (its low part zero): two mma. SMALL_A: the low part
/// is a's (al bh + ah bh), else b's (ah bl + ah bh).
template <bool SMALL_A>
__device__ __forceinline__ void mma_tf32x2(float (&d)[4], const std::uint32_t (&ah)[4],
                                           const std::uint32_t (&al)[4], const std::uint32_t (&bh)[2],
                                           const std::uint32_t (&bl)[2]) {
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (SMALL_A) mma_tf32(t, al, bh);
  else mma_tf32(t, ah, bl);
  mma_tf32(t, ah, bh);
  add4(d, t);
}

}  // namespace cuda_detail
}  // namespace dffkit
