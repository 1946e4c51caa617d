// The CPU engine. For each row block b of X (held in cache while it is used):
//   Frobenius: N_b = X_b H^T -> W_b <- W_b * N_b / (W_b G_H + penalties [+ group term])
//              -> P += W_b^T X_b, G_W += W_b^T W_b
//   KL:        R_b = X_b / (W_b H) -> N_b = R_b H^T -> W_b <- W_b * N_b / (1 H^T + penalties)
//              -> R'_b = X_b / (W_b H) with the new W_b -> P += W_b^T R'_b, colsum += W_b
// then H <- H * P / (G_W H + penalties) (Frobenius) or H * P / (colsum + penalties) (KL).
// Rows are split into chunks that depend on the shape only; each chunk accumulates its own
// partial P and G_W, and partials are added in chunk order, so the result is the same for any
// number of threads. Frobenius error: ||X||^2 - 2 <P, H> + <G_W, H H^T> (float64).
#include "nmf_mu_cpu.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>

#include "mu_update.hpp"
#include "philox.hpp"
#include "philox_fill.hpp"
#include "simd_kernels.hpp"
#include "threads.hpp"

namespace dffkit {
namespace {

using namespace simd_kernels;

// out[a*ldo + b] = sum_l A[a, l] B[b, l] for an RA x RB tile. Element l of a row always goes to
// lane l % L and lanes are added by the same tree, so every tile shape gives the same bits.
template <class T, int RA, int RB>
inline void dot_tile(const T* A, i64 lda, const T* B, i64 ldb, i64 n, T* out, i64 ldo) {
  constexpr int L = simd<T>::L;
  vec<T> acc[RA][RB];
  for (int a = 0; a < RA; ++a)
    for (int b = 0; b < RB; ++b) acc[a][b] = vec<T>{};
  const i64 nf = n / L * L;
  for (i64 l = 0; l < nf; l += L) {
    vec<T> av[RA], bv[RB];
    for (int a = 0; a < RA; ++a) { av[a] = load(A + a * lda + l); in_register(av[a]); }
    for (int b = 0; b < RB; ++b) { bv[b] = load(B + b * ldb + l); in_register(bv[b]); }
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) acc[a][b] += av[a] * bv[b];
  }
  if (nf < n) {
    const int r = int(n - nf);
    vec<T> av[RA], bv[RB];
    for (int a = 0; a < RA; ++a) av[a] = load_part(A + a * lda + nf, r);
    for (int b = 0; b < RB; ++b) bv[b] = load_part(B + b * ldb + nf, r);
    for (int a = 0; a < RA; ++a)
      for (int b = 0; b < RB; ++b) acc[a][b] += av[a] * bv[b];
  }
  for (int a = 0; a < RA; ++a) {
    int b = 0;
    for (; b + 2 <= RB; b += 2) hsum2(acc[a][b], acc[a][b + 1], &out[a * ldo + b], &out[a * ldo + b + 1]);
    if (b < RB) out[a * ldo + b] = hsum<T>(acc[a][b]);
  }
}

template <class T, int RA>
inline void dot_tile_cols(const T* A, i64 lda, const T* B, i64 ldb, i64 rb, i64 n, T* out,
                          i64 ldo) {
  switch (rb) {
    case 1: return dot_tile<T, RA, 1>(A, lda, B, ldb, n, out, ldo);
    case 2: return dot_tile<T, RA, 2>(A, lda, B, ldb, n, out, ldo);
    case 3: return dot_tile<T, RA, 3>(A, lda, B, ldb, n, out, ldo);
    case 4: return dot_tile<T, RA, 4>(A, lda, B, ldb, n, out, ldo);
    case 5: return dot_tile<T, RA, 5>(A, lda, B, ldb, n, out, ldo);
    case 6: return dot_tile<T, RA, 6>(A, lda, B, ldb, n, out, ldo);
    default: return dot_tile<T, RA, 7>(A, lda, B, ldb, n, out, ldo);
  }
}

/// out (ra x rb, ld ldo) = A (ra x n) B^T (B: rb x n). Tiles of 4 rows x up to 4 columns when
/// rb is large, 2 rows x up to 7 columns for the narrow rb of small ranks.
template <class T>
void dot_rows(const T* A, i64 lda, i64 ra, const T* B, i64 ldb, i64 rb, i64 n, T* out, i64 ldo) {
  // RA * RB accumulators and RA + RB operands in registers: with 16 registers, half the rows
  constexpr int RN = kManyRegs ? 2 : 1, RW = kManyRegs ? 4 : 2;
  if (rb <= 7) {
    i64 a = 0;
    for (; a + RN <= ra; a += RN) dot_tile_cols<T, RN>(A + a * lda, lda, B, ldb, rb, n, out + a * ldo, ldo);
    for (; a < ra; ++a) dot_tile_cols<T, 1>(A + a * lda, lda, B, ldb, rb, n, out + a * ldo, ldo);
    return;
  }
  i64 a = 0;
  for (; a + RW <= ra; a += RW) {
    i64 b = 0;
    for (; b + 4 <= rb; b += 4)
      dot_tile<T, RW, 4>(A + a * lda, lda, B + b * ldb, ldb, n, out + a * ldo + b, ldo);
    if (b < rb) dot_tile_cols<T, RW>(A + a * lda, lda, B + b * ldb, ldb, rb - b, n, out + a * ldo + b, ldo);
  }
  for (; a < ra; ++a)
    for (i64 b = 0; b < rb; ++b)
      dot_tile<T, 1, 1>(A + a * lda, lda, B + b * ldb, ldb, n, out + a * ldo + b, ldo);
}


// RA rows of out, V vectors of columns at a time (outer_tile): each vector of H loaded once
// serves RA rows.
template <class T, int RA, int V>
inline void product_ch_tile(const T* C, i64 k, const T* H, i64 ldh, i64 l, T* out, i64 ldo) {
  outer_tile<T, RA, V>(C, k, H, ldh, k, l, out, ldo, l + V * simd<T>::L);
}

// WIDE: 4 vectors of columns at a time first (rows of at least 4 vectors, 32 registers)
template <class T, int RA, bool WIDE = false>
inline void product_ch_rows(const T* C, i64 k, const T* H, i64 ldh, i64 n, T* out, i64 ldo) {
  constexpr int L = simd<T>::L;
  const i64 nf = n / L * L;
  i64 l = 0;
  if (WIDE)
    for (; l + 4 * L <= nf; l += 4 * L) product_ch_tile<T, RA, 4>(C, k, H, ldh, l, out, ldo);
  for (; l + 2 * L <= nf; l += 2 * L) product_ch_tile<T, RA, 2>(C, k, H, ldh, l, out, ldo);
  for (; l < nf; l += L) product_ch_tile<T, RA, 1>(C, k, H, ldh, l, out, ldo);
  if (nf < n) {
    const int rem = int(n - nf);
    vec<T> acc[RA];
    for (int r = 0; r < RA; ++r) acc[r] = vec<T>{};
    for (i64 j = 0; j < k; ++j) {
      const vec<T> h = load_part(H + j * ldh + nf, rem);
      for (int r = 0; r < RA; ++r) acc[r] += splat(C[r * k + j]) * h;
    }
    for (int r = 0; r < RA; ++r) store_part(out + r * ldo + nf, acc[r], rem);
  }
}

/// out (rows x n, ld ldo) = C (rows x k) H (k x n, ld ldh): every element summed over j in
/// order from zero, whatever the tile, so the bits do not depend on how rows are grouped.
template <class T>
void product_ch(const T* C, i64 rows, i64 k, const T* H, i64 ldh, i64 n, T* out, i64 ldo) {
  // tiles of 6 rows x 4 vectors with 32 registers where a row has 4 vectors (G_W H at
  // 512 x 16384, k = 64: 1.35 -> 0.58 ms; KL's W_b H), else 4 rows x 2 (a separate instance: the
  // wide loop in the same one slowed 784 x 55, k = 5 by 10 %)
  i64 i = 0;
  if (kManyRegs && n >= 4 * simd<T>::L) {
    for (; i + 6 <= rows; i += 6)
      product_ch_rows<T, 6, true>(C + i * k, k, H, ldh, n, out + i * ldo, ldo);
    for (; i + 4 <= rows; i += 4)
      product_ch_rows<T, 4, true>(C + i * k, k, H, ldh, n, out + i * ldo, ldo);
    for (; i < rows; ++i) product_ch_rows<T, 1, true>(C + i * k, k, H, ldh, n, out + i * ldo, ldo);
    return;
  }
  for (; i + 4 <= rows; i += 4) product_ch_rows<T, 4>(C + i * k, k, H, ldh, n, out + i * ldo, ldo);
  for (; i < rows; ++i) product_ch_rows<T, 1>(C + i * k, k, H, ldh, n, out + i * ldo, ldo);
}
template <class T>
void product_ch(const T* C, i64 rows, i64 k, const T* H, i64 n, T* out) {
  product_ch(C, rows, k, H, n, n, out, n);
}

/// G (k x k) += C^T C over rows, in row order (symmetric to the bit: each entry is the same
/// sequence of products).
template <class T>
void accumulate_gram(const T* C, i64 rows, i64 k, T* G) {
  accumulate_ct_a(C, rows, k, C, k, k, G);
}

// Narrow X (n <= kNarrowN columns): the lane sums that close every dot product of dot_rows cost
// as much as its few vectors of multiply-adds (784 x 55, k = 5: 42 GFLOP/s against 140 at
// n = 512). From X^T instead, a vector holds L rows (16, 8 in float64, with AVX-512) and each
// row's sum over l runs in order, with no lane sums. The transposed copy is made once per fit (X does not change),
// block by block of the sweep (each block's n x rows contiguous, where its rows of X are). It
// doubles the bytes read per iteration (the P step still reads X), so only while X and the copy
// stay in cache (2 cores, 32 MB L3, against the row form: 12544 x 55 (2.6 MiB) 1.26x faster,
// 30000 x 55 (6.3 MiB) 1.21x, 60000 x 40 (9.2 MiB) 1.18x, 200000 x 55 (42 MiB) 1.8x slower).
constexpr i64 kNarrowN = 64;
constexpr i64 kNarrowMaxBytes = i64(8) << 20;

// N[t, j0 + j] = sum_l Xt[l, t] H[j0 + j, l] for rows t < valid (RV vectors of rows; FULL: all
// RV * L rows valid), KJ columns of N.
template <class T, int RV, int KJ, bool FULL>
inline void narrow_tile(const T* Xt, i64 ldt, int valid, const T* H, i64 n, i64 j0, T* N, i64 k) {
  constexpr int L = simd<T>::L;
  vec<T> acc[RV][KJ];
  for (int v = 0; v < RV; ++v)
    for (int j = 0; j < KJ; ++j) acc[v][j] = vec<T>{};
  for (i64 l = 0; l < n; ++l) {
    vec<T> x[RV];
    for (int v = 0; v < RV; ++v) {
      x[v] = FULL ? load(Xt + l * ldt + v * L) : load_part(Xt + l * ldt + v * L, valid - v * L);
      in_register(x[v]);
    }
    for (int j = 0; j < KJ; ++j) {
      const vec<T> h = splat(H[(j0 + j) * n + l]);
      for (int v = 0; v < RV; ++v) acc[v][j] += x[v] * h;
    }
  }
  alignas(64) T tmp[KJ][RV * L];
  for (int j = 0; j < KJ; ++j)
    for (int v = 0; v < RV; ++v) store(tmp[j] + v * L, acc[v][j]);
  for (int t = 0; t < valid; ++t)
    for (int j = 0; j < KJ; ++j) N[t * k + j0 + j] = tmp[j][t];
}

template <class T, int RV, bool FULL>
inline void narrow_rows(const T* Xt, i64 ldt, int valid, const T* H, i64 n, i64 k, T* N) {
  for (i64 j0 = 0; j0 < k; j0 += 8) {
    switch (std::min<i64>(8, k - j0)) {
      case 1: narrow_tile<T, RV, 1, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 2: narrow_tile<T, RV, 2, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 3: narrow_tile<T, RV, 3, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 4: narrow_tile<T, RV, 4, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 5: narrow_tile<T, RV, 5, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 6: narrow_tile<T, RV, 6, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      case 7: narrow_tile<T, RV, 7, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
      default: narrow_tile<T, RV, 8, FULL>(Xt, ldt, valid, H, n, j0, N, k); break;
    }
  }
}

/// N (rows x k) = X_b H^T from the block's transpose Xt (n x rows, leading dimension ldt).
/// Each element is summed over l in order from zero: the bits do not depend on the grouping.
template <class T>
void narrow_product(const T* Xt, i64 ldt, i64 rows, const T* H, i64 n, i64 k, T* N) {
  constexpr int L = simd<T>::L;
  i64 r = 0;
  if (kManyRegs)  // 2 x 8 accumulators
    for (; r + 2 * L <= rows; r += 2 * L) narrow_rows<T, 2, true>(Xt + r, ldt, 2 * L, H, n, k, N + r * k);
  for (; r + L <= rows; r += L) narrow_rows<T, 1, true>(Xt + r, ldt, L, H, n, k, N + r * k);
  if (r < rows) narrow_rows<T, 1, false>(Xt + r, ldt, int(rows - r), H, n, k, N + r * k);
}

/// X H^T by outer products (outer_product) or by row dot products (dot_rows), from the shape.
/// The outer form computes whole vectors of columns of N, so it needs a rank that fills them:
/// k >= 16, at most a quarter of the last vector's lanes wasted, or three eighths (k = 20) where
/// X is over 8 MiB. It wins where X is larger than L2. N step alone, one thread, float32, best
/// of 3-50, against the row form: 2048^2 1.2-1.9x for k = 20 to 128, 20000 x 256 1.4-1.9x for
/// k = 16 to 64, 512 x 16384 2.2x at k = 16 and 64, 2000 x 512 1.2-1.3x at k = 24 to 64 but
/// 1.0 at k = 20. Whole fits, two threads: 1500 x 2000, k = 20, 33-35 -> 30.5 ms; 50000 x 512,
/// k = 20, 342-348 -> 274 ms. With X in L2 the row form holds its own (196 x 512: 212 against
/// 197 GFLOP/s at k = 16, 205 against 159 at k = 20), and at small ranks it is 1.2-3x faster
/// (k = 5 and 8).
template <class T>
bool use_outer_product(i64 m, i64 n, i64 k) {
  constexpr int L = simd<T>::L;
  const i64 kp = (k + L - 1) / L * L;
  const i64 bytes = m * n * i64(sizeof(T));
  // m >= 2 kp: the copy H^T (n x kp) stays under half the size of X
  if (k < 16 || bytes <= (i64(1) << 20) || m < 2 * kp) return false;
  return 4 * (kp - k) <= kp || (bytes > (i64(8) << 20) && 8 * (kp - k) <= 3 * kp);
}

/// Below this many multiply-adds per sweep a problem runs on one thread: a fork/join per
/// iteration costs little on an idle machine but a whole time slice when another process holds
/// the second core (measured here: 27 us/iter on one thread, 177 us/iter on two, loaded).
constexpr i64 kParallelWork = i64(1) << 21;

inline int resolve_threads(int requested) { return usable_threads(requested); }

/// Chunks of rows that depend on the shape only (fixed reduction order for any thread count).
struct Chunking {
  i64 n_chunks, m;
  i64 begin(i64 c) const { return c * m / n_chunks; }
  i64 end(i64 c) const { return (c + 1) * m / n_chunks; }
};

/// At most 64 chunks of at least 64 rows, and at least 4k rows each: a chunk's partial P
/// (k x n: zeroed, accumulated, then read by the reduction) costs about 3k/rows of the traffic of
/// its rows of X, so short chunks at a large rank spend more on partials than on X (2048^2 at
/// k = 64 with 64-row chunks: sweep 6.9 ms, with 256-row chunks 4.2 ms, 2 cores).
/// A problem under kParallelWork runs on one thread whatever the thread count, so it needs no
/// chunks for its bits to be the same on any: one chunk, no partials to zero and add
/// (784 x 55, k = 5: a sweep 12 -> 10 us).
template <class T>
Chunking make_chunking(i64 m, i64 n, i64 k) {
  if (m * n * k < kParallelWork) return {1, m};
  i64 c = std::min<i64>(64, (m + 63) / 64);
  c = std::min<i64>(c, std::max<i64>(1, m / (4 * std::max<i64>(1, k))));
  const i64 cap = (i64(256) << 20) / std::max<i64>(1, k * n * i64(sizeof(T)));
  c = std::max<i64>(1, std::min(c, cap));
  return {c, m};
}

/// Rows per block: the block of X (rows x n) should stay in L2 while it is used twice, and
/// have at least k rows (up to 128): the P step reads and writes the chunk's k x n partial once
/// per block, 2k/rows of the block's X traffic (2048^2, k = 64: 24-row blocks 4.7 ms a sweep,
/// 64-row blocks 4.1 ms). The block size does not change the bits: rows are added in order.
inline i64 block_rows(i64 n, std::size_t elem, i64 k) {
  const i64 target = (i64(192) << 10) / std::max<i64>(1, n * i64(elem));
  const i64 rows = std::max(target, std::min<i64>(k, 128));
  return std::max<i64>(4, std::min<i64>(128, (rows + 3) / 4 * 4));
}

template <class T>
struct Workspace {
  Chunking ch;
  std::vector<T> P_part, G_part, colsum_part;  // per chunk: k*n, k*k, k
  std::vector<double> dot0_part;               // per chunk: <X H^T, W> of the first sweep
  std::vector<T> P, G_W, G_H, colsum, rowsum_H, H_new;
  std::vector<T> blockbuf;                     // per thread: N (rows*k), Wnew row, R (rows*n)
  std::vector<double> group_norm;              // n_groups * k
  std::vector<T> Xt;  // narrow X: each sweep block's X_b^T (n x rows) at the block's offset r0 n
  std::vector<T> Ht;  // outer-product X H^T: H^T (n x kp), refreshed with H
  i64 kp = 0;
  i64 brows;
};

template <class T>
void compute_gram_rows(const T* A, i64 rows, i64 n, T* G) {
  // G = A A^T (rows x rows); only used for H H^T (k x k).
  dot_rows(A, n, rows, A, n, rows, n, G, rows);
}

/// sum_i f(X[i]) in float64 in the fixed chunked order shared with the CUDA backend: kMeanChunk
/// consecutive elements summed in order, then the chunk sums in order. Eight chunks are summed
/// side by side (eight independent chains, each in its own order: the same bits as one chunk
/// at a time, which waited on each addition's latency: 1 ns an element, 25 ms of the 38 ms that
/// init="random" took for 50000 x 512).
template <class T, class F>
double chunked_sum(const T* X, i64 count, int nt, F f) {
  constexpr i64 G = 8;
  const i64 nc = (count + kMeanChunk - 1) / kMeanChunk, ng = (nc + G - 1) / G;
  std::vector<double> part(nc);
#pragma omp parallel for num_threads(nt) schedule(static) if (nc > 64)
  for (i64 g = 0; g < ng; ++g) {
    const i64 c0 = g * G;
    if ((c0 + G) * kMeanChunk <= count) {
      double s[G] = {};
      const T* x = X + c0 * kMeanChunk;
      for (i64 i = 0; i < kMeanChunk; ++i)
        for (i64 j = 0; j < G; ++j) s[j] += f(double(x[j * kMeanChunk + i]));
      for (i64 j = 0; j < G; ++j) part[c0 + j] = s[j];
    } else {
      for (i64 c = c0; c < std::min(nc, c0 + G); ++c) {
        double s = 0;
        const i64 e = std::min(count, (c + 1) * kMeanChunk);
        for (i64 i = c * kMeanChunk; i < e; ++i) s += f(double(X[i]));
        part[c] = s;
      }
    }
  }
  double s = 0;
  for (double v : part) s += v;
  return s;
}

template <class T>
double frob_sq_norm(const T* X, i64 count, int nt) {
  return chunked_sum(X, count, nt, [](double x) { return x * x; });
}

template <class T>
void compute_group_norms(const T* W, const Problem& p, std::vector<double>& out, int nt = 1) {
  out.assign(p.n_groups * p.k, 0.0);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && p.m * p.k >= (i64(1) << 16))
  for (i64 g = 0; g < p.n_groups; ++g) {
    double* o = out.data() + g * p.k;
    for (i64 i = p.group_offsets[g]; i < p.group_offsets[g + 1]; ++i)
      for (i64 j = 0; j < p.k; ++j) o[j] += double(W[i * p.k + j]) * double(W[i * p.k + j]);
    for (i64 j = 0; j < p.k; ++j) o[j] = std::sqrt(o[j]);
  }
}

inline i64 group_of_row(const Problem& p, i64 row) {
  // offsets are sorted: last g with offsets[g] <= row and offsets[g+1] > row
  const i64* lo = p.group_offsets;
  const i64* it = std::upper_bound(lo, lo + p.n_groups + 1, row);
  return i64(it - lo) - 1;
}

template <class T>
double penalty_value(const T* W, const T* H, const Problem& p) {
  double s1w = 0, s2w = 0, s1h = 0, s2h = 0;
  for (i64 i = 0; i < p.m * p.k; ++i) { s1w += double(W[i]); s2w += double(W[i]) * double(W[i]); }
  for (i64 i = 0; i < p.k * p.n; ++i) { s1h += double(H[i]); s2h += double(H[i]) * double(H[i]); }
  double v = p.l1_W * s1w + 0.5 * p.l2_W * s2w + p.l1_H * s1h + 0.5 * p.l2_H * s2h + 0.5 * p.mu * s2h;
  if (p.group_offsets && p.lam > 0) {
    std::vector<double> nrm;
    compute_group_norms(W, p, nrm);
    double g = 0;
    for (double x : nrm) g += x;
    v += p.lam * g;
  }
  return v;
}

/// N_b = X_b H^T for the block of `rows` rows at r0, by the product the workspace prepared:
/// from X_b^T (narrow X), outer products with H^T (X over 1 MiB), or row dot products.
template <class T>
inline void frobenius_numerator(const T* X, const T* H, i64 n, i64 k, const Workspace<T>& ws,
                                i64 r0, i64 rows, T* Nb) {
  if (!ws.Xt.empty())
    narrow_product(ws.Xt.data() + r0 * n, rows, rows, H, n, k, Nb);
  else if (!ws.Ht.empty())
    outer_product(X + r0 * n, n, rows, ws.Ht.data(), ws.kp, n, k, Nb);
  else
    dot_rows(X + r0 * n, n, rows, H, n, k, n, Nb, k);
}

/// One sweep over X: updates W in place; accumulates P (if want_P), G_W, and for KL the
/// column sums of the new W. first: also accumulate <X H^T, W_old> for the initial error.
template <class T>
void sweep(const T* X, T* W, const T* H, const Problem& p, Workspace<T>& ws, bool want_P,
           bool first, int nt) {
  const i64 n = p.n, k = p.k;
  const bool kl = p.loss == Loss::kullback_leibler;
  const bool groups = p.group_offsets != nullptr && p.lam > 0;
  const double tiny = double(std::numeric_limits<T>::min());
  const T l1 = T(p.l1_W), l2 = T(p.l2_W);
  const i64 nch = ws.ch.n_chunks, brows = ws.brows;
  std::fill(ws.G_part.begin(), ws.G_part.end(), T(0));
  if (want_P) std::fill(ws.P_part.begin(), ws.P_part.end(), T(0));
  if (kl) std::fill(ws.colsum_part.begin(), ws.colsum_part.end(), T(0));
  std::fill(ws.dot0_part.begin(), ws.dot0_part.end(), 0.0);
  const i64 per_thread = 2 * brows * k + k + (kl ? brows * n : 0);

#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nch > 1 && p.m * n * k >= kParallelWork)
  for (i64 c = 0; c < nch; ++c) {
    T* buf = ws.blockbuf.data() + i64(omp_get_thread_num()) * per_thread;
    T* Nb = buf;
    T* Db = Nb + brows * k;
    T* wrow = Db + brows * k;
    T* R = wrow + k;
    T* Pc = ws.P_part.data() + c * k * n;
    T* Gc = ws.G_part.data() + c * k * k;
    T* cs = kl ? ws.colsum_part.data() + c * k : nullptr;
    double dot0 = 0;
    for (i64 r0 = ws.ch.begin(c); r0 < ws.ch.end(c); r0 += brows) {
      const i64 rows = std::min(brows, ws.ch.end(c) - r0);
      const T* Xb = X + r0 * n;
      T* Wb = W + r0 * k;
      // numerator N_b
      if (!kl) {
        frobenius_numerator(X, H, n, k, ws, r0, rows, Nb);
      } else {
        product_ch(Wb, rows, k, H, n, R);
        for (i64 t = 0; t < rows * n; ++t) R[t] = kl_ratio(Xb[t], R[t]);
        if (!ws.Ht.empty())
          outer_product(R, n, rows, ws.Ht.data(), ws.kp, n, k, Nb);
        else
          dot_rows(R, n, rows, H, n, k, n, Nb, k);
      }
      if (first && !kl)
        for (i64 t = 0; t < rows * k; ++t) dot0 += double(Nb[t]) * double(Wb[t]);
      // W update. Without groups: the denominators of the whole block (W_b G_H, or the row sums
      // of H for KL) and one element-wise pass the compiler vectorises; with groups, row by row.
      if (!groups) {
        if (!kl) {
          product_ch(Wb, rows, k, ws.G_H.data(), k, Db);
        } else {
          for (i64 i = 0; i < rows; ++i)
            for (i64 j = 0; j < k; ++j) Db[i * k + j] = ws.rowsum_H[j];
        }
        const i64 cnt = rows * k;
        for (i64 t = 0; t < cnt; ++t) Wb[t] = mu_step(Wb[t], Nb[t], Db[t], l1, l2, T(0));
      }
      i64 g = groups ? group_of_row(p, r0) : 0;
      for (i64 i = 0; groups && i < rows; ++i) {
        T* w = Wb + i * k;
        const T* num = Nb + i * k;
        if (!kl) {
          for (i64 j = 0; j < k; ++j) wrow[j] = T(0);
          for (i64 a = 0; a < k; ++a) {
            const T wa = w[a];
            const T* gh = ws.G_H.data() + a * k;
            for (i64 j = 0; j < k; ++j) wrow[j] += wa * gh[j];
          }
        } else {
          for (i64 j = 0; j < k; ++j) wrow[j] = ws.rowsum_H[j];
        }
        while (g + 1 < p.n_groups && p.group_offsets[g + 1] <= r0 + i) ++g;
        const double* nrm = ws.group_norm.data() + g * k;
        for (i64 j = 0; j < k; ++j)
          wrow[j] = mu_step(w[j], num[j], wrow[j], l1, l2, group_term(w[j], p.lam, nrm[j], tiny));
        for (i64 j = 0; j < k; ++j) w[j] = wrow[j];
      }
      // accumulations with the new W while X_b is in cache
      accumulate_gram(Wb, rows, k, Gc);
      if (want_P) {
        if (!kl) {
          accumulate_ct_a(Wb, rows, k, Xb, n, n, Pc);
        } else {
          product_ch(Wb, rows, k, H, n, R);
          for (i64 t = 0; t < rows * n; ++t) R[t] = kl_ratio(Xb[t], R[t]);
          accumulate_ct_a(Wb, rows, k, R, n, n, Pc);
        }
      }
      if (kl)
        for (i64 i = 0; i < rows; ++i)
          for (i64 j = 0; j < k; ++j) cs[j] += Wb[i * k + j];
    }
    ws.dot0_part[c] = dot0;
  }

  // reductions in chunk order
  for (i64 a = 0; a < k; ++a)
    for (i64 b = a; b < k; ++b) {
      double s = 0;
      for (i64 c = 0; c < nch; ++c) s += double(ws.G_part[c * k * k + a * k + b]);
      ws.G_W[a * k + b] = ws.G_W[b * k + a] = T(s);
    }
  if (want_P) {
    const i64 kn = k * n;
#pragma omp parallel for num_threads(nt) schedule(static) if (kn * nch > 65536)
    for (i64 e = 0; e < kn; ++e) {
      double s = 0;
      for (i64 c = 0; c < nch; ++c) s += double(ws.P_part[c * kn + e]);
      ws.P[e] = T(s);
    }
  }
  if (kl)
    for (i64 j = 0; j < k; ++j) {
      double s = 0;
      for (i64 c = 0; c < nch; ++c) s += double(ws.colsum_part[c * k + j]);
      ws.colsum[j] = T(s);
    }
}

template <class T>
void update_h(T* H, const Problem& p, Workspace<T>& ws, int nt) {
  const i64 n = p.n, k = p.k;
  const bool kl = p.loss == Loss::kullback_leibler;
  const T l1 = T(p.l1_H), l2 = T(p.l2_H), mu = T(p.mu);
  if (kl)
    for (i64 j = 0; j < k; ++j)
      if (ws.colsum[j] == T(0)) ws.colsum[j] = T(1);
  T* Hn = ws.H_new.data();
  const i64 nb = (n + 255) / 256;
#pragma omp parallel for num_threads(nt) schedule(static) if (k * k * n > 200000)
  for (i64 blk = 0; blk < nb; ++blk) {
    const i64 l0 = blk * 256, l1e = std::min(n, l0 + 256);
    if (!kl) product_ch(ws.G_W.data(), k, k, H + l0, n, l1e - l0, Hn + l0, n);  // G_W H
    for (i64 j = 0; j < k; ++j) {
      T* out = Hn + j * n;
      if (kl)
        for (i64 l = l0; l < l1e; ++l) out[l] = ws.colsum[j];
      const T* h = H + j * n;
      const T* num = ws.P.data() + j * n;
      for (i64 l = l0; l < l1e; ++l) {
        T v = mu_step(h[l], num[l], out[l], l1, l2, mu > T(0) ? mu * h[l] : T(0));
        out[l] = kl ? kl_clamp_h(v) : v;
      }
    }
  }
  std::copy(ws.H_new.begin(), ws.H_new.end(), H);
}

template <class T>
void refresh_h_stats(const T* H, const Problem& p, Workspace<T>& ws, int nt) {
  const i64 n = p.n, k = p.k, kp = ws.kp;
  // on all threads where H^T is kept (X over 1 MiB, k >= 16): serial, the transpose and H H^T
  // would not shrink with more cores (one thread against two: 114 against 63 us an iteration at
  // 2048^2, k = 64, of about 3 ms; 1.15 against 0.63 ms at 512 x 16384)
  const bool par = !ws.Ht.empty() && k * k * n >= kParallelWork;
  if (!ws.Ht.empty()) {
    T* Ht = ws.Ht.data();
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
    for (i64 l0 = 0; l0 < n; l0 += 64)
      for (i64 j = 0; j < k; ++j)
        for (i64 l = l0; l < std::min(n, l0 + 64); ++l) Ht[l * kp + j] = H[j * n + l];
  }
  if (p.loss == Loss::frobenius) {
    // H H^T: with H^T at hand by outer products, 8 rows of it to a task (the bits do not depend
    // on the rows' grouping; symmetric to the bit either way: entries (a, b) and (b, a) are the
    // same products in the same order)
    if (!ws.Ht.empty()) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par)
      for (i64 r0 = 0; r0 < k; r0 += 8)
        outer_product(H + r0 * n, n, std::min<i64>(8, k - r0), ws.Ht.data(), kp, n, k,
                      ws.G_H.data() + r0 * k);
    } else {
      compute_gram_rows(H, p.k, p.n, ws.G_H.data());
    }
  } else {
    for (i64 j = 0; j < p.k; ++j) {
      double s = 0;  // float64 sum of the row: scikit-learn sums in the array's dtype (pairwise)
      for (i64 l = 0; l < p.n; ++l) s += double(H[j * p.n + l]);
      ws.rowsum_H[j] = T(s);
    }
  }
}

/// ||X - W H||^2 from the sweep's statistics: ||X||^2 - 2 <P, H> + <G_W, G_H>. Only for float64
/// (see fit_mu_cpu): the terms are of the size of ||X||^2 and cancel when the fit is good.
template <class T>
double frob_sq_from_stats(double xx, const T* H, const Problem& p, const Workspace<T>& ws) {
  double ph = 0, gg = 0;
  for (i64 e = 0; e < p.k * p.n; ++e) ph += double(ws.P[e]) * double(H[e]);
  for (i64 e = 0; e < p.k * p.k; ++e) gg += double(ws.G_W[e]) * double(ws.G_H[e]);
  return xx - 2.0 * ph + gg;
}

}  // namespace

template <class T>
double mean_fixed_order(const T* X, std::int64_t count, int num_threads) {
  return chunked_sum(X, count, resolve_threads(num_threads), [](double x) { return x; }) /
         double(count);
}

template <class T>
void random_init_cpu(const T* X, T* W, T* H, i64 m, i64 n, i64 k, std::uint64_t seed,
                     int num_threads) {
  random_init_from_mean(mean_fixed_order(X, m * n, num_threads), W, H, m, n, k, seed,
                        num_threads);
}

template <class T>
void random_init_from_mean(double mean, T* W, T* H, i64 m, i64 n, i64 k, std::uint64_t seed,
                           int num_threads) {
  const int nt = resolve_threads(num_threads);
  const double scale = std::sqrt(mean / double(k));
  auto fill = [&](T* out, i64 count, std::uint32_t stream) {
    constexpr i64 kBlock = 4096;
    const i64 nb = (count + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(nt) schedule(static) if (count > 65536)
    for (i64 b = 0; b < nb; ++b)
      philox_fill_scaled(out + b * kBlock, std::min(kBlock, count - b * kBlock), scale, seed, stream,
                         std::uint64_t(b * kBlock));
  };
  fill(W, m * k, 0);
  fill(H, k * n, 1);
}

template <class T>
double beta_error_cpu(const T* X, const T* W, const T* H, const Problem& p, int num_threads) {
  const int nt = resolve_threads(num_threads);
  const i64 m = p.m, n = p.n, k = p.k;
  const Chunking ch = make_chunking<T>(m, n, k);
  const i64 brows = block_rows(n, sizeof(T), k);
  const bool kl = p.loss == Loss::kullback_leibler;
  std::vector<double> part(ch.n_chunks, 0.0);
  std::vector<T> buf(i64(nt) * brows * n);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (ch.n_chunks > 1)
  for (i64 c = 0; c < ch.n_chunks; ++c) {
    T* R = buf.data() + i64(omp_get_thread_num()) * brows * n;
    double s = 0;
    for (i64 r0 = ch.begin(c); r0 < ch.end(c); r0 += brows) {
      const i64 rows = std::min(brows, ch.end(c) - r0);
      product_ch(W + r0 * k, rows, k, H, n, R);
      const T* Xb = X + r0 * n;
      if (!kl) {
        // eight running sums (a vector of them; one sum waits on its own adds), added in a
        // fixed order: 196 x 512, k = 5, a call with max_iter = 0 (this pass and the Python
        // checks) 0.109 -> 0.061 ms
        const i64 cnt = rows * n;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        i64 t = 0;
        for (; t + 8 <= cnt; t += 8)
          for (int u = 0; u < 8; ++u) {
            const double d = double(Xb[t + u]) - double(R[t + u]);
            acc[u] += d * d;
          }
        for (int u = 0; t < cnt; ++t, ++u) {
          const double d = double(Xb[t]) - double(R[t]);
          acc[u] += d * d;
        }
        s += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        continue;
      }
      // scikit-learn's divergence, sum over x > eps of x log(x / max(wh, eps)) - x + wh, plus
      // wh where x <= eps, term by term: x (u - log1p(u)), u = wh / x - 1, does not cancel as
      // wh nears x (summed as sum(x log(x / wh)) + sum(WH) - sum(X), a fit 1e-5 from exact
      // kept only 1e-4 of the divergence)
      for (i64 t = 0; t < rows * n; ++t) {
        const double x = double(Xb[t]), wh = double(R[t]);
        if (Xb[t] > T(kEpsilon)) {
          if (wh >= kEpsilon) {
            const double u = wh / x - 1.0;
            s += x * (u - std::log1p(u));
          } else {
            s += x * std::log(x / kEpsilon) - x + wh;
          }
        } else {
          s += wh;
        }
      }
    }
    part[c] = s;
  }
  double s = 0;
  for (i64 c = 0; c < ch.n_chunks; ++c) s += part[c];
  return kl ? std::sqrt(2.0 * std::max(s, 0.0)) : std::sqrt(s);
}

/// W against fixed components (update_H = false: NMF.transform), Frobenius, no group term: the
/// numerator X H^T does not change, so it is computed once (the sweep's products, the same
/// bits) and each iteration is W <- W * N / (W (H H^T)), m k^2 work instead of m n k, as
/// scikit-learn caches X H^T there too. Same updates, bit for bit, as the sweep makes them.
/// The error: ||X||^2 - 2 <X H^T, W> + <W^T W, H H^T> from X H^T and H H^T formed once in
/// float64 (from the float32 values too: each product exact before its rounding), m k^2 work a
/// time instead of a pass over X (the tol test's 12 passes were most of a transform of 64 x 4096
/// rows at k = 64); the direct pass where the identity leaves less than 1e-8 of ||X||^2, as the
/// float64 engine does.
template <class T>
Result fit_w_fixed_h(const T* X, T* W, const T* H, const Problem& p, const Options& o,
                     Workspace<T>& ws, int nt, const StopFn& should_stop,
                     std::vector<double>* objective, const ProgressFn& progress) {
  const i64 m = p.m, n = p.n, k = p.k;
  const i64 nch = ws.ch.n_chunks, brows = ws.brows;
  const T l1 = T(p.l1_W), l2 = T(p.l2_W);
  std::vector<T> N(m * k);
  const bool par = nch > 1 && m * n * k >= kParallelWork;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par)
  for (i64 c = 0; c < nch; ++c)
    for (i64 r0 = ws.ch.begin(c); r0 < ws.ch.end(c); r0 += brows) {
      const i64 rows = std::min(brows, ws.ch.end(c) - r0);
      frobenius_numerator(X, H, n, k, ws, r0, rows, N.data() + r0 * k);
    }
  // float64 X H^T and H H^T for the error (see above), where it is measured often (the tol
  // test, a recorded objective): with tol = 0 only the first and the last are, and two direct
  // passes cost less than these products. Rows of 8 to a task (each entry one dot product:
  // the bits do not depend on the grouping).
  const bool identity = o.tol > 0 || objective != nullptr;
  std::vector<double> H64, N64, G64;
  if (identity) {
    H64.assign(H, H + k * n);
    N64.assign(m * k, 0.0);
    G64.assign(k * k, 0.0);
    const bool par64 = (m + k) * n * k >= kParallelWork;
    // each thread's 8 rows of X in float64, allocated here: an exception must not leave an
    // OpenMP region (it would end the process)
    std::vector<double> Xr(i64(par64 ? std::max(nt, 1) : 1) * 8 * n);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par64)
    for (i64 t = 0; t < (k + 7) / 8 + (m + 7) / 8; ++t) {
      if (t < (k + 7) / 8) {
        const i64 a0 = t * 8, rows = std::min<i64>(8, k - a0);
        dot_rows(H64.data() + a0 * n, n, rows, H64.data(), n, k, n, G64.data() + a0 * k, k);
      } else {
        const i64 r0 = (t - (k + 7) / 8) * 8, rows = std::min<i64>(8, m - r0);
        double* xr = Xr.data() + i64(par64 ? omp_get_thread_num() : 0) * 8 * n;
        std::copy(X + r0 * n, X + (r0 + rows) * n, xr);
        dot_rows(xr, n, rows, H64.data(), n, k, n, N64.data() + r0 * k, k);
      }
    }
  }
  const double xx = identity ? frob_sq_norm(X, m * n, nt) : 0.0;
  std::vector<double> gw(k * k);
  auto error_now = [&]() {
    if (!identity) return beta_error_cpu(X, W, H, p, nt);
    double cross = 0;
    for (i64 e = 0; e < m * k; ++e) cross += N64[e] * double(W[e]);
    std::fill(gw.begin(), gw.end(), 0.0);
    for (i64 i = 0; i < m; ++i) {
      const T* w = W + i * k;
      for (i64 a = 0; a < k; ++a) {
        const double wa = double(w[a]);
        double* g = gw.data() + a * k;
        for (i64 b = 0; b < k; ++b) g[b] += wa * double(w[b]);
      }
    }
    double gg = 0;
    for (i64 e = 0; e < k * k; ++e) gg += gw[e] * G64[e];
    const double sq = xx - 2.0 * cross + gg;
    return sq < 1e-8 * xx ? beta_error_cpu(X, W, H, p, nt) : std::sqrt(sq);
  };

  Result res;
  res.error_init = error_now();
  double prev = res.error_init, err = res.error_init;
  bool err_fresh = true;
  const bool par_step = nch > 1 && m * k * k >= kParallelWork;
  int it = 0;
  for (it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || objective != nullptr;
#pragma omp parallel for num_threads(nt) schedule(static) if (par_step)
    for (i64 c = 0; c < nch; ++c) {
      T* Db = ws.blockbuf.data() + i64(omp_get_thread_num()) * (2 * brows * k + k) + brows * k;
      for (i64 r0 = ws.ch.begin(c); r0 < ws.ch.end(c); r0 += brows) {
        const i64 rows = std::min(brows, ws.ch.end(c) - r0);
        T* Wb = W + r0 * k;
        const T* Nb = N.data() + r0 * k;
        product_ch(Wb, rows, k, ws.G_H.data(), k, Db);
        for (i64 t = 0; t < rows * k; ++t) Wb[t] = mu_step(Wb[t], Nb[t], Db[t], l1, l2, T(0));
      }
    }
    err_fresh = false;
    if (need_err) {
      err = error_now();
      err_fresh = true;
      if (objective) objective->push_back(0.5 * err * err + penalty_value(W, H, p));
    }
    if (end_of_iteration(it, check, err, o.tol, prev, should_stop, progress, res)) break;
  }
  res.n_iter = std::min(it, o.max_iter);
  if (!err_fresh) err = error_now();
  res.error = err;
  return res;
}

template <class T>
Result fit_mu_cpu(const T* X, T* W, T* H, const Problem& p, const Options& o,
                  const StopFn& should_stop, std::vector<double>* objective,
                  const ProgressFn& progress) {
  check_problem(p);
  const int nt = resolve_threads(o.num_threads);
  const i64 m = p.m, n = p.n, k = p.k;
  const bool kl = p.loss == Loss::kullback_leibler;
  Workspace<T> ws;
  ws.ch = make_chunking<T>(m, n, k);
  ws.brows = block_rows(n, sizeof(T), k);
  const i64 nch = ws.ch.n_chunks;
  ws.P_part.assign(nch * k * n, T(0));
  ws.G_part.assign(nch * k * k, T(0));
  ws.dot0_part.assign(nch, 0.0);
  if (kl) ws.colsum_part.assign(nch * k, T(0));
  ws.P.assign(k * n, T(0));
  ws.G_W.assign(k * k, T(0));
  ws.G_H.assign(k * k, T(0));
  ws.colsum.assign(k, T(0));
  ws.rowsum_H.assign(k, T(0));
  ws.H_new.assign(k * n, T(0));
  const i64 per_thread = 2 * ws.brows * k + k + (kl ? ws.brows * n : 0);
  ws.blockbuf.assign(i64(std::max(nt, 1)) * per_thread, T(0));

  if (!kl && n <= kNarrowN && m * n * i64(sizeof(T)) <= kNarrowMaxBytes) {
    ws.Xt.resize(m * n);
    T* Xt = ws.Xt.data();
    const i64 brows = ws.brows;
#pragma omp parallel for num_threads(nt) schedule(static) if (nch > 1 && m * n * k >= kParallelWork)
    for (i64 c = 0; c < nch; ++c)  // the sweep's blocks, in its order
      for (i64 r0 = ws.ch.begin(c); r0 < ws.ch.end(c); r0 += brows) {
        const i64 rows = std::min(brows, ws.ch.end(c) - r0);
        T* t = Xt + r0 * n;
        for (i64 i = 0; i < rows; ++i)
          for (i64 l = 0; l < n; ++l) t[l * rows + i] = X[(r0 + i) * n + l];
      }
  }

  if (ws.Xt.empty() && use_outer_product<T>(m, n, k)) {
    ws.kp = (k + simd<T>::L - 1) / simd<T>::L * simd<T>::L;
    ws.Ht.assign(n * ws.kp, T(0));
  }

  Result res;
  // The error. KL and float32 measure it directly, one pass over X summing the residual in
  // float64 (beta_error_cpu), each time it is needed (every 10 iterations with tol > 0, the last
  // one, each with a recorded objective). float64 takes the Frobenius error from the sweep's
  // statistics instead (the trace identity, no extra pass): its terms are each about ||X||^2 and
  // cancel when the fit is good, which float32 sums cannot afford (a rank-2 X, 2000 x 100, from a
  // start near the solution: 2.94 reported against 1.98 true, and the tol test stopped at 470 of
  // 990 iterations). float64 falls back to the direct pass where the identity leaves less than
  // 1e-8 of ||X||^2 (its float64 rounding, estimated, is some 1e-14 of it). Cost, measured:
  // tol = 1e-4, one image k = 5 2.28-2.40 -> 2.41-2.86 ms; tol = 0 unchanged within noise.
  const bool direct_err = kl || std::is_same<T, float>::value;
  refresh_h_stats(H, p, ws, nt);
  const bool groups = p.group_offsets != nullptr && p.lam > 0;
  if (!o.update_H && !kl && !groups && o.max_iter >= 1)
    return fit_w_fixed_h(X, W, H, p, o, ws, nt, should_stop, objective, progress);
  const double xx = direct_err ? 0.0 : frob_sq_norm(X, m * n, nt);

  if (direct_err || o.max_iter < 1) res.error_init = beta_error_cpu(X, W, H, p, nt);
  double prev = res.error_init, err = res.error_init;
  bool err_fresh = direct_err || o.max_iter < 1;
  int it = 0;
  for (it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || objective != nullptr;
    if (groups) compute_group_norms(W, p, ws.group_norm, nt);
    if (it == 1 && !direct_err) {
      // <W0^T W0, H0 H0^T> for the initial error, before W changes
      std::vector<T> g0(k * k, T(0));
      accumulate_gram(W, m, k, g0.data());
      double gg = 0;
      for (i64 a = 0; a < k; ++a)
        for (i64 b = 0; b < k; ++b) {
          const T v = a <= b ? g0[a * k + b] : g0[b * k + a];
          gg += double(v) * double(ws.G_H[a * k + b]);
        }
      // W0, for the direct pass where the identity leaves too little (below)
      const std::vector<T> W0(W, W + m * k);
      sweep(X, W, H, p, ws, o.update_H || need_err, true, nt);
      double dot0 = 0;
      for (double v : ws.dot0_part) dot0 += v;
      const double sq0 = xx - 2.0 * dot0 + gg;
      // the same fallback as every later error (H is still H0 here): a start at an exact fit
      // gave sqrt(eps) ||X|| of noise (4e-8 where scikit-learn's direct sum gives 8e-16), and
      // the tol test, relative to it, stopped elsewhere than scikit-learn's
      res.error_init = sq0 < 1e-8 * xx ? beta_error_cpu(X, W0.data(), H, p, nt) : std::sqrt(sq0);
      prev = res.error_init;
    } else {
      sweep(X, W, H, p, ws, o.update_H || (need_err && !direct_err), false, nt);
    }
    if (o.update_H) {
      update_h(H, p, ws, nt);
      refresh_h_stats(H, p, ws, nt);
    }
    err_fresh = false;
    if (need_err) {
      const double sq = direct_err ? 0.0 : frob_sq_from_stats(xx, H, p, ws);
      err = direct_err || sq < 1e-8 * xx ? beta_error_cpu(X, W, H, p, nt) : std::sqrt(sq);
      err_fresh = true;
      if (objective) objective->push_back(0.5 * err * err + penalty_value(W, H, p));
    }
    if (end_of_iteration(it, check, err, o.tol, prev, should_stop, progress, res)) break;
  }
  res.n_iter = std::min(it, o.max_iter);
  if (!err_fresh) err = beta_error_cpu(X, W, H, p, nt);
  res.error = err;
  return res;
}

template <class T>
void fit_mu_cpu_batched(std::vector<BatchItem<T>>& items, const Options& o,
                        const StopFn& should_stop) {
  const i64 count = i64(items.size());
  if (count == 0) return;
  if (count == 1) {
    // one problem: the whole thread budget inside it (the same bits: they do not depend on the
    // thread count), and no team of threads left spinning after a loop of one
    auto& it = items[0];
    it.result = fit_mu_cpu(it.X, it.W, it.H, it.problem, o, should_stop, nullptr);
    return;
  }
  // no more threads than problems: an idle OpenMP thread spins for milliseconds after the loop,
  // taking a core from whatever runs next (numpy's BLAS in the DFF maps: 0.6 -> 2 to 4 ms)
  const int nt = int(std::min<i64>(resolve_threads(o.num_threads), count));
  Options one = o;
  one.num_threads = 1;
  std::atomic<bool> stop{false};
  std::exception_ptr error;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (i64 b = 0; b < count; ++b) {
    if (stop.load()) continue;
    try {
      auto& it = items[b];
      StopFn local = [&]() {
        if (omp_get_thread_num() == 0 && should_stop && should_stop()) stop = true;
        return stop.load();
      };
      it.result = fit_mu_cpu(it.X, it.W, it.H, it.problem, one, local, nullptr);
    } catch (...) {
#pragma omp critical(dffkit_batched_error)
      if (!error) error = std::current_exception();
      stop = true;
    }
  }
  if (error) std::rethrow_exception(error);
}

// How the engine was compiled, as constant data: reading it runs none of the engine's code,
// so a module built for instructions this CPU lacks can be refused before any of them runs.
#define DFFKIT_STR2(x) #x
#define DFFKIT_STR(x) DFFKIT_STR2(x)
#if defined(__clang__)
#define DFFKIT_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define DFFKIT_COMPILER "gcc " __VERSION__
#else
#define DFFKIT_COMPILER "unknown"
#endif
#if defined(__x86_64__) || defined(_M_X64)
#define DFFKIT_ISA_BASE "x86-64"
#elif defined(__aarch64__)
#define DFFKIT_ISA_BASE "aarch64"
#else
#define DFFKIT_ISA_BASE "other"
#endif
#ifdef __SSE4_2__
#define DFFKIT_ISA_SSE42 " sse4_2"
#else
#define DFFKIT_ISA_SSE42 ""
#endif
#ifdef __AVX__
#define DFFKIT_ISA_AVX " avx"
#else
#define DFFKIT_ISA_AVX ""
#endif
#ifdef __AVX2__
#define DFFKIT_ISA_AVX2 " avx2"
#else
#define DFFKIT_ISA_AVX2 ""
#endif
#ifdef __FMA__
#define DFFKIT_ISA_FMA " fma"
#else
#define DFFKIT_ISA_FMA ""
#endif
#ifdef __AVX512F__
#define DFFKIT_ISA_AVX512F " avx512f"
#else
#define DFFKIT_ISA_AVX512F ""
#endif
#ifdef __AVX512DQ__
#define DFFKIT_ISA_AVX512DQ " avx512dq"
#else
#define DFFKIT_ISA_AVX512DQ ""
#endif
#ifdef __AVX512BW__
#define DFFKIT_ISA_AVX512BW " avx512bw"
#else
#define DFFKIT_ISA_AVX512BW ""
#endif
#ifdef __AVX512VL__
#define DFFKIT_ISA_AVX512VL " avx512vl"
#else
#define DFFKIT_ISA_AVX512VL ""
#endif
#ifdef __ARM_NEON
#define DFFKIT_ISA_NEON " neon"
#else
#define DFFKIT_ISA_NEON ""
#endif
#ifdef _OPENMP
#define DFFKIT_OPENMP DFFKIT_STR(_OPENMP)
#else
#define DFFKIT_OPENMP "none"
#endif
#if DFFKIT_PHILOX_SIMD
#define DFFKIT_INIT_PATH "vector"
#else
#define DFFKIT_INIT_PATH "scalar"
#endif
#if defined(__SANITIZE_ADDRESS__)
#define DFFKIT_SANITIZERS "address"
#elif defined(__SANITIZE_THREAD__)
#define DFFKIT_SANITIZERS "thread"
#else
#define DFFKIT_SANITIZERS "none"
#endif

extern const char engine_build_text[] =
    "compiler=" DFFKIT_COMPILER
    "\ninstruction_sets=" DFFKIT_ISA_BASE DFFKIT_ISA_SSE42 DFFKIT_ISA_AVX DFFKIT_ISA_AVX2 DFFKIT_ISA_FMA
    DFFKIT_ISA_AVX512F DFFKIT_ISA_AVX512DQ DFFKIT_ISA_AVX512BW DFFKIT_ISA_AVX512VL DFFKIT_ISA_NEON
    "\nvector_bytes=" DFFKIT_STR(DFFKIT_VEC_BYTES) "\nvector_registers=" DFFKIT_STR(DFFKIT_VEC_REGS)
    "\nrandom_init=" DFFKIT_INIT_PATH "\nopenmp=" DFFKIT_OPENMP "\nsanitizers=" DFFKIT_SANITIZERS;

#define DFFKIT_INSTANTIATE(T)                                                                  \
  template Result fit_mu_cpu<T>(const T*, T*, T*, const Problem&, const Options&,             \
                                const StopFn&, std::vector<double>*, const ProgressFn&);       \
  template void fit_mu_cpu_batched<T>(std::vector<BatchItem<T>>&, const Options&,             \
                                      const StopFn&);                                          \
  template double beta_error_cpu<T>(const T*, const T*, const T*, const Problem&, int);        \
  template double mean_fixed_order<T>(const T*, std::int64_t, int);                            \
  template void random_init_cpu<T>(const T*, T*, T*, i64, i64, i64, std::uint64_t, int);     \
  template void random_init_from_mean<T>(double, T*, T*, i64, i64, i64, std::uint64_t, int);
DFFKIT_INSTANTIATE(float)
DFFKIT_INSTANTIATE(double)

}  // namespace dffkit
