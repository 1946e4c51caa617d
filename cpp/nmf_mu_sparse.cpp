// The CPU engine for sparse X: multiplicative updates touching X only at its stored entries.
//
// One iteration, as scikit-learn orders it (W first, then H from the new W):
//   W step, by rows of X (CSR):  N_i = sum_j x_ij H^T_j        (KL: x_ij / max(W_i . H^T_j, eps))
//                                W_i = mu_step(W_i, N_i, W_i G_H  (KL: the row sums of H))
//          and, per fixed chunk of rows, the partial G_W = W^T W (KL: the column sums of W);
//   H step, by columns of X (the CSR of X^T): the same with the roles of W and H exchanged,
//          the new column of H written straight into H and H^T.
// Every sum across rows goes through chunks that depend on the shape only, added in chunk
// order: the bits do not depend on the thread count.
#include "nmf_mu_sparse.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <cmath>
#include <string>
#include <type_traits>

#include "mu_update.hpp"
#include "simd_kernels.hpp"
#include "threads.hpp"

namespace dffkit {
namespace {

using i64 = std::int64_t;

/// Below this many multiply-adds an iteration runs on one thread (the dense engine's rule: a
/// fork/join costs a time slice when another process holds the second core).
constexpr i64 kParallelWork = i64(1) << 21;
/// At most this many row chunks for the G_W partials (k x k doubles each).
constexpr i64 kMaxChunks = 256;

inline int threads_for(int requested) { return usable_threads(requested); }

struct RowChunks {
  i64 count, rows;
  i64 begin(i64 c) const { return c * rows / count; }
  i64 end(i64 c) const { return (c + 1) * rows / count; }
};

/// Fixed chunks of rows (at least 256 rows each, at most kMaxChunks) for sums across rows; with
/// partials of `partial_bytes` each, no more chunks than fit in 32 MiB of them (k = 1000: 4,
/// not 256 chunks of 8 MB). They depend on the shape only, so the bits do not depend on the
/// thread count.
inline RowChunks row_chunks(i64 rows, i64 partial_bytes = 0) {
  i64 count = std::min<i64>(kMaxChunks, (rows + 255) / 256);
  if (partial_bytes > 0) count = std::min(count, (i64(32) << 20) / partial_bytes);
  return {std::max<i64>(1, count), rows};
}

/// A 64-byte aligned, zero-filled buffer (rows of the padded factors are whole cache lines).
template <class T>
struct Aligned {
  T* p = nullptr;
  Aligned() = default;
  explicit Aligned(i64 count) { reset(count); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() { std::free(p); }
  void reset(i64 count) {
    std::free(p);
    const std::size_t bytes = (std::size_t(std::max<i64>(count, 1)) * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  T* data() const { return p; }
};

/// Values of T in a 64-byte cache line.
template <class T>
constexpr i64 kLine = 64 / sizeof(T);

/// k rounded up to whole cache lines: the row stride of the padded factors (whole machine
/// vectors too: 64, 32 or 16 bytes).
template <class T>
i64 padded(i64 k) {
  return (k + kLine<T> - 1) / kLine<T> * kLine<T>;
}

/// The machine's vectors (simd_kernels: 64 bytes with AVX-512, 32 with AVX2, else 16). Until
/// session 13 this engine computed in 64-byte GCC vectors everywhere, which GCC lowers through
/// memory on AVX2: an x86-64-v3 build took 2100 ms where the AVX-512 one took 242 (20000 x
/// 10000, 0.5 % stored, k = 20, 30 iterations, the same EPYC).
template <class T>
using MVec = simd_kernels::vec<T>;
template <class T>
constexpr int kLanes = simd_kernels::simd<T>::L;

/// Prefetches the cache lines of a padded row.
template <class T>
inline void prefetch_row(const T* q, i64 kp) {
  for (i64 a = 0; a < kp; a += kLine<T>) __builtin_prefetch(q + a);
}

template <class T>
struct SparseWork {
  Aligned<T> Hp, Wp;                 // n x kp, m x kp: H^T and W, padded rows (gathered)
  Aligned<T> G_H, G_W;               // k x kp
  std::vector<T> rowsum_H, colsum_W;  // k (KL)
  std::vector<double> part;          // chunks x (k x kp or k)
};

/// G = A^T A for the padded rows of A (rows x kp, k used): sums of up to 64 rows in T
/// (vectorised), added to float64 partials per fixed chunk, the chunks added in order; the
/// update's G_W and G_H. G[x][y] and G[y][x] are the same products in the same order:
/// symmetric to the bit. (Buffers are made before the parallel region: an allocation failure
/// inside one would end the process instead of raising MemoryError.)
template <class T>
void gram_padded(const T* A, i64 rows, i64 k, i64 kp, std::vector<double>& part, T* Gp, int nt,
                 bool par) {
  const RowChunks ch = row_chunks(rows, k * kp * i64(sizeof(double)));
  part.assign(ch.count * k * kp, 0.0);
  const int teams = par && ch.count > 1 ? nt : 1;
  Aligned<T> accs(teams * k * kp);
#pragma omp parallel num_threads(teams) if (teams > 1)
  {
    T* acc = accs.data() + omp_get_thread_num() * k * kp;
#pragma omp for schedule(static)
    for (i64 c = 0; c < ch.count; ++c) {
      double* g = part.data() + c * k * kp;
      for (i64 i0 = ch.begin(c); i0 < ch.end(c); i0 += 64) {
        std::memset(acc, 0, sizeof(T) * k * kp);
        const T* a = A + i0 * kp;
        simd_kernels::accumulate_ct_a(a, kp, std::min<i64>(64, ch.end(c) - i0), k, a, kp, kp, acc, kp);
        for (i64 e = 0; e < k * kp; ++e) g[e] += double(acc[e]);
      }
    }
  }
  for (i64 x = 0; x < k; ++x)
    for (i64 y = 0; y < k; ++y) {
      double s = 0;
      for (i64 c = 0; c < ch.count; ++c) s += part[c * k * kp + x * kp + y];
      Gp[x * kp + y] = T(s);
    }
}

/// A^T A (k x k) in float64 throughout, for the error: its <W^T W, H H^T> is set against the
/// sum of wh^2 at X's entries, and float32 partial sums would leave 1e-7 of it as noise.
template <class T>
std::vector<double> gram_f64(const T* A, i64 rows, i64 k, i64 kp, int nt, bool par) {
  constexpr i64 kBlock = 64;  // rows converted to float64 at a time
  const RowChunks ch = row_chunks(rows, k * kp * i64(sizeof(double)));
  Aligned<double> part(ch.count * k * kp);
  const int teams = par && ch.count > 1 ? nt : 1;
  Aligned<double> bufs(std::is_same<T, double>::value ? 1 : teams * kBlock * kp);
#pragma omp parallel num_threads(teams) if (teams > 1)
  {
    double* buf = bufs.data() + (std::is_same<T, double>::value ? 0 : omp_get_thread_num() * kBlock * kp);
#pragma omp for schedule(static)
    for (i64 c = 0; c < ch.count; ++c) {
      double* g = part.data() + c * k * kp;
      for (i64 i0 = ch.begin(c); i0 < ch.end(c); i0 += kBlock) {
        const i64 nr = std::min(kBlock, ch.end(c) - i0);
        const double* a;
        if constexpr (std::is_same<T, double>::value) {
          a = A + i0 * kp;
        } else {
          for (i64 e = 0; e < nr * kp; ++e) buf[e] = double(A[i0 * kp + e]);
          a = buf;
        }
        simd_kernels::accumulate_ct_a(a, kp, nr, k, a, kp, kp, g, kp);
      }
    }
  }
  std::vector<double> G(k * k, 0.0);
  for (i64 x = 0; x < k; ++x)
    for (i64 y = 0; y < k; ++y) {
      double s = 0;
      for (i64 c = 0; c < ch.count; ++c) s += part.data()[c * k * kp + x * kp + y];
      G[x * k + y] = s;
    }
  return G;
}

/// Column sums of A (rows x k) in float64 per fixed chunk, summed in order.
template <class T>
void col_sums(const T* A, i64 rows, i64 k, std::vector<double>& part, std::vector<T>& out,
              int nt, bool par) {
  const RowChunks ch = row_chunks(rows);
  part.assign(ch.count * k, 0.0);
#pragma omp parallel for num_threads(nt) schedule(static) if (par && ch.count > 1)
  for (i64 c = 0; c < ch.count; ++c) {
    double* s = part.data() + c * k;
    for (i64 i = ch.begin(c); i < ch.end(c); ++i)
      for (i64 x = 0; x < k; ++x) s[x] += double(A[i * k + x]);
  }
  out.assign(k, T(0));
  for (i64 x = 0; x < k; ++x) {
    double s = 0;
    for (i64 c = 0; c < ch.count; ++c) s += part[c * k + x];
    out[x] = T(s);
  }
}

/// How many stored entries ahead the gather of the other factor's row is prefetched: the rows
/// are at random places, which the hardware prefetcher cannot guess.
constexpr i64 kPrefetch = 16;

/// Rows of up to this many machine vectors have register-resident kernels (accumulate_row):
/// with 32 registers 8 (k <= 128 in float32), with 16 registers 4 (AVX2: k <= 32; KL keeps the
/// old row in registers too).
constexpr i64 kMaxRowVectors = simd_kernels::kManyRegs ? 8 : 4;
/// Rows per block for the Frobenius denominators of longer rows (den_block).
constexpr i64 kDenBlock = 48;

/// Row r's numerator (sum over its entries of c_e times the other factor's row, c_e = x, or
/// for KL x / max(f . o, eps)) and, for Frobenius, its denominator f G. f: the old row, padded
/// and aligned; O: the other factor's padded rows; G: k x kp. NV machine vectors a row.
template <class T, int NV, bool KL>
void accumulate_row(const CsrView<T>& A, i64 r, const T* f, const T* O, i64 kp, const T* G,
                    i64 k, T* num, T* den) {
  using V = MVec<T>;
  constexpr int kVecsPerLine = sizeof(V) >= 64 ? 1 : int(64 / sizeof(V));
  V acc[NV], fv[NV];
  for (int v = 0; v < NV; ++v) {
    acc[v] = V{};
    fv[v] = reinterpret_cast<const V*>(f)[v];
  }
  const i64 e1 = A.indptr[r + 1], nnz = A.indptr[A.rows];
  for (i64 e = A.indptr[r]; e < e1; ++e) {
    if (e + kPrefetch < nnz) {  // a line at a time, unrolled (NV vectors: whole lines)
      const T* q = O + i64(A.indices[e + kPrefetch]) * kp;
      for (int v = 0; v < NV; v += kVecsPerLine) __builtin_prefetch(q + v * kLanes<T>);
    }
    const V* o = reinterpret_cast<const V*>(O + i64(A.indices[e]) * kp);
    T c = A.data[e];
    if (KL) {
      V s = fv[0] * o[0];
      for (int v = 1; v < NV; ++v) s += fv[v] * o[v];
      c = kl_ratio(c, simd_kernels::hsum_tree(s));
    }
    for (int v = 0; v < NV; ++v) acc[v] += c * o[v];
  }
  for (int v = 0; v < NV; ++v) reinterpret_cast<V*>(num)[v] = acc[v];
  if (!KL) {
    V d[NV];
    for (int v = 0; v < NV; ++v) d[v] = V{};
    for (i64 b = 0; b < k; ++b) {
      const T fb = f[b];
      const V* g = reinterpret_cast<const V*>(G + b * kp);
      for (int v = 0; v < NV; ++v) d[v] += fb * g[v];
    }
    for (int v = 0; v < NV; ++v) reinterpret_cast<V*>(den)[v] = d[v];
  }
}

/// The same for any k (more than kMaxRowVectors a row): the numerator accumulates in `num`
/// (64-byte aligned) a vector at a time; KL's f . o in four chains (v mod 4), added (0 + 1) + (2 + 3).
/// Frobenius's denominator is left to the caller (den_block: a GEMM over a block of rows).
template <class T, bool KL>
void accumulate_row_any(const CsrView<T>& A, i64 r, const T* f, const T* O, i64 kp, const T*,
                        i64, T* num, T*) {
  using V = MVec<T>;
  const i64 nv = kp / kLanes<T>;
  V* acc = reinterpret_cast<V*>(num);
  const V* fv = reinterpret_cast<const V*>(f);
  for (i64 v = 0; v < nv; ++v) acc[v] = V{};
  const i64 e1 = A.indptr[r + 1], nnz = A.indptr[A.rows];
  for (i64 e = A.indptr[r]; e < e1; ++e) {
    if (e + kPrefetch < nnz) prefetch_row(O + i64(A.indices[e + kPrefetch]) * kp, kp);
    const V* o = reinterpret_cast<const V*>(O + i64(A.indices[e]) * kp);
    T c = A.data[e];
    if (KL) {
      V s[4] = {V{}, V{}, V{}, V{}};
      for (i64 v = 0; v < nv; ++v) s[v & 3] += fv[v] * o[v];
      c = kl_ratio(c, simd_kernels::hsum_tree((s[0] + s[1]) + (s[2] + s[3])));
    }
    for (i64 v = 0; v < nv; ++v) acc[v] += c * o[v];
  }
}

/// den (rows x kp) = F_block G for `rows` padded rows of F: the outer-product GEMM tile of the
/// dense engine (G read once per tile of rows, not once per row: at k = 500 the row-by-row
/// products ran at a few GFLOP/s). Each element is summed over b in order from zero, as the
/// row kernels sum it.
template <class T>
void den_block(const T* F, i64 rows, const T* G, i64 kp, i64 k, T* den) {
  simd_kernels::outer_product(F, kp, rows, G, kp, k, kp, den);
}

template <class T>
using RowFn = void (*)(const CsrView<T>&, i64, const T*, const T*, i64, const T*, i64, T*, T*);

template <class T, bool KL>
RowFn<T> row_kernel(i64 nv) {
  if (nv > kMaxRowVectors) return accumulate_row_any<T, KL>;
  switch (nv) {
    case 1: return accumulate_row<T, 1, KL>;
    case 2: return accumulate_row<T, 2, KL>;
    case 3: return accumulate_row<T, 3, KL>;
    case 4: return accumulate_row<T, 4, KL>;
    case 5: return accumulate_row<T, 5, KL>;
    case 6: return accumulate_row<T, 6, KL>;
    case 7: return accumulate_row<T, 7, KL>;
    case 8: return accumulate_row<T, 8, KL>;
    default: return accumulate_row_any<T, KL>;
  }
}

/// One factor step over the rows of A (CSR): row r of F (padded rows, stride kp) is updated in
/// place from the other factor's padded rows O. Frobenius: num / (f G); KL: num / sums (the
/// other factor's sums; zero sums already read as 1 for the H step, as scikit-learn does).
/// The new row also goes to copy (row r, stride k: W) or out_t (column r of a k x ld_t matrix:
/// H), where given. (No std::copy of rows: each became a libc memmove call, 15% of the time.)
template <class T>
void factor_step(const CsrView<T>& A, T* F, const T* O, i64 kp, i64 k, bool kl, const T* G,
                 const T* sums, T l1, T l2, T l2_extra, bool clamp_h, T* copy, T* out_t,
                 i64 ld_t, int nt, bool par) {
  const i64 nv = kp / kLanes<T>;
  const RowFn<T> fn = kl ? row_kernel<T, true>(nv) : row_kernel<T, false>(nv);
  // Frobenius beyond 8 vectors a row: numerators row by row, denominators for blocks of rows.
  const bool blocks = !kl && nv > kMaxRowVectors;
  const i64 rb = blocks ? kDenBlock : 1;
  const int teams = par ? nt : 1;
  Aligned<T> bufs(teams * (2 * rb + 1) * kp);
#pragma omp parallel num_threads(teams) if (teams > 1)
  {
    T* num = bufs.data() + omp_get_thread_num() * (2 * rb + 1) * kp;
    T* den = num + rb * kp;
    T* fresh = den + rb * kp;  // the new row
#pragma omp for schedule(dynamic, blocks ? 1 : 64)
    for (i64 r0 = 0; r0 < A.rows; r0 += rb) {
      const i64 rows = std::min(rb, A.rows - r0);
      for (i64 i = 0; i < rows; ++i) fn(A, r0 + i, F + (r0 + i) * kp, O, kp, G, k, num + i * kp, den + i * kp);
      if (blocks) den_block(F + r0 * kp, rows, G, kp, k, den);
      for (i64 i = 0; i < rows; ++i) {
        const i64 r = r0 + i;
        T* __restrict f = F + r * kp;
        T* __restrict fr = fresh;
        const T* __restrict nu = num + i * kp;
        const T* __restrict base = kl ? sums : den + i * kp;
        // the new row first, in a loop with no other stores (it vectorises), then its copies:
        // one loop storing to f, copy and out_t ran scalar divisions one at a time (session 13,
        // 20000 x 10000, k = 20: this step's share of the samples doubled)
        for (i64 a = 0; a < k; ++a) {
          const T v = mu_step(f[a], nu[a], base[a], l1, l2, l2_extra > T(0) ? l2_extra * f[a] : T(0));
          fr[a] = clamp_h ? kl_clamp_h(v) : v;
        }
        for (i64 a = 0; a < k; ++a) f[a] = fr[a];
        if (copy)
          for (i64 a = 0; a < k; ++a) copy[r * k + a] = fr[a];
        if (out_t)
          for (i64 a = 0; a < k; ++a) out_t[a * ld_t + r] = fr[a];
      }
    }
  }
}

template <class T>
double penalties(const T* W, const T* H, const Problem& p) {
  double s1w = 0, s2w = 0, s1h = 0, s2h = 0;
  for (i64 i = 0; i < p.m * p.k; ++i) { s1w += double(W[i]); s2w += double(W[i]) * double(W[i]); }
  for (i64 i = 0; i < p.k * p.n; ++i) { s1h += double(H[i]); s2h += double(H[i]) * double(H[i]); }
  return p.l1_W * s1w + 0.5 * p.l2_W * s2w + p.l1_H * s1h + 0.5 * p.l2_H * s2h + 0.5 * p.mu * s2h;
}

/// H (k x n) into padded rows of H^T (n x kp).
template <class T>
void transpose_padded(const T* H, i64 k, i64 n, T* Hp, i64 kp) {
  for (i64 a = 0; a < k; ++a)
    for (i64 l = 0; l < n; ++l) Hp[l * kp + a] = H[a * n + l];
}

/// A double-double accumulator (about 32 significant digits): for the sums whose difference
/// is the part of the error away from X's entries, when that difference is small.
struct DD {
  double hi = 0, lo = 0;
  void add(double y) {  // Knuth's two-sum, then renormalise
    const double s = hi + y, bb = s - hi, e = (hi - (s - bb)) + (y - bb) + lo;
    hi = s + e;
    lo = e - (hi - s);
  }
  void add(const DD& y) {
    add(y.hi);
    add(y.lo);
  }
  void add_product(double a, double b) {  // a * b exactly: the rounded product and its error
    const double q = a * b;
    add(q);
    add(std::fma(a, b, -q));
  }
  static DD product(const DD& a, const DD& b) {
    DD r;
    r.add_product(a.hi, b.hi);
    r.add(a.hi * b.lo + a.lo * b.hi);
    return r;
  }
  double value() const { return hi + lo; }
};

/// The part of the error at the positions where X is zero (or not above eps, KL), in
/// double-double: Frobenius <W^T W, H H^T> - the sum over X's entries of wh^2, KL sum(WH) - the
/// sum of wh over the entries above eps. Each side is about ||WH||^2 (sum(WH)); where the fit
/// is good, the float64 difference's rounding can be most of it (a sparse product A B from a
/// start 1e-5 from A, B: 2e-4 relative error); this keeps 1e-16. The Gram entries (each over
/// all rows) and the entries' share (fixed row chunks, added in order) run in parallel; the
/// bits do not depend on the thread count.
template <class T>
double zero_part_exact(const CsrView<T>& X, const T* Wp, const T* Hp, i64 kp, const Problem& p,
                       int nt, bool par) {
  const i64 k = p.k, m = p.m, n = p.n;
  const bool kl = p.loss == Loss::kullback_leibler;
  DD total;
  if (kl) {
    for (i64 a = 0; a < k; ++a) {
      DD cw, rh;
      for (i64 i = 0; i < m; ++i) cw.add(double(Wp[i * kp + a]));
      for (i64 l = 0; l < n; ++l) rh.add(double(Hp[l * kp + a]));
      total.add(DD::product(cw, rh));
    }
  } else {
    std::vector<DD> gw(k * k), gh(k * k);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par)
    for (i64 x = 0; x < k; ++x)
      for (i64 y = x; y < k; ++y) {
        DD a, b;
        for (i64 i = 0; i < m; ++i) a.add_product(double(Wp[i * kp + x]), double(Wp[i * kp + y]));
        for (i64 l = 0; l < n; ++l) b.add_product(double(Hp[l * kp + x]), double(Hp[l * kp + y]));
        gw[x * k + y] = a;
        gh[x * k + y] = b;
      }
    for (i64 x = 0; x < k; ++x)
      for (i64 y = x; y < k; ++y) {
        const DD g = DD::product(gw[x * k + y], gh[x * k + y]);
        total.add(g);
        if (y != x) total.add(g);
      }
  }
  const RowChunks ch = row_chunks(m);
  std::vector<DD> part(ch.count);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par && ch.count > 1)
  for (i64 c = 0; c < ch.count; ++c) {
    DD acc;
    for (i64 i = ch.begin(c); i < ch.end(c); ++i)
      for (i64 e = X.indptr[i]; e < X.indptr[i + 1]; ++e) {
        if (kl && !(X.data[e] > T(kEpsilon))) continue;
        const T* h = Hp + i64(X.indices[e]) * kp;
        DD wh;
        for (i64 a = 0; a < k; ++a) wh.add_product(double(Wp[i * kp + a]), double(h[a]));
        acc.add(kl ? wh : DD::product(wh, wh));
      }
    part[c] = acc;
  }
  for (const DD& q : part) {
    total.add(-q.hi);
    total.add(-q.lo);
  }
  return total.value();
}

/// w . h in float64 for two padded, aligned rows (kp a multiple of a cache line): running sums
/// in one machine vector of doubles, then its lanes by the fixed tree.
template <class T>
inline double dot_f64(const T* w, const T* h, i64 kp) {
  using D = MVec<double>;
  constexpr int LD = kLanes<double>;
  typedef T TL __attribute__((vector_size(LD * sizeof(T))));
  D acc = D{};
  for (i64 a = 0; a < kp; a += LD) {
    TL wv, hv;
    std::memcpy(&wv, w + a, sizeof(wv));
    std::memcpy(&hv, h + a, sizeof(hv));
    acc += __builtin_convertvector(wv, D) * __builtin_convertvector(hv, D);
  }
  return simd_kernels::hsum_tree(acc);
}

/// The error, split so that nothing large cancels where it can be avoided: the part at X's
/// entries term by term (Frobenius (x - wh)^2; KL x log(x / max(wh, eps)) - x + wh, written
/// x (u - log1p(u)), u = wh / x - 1, where wh >= eps: no cancellation as wh nears x), plus the
/// part away from them (zero_part_exact's difference, first in float64). The float64
/// difference is off by some 1e-13 of its sides; where that could reach 1e-10 of the error
/// (the error below 1e-3 of the sides: a fit that good), it is recomputed in double-double.
/// (The rule looks at the error, not at the difference alone: with nearly every position of X
/// stored, the difference is about 0 for any W, H, and a rule on it alone paid double-double
/// at every evaluation: 735 ms against 6 for 2000 x 1500 stored in full.)
/// What the error takes of H (Hp: H^T, padded rows): H H^T in float64 (Frobenius), or the row
/// sums of H (KL), each summed in order.
template <class T>
std::vector<double> h_error_stats(const T* Hp, i64 n, i64 k, i64 kp, bool kl, int nt, bool par) {
  if (!kl) return gram_f64(Hp, n, k, kp, nt, par);
  std::vector<double> rh(k, 0.0);
  for (i64 a = 0; a < k; ++a)
    for (i64 l = 0; l < n; ++l) rh[a] += double(Hp[l * kp + a]);
  return rh;
}

template <class T>
double sparse_error(const CsrView<T>& X, const T* W, const T* Wp, const T* Hp, i64 kp,
                    const Problem& p, int nt, bool par,
                    const std::vector<double>* h_stats = nullptr) {
  const i64 k = p.k, m = p.m, n = p.n;
  const bool kl = p.loss == Loss::kullback_leibler;
  const RowChunks ch = row_chunks(m);
  std::vector<double> direct(ch.count, 0.0), entries(ch.count, 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par && ch.count > 1)
  for (i64 c = 0; c < ch.count; ++c) {
    double d = 0, q = 0;
    const i64 nnz = X.nnz();
    for (i64 i = ch.begin(c); i < ch.end(c); ++i) {
      const T* w = Wp + i * kp;
      for (i64 e = X.indptr[i]; e < X.indptr[i + 1]; ++e) {
        if (e + kPrefetch < nnz) prefetch_row(Hp + i64(X.indices[e + kPrefetch]) * kp, kp);
        const T* h = Hp + i64(X.indices[e]) * kp;
        const double wh = dot_f64(w, h, kp);
        const double x = double(X.data[e]);
        if (!kl) {
          d += (x - wh) * (x - wh);
          q += wh * wh;
        } else if (X.data[e] > T(kEpsilon)) {
          if (wh >= kEpsilon) {
            const double u = wh / x - 1.0;
            d += x * (u - std::log1p(u));
          } else {
            d += x * std::log(x / kEpsilon) - x + wh;
          }
          q += wh;
        }
      }
    }
    direct[c] = d;
    entries[c] = q;
  }
  double d = 0, q = 0;
  for (i64 c = 0; c < ch.count; ++c) { d += direct[c]; q += entries[c]; }
  double total = 0;
  // h_stats: what the error needs of a fixed H, formed once by the caller (h_error_stats)
  const std::vector<double> own = h_stats ? std::vector<double>() : h_error_stats(Hp, n, k, kp, kl, nt, par);
  const double* hs = h_stats ? h_stats->data() : own.data();
  if (kl) {
    for (i64 a = 0; a < k; ++a) {
      double cw = 0;
      for (i64 i = 0; i < m; ++i) cw += double(W[i * k + a]);
      total += cw * hs[a];
    }
  } else {
    const std::vector<double> gw = gram_f64(Wp, m, k, kp, nt, par);
    for (i64 e = 0; e < k * k; ++e) total += gw[e] * hs[e];
  }
  double zero = total - q;
  if (total > 1e3 * (d + std::max(zero, 0.0))) zero = zero_part_exact(X, Wp, Hp, kp, p, nt, par);
  const double div = d + std::max(zero, 0.0);
  return kl ? std::sqrt(2.0 * div) : std::sqrt(div);
}

}  // namespace

template <class T>
void check_csr(const CsrView<T>& A, const char* name) {
  const std::string what = std::string("dffkit: sparse ") + name;
  if (A.rows < 1 || A.cols < 1) throw invalid_argument(what + " must be non-empty");
  if (A.cols > (i64(1) << 31) - 1)
    throw invalid_argument(what + " has more than 2^31 - 1 columns");
  if (A.indptr[0] != 0) throw invalid_argument(what + ": indptr must start at 0");
  for (i64 r = 0; r < A.rows; ++r)  // all of indptr first: the index loop below reads by it
    if (A.indptr[r + 1] < A.indptr[r])
      throw invalid_argument(what + ": indptr must be non-decreasing");
  for (i64 r = 0; r < A.rows; ++r) {
    const i64 b = A.indptr[r], e = A.indptr[r + 1];
    for (i64 t = b; t < e; ++t) {
      const i64 j = A.indices[t];
      if (j < 0 || j >= A.cols || (t > b && j <= A.indices[t - 1]))
        throw invalid_argument(what + ": column indices must be in range and increasing "
                               "within each row (sorted, no duplicates)");
    }
  }
}

template <class T>
double mean_sparse(const CsrView<T>& X) {
  // chunk c of the dense X holds flat positions [c * kMeanChunk, (c + 1) * kMeanChunk); the
  // stored entries come in flat order, so each chunk's sum meets them in the dense order
  double total = 0, s = 0;
  i64 chunk = -1;
  for (i64 r = 0; r < X.rows; ++r)
    for (i64 e = X.indptr[r]; e < X.indptr[r + 1]; ++e) {
      const i64 c = (r * X.cols + X.indices[e]) / kMeanChunk;
      if (c != chunk) {
        total += s;
        s = 0;
        chunk = c;
      }
      s += double(X.data[e]);
    }
  total += s;
  return total / (double(X.rows) * double(X.cols));
}

template <class T>
double beta_error_sparse(const CsrView<T>& X, const T* W, const T* H, const Problem& p,
                         int num_threads) {
  check_problem(p);
  const i64 kp = padded<T>(p.k);
  Aligned<T> Hp(p.n * kp), Wp(p.m * kp);
  transpose_padded(H, p.k, p.n, Hp.data(), kp);
  for (i64 i = 0; i < p.m; ++i)
    for (i64 a = 0; a < p.k; ++a) Wp.data()[i * kp + a] = W[i * p.k + a];
  const int nt = threads_for(num_threads);
  const bool par = X.nnz() * p.k >= kParallelWork;
  return sparse_error(X, W, Wp.data(), Hp.data(), kp, p, nt, par);
}

template <class T>
Result fit_mu_cpu_sparse(const CsrView<T>& X, const CsrView<T>& Xt, T* W, T* H,
                         const Problem& p, const Options& o, const StopFn& should_stop,
                         std::vector<double>* objective, const ProgressFn& progress) {
  check_problem(p);
  if (p.group_offsets)
    throw invalid_argument("dffkit: group-sparse NMF takes dense X (pass X.toarray())");
  if (X.rows != p.m || X.cols != p.n ||
      (o.update_H && (Xt.rows != p.n || Xt.cols != p.m || X.nnz() != Xt.nnz())))
    throw invalid_argument("dffkit: sparse X and its transpose do not match the problem");
  const i64 m = p.m, n = p.n, k = p.k;
  const bool kl = p.loss == Loss::kullback_leibler;
  const int nt = threads_for(o.num_threads);
  const bool par = X.nnz() * k + (m + n) * k * k >= kParallelWork;
  const i64 kp = padded<T>(k);
  SparseWork<T> ws;
  ws.Hp.reset(n * kp);
  ws.Wp.reset(m * kp);
  ws.G_H.reset(k * kp);
  ws.G_W.reset(k * kp);
  transpose_padded(H, k, n, ws.Hp.data(), kp);
  for (i64 i = 0; i < m; ++i) std::copy(W + i * k, W + (i + 1) * k, ws.Wp.data() + i * kp);
  auto refresh_h = [&]() {
    if (kl) {
      ws.rowsum_H.assign(k, T(0));
      for (i64 a = 0; a < k; ++a) {
        double s = 0;
        for (i64 l = 0; l < n; ++l) s += double(H[a * n + l]);
        ws.rowsum_H[a] = T(s);
      }
    } else {
      gram_padded(ws.Hp.data(), n, k, kp, ws.part, ws.G_H.data(), nt, par);
    }
  };
  refresh_h();
  const T l1w = T(p.l1_W), l2w = T(p.l2_W), l1h = T(p.l1_H), l2h = T(p.l2_H), muh = T(p.mu);

  // what the error takes of H (H H^T: n k^2 work, n the number of features: 20000 x 400 for
  // a vocabulary of 20000 at k = 20, most of a one-document transform when formed at each
  // test) once, where H is fixed
  std::vector<double> h_stats;
  if (!o.update_H) h_stats = h_error_stats(ws.Hp.data(), n, k, kp, kl, nt, par);
  auto error_now = [&]() {
    return sparse_error(X, W, ws.Wp.data(), ws.Hp.data(), kp, p, nt, par,
                        o.update_H ? nullptr : &h_stats);
  };

  Result res;
  res.error_init = error_now();
  double prev = res.error_init, err = res.error_init;
  bool fresh = true;
  int it = 0;
  for (it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || objective != nullptr;
    factor_step(X, ws.Wp.data(), ws.Hp.data(), kp, k, kl, ws.G_H.data(), ws.rowsum_H.data(),
                l1w, l2w, T(0), false, W, static_cast<T*>(nullptr), 0, nt, par);
    if (o.update_H) {
      if (kl) {
        col_sums(W, m, k, ws.part, ws.colsum_W, nt, par);
        for (auto& v : ws.colsum_W)
          if (v == T(0)) v = T(1);
      } else {
        gram_padded(ws.Wp.data(), m, k, kp, ws.part, ws.G_W.data(), nt, par);
      }
      // the rows of the padded H^T are H's columns: the step updates them in place and writes
      // H as it goes
      factor_step(Xt, ws.Hp.data(), ws.Wp.data(), kp, k, kl, ws.G_W.data(), ws.colsum_W.data(),
                  l1h, l2h, muh, kl, static_cast<T*>(nullptr), H, n, nt, par);
      refresh_h();
    }
    fresh = false;
    if (need_err) {
      err = error_now();
      fresh = true;
      if (objective) objective->push_back(0.5 * err * err + penalties(W, H, p));
    }
    if (end_of_iteration(it, check, err, o.tol, prev, should_stop, progress, res)) break;
  }
  res.n_iter = std::min(it, o.max_iter);
  if (!fresh) err = error_now();
  res.error = err;
  return res;
}

#define DFFKIT_INSTANTIATE_SPARSE(T)                                                          \
  template void check_csr<T>(const CsrView<T>&, const char*);                                 \
  template double mean_sparse<T>(const CsrView<T>&);                                          \
  template double beta_error_sparse<T>(const CsrView<T>&, const T*, const T*, const Problem&, \
                                       int);                                                  \
  template Result fit_mu_cpu_sparse<T>(const CsrView<T>&, const CsrView<T>&, T*, T*,          \
                                       const Problem&, const Options&, const StopFn&,         \
                                       std::vector<double>*, const ProgressFn&);
DFFKIT_INSTANTIATE_SPARSE(float)
DFFKIT_INSTANTIATE_SPARSE(double)

}  // namespace dffkit
