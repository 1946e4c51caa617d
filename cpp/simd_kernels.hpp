#pragma once

// Vectors of the machine's width and the outer-product GEMM tile, shared by the dense engine
// (nmf_mu_cpu.cpp) and the sparse one (nmf_mu_sparse.cpp: W (H H^T) for large k).
#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Vectors of the machine's own width, and tiles sized to its register file: AVX-512 64 bytes and
// 32 registers, AVX/AVX2 32 bytes and 16, anything else (SSE2, NEON) 16 bytes (16 registers, 32
// on ARM64). With 64-byte vectors everywhere (before session 10), GCC lowered each AVX2 operation
// through memory: an x86-64-v3 build took 689 ms for 10 iterations of 2048^2, k = 64, against
// 78 ms for the AVX-512 build on the same Zen 5 core. A sum is split over lanes the same way on
// every machine of one width; machines of different widths give different last bits.
#if defined(__AVX512F__)
#define DFFKIT_VEC_BYTES 64
#define DFFKIT_VEC_REGS 32
#elif defined(__AVX__)
#define DFFKIT_VEC_BYTES 32
#define DFFKIT_VEC_REGS 16
#elif defined(__aarch64__)
#define DFFKIT_VEC_BYTES 16
#define DFFKIT_VEC_REGS 32
#else
#define DFFKIT_VEC_BYTES 16
#define DFFKIT_VEC_REGS 16
#endif

namespace dffkit {
namespace simd_kernels {

using i64 = std::int64_t;

constexpr bool kManyRegs = DFFKIT_VEC_REGS >= 32;

template <class T> struct simd;
template <> struct simd<float> {
  typedef float v __attribute__((vector_size(DFFKIT_VEC_BYTES)));
  static constexpr int L = DFFKIT_VEC_BYTES / 4;
};
template <> struct simd<double> {
  typedef double v __attribute__((vector_size(DFFKIT_VEC_BYTES)));
  static constexpr int L = DFFKIT_VEC_BYTES / 8;
};
template <class T> using vec = typename simd<T>::v;

template <class T> inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Loads and stores of the first `count` lanes (the tail of a row): masked instructions where
// AVX-512 is there, a copy through a zeroed vector elsewhere.
#if DFFKIT_VEC_BYTES == 64
inline vec<float> load_part(const float* p, int count) {
  return (vec<float>)_mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), p);
}
inline vec<double> load_part(const double* p, int count) {
  return (vec<double>)_mm512_maskz_loadu_pd(__mmask8((1u << count) - 1), p);
}
inline void store_part(float* p, vec<float> v, int count) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1), (__m512)v);
}
inline void store_part(double* p, vec<double> v, int count) {
  _mm512_mask_storeu_pd(p, __mmask8((1u << count) - 1), (__m512d)v);
}
#else
template <class T> inline vec<T> load_part(const T* p, int count) {
  vec<T> v = {};
  std::memcpy(&v, p, sizeof(T) * count);
  return v;
}
template <class T> inline void store_part(T* p, vec<T> v, int count) {
  std::memcpy(p, &v, sizeof(T) * count);
}
#endif
template <class T> inline void store(T* p, vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// One value in every lane. Written as `vec{} + x` this was an add of zero (it cannot be folded:
// 0 + (-0) is +0) and a register broadcast, two operations on the floating-point pipes for every
// splat of the axpy and outer-product kernels; a broadcast load is none.
#if DFFKIT_VEC_BYTES == 64
inline vec<float> splat(float x) { return (vec<float>)_mm512_set1_ps(x); }
inline vec<double> splat(double x) { return (vec<double>)_mm512_set1_pd(x); }
#elif DFFKIT_VEC_BYTES == 32
inline vec<float> splat(float x) { return (vec<float>)_mm256_set1_ps(x); }
inline vec<double> splat(double x) { return (vec<double>)_mm256_set1_pd(x); }
#else
template <class T> inline vec<T> splat(T x) { return x - vec<T>{}; }
#endif
// Sum of the lanes by a fixed pairwise tree (lane i + lane i + L/2, and so on): the same order
// everywhere; with shuffles at 64 bytes, a loop over the halves elsewhere (the same tree).
#if DFFKIT_VEC_BYTES == 64
// The tree on halves of shrinking width (the same sums in the same order as full-width
// shuffles, fewer and cheaper instructions: KL's sparse row kernel closes one per stored entry,
// and four full-width steps made it some 10 % slower).
inline float hsum_tree(vec<float> v) {
  typedef float f8 __attribute__((vector_size(32)));
  typedef float f4 __attribute__((vector_size(16)));
  const f8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline double hsum_tree(vec<double> v) {
  typedef double d4 __attribute__((vector_size(32)));
  typedef double d2 __attribute__((vector_size(16)));
  const d4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const d2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}

// Two lane sums at once with the same tree as hsum_tree (bit-identical results).
inline void hsum2(vec<float> a, vec<float> b, float* ra, float* rb) {
  vec<float> r = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  r += __builtin_shufflevector(r, r, 4, 5, 6, 7, 4, 5, 6, 7, 12, 13, 14, 15, 12, 13, 14, 15);
  r += __builtin_shufflevector(r, r, 2, 3, 2, 3, 2, 3, 2, 3, 10, 11, 10, 11, 10, 11, 10, 11);
  r += __builtin_shufflevector(r, r, 1, 1, 1, 1, 1, 1, 1, 1, 9, 9, 9, 9, 9, 9, 9, 9);
  *ra = r[0];
  *rb = r[8];
}
inline void hsum2(vec<double> a, vec<double> b, double* ra, double* rb) {
  vec<double> r = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  r += __builtin_shufflevector(r, r, 2, 3, 2, 3, 6, 7, 6, 7);
  r += __builtin_shufflevector(r, r, 1, 1, 1, 1, 5, 5, 5, 5);
  *ra = r[0];
  *rb = r[4];
}
#else
template <class T> inline T hsum_halves(vec<T> v) {
  constexpr int L = simd<T>::L;
  T a[L];
  std::memcpy(a, &v, sizeof(v));
  for (int w = L / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}
inline float hsum_tree(vec<float> v) { return hsum_halves<float>(v); }
inline double hsum_tree(vec<double> v) { return hsum_halves<double>(v); }
template <class T> inline void hsum2(vec<T> a, vec<T> b, T* ra, T* rb) {
  *ra = hsum_tree(a);
  *rb = hsum_tree(b);
}
#endif
template <class T> inline T hsum(vec<T> v) { return hsum_tree(v); }

// Keeps a loaded vector in a register: without it the compiler folds the load into every FMA
// that uses it, and a tile reloads its operands RA or RB times.
#if DFFKIT_VEC_BYTES == 64
template <class V> inline void in_register(V& v) { asm volatile("" : "+v"(v)); }
#elif DFFKIT_VEC_BYTES == 32
template <class V> inline void in_register(V& v) { asm volatile("" : "+x"(v)); }
#else
template <class V> inline void in_register(V&) {}
#endif

// X H^T by outer products, from H^T (n x kp: k rounded up to whole vectors, zero beyond k) made
// once per H. Per column l of X: V vectors of a row of H^T and R broadcasts of X feed R*V
// multiply-adds, with no lane sums at the end; the row-dot form (dot_rows) loads a vector per two
// multiply-adds of a 4 x 4 tile and closes every element with a lane tree. One thread (AVX-512),
// 2048^2 X, k = 64: 121-135 GFLOP/s by rows, 234-258 like this (numpy's SGEMM: 236 per core).
// N[r, j] is summed over l in order from zero, whatever the tile: the bits do not depend on how
// rows are grouped. The same tile serves product_ch (C H: X = C, Ht = H).
// N[r, j0 + ...] (ld ldn) = sum_l X[r, l] Ht[l, j0 + ...] for R rows and V vectors of columns, of
// which only those below `width` are stored (Ht readable to the whole vector).
template <class T, int R, int V>
inline void outer_tile(const T* X, i64 ldx, const T* Ht, i64 kp, i64 n, i64 j0, T* N, i64 ldn,
                       i64 width) {
  constexpr int L = simd<T>::L;
  vec<T> acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vec<T>{};
  for (i64 l = 0; l < n; ++l) {
    vec<T> h[V];
    for (int v = 0; v < V; ++v) { h[v] = load(Ht + l * kp + j0 + v * L); in_register(h[v]); }
    for (int r = 0; r < R; ++r) {
      const vec<T> c = splat(X[r * ldx + l]);
      for (int v = 0; v < V; ++v) acc[r][v] += c * h[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      const i64 col = j0 + v * L;  // < width: no whole vector lies beyond it
      if (col + L <= width)
        store(N + r * ldn + col, acc[r][v]);
      else
        store_part(N + r * ldn + col, acc[r][v], int(width - col));
    }
}

// All rows for the V vectors of columns from j0: tiles of R rows, the last rows in one tile.
template <class T, int R, int V>
void outer_rows(const T* X, i64 ldx, i64 rows, const T* Ht, i64 kp, i64 n, i64 j0, T* N, i64 k) {
  i64 r = 0;
  for (; r + R <= rows; r += R) outer_tile<T, R, V>(X + r * ldx, ldx, Ht, kp, n, j0, N + r * k, k, k);
  const T* x = X + r * ldx;
  T* out = N + r * k;
  switch (rows - r) {
    case 0: break;
    case 1: outer_tile<T, 1, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    case 2: outer_tile<T, 2, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    case 3: outer_tile<T, 3, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    case 4: outer_tile<T, 4, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    case 5: outer_tile<T, 5, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    case 6: outer_tile<T, 6 < R ? 6 : 1, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
    default: outer_tile<T, 7 < R ? 7 : 1, V>(x, ldx, Ht, kp, n, j0, out, k, k); break;
  }
}

/// N (rows x k) = X (rows x n, ld ldx) H^T, from Ht = H^T (n x kp).
template <class T>
void outer_product(const T* X, i64 ldx, i64 rows, const T* Ht, i64 kp, i64 n, i64 k, T* N) {
  constexpr int L = simd<T>::L;
  const i64 nv = kp / L;
  i64 v0 = 0;
  if (!kManyRegs) {  // 16 registers: tiles of 6 rows x 2 vectors, 8 x 1
    for (; v0 + 2 <= nv; v0 += 2) outer_rows<T, 6, 2>(X, ldx, rows, Ht, kp, n, v0 * L, N, k);
    if (v0 < nv) outer_rows<T, 8, 1>(X, ldx, rows, Ht, kp, n, v0 * L, N, k);
    return;
  }
  for (; v0 + 4 <= nv; v0 += 4) outer_rows<T, 6, 4>(X, ldx, rows, Ht, kp, n, v0 * L, N, k);
  switch (nv - v0) {
    case 0: break;
    case 1: outer_rows<T, 8, 1>(X, ldx, rows, Ht, kp, n, v0 * L, N, k); break;
    case 2: outer_rows<T, 8, 2>(X, ldx, rows, Ht, kp, n, v0 * L, N, k); break;
    default: outer_rows<T, 8, 3>(X, ldx, rows, Ht, kp, n, v0 * L, N, k); break;
  }
}

// P[j, :] += sum_i C[i, j] A[i, :] for j in [j0, j0 + RJ), rows i in order; V vectors of
// columns at a time give RJ * V independent accumulation chains.
template <class T, int RJ, int V>
inline void axpy_block(const T* C, i64 ldc, i64 rows, const T* A, i64 lda, T* P, i64 ldp,
                       i64 j0, i64 l) {
  constexpr int L = simd<T>::L;
  vec<T> p[RJ][V];
  for (int b = 0; b < RJ; ++b)
    for (int v = 0; v < V; ++v) p[b][v] = load(P + (j0 + b) * ldp + l + v * L);
  for (i64 i = 0; i < rows; ++i) {
    vec<T> x[V];
    for (int v = 0; v < V; ++v) x[v] = load(A + i * lda + l + v * L);
    for (int b = 0; b < RJ; ++b) {
      const vec<T> c = splat(C[i * ldc + j0 + b]);
      for (int v = 0; v < V; ++v) p[b][v] += c * x[v];
    }
  }
  for (int b = 0; b < RJ; ++b)
    for (int v = 0; v < V; ++v) store(P + (j0 + b) * ldp + l + v * L, p[b][v]);
}

template <class T, int RJ>
inline void axpy_tile(const T* C, i64 ldc, i64 rows, const T* A, i64 lda, i64 n, T* P, i64 ldp,
                      i64 j0) {
  constexpr int L = simd<T>::L;
  constexpr int V = kManyRegs ? 3 : 2;
  const i64 nf = n / L * L;
  i64 l = 0;
  for (; l + V * L <= nf; l += V * L) axpy_block<T, RJ, V>(C, ldc, rows, A, lda, P, ldp, j0, l);
  for (; l + 2 * L <= nf; l += 2 * L) axpy_block<T, RJ, 2>(C, ldc, rows, A, lda, P, ldp, j0, l);
  for (; l < nf; l += L) axpy_block<T, RJ, 1>(C, ldc, rows, A, lda, P, ldp, j0, l);
  if (nf < n) {
    const int r = int(n - nf);
    vec<T> p[RJ];
    for (int b = 0; b < RJ; ++b) p[b] = load_part(P + (j0 + b) * ldp + nf, r);
    for (i64 i = 0; i < rows; ++i) {
      const vec<T> x = load_part(A + i * lda + nf, r);
      for (int b = 0; b < RJ; ++b) p[b] += splat(C[i * ldc + j0 + b]) * x;
    }
    for (int b = 0; b < RJ; ++b) store_part(P + (j0 + b) * ldp + nf, p[b], r);
  }
}

/// P (k x n, ld ldp) += C^T A, C: rows x k (ld ldc), A: rows x n (ld lda). Each element is
/// summed over the rows in order, whatever the tile.
template <class T>
void accumulate_ct_a(const T* C, i64 ldc, i64 rows, i64 k, const T* A, i64 lda, i64 n, T* P,
                     i64 ldp) {
  i64 j = 0;
  // RJ x V accumulators: 8 x 3 vectors with 32 registers, 6 x 2 with 16
  constexpr int RJ = kManyRegs ? 8 : 6;
  for (; j + RJ <= k; j += RJ) axpy_tile<T, RJ>(C, ldc, rows, A, lda, n, P, ldp, j);
  switch (k - j) {
    case 0: break;
    case 1: axpy_tile<T, 1>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    case 2: axpy_tile<T, 2>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    case 3: axpy_tile<T, 3>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    case 4: axpy_tile<T, 4>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    case 5: axpy_tile<T, 5>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    case 6: axpy_tile<T, 6>(C, ldc, rows, A, lda, n, P, ldp, j); break;
    default: axpy_tile<T, 7>(C, ldc, rows, A, lda, n, P, ldp, j); break;
  }
}

/// P (k x n) += C^T A, C: rows x k, A: rows x n.
template <class T>
void accumulate_ct_a(const T* C, i64 rows, i64 k, const T* A, i64 lda, i64 n, T* P) {
  accumulate_ct_a(C, k, rows, k, A, lda, n, P, n);
}

}  // namespace simd_kernels
}  // namespace dffkit
