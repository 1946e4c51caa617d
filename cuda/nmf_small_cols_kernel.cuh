#pragma once
// The fast path's column-split kernel (session 8; the default since session 15, after its first
// timing on the H200; DFFKIT_CUDA_SMALL_COLS=0 turns it off): the same problems as small_kernel (float32 Frobenius, k <= 16, sm_90) with a problem's
// COLUMNS split over a cluster of C blocks instead of its rows, so that an iteration needs one
// cluster barrier instead of two.
//
// Block `rank` owns the columns [4 q0, 4 q1) of X and H (quads q0..q1 of the rounded-up width)
// and keeps, replicated on every block, all of W (old and new), G_H = H H^T and G_W = W^T W.
// Per iteration t (exchange buffer E[t mod 2], written by this block, read by its peers):
//   1  N_b = X_b H_b^T (m x K, this block's share of X H^T) into E[t].N; a thread per row (or
//      1-8 lanes per row for short problems), four independent accumulators per product;
//   -- cluster barrier (the only one) --
//   2  G_H = the C blocks' shares of H H^T (written at the end of iteration t - 1) in rank
//      order; the error of iteration t - 1 (the C blocks' sums of (X_b - W H_b)^2 in rank order)
//      and the stopping rule (every block the same sums in the same order, so all stop
//      together, before anything of iteration t is written);
//      N = the C shares of X H^T in rank order, W <- mu_step(W, N, W G_H): every block computes
//      all of W, identically;
//   3  G_W = W^T W (float64 sums), P_b = W^T X_b (a thread per quad of columns and slice of rows;
//      the slices added in order), H_b <- mu_step(H_b, P_b, G_W H_b) into the other H buffer,
//      this block's share of H H^T and, where the error is wanted, its sum of (X_b - W H_b)^2
//      (float64, from X in shared memory) into E[t + 1].
// E[t] is written in step 1 of iteration t and step 3 of iteration t - 1, and read by the peers
// in step 2 of iteration t: a block writes it again (steps 3 of t + 1, 1 of t + 2) only after the
// barrier of iteration t + 1, which every peer reaches after its reads of iteration t, so two
// buffers and one barrier suffice. The error of iteration t is known in step 2 of t + 1 (after
// the last iteration: one more barrier); a stop there leaves W and H at iteration t.
//
// The row-split kernel (nmf_small_kernel.cuh) adds the C blocks' P over k x n entries, sends H
// back to every block and waits twice; this one adds m x K + K x K entries per block (every block
// all of them) and waits once. Counted for one image (196 x 512, k = 5, C = 8), per block and
// iteration: 62,720 FMAs per product as before, at ~1.3 issued instructions per FMA (the
// row-split kernel: ~4) but bound by shared memory (~1,900 cycles for the two products: X
// loads and H broadcasts, cuda/NOTES.md); 8,040 distributed-shared-memory loads (the row split:
// 2,560) and one barrier (the row split's first barrier took 1,340 cycles and its H broadcast,
// G_H share and second barrier 2,950 of its 17,800 per iteration in session 3's phase clock).
// To be timed (`cuda_bench.py --ab`, rows "cols"; phase clocks with -DDFFKIT_SMALL_PROFILE).
// Run 6's phase clock put step 2's W update (its C m K peer loads, a float each) at 4,390 of
// 13,600 cycles per iteration, ~1,100 per round of loads at C = 8 (twice that at C = 16: two
// rounds per element). DFFKIT_CUDA_SMALL_COLS_VEC=1 (session 19, not yet timed) reads those
// shares four floats a request (for one image one round of eight float4 loads per thread
// instead of four rounds of eight floats), the first round issued before G_H's sums and the
// stopping test; each element is still added over the blocks in rank order (the same bits).
// DFFKIT_CUDA_SMALL_COLS_PUSH=1 (session 19, not yet timed) turns the exchange around: step 1
// stores the block's share into R[s][rank] of every block (C K remote stores a row, not waited
// for: the barrier's release orders them), step 2 adds R[s][0..C) from the block's own shared
// memory, in rank order (the same bits). R is 2 C m K floats (one image at C = 8: 62.7 KB), so
// a block no longer fits two to an SM: the host sets it per launch where the layout fits.
//
// Compiles under nvcc and under the CPU emulator (tests/test_cuda_emu.py runs it).
#include <cmath>

#include "mu_update.hpp"
#include "nmf_device_common.cuh"
#include "nmf_small_kernel.cuh"

namespace dffkit {
namespace cuda_detail {

DFFKIT_HD constexpr int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

constexpr int SC_MAX_C = 16;  // blocks per problem (16: a non-portable cluster size, sm_90)

struct SmallColsLayout {
  int Q;      // quads of columns of the problem
  int nqb;    // quads per block (the widest block)
  int ldh;    // floats per row of the H buffers (4 nqb)
  int nch;    // lanes per row in the N step (a power of two, <= 8)
  int ldx;    // floats per row of X (>= ldh; rows read together start on different banks)
  int nqp;    // lanes per row slice in the P step (nqb rounded up to a power of two)
  int slots;  // P partials added in order (warps, or row slices when nqp > 32)
  std::size_t X, H0, H1, Wo, Wn, E, ebytes, eN, eGH, Pw, GH, GW, red, R, used;
};

/// Shared-memory layout of one block of the column-split kernel (host and device alike). push
/// (DFFKIT_CUDA_SMALL_COLS_PUSH): room R for the C blocks' shares of X H^T, twice (2 C m K floats).
DFFKIT_HD SmallColsLayout small_cols_layout(i64 m, i64 n, int K, int C, bool push = false) {
  SmallColsLayout L{};
  L.Q = int((n + 3) / 4);
  L.nqb = (L.Q + C - 1) / C;
  L.ldh = 4 * L.nqb;
  int nch = 1;
  while (nch < 8 && m * (nch * 2) <= SNT && nch * 2 <= L.nqb) nch *= 2;
  L.nch = nch;
  // the N step's LDS.128 phases read 8 / nch rows x nch neighbouring quads: rows 4 nch words
  // apart modulo 32 banks keep them conflict-free
  const int want = (4 * nch) % 32;
  L.ldx = L.ldh;
  while (L.ldx % 32 != want) L.ldx += 4;
  L.nqp = pow2_ceil(L.nqb);
  L.slots = L.nqp <= 32 ? SNW : SNT / L.nqp;
  std::size_t o = 0;
  auto put = [&](std::size_t bytes) { const std::size_t at = o; o = (o + bytes + 15) & ~std::size_t(15); return at; };
  const std::size_t f = sizeof(float);
  L.X = put(std::size_t(m) * L.ldx * f);
  L.H0 = put(std::size_t(K) * L.ldh * f);
  L.H1 = put(std::size_t(K) * L.ldh * f);
  L.Wo = put(std::size_t(m) * K * f);
  L.Wn = put(std::size_t(m) * K * f);
  // an exchange buffer: 4 doubles (0: the initial error's share, 1: the error's share), the
  // share of H H^T, of X H^T
  L.eGH = 4 * sizeof(double);
  L.eN = (L.eGH + std::size_t(K) * K * f + 15) & ~std::size_t(15);
  L.ebytes = (L.eN + std::size_t(m) * K * f + 15) & ~std::size_t(15);
  L.E = put(2 * L.ebytes);
  L.Pw = put(std::size_t(L.slots) * K * L.ldh * f);
  L.GH = put(std::size_t(K) * K * f);
  L.GW = put(std::size_t(K) * K * f);
  L.red = put(RG_SIZE * sizeof(double));
  L.R = push ? put(2 * std::size_t(C) * std::size_t(m) * K * f) : 0;
  L.used = o;
  return L;
}

/// Sum over the cluster's blocks, in rank order, of peer(p)[e] (up to 16 blocks: the loads of
/// eight issued together).
template <class U>
__device__ __forceinline__ U cluster_sum16(U* p, int e, int C) {
  if (C <= 8) return cluster_sum(p, e, C);
  U v = cluster_sum(p, e, 8);
  U t[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) t[r] = 8 + r < C ? cluster_peer(p, 8 + r, C)[e] : U(0);
#pragma unroll
  for (int r = 0; r < 8; ++r)
    if (8 + r < C) v += t[r];
  return v;
}

/// The C shares of four consecutive floats (p4[f] on every block), each component added over
/// the blocks in rank order as cluster_sum16 adds one float: the same bits, a quarter of the
/// distributed-shared-memory requests. t holds the first (up to) eight blocks' loads, issued
/// earlier by cluster_load4 so that they travel while the thread does other work.
struct ClusterLoads4 {
  float4 t[8];
};

__device__ __forceinline__ void cluster_load4(const float4* p4, int f, int C, ClusterLoads4& l) {
#pragma unroll
  for (int r = 0; r < 8; ++r)
    l.t[r] = r < C ? cluster_peer(const_cast<float4*>(p4), r, C)[f] : make_float4(0.f, 0.f, 0.f, 0.f);
}

__device__ __forceinline__ float4 cluster_finish4(const float4* p4, int f, int C, const ClusterLoads4& l) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int r = 0; r < 8; ++r)
    if (r < C) {
      v.x += l.t[r].x;
      v.y += l.t[r].y;
      v.z += l.t[r].z;
      v.w += l.t[r].w;
    }
  if (C > 8) {
    ClusterLoads4 u;
#pragma unroll
    for (int r = 0; r < 8; ++r)
      u.t[r] = 8 + r < C ? cluster_peer(const_cast<float4*>(p4), 8 + r, C)[f] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int r = 0; r < 8; ++r)
      if (8 + r < C) {
        v.x += u.t[r].x;
        v.y += u.t[r].y;
        v.z += u.t[r].z;
        v.w += u.t[r].w;
      }
  }
  return v;
}

/// One problem per cluster of C blocks (SNT threads each), columns split over the blocks.
template <bool BF16, int K, int MINB = DFFKIT_SMALL_MINB>
__global__ void __launch_bounds__(SNT, MINB)
    small_cols_kernel(const SmallDesc* descs, KParams q, ResOut* outs, int C) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(DFFKIT_EMULATE)
  DFFKIT_DYNAMIC_SMEM(smem);
  const int rank = int(cluster_rank(C));
  const SmallDesc d = descs[blockIdx.x / C];
  const i64 m = d.m, n = d.n;
  const int k = d.k, mi = int(m);
  // DFFKIT_CUDA_SMALL_COLS_PUSH (set by the host only where the larger layout fits): step 1
  // stores this block's share of X H^T into every block's R[s][rank] (remote stores, which the
  // thread does not wait for), step 2 adds the C shares from its own shared memory
  const bool push = q.small_cols_push != 0;
  const SmallColsLayout L = small_cols_layout(m, n, K, C, push);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int q0 = rank * L.Q / C, q1 = (rank + 1) * L.Q / C, nq = q1 - q0;
  const i64 c0 = 4 * i64(q0);
  const int ncv = int((n - c0) < 4 * nq ? n - c0 : 4 * nq);  // this block's real columns
  const int ldx4 = L.ldx / 4, ldh4 = L.ldh / 4;
  float* Xs = reinterpret_cast<float*>(smem + L.X);
  float* Hc = reinterpret_cast<float*>(smem + L.H0);  // H_b now
  float* Hx = reinterpret_cast<float*>(smem + L.H1);  // H_b next
  float* Wo = reinterpret_cast<float*>(smem + L.Wo);
  float* Wn = reinterpret_cast<float*>(smem + L.Wn);
  unsigned char* E = smem + L.E;
  float* Pw = reinterpret_cast<float*>(smem + L.Pw);
  float* GH = reinterpret_cast<float*>(smem + L.GH);
  float* GW = reinterpret_cast<float*>(smem + L.GW);
  double* red = reinterpret_cast<double*>(smem + L.red);
  auto e_dbl = [&](int s) { return reinterpret_cast<double*>(E + s * L.ebytes); };
  auto e_GH = [&](int s) { return reinterpret_cast<float*>(E + s * L.ebytes + L.eGH); };
  auto e_N = [&](int s) { return reinterpret_cast<float*>(E + s * L.ebytes + L.eN); };
  const float4* Xs4 = reinterpret_cast<const float4*>(Xs);

  // ---- load: this block's columns of X and H (zero padded), all of W, ||X_b||^2, G_H share
  {
    for (int e = tid; e < mi * L.ldx; e += SNT) {
      const int r = e / L.ldx, c = e - r * L.ldx;
      float x = 0.f;
      if (c < ncv) {
        x = d.X[i64(r) * n + c0 + c];
        if constexpr (BF16) x = __bfloat162float(__float2bfloat16_rn(x));
      }
      Xs[e] = x;
    }
    for (int e = tid; e < K * L.ldh; e += SNT) {
      const int j = e / L.ldh, c = e - j * L.ldh;
      Hc[e] = j < k && c < ncv ? d.H[i64(j) * n + c0 + c] : 0.f;
      Hx[e] = 0.f;
    }
    for (int e = tid; e < mi * K; e += SNT) {
      const int r = e / K, j = e - r * K;
      Wo[e] = j < k ? d.W[i64(r) * k + j] : 0.f;
      Wn[e] = 0.f;
    }
    __syncthreads();
    // the initial error: this block's share of ||X - W H||^2
    const double s = small_block_sum0(
        small_residual_sq<K>(Xs4, ldx4, Wo, reinterpret_cast<const float4*>(Hc), ldh4, mi, nq), red);
    if (tid == 0) e_dbl(1)[0] = s;
    // iteration 1 reads E[1]; with H fixed every iteration reads this share (else iteration 1
    // writes E[0]'s before iteration 2 reads it)
    small_gram<K>(Hc, L.ldh, 1, L.ldh, e_GH(1));
    if (!q.update_H) small_gram<K>(Hc, L.ldh, 1, L.ldh, e_GH(0));
    for (int e = tid; e < 12; e += SNT) red[RG_PROF + e] = 0;  // phase clock slots
    __syncthreads();
  }
  // push: the first iteration stores into the peers' shared memory before any cluster barrier
  // of the loop; a block may touch a peer's shared memory only once the peer is known to be
  // running (CUDA programming guide, distributed shared memory), so one barrier here
  if (push) cluster_barrier(C);
  SmallPhaseClock prof(red + RG_PROF, q.profile && tid == 0);
  prof(8);
  const float l1W = float(q.l1_W), l2W = float(q.l2_W), l1H = float(q.l1_H), l2H = float(q.l2_H),
              muH = float(q.mu);
  const int NCH = L.nch, RPP = SNT / NCH;  // N step: lanes per row, rows per pass
  const int ch = tid % NCH, rrow = tid / NCH;
  const int NQP = L.nqp, RS = SNT / NQP;   // P step: lanes per slice, row slices
  const int pq = tid % NQP, prs = tid / NQP;
  // DFFKIT_CUDA_SMALL_COLS_GATHER: block r updates the rows [row_begin(r), row_begin(r + 1)) of W
  const bool gather = q.small_cols_gather != 0 && C > 1;
  const bool vec = q.small_cols_vec != 0 && !gather && !push;
  float* R = reinterpret_cast<float*>(smem + L.R);  // push: R[(s C + rank) m K + e]
  auto row_begin = [&](int r) { return int(i64(r) * m / C); };

  double err_init = 0, err = 0, prev = 0;
  int it, n_iter = q.max_iter;
  bool stopped = false;
  for (it = 1; it <= q.max_iter + 1; ++it) {
    const int s = it & 1;
    const bool last_pass = it == q.max_iter + 1;  // only the error of the last iteration is left
    // the error of iteration it - 1 is wanted (its stopping test, or the final error)
    const bool prev_check = it > 1 && q.tol > 0 && (it - 1) % 10 == 0;
    const bool prev_err = prev_check || last_pass;

    // ---- 1: N_b = X_b H_b^T into E[s].N
    if (!last_pass) {
      float* Nout = e_N(s);
      for (int r0 = 0; r0 < mi; r0 += RPP) {
        const int r = r0 + rrow;
        float acc[4][K];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int j = 0; j < K; ++j) acc[u][j] = 0.f;
        if (r < mi) {
          for (int qq = ch; qq < nq; qq += NCH) {
            const float4 x = Xs4[r * ldx4 + qq];
#pragma unroll
            for (int j = 0; j < K; ++j) {
              const float4 h = reinterpret_cast<const float4*>(Hc)[j * ldh4 + qq];
              acc[0][j] = fmaf(x.x, h.x, acc[0][j]);
              acc[1][j] = fmaf(x.y, h.y, acc[1][j]);
              acc[2][j] = fmaf(x.z, h.z, acc[2][j]);
              acc[3][j] = fmaf(x.w, h.w, acc[3][j]);
            }
          }
        }
        float v[K];
#pragma unroll
        for (int j = 0; j < K; ++j) v[j] = (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
        for (int o = 1; o < NCH; o <<= 1)
#pragma unroll
          for (int j = 0; j < K; ++j) v[j] += __shfl_xor_sync(0xffffffffu, v[j], o);
        if (ch == 0 && r < mi) {
          if (push) {
            for (int p = 0; p < C; ++p) {
              float* dst = cluster_peer(R + (std::size_t(s) * C + rank) * (mi * K), p, C);
#pragma unroll
              for (int j = 0; j < K; ++j) dst[r * K + j] = v[j];
            }
          } else {
#pragma unroll
            for (int j = 0; j < K; ++j) Nout[r * K + j] = v[j];
          }
        }
      }
    }
    prof(0);
    cluster_barrier(C);
    prof(1);

    // ---- 2: G_H and the error of iteration it - 1, the stopping rule; the W update
    // DFFKIT_CUDA_SMALL_COLS_VEC: the shares of X H^T read four floats a request, the first of
    // them issued here, before G_H's sums and the stopping test (same bits)
    const int mK = mi * K, nf4 = vec ? mK / 4 : 0;
    const float4* Ns4 = reinterpret_cast<const float4*>(e_N(s));
    ClusterLoads4 pre;
    if (vec && !last_pass && tid < nf4) cluster_load4(Ns4, tid, C, pre);
    float* GHs = e_GH(s);
    for (int e = tid; e < K * K; e += SNT) GH[e] = cluster_sum16(GHs, e, C);
    if (it == 1 && tid == 0) red[RG_E0] = std::sqrt(cluster_sum16(e_dbl(s), 0, C));
    // (it == 1 and prev_err: max_iter = 0, the error is the initial one)
    if (prev_err && it > 1 && tid == SNT - 1) red[RG_ERR] = std::sqrt(cluster_sum16(e_dbl(s), 1, C));
    __syncthreads();
    if (it == 1) prev = err_init = err = red[RG_E0];
    if (prev_err && it > 1) {
      err = red[RG_ERR];
      if (prev_check) {
        if ((prev - err) / err_init < q.tol) {
          n_iter = it - 1;
          stopped = true;
        }
        prev = err;
      }
    }
    prof(2);
    if (stopped || last_pass) break;
    {
      float* Ns = e_N(s);
      // W[e] from N[e] (its C shares added in rank order): the multiplicative step
      auto w_update = [&](int e, float num) {
        const int r = e / K, j = e - r * K;
        float base = 0.f;
#pragma unroll
        for (int c = 0; c < K; ++c) base += Wo[r * K + c] * GH[c * K + j];
        Wn[e] = j < k ? mu_step(Wo[e], num, base, l1W, l2W, 0.f) : 0.f;
      };
      // vec: four elements a thread at a time (the first loaded above), then the tail
      for (int f = tid; f < nf4; f += SNT) {
        if (f != tid) cluster_load4(Ns4, f, C, pre);
        const float4 v = cluster_finish4(Ns4, f, C, pre);
        w_update(4 * f, v.x);
        w_update(4 * f + 1, v.y);
        w_update(4 * f + 2, v.z);
        w_update(4 * f + 3, v.w);
      }
      // every row of W (or, gathering, this block's slice of them): N from the C shares in
      // rank order, then the multiplicative step
      const int eb = gather ? row_begin(rank) * K : 4 * nf4, ee = gather ? row_begin(rank + 1) * K : mK;
      if (push) {
        // the C shares in this block's own memory, added in rank order as cluster_sum16 does
        const float* Rs = R + std::size_t(s) * C * mK;
        for (int e = tid; e < mK; e += SNT) {
          float v = 0.f;
          for (int p = 0; p < C; ++p) v += Rs[p * mK + e];
          w_update(e, v);
        }
      } else {
        for (int e = eb + tid; e < ee; e += SNT) w_update(e, cluster_sum16(Ns, e, C));
      }
      if (gather) {
        // every slice is written; the other rows from their owners' Wn (an owner writes that
        // buffer again two iterations on, after two barriers this block reaches only after
        // these reads)
        cluster_barrier(C);
        int owner = 0;
        for (int e = tid; e < mi * K; e += SNT) {
          const int r = e / K;
          while (owner > 0 && row_begin(owner) > r) --owner;
          while (owner + 1 < C && row_begin(owner + 1) <= r) ++owner;
          if (owner != rank) Wn[e] = cluster_peer(Wn, owner, C)[e];
        }
      }
      __syncthreads();
    }

    prof(3);

    // ---- 3: G_W, P_b = W^T X_b, the H update, the shares of H H^T and <P, H> into E[s ^ 1]
    const bool need_err = (q.tol > 0 && it % 10 == 0) || it == q.max_iter;
    const bool want_P = q.update_H != 0;
    if (want_P) {
      small_gram<K>(Wn, 1, K, mi, GW);
      float acc[K][4];
      small_wtx_quad<K>(Xs4, ldx4, Wn, pq < nq ? pq : -1, prs, mi, RS, acc);
      // the row slices within a warp (lanes NQP apart), then one partial per slot
      for (int o = NQP; o < 32; o <<= 1)
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[j][c] += __shfl_xor_sync(0xffffffffu, acc[j][c], o);
      const int slot = NQP <= 32 ? warp : prs;
      if ((NQP > 32 || lane < NQP) && pq < nq)
#pragma unroll
        for (int j = 0; j < K; ++j)
          reinterpret_cast<float4*>(Pw)[(slot * K + j) * ldh4 + pq] =
              make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    }
    __syncthreads();
    prof(4);
    if (want_P) {
      const int ncw = 4 * nq;
      for (int e = tid; e < k * ncw; e += SNT) {
        const int j = e / ncw, c = e - j * ncw;
        float num = 0.f;
        for (int sl = 0; sl < L.slots; ++sl) num += Pw[(sl * K + j) * L.ldh + c];
        const float hv = Hc[j * L.ldh + c];
        float v = hv;
        if (q.update_H && c < ncv) {
          float den = 0.f;
#pragma unroll
          for (int i = 0; i < K; ++i) den += GW[j * K + i] * Hc[i * L.ldh + c];
          v = mu_step(hv, num, den, l1H, l2H, muH > 0.f ? muH * hv : 0.f);
        }
        if (q.update_H) Hx[j * L.ldh + c] = v;
      }
    }
    __syncthreads();
    if (q.update_H) {
      float* t = Hc; Hc = Hx; Hx = t;
      small_gram<K>(Hc, L.ldh, 1, L.ldh, e_GH(s ^ 1));
    }
    if (need_err) {
      // the new W (all of it) and this block's columns of the new H are here
      const double t = small_block_sum0(
          small_residual_sq<K>(Xs4, ldx4, Wn, reinterpret_cast<const float4*>(Hc), ldh4, mi, nq), red);
      if (tid == 0) e_dbl(s ^ 1)[1] = t;
    }
    float* t = Wo; Wo = Wn; Wn = t;
    __syncthreads();
    prof(5);
  }
  // W: every block holds all of it; each writes its share of the rows. H: its columns.
  {
    const i64 rb = i64(rank) * m / C, re = i64(rank + 1) * m / C;
    for (i64 e = rb * k + tid; e < re * k; e += SNT) {
      const i64 r = e / k, j = e - r * k;
      d.W[e] = Wo[r * K + j];
    }
    for (int e = tid; e < k * ncv; e += SNT) {
      const int j = e / ncv, c = e - j * ncv;
      d.H[i64(j) * n + c0 + c] = Hc[j * L.ldh + c];
    }
    if (rank == 0 && tid == 0) outs[blockIdx.x / C] = ResOut{n_iter, err_init, err};
  }
  prof(9);
#ifdef DFFKIT_SMALL_PROFILE
  if (q.profile && tid == 0 && blockIdx.x == 0) {
    const double it_n = n_iter > 0 ? n_iter : 1;
    printf("dffkit small_cols_kernel K=%d C=%d m=%lld n=%lld it=%d cycles: load %.0f | per iteration: "
           "1(N) %.0f barrier %.0f 2a(GH,err) %.0f 2b(W) %.0f 3a(GW,P) %.0f 3b(H,shares) %.0f | "
           "store %.0f\n", K, C, (long long)m, (long long)n, n_iter, red[RG_PROF + 8],
           red[RG_PROF] / it_n, red[RG_PROF + 1] / it_n, red[RG_PROF + 2] / it_n,
           red[RG_PROF + 3] / it_n, red[RG_PROF + 4] / it_n, red[RG_PROF + 5] / it_n,
           red[RG_PROF + 9]);
  }
#endif
  cluster_barrier(C);  // no block leaves while a peer may still read its shared memory
#else
  (void)descs; (void)q; (void)outs; (void)C;
#endif
}

}  // namespace cuda_detail
}  // namespace dffkit
