#pragma once
// The resident engine's fast path for small float32 Frobenius problems (one image's activations:
// 196 x 512, k <= 16), batched or alone: one launch runs the whole solve, a problem's rows are
// split over a cluster of C blocks (sm_90) with every block's rows of X in shared memory.
//
// Per iteration, on each block of the cluster (rows [rb, re) of X, all of H, G_H = H H^T):
//   A  N = X_b H^T: a warp owns a slice of columns with its H entries in registers (8 columns
//      a lane, 4 for k > 8), takes R rows at a time (R k <= 32 partial dot products per lane)
//      and adds the partials of the 32 lanes with one reduce-scatter butterfly (31 shuffles);
//   B  W_b <- mu_step(W_b, N, W_b G_H): a thread per entry, W kept in shared memory;
//   C  P_b = W_b^T X_b (a thread per 4 columns, rows split over 1-8 adjacent lanes added by
//      shuffles) and G_b = W_b^T W_b;
//   -- cluster barrier --
//   D  block `rank` owns columns [c0, c1) of H: P and G_W summed over the C blocks in rank order
//      (distributed shared memory), H updated there and written into every block's copy of H,
//      the slice's share of H H^T;
//   -- cluster barrier --
//   E  G_H = the C shares in rank order; where the error is wanted, each block's sum of
//      (X_b - W_b H)^2 (float64, from X in shared memory), the C sums in rank order after one more
//      cluster barrier, and the stopping rule: the same sums in the same order on every block,
//      so all blocks stop together. (Not the trace identity ||X||^2 - 2 <P, H> + <G_W, G_H>: its
//      terms, summed in float32, cancel to rounding noise when the fit is good.)
// Every sum has a fixed order, so results depend on the shape only (a problem gives the same
// bits alone and in a batch). The cluster size comes from the shape: the smallest C in
// {1, 2, 4, 8} whose blocks fit two to an SM.
//
// This file compiles under nvcc and under the CPU emulator (cuda/emu/cuda_emu.hpp; the tests run
// the kernel there); the host side (cluster size, launch) is in nmf_small.cuh.
#include <cmath>

#include "mu_update.hpp"
#include "nmf_device_common.cuh"

namespace dffkit {
namespace cuda_detail {

#ifndef DFFKIT_SMALL_MINB
#define DFFKIT_SMALL_MINB 2  // blocks per SM the register budget is cut for
#endif
#ifndef DFFKIT_SMALL_THREADS
#define DFFKIT_SMALL_THREADS 256
#endif
constexpr int SNT = DFFKIT_SMALL_THREADS;  // threads per block
constexpr int SNW = SNT / 32;              // warps per block
// slots of the block's float64 scratch (red): SNW for small_block_sum0's per-warp partials,
// the final and the initial error, the phase clock
constexpr int RG_ERR = SNW, RG_E0 = RG_ERR + 1, RG_PROF = RG_ERR + 4, RG_SIZE = RG_PROF + 12;

DFFKIT_HD constexpr int pow2_floor(int v) {
  int p = 1;
  while (p * 2 <= v) p *= 2;
  return p;
}

/// k rounded up to the widths the fast path is built for (0: not built for this k).
DFFKIT_HD constexpr int small_width(i64 k) {
  return k <= 4 ? 4 : k <= 5 ? 5 : k <= 8 ? 8 : k <= 12 ? 12 : k <= 16 ? 16 : 0;
}

/// Columns per lane in the N step (K of them each in registers: 40-64 for the H slice).
DFFKIT_HD constexpr int small_cpl(int K) { return K <= 8 ? 8 : 4; }

template <int K>
struct SmallCfg {
  static constexpr int R = 32 / K;             // rows per N item
  static constexpr int CPL = small_cpl(K);     // columns per lane in the N step
  static constexpr int SW = 32 * CPL;         // columns per warp slice
  static constexpr int NCH = CPL / 4;         // float4 chunks per lane
};

struct SmallLayout {
  int mb, mbp, G, ldx, ldh, Q, S, rsplit, nqs, lds;
  int cw;  // tensor cores: columns per chunk of the N step (S chunks, at most 8)
  std::size_t X, H, P, Ps, Wo, Wn, Np, GH, GW, GWb, GHp, xch, red, used;
};

/// Shared-memory layout of one block (host and device compute it alike). tc: the kernel with
/// the products on tensor cores (its N step has S <= 8 chunks of cw columns).
DFFKIT_HD SmallLayout small_layout(i64 m, i64 n, int K, int C, bool tc = false) {
  SmallLayout L{};
  const int R = 32 / K, SW = 32 * small_cpl(K);  // as SmallCfg<K>
  L.mb = int((m + C - 1) / C);
  L.mbp = (L.mb + R - 1) / R * R;
  L.G = L.mbp / R;
  L.ldh = int((n + 3) / 4 * 4);
  L.Q = L.ldh / 4;
  L.S = (L.ldh + SW - 1) / SW;
  if (tc) {
    L.cw = ((L.ldh + 7) / 8 + 7) / 8 * 8;
    L.S = (L.ldh + L.cw - 1) / L.cw;
  }
  L.rsplit = L.Q >= SNT ? 1 : pow2_floor(SNT / L.Q < 8 ? SNT / L.Q : 8);
  // rows read together in the P step start on different banks
  const int target = 32 / L.rsplit;
  L.ldx = L.rsplit > 1 ? L.ldh + ((target - L.ldh % 32) % 32 + 32) % 32 : L.ldh;
  L.nqs = (L.Q + C - 1) / C;  // quads of columns in a block's slice of H (at most)
  L.lds = 4 * L.nqs;
  std::size_t o = 0;
  auto put = [&](std::size_t bytes) { const std::size_t at = o; o = (o + bytes + 15) & ~std::size_t(15); return at; };
  const std::size_t f = sizeof(float);
  L.X = put(std::size_t(L.mbp) * L.ldx * f);
  L.H = put(std::size_t(K) * L.ldh * f);
  L.P = put(std::size_t(K) * L.ldh * f);
  L.Ps = put(std::size_t(K) * L.lds * f);
  L.Wo = put(std::size_t(L.mbp) * K * f);
  L.Wn = put(std::size_t(L.mbp) * K * f);
  L.Np = put(std::size_t(L.S) * L.mbp * K * f);
  L.GH = put(std::size_t(K) * K * f);
  L.GW = put(std::size_t(K) * K * f);
  L.GWb = put(std::size_t(K) * K * f);
  L.GHp = put(std::size_t(K) * K * f);
  L.xch = put(8 * sizeof(double));
  L.red = put(RG_SIZE * sizeof(double));
  L.used = o;
  return L;
}

struct SmallDesc {
  const float* X;
  float* W;
  float* H;
  i64 m, n;
  int k;
};

/// Reduce-scatter of 32 values over the 32 lanes: lane l returns the sum over the lanes of
/// v[l], in a fixed butterfly order.
template <int O>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[32], int lane) {
  const bool up = (lane & O) != 0;
#pragma unroll
  for (int t = 0; t < O; ++t) {
    const float send = up ? v[t] : v[t + O];
    const float keep = up ? v[t + O] : v[t];
    v[t] = keep + __shfl_xor_sync(0xffffffffu, send, O);
  }
}
__device__ __forceinline__ float reduce_scatter32(float (&v)[32], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

/// sum over the cluster's blocks, in rank order, of peer(p)[e]: the C loads issued together.
template <class U>
__device__ __forceinline__ U cluster_sum(U* p, int e, int C) {
  U t[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) t[r] = r < C ? cluster_peer(p, r, C)[e] : U(0);
  U v = U(0);
#pragma unroll
  for (int r = 0; r < 8; ++r)
    if (r < C) v += t[r];
  return v;
}

/// acc[j][c] = sum over rows r = r0, r0 + step, ... < rows of W[r K + j] X4[r ld4 + qi].c: one
/// quad of columns of W^T X (zero where qi < 0), W read as broadcasts, X as float4.
template <int K>
__device__ __forceinline__ void small_wtx_quad(const float4* X4, int ld4, const float* W, int qi,
                                               int r0, int rows, int step, float (&acc)[K][4]) {
#pragma unroll
  for (int j = 0; j < K; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  if (qi < 0) return;
#pragma unroll 2
  for (int r = r0; r < rows; r += step) {
    const float4 x = X4[r * ld4 + qi];
    const float* w = W + r * K;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float wv = w[j];
      acc[j][0] = fmaf(wv, x.x, acc[j][0]);
      acc[j][1] = fmaf(wv, x.y, acc[j][1]);
      acc[j][2] = fmaf(wv, x.z, acc[j][2]);
      acc[j][3] = fmaf(wv, x.w, acc[j][3]);
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Phase times (clock64 cycles added into slots[slot] by the thread it is on for) in builds with
/// -DDFFKIT_SMALL_PROFILE, printed by the fast-path kernels when DFFKIT_CUDA_PROFILE=1
/// (benchmarks/cuda_profile_small.py); nothing in normal builds.
struct SmallPhaseClock {
#if defined(DFFKIT_SMALL_PROFILE) && defined(__CUDA_ARCH__)  // (the host pass sees the no-op)
  double* slots;
  bool on;
  long long last;
  __device__ SmallPhaseClock(double* s, bool o) : slots(s), on(o), last(clock64()) {}
  __device__ void operator()(int slot) {
    if (!on) return;
    const long long now = clock64();
    slots[slot] += double(now - last);
    last = now;
  }
#else
  __device__ SmallPhaseClock(double*, bool) {}
  __device__ void operator()(int) const {}
#endif
};

/// The block's sum of v in a fixed order (each warp's butterfly, then the warps in order), in
/// thread 0 only (a block barrier inside; red: SNW doubles).
__device__ __forceinline__ double small_block_sum0(double v, double* red) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double t = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < SNW; ++w) t += red[w];
  return t;
}

/// G[a K + b] = sum_{c < len} A[a sa + c sc] A[b sa + c sc] in float64, a fixed order: each entry
/// split over GS adjacent lanes, added by an xor butterfly.
template <int K>
__device__ void small_gram(const float* A, int sa, int sc, int len, float* G) {
  constexpr int E = K * K;
  constexpr int GS = E >= SNT ? 1 : pow2_floor(SNT / E < 32 ? SNT / E : 32);
  for (int t0 = 0; t0 < E * GS; t0 += SNT) {
    const int t = t0 + int(threadIdx.x);
    const int e = t / GS, sp = t % GS;
    double s = 0;
    if (e < E) {
      const float* a = A + (e / K) * sa;
      const float* b = A + (e % K) * sa;
      for (int c = sp; c < len; c += GS) s += double(a[c * sc]) * double(b[c * sc]);
    }
#pragma unroll
    for (int o = 1; o < GS; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (sp == 0 && e < E) G[e] = float(s);
  }
}

/// This thread's part of sum (X - W H)^2 over rows r < rows and quads of columns qi < nq, in
/// float64 (X zero-padded past n, H past n and k: the padding adds nothing); W H in float32,
/// summed over j in order.
template <int K>
__device__ __forceinline__ double small_residual_sq(const float4* X4, int ldx4, const float* W,
                                                    const float4* H4, int ldh4, int rows, int nq) {
  double s = 0;
  for (int e = int(threadIdx.x); e < rows * nq; e += SNT) {
    const int r = e / nq, qi = e - r * nq;
    const float4 x = X4[r * ldx4 + qi];
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const float w = W[r * K + j];
      const float4 h = H4[j * ldh4 + qi];
      a0 = fmaf(w, h.x, a0);
      a1 = fmaf(w, h.y, a1);
      a2 = fmaf(w, h.z, a2);
      a3 = fmaf(w, h.w, a3);
    }
    const double d0 = double(x.x) - double(a0), d1 = double(x.y) - double(a1),
                 d2 = double(x.z) - double(a2), d3 = double(x.w) - double(a3);
    s += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
  }
  return s;
}

/// TC: the two products on tensor cores with float32 accuracy (split tf32, mma.sync m16n8k8):
/// N step a warp per (16 rows, chunk of columns), P step a warp per 8 columns at a time.
/// MINB: blocks per SM the registers are budgeted for (2: 128 registers, spills; 1: 255, none;
/// the same arithmetic, so the same bits). The host takes 1 when all of a launch's blocks fit
/// one to an SM (nmf_small.cuh).
template <bool BF16, int K, bool TC = false, int MINB = DFFKIT_SMALL_MINB>
__global__ void __launch_bounds__(SNT, MINB)
    small_kernel(const SmallDesc* descs, KParams q, ResOut* outs, int C) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(DFFKIT_EMULATE)
  using Cfg = SmallCfg<K>;
  constexpr int R = Cfg::R, CPL = Cfg::CPL, NCH = Cfg::NCH, SW4 = Cfg::SW / 4;
  DFFKIT_DYNAMIC_SMEM(smem);
  const int rank = int(cluster_rank(C));
  const SmallDesc d = descs[blockIdx.x / C];
  const i64 m = d.m, n = d.n;
  const int k = d.k;
  const SmallLayout L = small_layout(m, n, K, C, TC);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment coordinates
  const i64 rb = i64(rank) * m / C, re = i64(rank + 1) * m / C;
  const int mr = int(re - rb);
  float* Xs = reinterpret_cast<float*>(smem + L.X);
  float* Hs = reinterpret_cast<float*>(smem + L.H);
  float* Pb = reinterpret_cast<float*>(smem + L.P);
  float* Ps = reinterpret_cast<float*>(smem + L.Ps);
  float* Wo = reinterpret_cast<float*>(smem + L.Wo);
  float* Wn = reinterpret_cast<float*>(smem + L.Wn);
  float* Np = reinterpret_cast<float*>(smem + L.Np);
  float* GH = reinterpret_cast<float*>(smem + L.GH);
  float* GW = reinterpret_cast<float*>(smem + L.GW);
  float* GWb = reinterpret_cast<float*>(smem + L.GWb);
  float* GHp = reinterpret_cast<float*>(smem + L.GHp);
  double* xch = reinterpret_cast<double*>(smem + L.xch);  // read by the peers
  double* red = reinterpret_cast<double*>(smem + L.red);  // this block's own
  const int ldx4 = L.ldx / 4, ldh4 = L.ldh / 4, Q = L.Q;
  const float4* Xs4 = reinterpret_cast<const float4*>(Xs);

  // ---- load: X rows (zero padded), H (zero padded to K rows), W rows, ||X_b||^2
  {
    const float* Xg = d.X + rb * n;
    for (int e = tid; e < L.mbp * L.ldx; e += SNT) {
      const int r = e / L.ldx, c = e - r * L.ldx;
      float x = 0.f;
      if (r < mr && c < n) {
        x = Xg[i64(r) * n + c];
        if constexpr (BF16) x = __bfloat162float(__float2bfloat16_rn(x));
      }
      Xs[e] = x;
    }
    for (int e = tid; e < K * L.ldh; e += SNT) {
      const int j = e / L.ldh, c = e - j * L.ldh;
      Hs[e] = j < k && c < n ? d.H[i64(j) * n + c] : 0.f;
    }
    for (int e = tid; e < K * L.lds; e += SNT) Ps[e] = 0.f;
    for (int e = tid; e < L.mbp * K; e += SNT) {
      const int r = e / K, j = e - r * K;
      Wo[e] = r < mr && j < k ? d.W[(rb + r) * k + j] : 0.f;
      Wn[e] = 0.f;
    }
    __syncthreads();
    // the initial error: this block's share of ||X - W H||^2
    const double s = small_block_sum0(
        small_residual_sq<K>(Xs4, ldx4, Wo, reinterpret_cast<const float4*>(Hs), ldh4, mr, Q), red);
    if (tid == 0) xch[0] = s;
    small_gram<K>(Hs, L.ldh, 1, L.ldh, GH);
    cluster_barrier(C);
    if (tid == 0) red[RG_E0] = std::sqrt(cluster_sum(xch, 0, C));
    for (int e = tid; e < 12; e += SNT) red[RG_PROF + e] = 0;  // phase clock slots
    __syncthreads();
  }
  SmallPhaseClock prof(red + RG_PROF, q.profile && tid == 0);
  prof(8);
  const float l1W = float(q.l1_W), l2W = float(q.l2_W), l1H = float(q.l1_H), l2H = float(q.l2_H),
              muH = float(q.mu);
  const int q0 = rank * Q / C, q1 = (rank + 1) * Q / C;
  const int c0 = 4 * q0, nc = 4 * (q1 - q0), nq = q1 - q0;
  const int WPS = L.S >= SNW ? 1 : SNW / L.S, sstep = SNW / WPS;

  const double err_init = red[RG_E0];
  double err = err_init, prev = err_init;
  int it;
  for (it = 1; it <= q.max_iter; ++it) {
    const bool check = q.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == q.max_iter;
    const bool want_P = q.update_H != 0;

    // ---- A: N = X_b H^T into Np (one partial per column slice)
    if constexpr (TC) {
      // tensor cores: a warp per (16 rows, chunk s of cw columns), K padded to 8 or 16
      constexpr int K8 = (K + 7) / 8;
      const int MTL = (L.mbp + 15) / 16;
      for (int item = warp; item < MTL * L.S; item += SNW) {
        const int s = item % L.S, r0 = (item / L.S) * 16;
        const int l0 = s * L.cw, l1 = l0 + L.cw < L.ldh ? l0 + L.cw : L.ldh;
        const int ra = r0 + gq, rc = ra + 8;
        float dacc[K8][4];
#pragma unroll
        for (int nt = 0; nt < K8; ++nt) dacc[nt][0] = dacc[nt][1] = dacc[nt][2] = dacc[nt][3] = 0.f;
        for (int l = l0; l < l1; l += 8) {
          const int la = l + tq, lb = la + 4;  // rows and columns beyond the staged ones: zero
          std::uint32_t ah[4], al[4];
          tf32_parts<true>(ra < L.mbp && la < l1 ? Xs[ra * L.ldx + la] : 0.f, ah[0], al[0]);
          tf32_parts<true>(rc < L.mbp && la < l1 ? Xs[rc * L.ldx + la] : 0.f, ah[1], al[1]);
          tf32_parts<true>(ra < L.mbp && lb < l1 ? Xs[ra * L.ldx + lb] : 0.f, ah[2], al[2]);
          tf32_parts<true>(rc < L.mbp && lb < l1 ? Xs[rc * L.ldx + lb] : 0.f, ah[3], al[3]);
#pragma unroll
          for (int nt = 0; nt < K8; ++nt) {
            const int j = nt * 8 + gq;
            std::uint32_t bh[2], bl[2];
            tf32_parts<true>(j < K && la < l1 ? Hs[j * L.ldh + la] : 0.f, bh[0], bl[0]);
            tf32_parts<true>(j < K && lb < l1 ? Hs[j * L.ldh + lb] : 0.f, bh[1], bl[1]);
            mma_tf32x3(dacc[nt], ah, al, bh, bl);
          }
        }
#pragma unroll
        for (int nt = 0; nt < K8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = r0 + gq + (e >> 1) * 8, j = nt * 8 + 2 * tq + (e & 1);
            if (r < L.mbp && j < K) Np[(s * L.mbp + r) * K + j] = dacc[nt][e];
          }
      }
    } else
    for (int s = warp / WPS; s < L.S; s += sstep) {
      float h[K][CPL];
#pragma unroll
      for (int j = 0; j < K; ++j)
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch) {
          const int qq = s * SW4 + lane + 32 * ch;
          const float4 v = qq < Q ? reinterpret_cast<const float4*>(Hs)[j * ldh4 + qq]
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
          h[j][4 * ch] = v.x; h[j][4 * ch + 1] = v.y; h[j][4 * ch + 2] = v.z; h[j][4 * ch + 3] = v.w;
        }
      for (int g = warp % WPS; g < L.G; g += WPS) {
        float acc[32];
#pragma unroll
        for (int t = 0; t < 32; ++t) acc[t] = 0.f;
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch) {
          const int qq = s * SW4 + lane + 32 * ch;
          const bool ok = qq < Q;
#pragma unroll
          for (int i = 0; i < R; ++i) {
            const float4 x = ok ? Xs4[(g * R + i) * ldx4 + qq] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < K; ++j) {
              float a = acc[i * K + j];
              a = fmaf(x.x, h[j][4 * ch], a);
              a = fmaf(x.y, h[j][4 * ch + 1], a);
              a = fmaf(x.z, h[j][4 * ch + 2], a);
              a = fmaf(x.w, h[j][4 * ch + 3], a);
              acc[i * K + j] = a;
            }
          }
        }
        const float v = reduce_scatter32(acc, lane);
        if (lane < R * K) Np[(s * L.mbp + g * R) * K + lane] = v;
      }
    }
    __syncthreads();
    prof(0);

    // ---- B: W update (Wo -> Wn)
    for (int e = tid; e < L.mbp * K; e += SNT) {
      const int r = e / K, j = e - r * K;
      float w = 0.f;
      if (r < mr && j < k) {
        float num = 0.f;
        for (int s = 0; s < L.S; ++s) num += Np[(s * L.mbp + r) * K + j];
        float base = 0.f;
#pragma unroll
        for (int c = 0; c < K; ++c) base += Wo[r * K + c] * GH[c * K + j];
        w = mu_step(Wo[e], num, base, l1W, l2W, 0.f);
      }
      Wn[e] = w;
    }
    __syncthreads();
    prof(1);

    // ---- C: P_b = Wn^T X_b, G_b = Wn^T Wn
    if constexpr (TC) {
      // tensor cores: the K rows of P as one 16-row tile, a warp takes up to PU column tiles of
      // 8 at a time (tiles w, w + 8, ...), the reduction over the rows in steps of 8, in order
      constexpr int PU = 4;  // column tiles a warp holds at a time
      const int NT8 = want_P ? (L.ldh + 7) / 8 : 0;
      for (int t0 = warp; t0 < NT8; t0 += PU * SNW) {
        float dacc[PU][4];
#pragma unroll
        for (int u = 0; u < PU; ++u) dacc[u][0] = dacc[u][1] = dacc[u][2] = dacc[u][3] = 0.f;
        for (int i0 = 0; i0 < L.mbp; i0 += 8) {
          const int ia = i0 + tq, ib = ia + 4;  // rows beyond the staged ones: zero
          std::uint32_t ah[4], al[4];
          tf32_parts<true>(gq < K && ia < L.mbp ? Wn[ia * K + gq] : 0.f, ah[0], al[0]);
          tf32_parts<true>(gq + 8 < K && ia < L.mbp ? Wn[ia * K + gq + 8] : 0.f, ah[1], al[1]);
          tf32_parts<true>(gq < K && ib < L.mbp ? Wn[ib * K + gq] : 0.f, ah[2], al[2]);
          tf32_parts<true>(gq + 8 < K && ib < L.mbp ? Wn[ib * K + gq + 8] : 0.f, ah[3], al[3]);
#pragma unroll
          for (int u = 0; u < PU; ++u) {
            const int c = (t0 + u * SNW) * 8 + gq;
            std::uint32_t bh[2], bl[2];
            tf32_parts<true>(c < L.ldh && ia < L.mbp ? Xs[ia * L.ldx + c] : 0.f, bh[0], bl[0]);
            tf32_parts<true>(c < L.ldh && ib < L.mbp ? Xs[ib * L.ldx + c] : 0.f, bh[1], bl[1]);
            mma_tf32x3(dacc[u], ah, al, bh, bl);
          }
        }
#pragma unroll
        for (int u = 0; u < PU; ++u)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = gq + (e >> 1) * 8, c = (t0 + u * SNW) * 8 + 2 * tq + (e & 1);
            if (j < K && c < L.ldh) Pb[j * L.ldh + c] = dacc[u][e];
          }
      }
    } else if (want_P) {
      const int RS = L.rsplit;
      for (int t0 = 0; t0 < Q * RS; t0 += SNT) {
        const int t = t0 + tid, qi = t / RS, rs = t % RS;
        float acc[K][4];
        small_wtx_quad<K>(Xs4, ldx4, Wn, qi < Q ? qi : -1, rs, mr, RS, acc);
        for (int o = 1; o < RS; o <<= 1)
#pragma unroll
          for (int j = 0; j < K; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[j][c] += __shfl_xor_sync(0xffffffffu, acc[j][c], o);
        if (rs == 0 && qi < Q)
#pragma unroll
          for (int j = 0; j < K; ++j)
            reinterpret_cast<float4*>(Pb)[j * ldh4 + qi] =
                make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
      }
    }
    small_gram<K>(Wn, 1, K, mr, GWb);
    prof(2);
    cluster_barrier(C);
    prof(3);

    // ---- D: this block's columns of H (with H fixed: nothing)
    if (q.update_H) {
      for (int e = tid; e < k * nc; e += SNT) {
        const int j = e / nc, cc = e - j * nc;
        Ps[j * L.lds + cc] = cluster_sum(Pb, j * L.ldh + c0 + cc, C);
      }
      for (int e = tid; e < K * K; e += SNT) GW[e] = cluster_sum(GWb, e, C);
      __syncthreads();
      prof(4);
      for (int e = tid; e < k * nc; e += SNT) {
        const int j = e / nc, cc = e - j * nc, c = c0 + cc;
        const float hv = Hs[j * L.ldh + c], num = Ps[j * L.lds + cc];
        float den = 0.f;
#pragma unroll
        for (int i = 0; i < K; ++i) den += GW[j * K + i] * Hs[i * L.ldh + c];
        Ps[j * L.lds + cc] = mu_step(hv, num, den, l1H, l2H, muH > 0.f ? muH * hv : 0.f);
      }
      __syncthreads();
      prof(5);
      for (int e = tid; e < k * nq; e += SNT) {
        const int j = e / nq, qq = e - j * nq;
        const float4 v = reinterpret_cast<const float4*>(Ps)[j * (L.lds / 4) + qq];
#pragma unroll
        for (int r = 0; r < 8; ++r)
          if (r < C) reinterpret_cast<float4*>(cluster_peer(Hs, r, C))[j * ldh4 + q0 + qq] = v;
      }
      small_gram<K>(Ps, L.lds, 1, nc, GHp);
    }
    cluster_barrier(C);
    prof(6);

    // ---- E: G_H, the error, the stopping rule
    if (q.update_H)
      for (int e = tid; e < K * K; e += SNT) GH[e] = cluster_sum(GHp, e, C);
    if (need_err) {
      // the new W_b and all of the new H (D wrote every block's copy) are here
      const double s = small_block_sum0(
          small_residual_sq<K>(Xs4, ldx4, Wn, reinterpret_cast<const float4*>(Hs), ldh4, mr, Q), red);
      if (tid == 0) xch[1] = s;
      cluster_barrier(C);
      if (tid == 0) red[RG_ERR] = std::sqrt(cluster_sum(xch, 1, C));
    }
    __syncthreads();
    prof(7);
    if (need_err) err = red[RG_ERR];
    float* t = Wo; Wo = Wn; Wn = t;
    if (check) {
      if ((prev - err) / err_init < q.tol) break;
      prev = err;
    }
  }
  const int n_iter = it < q.max_iter ? it : q.max_iter;
  for (int e = tid; e < mr * k; e += SNT) {
    const int r = e / k, j = e - r * k;
    d.W[(rb + r) * k + j] = Wo[r * K + j];
  }
  if (rank == 0) {
    for (i64 e = tid; e < i64(k) * n; e += SNT) {
      const i64 j = e / n, c = e - j * n;
      d.H[e] = Hs[j * L.ldh + c];
    }
    if (tid == 0) outs[blockIdx.x / C] = ResOut{n_iter, err_init, err};
  }
  prof(9);
#ifdef DFFKIT_SMALL_PROFILE
  if (q.profile && tid == 0 && blockIdx.x == 0)
    printf("dffkit small_kernel K=%d C=%d m=%lld n=%lld it=%d cycles: load %.0f | per iteration: "
           "A(N) %.0f B(W) %.0f C(P+G) %.0f sync1 %.0f D1(sum) %.0f D2(H) %.0f D3+sync2 %.0f "
           "E(GH,err) %.0f | store %.0f\n", K, C, (long long)m, (long long)n, n_iter, red[RG_PROF + 8],
           red[RG_PROF] / n_iter, red[RG_PROF + 1] / n_iter, red[RG_PROF + 2] / n_iter, red[RG_PROF + 3] / n_iter,
           red[RG_PROF + 4] / n_iter, red[RG_PROF + 5] / n_iter, red[RG_PROF + 6] / n_iter, red[RG_PROF + 7] / n_iter, red[RG_PROF + 9]);
#endif
  cluster_barrier(C);  // no block leaves while a peer may still read its shared memory
#else
  (void)descs; (void)q; (void)outs; (void)C;
#endif
}

}  // namespace cuda_detail
}  // namespace dffkit
