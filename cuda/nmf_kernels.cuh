#pragma once
// Device building blocks shared by the resident solver (one block per problem, the whole solve
// in one launch) and the sweep path (many blocks per problem, a few launches per iteration).
// The element-wise formulas come from cpp/mu_update.hpp; the tiling lives here.
//
// A tile is TM = 32 consecutive rows of X. For a tile, with H and G_H = H H^T on chip:
//   N  = X_t H^T        (KL: R_t H^T, R_t = X_t / max(W_t H, eps))   warp = 4 rows, 2 per lane
//   W_t <- mu_step(W_t, N, W_t G_H (KL: row sums of H), penalties, group term)
//   P += W_t^T X_t      (KL: W_t^T R'_t with the new W_t)           thread = two columns of P
//   G += W_t^T W_t      (KL: colsum += column sums of W_t)
// Every sum runs in a fixed order (rows in order, fixed shuffle butterflies, fixed trees), so
// results depend on the shape only, never on timing.
#if !defined(DFFKIT_EMULATE)
#include <cuda_pipeline.h>
#endif

#include <cstdint>
#include <limits>

#include "mu_update.hpp"
#include "nmf_device_common.cuh"

namespace dffkit {
namespace cuda_detail {

constexpr int TM = 32;    // rows per tile: 8 warps x 4 rows
constexpr int NSPLIT = 16;  // lanes that share a pair of rows in the N step

/// Everything a tile needs. Pointers are generic: each may be shared or global memory.
template <class T>
struct TileArgs {
  i64 m, n;
  int k;
  T* W;                    // global, m x k (updated in place)
  const T* H;              // k x ldh
  i64 ldh;
  const T* GH;             // k x k (Frobenius)
  const T* rowsumH;        // k (KL)
  const i64* goff;         // n_groups + 1 (global), or null
  i64 ngroups;
  const double* gnorm;     // n_groups x k: group norms of the old W (global)
  T *Wo, *Wn, *Nb;         // TM x k each
  T* Rb;                   // TM x ldr (KL)
  i64 ldr;
  T* Pacc;                 // k x ldp: P accumulator, thread per column
  i64 ldp;
  T* Gacc;                 // k x k: G_W accumulator (Frobenius)
  T* colsum;               // k: column sums of the new W (KL)
};

/// R_t = src / max(W_t H, eps) for rt rows (src: X rows, W_t: Wsrc rows in smem).
template <class T, class XS>
__device__ void kl_ratio_tile(const TileArgs<T>& a, const T* Wsrc, int rt, const XS* xt,
                              i64 ldxt) {
  const i64 n = a.n;
  const int k = a.k;
  for (i64 e = threadIdx.x; e < i64(rt) * n; e += NT) {
    const int i = int(e / n);
    const i64 l = e - i64(i) * n;
    T wh = T(0);
    for (int j = 0; j < k; ++j) wh += Wsrc[i * k + j] * a.H[j * a.ldh + l];
    a.Rb[i * a.ldr + l] = kl_ratio(xget<T>(xt + i * ldxt + l), wh);
  }
}

/// Nb[i, j] = sum_l src[i, l] H[j, l] for the tile's rows: a warp takes 4 rows, each lane 2 of
/// them (one H load feeds two FMAs) and every 16th l; a fixed 4-level butterfly over the 16
/// lanes of a row pair.
template <class T, int KC, class S>
__device__ void n_step(const TileArgs<T>& a, int rt, const S* src, i64 lds) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s = lane & (NSPLIT - 1);
  const int i0 = warp * 4 + (lane >> 4) * 2;
  const bool act0 = i0 < rt, act1 = i0 + 1 < rt;
  const i64 n = a.n;
  const int k = a.k;
  for (int jc = 0; jc < k; jc += KC) {
    T acc0[KC], acc1[KC];
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) acc0[jj] = acc1[jj] = T(0);
    if (act0) {
      const S* row0 = src + i0 * lds;
      const S* row1 = src + (act1 ? i0 + 1 : i0) * lds;  // row 1 absent: a duplicate, dropped
#pragma unroll 2
      for (i64 l = s; l < n; l += NSPLIT) {
        const T x0 = xget<T>(row0 + l), x1 = xget<T>(row1 + l);
        const T* h = a.H + jc * a.ldh + l;
#pragma unroll
        for (int jj = 0; jj < KC; ++jj)
          if (jc + jj < k) {
            const T hv = h[jj * a.ldh];
            acc0[jj] += x0 * hv;
            acc1[jj] += x1 * hv;
          }
      }
    }
#pragma unroll
    for (int jj = 0; jj < KC; ++jj) {
#pragma unroll
      for (int off = NSPLIT / 2; off > 0; off >>= 1) {
        acc0[jj] += __shfl_xor_sync(0xffffffffu, acc0[jj], off);
        acc1[jj] += __shfl_xor_sync(0xffffffffu, acc1[jj], off);
      }
    }
    if (s == 0) {
#pragma unroll
      for (int jj = 0; jj < KC; ++jj)
        if (jc + jj < k) {
          if (act0) a.Nb[i0 * k + jc + jj] = acc0[jj];
          if (act1) a.Nb[(i0 + 1) * k + jc + jj] = acc1[jj];
        }
    }
  }
}

/// Pacc[j, l] += sum_i Wn[i, j] src[i, l], rows in order; a thread takes columns l and l + NT
/// (one load of W feeds two FMAs).
template <class T, int KC, class S>
__device__ void p_step(const TileArgs<T>& a, int rt, const S* src, i64 lds) {
  const i64 n = a.n;
  const int k = a.k;
  for (i64 l0 = threadIdx.x; l0 < n; l0 += 2 * NT) {
    const i64 l1 = l0 + NT;
    const bool two = l1 < n;
    const i64 l1s = two ? l1 : l0;  // absent second column: a duplicate, dropped
    for (int jc = 0; jc < k; jc += KC) {
      T acc0[KC], acc1[KC];
#pragma unroll
      for (int jj = 0; jj < KC; ++jj) {
        acc0[jj] = jc + jj < k ? a.Pacc[(jc + jj) * a.ldp + l0] : T(0);
        acc1[jj] = jc + jj < k ? a.Pacc[(jc + jj) * a.ldp + l1s] : T(0);
      }
#pragma unroll 4
      for (int i = 0; i < rt; ++i) {
        const T x0 = xget<T>(src + i * lds + l0), x1 = xget<T>(src + i * lds + l1s);
        const T* w = a.Wn + i * k + jc;
#pragma unroll
        for (int jj = 0; jj < KC; ++jj)
          if (jc + jj < k) {
            const T wv = w[jj];
            acc0[jj] += wv * x0;
            acc1[jj] += wv * x1;
          }
      }
#pragma unroll
      for (int jj = 0; jj < KC; ++jj)
        if (jc + jj < k) {
          a.Pacc[(jc + jj) * a.ldp + l0] = acc0[jj];
          if (two) a.Pacc[(jc + jj) * a.ldp + l1] = acc1[jj];
        }
    }
  }
}

// ---- tf32 tensor cores (mma.sync m16n8k8, float32 accumulation) --------------------------------


/// N step on tensor cores: Nb (rt x k) = src (rt x n) H^T. Warp per (16-row, 8-column) output
/// tile, the whole reduction over l in order of 8-wide steps. Out-of-range rows, columns and l
/// enter as zeros.
template <class S>
__device__ void n_step_tc(const TileArgs<float>& a, int rt, const S* src, i64 lds) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const i64 n = a.n;
  const int k = a.k;
  const int ntile = (k + 7) / 8, pairs = 2 * ntile;
  for (int p = warp; p < pairs; p += NT / 32) {
    const int m0 = (p / ntile) * 16, j0 = (p % ntile) * 8;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const int r0 = m0 + g, r1 = m0 + g + 8, jj = j0 + g;
    const bool ok0 = r0 < rt, ok1 = r1 < rt, okj = jj < k;
    const S* x0 = src + (ok0 ? r0 : 0) * lds;
    const S* x1 = src + (ok1 ? r1 : 0) * lds;
    const float* h = a.H + (okj ? jj : 0) * a.ldh;
    for (i64 l0 = 0; l0 < n; l0 += 8) {
      const i64 la = l0 + t, lb = l0 + t + 4;
      const bool va = la < n, vb = lb < n;
      std::uint32_t af[4], bf[2];
      af[0] = to_tf32(ok0 && va ? xget<float>(x0 + la) : 0.f);
      af[1] = to_tf32(ok1 && va ? xget<float>(x1 + la) : 0.f);
      af[2] = to_tf32(ok0 && vb ? xget<float>(x0 + lb) : 0.f);
      af[3] = to_tf32(ok1 && vb ? xget<float>(x1 + lb) : 0.f);
      bf[0] = to_tf32(okj && va ? h[la] : 0.f);
      bf[1] = to_tf32(okj && vb ? h[lb] : 0.f);
      mma_tf32(d, af, bf);
    }
    const int c0 = j0 + 2 * t, c1 = c0 + 1;
    if (ok0 && c0 < k) a.Nb[r0 * k + c0] = d[0];
    if (ok0 && c1 < k) a.Nb[r0 * k + c1] = d[1];
    if (ok1 && c0 < k) a.Nb[r1 * k + c0] = d[2];
    if (ok1 && c1 < k) a.Nb[r1 * k + c1] = d[3];
  }
}

/// P step on tensor cores: Pacc (k x n) += Wn^T (k x rt) src (rt x n). Warp per (16 rows of P,
/// 8 columns) tile; the reduction over the tile's rows in 8-row steps, in order.
template <class S>
__device__ void p_step_tc(const TileArgs<float>& a, int rt, const S* src, i64 lds) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const i64 n = a.n;
  const int k = a.k;
  const int mt = (k + 15) / 16;
  const i64 nt = (n + 7) / 8, pairs = i64(mt) * nt;
  for (i64 p = warp; p < pairs; p += NT / 32) {
    const int j0 = int(p / nt) * 16;
    const i64 l0 = (p % nt) * 8;
    const int ja = j0 + g, jb = j0 + g + 8;
    const i64 lc = l0 + 2 * t, ld = lc + 1, lg = l0 + g;
    const bool oka = ja < k, okb = jb < k, okc = lc < n, okd = ld < n, okg = lg < n;
    float d[4];
    d[0] = oka && okc ? a.Pacc[ja * a.ldp + lc] : 0.f;
    d[1] = oka && okd ? a.Pacc[ja * a.ldp + ld] : 0.f;
    d[2] = okb && okc ? a.Pacc[jb * a.ldp + lc] : 0.f;
    d[3] = okb && okd ? a.Pacc[jb * a.ldp + ld] : 0.f;
    for (int i0 = 0; i0 < rt; i0 += 8) {
      const int ia = i0 + t, ib = i0 + t + 4;
      const bool va = ia < rt, vb = ib < rt;
      std::uint32_t af[4], bf[2];
      af[0] = to_tf32(oka && va ? a.Wn[ia * k + ja] : 0.f);
      af[1] = to_tf32(okb && va ? a.Wn[ia * k + jb] : 0.f);
      af[2] = to_tf32(oka && vb ? a.Wn[ib * k + ja] : 0.f);
      af[3] = to_tf32(okb && vb ? a.Wn[ib * k + jb] : 0.f);
      bf[0] = to_tf32(okg && va ? xget<float>(src + ia * lds + lg) : 0.f);
      bf[1] = to_tf32(okg && vb ? xget<float>(src + ib * lds + lg) : 0.f);
      mma_tf32(d, af, bf);
    }
    if (oka && okc) a.Pacc[ja * a.ldp + lc] = d[0];
    if (oka && okd) a.Pacc[ja * a.ldp + ld] = d[1];
    if (okb && okc) a.Pacc[jb * a.ldp + lc] = d[2];
    if (okb && okd) a.Pacc[jb * a.ldp + ld] = d[3];
  }
}

/// The N and P steps of a precision mode: MODE 0 = CUDA cores, 1 = tf32 tensor cores.
template <class T, int KC, int MODE, class S>
__device__ __forceinline__ void n_step_mode(const TileArgs<T>& a, int rt, const S* src, i64 lds) {
  if constexpr (MODE == 1) n_step_tc(a, rt, src, lds); else n_step<T, KC>(a, rt, src, lds);
}
template <class T, int KC, int MODE, class S>
__device__ __forceinline__ void p_step_mode(const TileArgs<T>& a, int rt, const S* src, i64 lds) {
  if constexpr (MODE == 1) p_step_tc(a, rt, src, lds); else p_step<T, KC>(a, rt, src, lds);
}

/// One tile: rows [r0, r0 + rt) of X, read from xt with row stride ldxt (shared or global).
/// first: accumulate dot0 = <X H^T, W_old> and gg = <W_old G_H, W_old> (initial error, Frobenius).
template <class T, class XS, int KC, int MODE = 0>
__device__ void process_tile(const TileArgs<T>& a, const KParams& q, i64 r0, int rt,
                             const XS* xt, i64 ldxt, bool first, bool want_P, double& dot0,
                             double& gg) {
  const int k = a.k;
  const int tid = threadIdx.x;
  for (int e = tid; e < rt * k; e += NT) a.Wo[e] = a.W[r0 * k + e];
  __syncthreads();
  if (q.kl) {
    kl_ratio_tile<T, XS>(a, a.Wo, rt, xt, ldxt);
    __syncthreads();
    n_step_mode<T, KC, MODE>(a, rt, a.Rb, a.ldr);
  } else {
    n_step_mode<T, KC, MODE>(a, rt, xt, ldxt);
  }
  __syncthreads();
  const T l1 = T(q.l1_W), l2 = T(q.l2_W);
  const double tiny = double(std::numeric_limits<T>::min());
  for (int o = tid; o < rt * k; o += NT) {
    const int i = o / k, j = o - i * k;
    const T wo = a.Wo[o], num = a.Nb[o];
    T base;
    if (q.kl) {
      base = a.rowsumH[j];
    } else {
      base = T(0);
      for (int c = 0; c < k; ++c) base += a.Wo[i * k + c] * a.GH[c * k + j];
      if (first) {
        dot0 += double(num) * double(wo);
        gg += double(wo) * double(base);
      }
    }
    T extra = T(0);
    if (q.groups) {
      const i64 g = group_of_row(a.goff, a.ngroups, r0 + i);
      extra = group_term(wo, q.lam, a.gnorm[g * k + j], tiny);
    }
    const T w = mu_step(wo, num, base, l1, l2, extra);
    a.Wn[o] = w;
    a.W[r0 * k + o] = w;
  }
  __syncthreads();
  if (want_P) {
    if (q.kl) {
      kl_ratio_tile<T, XS>(a, a.Wn, rt, xt, ldxt);
      __syncthreads();
      p_step_mode<T, KC, MODE>(a, rt, a.Rb, a.ldr);
    } else {
      p_step_mode<T, KC, MODE>(a, rt, xt, ldxt);
    }
  }
  if (q.kl) {
    for (int j = tid; j < k; j += NT) {
      T s = a.colsum[j];
      for (int i = 0; i < rt; ++i) s += a.Wn[i * k + j];
      a.colsum[j] = s;
    }
  } else {
    for (int p = tid; p < k * k; p += NT) {
      const int c = p / k, b = p - c * k;
      T s = a.Gacc[p];
      for (int i = 0; i < rt; ++i) s += a.Wn[i * k + c] * a.Wn[i * k + b];
      a.Gacc[p] = s;
    }
  }
  __syncthreads();
}

/// Start copying rows [r0, r0 + rows) of X (row stride n) into dst (row stride ld): 16-byte
/// cp.async where the alignment allows it (completion: stage_wait), plain copies otherwise.
/// Commits one pipeline group either way.
template <class XS>
__device__ void stage_rows_async(XS* dst, i64 ld, const XS* X, i64 n, i64 r0, i64 rows) {
  const bool vec = (n * i64(sizeof(XS))) % 16 == 0 && (ld * i64(sizeof(XS))) % 16 == 0 &&
                   (reinterpret_cast<std::uintptr_t>(X) % 16) == 0 &&
                   (reinterpret_cast<std::uintptr_t>(dst) % 16) == 0;
  if (vec) {
    const i64 per_row = n * i64(sizeof(XS)) / 16;
    for (i64 e = threadIdx.x; e < rows * per_row; e += NT) {
      const i64 i = e / per_row, c = e - i * per_row;
      __pipeline_memcpy_async(reinterpret_cast<uint4*>(dst + i * ld) + c,
                              reinterpret_cast<const uint4*>(X + (r0 + i) * n) + c, 16);
    }
  } else {
    for (i64 e = threadIdx.x; e < rows * n; e += NT) {
      const i64 i = e / n, l = e - i * n;
      dst[i * ld + l] = X[(r0 + i) * n + l];
    }
  }
  __pipeline_commit();
}

/// G[a, b] = sum_l A[a, l] A[b, l] (k x len, row stride lda), float64 sums in a fixed order:
/// each pair split over S lanes, the S partials added in order.
template <class T>
__device__ void block_gram(const T* A, i64 lda, int k, i64 len, T* G, double* red) {
  const int tid = threadIdx.x;
  const int pairs = k * k;
  __syncthreads();
  if (pairs >= NT / 2) {
    for (int p = tid; p < pairs; p += NT) {
      const int c = p / k, b = p - c * k;
      double s = 0;
      for (i64 l = 0; l < len; ++l) s += double(A[c * lda + l]) * double(A[b * lda + l]);
      G[p] = T(s);
    }
  } else {
    const int S = NT / pairs;
    const int p = tid / S, sidx = tid - p * S;
    double s = 0;
    if (p < pairs) {
      const int c = p / k, b = p - c * k;
      for (i64 l = sidx; l < len; l += S) s += double(A[c * lda + l]) * double(A[b * lda + l]);
    }
    red[tid] = s;
    __syncthreads();
    if (tid < pairs) {
      double t = 0;
      for (int q = 0; q < S; ++q) t += red[tid * S + q];
      G[tid] = T(t);
    }
  }
  __syncthreads();
}

/// rows sums of A (k x len) in float64, stored as T.
template <class T>
__device__ void block_rowsum(const T* A, i64 lda, int k, i64 len, T* out, double* red) {
  for (int j = 0; j < k; ++j) {
    double s = 0;
    for (i64 l = threadIdx.x; l < len; l += NT) s += double(A[j * lda + l]);
    s = block_sum(s, red);
    if (threadIdx.x == 0) out[j] = T(s);
  }
  __syncthreads();
}

}  // namespace cuda_detail
}  // namespace dffkit
