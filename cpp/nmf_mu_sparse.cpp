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
#include <cmath>
#include <string>
#include <type_traits>

#include "mu_update.hpp"

namespace dffkit {
namespace {

using i64 = std::int64_t;

/// Below this many multiply-adds an iteration runs on one thread (the dense engine's rule: a
/// fork/join costs a time slice when another process holds the second core).
constexpr i64 kParallelWork = i64(1) << 21;
/// At most this many row chunks for the G_W partials (k x k doubles each).
constexpr i64 kMaxChunks = 256;

inline int threads_for(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

struct RowChunks {
  i64 count, rows;
  i64 begin(i64 c) const { return c * rows / count; }
  i64 end(i64 c) const { return (c + 1) * rows / count; }
};

inline RowChunks row_chunks(i64 rows) {
  return {std::max<i64>(1, std::min<i64>(kMaxChunks, (rows + 255) / 256)), rows};
}

template <class T>
struct SparseWork {
  std::vector<T> Ht;                 // n x k: H transposed, rows gathered by the W step
  std::vector<T> G_H, G_W;           // k x k
  std::vector<double> G_Hd, G_Wd;    // the same in float64 (the Frobenius error)
  std::vector<T> rowsum_H, colsum_W;  // k (KL)
  std::vector<double> part;          // chunks x (k x k or k)
};

template <class T>
inline T dot(const T* a, const T* b, i64 k) {
  T s = T(0);
  for (i64 a_ = 0; a_ < k; ++a_) s += a[a_] * b[a_];
  return s;
}

/// G = A^T A for A (rows x k) row-major, in float64 partials per fixed chunk, summed in order.
template <class T>
void gram_rows(const T* A, i64 rows, i64 k, std::vector<double>& part, std::vector<T>& G,
               std::vector<double>& Gd, int nt, bool par) {
  const RowChunks ch = row_chunks(rows);
  part.assign(ch.count * k * k, 0.0);
#pragma omp parallel for num_threads(nt) schedule(static) if (par && ch.count > 1)
  for (i64 c = 0; c < ch.count; ++c) {
    double* g = part.data() + c * k * k;
    for (i64 i = ch.begin(c); i < ch.end(c); ++i) {
      const T* a = A + i * k;
      for (i64 x = 0; x < k; ++x) {
        const double ax = double(a[x]);
        for (i64 y = x; y < k; ++y) g[x * k + y] += ax * double(a[y]);
      }
    }
  }
  G.assign(k * k, T(0));
  Gd.assign(k * k, 0.0);
  for (i64 x = 0; x < k; ++x)
    for (i64 y = x; y < k; ++y) {
      double s = 0;
      for (i64 c = 0; c < ch.count; ++c) s += part[c * k * k + x * k + y];
      Gd[x * k + y] = Gd[y * k + x] = s;
      G[x * k + y] = G[y * k + x] = T(s);
    }
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

/// One factor step over the rows of A (CSR, rows x cols): F (rows x k) is updated in place from
/// the other factor's transpose O (cols x k). den_gram: G (Frobenius: F_r G) or the sums
/// (KL: the other factor's sums, zero sums read as 1 for the H step as scikit-learn does).
/// out_t: where the new rows also go (H's rows are H^T's columns), or null.
template <class T>
void factor_step(const CsrView<T>& A, T* F, const T* O, i64 k, bool kl, const T* G,
                 const T* sums, T l1, T l2, T l2_extra, bool clamp_h, T* out_t, i64 ld_t,
                 int nt, bool par) {
  const i64 rows = A.rows;
#pragma omp parallel num_threads(nt) if (par)
  {
    std::vector<T> num(k), den(k);
#pragma omp for schedule(dynamic, 64)
    for (i64 r = 0; r < rows; ++r) {
      std::fill(num.begin(), num.end(), T(0));
      T* f = F + r * k;
      for (i64 e = A.indptr[r]; e < A.indptr[r + 1]; ++e) {
        const T* o = O + i64(A.indices[e]) * k;
        const T x = A.data[e];
        const T c = kl ? kl_ratio(x, dot(f, o, k)) : x;
        for (i64 a = 0; a < k; ++a) num[a] += c * o[a];
      }
      if (kl) {
        for (i64 a = 0; a < k; ++a) den[a] = sums[a];
      } else {
        std::fill(den.begin(), den.end(), T(0));
        for (i64 b = 0; b < k; ++b) {
          const T fb = f[b];
          const T* g = G + b * k;
          for (i64 a = 0; a < k; ++a) den[a] += fb * g[a];
        }
      }
      for (i64 a = 0; a < k; ++a) {
        const T v = mu_step(f[a], num[a], den[a], l1, l2, l2_extra > T(0) ? l2_extra * f[a] : T(0));
        num[a] = clamp_h ? kl_clamp_h(v) : v;
      }
      for (i64 a = 0; a < k; ++a) f[a] = num[a];
      if (out_t)
        for (i64 a = 0; a < k; ++a) out_t[a * ld_t + r] = num[a];
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

template <class T>
void transpose(const T* H, i64 k, i64 n, T* Ht) {
  for (i64 a = 0; a < k; ++a)
    for (i64 l = 0; l < n; ++l) Ht[l * k + a] = H[a * n + l];
}

/// The error from X's entries: Frobenius ||X||^2 (xx) - 2 <X, WH> + <W^T W, H H^T> (gw, gh:
/// the Gram matrices in float64: their terms cancel against ||X||^2 when the fit is good), KL
/// the divergence over the entries above eps plus sum(WH) - sum(X).
template <class T>
double sparse_error(const CsrView<T>& X, const T* W, const T* Ht, const Problem& p, double xx,
                    const double* gw, const double* gh, int nt, bool par) {
  const i64 k = p.k, m = p.m, n = p.n;
  const bool kl = p.loss == Loss::kullback_leibler;
  const RowChunks ch = row_chunks(m);
  std::vector<double> cross(ch.count, 0.0), xsum(ch.count, 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (par && ch.count > 1)
  for (i64 c = 0; c < ch.count; ++c) {
    double s = 0, sx = 0;
    for (i64 i = ch.begin(c); i < ch.end(c); ++i) {
      const T* w = W + i * k;
      for (i64 e = X.indptr[i]; e < X.indptr[i + 1]; ++e) {
        const T* h = Ht + i64(X.indices[e]) * k;
        double wh = 0;
        for (i64 a = 0; a < k; ++a) wh += double(w[a]) * double(h[a]);
        const double x = double(X.data[e]);
        if (!kl) {
          s += x * wh;
        } else if (X.data[e] > T(kEpsilon)) {
          s += x * std::log(x / std::max(wh, kEpsilon));
          sx += x;
        }
      }
    }
    cross[c] = s;
    xsum[c] = sx;
  }
  double s = 0, sx = 0;
  for (i64 c = 0; c < ch.count; ++c) { s += cross[c]; sx += xsum[c]; }
  if (kl) {
    double sum_wh = 0;
    for (i64 a = 0; a < k; ++a) {
      double cw = 0, rh = 0;
      for (i64 i = 0; i < m; ++i) cw += double(W[i * k + a]);
      for (i64 l = 0; l < n; ++l) rh += double(Ht[l * k + a]);
      sum_wh += cw * rh;
    }
    return std::sqrt(2.0 * std::max(s + sum_wh - sx, 0.0));
  }
  double gg = 0;
  for (i64 e = 0; e < k * k; ++e) gg += gw[e] * gh[e];
  return std::sqrt(std::max(xx - 2.0 * s + gg, 0.0));
}

template <class T>
double sum_squares(const CsrView<T>& X) {
  const RowChunks ch = row_chunks(X.rows);
  double total = 0;
  for (i64 c = 0; c < ch.count; ++c) {
    double s = 0;
    for (i64 e = X.indptr[ch.begin(c)]; e < X.indptr[ch.end(c)]; ++e)
      s += double(X.data[e]) * double(X.data[e]);
    total += s;
  }
  return total;
}

}  // namespace

template <class T>
void check_csr(const CsrView<T>& A, const char* name) {
  const std::string what = std::string("dffkit: sparse ") + name;
  if (A.rows < 1 || A.cols < 1) throw invalid_argument(what + " must be non-empty");
  if (A.cols > (i64(1) << 31) - 1)
    throw invalid_argument(what + " has more than 2^31 - 1 columns");
  if (A.indptr[0] != 0) throw invalid_argument(what + ": indptr must start at 0");
  for (i64 r = 0; r < A.rows; ++r) {
    const i64 b = A.indptr[r], e = A.indptr[r + 1];
    if (e < b) throw invalid_argument(what + ": indptr must be non-decreasing");
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
  std::vector<T> Ht(p.n * p.k), G;
  std::vector<double> part, gw, gh;
  transpose(H, p.k, p.n, Ht.data());
  const int nt = threads_for(num_threads);
  const bool par = X.nnz() * p.k >= kParallelWork;
  const bool frob = p.loss == Loss::frobenius;
  if (frob) {
    gram_rows(W, p.m, p.k, part, G, gw, nt, par);
    gram_rows(Ht.data(), p.n, p.k, part, G, gh, nt, par);
  }
  return sparse_error(X, W, Ht.data(), p, frob ? sum_squares(X) : 0.0, gw.data(), gh.data(),
                      nt, par);
}

template <class T>
Result fit_mu_cpu_sparse(const CsrView<T>& X, const CsrView<T>& Xt, T* W, T* H,
                         const Problem& p, const Options& o, const StopFn& should_stop,
                         std::vector<double>* objective) {
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
  SparseWork<T> ws;
  ws.Ht.assign(n * k, T(0));
  transpose(H, k, n, ws.Ht.data());
  auto refresh_h = [&]() {
    if (kl) {
      ws.rowsum_H.assign(k, T(0));
      for (i64 a = 0; a < k; ++a) {
        double s = 0;
        for (i64 l = 0; l < n; ++l) s += double(H[a * n + l]);
        ws.rowsum_H[a] = T(s);
      }
    } else {
      gram_rows(ws.Ht.data(), n, k, ws.part, ws.G_H, ws.G_Hd, nt, par);
    }
  };
  refresh_h();
  const double xx = kl ? 0.0 : sum_squares(X);
  const T l1w = T(p.l1_W), l2w = T(p.l2_W), l1h = T(p.l1_H), l2h = T(p.l2_H), muh = T(p.mu);

  // the error of the current W, H: G_W is fresh after an H step (it fed it), else made here
  bool gw_fresh = false;
  auto error_now = [&]() {
    if (!kl && !gw_fresh) gram_rows(W, m, k, ws.part, ws.G_W, ws.G_Wd, nt, par);
    return sparse_error(X, W, ws.Ht.data(), p, xx, ws.G_Wd.data(), ws.G_Hd.data(), nt, par);
  };

  Result res;
  res.error_init = error_now();
  double prev = res.error_init, err = res.error_init;
  bool fresh = true;
  int it = 0;
  for (it = 1; it <= o.max_iter; ++it) {
    const bool check = o.tol > 0 && it % 10 == 0;
    const bool need_err = check || it == o.max_iter || objective != nullptr;
    factor_step(X, W, ws.Ht.data(), k, kl, ws.G_H.data(), ws.rowsum_H.data(), l1w, l2w, T(0),
                false, static_cast<T*>(nullptr), 0, nt, par);
    gw_fresh = false;
    if (o.update_H) {
      if (kl) {
        col_sums(W, m, k, ws.part, ws.colsum_W, nt, par);
        for (auto& v : ws.colsum_W)
          if (v == T(0)) v = T(1);
      } else {
        gram_rows(W, m, k, ws.part, ws.G_W, ws.G_Wd, nt, par);
        gw_fresh = true;
      }
      // H^T's rows are H's columns: the step updates them in place and writes H as it goes
      factor_step(Xt, ws.Ht.data(), W, k, kl, ws.G_W.data(), ws.colsum_W.data(), l1h, l2h, muh,
                  kl, H, n, nt, par);
      refresh_h();
    }
    fresh = false;
    if (need_err) {
      err = error_now();
      fresh = true;
      if (objective) objective->push_back(0.5 * err * err + penalties(W, H, p));
    }
    if (end_of_iteration(check, err, o.tol, prev, should_stop, res)) break;
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
                                       std::vector<double>*);
DFFKIT_INSTANTIATE_SPARSE(float)
DFFKIT_INSTANTIATE_SPARSE(double)

}  // namespace dffkit
