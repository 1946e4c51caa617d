#pragma once
// The device side of the resident and sweep engines: shared-memory layouts (computed alike on
// host and device), the block-level pieces, the resident kernel (general: KL, groups, objective,
// k > 16, staged rows), the sweep kernel and the small per-iteration kernels of the sweep and gemm
// drivers. Host drivers: nmf_engine.cuh. Like the other kernel headers this one also compiles
// under the CPU emulator (cuda/emu/cuda_emu.hpp), where the tests run it.
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mu_update.hpp"
#include "nmf_device_common.cuh"
#include "nmf_kernels.cuh"

namespace dffkit {
namespace cuda_detail {
namespace {

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

/// One element's share of the error: (x - wh)^2 (Frobenius), or of scikit-learn's divergence
/// (KL): x log(x / max(wh, eps)) - x + wh for x > eps, wh otherwise. Term by term, as the CPU
/// engine has it: x (u - log1p(u)), u = wh / x - 1, does not cancel as wh nears x (the sum
/// sum(x log(x / wh)) + sum(WH) - sum(X) kept only 1e-4 of it 1e-5 from an exact fit).
template <class T>
__device__ __forceinline__ void error_terms(T x, T wh, bool kl, double& s) {
  const double xd = double(x), w = double(wh);
  if (!kl) {
    s += (xd - w) * (xd - w);
  } else if (x > T(kEpsilon)) {
    if (w >= kEpsilon) {
      const double u = w / xd - 1.0;
      s += xd * (u - log1p(u));
    } else {
      s += xd * std::log(xd / kEpsilon) - xd + w;
    }
  } else {
    s += w;
  }
}

/// Rows [r0, r1)'s share of the beta-divergence of X and W H (Frobenius: sum (x - wh)^2; KL:
/// sum x log(x / wh) - x + wh), one pass, in every thread of the block; X row i at xrow(i).
/// The shares of row ranges add up to the whole (divergence_error turns it into the error).
template <class T, class XS, class XRow>
__device__ double rows_divergence(const XRow& xrow, const T* W, const T* H, i64 r0, i64 r1, i64 n,
                                  int k, bool kl, double* red) {
  double s = 0;
  for (i64 e = r0 * n + threadIdx.x; e < r1 * n; e += NT) {
    const i64 i = e / n, l = e - i * n;
    T wh = T(0);
    for (int j = 0; j < k; ++j) wh += W[i * k + j] * H[j * n + l];
    error_terms(xget<T>(xrow(i) + l), wh, kl, s);
  }
  return block_sum(s, red);
}

/// The error from rows_divergence's total: its square root (Frobenius), or that of twice it (KL).
DFFKIT_HD double divergence_error(double div, bool kl) {
  const double d = div > 0 ? div : 0.0;
  return std::sqrt(kl ? 2.0 * d : d);
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
  DFFKIT_DYNAMIC_SMEM(smem);
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
  // The error: KL and float32 from one pass over X (full_error); float64 from the sweep's
  // statistics (the trace identity), or the pass where those leave less than 1e-8 of ||X||^2.
  // (In float32 the identity's terms, each about ||X||^2, cancel to noise when the fit is good.)
  const bool direct = kl || sizeof(T) == 4;
  double xx = 0;
  if (!direct) {
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

  // the error from this block's rows, the C blocks' shares added in rank order (each block reads
  // only the rows of W it writes: a peer may already be updating its own)
  auto full_error = [&](bool kl_) {
    double div = rows_divergence<T, XS>(xrow, d.W, Hp, rb, re, n, k, kl_, red);
    if (C > 1) {
      if (tid == 0) xch[3] = div;
      cluster_barrier(C);
      div = 0;
      for (int r = 0; r < C; ++r) div += cluster_peer(xch, r, C)[3];
    }
    return divergence_error(div, kl_);
  };
  double err_init = 0, err = 0, prev = 0;
  bool fresh = false;
  if (direct || q.max_iter < 1) {
    err_init = full_error(kl);
    fresh = true;
  }
  err = prev = err_init;
  const T l1H = T(q.l1_H), l2H = T(q.l2_H), muH = T(q.mu);
  int it;
  for (it = 1; it <= q.max_iter; ++it) {
    const bool check = q.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == q.max_iter || q.record_obj;
    const bool first = it == 1 && !direct;
    const bool want_P = q.update_H || (need_err && !direct);
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
    } else if (need_err && !direct) {
      for (i64 l = tid; l < n; l += NT)
        for (int j = 0; j < k; ++j) ph += double(Pu[j * n + l]) * double(Hp[j * n + l]);
    }
    fresh = false;
    if (need_err) {
      if (direct) {
        err = full_error(kl);
      } else {
        ph = block_sum(ph, red);
        double g2 = 0;
        for (int p = tid; p < k * k; p += NT) g2 += double(GWu[p]) * double(GH[p]);
        g2 = block_sum(g2, red);
        const double sq = xx - 2.0 * ph + g2;
        err = sq < 1e-8 * xx ? full_error(false) : std::sqrt(sq);
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
  if (!fresh) err = full_error(kl);
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
  DFFKIT_DYNAMIC_SMEM(smem);
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
  DFFKIT_SHARED(double, red, [8][33]);
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
  DFFKIT_SHARED(double, red, [NT]);
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
                                                     int kl, T* GH, T* rs) {
  if (st && st->stopped) return;
  DFFKIT_SHARED(double, red, [NT]);
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
    if (kl) { rs[p] = T(s); } else { GH[p] = T(s); }
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

// error_kernel's tiling: tiles of EBM x EBN elements of X; W's EBM x EKC and H's EKC x EBN
// slices staged in shared memory (EKC columns of W at a time); each thread an
// ETM x ETN register tile of W H: rows ty ETM + a (contiguous: W's values as 16-byte broadcast
// loads), columns tx + ETX b (a warp on 32 consecutive columns: conflict-free H loads, coalesced
// X loads).
constexpr int EBM = 64, EBN = 128, EKC = 16, ETM = 8, ETN = 4, ETX = EBN / ETN;
static_assert((EBM / ETM) * ETX == NT, "error_kernel: one register tile per thread");

/// error_kernel's blocks (and partials) for an m x n X: one per tile, at most 1024; from the
/// shape only, so the partials and the order of their sum do not change from run to run.
DFFKIT_HD i64 error_blocks(i64 m, i64 n) {
  const i64 tiles = ((m + EBM - 1) / EBM) * ((n + EBN - 1) / EBN);
  return tiles < 1 ? 1 : tiles < 1024 ? tiles : 1024;
}

/// 16 bytes of T, for shared-memory loads of that width.
template <class T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

/// acc[a][b] += W[i][j] H[j][l] over the kc staged columns j in order, from the W slice ws
/// (EKC x WLD, transposed) and the H slice hs (EKC x EBN).
template <class T, int WLD>
__device__ __forceinline__ void error_products(T (&acc)[ETM][ETN], const T* ws, const T* hs,
                                               int kc, int tx, int ty) {
  constexpr int P = 16 / sizeof(T);
  auto step = [&](int j) {
    T wv[ETM], hv[ETN];
    const Pack16<T>* wp = reinterpret_cast<const Pack16<T>*>(ws + j * WLD + ty * ETM);
#pragma unroll
    for (int q = 0; q < ETM / P; ++q) {
      const Pack16<T> w = wp[q];
#pragma unroll
      for (int u = 0; u < P; ++u) wv[q * P + u] = w.v[u];
    }
#pragma unroll
    for (int b = 0; b < ETN; ++b) hv[b] = hs[j * EBN + tx + ETX * b];
#pragma unroll
    for (int a = 0; a < ETM; ++a)
#pragma unroll
      for (int b = 0; b < ETN; ++b) acc[a][b] += wv[a] * hv[b];
  };
  if (kc == EKC) {
#pragma unroll
    for (int j = 0; j < EKC; ++j) step(j);
  } else {
#pragma unroll 2
    for (int j = 0; j < kc; ++j) step(j);
  }
}

/// Full-pass error partials: per block the sum of error_terms (x - wh)^2 (Frobenius) or the
/// divergence's terms (KL) over tiles b, b + gridDim.x, ... (error_blocks blocks; any grid
/// gives the same total). Each wh summed over j = 0 .. k-1 in order, in T, as W H's element.
/// Registers (ptxas, sm_90): float32 in 128, no spills, two blocks an SM (163 where not
/// bounded; at 80 it spills); float64 227 (its accumulators alone 64; at 128 it spills).
template <class T, class XS>
__global__ void __launch_bounds__(NT, sizeof(T) == 4 ? 2 : 1)
    error_kernel(const State* st, const XS* X, const T* W, const T* H, i64 m, i64 n, int k, int kl,
                 double* spart) {
  if (st->stopped) return;
  constexpr int P = 16 / int(sizeof(T));
  constexpr int WLD = EBM + P;  // W slice's row stride: 16-byte rows, conflict-free stores
  constexpr int NWS = EBM * EKC / NT, NHS = EKC * EBN / NT;  // staged values per thread
  static_assert(NWS * NT == EBM * EKC && NHS * NT == EKC * EBN && EKC % 8 == 0, "error_kernel staging");
  DFFKIT_SHARED(double, red, [NT]);
  DFFKIT_SHARED(Pack16<T>, wsp, [EKC * WLD / P]);
  DFFKIT_SHARED(Pack16<T>, hsp, [EKC * EBN / P]);
  T* ws = &wsp[0].v[0];
  T* hs = &hsp[0].v[0];
  const int tid = threadIdx.x, tx = tid % ETX, ty = tid / ETX;
  const i64 mt = (m + EBM - 1) / EBM, nt = (n + EBN - 1) / EBN;
  double s = 0;
  for (i64 t = blockIdx.x; t < mt * nt; t += gridDim.x) {
    const i64 r0 = (t / nt) * EBM, c0 = (t % nt) * EBN;
    T acc[ETM][ETN];
#pragma unroll
    for (int a = 0; a < ETM; ++a)
#pragma unroll
      for (int b = 0; b < ETN; ++b) acc[a][b] = T(0);
    // the next slices in registers while the block multiplies the staged ones; W's read 8
    // columns x 4 rows a warp (32-byte pieces of its rows), H's along its rows; zeros outside
    T wr[NWS], hr[NHS];
    auto fetch = [&](int k0) {
#pragma unroll
      for (int p = 0; p < NWS; ++p) {
        const int e = tid + p * NT, rest = e / 8, r = rest % EBM, j = (rest / EBM) * 8 + e % 8;
        const i64 i = r0 + r;
        wr[p] = i < m && k0 + j < k ? W[i * k + k0 + j] : T(0);
      }
#pragma unroll
      for (int p = 0; p < NHS; ++p) {
        const int e = tid + p * NT, j = e / EBN, c = e % EBN;
        const i64 l = c0 + c;
        hr[p] = k0 + j < k && l < n ? H[i64(k0 + j) * n + l] : T(0);
      }
    };
    fetch(0);
    for (int k0 = 0; k0 < k; k0 += EKC) {
      __syncthreads();  // the block is done with the slices staged before
#pragma unroll
      for (int p = 0; p < NWS; ++p) {
        const int e = tid + p * NT, rest = e / 8, r = rest % EBM, j = (rest / EBM) * 8 + e % 8;
        ws[j * WLD + r] = wr[p];
      }
#pragma unroll
      for (int p = 0; p < NHS; ++p) hs[tid + p * NT] = hr[p];
      __syncthreads();
      if (k0 + EKC < k) fetch(k0 + EKC);
      error_products<T, WLD>(acc, ws, hs, k - k0 < EKC ? k - k0 : EKC, tx, ty);
    }
#pragma unroll
    for (int a = 0; a < ETM; ++a) {
      const i64 i = r0 + ty * ETM + a;
#pragma unroll
      for (int b = 0; b < ETN; ++b) {
        const i64 l = c0 + tx + ETX * b;
        if (i < m && l < n) error_terms(xget<T>(X + i * n + l), acc[a][b], kl != 0, s);
      }
    }
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) spart[blockIdx.x] = s;
}

template <class T>
__global__ void __launch_bounds__(NT) penalty_kernel(State* st, KParams q, const T* W, const T* H,
                                                     i64 m, i64 n, int k, const double* gnorm,
                                                     i64 ng) {
  if (st->stopped) return;
  DFFKIT_SHARED(double, red, [NT]);
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
      double s = 0;
      for (int b = 0; b < nbe; ++b) s += spart[b];
      err = divergence_error(s, kl != 0);
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

template <class T>
__global__ void to_bf16_kernel(const T* X, __nv_bfloat16* out, i64 count) {
  for (i64 i = i64(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += i64(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(float(X[i]));
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

}  // namespace
}  // namespace cuda_detail
}  // namespace dffkit
