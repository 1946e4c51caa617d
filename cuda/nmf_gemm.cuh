#pragma once
// The gemm engine's kernels: Frobenius loss, k <= 64, any m and n. Per iteration the two
// products with X run as register-tiled matrix products (each thread an 8 x 4 or 8 x 8 block of
// outputs, operands staged through shared memory in steps of 16 along the reduction, the next
// step's global loads in flight while the current one is multiplied):
//
//   gemm_n_kernel     N = X H^T for BM rows of X and all k columns, then, in the epilogue, the
//                     W update of those rows: W <- mu_step(W, N, W G_H, penalties, group term)
//                     (first iteration: <N, W_old> and <W_old G_H, W_old> for the initial error)
//   gemm_p_kernel     P_s = W^T X over slice s of the rows, for BN columns: S partials
//   gemm_gram_kernel  G_s = W^T W over slice s of the rows
//
// MODE selects how the two products multiply:
//   0  CUDA cores, in T (float32, or float64 for float64 data);
//   1  tensor cores, tf32 (precision "tf32"): mma.sync m16n8k8 with float32 accumulation,
//      operands rounded to tf32 once, when they are staged;
//   2  tensor cores, split tf32 ("3xTF32", float32 accuracy): each operand v = hi + lo with hi
//      = tf32(v) and lo = tf32(v - hi), and a b = a_lo b_hi + a_hi b_lo + a_hi b_hi (the
//      dropped a_lo b_lo is below 2^-22 of a b), three mma per product.
// On tensor cores each warp takes a 32 x 32, 64 x 16 or 32 x 64 block of outputs; the W
// update is the same float32 code for every MODE (N passes through shared memory).
//
// The partials are added afterwards in a fixed order (reduce_partials_kernel), so results depend
// on the shape only. Each output is a sum in ascending order of its reduction index (float32 in
// the products, float64 in the Gram matrix). X may be float, double or bfloat16 (converted to T
// when it is staged). The sweep engine's single pass keeps a row tile of X on chip, which stops
// working once a row (n floats) no longer fits; these kernels read X twice per iteration, at
// arithmetic intensity that does not depend on n.
//
// This file compiles under nvcc and under the CPU emulator (cuda/emu/cuda_emu.hpp), which the
// tests use to check these kernels on machines without a GPU.
#include <limits>
#include <type_traits>

#include "mu_update.hpp"
#include "nmf_device_common.cuh"

namespace dffkit {
namespace cuda_detail {

constexpr int GBK = 16;  // reduction step of both products

// Blocks per SM the two products' register budget is cut for (a build-time experiment, default
// 1): on the H200 both kernels ran one block of 8 warps per SM (129-180 registers), latency-bound
// (session 6, ncu: no eligible warp in over half the cycles); 2 caps them at 128 registers for
// 16 warps per SM. To be timed side by side (benchmarks/gpu_variants.sh) before it changes.
#ifndef DFFKIT_GEMM_MINB
#define DFFKIT_GEMM_MINB 1
#endif

// Staging layout of the two products (a build-time experiment, default 0). 0: rows of the
// staged tiles 4 words apart beyond their width, the staging groups of 4 columns handed out
// row-major (4 threads per row). On the H200 every mma fragment read of both kernels was then
// 2-way bank-conflicted, and the transposed stores of the N kernel too (session 6, ncu: 33.7 M
// conflicts in 34.4 M shared loads at 16384^2): a fragment read takes rows tq = 0..3 and
// columns gq = 0..7, banks 4 tq + gq. 1: rows 8 words apart (banks 8 tq + gq: conflict-free) and
// the groups handed out so that the 32 lanes of a warp stage 32 different rows of one group of
// columns (the transposed stores conflict-free at that pad; each lane's global load is then 16
// bytes of its own row instead of 4 lanes sharing 64 bytes). Conflicts counted by enumeration
// (tests/test_cuda_emu.py::test_gemm_staging_layout_bank_conflicts); speed to be timed side by
// side before it changes.
#ifndef DFFKIT_GEMM_PAD8
#define DFFKIT_GEMM_PAD8 0
#endif
constexpr int GPAD = DFFKIT_GEMM_PAD8 ? 8 : 4;  // words beyond a staged row's width

/// Staging group e (of ROWS * GBK / 4) -> its row and first column: see DFFKIT_GEMM_PAD8.
template <int ROWS>
DFFKIT_HD void stage_group(int e, int& row, int& c4) {
  if constexpr (DFFKIT_GEMM_PAD8 && ROWS >= 32) {
    row = (e & 31) + ((e >> 7) << 5);
    c4 = ((e >> 5) & 3) * 4;
  } else if constexpr (DFFKIT_GEMM_PAD8) {
    row = e % ROWS;
    c4 = (e / ROWS) * 4;
  } else {
    row = e / (GBK / 4);
    c4 = (e % (GBK / 4)) * 4;
  }
}

// ---- 4-element loads and stores ---------------------------------------------------------------

/// v = p[0..3] as T; p is aligned to 4 elements.
template <class T, class S>
__device__ __forceinline__ void load4(const S* p, T* v) {
  DFFKIT_EMU_ALIGNED(p, 4 * sizeof(S) < 16 ? 4 * sizeof(S) : 16);  // float4, 2 x double2, uint2
  if constexpr (std::is_same<S, float>::value) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = T(q.x); v[1] = T(q.y); v[2] = T(q.z); v[3] = T(q.w);
  } else if constexpr (std::is_same<S, double>::value) {
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    v[0] = T(a.x); v[1] = T(a.y); v[2] = T(b.x); v[3] = T(b.y);
  } else {
    static_assert(sizeof(S) == 2, "X is float, double or bfloat16");
    // bfloat16: the upper half of a float32 (element 0 is the low half of the first word)
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = T(__uint_as_float(q.x << 16));
    v[1] = T(__uint_as_float(q.x & 0xffff0000u));
    v[2] = T(__uint_as_float(q.y << 16));
    v[3] = T(__uint_as_float(q.y & 0xffff0000u));
  }
}

/// p[0..3] = v (p aligned to 4 elements; shared memory).
template <class T>
__device__ __forceinline__ void store4(T* p, const T* v) {
  DFFKIT_EMU_ALIGNED(p, 16);  // float4 or 2 x double2
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float4*>(p) = float4{v[0], v[1], v[2], v[3]};
  } else {
    reinterpret_cast<double2*>(p)[0] = double2{v[0], v[1]};
    reinterpret_cast<double2*>(p)[1] = double2{v[2], v[3]};
  }
}

/// Four elements of a row, from column l on: 4-wide when the row allows it (vec: n % 4 == 0
/// and the array aligned), else one by one; columns at or beyond n and absent rows are zero.
template <class T, class S>
__device__ __forceinline__ void fetch4(const S* row, bool row_ok, i64 l, i64 n, bool vec, T* v) {
  if (vec) {
    if (row_ok && l < n) {
      load4<T, S>(row + l, v);
      return;
    }
    v[0] = v[1] = v[2] = v[3] = T(0);
    return;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) v[c] = row_ok && l + c < n ? xget<T>(row + l + c) : T(0);
}

// ---- one step of 16 along the reduction ---------------------------------------------------------

/// CUDA cores: acc[r][c] += a[kk * lda + r] * b[kk * ldb + (c / 4) * gstride + c % 4] for kk < 16:
/// a thread's 8 rows are contiguous, its NC columns come in groups of 4, gstride apart.
template <class T, int NC>
__device__ __forceinline__ void fma_step16(const T* a, int lda, const T* b, int ldb, int gstride,
                                           T (&acc)[8][NC]) {
#pragma unroll
  for (int kk = 0; kk < GBK; ++kk) {
    T av[8], bv[NC];
    load4<T, T>(a + kk * lda, av);
    load4<T, T>(a + kk * lda + 4, av + 4);
#pragma unroll
    for (int cg = 0; cg < NC / 4; ++cg) load4<T, T>(b + kk * ldb + cg * gstride, bv + 4 * cg);
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] += av[r] * bv[c];
  }
}

/// Tensor cores: d[mt][nt] += A B over 16 reduction indices, A's rows r0 + mt * 16 + (0..15) at
/// a[l * lda + row], B's columns c0 + nt * 8 + (0..7) at b[l * ldb + col]. SPLIT: three mma
/// per tile (3xTF32), else the values are tf32 already. Fragments as mma.m16n8k8 wants them
/// (gq = lane / 4, tq = lane % 4).
template <bool SPLIT, bool A_EXACT, bool B_EXACT, int MT, int N8>
__device__ __forceinline__ void mma_step16(const float* a, int lda, int r0, const float* b, int ldb,
                                           int c0, float (&d)[MT][N8][4]) {
  // an operand that is exact in tf32 (bfloat16 X) has no low part: its split is skipped, and
  // with it one of the three mma
  constexpr bool SA = SPLIT && !A_EXACT, SB = SPLIT && !B_EXACT;
  const int gq = (threadIdx.x & 31) >> 2, tq = threadIdx.x & 3;
#pragma unroll
  for (int ks = 0; ks < GBK; ks += 8) {
    std::uint32_t ah[MT][4], al[MT][4], bh[N8][2], bl[N8][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = r0 + mt * 16 + gq;
      tf32_parts<SA>(a[(ks + tq) * lda + r], ah[mt][0], al[mt][0]);
      tf32_parts<SA>(a[(ks + tq) * lda + r + 8], ah[mt][1], al[mt][1]);
      tf32_parts<SA>(a[(ks + tq + 4) * lda + r], ah[mt][2], al[mt][2]);
      tf32_parts<SA>(a[(ks + tq + 4) * lda + r + 8], ah[mt][3], al[mt][3]);
    }
#pragma unroll
    for (int nt = 0; nt < N8; ++nt) {
      const int c = c0 + nt * 8 + gq;
      tf32_parts<SB>(b[(ks + tq) * ldb + c], bh[nt][0], bl[nt][0]);
      tf32_parts<SB>(b[(ks + tq + 4) * ldb + c], bh[nt][1], bl[nt][1]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < N8; ++nt) {
        if constexpr (SA && SB) {
          mma_tf32x3(d[mt][nt], ah[mt], al[mt], bh[nt], bl[nt]);
        } else if constexpr (SA || SB) {
          mma_tf32x2<SA>(d[mt][nt], ah[mt], al[mt], bh[nt], bl[nt]);
        } else {
          mma_tf32(d[mt][nt], ah[mt], bh[nt]);
        }
      }
  }
}

template <class U, int A, int B, int C>
__device__ __forceinline__ void zero(U (&v)[A][B][C]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int c = 0; c < C; ++c) v[a][b][c] = U(0);
}
template <class U, int A, int B>
__device__ __forceinline__ void zero(U (&v)[A][B]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b) v[a][b] = U(0);
}

// ---- geometry ---------------------------------------------------------------------------------

/// N kernel: threads TY x TX, each 8 rows x 4 columns of N; KP = k rounded up to 16, 32 or 64.
/// Tensor cores: warps RW x CW, each WM x WN outputs (MT x N8 tiles of 16 x 8).
template <int KP>
struct NGeom {
  static constexpr int WN = KP >= 32 ? 32 : 16, CW = KP / WN, RW = 8 / CW;
  static constexpr int WM = (NT / (KP / 4)) * 8 / RW, MT = WM / 16, N8 = WN / 8;
  static constexpr int TX = KP / 4;           // threads across the columns
  static constexpr int TY = NT / TX;          // threads down the rows
  static constexpr int BM = TY * 8;           // rows per block: 512, 256, 128
  static constexpr int LDA = BM + GPAD;       // As[l][row]: X staged transposed, padded
  static constexpr int LDB = KP + GPAD;       // Bs[l][j] = H[j][l]
  static constexpr int XG = BM * GBK / 4 / NT;  // 4-element groups of X per thread and step
  static constexpr int LDW = KP + 1;          // epilogue: old W rows
  static_assert(KP * GBK / 4 <= NT, "one group of H per thread");
};

/// P kernel: threads TY x TX, each 8 rows of P (components) x TC columns.
template <int KP>
struct PGeom {
  static constexpr int RW = KP >= 32 ? KP / 32 : 1, WM = KP / RW, CW = 8 / RW;
  static constexpr int MT = WM / 16;
  static constexpr int TC = KP == 64 ? 8 : 4;
  static constexpr int TY = KP / 8;
  static constexpr int TX = NT / TY;
  static constexpr int BN = TX * TC;          // columns per block: 512, 256, 256
  static constexpr int LDW = KP + GPAD;       // Ws[i][j]
  static constexpr int LDX = BN + GPAD;       // Xs[i][l]
  static constexpr int XG = GBK * BN / 4 / NT;
  static constexpr int WG = (GBK * KP + NT - 1) / NT;
  static constexpr int WN = BN / CW, N8 = WN / 8;  // tensor cores: warp tile WM x WN
};

/// The value as staged for the products (MODE 1: rounded to tf32 once; MODE 2 splits it into
/// two tf32 parts when it is read).
template <int MODE, class T>
__device__ __forceinline__ T staged(T v) {
  if constexpr (MODE == 1) return __uint_as_float(to_tf32(v));
  else return v;
}

constexpr int GRAM_ROWS = 32;

template <class T>
DFFKIT_HD std::size_t gemm_n_smem(int KP, int mode = 0) {
  const int TX = KP / 4, BM = (NT / TX) * 8;
  const std::size_t stage = std::size_t(2) * GBK * ((BM + GPAD) + (KP + GPAD));
  // old W rows, G_H, and (tensor cores) N on its way from the fragments to the W update
  const std::size_t epi = std::size_t(BM) * (KP + 1) * (mode != 0 ? 2 : 1) + std::size_t(KP) * KP;
  return NT * sizeof(double) + (stage > epi ? stage : epi) * sizeof(T);
}
template <class T>
DFFKIT_HD std::size_t gemm_p_smem(int KP) {
  const int TC = KP == 64 ? 8 : 4, BN = (NT / (KP / 8)) * TC;
  return std::size_t(2) * GBK * ((KP + GPAD) + (BN + GPAD)) * sizeof(T);
}
template <class T>
DFFKIT_HD std::size_t gemm_gram_smem(int KP) {
  return std::size_t(GRAM_ROWS) * KP * sizeof(T);
}
DFFKIT_HD int gemm_block_rows(int KP) { return (NT / (KP / 4)) * 8; }
DFFKIT_HD int gemm_block_cols(int KP) { return (NT / (KP / 8)) * (KP == 64 ? 8 : 4); }

template <class T, class XS>
struct GemmArgs {
  const XS* X;           // m x n
  T* W;                  // m x k, updated in place by gemm_n_kernel
  const T* H;            // k x n
  const T* GH;           // k x k
  i64 m, n;
  int k;
  int vec;               // rows of X and H readable 4 elements at a time
  const i64* goff;       // group offsets (null: no groups)
  i64 ngroups;
  const double* gnorm;   // ngroups x k: norms of the old W's groups
  T* Ppart;              // S x k x n
  T* Gpart;              // S x k x k
  double* d0part;        // per N block: <N, W_old> (first iteration)
  double* ggpart;        // per N block: <W_old G_H, W_old>
  i64 slice_rows;        // P and G slices: rows [s * slice_rows, (s + 1) * slice_rows)
};

// ---- N = X H^T and the W update ---------------------------------------------------------------

template <class T, class XS, int KP, int MODE>
__global__ void __launch_bounds__(NT, DFFKIT_GEMM_MINB) gemm_n_kernel(GemmArgs<T, XS> g, KParams q, const int* stop,
                                                    int first) {
  if (stop && *stop) return;
  using G = NGeom<KP>;
  constexpr bool TC = MODE != 0;
  static_assert(!TC || std::is_same<T, float>::value, "tensor cores: float32 factors");
  constexpr bool BF16X = sizeof(XS) == 2;  // X staged from bfloat16: exact in tf32
  DFFKIT_DYNAMIC_SMEM(smem);
  double* red = reinterpret_cast<double*>(smem);
  T* As = reinterpret_cast<T*>(smem + NT * sizeof(double));  // [2][GBK][LDA]
  T* Bs = As + 2 * GBK * G::LDA;                              // [2][GBK][LDB]
  const int tid = threadIdx.x, tx = tid % G::TX, ty = tid / G::TX;
  const i64 m = g.m, n = g.n;
  const int k = g.k;
  const bool vec = g.vec != 0;
  const i64 r0 = i64(blockIdx.x) * G::BM;

  T xr[G::XG][4], hr[4];
  auto load = [&](i64 l0) {
#pragma unroll
    for (int u = 0; u < G::XG; ++u) {
      int row, c4;
      stage_group<G::BM>(tid + u * NT, row, c4);
      const i64 gi = r0 + row;
      fetch4<T, XS>(g.X + (gi < m ? gi : 0) * n, gi < m, l0 + c4, n, vec, xr[u]);
    }
    if (tid < KP * GBK / 4) {
      int j, c4;
      stage_group<KP>(tid, j, c4);
      fetch4<T, T>(g.H + (j < k ? j : 0) * n, j < k, l0 + c4, n, vec, hr);
    }
  };
  auto store = [&](int buf) {
    T* a = As + buf * GBK * G::LDA;
    T* b = Bs + buf * GBK * G::LDB;
#pragma unroll
    for (int u = 0; u < G::XG; ++u) {
      int row, c4;
      stage_group<G::BM>(tid + u * NT, row, c4);
#pragma unroll
      for (int c = 0; c < 4; ++c) a[(c4 + c) * G::LDA + row] = staged<MODE>(xr[u][c]);
    }
    if (tid < KP * GBK / 4) {
      int j, c4;
      stage_group<KP>(tid, j, c4);
#pragma unroll
      for (int c = 0; c < 4; ++c) b[(c4 + c) * G::LDB + j] = staged<MODE>(hr[c]);
    }
  };

  // tensor cores: this warp's block of outputs, rows m0.., columns n0.. (fragment layout of
  // mma.m16n8k8: gq = lane / 4, tq = lane % 4)
  const int warp = tid >> 5, gq = (tid & 31) >> 2, tq = tid & 3;
  const int m0 = (warp / G::CW) * G::WM, n0 = (warp % G::CW) * G::WN;
  float d[TC ? G::MT : 1][TC ? G::N8 : 1][4];
  zero(d);

  T acc[8][4];
  zero(acc);

  const i64 steps = (n + GBK - 1) / GBK;
  load(0);
  store(0);
  __syncthreads();
  for (i64 t = 0; t < steps; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < steps) load((t + 1) * GBK);
    if constexpr (TC)
      mma_step16<MODE == 2, BF16X, false>(As + buf * GBK * G::LDA, G::LDA, m0, Bs + buf * GBK * G::LDB, G::LDB, n0, d);
    else
      fma_step16(As + buf * GBK * G::LDA + ty * 8, G::LDA, Bs + buf * GBK * G::LDB + tx * 4, G::LDB,
                 0, acc);
    if (t + 1 < steps) store(buf ^ 1);
    __syncthreads();
  }

  // epilogue: the W update of the block's rows (staging buffers reused)
  T* Wo = As;                    // [BM][LDW]
  T* GHs = As + G::BM * G::LDW;  // [KP][KP]
  for (int e = tid; e < G::BM * KP; e += NT) {
    const int i = e / KP, j = e % KP;
    const i64 gi = r0 + i;
    Wo[i * G::LDW + j] = gi < m && j < k ? g.W[gi * k + j] : T(0);
  }
  for (int e = tid; e < KP * KP; e += NT) {
    const int l = e / KP, j = e % KP;
    GHs[e] = l < k && j < k ? g.GH[l * k + j] : T(0);
  }
  if constexpr (TC) {  // the fragments into the thread-per-8 x 4 layout of the W update
    T* Ns = GHs + KP * KP;  // [BM][LDW]
#pragma unroll
    for (int mt = 0; mt < G::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < G::N8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          Ns[(m0 + mt * 16 + gq + (e >> 1) * 8) * G::LDW + n0 + nt * 8 + 2 * tq + (e & 1)] =
              d[mt][nt][e];
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = Ns[(ty * 8 + r) * G::LDW + tx * 4 + c];
  } else {
    __syncthreads();
  }
  const T l1 = T(q.l1_W), l2 = T(q.l2_W);
  const double tiny = double(std::numeric_limits<T>::min());
  double d0 = 0, gg = 0;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int i = ty * 8 + r;
    const i64 gi = r0 + i;
    if (gi < m) {
      T base[4] = {T(0), T(0), T(0), T(0)};
      for (int l = 0; l < k; ++l) {
        const T w = Wo[i * G::LDW + l];
        T gv[4];
        load4<T, T>(GHs + l * KP + tx * 4, gv);
#pragma unroll
        for (int c = 0; c < 4; ++c) base[c] += w * gv[c];
      }
      const i64 grp = q.groups ? group_of_row(g.goff, g.ngroups, gi) : 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = tx * 4 + c;
        if (j < k) {
          const T wo = Wo[i * G::LDW + j], num = acc[r][c];
          if (first) {
            d0 += double(num) * double(wo);
            gg += double(wo) * double(base[c]);
          }
          const T extra = q.groups ? group_term(wo, q.lam, g.gnorm[grp * k + j], tiny) : T(0);
          g.W[gi * k + j] = mu_step(wo, num, base[c], l1, l2, extra);
        }
      }
    }
  }
  if (first) {
    d0 = block_sum(d0, red);
    gg = block_sum(gg, red);
    if (tid == 0) {
      g.d0part[blockIdx.x] = d0;
      g.ggpart[blockIdx.x] = gg;
    }
  }
}

// ---- P_s = W^T X over a slice of rows -----------------------------------------------------------

template <class T, class XS, int KP, int MODE>
__global__ void __launch_bounds__(NT, DFFKIT_GEMM_MINB) gemm_p_kernel(GemmArgs<T, XS> g, const int* stop) {
  if (stop && *stop) return;
  using G = PGeom<KP>;
  constexpr bool TC = MODE != 0;
  static_assert(!TC || std::is_same<T, float>::value, "tensor cores: float32 factors");
  constexpr bool BF16X = sizeof(XS) == 2;  // X staged from bfloat16: exact in tf32
  DFFKIT_DYNAMIC_SMEM(smem);
  T* Ws = reinterpret_cast<T*>(smem);   // [2][GBK][LDW]
  T* Xs = Ws + 2 * GBK * G::LDW;        // [2][GBK][LDX]
  const int tid = threadIdx.x, tx = tid % G::TX, ty = tid / G::TX;
  const i64 m = g.m, n = g.n;
  const int k = g.k;
  const bool vec = g.vec != 0;
  const i64 l0 = i64(blockIdx.x) * G::BN;
  const i64 ib = i64(blockIdx.y) * g.slice_rows;
  const i64 ie = ib + g.slice_rows < m ? ib + g.slice_rows : m;
  const i64 steps = ie > ib ? (ie - ib + GBK - 1) / GBK : 0;

  T xr[G::XG][4], wr[G::WG];
  auto load = [&](i64 i0) {
#pragma unroll
    for (int u = 0; u < G::XG; ++u) {
      const int e = tid + u * NT, row = e / (G::BN / 4), c4 = (e % (G::BN / 4)) * 4;
      const i64 gi = i0 + row;
      fetch4<T, XS>(g.X + (gi < ie ? gi : 0) * n, gi < ie, l0 + c4, n, vec, xr[u]);
    }
#pragma unroll
    for (int u = 0; u < G::WG; ++u) {
      const int e = tid + u * NT, row = e / KP, j = e % KP;
      const i64 gi = i0 + row;
      wr[u] = e < GBK * KP && gi < ie && j < k ? g.W[gi * k + j] : T(0);
    }
  };
  auto store = [&](int buf) {
    T* w = Ws + buf * GBK * G::LDW;
    T* x = Xs + buf * GBK * G::LDX;
#pragma unroll
    for (int u = 0; u < G::XG; ++u) {
      const int e = tid + u * NT, row = e / (G::BN / 4), c4 = (e % (G::BN / 4)) * 4;
      T v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = staged<MODE>(xr[u][c]);
      store4<T>(x + row * G::LDX + c4, v);
    }
#pragma unroll
    for (int u = 0; u < G::WG; ++u) {
      const int e = tid + u * NT;
      if (e < GBK * KP) w[(e / KP) * G::LDW + e % KP] = staged<MODE>(wr[u]);
    }
  };

  // tensor cores: this warp's block of P, components j0.., columns c0.. of the block's
  const int warp = tid >> 5, gq = (tid & 31) >> 2, tq = tid & 3;
  const int j0 = (warp / G::CW) * G::WM, c0 = (warp % G::CW) * G::WN;
  float d[TC ? G::MT : 1][TC ? G::N8 : 1][4];
  zero(d);

  T acc[8][G::TC];
  zero(acc);

  if (steps > 0) {
    load(ib);
    store(0);
  }
  __syncthreads();
  for (i64 t = 0; t < steps; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < steps) load(ib + (t + 1) * GBK);
    if constexpr (TC)
      mma_step16<MODE == 2, false, BF16X>(Ws + buf * GBK * G::LDW, G::LDW, j0, Xs + buf * GBK * G::LDX, G::LDX, c0, d);
    else
      fma_step16(Ws + buf * GBK * G::LDW + ty * 8, G::LDW, Xs + buf * GBK * G::LDX + tx * 4, G::LDX,
                 G::TX * 4, acc);
    if (t + 1 < steps) store(buf ^ 1);
    __syncthreads();
  }

  T* P = g.Ppart + i64(blockIdx.y) * k * n;
  if constexpr (TC) {
#pragma unroll
    for (int mt = 0; mt < G::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < G::N8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = j0 + mt * 16 + gq + (e >> 1) * 8;
          const i64 l = l0 + c0 + nt * 8 + 2 * tq + (e & 1);
          if (j < k && l < n) P[j * n + l] = d[mt][nt][e];
        }
  } else {
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int j = ty * 8 + r;
      if (j < k) {
#pragma unroll
        for (int cg = 0; cg < G::TC / 4; ++cg)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const i64 l = l0 + cg * G::TX * 4 + tx * 4 + c;
            if (l < n) P[j * n + l] = acc[r][cg * 4 + c];
          }
      }
    }
  }
}

// ---- G_s = A^T A over a slice of rows -----------------------------------------------------------

/// A is rows x k with element (i, j) at A[i * si + j * sj]: W (si = k, sj = 1) or H^T
/// (si = 1, sj = n; G = H H^T). Block s: rows [s * slice_rows, ...), float64 sums in row order.
template <class T, int KP>
__global__ void __launch_bounds__(NT) gemm_gram_kernel(const T* A, i64 rows, int k, i64 si, i64 sj,
                                                       i64 slice_rows, T* Gpart, const int* stop) {
  if (stop && *stop) return;
  constexpr int NPAIR = (KP * KP + NT - 1) / NT;
  DFFKIT_DYNAMIC_SMEM(smem);
  T* Ws = reinterpret_cast<T*>(smem);  // [GRAM_ROWS][KP]
  const int tid = threadIdx.x;
  const i64 ib = i64(blockIdx.x) * slice_rows;
  const i64 ie = ib + slice_rows < rows ? ib + slice_rows : rows;
  const bool by_row = sj == 1;  // consecutive threads read consecutive addresses either way
  double acc[NPAIR];
#pragma unroll
  for (int u = 0; u < NPAIR; ++u) acc[u] = 0;
  for (i64 i0 = ib; i0 < ie; i0 += GRAM_ROWS) {
    for (int e = tid; e < GRAM_ROWS * KP; e += NT) {
      const int row = by_row ? e / KP : e % GRAM_ROWS, j = by_row ? e % KP : e / GRAM_ROWS;
      const i64 gi = i0 + row;
      Ws[row * KP + j] = gi < ie && j < k ? A[gi * si + j * sj] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < NPAIR; ++u) {
      const int p = tid + u * NT;
      if (p < k * k) {
        const int a = p / k, b = p % k;
        double s = acc[u];
        for (int i = 0; i < GRAM_ROWS; ++i) s += double(Ws[i * KP + a]) * double(Ws[i * KP + b]);
        acc[u] = s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < NPAIR; ++u) {
    const int p = tid + u * NT;
    if (p < k * k) Gpart[i64(blockIdx.x) * k * k + p] = T(acc[u]);
  }
}

// ---- host-side plan -----------------------------------------------------------------------------

/// k rounded up to the kernels' column width (16, 32 or 64); 0 when k is too large.
DFFKIT_HD int gemm_kp(i64 k) { return k <= 16 ? 16 : k <= 32 ? 32 : k <= 64 ? 64 : 0; }

/// Slices of rows for the P and G partials, from the shape only: about 512 blocks for the P
/// kernel, slices of at least 64 rows, a multiple of GBK rows each, none empty, and at most
/// max_slices (the partials' memory).
struct GemmPlan {
  int kp = 0;
  i64 n_blocks = 0;    // N kernel blocks
  i64 col_blocks = 0;  // P kernel blocks across the columns
  i64 slices = 0;
  i64 slice_rows = 0;
  i64 h_slices = 0;    // G_H = H H^T: slices of the n columns of H
  i64 h_slice_cols = 0;
};
DFFKIT_HD GemmPlan gemm_plan(i64 m, i64 n, i64 k, i64 max_slices) {
  GemmPlan p;
  p.kp = gemm_kp(k);
  if (p.kp == 0) return p;
  p.n_blocks = (m + gemm_block_rows(p.kp) - 1) / gemm_block_rows(p.kp);
  p.col_blocks = (n + gemm_block_cols(p.kp) - 1) / gemm_block_cols(p.kp);
  i64 s = (512 + p.col_blocks - 1) / p.col_blocks;
  const i64 by_rows = (m + 63) / 64;
  if (s > by_rows) s = by_rows;
  if (s > max_slices) s = max_slices;
  if (s < 1) s = 1;
  const i64 per = (m + s - 1) / s;
  p.slice_rows = (per + GBK - 1) / GBK * GBK;
  p.slices = (m + p.slice_rows - 1) / p.slice_rows;
  i64 hs = (n + 63) / 64;
  if (hs > 256) hs = 256;
  if (hs > max_slices) hs = max_slices;
  p.h_slice_cols = (n + hs - 1) / hs;
  p.h_slices = (n + p.h_slice_cols - 1) / p.h_slice_cols;
  return p;
}

}  // namespace cuda_detail
}  // namespace dffkit
