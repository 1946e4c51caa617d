#pragma once
// The CUDA engine's sums in a fixed order (init="random"'s mean of X, float64's ||X||^2,
// _cuda.fixed_order_sum), written against nmf_device_common.cuh so that the CPU emulator runs
// them (tests/test_sums_emu.py). The order is the CPU engine's (cpp/nmf_mu_cpu.cpp,
// chunked_sum): kChunk consecutive elements added one after another in float64, then the chunk
// sums one after another; the same bits on both engines (init="random" is bit-identical).
//
// A warp adds a chunk: its 32 lanes load 32 consecutive elements at a time (one coalesced
// load, the next 32 loaded while these are added), and every lane adds the 32 in order, each
// broadcast by a shuffle: the additions are the single chain of a loop over the chunk. Before
// session 17 one thread added a chunk, waiting on a dependent global load per element (32
// threads of a warp reading 32 different chunks): init="random" of a 196 x 512 X took 198 us
// then, 80 us with warps (H200, session 17's runs 9 and 10).
#include "nmf_device_common.cuh"

namespace dffkit {
namespace cuda_detail {

constexpr i64 kChunk = 4096;  // = kMeanChunk of the CPU engine
constexpr int kSumWarps = 4;  // warps (chunks) per block of the sum kernels

/// sum over i < len of x[i] (SQUARE: of x[i]^2, as s += d * d) in float64, in order; called by
/// all 32 lanes of a warp, each of which returns the sum.
template <class T, bool SQUARE>
__device__ __forceinline__ double warp_ordered_sum(const T* x, i64 len) {
  const int lane = int(threadIdx.x & 31);
  double s = 0;
  T v = lane < len ? x[lane] : T(0);
  i64 t = 0;
  for (; t + 32 <= len; t += 32) {
    const T next = t + 32 + lane < len ? x[t + 32 + lane] : T(0);
    // all 32 shuffles first, then the 32 additions: the chain waits on the additions alone,
    // not on a shuffle before each of them (in-order issue)
    double d[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) d[j] = double(__shfl_sync(0xffffffffu, v, j));
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      if (SQUARE) s += d[j] * d[j]; else s += d[j];
    }
    v = next;
  }
  const int rest = int(len - t);
  for (int j = 0; j < rest; ++j) {
    const double d = double(__shfl_sync(0xffffffffu, v, j));
    if (SQUARE) s += d * d; else s += d;
  }
  return s;
}

/// part[b * nc + c] = the ordered sum of chunk c of problem b (B problems of `count` elements
/// each, one after another in X); one warp a chunk, kSumWarps warps a block.
template <class T, bool SQUARE>
__global__ void chunk_sum_kernel(const T* X, i64 B, i64 count, double* part) {
  const i64 nc = (count + kChunk - 1) / kChunk;
  const i64 w = i64(blockIdx.x) * (blockDim.x / 32) + i64(threadIdx.x / 32);
  if (w >= B * nc) return;  // the whole warp
  const i64 b = w / nc, c = w - b * nc;
  const i64 begin = c * kChunk, len = count - begin < kChunk ? count - begin : kChunk;
  const double s = warp_ordered_sum<T, SQUARE>(X + b * count + begin, len);
  if ((threadIdx.x & 31) == 0) part[w] = s;
}

/// out[b] = the ordered sum of part[b * nc .. b * nc + nc); one warp a problem.
__global__ void ordered_total_kernel(const double* part, i64 B, i64 nc, double* out) {
  const i64 b = i64(blockIdx.x) * (blockDim.x / 32) + i64(threadIdx.x / 32);
  if (b >= B) return;
  const double s = warp_ordered_sum<double, false>(part + b * nc, nc);
  if ((threadIdx.x & 31) == 0) out[b] = s;
}

/// Blocks of 32 * kSumWarps threads for `warps` warps.
inline unsigned sum_blocks(i64 warps) { return unsigned((warps + kSumWarps - 1) / kSumWarps); }

}  // namespace cuda_detail
}  // namespace dffkit
