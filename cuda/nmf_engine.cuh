#pragma once
// Multiplicative-update NMF on the GPU: the same contract as cpp/nmf_mu_cpu.cpp. This header
// holds the kernels and the host drivers as templates; nmf_mu_<mode>.cu instantiate one
// precision mode each (so the modes compile in parallel) and nmf_mu.cu dispatches.
//
// Two engines, one tile routine (nmf_kernels.cuh):
//  * resident: one thread block per problem runs the whole solve in one launch (all iterations,
//    the stopping rule, the error) with X rows, H, P and the k x k statistics in shared memory
//    where they fit. Used for batches (one block per problem) and for small single problems.
//  * sweep: for large problems, per iteration a persistent grid of NB blocks sweeps X once in
//    row tiles (block b takes tiles b, b + NB, ...), each block keeping its partial P = W^T X,
//    G_W = W^T W (KL: column sums of W) on chip; small kernels then add the NB partials in block
//    order, update H column by column, refresh H H^T and evaluate the error and the stopping rule
//    on the device. The host reads the stop flag only every 10 iterations (when tol > 0).
// NB depends on the shape only, so results do not depend on the device or on timing.
#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <cmath>
#include <limits>
#include <vector>

#include "nmf_detail.hpp"
#include "nmf_gemm.cuh"
#include "nmf_kernels.cuh"
#include "nmf_small_kernel.cuh"

namespace dffkit {
namespace cuda_detail {
namespace {

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

DFFKIT_HD std::size_t align16(std::size_t v) { return (v + 15) & ~std::size_t(15); }

/// Row stride (elements) of X rows staged in shared memory: rows start 8 banks apart.
DFFKIT_HD i64 staged_ld(i64 n, int xsz) {
  const i64 period = 128 / xsz, target = 32 / xsz;
  const i64 r = n % period;
  return n + ((target - r) % period + period) % period;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layouts (computed identically on host and device)

struct ResLayout {
  std::size_t red, GH, GW, rs, cs, Wo, Wn, Nb, xch, GWs, Ps, H, P, R, X, XT[2], used;
  bool H_s, P_s, R_s;
  int nbuf;  // staging buffers for the rows that stay in global memory (0, 1 or 2)
  i64 ldx, xs_rows;
};

/// Resident solver: fixed part (with a cluster of C > 1 blocks per problem: the exchange slots
/// and the summed P and G_W), then H, P, R (KL) if they fit, then as many X rows as fit.
/// m: the rows this block owns.
DFFKIT_HD ResLayout res_layout(i64 m, i64 n, int k, bool kl, int esz, int xsz,
                               std::size_t limit, int C = 1) {
  ResLayout L{};
  std::size_t o = 0;
  auto put = [&](std::size_t bytes) { const std::size_t at = o; o = align16(o + bytes); return at; };
  L.red = put(NT * sizeof(double));
  L.GH = put(std::size_t(k) * k * esz);
  L.GW = put(std::size_t(k) * k * esz);
  L.rs = put(std::size_t(k) * esz);
  L.cs = put(std::size_t(k) * esz);
  L.Wo = put(std::size_t(TM) * k * esz);
  L.Wn = put(std::size_t(TM) * k * esz);
  L.Nb = put(std::size_t(TM) * k * esz);
  const std::size_t hb = std::size_t(k) * n * esz;
  if (C > 1) {
    L.xch = put(4 * sizeof(double));
    L.GWs = put(std::size_t(k) * k * esz);
    L.Ps = put(hb);
  }
  L.H_s = o + hb <= limit;
  if (L.H_s) L.H = put(hb);
  L.P_s = o + hb <= limit;
  if (L.P_s) L.P = put(hb);
  const std::size_t rb = std::size_t(TM) * n * esz;
  L.R_s = kl && o + rb <= limit;
  if (L.R_s) L.R = put(rb);
  L.ldx = staged_ld(n, xsz);
  const std::size_t rowb = std::size_t(L.ldx) * xsz, tileb = align16(TM * rowb);
  std::size_t avail = o < limit ? limit - o : 0;
  L.nbuf = 0;
  if (std::size_t(m) * rowb > avail) {
    // X does not fit: keep its first rows on chip, stream the rest through two (or one)
    // staging tiles, the next tile loading while the current one is used
    L.nbuf = avail >= 2 * tileb ? 2 : avail >= tileb ? 1 : 0;
    for (int b = 0; b < L.nbuf; ++b) L.XT[b] = put(tileb);
    avail = o < limit ? limit - o : 0;
  }
  i64 rows = i64(avail / rowb);
  if (rows >= m) rows = m; else rows = rows / TM * TM;
  L.xs_rows = rows;
  L.X = o;
  o += std::size_t(rows) * rowb;
  L.used = o;
  return L;
}

struct SweepLayout {
  std::size_t red, GH, rs, Wo, Wn, Nb, G, cs, H, X[2], P, R, used;
  bool H_s, P_s, R_s;
  int nbuf;  // X tile buffers in shared memory: 2 (the next tile loads during this one), 1, 0
  i64 ldx;
};

/// Sweep kernel: fixed part, then H, the X tile, P, R (KL) if they fit.
DFFKIT_HD SweepLayout sweep_layout(i64 n, int k, bool kl, int esz, int xsz, std::size_t limit) {
  SweepLayout L{};
  std::size_t o = 0;
  auto put = [&](std::size_t bytes) { const std::size_t at = o; o = align16(o + bytes); return at; };
  L.red = put(NT * sizeof(double));
  L.GH = put(std::size_t(k) * k * esz);
  L.rs = put(std::size_t(k) * esz);
  L.Wo = put(std::size_t(TM) * k * esz);
  L.Wn = put(std::size_t(TM) * k * esz);
  L.Nb = put(std::size_t(TM) * k * esz);
  L.G = put(std::size_t(k) * k * esz);
  L.cs = put(std::size_t(k) * esz);
  const std::size_t hb = std::size_t(k) * n * esz;
  L.H_s = o + hb <= limit;
  if (L.H_s) L.H = put(hb);
  L.ldx = staged_ld(n, xsz);
  const std::size_t xb = align16(std::size_t(TM) * L.ldx * xsz);
  L.nbuf = o + xb <= limit ? 1 : 0;
  if (L.nbuf) L.X[0] = put(xb);
  L.P_s = o + hb <= limit;
  if (L.P_s) L.P = put(hb);
  const std::size_t rb = std::size_t(TM) * n * esz;
  L.R_s = kl && o + rb <= limit;
  if (L.R_s) L.R = put(rb);
  if (L.nbuf && o + xb <= limit) {
    L.X[1] = put(xb);
    L.nbuf = 2;
  }
  L.used = o;
  return L;
}

// ---------------------------------------------------------------------------------------------
// Block-level pieces of the resident solver

template <class T>
__device__ void group_norms_block(const T* W, const i64* goff, i64 ng, int k, double* out) {
  for (i64 p = threadIdx.x; p < ng * k; p += NT) {
    const i64 g = p / k;
    const int j = int(p - g * k);
    double s = 0;
    for (i64 i = goff[g]; i < goff[g + 1]; ++i) s += double(W[i * k + j]) * double(W[i * k + j]);
    out[p] = std::sqrt(s);
  }
  __syncthreads();
}

/// One element's share of the error: (x - wh)^2 (Frobenius), or x log(x / max(wh, eps)) and x
/// for x > eps (KL; the rest of the divergence comes from the column and row sums).
template <class T>
__device__ __forceinline__ void error_terms(T x, T wh, bool kl, double& s, double& sx) {
  if (!kl) {
    const double d = double(x) - double(wh);
    s += d * d;
  } else if (x > T(kEpsilon)) {
    const double w = double(wh) > kEpsilon ? double(wh) : kEpsilon;
    s += double(x) * std::log(double(x) / w);
    sx += double(x);
  }
}

/// sqrt(2 * beta-divergence(X, W H)), one pass; X row i at xrow(i).
template <class T, class XS, class XRow>
__device__ double full_error_block(const XRow& xrow, const T* W, const T* H, i64 m, i64 n, int k,
                                   bool kl, double* red) {
  double s = 0, sx = 0;
  for (i64 e = threadIdx.x; e < m * n; e += NT) {
    const i64 i = e / n, l = e - i * n;
    T wh = T(0);
    for (int j = 0; j < k; ++j) wh += W[i * k + j] * H[j * n + l];
    error_terms(xget<T>(xrow(i) + l), wh, kl, s, sx);
  }
  s = block_sum(s, red);
  if (!kl) return std::sqrt(s);
  sx = block_sum(sx, red);
  double t = 0;
  for (int j = threadIdx.x; j < k; j += NT) {
    double cw = 0, rh = 0;
    for (i64 i = 0; i < m; ++i) cw += double(W[i * k + j]);
    for (i64 l = 0; l < n; ++l) rh += double(H[j * n + l]);
    t += cw * rh;
  }
  t = block_sum(t, red);
  const double div = s + t - sx;
  return std::sqrt(2.0 * (div > 0 ? div : 0.0));
}

/// Penalty part of the objective (scikit-learn's terms, the group term, 1/2 mu ||H||^2).
template <class T>
__device__ double penalty_block(const T* W, const T* H, i64 m, i64 n, int k, const KParams& q,
                                const i64* goff, i64 ng, double* gnorm, double* red) {
  double s1w = 0, s2w = 0, s1h = 0, s2h = 0;
  for (i64 e = threadIdx.x; e < m * k; e += NT) { const double v = double(W[e]); s1w += v; s2w += v * v; }
  for (i64 e = threadIdx.x; e < k * n; e += NT) { const double v = double(H[e]); s1h += v; s2h += v * v; }
  s1w = block_sum(s1w, red); s2w = block_sum(s2w, red);
  s1h = block_sum(s1h, red); s2h = block_sum(s2h, red);
  double v = q.l1_W * s1w + 0.5 * q.l2_W * s2w + q.l1_H * s1h + 0.5 * q.l2_H * s2h + 0.5 * q.mu * s2h;
  if (q.groups) {
    group_norms_block(W, goff, ng, k, gnorm);
    double g = 0;
    for (i64 p = threadIdx.x; p < ng * k; p += NT) g += gnorm[p];
    v += q.lam * block_sum(g, red);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// The resident solver: one block per problem, whole solve in one launch.

template <class T, class XS>
struct ResDesc {
  const XS* X;
  T* W;
  T* H;
  i64 m, n;
  int k;
  const i64* goff;
  i64 ngroups;
  double* gnorm;      // ngroups x k, or null
  T* gP;              // k x n when P does not fit in shared memory
  T* gR;              // TM x n when R (KL) does not fit
  double* objective;  // max_iter entries, or null
};

/// C = 1: one block per problem. C > 1 (Frobenius, no groups, no objective): the problem's
/// rows are split over a cluster of C blocks, each keeping its rows of X in shared memory;
/// after each sweep the blocks add the C partials of P and G_W in rank order (every block the
/// same sums, so every block holds the same H and takes the same stopping decision).
template <class T, class XS, int KC, int MODE>
__global__ void __launch_bounds__(NT, 1) resident_kernel(const ResDesc<T, XS>* descs, KParams q,
                                                      ResOut* outs, std::size_t limit, int C) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int rank = int(cluster_rank(C));
  const ResDesc<T, XS> d = descs[blockIdx.x / C];
  const i64 m = d.m, n = d.n;
  const int k = d.k;
  const int tid = threadIdx.x;
  const i64 rb = i64(rank) * m / C, re = i64(rank + 1) * m / C;  // this block's rows
  const ResLayout L = res_layout(C > 1 ? (m + C - 1) / C : m, n, k, q.kl != 0, int(sizeof(T)),
                                 int(sizeof(XS)), limit, C);
  double* red = reinterpret_cast<double*>(smem + L.red);
  T* GH = reinterpret_cast<T*>(smem + L.GH);
  T* GW = reinterpret_cast<T*>(smem + L.GW);
  T* rs = reinterpret_cast<T*>(smem + L.rs);
  T* cs = reinterpret_cast<T*>(smem + L.cs);
  T* Hp = L.H_s ? reinterpret_cast<T*>(smem + L.H) : d.H;
  T* Pp = L.P_s ? reinterpret_cast<T*>(smem + L.P) : d.gP;
  T* Rp = q.kl ? (L.R_s ? reinterpret_cast<T*>(smem + L.R) : d.gR) : nullptr;
  XS* Xs = reinterpret_cast<XS*>(smem + L.X);
  XS* XT[2] = {reinterpret_cast<XS*>(smem + L.XT[0]), reinterpret_cast<XS*>(smem + L.XT[1])};
  const i64 xs_rows = L.xs_rows, ldx = L.ldx;
  auto on_chip = [&](i64 i) { return i >= rb && i - rb < xs_rows; };
  auto xrow = [&](i64 i) -> const XS* { return on_chip(i) ? Xs + (i - rb) * ldx : d.X + i * n; };
  auto xld = [&](i64 i) -> i64 { return on_chip(i) ? ldx : n; };
  double* xch = reinterpret_cast<double*>(smem + L.xch);
  T* Pu = C > 1 ? reinterpret_cast<T*>(smem + L.Ps) : Pp;   // P summed over the cluster
  T* GWu = C > 1 ? reinterpret_cast<T*>(smem + L.GWs) : GW;  // G_W summed over the cluster

  if (L.H_s)
    for (i64 e = tid; e < k * n; e += NT) Hp[e] = d.H[e];
  stage_rows_async(Xs, ldx, d.X, n, rb, xs_rows < re - rb ? xs_rows : re - rb);
  __pipeline_wait_prior(0);
  __syncthreads();

  const bool kl = q.kl != 0;
  double xx = 0;
  if (!kl) {
    double s = 0;
    for (i64 e = rb * n + tid; e < re * n; e += NT) {
      const i64 i = e / n;
      const double x = double(xget<T>(xrow(i) + (e - i * n)));
      s += x * x;
    }
    xx = block_sum(s, red);
    if (C > 1) {
      if (tid == 0) xch[0] = xx;
      cluster_barrier(C);
      xx = 0;
      for (int r = 0; r < C; ++r) xx += cluster_peer(xch, r, C)[0];
    }
  }
  if (kl) block_rowsum(Hp, n, k, n, rs, red); else block_gram(Hp, n, k, n, GH, red);

  TileArgs<T> a;
  a.m = m; a.n = n; a.k = k; a.W = d.W; a.H = Hp; a.ldh = n; a.GH = GH; a.rowsumH = rs;
  a.goff = d.goff; a.ngroups = d.ngroups; a.gnorm = d.gnorm;
  a.Wo = reinterpret_cast<T*>(smem + L.Wo);
  a.Wn = reinterpret_cast<T*>(smem + L.Wn);
  a.Nb = reinterpret_cast<T*>(smem + L.Nb);
  a.Rb = Rp; a.ldr = n; a.Pacc = Pp; a.ldp = n; a.Gacc = GW; a.colsum = cs;

  double err_init = 0, err = 0, prev = 0;
  bool fresh = false;
  if (kl || q.max_iter < 1) {
    err_init = full_error_block<T, XS>(xrow, d.W, Hp, m, n, k, kl, red);
    fresh = true;
  }
  err = prev = err_init;
  const T l1H = T(q.l1_H), l2H = T(q.l2_H), muH = T(q.mu);
  int it;
  for (it = 1; it <= q.max_iter; ++it) {
    const bool check = q.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == q.max_iter || q.record_obj;
    const bool first = it == 1 && !kl;
    const bool want_P = kl ? q.update_H != 0 : (q.update_H || need_err);
    if (q.groups) group_norms_block(d.W, d.goff, d.ngroups, k, d.gnorm);
    if (want_P)
      for (i64 e = tid; e < k * n; e += NT) Pp[e] = T(0);
    for (int e = tid; e < k * k; e += NT) GW[e] = T(0);
    for (int e = tid; e < k; e += NT) cs[e] = T(0);
    __syncthreads();
    double d0 = 0, gg = 0;
    // (with C > 1 every row of the block is on chip: rb + xs_rows == re, nothing is staged)
    if (L.nbuf > 0 && rb + xs_rows < re)
      stage_rows_async(XT[0], ldx, d.X, n, rb + xs_rows,
                       re - rb - xs_rows < TM ? re - rb - xs_rows : TM);
    for (i64 r0 = rb; r0 < re; r0 += TM) {
      const int rt = int(re - r0 < TM ? re - r0 : TM);
      if (r0 - rb >= xs_rows && L.nbuf > 0) {
        const i64 g = (r0 - rb - xs_rows) / TM;
        if (L.nbuf == 1 && g > 0) stage_rows_async(XT[0], ldx, d.X, n, r0, rt);
        const i64 r1 = r0 + TM;
        if (L.nbuf == 2 && r1 < re) {
          stage_rows_async(XT[(g + 1) & 1], ldx, d.X, n, r1, re - r1 < TM ? re - r1 : TM);
          __pipeline_wait_prior(1);
        } else {
          __pipeline_wait_prior(0);
        }
        __syncthreads();
        process_tile<T, XS, KC, MODE>(a, q, r0, rt, XT[L.nbuf == 2 ? (g & 1) : 0], ldx, first, want_P,
                                d0, gg);
      } else {
        process_tile<T, XS, KC, MODE>(a, q, r0, rt, xrow(r0), xld(r0), first, want_P, d0, gg);
      }
    }
    if (first) {
      d0 = block_sum(d0, red);
      gg = block_sum(gg, red);
    }
    if (C > 1) {
      // partials of the C blocks, added in rank order by every block
      if (first && tid == 0) { xch[1] = d0; xch[2] = gg; }
      cluster_barrier(C);
      if (want_P)
        for (i64 e = tid; e < k * n; e += NT) {
          T v = T(0);
          for (int r = 0; r < C; ++r) v += cluster_peer(Pp, r, C)[e];
          Pu[e] = v;
        }
      for (int e = tid; e < k * k; e += NT) {
        T v = T(0);
        for (int r = 0; r < C; ++r) v += cluster_peer(GW, r, C)[e];
        GWu[e] = v;
      }
      if (first) {
        d0 = gg = 0;
        for (int r = 0; r < C; ++r) {
          d0 += cluster_peer(xch, r, C)[1];
          gg += cluster_peer(xch, r, C)[2];
        }
      }
      cluster_barrier(C);  // the peers' partials are read: they may be reset
    }
    if (first) {
      const double sq = xx - 2.0 * d0 + gg;
      err_init = std::sqrt(sq > 0 ? sq : 0.0);
      prev = err_init;
    }
    double ph = 0;
    if (q.update_H) {
      for (i64 l = tid; l < n; l += NT) {
        for (int j = 0; j < k; ++j) {
          const T hv = Hp[j * n + l], num = Pu[j * n + l];
          T den;
          if (kl) {
            den = cs[j] == T(0) ? T(1) : cs[j];
          } else {
            den = T(0);
            for (int c = 0; c < k; ++c) den += GWu[j * k + c] * Hp[c * n + l];
          }
          T v = mu_step(hv, num, den, l1H, l2H, muH > T(0) ? muH * hv : T(0));
          if (kl) v = kl_clamp_h(v);
          ph += double(num) * double(v);
          Pu[j * n + l] = v;
        }
        for (int j = 0; j < k; ++j) Hp[j * n + l] = Pu[j * n + l];
      }
      __syncthreads();
      if (kl) block_rowsum(Hp, n, k, n, rs, red); else block_gram(Hp, n, k, n, GH, red);
    } else if (need_err && !kl) {
      for (i64 l = tid; l < n; l += NT)
        for (int j = 0; j < k; ++j) ph += double(Pu[j * n + l]) * double(Hp[j * n + l]);
    }
    fresh = false;
    if (need_err) {
      if (kl) {
        err = full_error_block<T, XS>(xrow, d.W, Hp, m, n, k, true, red);
      } else {
        ph = block_sum(ph, red);
        double g2 = 0;
        for (int p = tid; p < k * k; p += NT) g2 += double(GWu[p]) * double(GH[p]);
        g2 = block_sum(g2, red);
        const double sq = xx - 2.0 * ph + g2;
        err = std::sqrt(sq > 0 ? sq : 0.0);
      }
      fresh = true;
      if (q.record_obj && d.objective) {
        const double pen = penalty_block(d.W, Hp, m, n, k, q, d.goff, d.ngroups, d.gnorm, red);
        if (tid == 0) d.objective[it - 1] = 0.5 * err * err + pen;
      }
    }
    if (check) {
      if ((prev - err) / err_init < q.tol) break;
      prev = err;
    }
  }
  const int n_iter = it < q.max_iter ? it : q.max_iter;
  if (!fresh) err = full_error_block<T, XS>(xrow, d.W, Hp, m, n, k, kl, red);
  if (L.H_s && rank == 0) {
    __syncthreads();
    for (i64 e = tid; e < k * n; e += NT) d.H[e] = Hp[e];
  }
  if (tid == 0 && rank == 0) outs[blockIdx.x / C] = ResOut{n_iter, err_init, err};
}

// ---------------------------------------------------------------------------------------------
// The sweep engine: a few launches per iteration, state and stopping rule on the device.

struct State {
  double xx, error_init, prev, err, pen;
  int n_iter, stopped;
};

template <class T, class XS>
struct SweepArgs {
  const XS* X;
  T* W;
  const T* H;
  i64 m, n;
  int k;
  const T* GH;
  const T* rs;
  const i64* goff;
  i64 ngroups;
  const double* gnorm;
  T* Ppart;        // NB x k x n
  T* Gpart;        // NB x k x k
  T* cspart;       // NB x k
  double* d0part;  // NB
  double* ggpart;  // NB
  T* gR;           // NB x TM x n (KL, when R does not fit)
};

template <class T, class XS, int KC, int MODE>
__global__ void __launch_bounds__(NT, 1) sweep_kernel(SweepArgs<T, XS> s, KParams q, const State* st,
                                                   int first, int want_P, std::size_t limit) {
  if (st->stopped) return;
  extern __shared__ __align__(16) unsigned char smem[];
  const int k = s.k;
  const i64 n = s.n, m = s.m;
  const int tid = threadIdx.x;
  const bool kl = q.kl != 0;
  const SweepLayout L = sweep_layout(n, k, kl, int(sizeof(T)), int(sizeof(XS)), limit);
  double* red = reinterpret_cast<double*>(smem + L.red);
  T* GH = reinterpret_cast<T*>(smem + L.GH);
  T* rs = reinterpret_cast<T*>(smem + L.rs);
  T* G = reinterpret_cast<T*>(smem + L.G);
  T* cs = reinterpret_cast<T*>(smem + L.cs);
  T* Hs = L.H_s ? reinterpret_cast<T*>(smem + L.H) : const_cast<T*>(s.H);
  XS* Xt[2] = {reinterpret_cast<XS*>(smem + L.X[0]), reinterpret_cast<XS*>(smem + L.X[1])};
  T* Pglob = s.Ppart + i64(blockIdx.x) * k * n;
  T* Pp = L.P_s ? reinterpret_cast<T*>(smem + L.P) : Pglob;
  T* Rp = kl ? (L.R_s ? reinterpret_cast<T*>(smem + L.R) : s.gR + i64(blockIdx.x) * TM * n)
             : nullptr;

  if (L.H_s)
    for (i64 e = tid; e < k * n; e += NT) Hs[e] = s.H[e];
  for (int e = tid; e < k * k; e += NT) { GH[e] = kl ? T(0) : s.GH[e]; G[e] = T(0); }
  for (int e = tid; e < k; e += NT) { rs[e] = kl ? s.rs[e] : T(0); cs[e] = T(0); }
  if (want_P)
    for (i64 e = tid; e < k * n; e += NT) Pp[e] = T(0);
  __syncthreads();

  TileArgs<T> a;
  a.m = m; a.n = n; a.k = k; a.W = s.W; a.H = Hs; a.ldh = n; a.GH = GH; a.rowsumH = rs;
  a.goff = s.goff; a.ngroups = s.ngroups; a.gnorm = s.gnorm;
  a.Wo = reinterpret_cast<T*>(smem + L.Wo);
  a.Wn = reinterpret_cast<T*>(smem + L.Wn);
  a.Nb = reinterpret_cast<T*>(smem + L.Nb);
  a.Rb = Rp; a.ldr = n; a.Pacc = Pp; a.ldp = n; a.Gacc = G; a.colsum = cs;

  double d0 = 0, gg = 0;
  const i64 tiles = (m + TM - 1) / TM;
  auto rows_of = [&](i64 t) { return int(m - t * TM < TM ? m - t * TM : TM); };
  if (L.nbuf > 0 && i64(blockIdx.x) < tiles)
    stage_rows_async(Xt[0], L.ldx, s.X, n, i64(blockIdx.x) * TM, rows_of(blockIdx.x));
  i64 c = 0;
  for (i64 t = blockIdx.x; t < tiles; t += gridDim.x, ++c) {
    const i64 r0 = t * TM;
    const int rt = rows_of(t);
    if (L.nbuf > 0) {
      if (L.nbuf == 1 && c > 0) stage_rows_async(Xt[0], L.ldx, s.X, n, r0, rt);
      const i64 t1 = t + gridDim.x;
      if (L.nbuf == 2 && t1 < tiles) {
        stage_rows_async(Xt[(c + 1) & 1], L.ldx, s.X, n, t1 * TM, rows_of(t1));
        __pipeline_wait_prior(1);
      } else {
        __pipeline_wait_prior(0);
      }
      __syncthreads();
      process_tile<T, XS, KC, MODE>(a, q, r0, rt, Xt[L.nbuf == 2 ? (c & 1) : 0], L.ldx, first != 0,
                              want_P != 0, d0, gg);
    } else {
      process_tile<T, XS, KC, MODE>(a, q, r0, rt, s.X + r0 * n, n, first != 0, want_P != 0, d0, gg);
    }
  }
  if (want_P && L.P_s)
    for (i64 e = tid; e < k * n; e += NT) Pglob[e] = Pp[e];
  for (int e = tid; e < k * k; e += NT) s.Gpart[i64(blockIdx.x) * k * k + e] = G[e];
  for (int e = tid; e < k; e += NT) s.cspart[i64(blockIdx.x) * k + e] = cs[e];
  if (first) {
    d0 = block_sum(d0, red);
    gg = block_sum(gg, red);
    if (tid == 0) { s.d0part[blockIdx.x] = d0; s.ggpart[blockIdx.x] = gg; }
  }
}

/// part[e] <- sum over b < nb of part[b * stride + e], e < count, in a fixed order: 8 slices
/// (slice s adds b = s, s + 8, ... in order, in float64), then the 8 slice sums in order.
/// Afterwards partial 0 holds the total.
template <class T>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const State* st, T* part, i64 count,
                                                              int nb, i64 stride) {
  if (st->stopped) return;
  __shared__ double red[8][33];
  const int lane = threadIdx.x & 31, sl = threadIdx.x >> 5;
  const i64 e = i64(blockIdx.x) * 32 + lane;
  double v = 0;
  if (e < count)
    for (int b = sl; b < nb; b += 8) v += double(part[i64(b) * stride + e]);
  red[sl][lane] = v;
  __syncthreads();
  if (sl == 0 && e < count) {
    double t = red[0][lane];
    for (int q = 1; q < 8; ++q) t += red[q][lane];
    part[e] = T(t);
  }
}

/// G_W (Frobenius) and the column sums of W (KL) from the reduced partials; the initial error
/// of the first iteration from the nb per-block dot products.
template <class T>
__global__ void reduce_kernel(State* st, int nb, int k, const T* Gpart, const T* cspart,
                              const double* d0part, const double* ggpart, T* GW, T* colsum,
                              int kl, int first) {
  if (st->stopped) return;
  for (int p = threadIdx.x; p < k * k; p += blockDim.x) GW[p] = Gpart[p];
  if (kl)
    for (int j = threadIdx.x; j < k; j += blockDim.x)
      colsum[j] = cspart[j] == T(0) ? T(1) : cspart[j];
  if (first && threadIdx.x == 0) {
    double d0 = 0, gg = 0;
    for (int b = 0; b < nb; ++b) { d0 += d0part[b]; gg += ggpart[b]; }
    const double sq = st->xx - 2.0 * d0 + gg;
    st->error_init = std::sqrt(sq > 0 ? sq : 0.0);
    st->prev = st->error_init;
  }
}

/// Column l: P[:, l] = sum of the NB partials in order, then (update) the new H[:, l] in place;
/// <P, H_new> partial per block for the error.
template <class T>
__global__ void __launch_bounds__(NT) h_update_kernel(const State* st, KParams q, int nb, i64 n,
                                                      int k, T* Ppart, T* H, const T* GW,
                                                      const T* colsum, int update,
                                                      double* phpart) {
  if (st->stopped) return;
  __shared__ double red[NT];
  const i64 l = i64(blockIdx.x) * NT + threadIdx.x;
  const i64 kn = i64(k) * n;
  const bool kl = q.kl != 0;
  const T l1 = T(q.l1_H), l2 = T(q.l2_H), mu = T(q.mu);
  double ph = 0;
  if (l < n) {
    for (int j = 0; j < k; ++j) {
      double s = 0;
      for (int b = 0; b < nb; ++b) s += double(Ppart[i64(b) * kn + j * n + l]);
      const T num = T(s), hv = H[j * n + l];
      if (update) {
        T den;
        if (kl) {
          den = colsum[j];
        } else {
          den = T(0);
          for (int c = 0; c < k; ++c) den += GW[j * k + c] * H[c * n + l];
        }
        T v = mu_step(hv, num, den, l1, l2, mu > T(0) ? mu * hv : T(0));
        if (kl) v = kl_clamp_h(v);
        ph += double(num) * double(v);
        Ppart[j * n + l] = v;  // partial 0 of row j is consumed: keep the new value there
      } else {
        ph += double(num) * double(hv);
      }
    }
    if (update)
      for (int j = 0; j < k; ++j) H[j * n + l] = Ppart[j * n + l];
  }
  ph = block_sum(ph, red);
  if (threadIdx.x == 0) phpart[blockIdx.x] = ph;
}

/// G_H[a, b] = sum_l H[a, l] H[b, l] (block per pair, fixed tree), or the row sums of H (KL).
template <class T>
__global__ void __launch_bounds__(NT) h_stats_kernel(const State* st, const T* H, i64 n, int k,
                                                     int kl, T* GH, T* rs, double* rsd) {
  if (st && st->stopped) return;
  __shared__ double red[NT];
  const int p = blockIdx.x;
  double s = 0;
  if (kl) {
    for (i64 l = threadIdx.x; l < n; l += NT) s += double(H[p * n + l]);
  } else {
    const int a = p / k, b = p - a * k;
    for (i64 l = threadIdx.x; l < n; l += NT) s += double(H[a * n + l]) * double(H[b * n + l]);
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    if (kl) { rs[p] = T(s); rsd[p] = s; } else { GH[p] = T(s); }
  }
}

template <class T>
__global__ void group_norm_kernel(const State* st, const T* W, const i64* goff, i64 ng, int k,
                                  double* out) {
  if (st->stopped) return;
  const i64 p = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= ng * k) return;
  const i64 g = p / k;
  const int j = int(p - g * k);
  double s = 0;
  for (i64 i = goff[g]; i < goff[g + 1]; ++i) s += double(W[i * k + j]) * double(W[i * k + j]);
  out[p] = std::sqrt(s);
}

/// Full-pass error partials: per block sum of (x - wh)^2 (Frobenius) or x log(x / wh) and x
/// (KL), and the column sums of W; rows b, b + NBE, ...
template <class T, class XS>
__global__ void __launch_bounds__(NT) error_kernel(const State* st, const XS* X, const T* W,
                                                   const T* H, i64 m, i64 n, int k, int kl,
                                                   double* spart, double* sxpart, double* cwpart) {
  if (st->stopped) return;
  __shared__ double red[NT];
  double s = 0, sx = 0;
  for (i64 i = blockIdx.x; i < m; i += gridDim.x) {
    for (i64 l = threadIdx.x; l < n; l += NT) {
      T wh = T(0);
      for (int j = 0; j < k; ++j) wh += W[i * k + j] * H[j * n + l];
      error_terms(xget<T>(X + i * n + l), wh, kl != 0, s, sx);
    }
  }
  s = block_sum(s, red);
  sx = block_sum(sx, red);
  if (threadIdx.x == 0) { spart[blockIdx.x] = s; sxpart[blockIdx.x] = sx; }
  if (kl)
    for (int j = threadIdx.x; j < k; j += NT) {
      double c = 0;
      for (i64 i = blockIdx.x; i < m; i += gridDim.x) c += double(W[i * k + j]);
      cwpart[i64(blockIdx.x) * k + j] = c;
    }
}

template <class T>
__global__ void __launch_bounds__(NT) penalty_kernel(State* st, KParams q, const T* W, const T* H,
                                                     i64 m, i64 n, int k, const double* gnorm,
                                                     i64 ng) {
  if (st->stopped) return;
  __shared__ double red[NT];
  double s1w = 0, s2w = 0, s1h = 0, s2h = 0, g = 0;
  for (i64 e = threadIdx.x; e < m * k; e += NT) { const double v = double(W[e]); s1w += v; s2w += v * v; }
  for (i64 e = threadIdx.x; e < k * n; e += NT) { const double v = double(H[e]); s1h += v; s2h += v * v; }
  if (q.groups)
    for (i64 p = threadIdx.x; p < ng * k; p += NT) g += gnorm[p];
  s1w = block_sum(s1w, red); s2w = block_sum(s2w, red);
  s1h = block_sum(s1h, red); s2h = block_sum(s2h, red);
  g = block_sum(g, red);
  if (threadIdx.x == 0)
    st->pen = q.l1_W * s1w + 0.5 * q.l2_W * s2w + q.l1_H * s1h + 0.5 * q.l2_H * s2h +
              0.5 * q.mu * s2h + (q.groups ? q.lam * g : 0.0);
}

/// The error of iteration `it` (or the initial one, it = 0) and the stopping rule.
/// mode: 0 = Frobenius from the statistics, 1 = from the full-pass partials.
template <class T>
__global__ void finalize_kernel(State* st, int it, int need_err, int check, int mode, int kl,
                                double tol, int nph, const double* phpart, const T* GW,
                                const T* GH, int k, int nbe, const double* spart,
                                const double* sxpart, const double* cwpart, const double* rsd,
                                double* objective, int record) {
  if (threadIdx.x != 0 || st->stopped) return;
  double err = st->err;
  if (need_err) {
    if (mode == 0) {
      double ph = 0, g2 = 0;
      for (int b = 0; b < nph; ++b) ph += phpart[b];
      for (int p = 0; p < k * k; ++p) g2 += double(GW[p]) * double(GH[p]);
      const double sq = st->xx - 2.0 * ph + g2;
      err = std::sqrt(sq > 0 ? sq : 0.0);
    } else {
      double s = 0, sx = 0;
      for (int b = 0; b < nbe; ++b) { s += spart[b]; sx += sxpart[b]; }
      if (!kl) {
        err = std::sqrt(s);
      } else {
        double t = 0;
        for (int j = 0; j < k; ++j) {
          double cw = 0;
          for (int b = 0; b < nbe; ++b) cw += cwpart[i64(b) * k + j];
          t += cw * rsd[j];
        }
        const double div = s + t - sx;
        err = std::sqrt(2.0 * (div > 0 ? div : 0.0));
      }
    }
    st->err = err;
    if (it == 0) { st->error_init = err; st->prev = err; }
    if (record && it > 0) objective[it - 1] = 0.5 * err * err + st->pen;
  }
  if (it == 0) return;
  st->n_iter = it;
  if (check) {
    if ((st->prev - err) / st->error_init < tol) st->stopped = 1;
    else st->prev = err;
  }
}

template <class T, class XS>
__global__ void chunk_sq_kernel(const XS* X, i64 count, double* part) {
  const i64 c = i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c * 4096 >= count) return;
  const i64 e = (c + 1) * 4096 < count ? (c + 1) * 4096 : count;
  double s = 0;
  for (i64 i = c * 4096; i < e; ++i) {
    const double v = double(xget<T>(X + i));
    s += v * v;
  }
  part[c] = s;
}

__global__ void ordered_sum_kernel(const double* part, i64 count, double* out) {
  if (threadIdx.x != 0) return;
  double s = 0;
  for (i64 c = 0; c < count; ++c) s += part[c];
  *out = s;
}

template <class T>
__global__ void to_bf16_kernel(const T* X, __nv_bfloat16* out, i64 count) {
  for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += i64(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(float(X[i]));
}

// ---------------------------------------------------------------------------------------------
// Host side

std::size_t smem_optin(int device) {
  int v = 0;
  DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return std::size_t(v);
}

KParams make_kparams(const Problem& p, const Options& o) {
  KParams q;
  q.kl = p.loss == Loss::kullback_leibler;
  q.l1_W = p.l1_W; q.l2_W = p.l2_W; q.l1_H = p.l1_H; q.l2_H = p.l2_H;
  q.lam = p.lam; q.mu = p.mu;
  q.groups = p.group_offsets != nullptr && p.lam > 0;
  q.update_H = o.update_H; q.max_iter = o.max_iter; q.record_obj = o.record_objective;
  q.tol = o.tol;
  const char* prof = std::getenv("DFFKIT_CUDA_PROFILE");
  q.profile = prof && *prof && *prof != '0';
  return q;
}

/// Launches kern on problems x C blocks of `threads`, each C consecutive blocks one thread-block
/// cluster (sm_90; C = 1 is a plain launch). The caller checks the launch.
template <class... KArgs, class... Args>
void launch_clusters(void (*kern)(KArgs...), std::size_t problems, int C, int threads,
                     std::size_t smem, cudaStream_t s, Args... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(problems * C));
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  DFFKIT_CUDA_TRY(cudaLaunchKernelEx(&cfg, kern, args...));
}

template <class T, class XS, int KC, int MODE>
void launch_resident(const ResDesc<T, XS>* descs, std::size_t count, const KParams& q,
                     ResOut* d_out, ResDesc<T, XS>* d_descs, std::size_t limit, int C,
                     cudaStream_t s) {
  auto kern = resident_kernel<T, XS, KC, MODE>;
  DFFKIT_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(d_descs, descs, count * sizeof(descs[0]),
                                  cudaMemcpyHostToDevice, s));
  if (C == 1) {
    kern<<<unsigned(count), NT, limit, s>>>(d_descs, q, d_out, limit, 1);
    DFFKIT_CUDA_CHECK_LAUNCH("resident_kernel");
    return;
  }
  launch_clusters(kern, count, C, NT, limit, s, static_cast<const ResDesc<T, XS>*>(d_descs), q,
                  d_out, limit, C);
  DFFKIT_CUDA_CHECK_LAUNCH("resident_kernel (cluster)");
}

/// Blocks per problem for the resident engine, from the shape only (so that a problem gets the
/// same bits alone and in a batch): 1 when X fits in one block's shared memory or the problem
/// needs what the cluster path does not do (KL, groups, the objective, max_iter < 1, pre-Hopper);
/// else the smallest cluster (2, 4, 8) whose blocks each hold their rows of X, H and P on chip.
int cluster_size(i64 m, i64 n, i64 k, const KParams& q, int esz, int xsz, std::size_t limit,
                 int cc_major) {
  if (cc_major < 9 || q.kl || q.groups || q.record_obj || q.max_iter < 1) return 1;
  if (const char* off = std::getenv("DFFKIT_CUDA_NO_CLUSTER"); off && *off && *off != '0') return 1;
  const ResLayout L1 = res_layout(m, n, int(k), false, esz, xsz, limit, 1);
  if (L1.xs_rows >= m) return 1;
  for (int C = 2; C <= 8; C *= 2) {
    const i64 ml = (m + C - 1) / C;
    const ResLayout L = res_layout(ml, n, int(k), false, esz, xsz, limit, C);
    if (L.H_s && L.P_s && L.xs_rows >= ml && L.used <= limit) return C;
  }
  return 1;
}

/// Fixed part of the shared memory both engines need (k x k statistics and tile buffers).
std::size_t fixed_smem(int k, int esz) {
  return NT * sizeof(double) + 3 * std::size_t(k) * k * esz + 4 * std::size_t(TM) * k * esz +
         8 * std::size_t(k) * esz + 256;
}

/// Calls f with the register-tile width KC (columns of W per pass) that fits k best.
template <int MODE, class F>
void with_kc(int k, F&& f) {
  if constexpr (MODE == 1) {
    (void)k;
    f(std::integral_constant<int, 8>{});  // tensor cores: the register tile is not used
  } else {
    if (k <= 8) f(std::integral_constant<int, 8>{});
    else if (k <= 16) f(std::integral_constant<int, 16>{});
    else if (k <= 24) f(std::integral_constant<int, 24>{});
    else f(std::integral_constant<int, 32>{});
  }
}

/// Whether one problem takes the resident engine (one block, one launch).
bool prefer_resident(i64 m, i64 n, i64 k) { return m * n * k <= (i64(1) << 22) && m <= 8192; }

template <class T, class XS>
const XS* prepare_x(std::uintptr_t X, i64 count, Carver& c, __nv_bfloat16** conv) {
  if constexpr (std::is_same<XS, T>::value) {
    (void)count; (void)c; *conv = nullptr;
    return reinterpret_cast<const XS*>(X);
  } else {
    *conv = c.take<__nv_bfloat16>(count);
    return reinterpret_cast<const XS*>(*conv);
  }
}

template <class T, class XS>
void convert_x(std::uintptr_t X, __nv_bfloat16* dst, i64 count, cudaStream_t s) {
  if constexpr (!std::is_same<XS, T>::value) {
    const i64 blocks = std::min<i64>((count + 255) / 256, 8192);
    to_bf16_kernel<T><<<unsigned(blocks), 256, 0, s>>>(reinterpret_cast<const T*>(X), dst, count);
    DFFKIT_CUDA_CHECK_LAUNCH("to_bf16_kernel");
  } else {
    (void)X; (void)dst; (void)count; (void)s;
  }
}

#include "nmf_small.cuh"

/// Resident engine for one or many problems (one block each). groups/objective: single only.
template <class T, class XS, int MODE>
std::vector<cuda::FitResult> resident_solve_general(const std::vector<Item>& items, const Problem& p,
                                            const Options& o, int dev, cudaStream_t s) {
  const KParams q = make_kparams(p, o);
  const bool kl = q.kl != 0;
  const std::size_t limit = smem_optin(dev);
  const std::size_t B = items.size();
  i64 kmax = 0;
  for (const auto& it : items) kmax = std::max(kmax, it.k);
  // workspace: descriptors, outputs, and per problem what does not fit on chip
  auto carve = [&](Carver& c, std::vector<ResDesc<T, XS>>* descs, ResDesc<T, XS>** d_descs,
                   ResOut** d_out, i64** d_goff, std::vector<__nv_bfloat16*>* convs) {
    *d_descs = c.take<ResDesc<T, XS>>(i64(B));
    *d_out = c.take<ResOut>(i64(B));
    *d_goff = c.take<i64>(p.group_offsets ? p.n_groups + 1 : 0);
    for (std::size_t b = 0; b < B; ++b) {
      const Item& it = items[b];
      const ResLayout L = res_layout(it.m, it.n, int(it.k), kl, sizeof(T), sizeof(XS), limit);
      ResDesc<T, XS> d{};
      __nv_bfloat16* conv = nullptr;
      d.X = prepare_x<T, XS>(it.X, it.m * it.n, c, &conv);
      d.W = reinterpret_cast<T*>(it.W);
      d.H = reinterpret_cast<T*>(it.H);
      d.m = it.m; d.n = it.n; d.k = int(it.k);
      d.goff = p.group_offsets ? *d_goff : nullptr;
      d.ngroups = p.group_offsets ? p.n_groups : 0;
      d.gnorm = q.groups ? c.take<double>(d.ngroups * it.k) : nullptr;
      d.gP = L.P_s ? nullptr : c.take<T>(it.k * it.n);
      d.gR = (kl && !L.R_s) ? c.take<T>(i64(TM) * it.n) : nullptr;
      d.objective = o.record_objective ? c.take<double>(std::max(o.max_iter, 1)) : nullptr;
      if (descs) descs->push_back(d);
      if (convs) convs->push_back(conv);
    }
  };
  Carver count;
  {
    ResDesc<T, XS>* a; ResOut* b; i64* g;
    carve(count, nullptr, &a, &b, &g, nullptr);
  }
  Workspace ws(dev, count.offset + 256);
  try {
  Carver c;
  c.base = ws.data();
  std::vector<ResDesc<T, XS>> descs;
  std::vector<__nv_bfloat16*> convs;
  ResDesc<T, XS>* d_descs; ResOut* d_out; i64* d_goff;
  carve(c, &descs, &d_descs, &d_out, &d_goff, &convs);
  if (p.group_offsets)
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(d_goff, p.group_offsets, (p.n_groups + 1) * sizeof(i64),
                                    cudaMemcpyHostToDevice, s));
  for (std::size_t b = 0; b < B; ++b)
    convert_x<T, XS>(items[b].X, convs[b], items[b].m * items[b].n, s);
  // problems grouped by cluster size (one launch per size), in their order within a group
  int cc_major = 0;
  DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  std::vector<int> csize(B);
  for (std::size_t b = 0; b < B; ++b)
    csize[b] = cluster_size(items[b].m, items[b].n, items[b].k, q, sizeof(T), sizeof(XS), limit,
                            cc_major);
  std::vector<std::size_t> order;  // position in the launch -> problem
  std::vector<ResDesc<T, XS>> sorted;
  std::size_t off = 0;
  for (int C = 1; C <= 8; C *= 2) {
    const std::size_t start = sorted.size();
    for (std::size_t b = 0; b < B; ++b)
      if (csize[b] == C) { order.push_back(b); sorted.push_back(descs[b]); }
    const std::size_t count = sorted.size() - start;
    if (count == 0) continue;
    with_kc<MODE>(int(kmax), [&](auto kc) {
      launch_resident<T, XS, decltype(kc)::value, MODE>(sorted.data() + start, count, q,
                                                        d_out + off, d_descs + off, limit, C, s);
    });
    off += count;
  }
  std::vector<ResOut> sorted_out(B), outs(B);
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(sorted_out.data(), d_out, B * sizeof(ResOut),
                                  cudaMemcpyDeviceToHost, s));
  std::vector<cuda::FitResult> res(B);
  std::vector<std::vector<double>> objs(B);
  if (o.record_objective)
    for (std::size_t b = 0; b < B; ++b) {
      objs[b].resize(std::max(o.max_iter, 1));
      DFFKIT_CUDA_TRY(cudaMemcpyAsync(objs[b].data(), descs[b].objective,
                                      objs[b].size() * sizeof(double), cudaMemcpyDeviceToHost, s));
    }
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  for (std::size_t j = 0; j < B; ++j) outs[order[j]] = sorted_out[j];
  for (std::size_t b = 0; b < B; ++b) {
    res[b].n_iter = outs[b].n_iter;
    res[b].error_init = outs[b].error_init;
    res[b].error = outs[b].error;
    if (o.record_objective) {
      objs[b].resize(std::max(outs[b].n_iter, 0));
      res[b].objective = std::move(objs[b]);
    }
  }
  return res;
  } catch (...) {
    // let the work in flight finish before the workspace can be handed to another call
    cudaStreamSynchronize(s);
    cudaGetLastError();
    throw;
  }
}

/// Resident engine: float32 problems the fast path takes (nmf_small.cuh) go there, the rest to
/// the general resident kernel; results in the items' order.
template <class T, class XS, int MODE>
std::vector<cuda::FitResult> resident_solve(const std::vector<Item>& items, const Problem& p,
                                            const Options& o, int dev, cudaStream_t s) {
  // tf32 too: at k <= 16 the fast path's fp32 arithmetic beats the general kernel's tensor
  // cores (H200, one image: fp32 fast path 1.71 ms, general tf32 kernel 8.48 ms), and is exact
  // where tf32 may round
  if constexpr (std::is_same<T, float>::value) {
    const KParams q = make_kparams(p, o);
    int cc_major = 0;
    DFFKIT_CUDA_TRY(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    if (small_options_ok(q, cc_major)) {
      const std::size_t limit = smem_optin(dev);
      std::vector<Item> fast, rest;
      std::vector<std::size_t> fast_at, rest_at;
      for (std::size_t b = 0; b < items.size(); ++b) {
        const Item& it = items[b];
        if (small_cluster(it.m, it.n, it.k, limit, small_tc()) > 0) {
          fast.push_back(it);
          fast_at.push_back(b);
        } else {
          rest.push_back(it);
          rest_at.push_back(b);
        }
      }
      if (!fast.empty()) {
        std::vector<cuda::FitResult> res(items.size());
        auto rf = std::is_same<XS, T>::value ? small_solve_f32(fast, q, dev, s)
                                             : small_solve_bf16x(fast, q, dev, s);
        for (std::size_t j = 0; j < rf.size(); ++j) res[fast_at[j]] = std::move(rf[j]);
        if (!rest.empty()) {
          auto rr = resident_solve_general<T, XS, MODE>(rest, p, o, dev, s);
          for (std::size_t j = 0; j < rr.size(); ++j) res[rest_at[j]] = std::move(rr[j]);
        }
        return res;
      }
    }
  }
  return resident_solve_general<T, XS, MODE>(items, p, o, dev, s);
}

template <class T, class XS, int KC, int MODE>
void launch_sweep(const SweepArgs<T, XS>& a, const KParams& q, const State* st, int first,
                  int want_P, int nb, std::size_t smem, cudaStream_t s) {
  sweep_kernel<T, XS, KC, MODE><<<unsigned(nb), NT, smem, s>>>(a, q, st, first, want_P, smem);
  DFFKIT_CUDA_CHECK_LAUNCH("sweep_kernel");
}

/// Calls f with the gemm kernels' column width KP (16, 32 or 64).
template <class F>
void with_kp(int kp, F&& f) {
  if (kp == 16) f(std::integral_constant<int, 16>{});
  else if (kp == 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 64>{});
}

/// How the gemm kernels multiply (nmf_gemm.cuh's MODE): float64 on CUDA cores (0); the tf32 mode
/// on tensor cores (1); float32 and bf16x on tensor cores with float32 accuracy (split tf32, 2),
/// or on CUDA cores (0) with DFFKIT_CUDA_GEMM_SIMT=1 (for side-by-side timings).
template <class T, int MODE>
int gemm_mode() {
  if constexpr (!std::is_same<T, float>::value) return 0;
  if constexpr (MODE == 1) return 1;
  const char* v = std::getenv("DFFKIT_CUDA_GEMM_SIMT");
  return v && v[0] == '1' ? 0 : 2;
}

/// Calls f with the gemm MODE gm as a constant (only the modes the precision mode can take).
template <class T, int MODE, class F>
void with_gm(int gm, F&& f) {
  if constexpr (!std::is_same<T, float>::value) {
    (void)gm;
    f(std::integral_constant<int, 0>{});
  } else if constexpr (MODE == 1) {
    (void)gm;
    f(std::integral_constant<int, 1>{});
  } else {
    if (gm == 2) f(std::integral_constant<int, 2>{});
    else f(std::integral_constant<int, 0>{});
  }
}

/// Whether the gemm engine serves a problem: Frobenius, k <= 64, its kernels' shared memory
/// within the device's limit.
bool gemm_fits(bool kl, i64 k, int esz, std::size_t limit) {
  const int kp = gemm_kp(k);
  if (kl || kp == 0) return false;
  const std::size_t need = std::max(esz == 8 ? gemm_n_smem<double>(kp) : gemm_n_smem<float>(kp, 1),
                                    esz == 8 ? gemm_p_smem<double>(kp) : gemm_p_smem<float>(kp));
  return need <= limit;
}

/// The gemm engine's products for one iteration (nmf_gemm.cuh): N and the W update, then the
/// P and G_W partials over the plan's row slices.
template <class T, class XS, int GM>
void launch_gemm(const GemmArgs<T, XS>& g, const GemmPlan& plan, const KParams& q,
                 const int* stop, int first, int want_P, cudaStream_t s) {
  with_kp(plan.kp, [&](auto kpc) {
    constexpr int KP = decltype(kpc)::value;
    gemm_n_kernel<T, XS, KP, GM><<<unsigned(plan.n_blocks), NT, gemm_n_smem<T>(KP, GM), s>>>(
        g, q, stop, first);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_n_kernel");
    if (want_P) {
      gemm_p_kernel<T, XS, KP, GM><<<dim3(unsigned(plan.col_blocks), unsigned(plan.slices)), NT,
                                 gemm_p_smem<T>(KP), s>>>(g, stop);
      DFFKIT_CUDA_CHECK_LAUNCH("gemm_p_kernel");
    }
    gemm_gram_kernel<T, KP><<<unsigned(plan.slices), NT, gemm_gram_smem<T>(KP), s>>>(
        g.W, g.m, g.k, i64(g.k), i64(1), g.slice_rows, g.Gpart, stop);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_gram_kernel");
  });
}

/// G_H = H H^T through the slice kernel: partials over slices of H's columns, added in the fixed
/// order; the total is left in partial 0 (GHpart, which the gemm engine uses as G_H).
template <class T>
void launch_gemm_gh(const T* H, i64 n, int k, const GemmPlan& plan, T* GHpart, const int* stop,
                    cudaStream_t s) {
  with_kp(plan.kp, [&](auto kpc) {
    constexpr int KP = decltype(kpc)::value;
    gemm_gram_kernel<T, KP><<<unsigned(plan.h_slices), NT, gemm_gram_smem<T>(KP), s>>>(
        H, n, k, i64(1), n, plan.h_slice_cols, GHpart, stop);
    DFFKIT_CUDA_CHECK_LAUNCH("gemm_gram_kernel (H)");
  });
}

/// Sweep engine for one large problem; GEMM: the gemm engine instead of the row-tile sweep for
/// the products (Frobenius, k <= 64; the statistics, H update and stopping rule are shared).
template <class T, class XS, int MODE, bool GEMM = false>
cuda::FitResult sweep_solve(const Item& item, const Problem& p, const Options& o, int dev,
                            cudaStream_t s) {
  const KParams q = make_kparams(p, o);
  const bool kl = q.kl != 0;
  const i64 m = item.m, n = item.n;
  const int k = int(item.k);
  const std::size_t limit = smem_optin(dev);
  const SweepLayout L = sweep_layout(n, k, kl, sizeof(T), sizeof(XS), limit);
  if (GEMM && !gemm_fits(kl, k, int(sizeof(T)), limit))
    throw invalid_argument("dffkit._cuda: the gemm engine serves the Frobenius loss with "
                           "n_components <= 64; use engine='auto' or 'sweep'");
  if (!GEMM && L.used > limit)
    throw invalid_argument("dffkit._cuda: n_components=" + std::to_string(k) +
                           " is too large for the CUDA engine's on-chip statistics");
  const i64 tiles = (m + TM - 1) / TM;
  const i64 kn = i64(k) * n;
  const i64 max_parts = std::max<i64>(1, (i64(512) << 20) / std::max<i64>(1, kn * i64(sizeof(T))));
  const GemmPlan plan = GEMM ? gemm_plan(m, n, k, max_parts) : GemmPlan{};
  const int gm = GEMM ? gemm_mode<T, MODE>() : 0;
  // nb: partials of P and G_W; nbd: partials of the first iteration's error terms
  const i64 nb = GEMM ? plan.slices : std::max<i64>(1, std::min<i64>(std::min<i64>(tiles, 264), max_parts));
  const i64 nbd = GEMM ? plan.n_blocks : nb;
  const i64 nbh = (n + NT - 1) / NT;
  const i64 nbe = std::min<i64>(m, 1024);
  const i64 nchunks = (m * n + 4095) / 4096;

  State* st; T *GH, *GW, *rs, *colsum, *Gpart, *cspart, *Ppart, *gR; double *rsd, *d0p, *ggp, *php,
      *sp, *sxp, *cwp, *gnorm, *obj, *chunks; i64* goff; __nv_bfloat16* conv;
  auto carve = [&](Carver& c) {
    st = c.take<State>(1);
    // gemm: G_H is partial 0 of the H-slice partials (the total after their reduction)
    GH = c.take<T>((GEMM ? plan.h_slices : 1) * i64(k) * k); GW = c.take<T>(i64(k) * k);
    rs = c.take<T>(k); colsum = c.take<T>(k); rsd = c.take<double>(k);
    Gpart = c.take<T>(nb * k * k); cspart = c.take<T>(nb * k);
    d0p = c.take<double>(nbd); ggp = c.take<double>(nbd);
    Ppart = c.take<T>(nb * kn);
    gR = (kl && !L.R_s) ? c.take<T>(nb * TM * n) : nullptr;
    php = c.take<double>(nbh);
    sp = c.take<double>(nbe); sxp = c.take<double>(nbe); cwp = c.take<double>(nbe * k);
    goff = c.take<i64>(p.group_offsets ? p.n_groups + 1 : 0);
    gnorm = c.take<double>(p.group_offsets ? p.n_groups * k : 0);
    obj = c.take<double>(o.record_objective ? std::max(o.max_iter, 1) : 0);
    chunks = c.take<double>(nchunks + 1);
    const XS* xs = prepare_x<T, XS>(item.X, m * n, c, &conv);
    (void)xs;
  };
  Carver count;
  carve(count);
  Workspace ws(dev, count.offset + 256);
  try {
  Carver c;
  c.base = ws.data();
  carve(c);
  const XS* Xd = std::is_same<XS, T>::value ? reinterpret_cast<const XS*>(item.X)
                                             : reinterpret_cast<const XS*>(conv);
  convert_x<T, XS>(item.X, conv, m * n, s);
  T* W = reinterpret_cast<T*>(item.W);
  T* H = reinterpret_cast<T*>(item.H);

  State init{};
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(st, &init, sizeof(State), cudaMemcpyHostToDevice, s));
  if (p.group_offsets)
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(goff, p.group_offsets, (p.n_groups + 1) * sizeof(i64),
                                    cudaMemcpyHostToDevice, s));
  if (!kl) {
    // ||X||^2 in the fixed chunk order (of the values the sweep reads)
    if (std::is_same<XS, T>::value) {
      launch_fixed_order_sum(Xd, m * n, sizeof(T) == 4 ? cuda::DType::f32 : cuda::DType::f64,
                             true, chunks, &st->xx, s);
    } else {
      // bf16x: the trace identity needs the norm of the values the sweep reads (the bf16 ones)
      chunk_sq_kernel<T, XS><<<unsigned((nchunks + 127) / 128), 128, 0, s>>>(Xd, m * n, chunks);
      DFFKIT_CUDA_CHECK_LAUNCH("chunk_sq_kernel");
      ordered_sum_kernel<<<1, 32, 0, s>>>(chunks, nchunks, &st->xx);
      DFFKIT_CUDA_CHECK_LAUNCH("ordered_sum_kernel");
    }
  }
  auto stats = [&]() {
    if constexpr (GEMM) {
      launch_gemm_gh<T>(H, n, k, plan, GH, &st->stopped, s);
      if (plan.h_slices > 1) {
        reduce_partials_kernel<T><<<unsigned((i64(k) * k + 31) / 32), 256, 0, s>>>(
            st, GH, i64(k) * k, int(plan.h_slices), i64(k) * k);
        DFFKIT_CUDA_CHECK_LAUNCH("reduce_partials_kernel (G_H)");
      }
      return;
    }
    h_stats_kernel<T><<<unsigned(kl ? k : k * k), NT, 0, s>>>(st, H, n, k, kl, GH, rs, rsd);
    DFFKIT_CUDA_CHECK_LAUNCH("h_stats_kernel");
  };
  auto full_error = [&](int it, int need, int check) {
    error_kernel<T, XS><<<unsigned(nbe), NT, 0, s>>>(st, Xd, W, H, m, n, k, kl, sp, sxp, cwp);
    DFFKIT_CUDA_CHECK_LAUNCH("error_kernel");
    finalize_kernel<T><<<1, 32, 0, s>>>(st, it, need, check, 1, kl, o.tol, 0, php, GW, GH, k,
                                        int(nbe), sp, sxp, cwp, rsd, obj, o.record_objective);
    DFFKIT_CUDA_CHECK_LAUNCH("finalize_kernel");
  };
  stats();
  if (kl || o.max_iter < 1) full_error(0, 1, 0);

  const std::size_t smem = L.used;
  if constexpr (GEMM) {
    with_gm<T, MODE>(gm, [&](auto gmc) {
      constexpr int GM = decltype(gmc)::value;
      with_kp(plan.kp, [&](auto kpc) {
        constexpr int KP = decltype(kpc)::value;
        DFFKIT_CUDA_TRY(cudaFuncSetAttribute(gemm_n_kernel<T, XS, KP, GM>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(gemm_n_smem<T>(KP, GM))));
        DFFKIT_CUDA_TRY(cudaFuncSetAttribute(gemm_p_kernel<T, XS, KP, GM>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(gemm_p_smem<T>(KP))));
      });
    });
  } else {
    with_kc<MODE>(k, [&](auto kc) {
      DFFKIT_CUDA_TRY(cudaFuncSetAttribute(sweep_kernel<T, XS, decltype(kc)::value, MODE>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    });
  }
  GemmArgs<T, XS> g{};
  g.X = Xd; g.W = W; g.H = H; g.GH = GH; g.m = m; g.n = n; g.k = k;
  // 4-element loads: float4, two double2 or one uint2 (bfloat16)
  g.vec = n % 4 == 0 && reinterpret_cast<std::uintptr_t>(Xd) % std::min<std::size_t>(16, 4 * sizeof(XS)) == 0 &&
          reinterpret_cast<std::uintptr_t>(H) % 16 == 0;
  g.goff = p.group_offsets ? goff : nullptr;
  g.ngroups = p.group_offsets ? p.n_groups : 0;
  g.gnorm = gnorm; g.Ppart = Ppart; g.Gpart = Gpart; g.d0part = d0p; g.ggpart = ggp;
  g.slice_rows = plan.slice_rows;
  SweepArgs<T, XS> a;
  a.X = Xd; a.W = W; a.H = H; a.m = m; a.n = n; a.k = k; a.GH = GH; a.rs = rs;
  a.goff = p.group_offsets ? goff : nullptr;
  a.ngroups = p.group_offsets ? p.n_groups : 0;
  a.gnorm = gnorm; a.Ppart = Ppart; a.Gpart = Gpart; a.cspart = cspart; a.d0part = d0p;
  a.ggpart = ggp; a.gR = gR;
  int host_stopped = 0;
  for (int it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || o.record_objective;
    const bool first = it == 1 && !kl;
    const bool want_P = kl ? o.update_H : (o.update_H || need_err);
    if (q.groups) {
      group_norm_kernel<T><<<unsigned((p.n_groups * k + 255) / 256), 256, 0, s>>>(
          st, W, goff, p.n_groups, k, gnorm);
      DFFKIT_CUDA_CHECK_LAUNCH("group_norm_kernel");
    }
    if constexpr (GEMM) {
      with_gm<T, MODE>(gm, [&](auto gmc) {
        launch_gemm<T, XS, decltype(gmc)::value>(g, plan, q, &st->stopped, first, want_P, s);
      });
    } else {
      with_kc<MODE>(k, [&](auto kc) {
        launch_sweep<T, XS, decltype(kc)::value, MODE>(a, q, st, first, want_P, int(nb), smem, s);
      });
    }
    auto reduce_parts = [&](T* part, i64 count) {
      if (nb < 2) return;
      reduce_partials_kernel<T><<<unsigned((count + 31) / 32), 256, 0, s>>>(st, part, count,
                                                                           int(nb), count);
      DFFKIT_CUDA_CHECK_LAUNCH("reduce_partials_kernel");
    };
    if (kl) reduce_parts(cspart, k); else reduce_parts(Gpart, i64(k) * k);
    if (want_P) reduce_parts(Ppart, kn);
    reduce_kernel<T><<<1, NT, 0, s>>>(st, int(nbd), k, Gpart, cspart, d0p, ggp, GW, colsum, kl, first);
    DFFKIT_CUDA_CHECK_LAUNCH("reduce_kernel");
    if (o.update_H || (need_err && !kl)) {
      h_update_kernel<T><<<unsigned(nbh), NT, 0, s>>>(st, q, 1, n, k, Ppart, H, GW, colsum,
                                                       o.update_H, php);
      DFFKIT_CUDA_CHECK_LAUNCH("h_update_kernel");
    }
    if (o.update_H) stats();
    if (o.record_objective) {
      if (q.groups) {
        group_norm_kernel<T><<<unsigned((p.n_groups * k + 255) / 256), 256, 0, s>>>(
            st, W, goff, p.n_groups, k, gnorm);
        DFFKIT_CUDA_CHECK_LAUNCH("group_norm_kernel");
      }
      penalty_kernel<T><<<1, NT, 0, s>>>(st, q, W, H, m, n, k, gnorm, p.n_groups);
      DFFKIT_CUDA_CHECK_LAUNCH("penalty_kernel");
    }
    if (kl && need_err) {
      full_error(it, 1, check);
    } else {
      finalize_kernel<T><<<1, 32, 0, s>>>(st, it, need_err, check, 0, kl, o.tol, int(nbh), php,
                                          GW, GH, k, 0, sp, sxp, cwp, rsd, obj,
                                          o.record_objective);
      DFFKIT_CUDA_CHECK_LAUNCH("finalize_kernel");
    }
    if (check) {
      DFFKIT_CUDA_TRY(cudaMemcpyAsync(&host_stopped, &st->stopped, sizeof(int),
                                      cudaMemcpyDeviceToHost, s));
      DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
      if (host_stopped) break;
    }
  }
  State out{};
  DFFKIT_CUDA_TRY(cudaMemcpyAsync(&out, st, sizeof(State), cudaMemcpyDeviceToHost, s));
  cuda::FitResult r;
  std::vector<double> objective;
  if (o.record_objective) {
    objective.resize(std::max(o.max_iter, 1));
    DFFKIT_CUDA_TRY(cudaMemcpyAsync(objective.data(), obj, objective.size() * sizeof(double),
                                    cudaMemcpyDeviceToHost, s));
  }
  DFFKIT_CUDA_TRY(cudaStreamSynchronize(s));
  r.n_iter = o.max_iter < 1 ? 0 : out.n_iter;
  r.error_init = out.error_init;
  r.error = out.err;
  if (o.record_objective) {
    objective.resize(std::max(r.n_iter, 0));
    r.objective = std::move(objective);
  }
  return r;
  } catch (...) {
    cudaStreamSynchronize(s);
    cudaGetLastError();
    throw;
  }
}

}  // namespace
}  // namespace cuda_detail
}  // namespace dffkit

/// Defines cuda_detail::engines_<name>() for one precision mode (used by nmf_mu_<name>.cu).
#define DFFKIT_DEFINE_ENGINES(name, T, XS, MODE)                                              \
  namespace dffkit {                                                                           \
  namespace cuda_detail {                                                                      \
  Engines engines_##name() {                                                                   \
    return Engines{resident_solve<T, XS, MODE>, sweep_solve<T, XS, MODE>,                     \
                   sweep_solve<T, XS, MODE, true>, int(sizeof(T)), int(sizeof(XS))};           \
  }                                                                                            \
  }                                                                                            \
  }
