"""Benchmark problems for ``dffkit bench``: generation, suites, targets, the cost model and
the small float64 oracle every multiplicative-update contender is checked against.

A dense problem is X (m x n), or a batch (B, m, n), non-negative float32, built from a seed as
a rank-k non-negative product plus noise, rectified like a ReLU layer's activations, so that
a good factorization exists and X has the zeros real activations have.

A sparse problem (``density`` > 0) is a synthetic TF-IDF matrix, documents x terms, as a
scipy.sparse CSR float32 matrix with exactly ``round(density m n)`` stored entries (see
:func:`sparse_tfidf`): the topic-modelling input NMF is most often given. Sparse problems need
scipy (an optional dependency of dffkit); without it they are skipped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# float32 machine epsilon: the guard scikit-learn and dffkit put on zero denominators
EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    ``m`` x ``n`` matrix (``batch`` of them when ``batch`` is set), rank ``k``, ``n_iter``
    iterations, ``beta`` 2 (Frobenius) or 1 (Kullback-Leibler). ``groups`` > 0 makes it a
    group-sparse problem: the rows fall into ``groups`` equal contiguous segments (one per
    image) and the group penalty ``lam_rel`` / L2 ``mu_rel`` are set relative to the data
    (see :meth:`penalties`). ``twin`` names the plain problem with the same X. ``density`` > 0
    makes it a sparse problem: X is a scipy.sparse CSR TF-IDF matrix with :attr:`nnz` stored
    entries (:func:`sparse_tfidf`), the same for both losses of one shape, k and seed.
    """

    name: str
    m: int
    n: int
    k: int
    n_iter: int
    beta: int = 2
    batch: int = 0
    groups: int = 0
    lam_rel: float = 0.0
    mu_rel: float = 0.0
    seed: int = 0
    note: str = ""
    twin: str = ""
    density: float = 0.0

    def __post_init__(self):
        if self.density and (self.batch or self.groups or not 0 < self.density <= MAX_DENSITY):
            raise ValueError(f"{self.name}: a sparse problem is a single matrix (no batch, no "
                             f"groups) with 0 < density <= {MAX_DENSITY}; got density "
                             f"{self.density}, batch {self.batch}, groups {self.groups}")

    @property
    def sparse(self) -> bool:
        return self.density > 0

    @property
    def nnz(self) -> int:
        """Stored entries of X: m n for a dense problem (per problem of a batch); exactly
        round(density m n) (at least 1) for a sparse one."""
        if not self.sparse:
            return self.m * self.n
        return max(1, int(round(self.density * self.m * self.n)))

    @property
    def loss(self) -> str:
        return "frobenius" if self.beta == 2 else "kullback-leibler"

    @property
    def is_gsnmf(self) -> bool:
        return self.groups > 0

    @property
    def shape(self) -> tuple:
        return (self.batch, self.m, self.n) if self.batch else (self.m, self.n)

    @property
    def n_problems(self) -> int:
        return self.batch or 1

    def describe(self) -> str:
        size = f"{self.batch}x{self.m}x{self.n}" if self.batch else f"{self.m}x{self.n}"
        loss = "Frobenius" if self.beta == 2 else "KL"
        extra = f", GSNMF {self.groups} groups" if self.groups else ""
        if self.sparse:
            size += f" sparse CSR ({self.nnz} entries, {self.nnz / (self.m * self.n):.2%})"
        return f"{size}, k={self.k}, {self.n_iter} it, {loss}{extra}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["loss"] = self.loss
        d["description"] = self.describe()
        d["sparse"] = self.sparse
        d["nnz"] = self.nnz
        return d

    # --- data ---------------------------------------------------------------------------
    def make(self):
        """(X, W0, H0) in float32: the data and the shared start of every contender.

        W0, H0 are dffkit's ``init="random"`` factors (Philox) with ``random_state=seed``; for
        a batch, problem b uses ``seed + b``, as :func:`dffkit.nmf_batched` does, so that the
        batched solver's own start is this one.
        """
        from dffkit.nmf import initialize

        if self.sparse:
            why = sparse_unavailable()
            if why:
                raise ImportError(f"{self.name}: {why}")
            # no beta in the seed: the Frobenius and KL problems of one shape share the corpus
            rng = np.random.default_rng([self.seed, self.m, self.n, self.k, self.nnz, 1])
            X = sparse_tfidf(rng, self.m, self.n, self.nnz, topics=self.k)
            W0, H0 = initialize(X, self.k, init="random", random_state=self.seed)
            return X, W0, H0
        rng = np.random.default_rng([self.seed, self.m, self.n, self.k, self.batch, self.beta])
        if self.batch:
            X = np.empty((self.batch, self.m, self.n), dtype=np.float32)
            for b in range(self.batch):
                X[b] = _low_rank_plus_noise(rng, self.m, self.n, self.k)
            Ws, Hs = zip(*(initialize(X[b], self.k, init="random", random_state=self.seed + b)
                           for b in range(self.batch)))
            return X, np.stack(Ws), np.stack(Hs)
        X = _low_rank_plus_noise(rng, self.m, self.n, self.k)
        W0, H0 = initialize(X, self.k, init="random", random_state=self.seed)
        return X, W0, H0

    def group_offsets(self) -> list:
        """Row offsets of the groups, ``[0, ..., m]`` (``groups + 1`` entries)."""
        if not self.groups:
            return []
        size = self.m // self.groups
        return [g * size for g in range(self.groups)] + [self.m]

    def penalties(self, X, W0, H0) -> tuple:
        """(lam, mu) in the objective's own units (DESIGN.md), set from the data.

        lam: the group term's share of the W update's denominator is about ``lam_rel`` of the
        numerator X H^T for a group of equal entries (lam / sqrt(rows per group) against
        mean(X H0^T)); mu: ``mu_rel`` of mean diag(W0^T W0).
        """
        if not self.groups:
            return 0.0, 0.0
        rows = self.m // self.groups
        # mean(X H0^T) = (column sums of X) . (row sums of H0) / (m k)
        num = float(X.sum(axis=0, dtype=np.float64) @ H0.sum(axis=0, dtype=np.float64)) / (self.m * self.k)
        lam = self.lam_rel * num * np.sqrt(rows)
        mu = self.mu_rel * float(np.mean(np.sum(W0.astype(np.float64) ** 2, axis=0)))
        return float(lam), float(mu)


def _low_rank_plus_noise(rng, m, n, k, noise=0.2, density=0.5):
    """relu(W* H* + noise): W* sparse exponential (about ``density`` non-zero), H* exponential,
    Gaussian noise of ``noise`` times the rms of W* H*."""
    W = rng.standard_exponential((m, k), dtype=np.float32)
    W *= rng.random((m, k), dtype=np.float32) < density
    H = rng.standard_exponential((k, n), dtype=np.float32)
    X = W @ H
    scale = data_norm(X) / np.sqrt(X.size) or 1.0
    X += rng.standard_normal((m, n), dtype=np.float32) * np.float32(noise * scale)
    np.maximum(X, 0, out=X)
    X *= np.float32(1.0 / scale)  # rms of the clean part = 1
    return X


# ---------------------------------------------------------------------------------------------
# sparse problems
# ---------------------------------------------------------------------------------------------

#: highest density a sparse problem may ask for (the generator draws tokens until it has that
#: many distinct entries; near-full matrices would take many rounds and are not sparse work)
MAX_DENSITY = 0.25


def sparse_unavailable():
    """None when scipy.sparse can be imported, else why the sparse problems cannot run."""
    try:
        import scipy.sparse  # noqa: F401
    except ImportError as exc:
        return (f"the sparse problems need scipy, an optional dependency of dffkit, which is not "
                f"installed (pip install scipy): {exc}")
    return None


def is_sparse(X) -> bool:
    """Whether X is a scipy.sparse matrix or array (without importing scipy)."""
    return type(X).__module__.startswith("scipy.sparse") or (
        hasattr(X, "tocsr") and hasattr(X, "nnz") and hasattr(X, "toarray"))


def sparse_tfidf(rng, m, n, nnz, topics=20, zipf_s=1.1, topic_share=0.6, doc_sigma=0.75):
    """A synthetic TF-IDF matrix, ``m`` documents x ``n`` terms, scipy.sparse CSR float32 with
    exactly ``nnz`` stored entries (canonical: sorted column indices, no duplicates), all > 0.

    Tokens are drawn with ``rng`` (a numpy Generator; O(tokens), no m x n work): each document
    gets a Poisson number of tokens around a log-normal length (sigma ``doc_sigma``) and one of
    ``topics`` topics; a token's term has a Zipf-like rank r (P(r) ~ (r + 1)^-zipf_s, drawn by
    inverting the continuous CDF) mapped through the document's topic's own permutation of the
    terms (share ``topic_share``) or a background permutation, so that a few terms are in most
    documents and most terms in a few. Repeated (document, term) pairs are summed into counts;
    tokens are drawn until there are at least ``nnz`` distinct pairs, and a uniform random
    subset of ``nnz`` of them is kept. Values: scikit-learn's TfidfVectorizer(sublinear_tf=True)
    weighting, (1 + log count) x (log((1 + m) / (1 + df)) + 1), rows scaled to unit L2 norm.
    """
    import scipy.sparse as sp

    nnz = int(nnz)
    if not 0 < nnz <= MAX_DENSITY * m * n:
        raise ValueError(f"nnz must be in [1, {MAX_DENSITY} m n], got {nnz} for {m} x {n}")
    doc_weight = rng.lognormal(0.0, doc_sigma, m)
    doc_weight /= doc_weight.sum()
    doc_topic = rng.integers(0, topics, m)
    background = rng.permutation(n).astype(np.int32)
    topic_terms = np.stack([rng.permutation(n) for _ in range(topics)]).astype(np.int32)
    c = (n + 1.0) ** (1.0 - zipf_s) - 1.0
    X, tokens, draw = None, 0, int(1.5 * nnz) + 64
    for _ in range(100):
        counts = rng.poisson(draw * doc_weight)
        rows = np.repeat(np.arange(m, dtype=np.int32), counts)  # sorted: a CSR without a sort
        u = rng.random(rows.size)
        rank = np.exp(np.log1p(u * c) / (1.0 - zipf_s)) - 1.0  # continuous Zipf, in [0, n)
        rank = np.minimum(rank.astype(np.int32), n - 1)
        cols = np.where(rng.random(rows.size) < topic_share, topic_terms[doc_topic[rows], rank],
                        background[rank])
        indptr = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        part = sp.csr_matrix((np.ones(rows.size), cols, indptr), shape=(m, n))
        part.sum_duplicates()  # per-row sort + merge: counts of each (document, term)
        X = part if X is None else X + part
        tokens += rows.size
        if X.nnz >= nnz:
            break
        # the next round: the deficit, scaled by the tokens each distinct entry took so far
        draw = int(1.3 * (nnz - X.nnz) * tokens / max(X.nnz, 1)) + 64
    else:  # pragma: no cover - MAX_DENSITY keeps this far away
        raise RuntimeError(f"could not draw {nnz} distinct entries in {m} x {n}")
    X.sum_duplicates()
    row_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(X.indptr))
    keep = np.sort(rng.choice(X.nnz, nnz, replace=False)) if X.nnz > nnz else slice(None)
    rows, cols, count = row_of[keep], X.indices[keep].astype(np.int32), X.data[keep]
    tf = 1.0 + np.log(count)
    df = np.bincount(cols, minlength=n)
    idf = np.log((1.0 + m) / (1.0 + df)) + 1.0
    val = tf * idf[cols]
    norm = np.sqrt(np.bincount(rows, weights=val * val, minlength=m))
    val /= norm[rows]
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    idx = np.int32 if nnz < 2**31 and n < 2**31 else np.int64  # scipy's own choice for CSR
    out = sp.csr_matrix((val.astype(np.float32), cols.astype(idx), indptr.astype(idx)), shape=(m, n))
    out.has_canonical_format = True  # rows in order, columns sorted within rows, no duplicates
    return out


def _wh_at_entries(X, W, H, chunk=1 << 18):
    """(W H) at the stored entries of CSR X, in X's entry order, float64, in chunks of entries
    (no nnz x k temporary beyond a chunk)."""
    W = np.asarray(W, dtype=np.float64)
    Ht = np.ascontiguousarray(np.asarray(H, dtype=np.float64).T)
    rows = np.repeat(np.arange(X.shape[0], dtype=np.int64), np.diff(X.indptr))
    out = np.empty(X.nnz, dtype=np.float64)
    for s in range(0, X.nnz, chunk):
        e = min(s + chunk, X.nnz)
        out[s:e] = np.einsum("ij,ij->i", W[rows[s:e]], Ht[X.indices[s:e]])
    return out


def _csr64(X):
    """X as a canonical float64 CSR matrix (a copy; the caller's X is not touched)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    return X


# ---------------------------------------------------------------------------------------------
# cost model
# ---------------------------------------------------------------------------------------------

def flops_per_iter(p: Problem) -> float:
    """Floating-point operations of one MU iteration (W then H), all problems of a batch.

    Frobenius: X H^T and W^T X (2mnk each) + the k x k Gram products and their use
    (4(m+n)k^2) + element-wise terms (3(m+n)k). KL: W H twice, R H^T and W^T R (8mnk) + the
    two element-wise divisions X / (W H) (2mn). GSNMF adds the group norms (3mk).

    Sparse X (nnz stored entries): the same count with the products over the stored entries
    only, m n -> nnz. Frobenius: X H^T and W^T X (2 nnz k each, 4 nnz k) + the k x k terms and
    the element-wise ones as dense (4(m+n)k^2 + 3(m+n)k). KL: (W H) at the entries twice (2 nnz k
    each) + R H^T and W^T R (2 nnz k each), 8 nnz k, + the divisions X / (W H) at the entries
    (2 nnz) + 4(m+n)k.
    """
    m, n, k = p.m, p.n, p.k
    if p.sparse:
        z = float(p.nnz)
        if p.beta == 2:
            return 4.0 * z * k + 4.0 * (m + n) * k * k + 3.0 * (m + n) * k
        return 8.0 * z * k + 2.0 * z + 4.0 * (m + n) * k
    if p.beta == 2:
        f = 4.0 * m * n * k + 4.0 * (m + n) * k * k + 3.0 * (m + n) * k
    else:
        f = 8.0 * m * n * k + 2.0 * m * n + 4.0 * (m + n) * k
    if p.groups:
        f += 3.0 * m * k
    return f * p.n_problems


#: bytes of a stored entry's column (row) index and of a CSR row pointer in the traffic floor
#: of a sparse problem: int32 indices and int64 indptr, as dffkit's CSR engine stores them
SPARSE_INDEX_BYTES = 4
SPARSE_INDPTR_BYTES = 8


def bytes_per_iter(p: Problem, itemsize: int = 4) -> float:
    """The memory-traffic floor of one iteration: one pass over X (m n), W and H read and
    written once (2 (m + n) k), for every problem of a batch.

    Sparse X: the stored entries read twice (the W step by rows, the H step by columns: X and
    its transpose), each a value (``itemsize``) and an int32 index, plus both int64 row-pointer
    arrays (m + 1 and n + 1), plus W and H read and written once:
    2 nnz (itemsize + 4) + 8 (m + n + 2) + itemsize 2 (m + n) k. A floor: the gathers of W's
    rows and H's columns at each entry are not counted (they come from cache while W and H fit
    there).
    """
    if p.sparse:
        return (2.0 * p.nnz * (itemsize + SPARSE_INDEX_BYTES)
                + SPARSE_INDPTR_BYTES * (p.m + p.n + 2.0)
                + float(itemsize) * 2 * (p.m + p.n) * p.k)
    return float(itemsize) * (p.m * p.n + 2 * (p.m + p.n) * p.k) * p.n_problems


# ---------------------------------------------------------------------------------------------
# the float64 oracle and the error
# ---------------------------------------------------------------------------------------------

def mu_iterations(xp, X, W, H, beta, n_iter, lam=0.0, mu=0.0, segment_sum=None):
    """``n_iter`` textbook MU iterations (W then H, DESIGN.md's formulas) in any array library
    with numpy's operators (numpy, CuPy, PyTorch through a small shim), on the last two axes so
    that batches broadcast. Updates W and H in place and returns them.

    ``segment_sum(A)`` (GSNMF, lam > 0): for each row, the sum of A over the rows of its group.
    """
    for _ in range(n_iter):
        Ht = H.swapaxes(-1, -2)
        if beta == 2:
            num = X @ Ht
            den = W @ (H @ Ht)
        else:
            num = (X / xp.maximum(W @ H, EPS32)) @ Ht
            den = H.sum(-1)[..., None, :]
        if lam > 0:
            den = den + lam * W / xp.maximum(xp.sqrt(segment_sum(W * W)), EPS32)
        W *= num / xp.maximum(den, EPS32)
        Wt = W.swapaxes(-1, -2)
        if beta == 2:
            num = Wt @ X
            den = (Wt @ W) @ H
        else:
            num = Wt @ (X / xp.maximum(W @ H, EPS32))
            den = W.sum(-2)[..., :, None]
        if mu > 0:
            den = den + mu * H
        H *= num / xp.maximum(den, EPS32)
    return W, H


#: a sparse X with at most this many elements (m n) is made dense for the oracle
ORACLE_DENSE_ELEMS = 1 << 22


def oracle_step(X, W, H, beta, offsets=(), lam=0.0, mu=0.0, dense_elems=ORACLE_DENSE_ELEMS):
    """One MU iteration in float64 numpy, batch-aware ((B, m, n)): the reference every MU
    contender must agree with after one iteration from the shared start.

    A scipy.sparse X: made dense (float64) when it has at most ``dense_elems`` elements and
    run as above; otherwise :func:`sparse_oracle_step` (scipy sparse products in float64)."""
    if is_sparse(X):
        if len(offsets) or lam or mu:
            raise ValueError("the sparse oracle has no group-sparse terms")
        if X.shape[0] * X.shape[1] > dense_elems:
            return sparse_oracle_step(X, W, H, beta)
        X = X.toarray()
    X = np.asarray(X, dtype=np.float64)
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    off = np.asarray(offsets, dtype=np.int64)

    def segment_sum(A):
        return np.repeat(np.add.reduceat(A, off[:-1], axis=-2), np.diff(off), axis=-2)

    return mu_iterations(np, X, W, H, beta, 1, lam, mu, segment_sum if len(off) else None)


def sparse_oracle_step(X, W, H, beta):
    """One MU iteration (W then H, the formulas of :func:`mu_iterations`) on a scipy.sparse X,
    in float64: the products with X by scipy (X @ H^T; (X^T @ W)^T for W^T X) and, for KL, the
    quotient X / max(W H, eps) formed at X's stored entries only (it is 0 elsewhere)."""
    X = _csr64(X)
    Xt = X.T.tocsr()
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)

    def quotient(A):  # X / max(W H, eps) at the stored entries, the pattern of A (X or X^T)
        if A is X:
            wh = _wh_at_entries(X, W, H)
        else:
            wh = _wh_at_entries(Xt, H.T, W.T)
        return A.__class__((A.data / np.maximum(wh, EPS32), A.indices, A.indptr), shape=A.shape)

    if beta == 2:
        num, den = X @ H.T, W @ (H @ H.T)
    else:
        num, den = quotient(X) @ H.T, H.sum(-1)[None, :]
    W *= num / np.maximum(den, EPS32)
    if beta == 2:
        num, den = (Xt @ W).T, (W.T @ W) @ H
    else:
        num, den = (quotient(Xt) @ W).T, W.sum(-2)[:, None]
    H *= num / np.maximum(den, EPS32)
    return W, H


def sparse_error(X, W, H, beta) -> float:
    """scikit-learn's reconstruction error on a scipy.sparse X (its ``_beta_divergence`` for
    sparse input), float64: Frobenius by ||X||^2 - 2 <W, X H^T> + <W^T W, H H^T>; KL
    (sqrt(2 KL)) over the stored entries x > eps, with W H floored at eps there, plus
    sum(W H) = (column sums of W) . (row sums of H) - sum(x)."""
    if not (X.format == "csr" and X.dtype == np.float64 and X.has_canonical_format):
        X = _csr64(X)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    if beta == 2:
        cross = float(np.sum(W * (X @ H.T)))
        gram = float(np.sum((W.T @ W) * (H @ H.T)))
        total = float(X.data @ X.data) - 2.0 * cross + gram
        return float(np.sqrt(max(total, 0.0)))
    x = X.data
    wh = _wh_at_entries(X, W, H)
    pos = x > EPS32
    x, wh = x[pos], np.maximum(wh[pos], EPS32)
    total = float(x @ np.log(x / wh)) + float(W.sum(axis=0) @ H.sum(axis=1)) - float(x.sum())
    return float(np.sqrt(2.0 * max(total, 0.0)))


def relative_difference(A, B) -> float:
    """||A - B||_F / ||B||_F in float64."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    nb = np.linalg.norm(B)
    return float(np.linalg.norm(A - B) / (nb if nb > 0 else 1.0))


def reconstruction_error(X, W, H, beta, chunk_elems: int = 1 << 24) -> float:
    """scikit-learn's reconstruction error: ||X - W H||_F (beta 2) or sqrt(2 KL(X || W H))
    (beta 1), in float64, over all problems of a batch, in row blocks (no m x n temporary
    beyond a block). A scipy.sparse X: :func:`sparse_error`."""
    if is_sparse(X):
        return sparse_error(X, W, H, beta)
    X = np.asarray(X)
    W = np.asarray(W)
    H = np.asarray(H)
    if X.ndim == 2:
        X, W, H = X[None], W[None], H[None]
    total = 0.0
    rows = max(1, chunk_elems // max(1, X.shape[2]))
    for b in range(X.shape[0]):
        Hb = H[b].astype(np.float64)
        for r0 in range(0, X.shape[1], rows):
            Xb = X[b, r0:r0 + rows].astype(np.float64)
            WH = W[b, r0:r0 + rows].astype(np.float64) @ Hb
            if beta == 2:
                Xb -= WH
                total += float(np.einsum("ij,ij->", Xb, Xb))
            else:
                WH = np.maximum(WH, EPS32)
                pos = Xb > 0
                total += float(np.sum(Xb[pos] * np.log(Xb[pos] / WH[pos])) - Xb.sum() + WH.sum())
    return float(np.sqrt(2.0 * max(total, 0.0)) if beta == 1 else np.sqrt(max(total, 0.0)))


class ErrorMeter:
    """The relative error ``reconstruction_error / ||X||_F`` of many (W, H) for one X.

    Frobenius: through the trace identity ||X||^2 - 2 <W^T X, H> + <W^T W, H H^T> on a float64
    copy of X made once (BLAS products, no m x n temporary per call) when that copy takes at
    most ``max_copy_bytes``; otherwise, and for KL, in row blocks. A scipy.sparse X: on a
    float64 CSR copy (:func:`sparse_error`).
    """

    def __init__(self, X, beta, max_copy_bytes=4 << 30):
        self.X, self.beta = X, beta
        self.norm = data_norm(X)
        self.sparse = is_sparse(X)
        if self.sparse:
            self.X64 = _csr64(X)
        else:
            self.X64 = X.astype(np.float64) if beta == 2 and X.size * 8 <= max_copy_bytes else None

    def error(self, W, H) -> float:
        if self.sparse:
            return sparse_error(self.X64, W, H, self.beta)
        if self.X64 is None:
            return reconstruction_error(self.X, W, H, self.beta)
        W = np.asarray(W, dtype=np.float64)
        H = np.asarray(H, dtype=np.float64)
        Wt = np.swapaxes(W, -1, -2)
        cross = float(np.sum((Wt @ self.X64) * H))
        gram = float(np.sum((Wt @ W) * (H @ np.swapaxes(H, -1, -2))))
        return float(np.sqrt(max(self.norm ** 2 - 2.0 * cross + gram, 0.0)))

    def relative(self, W, H) -> float:
        return self.error(W, H) / (self.norm or 1.0)


def data_norm(X) -> float:
    """||X||_F in float64 (all problems of a batch; a scipy.sparse X from its stored values)."""
    if is_sparse(X):
        d = _csr64(X).data  # a copy: the caller's matrix is not summed or sorted in place
        return float(np.sqrt(d @ d))
    X = np.asarray(X)
    flat = X.reshape(-1, X.shape[-1])
    total = 0.0
    step = max(1, (1 << 24) // X.shape[-1])
    for r0 in range(0, flat.shape[0], step):
        blk = flat[r0:r0 + step].astype(np.float64)
        total += float(np.einsum("ij,ij->", blk, blk))
    return float(np.sqrt(total))


# ---------------------------------------------------------------------------------------------
# suites and targets
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A performance claim the suite checks.

    kind: ``"speedup"`` (time of ``other`` / time of ``contender`` >= ``value``),
    ``"max_ratio"`` (time of ``contender`` on ``problem`` / time of ``other_contender`` on
    ``other_problem`` <= ``value``), ``"max_time"`` (median time <= ``value`` seconds),
    ``"loss_match"`` (|err - err of ``other``| / err of ``other`` <= ``value``).
    """

    issue: int
    problem: str
    contender: str
    kind: str
    value: float
    other: str = ""
    other_problem: str = ""
    text: str = ""


@dataclass
class Suite:
    name: str
    description: str
    problems: list
    targets: list = field(default_factory=list)
    repeats: tuple = (3, 5)       # (min, max) timed runs after warm-up
    budget_s: float = 1.0         # repeats are added while min repeats fit in this budget
    row_cap_s: float = 60.0       # a contender whose one run is estimated above this is skipped
    cd_cap_factor: float = 2.0    # CD may use up to this many times the MU iteration count
    cpu_row_cap_s: float = 0.0    # a tighter cap for CPU contenders (0: row_cap_s)


def _dff(name, images, k, it, beta=2, **kw):
    return Problem(name, 196 * images, 512, k, it, beta=beta, **kw)


def _gsnmf_pair(prefix, images, k, it, lam_rel=0.1, mu_rel=0.01):
    plain = Problem(f"{prefix}-plain", 196 * images, 512, k, it, groups=0,
                    note="same X as the GSNMF problem, lam = mu = 0 (plain NMF)")
    group = Problem(f"{prefix}-gsnmf", 196 * images, 512, k, it, groups=images,
                    lam_rel=lam_rel, mu_rel=mu_rel, twin=plain.name,
                    note="group-sparse NMF, one group per image")
    return [plain, group]


def _gsnmf_targets(prefix, contenders):
    return [Target(8, f"{prefix}-gsnmf", c, "max_ratio", 1.3, other=c,
                   other_problem=f"{prefix}-plain",
                   text=f"GSNMF within 1.3x of plain NMF per iteration ({c})")
            for c in contenders]


_TFIDF_NOTE = ("synthetic TF-IDF documents x terms, Zipf-like term popularity, scipy.sparse CSR; "
               "CPU contenders that take sparse X")


def _tfidf_pair(prefix, m, n, density, k, it, it_kl):
    """The topic-modelling shape: a sparse TF-IDF X, Frobenius and KL (the same X)."""
    return [Problem(prefix, m, n, k, it, density=density, note=_TFIDF_NOTE),
            Problem(f"{prefix}-kl", m, n, k, it_kl, beta=1, density=density, note=_TFIDF_NOTE)]


def suites() -> dict:
    """The named suites: quick, default, sparse, issue3, gpu."""
    out = {}
    quick = [
        _dff("dff-1img", 1, 5, 200, note="one image's conv5_3 activations (14x14 positions)"),
        _dff("dff-1img-kl", 1, 5, 100, beta=1),
        _dff("dff-10img", 10, 5, 50, note="ten images stacked"),
        Problem("dff-batch16", 196, 512, 5, 50, batch=16, note="per-image problems, batched"),
        Problem("tall-10k", 10000, 512, 10, 20),
        Problem("square-1k", 1024, 1024, 16, 20),
        *_gsnmf_pair("images32", 32, 10, 20),
        *_tfidf_pair("tfidf-5k", 5000, 4000, 0.005, 20, 50, 20),
    ]
    out["quick"] = Suite("quick", "small versions of every problem kind; under a minute on 2 cores",
                         quick, targets=_gsnmf_targets("images32", ["dffkit-cpu"]),
                         repeats=(3, 5), budget_s=0.3, row_cap_s=5.0)
    default = [
        _dff("dff-1img", 1, 5, 200),
        _dff("dff-1img-k20", 1, 20, 200),
        _dff("dff-1img-kl", 1, 5, 200, beta=1),
        _dff("dff-10img", 10, 5, 200),
        _dff("dff-10img-kl", 10, 5, 100, beta=1),
        Problem("dff-batch64", 196, 512, 5, 100, batch=64, note="per-image problems, batched"),
        Problem("tall-50k", 50000, 512, 20, 50),
        Problem("tall-50k-kl", 50000, 512, 20, 20, beta=1),
        Problem("square-2k", 2048, 2048, 64, 30),
        *_gsnmf_pair("images256", 256, 20, 30),
        *_tfidf_pair("tfidf-20k", 20000, 10000, 0.005, 20, 100, 30),
    ]
    out["default"] = Suite("default", "DFF shapes, a batch, tall and square, ranks 5 to 64, "
                           "Frobenius and KL, GSNMF vs plain, sparse TF-IDF; a few minutes on a "
                           "2-core CPU",
                           default, targets=_gsnmf_targets("images256", ["dffkit-cpu", "dffkit-cuda"]),
                           repeats=(3, 7), budget_s=1.5, row_cap_s=60.0)
    sparse = [
        *_tfidf_pair("tfidf-20k", 20000, 10000, 0.005, 20, 100, 30),
        *_tfidf_pair("tfidf-20k-k200", 20000, 10000, 0.005, 200, 10, 5),
        *_tfidf_pair("tfidf-65k-k500", 65536, 20000, 0.001, 500, 3, 2),
    ]
    out["sparse"] = Suite("sparse", "sparse TF-IDF X at k = 20, 200 and 500 (the large-k "
                          "kernels: blocked denominators, tiled Grams); about 10 minutes on 2 "
                          "cores, most of it scikit-learn's KL", sparse, repeats=(2, 3),
                          budget_s=1.5, row_cap_s=120.0)
    issue3 = [
        _dff("dff-1img", 1, 5, 200),
        _dff("dff-10img", 10, 5, 200),
        Problem("tall-50k", 50000, 512, 20, 50),
    ]
    t3 = []
    for p in issue3:
        t3.append(Target(3, p.name, "dffkit-cpu", "speedup", 5.0, other="sklearn-mu",
                         text="dffkit CPU >= 5x faster than scikit-learn MU"))
        t3.append(Target(3, p.name, "dffkit-cpu", "loss_match", 1e-4, other="sklearn-mu",
                         text="final loss within 1e-4 (relative) of scikit-learn MU"))
    out["issue3"] = Suite("issue3", "issue 3's CPU benchmark: dffkit CPU vs scikit-learn MU and CD, "
                          "float32", issue3, targets=t3, repeats=(5, 9), budget_s=3.0,
                          row_cap_s=300.0, cd_cap_factor=2.0)
    gpu = [
        _dff("dff-1img", 1, 5, 200, note="issue 5 target: <= 0.5 ms"),
        _dff("dff-1img-kl", 1, 5, 200, beta=1),
        _dff("dff-10img", 10, 5, 200),
        Problem("dff-batch4096", 196, 512, 5, 100, batch=4096, note="issue 5 target: <= 20 ms"),
        Problem("tall-200k", 200000, 512, 20, 100, note="issue 5 target: <= 12 ms"),
        Problem("tall-200k-kl", 200000, 512, 20, 50, beta=1),
        Problem("tall-1m", 1000000, 512, 32, 50),
        Problem("square-16k", 16384, 16384, 64, 50,
                note="issue 5 target: fp32 <= PyTorch fp32, tf32 <= 10 ms"),
        *_gsnmf_pair("images1024", 1024, 20, 100),
    ]
    t5 = [
        Target(5, "dff-1img", "dffkit-cuda", "max_time", 0.5e-3, text="one image <= 0.5 ms"),
        Target(5, "dff-batch4096", "dffkit-cuda", "max_time", 20e-3, text="4096 images batched <= 20 ms"),
        Target(5, "tall-200k", "dffkit-cuda", "max_time", 12e-3, text="200000x512 k=20 <= 12 ms"),
        Target(5, "square-16k", "dffkit-cuda", "speedup", 1.0, other="torch-cuda",
               text="16384^2 k=64 fp32 no slower than PyTorch fp32"),
        Target(5, "square-16k", "dffkit-cuda-tf32", "max_time", 10e-3, text="16384^2 k=64 tf32 <= 10 ms"),
    ]
    for p in ("dff-1img", "dff-batch4096", "tall-200k"):
        t5.append(Target(5, p, "dffkit-cuda", "speedup", 1.0, other="torch-cuda",
                         text="faster than the plain PyTorch MU loop"))
    out["gpu"] = Suite("gpu", "sized for a large GPU (H100/H200): issue 5's four target shapes, "
                       "KL, a 1M-row matrix, GSNMF vs plain", gpu,
                       targets=t5 + _gsnmf_targets("images1024", ["dffkit-cuda", "dffkit-cpu"]),
                       repeats=(3, 20), budget_s=2.0, row_cap_s=30.0, cpu_row_cap_s=4.0)
    return out
