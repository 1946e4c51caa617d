#pragma once
// The gemm engine's single-pass kernel for tall problems (Frobenius, float32 factors, X float32
// or bfloat16, k <= 32, n <= 512, n a multiple of 4 (8 for bfloat16); sm_90 for its shared memory): per iteration one launch
// reads X once. nmf_gemm.cuh's two-pass kernels read it twice (N = X H^T, then P = W^T X), and
// for 200000 x 512 float32 the second pass alone is 0.4 GB per iteration.
//
// A fixed grid of NB = min(tiles, 264) blocks (from the shape only) sweeps tiles of FBM = 32 rows;
// block b takes tiles b, b + NB, ... Per tile, with the tile's rows of X and W in shared memory
// (cp.async; the next tile's copies in flight while this one is used):
//
//   N step   N = X_t H^T on tensor cores: each warp one eighth of the reduction along n for all
//            32 x k outputs (H, staged once per launch, in shared memory); the 8 partials added
//            in a fixed order (warp w + 4 onto warp w, then the 4 slots in order)
//   W step   W_t G_H (mma), the W update mu_step of nmf_gemm.cuh's epilogue, W_t written to
//            global memory once; first iteration: <N, W_old> and <W_old G_H, W_old>
//   P step   P^T += X_t^T W_t (mma; P stays in registers across the block's tiles) and
//            G_W += W_t^T W_t (mma, float within a tile, float64 across tiles)
//
// At the end each block writes its partials of P and G_W (added by the driver in the fixed
// order of reduce_partials_kernel, as the two-pass kernels' slices are).
//
// Products: MODE 2 split tf32 ("3xTF32", float32 accuracy: three mma per tile from operands
// v = hi + lo split when read; bfloat16 X is exact in tf32, so two), MODE 1 tf32 (one mma,
// operands rounded with cvt.rna when read). X is float32 or bfloat16 (precision bf16x: half the
// bytes of the one pass).
//
// Shared memory layout of an X tile: 32 rows of NP elements (NP = n rounded up to 32 floats, or
// 64 bfloat16: a multiple of 32 words per row), as 32-bit words; word w of row i sits at
// i * NP_words + (w ^ sw(i)), sw(i) = 8 (i % 4) + 4 ((i / 4) % 2). Every fragment load reads a
// pair of neighbouring columns (the reduction order is permuted to make it so, see the kernel):
// the N step 8 rows x 4 pairs across a warp, the P step (X transposed) 4 rows x 8 pairs; with
// this XOR both are free of bank conflicts (no padding serves both), and the 16-byte cp.async
// chunks stay whole (sw is a multiple of 4 words).
//
// This file compiles under nvcc and under the CPU emulator (cuda/emu/cuda_emu.hpp).
#include "nmf_gemm.cuh"
#if !defined(DFFKIT_EMULATE)
#include <cuda_pipeline.h>
#endif

namespace dffkit {
namespace cuda_detail {

constexpr int FBM = 32;       // rows per tile
constexpr int FKMAX = 32;     // the largest k (four column tiles of 8)
constexpr int FNMAX = 512;    // the largest n
constexpr int FLD = 40;       // row stride of W_t and G_H on chip (8 mod 32: fragments conflict-free)
constexpr int FBLOCKS = 264;  // at most this many blocks
constexpr int FSTAGES = 4;    // at most this many tiles on chip (one in use, the rest in flight)

/// The XOR applied to the 32-bit word index of row i of an X tile.
DFFKIT_HD int fused_sw(int i) { return 8 * (i & 3) + 4 * ((i >> 2) & 1); }

template <class XS>
struct FusedArgs {
  const XS* X;        // m x n, 16-byte aligned; n % 4 == 0 (float), n % 8 == 0 (bfloat16)
  float* W;           // m x k, updated in place
  const float* H;     // k x n
  const float* GH;    // k x k
  i64 m, n;
  int k;
  int kp, np;         // k rounded up to 8, n rounded up to 32 (float) or 64 (bfloat16)
  int stages;         // tile buffers (2..FSTAGES)
  i64 tiles;          // ceil(m / FBM)
  float* Ppart;       // NB x k x n
  float* Gpart;       // NB x k x k
  double* d0part;     // NB: <N, W_old> (first iteration)
  double* ggpart;     // NB: <W_old G_H, W_old>
};

/// Byte offsets into the kernel's dynamic shared memory (xsize: bytes per element of X).
struct FusedLayout {
  std::size_t xs, hs, wb, nred, wn, ghs, used;
};
DFFKIT_HD FusedLayout fused_layout(int np, int kp, int xsize, int stages) {
  FusedLayout L{};
  std::size_t at = 0;
  auto take = [&](std::size_t bytes) {
    const std::size_t o = at;
    at += (bytes + 15) / 16 * 16;
    return o;
  };
  const std::size_t f = sizeof(float);
  L.xs = take(std::size_t(stages) * FBM * np * xsize);  // the X tiles (swizzled)
  L.hs = take(std::size_t(kp) * (np + 8) * f);          // H, rows np + 8 apart (8 mod 32)
  L.wb = take(std::size_t(stages) * FBM * kp * f);      // the tiles' old W rows (row stride k)
  // four N partials; after the tiles, the block sum's scratch (NT doubles)
  const std::size_t nred = std::size_t(4) * FBM * kp * f;
  L.nred = take(nred > NT * sizeof(double) ? nred : NT * sizeof(double));
  L.wn = take(std::size_t(FBM) * FLD * f);         // new W rows (zero beyond k and m)
  L.ghs = take(std::size_t(FKMAX) * FLD * f);      // G_H (zero beyond k)
  L.used = at;
  return L;
}

/// P^T column tiles of 16 per warp: 2 for n <= 256, 4 for n <= 512.
DFFKIT_HD int fused_pm(int np) { return np <= 256 ? 2 : 4; }

/// The single-pass kernel's plan for a problem, from the shape only (use = 0: it does not serve
/// the shape or the shared-memory limit). xsize: bytes per element of X (4 or 2). As many tile
/// buffers as fit, up to max_stages (the results do not depend on it: it only changes how many
/// tiles are in flight).
struct FusedPlan {
  int use = 0, kp = 0, np = 0, pm = 0, stages = 0;
  i64 tiles = 0, blocks = 0;
  std::size_t smem = 0;
};
DFFKIT_HD FusedPlan fused_plan(i64 m, i64 n, i64 k, i64 max_blocks, std::size_t limit, int xsize = 4,
                               int max_stages = FSTAGES) {
  FusedPlan p;
  const int chunk = 16 / xsize;  // elements per 16-byte copy
  if (m < 1 || n < chunk || n > FNMAX || n % chunk != 0 || k < 1 || k > FKMAX) return p;
  const int words_np = 32 * (4 / xsize);  // a tile row is a multiple of 32 words
  p.kp = int((k + 7) / 8 * 8);
  p.np = int((n + words_np - 1) / words_np * words_np);
  p.pm = fused_pm(p.np);
  for (p.stages = max_stages < FSTAGES ? max_stages : FSTAGES; p.stages >= 2; --p.stages) {
    p.smem = fused_layout(p.np, p.kp, xsize, p.stages).used;
    if (p.smem <= limit) break;
  }
  if (p.stages < 2) return p;
  p.tiles = (m + FBM - 1) / FBM;
  p.blocks = p.tiles < FBLOCKS ? p.tiles : FBLOCKS;
  if (p.blocks > max_blocks) p.blocks = max_blocks;
  if (p.blocks < 1) p.blocks = 1;
  p.use = 1;
  return p;
}

/// X[row][j], X[row][j + 1] (j even) from a tile row (its 32-bit words): one 8-byte load (float)
/// or one word (bfloat16, element j in the low half).
template <class XS>
__device__ __forceinline__ void fused_pair(const std::uint32_t* row_words, int row, int j, float& v0,
                                           float& v1) {
  if constexpr (sizeof(XS) == 4) {
    const std::uint32_t* p = row_words + (j ^ fused_sw(row));
    DFFKIT_EMU_ALIGNED(p, 8);
    const uint2 w = *reinterpret_cast<const uint2*>(p);
    v0 = __uint_as_float(w.x);
    v1 = __uint_as_float(w.y);
  } else {
    const std::uint32_t w = row_words[(j >> 1) ^ fused_sw(row)];
    v0 = __uint_as_float(w << 16);
    v1 = __uint_as_float(w & 0xffff0000u);
  }
}

/// One operand value as mma wants it: MODE 2 split into tf32 hi + lo (EXACT: a bfloat16 value,
/// already tf32, no low part), MODE 1 rounded to tf32.
template <int MODE, bool EXACT = false>
__device__ __forceinline__ void fused_part(float v, std::uint32_t& hi, std::uint32_t& lo) {
  if constexpr (EXACT) {
    hi = __float_as_uint(v);
    lo = 0;
  } else if constexpr (MODE == 2) {
    tf32_parts<true>(v, hi, lo);
  } else {
    hi = to_tf32(v);
    lo = 0;
  }
}

/// d += a b for one 16 x 8 x 8 step: MODE 2 three mma (two when a is exact), MODE 1 one.
template <int MODE, bool A_EXACT = false>
__device__ __forceinline__ void fused_mma(float (&d)[4], const std::uint32_t (&ah)[4], const std::uint32_t (&al)[4],
                                          const std::uint32_t (&bh)[2], const std::uint32_t (&bl)[2]) {
  if constexpr (MODE == 2 && !A_EXACT) {
    mma_tf32x3(d, ah, al, bh, bl);
  } else if constexpr (MODE == 2) {
    mma_tf32x2<false>(d, ah, al, bh, bl);
  } else {
    mma_tf32(d, ah, bh);
  }
}

/// Start copying tile t's rows of X (16-byte cp.async into the swizzled words) and of W (4-byte
/// cp.async) into one buffer; rows beyond m are zero. Commits one pipeline group (an empty one
/// when t is past the last tile, so that every iteration commits one).
template <class XS>
__device__ __forceinline__ void fused_stage(const FusedArgs<XS>& g, std::uint32_t* xs, float* wb, i64 t) {
  constexpr int EPW = 4 / int(sizeof(XS));  // elements per word
  if (t >= g.tiles) {
    __pipeline_commit();
    return;
  }
  const int tid = threadIdx.x, row_words = g.np / EPW, k = g.k;
  const i64 r0 = t * FBM;
  const int rows = int(g.m - r0 < FBM ? g.m - r0 : FBM);
  const int c4 = int(g.n / (4 * EPW));  // 16-byte chunks per row
  for (int e = tid; e < FBM * c4; e += NT) {
    const int i = e / c4, w = (e - i * c4) * 4;
    std::uint32_t* dst = xs + i * row_words + (w ^ fused_sw(i));
    if (i < rows) {
      __pipeline_memcpy_async(dst, g.X + (r0 + i) * g.n + w * EPW, 16);
    } else {
      DFFKIT_EMU_ALIGNED(dst, 16);
      *reinterpret_cast<uint4*>(dst) = uint4{0u, 0u, 0u, 0u};
    }
  }
  const float* wsrc = g.W + r0 * k;
  for (int e = tid; e < rows * k; e += NT) __pipeline_memcpy_async(wb + e, wsrc + e, 4);
  __pipeline_commit();
}

/// One iteration's products and W update over the block's tiles (see the top of this file).
/// XS: float or bfloat16 (X exact in tf32: its split and one of the three mma are skipped).
/// PM: P^T column tiles of 16 per warp. MODE: 2 split tf32, 1 tf32.
///
/// The reduction index inside each step of 8 is permuted so that every X fragment load is a pair
/// of neighbouring columns: in the N step fragment columns t and t + 4 are X columns 2t and
/// 2t + 1 (H read the same way); in the P step fragment rows g and g + 8 of P^T are X columns
/// 2g and 2g + 1 (written back to those columns).
template <class XS, int PM, int MODE>
__global__ void __launch_bounds__(NT, 1) gemm_fused_kernel(FusedArgs<XS> g, KParams q, const int* stop, int first,
                                                          int want_P) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(DFFKIT_EMULATE)
  constexpr bool XE = sizeof(XS) == 2;  // X exact in tf32
  constexpr int EPW = 4 / int(sizeof(XS));
  if (stop && *stop) return;
  DFFKIT_DYNAMIC_SMEM(smem);
  const FusedLayout L = fused_layout(g.np, g.kp, int(sizeof(XS)), g.stages);
  std::uint32_t* Xs = reinterpret_cast<std::uint32_t*>(smem + L.xs);
  float* Hs = reinterpret_cast<float*>(smem + L.hs);
  float* Wb = reinterpret_cast<float*>(smem + L.wb);
  float* Nred = reinterpret_cast<float*>(smem + L.nred);
  float* Wn = reinterpret_cast<float*>(smem + L.wn);
  float* GHs = reinterpret_cast<float*>(smem + L.ghs);
  const int tid = threadIdx.x, warp = tid >> 5, gq = (tid & 31) >> 2, tq = tid & 3;
  const int k = g.k, kp = g.kp, np = g.np, kt = kp / 8, ldh = np + 8, rw = np / EPW;
  const i64 m = g.m, n = g.n;

  // the first tiles' copies go out first (stages - 1 of them); H, G_H and the zero borders
  // meanwhile. Tile j of this block (t = blockIdx.x + j NB) lives in buffer j % stages.
  const int S = g.stages;
  i64 t = blockIdx.x;
  for (int j = 0; j + 1 < S; ++j)
    fused_stage(g, Xs + j * FBM * rw, Wb + j * FBM * kp, t + i64(j) * gridDim.x);
  const int wn0 = int(n) / EPW, pad = rw - wn0;  // words of the padded columns (n..np) per row
  for (int e = tid; e < S * FBM * pad; e += NT) {
    const int row = e / pad, w = wn0 + e % pad;
    Xs[row * rw + (w ^ fused_sw(row % FBM))] = 0u;
  }
  for (int e = tid; e < kp * np; e += NT) {
    const int j = e / np, l = e % np;
    Hs[j * ldh + l] = j < k && l < n ? g.H[j * n + l] : 0.f;
  }
  for (int e = tid; e < FKMAX * FLD; e += NT) {
    const int l = e / FLD, j = e % FLD;
    GHs[e] = l < k && j < k ? g.GH[l * k + j] : 0.f;
  }
  for (int e = tid; e < FBM * FLD; e += NT) Wn[e] = 0.f;

  const float l1 = float(q.l1_W), l2 = float(q.l2_W);
  // this warp's output tile in the W step and in G_W (2 row tiles x 4 column tiles)
  const int wmt = warp >> 2, wnt = warp & 3;
  const bool w_on = wnt < kt;
  const bool g_on = wmt * 16 < kp && wnt < kt;
  float pacc[PM][4][4];
  zero(pacc);
  double gacc[4] = {0, 0, 0, 0};
  double d0 = 0, gg = 0;

  for (int it = 0; t < i64(g.tiles); t += gridDim.x, ++it) {
    const int buf = it % S, next = (it + S - 1) % S;
    const std::uint32_t* xs = Xs + buf * FBM * rw;
    const float* wb = Wb + buf * FBM * kp;
    const i64 r0 = t * FBM;
    __pipeline_wait_prior(S - 2);  // one group per tile: the S - 2 newer ones may still fly
    __syncthreads();  // this tile on chip; the previous tile's buffer, N slots and W_t free
    fused_stage(g, Xs + next * FBM * rw, Wb + next * FBM * kp, t + i64(S - 1) * gridDim.x);

    // ---- N step: this warp's steps of 8 along n, both row tiles, all column tiles --------------
    float nacc[2][4][4];
    zero(nacc);
    for (int ks = warp; ks < np / 8; ks += 8) {
      const int c = ks * 8 + 2 * tq;  // fragment columns tq, tq + 4: X columns c, c + 1
      std::uint32_t ah[2][4], al[2][4], bh[4][2], bl[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = mt * 16 + gq;
        float v[4];
        fused_pair<XS>(xs + r * rw, r, c, v[0], v[2]);
        fused_pair<XS>(xs + (r + 8) * rw, r + 8, c, v[1], v[3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) fused_part<MODE, XE>(v[e], ah[mt][e], al[mt][e]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (nt < kt) {
          const float* h = Hs + (nt * 8 + gq) * ldh + c;
          DFFKIT_EMU_ALIGNED(h, 8);
          const float2 hv = *reinterpret_cast<const float2*>(h);
          fused_part<MODE>(hv.x, bh[nt][0], bl[nt][0]);
          fused_part<MODE>(hv.y, bh[nt][1], bl[nt][1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
        if (nt < kt) {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) fused_mma<MODE, XE>(nacc[mt][nt], ah[mt], al[mt], bh[nt], bl[nt]);
        }
    }
    // the 8 partials: warp w + 4 onto warp w, then slots 0..3 in order (in the W step)
    auto slot_at = [&](int s, int mt, int nt, int e) -> float& {
      return Nred[s * FBM * kp + (mt * 16 + gq + (e >> 1) * 8) * kp + nt * 8 + 2 * tq + (e & 1)];
    };
    auto each_output = [&](auto&& f) {  // this lane's elements of the 2 x kt fragments
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          if (nt < kt)
#pragma unroll
            for (int e = 0; e < 4; ++e) f(mt, nt, e);
    };
    if (warp >= 4) each_output([&](int mt, int nt, int e) { slot_at(warp - 4, mt, nt, e) = nacc[mt][nt][e]; });
    __syncthreads();
    if (warp < 4)
      each_output([&](int mt, int nt, int e) {
        float& s = slot_at(warp, mt, nt, e);
        s = nacc[mt][nt][e] + s;
      });
    __syncthreads();

    // ---- W step: base = W_old G_H (mma), then the update of this warp's 16 x 8 outputs ----------
    if (w_on) {
      float base[4] = {0.f, 0.f, 0.f, 0.f};
      const int rows = int(m - r0 < FBM ? m - r0 : FBM);
      for (int ks = 0; ks < kt; ++ks) {
        std::uint32_t ah[4], al[4], bh[2], bl[2];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = wmt * 16 + gq + (e & 1) * 8, l = ks * 8 + tq + (e >> 1) * 4;
          fused_part<2>(i < rows && l < k ? wb[i * k + l] : 0.f, ah[e], al[e]);
        }
        fused_part<2>(GHs[(ks * 8 + tq) * FLD + wnt * 8 + gq], bh[0], bl[0]);
        fused_part<2>(GHs[(ks * 8 + tq + 4) * FLD + wnt * 8 + gq], bh[1], bl[1]);
        mma_tf32x3(base, ah, al, bh, bl);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = wmt * 16 + gq + (e >> 1) * 8, j = wnt * 8 + 2 * tq + (e & 1);
        const int o = i * kp + j;
        const float num = ((Nred[o] + Nred[FBM * kp + o]) + Nred[2 * FBM * kp + o]) + Nred[3 * FBM * kp + o];
        if (i < rows && j < k) {
          const float wo = wb[i * k + j];
          if (first) {
            d0 += double(num) * double(wo);
            gg += double(wo) * double(base[e]);
          }
          const float wn = mu_step(wo, num, base[e], l1, l2, 0.f);
          g.W[(r0 + i) * k + j] = wn;
          Wn[i * FLD + j] = wn;
        } else {
          Wn[i * FLD + j] = 0.f;
        }
      }
    }
    __syncthreads();  // W_t (new) on chip

    // ---- P step: P^T += X_t^T W_t; G_W += W_t^T W_t ------------------------------------------
    if (want_P) {
#pragma unroll
      for (int ks = 0; ks < FBM / 8; ++ks) {
        const int r = ks * 8 + tq;
        std::uint32_t bh[4][2], bl[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          if (nt < kt) {
            fused_part<MODE>(Wn[r * FLD + nt * 8 + gq], bh[nt][0], bl[nt][0]);
            fused_part<MODE>(Wn[(r + 4) * FLD + nt * 8 + gq], bh[nt][1], bl[nt][1]);
          }
#pragma unroll
        for (int pm = 0; pm < PM; ++pm) {
          const int c0 = (warp * PM + pm) * 16;
          if (c0 < np) {
            // fragment rows gq, gq + 8 of P^T: X columns c0 + 2 gq, c0 + 2 gq + 1
            std::uint32_t ah[4], al[4];
            float v[4];
            fused_pair<XS>(xs + r * rw, r, c0 + 2 * gq, v[0], v[1]);
            fused_pair<XS>(xs + (r + 4) * rw, r + 4, c0 + 2 * gq, v[2], v[3]);
#pragma unroll
            for (int e = 0; e < 4; ++e) fused_part<MODE, XE>(v[e], ah[e], al[e]);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
              if (nt < kt) fused_mma<MODE, XE>(pacc[pm][nt], ah, al, bh[nt], bl[nt]);
          }
        }
      }
    }
    if (g_on) {
      float gt[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < FBM / 8; ++ks) {
        const int r = ks * 8 + tq;
        std::uint32_t ah[4], al[4], bh[2], bl[2];
        fused_part<2>(Wn[r * FLD + wmt * 16 + gq], ah[0], al[0]);
        fused_part<2>(Wn[r * FLD + wmt * 16 + gq + 8], ah[1], al[1]);
        fused_part<2>(Wn[(r + 4) * FLD + wmt * 16 + gq], ah[2], al[2]);
        fused_part<2>(Wn[(r + 4) * FLD + wmt * 16 + gq + 8], ah[3], al[3]);
        fused_part<2>(Wn[r * FLD + wnt * 8 + gq], bh[0], bl[0]);
        fused_part<2>(Wn[(r + 4) * FLD + wnt * 8 + gq], bh[1], bl[1]);
        mma_tf32x3(gt, ah, al, bh, bl);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) gacc[e] += double(gt[e]);
    }
  }

  // ---- the block's partials ------------------------------------------------------------------
  const i64 b = blockIdx.x;
  if (want_P) {
    float* P = g.Ppart + b * k * n;
#pragma unroll
    for (int pm = 0; pm < PM; ++pm)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
        if (nt < kt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const i64 l = (warp * PM + pm) * 16 + 2 * gq + (e >> 1);
            const int j = nt * 8 + 2 * tq + (e & 1);
            if (l < n && j < k) P[j * n + l] = pacc[pm][nt][e];
          }
  }
  if (g_on) {
    float* G = g.Gpart + b * k * k;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int a = wmt * 16 + gq + (e >> 1) * 8, c = wnt * 8 + 2 * tq + (e & 1);
      if (a < k && c < k) G[a * k + c] = float(gacc[e]);
    }
  }
  if (first) {
    __syncthreads();  // the N slots become the block sum's scratch
    double* red = reinterpret_cast<double*>(Nred);
    d0 = block_sum(d0, red);
    gg = block_sum(gg, red);
    if (tid == 0) {
      g.d0part[b] = d0;
      g.ggpart[b] = gg;
    }
  }
#else
  (void)g; (void)q; (void)stop; (void)first; (void)want_P;
#endif
}

}  // namespace cuda_detail
}  // namespace dffkit
