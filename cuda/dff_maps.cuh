#pragma once
// DFF's heat maps on the device (issue 7): two kernels that give the host path's bits
// (python/dffkit/deep_feature_factorization.py, _NumpyOps: cpp/resample.cpp's separable bilinear
// resampler, then heat = clip(u / divisor, 0, 1) and labels = argmax_j heat_j * strength_j).
//   peaks:       for image t and concept j, the maximum of column j of W upsampled to H x W,
//                block partials parts[t][j][b] (the host takes their maximum and clamps at 0);
//   params:      the heat step's divisors and strengths from those partials, on the device
//                (the host's arithmetic: no copy to the host between the two steps);
//   heat+labels: heat (n, k, H, W) float32 and labels (n, H, W) int16 in one pass over the pixels.
// Both upsample through upsampled_at(), so a map's peak pixel divides to exactly 1.0. Portable:
// the CPU emulator (cuda/emu/cuda_emu.hpp) compiles this file for tests/emu/maps_emu.cpp.
#include "nmf_device_common.cuh"

#include <cstdint>

namespace dffkit {
namespace cuda_detail {

constexpr int kMapsThreads = 256;    // threads per block of both kernels
constexpr int kMapsMaxImages = 32;   // images per launch (their maps' addresses go by value)

/// One launch's images: image t's h*w x k block of W (row-major, row y*w + x) starts at maps[t].
struct MapsBatch {
  const float* maps[kMapsMaxImages];
  int n;
};

/// k concepts; feature grid h x w; output H x W.
struct MapsShape {
  int k, h, w, H, W;
};

/// a*b + c*d as resample_bilinear computes it: plain, two products and a sum each rounded
/// (cpp/resample.cpp compiled without FMA contraction), or fused, fma(w0, a0, w1*a1) (what GCC
/// makes of it with -ffp-contract=fast on a CPU with FMA, e.g. -march=native).
template <bool kFused>
__device__ __forceinline__ float blend(float w0, float a0, float w1, float a1) {
  if constexpr (kFused) {
    return __fmaf_rn(w0, a0, __fmul_rn(w1, a1));
  } else {
    return __fadd_rn(__fmul_rn(w0, a0), __fmul_rn(w1, a1));
  }
}

/// Pixel (y, x) of the map at `a` (column j of an image's block: a = maps[t] + j, stride k)
/// upsampled bilinearly: first along x within the two source rows, then along y.
/// Taps of an axis with n_out samples: int32 [i0 (n_out), i1 (n_out), bits of w0 (n_out),
/// bits of w1 (n_out)] (bilinear_taps in Python).
template <bool kFused>
__device__ __forceinline__ float upsampled_at(const float* __restrict__ a, const MapsShape& s,
                                              const int* __restrict__ ty,
                                              const int* __restrict__ tx, int y, int x) {
  const int iy0 = ty[y], iy1 = ty[s.H + y];
  const float c0 = __int_as_float(ty[2 * s.H + y]), c1 = __int_as_float(ty[3 * s.H + y]);
  const int ix0 = tx[x], ix1 = tx[s.W + x];
  const float wx0 = __int_as_float(tx[2 * s.W + x]), wx1 = __int_as_float(tx[3 * s.W + x]);
  const i64 k = s.k, row = i64(s.w) * k;
  const float* r0 = a + iy0 * row;
  const float* r1 = a + iy1 * row;
  const float u0 = blend<kFused>(wx0, r0[ix0 * k], wx1, r0[ix1 * k]);
  const float u1 = blend<kFused>(wx0, r1[ix0 * k], wx1, r1[ix1 * k]);
  return blend<kFused>(c0, u0, c1, u1);
}

/// numpy's maximum: NaN wins.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

/// numpy's clip(v, 0, 1): -0.0 and NaN kept.
__device__ __forceinline__ float clip01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

/// grid (nb, k, n): block b of map (t, j) takes pixels b*256 + i, stepping by nb*256, and
/// writes their maximum (-inf for none) to parts[(t*k + j)*nb + b].
template <bool kFused>
__global__ void __launch_bounds__(kMapsThreads)
    dff_peaks_kernel(MapsBatch batch, MapsShape s, const int* __restrict__ ty,
                     const int* __restrict__ tx, int nb, float* __restrict__ parts) {
  const int t = blockIdx.z, j = blockIdx.y, b = blockIdx.x;
  const float* a = batch.maps[t] + j;
  const i64 HW = i64(s.H) * s.W;
  float best = -INFINITY;
  for (i64 p = i64(b) * kMapsThreads + threadIdx.x; p < HW; p += i64(nb) * kMapsThreads) {
    const int y = int(p / s.W), x = int(p - i64(y) * s.W);
    best = nan_max(best, upsampled_at<kFused>(a, s, ty, tx, y, x));
  }
  for (int o = 16; o > 0; o >>= 1) best = nan_max(best, __shfl_xor_sync(0xffffffffu, best, o));
  DFFKIT_SHARED(float, red, [kMapsThreads / 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) red[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = red[0];
    for (int i = 1; i < kMapsThreads / 32; ++i) m = nan_max(m, red[i]);
    parts[(i64(t) * s.k + j) * nb + b] = m;
  }
}

/// 1-D grid over the n*H*W pixels (grid-stride). params: (n, 2k) float32, image t's divisors
/// then its strengths. heat[t][j] = clip(u / divisor, 0, 1) (a true division: the peak's pixel
/// is exactly 1; an infinite divisor gives 0); labels[t] = the first j of the largest
/// heat * strength (float32 products, strictly greater replaces), -1 where that is below
/// threshold; NaN handled as numpy's maximum and comparisons do.
template <bool kFused>
__global__ void __launch_bounds__(kMapsThreads)
    dff_heat_labels_kernel(MapsBatch batch, MapsShape s, const int* __restrict__ ty,
                           const int* __restrict__ tx, const float* __restrict__ params,
                           float threshold, float* __restrict__ heat,
                           std::int16_t* __restrict__ labels) {
  const i64 HW = i64(s.H) * s.W, total = i64(batch.n) * HW;
  const i64 step = i64(gridDim.x) * kMapsThreads;
  for (i64 q = i64(blockIdx.x) * kMapsThreads + threadIdx.x; q < total; q += step) {
    const int t = int(q / HW);
    const i64 p = q - t * HW;
    const int y = int(p / s.W), x = int(p - i64(y) * s.W);
    const float* divisor = params + i64(t) * 2 * s.k;
    const float* strength = divisor + s.k;
    float* out = heat + i64(t) * s.k * HW + p;
    float best = 0.f;
    int label = 0;
    for (int j = 0; j < s.k; ++j) {
      const float u = upsampled_at<kFused>(batch.maps[t] + j, s, ty, tx, y, x);
      const float h = clip01(__fdiv_rn(u, divisor[j]));
      out[j * HW] = h;
      const float v = __fmul_rn(h, strength[j]);
      if (j == 0 || v > best) {
        best = v;
        label = j;
      } else if (v != v) {
        best = v;  // np.maximum keeps a NaN; no later value is greater
      }
    }
    labels[q] = std::int16_t(best < threshold ? -1 : label);
  }
}

/// One block: the heat step's params (n, 2k) from the peaks step's partial maxima parts (n, k, nb)
/// on the device, as the host computes them from the same parts (python/dffkit/
/// deep_feature_factorization.py: the maxima, ``_strength_divisors``, ``_presence``,
/// ``_divisors``), so that the two steps need no copy to the host between them:
///   peak[t][j] = np.maximum(max_b parts[t][j][b], 0)       (NaN kept: numpy's max and maximum;
///                                                            -0.0 becomes +0.0, as there)
///   ref[t][j]  = max_t' peak[t'][j] (joint) or peak[t][j]  (NaN kept)
///   strength   = float32(double(peak) / double(ref)) where ref > 0, else 0
///   present    = strength > 0 and strength >= threshold    (float32 compares)
///   divisor    = peak where present and peak > 0, else +inf
/// params[t] = image t's k divisors, then its k strengths. A thread per concept j (two passes
/// over the images: the joint reference, then the values).
__global__ void __launch_bounds__(kMapsThreads)
    dff_params_kernel(const float* __restrict__ parts, int n, int k, int nb, bool joint,
                      float threshold, float* __restrict__ params) {
  auto peak_of = [&](int t, int j) {
    const float* p = parts + (i64(t) * k + j) * nb;
    float m = -INFINITY;
    for (int b = 0; b < nb; ++b) m = nan_max(m, p[b]);
    return (m != m || m > 0.f) ? m : 0.f;  // np.maximum(m, 0.0): NaN kept, -0.0 becomes +0.0
  };
  for (int j = int(threadIdx.x); j < k; j += kMapsThreads) {
    float ref = -INFINITY;
    if (joint)
      for (int t = 0; t < n; ++t) ref = nan_max(ref, peak_of(t, j));
    for (int t = 0; t < n; ++t) {
      const float peak = peak_of(t, j);
      const float r = joint ? ref : peak;
      const float strength =
          r > 0.f ? float(double(peak) / double(r)) : 0.f;  // IEEE division, then rounding
      const bool present = strength > 0.f && strength >= threshold;
      params[i64(t) * 2 * k + j] = (present && peak > 0.f) ? peak : INFINITY;
      params[i64(t) * 2 * k + k + j] = strength;
    }
  }
}

/// Blocks of the heat+labels launch for `pixels` pixels (grid-stride beyond).
inline unsigned maps_grid(i64 pixels) {
  const i64 blocks = (pixels + kMapsThreads - 1) / kMapsThreads;
  return unsigned(blocks < 1 ? 1 : (blocks > (i64(1) << 16) ? (i64(1) << 16) : blocks));
}

}  // namespace cuda_detail
}  // namespace dffkit
