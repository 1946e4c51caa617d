"""Sparse X (scipy.sparse) on the CPU backend: the iterates, stopping, errors and starts agree with
the same X made dense and with scikit-learn's MU on the sparse matrix; every input format gives
the csr result; the caller's matrix is never modified; the thread count changes no bit; bad input
is refused."""
import copy
import warnings

import numpy as np
import pytest

import dffkit

sp = pytest.importorskip("scipy.sparse")
sk_decomp = pytest.importorskip("sklearn.decomposition")

# short fits on purpose: the max_iter warnings of dffkit and scikit-learn are noise here
pytestmark = pytest.mark.filterwarnings("ignore:Maximum number of iterations")


def rel(a, b):
    b = np.asarray(b, np.float64)
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


def sparse_problem(rng, m=70, n=45, k=4, density=0.3, dtype=np.float64, empty=True, start="random"):
    """(X csr, W0, H0): a low-rank-plus-noise X kept at a random `density` of its entries, with
    some rows and columns all zero (when `empty`); W0, H0 from dffkit.initialize on the dense X."""
    full = rng.random((m, k)) @ rng.random((k, n)) + 0.1 * rng.random((m, n))
    full[rng.random((m, n)) >= density] = 0.0
    if empty:
        full[rng.choice(m, max(1, m // 12), replace=False)] = 0.0
        full[:, rng.choice(n, max(1, n // 10), replace=False)] = 0.0
    dense = full.astype(dtype)
    W0, H0 = dffkit.initialize(dense, k, init=start, random_state=3)
    return sp.csr_matrix(dense), W0, H0


def frobenius_oracle(X, W, H):
    """||X - W H||_F from the dense float64 residual."""
    Xd = X.toarray().astype(np.float64)
    return float(np.linalg.norm(Xd - W.astype(np.float64) @ H.astype(np.float64)))


def kl_oracle(X, W, H):
    """sqrt(2 D_KL(X || WH)) in float64: over X > 0 the terms x log(x/wh) - x + wh, written as
    x (u - log1p(u)) with u = (wh - x)/x (the same value, without the cancellation of the plain
    form when wh ~ x), plus wh where X == 0."""
    Xd = X.toarray().astype(np.float64)
    WH = W.astype(np.float64) @ H.astype(np.float64)
    pos = Xd > 0
    x, wh = Xd[pos], WH[pos]
    u = (wh - x) / x
    d = np.sum(x * (u - np.log1p(u))) + np.sum(WH[~pos])
    return float(np.sqrt(2.0 * d))


def oracle(beta_loss, X, W, H):
    return frobenius_oracle(X, W, H) if beta_loss == "frobenius" else kl_oracle(X, W, H)


def snapshot(A):
    """Deep copies of everything a scipy sparse matrix stores (to check it was not modified)."""
    out = {"format": A.format, "shape": A.shape, "dtype": A.dtype}
    for name in ("data", "indices", "indptr", "row", "col", "offsets", "rows"):
        if hasattr(A, name):
            out[name] = copy.deepcopy(getattr(A, name))
    if A.format == "dok":
        out["items"] = dict(A.items())
    if A.format in ("csr", "csc", "bsr"):
        out["has_sorted_indices"] = bool(A.has_sorted_indices)
    return out


def assert_unchanged(A, snap):
    now = snapshot(A)
    assert now.keys() == snap.keys()
    for key, before in snap.items():
        after = now[key]
        if isinstance(before, np.ndarray):
            assert after.dtype == before.dtype, key
            if before.dtype == object:  # lil's rows and data: arrays of lists
                assert after.tolist() == before.tolist(), key
            else:
                np.testing.assert_array_equal(after, before, err_msg=key)
        else:
            assert after == before, key


PENALTIES = [
    {},
    {"alpha_W": 0.01, "l1_ratio": 0.0},                   # l2 on both (alpha_H="same")
    {"alpha_W": 0.01, "l1_ratio": 0.5},                   # mixed on both
    {"alpha_W": 0.01, "l1_ratio": 1.0},                   # l1 on both
    {"alpha_W": 0.02, "alpha_H": 0.0, "l1_ratio": 0.5},   # W only
]
PENALTY_IDS = ["-".join(f"{k}={v}" for k, v in p.items()) or "none" for p in PENALTIES]


# ---------------------------------------------------------------------------------------------
# iterates: sparse == dense == scikit-learn's sparse MU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("penalty", PENALTIES, ids=PENALTY_IDS)
def test_iterates_match_dense_and_sklearn(rng, beta_loss, dtype, penalty):
    """60 iterations on a sparse X (empty rows/columns) equal the dense X's and sklearn's sparse MU."""
    X, W0, H0 = sparse_problem(rng, dtype=dtype)
    W0c, H0c = W0.copy(), H0.copy()
    kw = dict(n_components=W0.shape[1], init="custom", beta_loss=beta_loss, tol=0, max_iter=60,
              **penalty)
    Ws, Hs, _ = sk_decomp.non_negative_factorization(X, W0.copy(), H0.copy(), solver="mu", **kw)
    Wsp, Hsp, it, info = dffkit.non_negative_factorization(X, W0, H0, backend="cpu",
                                                           return_info=True, **kw)
    Wd, Hd, _ = dffkit.non_negative_factorization(X.toarray(), W0, H0, backend="cpu", **kw)
    assert it == info.n_iter == 60
    assert info.kernel == "cpu-sparse" and info.backend == "cpu"
    assert Wsp.dtype == dtype and Hsp.dtype == dtype
    np.testing.assert_array_equal(W0, W0c)  # the start is the caller's: not written
    np.testing.assert_array_equal(H0, H0c)
    bound = 1e-10 if dtype == np.float64 else 1e-4
    assert rel(Wsp, Wd) <= bound, rel(Wsp, Wd)
    assert rel(Hsp, Hd) <= bound, rel(Hsp, Hd)
    assert rel(Wsp, Ws) <= bound, rel(Wsp, Ws)
    assert rel(Hsp, Hs) <= bound, rel(Hsp, Hs)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("shape", [(2000, 300, 12, 0.02), (300, 1500, 20, 0.05), (1, 50, 1, 0.5),
                                   (40, 1, 1, 0.5), (600, 500, 7, 0.001)],
                         ids=["tall", "wide", "one-row", "one-col", "very-sparse"])
def test_iterates_match_sklearn_other_shapes(rng, beta_loss, shape):
    """Tall/wide (parallel), one-row/column and very sparse X match sklearn's MU and the dense run."""
    m, n, k, density = shape
    X, W0, H0 = sparse_problem(rng, m=m, n=n, k=k, density=density, empty=min(m, n) > 1)
    kw = dict(n_components=k, init="custom", beta_loss=beta_loss, tol=0, max_iter=20)
    Ws, Hs, _ = sk_decomp.non_negative_factorization(X, W0.copy(), H0.copy(), solver="mu", **kw)
    Wsp, Hsp, _ = dffkit.non_negative_factorization(X, W0, H0, backend="cpu", **kw)
    Wd, Hd, _ = dffkit.non_negative_factorization(X.toarray(), W0, H0, backend="cpu", **kw)
    for A, B in ((Wsp, Ws), (Hsp, Hs), (Wsp, Wd), (Hsp, Hd)):
        assert rel(A, B) <= 1e-10, rel(A, B)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_iterates_match_sklearn_large_k(rng, beta_loss, dtype):
    """k = 140 (rows of 9 float32 / 18 float64 vectors): the any-k row kernel, the blocked
    denominators (blocks of 48 rows, a partial last one) and the tiled Grams give the dense
    run's and sklearn's iterates."""
    X, W0, H0 = sparse_problem(rng, m=301, n=230, k=140, density=0.1, dtype=dtype)
    kw = dict(n_components=140, init="custom", beta_loss=beta_loss, tol=0, max_iter=15)
    Ws, Hs, _ = sk_decomp.non_negative_factorization(X, W0.copy(), H0.copy(), solver="mu", **kw)
    Wsp, Hsp, _, info = dffkit.non_negative_factorization(X, W0, H0, backend="cpu",
                                                          return_info=True, **kw)
    Wd, Hd, _, info_d = dffkit.non_negative_factorization(X.toarray(), W0, H0, backend="cpu",
                                                          return_info=True, **kw)
    bound = 1e-10 if dtype == np.float64 else 1e-4
    for A, B in ((Wsp, Ws), (Hsp, Hs), (Wsp, Wd), (Hsp, Hd)):
        assert rel(A, B) <= bound, rel(A, B)
    assert info.error == pytest.approx(info_d.error, rel=1e-6 if dtype == np.float32 else 1e-9)


def test_all_zero_sparse_X_matches_dense(rng):
    """A sparse X with no stored entries, or only explicit zeros, runs like the dense zero matrix."""
    m, n, k = 30, 20, 3
    W0, H0 = rng.random((m, k)) + 0.1, rng.random((k, n)) + 0.1
    for X in (sp.csr_matrix((m, n)),
              sp.csr_matrix((np.zeros(4), ([0, 3, 7, 29], [1, 1, 5, 19])), shape=(m, n))):
        for beta_loss in ("frobenius", "kullback-leibler"):
            kw = dict(n_components=k, init="custom", beta_loss=beta_loss, tol=0, max_iter=15,
                      backend="cpu", return_info=True)
            Ws, Hs, _, info_s = dffkit.non_negative_factorization(X, W0, H0, **kw)
            Wd, Hd, _, info_d = dffkit.non_negative_factorization(X.toarray(), W0, H0, **kw)
            np.testing.assert_allclose(Ws, Wd, rtol=1e-10, atol=1e-300)
            np.testing.assert_allclose(Hs, Hd, rtol=1e-10, atol=1e-300)
            assert info_s.error == pytest.approx(info_d.error, rel=1e-9, abs=1e-300)


# ---------------------------------------------------------------------------------------------
# stopping: the tol test, the default start
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_tol_stopping_matches_dense_and_sklearn(rng, beta_loss, tol):
    """With tol > 0 sparse X stops where dense X and sklearn stop, with the dense run's error."""
    X, W0, H0 = sparse_problem(rng, m=90, n=60, k=5)
    kw = dict(n_components=5, init="custom", beta_loss=beta_loss, tol=tol, max_iter=1000)
    Ws, Hs, it_s = sk_decomp.non_negative_factorization(X, W0.copy(), H0.copy(), solver="mu", **kw)
    W, H, it, info = dffkit.non_negative_factorization(X, W0, H0, backend="cpu", return_info=True,
                                                       **kw)
    _, _, it_d, info_d = dffkit.non_negative_factorization(X.toarray(), W0, H0, backend="cpu",
                                                           return_info=True, **kw)
    assert it == it_d == it_s
    assert it % 10 == 0 and 0 < it < 1000
    assert info.error == pytest.approx(info_d.error, rel=1e-9)
    assert info.error_init == pytest.approx(info_d.error_init, rel=1e-9)
    assert info.error == pytest.approx(oracle(beta_loss, X, W, H), rel=1e-9)
    assert info.error == pytest.approx(oracle(beta_loss, X, Ws, Hs), rel=1e-6)
    assert rel(W, Ws) <= 1e-8 and rel(H, Hs) <= 1e-8


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_default_init_matches_sklearn_fit(rng, dtype):
    """init=None (nndsvda) on sparse X matches sklearn's NMF(solver='mu') fit: n_iter, W, H."""
    X, _, _ = sparse_problem(rng, m=120, n=80, k=6, dtype=dtype)
    theirs = sk_decomp.NMF(n_components=6, solver="mu", random_state=0, max_iter=400)
    ours = dffkit.NMF(n_components=6, random_state=0, max_iter=400, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Ws = theirs.fit_transform(X)
        Wo = ours.fit_transform(X)
    W, H, it = dffkit.non_negative_factorization(X, n_components=6, random_state=0, max_iter=400)
    assert ours.n_iter_ == theirs.n_iter_ == it
    assert it < 400
    bound = 1e-8 if dtype == np.float64 else 1e-3
    assert rel(Wo, Ws) <= bound and rel(ours.components_, theirs.components_) <= bound
    np.testing.assert_array_equal(W, Wo)
    np.testing.assert_array_equal(H, ours.components_)
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_,
                                                     rel=1e-8 if dtype == np.float64 else 1e-3)
    assert ours.backend_ == "cpu" and ours.kernel_ == "cpu-sparse"


# ---------------------------------------------------------------------------------------------
# the reported error
# ---------------------------------------------------------------------------------------------

def near_exact_problem(rng, delta, m=300, n=200, k=4, density=0.35):
    """X = A B with sparse non-negative A, B (so X is sparse and exactly rank k) and a start
    within a relative `delta` of (A, B) with the same zeros (MU keeps zeros): ||X - W0 H0|| is
    about delta ||X||, and WH is exactly zero wherever X is."""
    A = rng.random((m, k)) + 0.5
    A[rng.random((m, k)) >= density] = 0.0
    B = rng.random((k, n)) + 0.5
    B[rng.random((k, n)) >= density] = 0.0
    X = sp.csr_matrix(A) @ sp.csr_matrix(B)
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    W0 = A * (1 + delta * (rng.random(A.shape) - 0.5))
    H0 = B * (1 + delta * (rng.random(B.shape) - 0.5))
    return X, W0, H0


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("delta", [None, 1e-3, 1e-5],
                         ids=["generic", "near-exact-1e-3", "near-exact-1e-5"])
def test_reported_error_matches_numpy(rng, beta_loss, delta):
    """error_init and error equal the float64 numpy oracle to 1e-9, also for a nearly exact fit."""
    # in the near-exact cases the error is about delta ||X||: ||X||^2 - 2<X, WH> + ||WH||^2 (or
    # sum x log(x/wh) - sum x + sum wh) loses about log10(1/delta^2) digits to cancellation
    if delta is None:
        X, W0, H0 = sparse_problem(rng, m=100, n=70, k=5)
    else:
        X, W0, H0 = near_exact_problem(rng, delta)
        assert np.linalg.matrix_rank(X.toarray()) <= W0.shape[1]
    W, H, _, info = dffkit.non_negative_factorization(
        X, W0, H0, n_components=W0.shape[1], init="custom", beta_loss=beta_loss, tol=0,
        max_iter=10, backend="cpu", return_info=True)
    e0, e = oracle(beta_loss, X, W0, H0), oracle(beta_loss, X, W, H)
    assert info.error_init == pytest.approx(e0, rel=1e-9), (info.error_init, e0)
    assert info.error == pytest.approx(e, rel=1e-9), (info.error, e)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_reported_error_float32(rng, beta_loss):
    """float32 X: the reported error is the float64 oracle's on the float32 factors, to 1e-5."""
    X, W0, H0 = sparse_problem(rng, m=150, n=90, k=5, dtype=np.float32)
    W, H, _, info = dffkit.non_negative_factorization(
        X, W0, H0, n_components=5, init="custom", beta_loss=beta_loss, tol=0, max_iter=30,
        backend="cpu", return_info=True)
    assert info.error_init == pytest.approx(oracle(beta_loss, X, W0, H0), rel=1e-5)
    assert info.error == pytest.approx(oracle(beta_loss, X, W, H), rel=1e-5)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_iter_zero_returns_the_start(rng, beta_loss, dtype):
    """max_iter=0 returns the start (custom or random), n_iter 0, error_init == error == oracle."""
    X, W0, H0 = sparse_problem(rng, dtype=dtype)
    W, H, it, info = dffkit.non_negative_factorization(
        X, W0, H0, n_components=W0.shape[1], init="custom", beta_loss=beta_loss, max_iter=0,
        backend="cpu", return_info=True)
    assert it == info.n_iter == 0
    assert W.dtype == dtype and H.dtype == dtype
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)
    assert info.error_init == info.error
    bound = 1e-9 if dtype == np.float64 else 1e-5
    assert info.error == pytest.approx(oracle(beta_loss, X, W0, H0), rel=bound)
    Wr, Hr, _ = dffkit.non_negative_factorization(X, n_components=4, init="random",
                                                  random_state=5, beta_loss=beta_loss, max_iter=0)
    Wi, Hi = dffkit.initialize(X.toarray(), 4, init="random", random_state=5)
    np.testing.assert_array_equal(Wr, Wi)
    np.testing.assert_array_equal(Hr, Hi)


# ---------------------------------------------------------------------------------------------
# starts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(70, 45, 0.3), (200, 150, 0.05), (500, 300, 0.2), (3, 2, 0.5)],
                         ids=lambda s: "x".join(map(str, s[:2])))
def test_random_init_is_bit_identical_to_dense(rng, dtype, shape):
    """init='random' from sparse X is the dense X's start bit for bit, around the mean's chunks."""
    m, n, density = shape
    X, _, _ = sparse_problem(rng, m=m, n=n, k=2, density=density, dtype=dtype, empty=m > 3)
    for seed in (0, 11):
        Ws, Hs = dffkit.initialize(X, 2, init="random", random_state=seed)
        Wd, Hd = dffkit.initialize(X.toarray(), 2, init="random", random_state=seed)
        assert Ws.dtype == dtype and Hs.dtype == dtype
        np.testing.assert_array_equal(Ws, Wd)
        np.testing.assert_array_equal(Hs, Hd)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nndsvd_matches_sklearn_on_sparse(rng, init, dtype):
    """NNDSVD starts from sparse X are sklearn's _initialize_nmf on the same matrix, to rounding."""
    sk_nmf = pytest.importorskip("sklearn.decomposition._nmf")
    if not hasattr(sk_nmf, "_initialize_nmf"):
        pytest.skip("scikit-learn has no _initialize_nmf")
    X, _, _ = sparse_problem(rng, m=90, n=60, k=5, dtype=dtype)
    Ws, Hs = sk_nmf._initialize_nmf(X, 5, init=init, random_state=0)
    Wd, Hd = dffkit.initialize(X, 5, init=init, random_state=0)
    assert Wd.dtype == Ws.dtype == dtype and Hd.dtype == Hs.dtype == dtype
    bound = 1e-10 if dtype == np.float64 else 1e-5
    assert rel(Wd, Ws) <= bound and rel(Hd, Hs) <= bound
    if init == "nndsvd":  # the zeros are scikit-learn's zeros
        np.testing.assert_array_equal(Wd == 0, Ws == 0)
        np.testing.assert_array_equal(Hd == 0, Hs == 0)


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_thread_count_does_not_change_bits(beta_loss, dtype):
    """1 and 2 threads give the same bits for a parallel-sized sparse fit, transform, max_iter=0."""
    rng = np.random.default_rng(7)
    X = sp.random(4000, 3000, density=0.01, format="csr", dtype=np.float64,
                  random_state=np.random.RandomState(7))
    X = X.astype(dtype)
    k = 16
    W0, H0 = dffkit.initialize(X, k, init="random", random_state=1)
    H_fixed = (rng.random((k, 3000)) + 0.1).astype(dtype)
    saved = dffkit.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            dffkit.set_num_threads(threads)
            fit = dffkit.non_negative_factorization(
                X, W0, H0, n_components=k, init="custom", beta_loss=beta_loss, tol=1e-6,
                max_iter=20, backend="cpu", return_info=True)
            tr = dffkit.non_negative_factorization(
                X, None, H_fixed, n_components=k, init="custom", update_H=False,
                beta_loss=beta_loss, tol=0, max_iter=5, backend="cpu")
            zero = dffkit.non_negative_factorization(
                X, W0, H0, n_components=k, init="custom", beta_loss=beta_loss, max_iter=0,
                backend="cpu", return_info=True)
            out.append((fit, tr, zero))
    finally:
        dffkit.set_num_threads(saved)
    assert dffkit.get_num_threads() == saved
    (f1, t1, z1), (f2, t2, z2) = out
    np.testing.assert_array_equal(f1[0], f2[0])
    np.testing.assert_array_equal(f1[1], f2[1])
    assert f1[2] == f2[2]
    assert (f1[3].error_init, f1[3].error) == (f2[3].error_init, f2[3].error)
    np.testing.assert_array_equal(t1[0], t2[0])
    assert z1[3].error == z2[3].error


# ---------------------------------------------------------------------------------------------
# the estimator, input formats, the caller's matrix
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_estimator_on_sparse(rng, dtype):
    """NMF on sparse X matches sklearn; transform equals the dense transform; dtype kept."""
    X, _, _ = sparse_problem(rng, m=80, n=50, k=4, dtype=dtype)
    ours = dffkit.NMF(n_components=4, init="nndsvda", tol=0, max_iter=50, random_state=0)
    theirs = sk_decomp.NMF(n_components=4, init="nndsvda", solver="mu", tol=0, max_iter=50,
                           random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Wo = ours.fit_transform(X)
        Ws = theirs.fit_transform(X)
    bound = 1e-8 if dtype == np.float64 else 1e-4
    assert Wo.dtype == dtype and ours.components_.dtype == dtype
    assert rel(Wo, Ws) <= bound and rel(ours.components_, theirs.components_) <= bound
    assert ours.n_iter_ == 50
    assert ours.backend_ == "cpu" and ours.kernel_ == "cpu-sparse"  # backend="auto"
    new = X[:17]
    Wt = ours.transform(new)
    assert Wt.dtype == dtype and Wt.shape == (17, 4)
    bound_t = 1e-10 if dtype == np.float64 else 1e-4
    assert rel(Wt, ours.transform(new.toarray())) <= bound_t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(Wt, theirs.transform(new)) <= bound
    back = ours.inverse_transform(Wt)
    assert back.shape == (17, 50)
    np.testing.assert_allclose(back, Wt @ ours.components_)
    assert rel(ours.fit(X).components_, theirs.components_) <= bound


def _formats(X):
    """X (csr, float64) in every scipy sparse format and layout the engine takes, each with
    the canonical csr it must give the result of."""
    csr = X.tocsr()
    out = {}
    for fmt in ("csr", "csc", "coo", "lil", "dok", "bsr", "dia"):
        out[fmt] = (csr.asformat(fmt), csr)
    if hasattr(sp, "csr_array"):
        out["csr_array"] = (sp.csr_array(csr), csr)
        out["csc_array"] = (sp.csc_array(csr), csr)
        out["coo_array"] = (sp.coo_array(csr), csr)
    i64 = csr.copy()
    i64.indices, i64.indptr = i64.indices.astype(np.int64), i64.indptr.astype(np.int64)
    out["csr-int64-index"] = (i64, csr)
    i32 = csr.copy()
    i32.indices, i32.indptr = i32.indices.astype(np.int32), i32.indptr.astype(np.int32)
    out["csr-int32-index"] = (i32, csr)
    # unsorted indices: each row's entries reversed
    rev = csr.copy()
    for r in range(rev.shape[0]):
        a, b = rev.indptr[r], rev.indptr[r + 1]
        rev.indices[a:b] = rev.indices[a:b][::-1].copy()
        rev.data[a:b] = rev.data[a:b][::-1].copy()
    rev.has_sorted_indices = False
    out["csr-unsorted"] = (rev, csr)
    # duplicates (each entry stored twice, unsorted), summed the way scipy sums them
    out["csr-duplicates"] = (_with_duplicates(csr), _summed(csr))
    out["coo-duplicates"] = (_with_duplicates(csr).tocoo(), _summed(csr))
    # explicitly stored zeros: they add nothing
    zr, zc = np.nonzero(csr.toarray() == 0)
    withz = _with_explicit_zeros(csr, zr[::7], zc[::7])
    assert withz.nnz > csr.nnz
    out["csr-explicit-zeros"] = (withz, csr)
    return out


def _with_duplicates(csr):
    """csr with each row's entries stored twice (two parts summing to the value), in an unsorted
    order within the row; not canonical (scipy's has_canonical_format is False)."""
    indptr = [0]
    indices, data = [], []
    for r in range(csr.shape[0]):
        a, b = csr.indptr[r], csr.indptr[r + 1]
        cols, vals = csr.indices[a:b], csr.data[a:b]
        part = vals * 0.25
        indices += list(cols[::-1]) + list(cols)
        data += list(part[::-1]) + list(vals - part)
        indptr.append(len(indices))
    out = sp.csr_matrix((np.array(data), np.array(indices, dtype=np.int32),
                         np.array(indptr, dtype=np.int32)), shape=csr.shape)
    assert not out.has_canonical_format
    return out


def _summed(csr):
    """What the duplicates of _with_duplicates sum to, the way scipy sums them."""
    s = _with_duplicates(csr)
    s.sum_duplicates()
    return s


def _with_explicit_zeros(csr, zr, zc):
    """csr plus explicitly stored zeros at (zr, zc) (positions where csr has no entry)."""
    coo = csr.tocoo()
    rows = np.r_[coo.row, zr]
    cols = np.r_[coo.col, zc]
    vals = np.r_[coo.data, np.zeros(len(zr))]
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    indptr = np.searchsorted(rows, np.arange(csr.shape[0] + 1)).astype(np.int32)
    return sp.csr_matrix((vals, cols.astype(np.int32), indptr), shape=csr.shape)


@pytest.mark.filterwarnings("ignore:Can't check dok sparse matrix")  # scikit-learn's validation
def test_every_format_gives_the_csr_result(rng):
    """Every format, index dtype and layout gives the canonical csr's bits; the input is unchanged."""
    X, W0, H0 = sparse_problem(rng, m=40, n=30, k=3)
    for name, (A, ref) in _formats(X).items():
        expect = dffkit.non_negative_factorization(ref, W0, H0, n_components=3, init="custom",
                                                   tol=0, max_iter=25, return_info=True)
        snap = snapshot(A)
        got = dffkit.non_negative_factorization(A, W0, H0, n_components=3, init="custom", tol=0,
                                                max_iter=25, return_info=True)
        np.testing.assert_array_equal(got[0], expect[0], err_msg=name)
        np.testing.assert_array_equal(got[1], expect[1], err_msg=name)
        assert got[3].error == expect[3].error, name
        assert got[3].kernel == "cpu-sparse", name
        assert_unchanged(A, snap)
        est = dffkit.NMF(n_components=3, init="nndsvda", tol=0, max_iter=10, random_state=0)
        est_ref = dffkit.NMF(n_components=3, init="nndsvda", tol=0, max_iter=10, random_state=0)
        np.testing.assert_array_equal(est.fit_transform(A), est_ref.fit_transform(ref),
                                      err_msg=name)
        np.testing.assert_array_equal(est.transform(A), est_ref.transform(ref), err_msg=name)
        assert_unchanged(A, snap)
        for init in ("random", "nndsvda"):
            Wi, Hi = dffkit.initialize(A, 3, init=init, random_state=2)
            Wr, Hr = dffkit.initialize(ref, 3, init=init, random_state=2)
            np.testing.assert_array_equal(Wi, Wr, err_msg=f"{name} {init}")
            np.testing.assert_array_equal(Hi, Hr, err_msg=f"{name} {init}")
        assert_unchanged(A, snap)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_unsorted_and_duplicate_input_is_not_modified(fmt):
    """Unsorted, duplicated input keeps data, indices, indptr, has_sorted_indices."""
    rng = np.random.default_rng(1)
    X, _, _ = sparse_problem(rng, m=30, n=25, k=2)
    A = _with_duplicates(X).asformat(fmt)
    if fmt == "csr":
        assert not A.has_sorted_indices
    snap = snapshot(A)
    dffkit.non_negative_factorization(A, n_components=2, init="nndsvda", max_iter=5)
    dffkit.non_negative_factorization(A, n_components=2, init="random", random_state=0,
                                      beta_loss="kullback-leibler", max_iter=5)
    est = dffkit.NMF(n_components=2, max_iter=5).fit(A)
    est.transform(A)
    dffkit.initialize(A, 2, init="nndsvdar", random_state=0)
    assert_unchanged(A, snap)


@pytest.mark.parametrize("int_dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_sparse_X_becomes_float64(rng, int_dtype):
    """An integer or bool sparse X is factorized as float64, exactly as its float64 copy."""
    counts = rng.integers(0, 4, size=(30, 20)) * (rng.random((30, 20)) < 0.4)
    A = sp.csr_matrix(counts.astype(int_dtype))
    ref = sp.csr_matrix(counts.astype(int_dtype).astype(np.float64))
    snap = snapshot(A)
    W, H, _ = dffkit.non_negative_factorization(A, n_components=3, init="random", random_state=0,
                                                max_iter=20)
    Wr, Hr, _ = dffkit.non_negative_factorization(ref, n_components=3, init="random",
                                                  random_state=0, max_iter=20)
    assert W.dtype == H.dtype == np.float64
    np.testing.assert_array_equal(W, Wr)
    np.testing.assert_array_equal(H, Hr)
    assert_unchanged(A, snap)


def test_float32_sparse_keeps_float32(rng):
    """A float32 sparse X gives float32 W, H from the functions and the estimator."""
    X, W0, H0 = sparse_problem(rng, m=40, n=30, k=3, dtype=np.float32)
    for fmt in ("csr", "csc", "coo"):
        A = X.asformat(fmt)
        W, H, _ = dffkit.non_negative_factorization(A, W0, H0, n_components=3, init="custom",
                                                    max_iter=10)
        assert W.dtype == H.dtype == np.float32
        est = dffkit.NMF(n_components=3, max_iter=10)
        assert est.fit_transform(A).dtype == np.float32
        assert est.components_.dtype == np.float32
        assert est.transform(A).dtype == np.float32
        assert all(a.dtype == np.float32 for a in dffkit.initialize(A, 3, init="nndsvda"))
        assert all(a.dtype == np.float32 for a in dffkit.initialize(A, 3, init="random"))


# ---------------------------------------------------------------------------------------------
# update_H=False
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_H_false_matches_dense_and_sklearn(rng, beta_loss, dtype):
    """update_H=False on sparse X: W equals dense X's and sklearn's; H comes back unchanged."""
    X, _, H0 = sparse_problem(rng, dtype=dtype)
    kw = dict(n_components=H0.shape[0], init="custom", update_H=False, beta_loss=beta_loss,
              tol=0, max_iter=60)
    Ws, _, _ = sk_decomp.non_negative_factorization(X, None, H0.copy(), solver="mu", **kw)
    W, H, it, info = dffkit.non_negative_factorization(X, None, H0, backend="cpu",
                                                       return_info=True, **kw)
    Wd, _, _ = dffkit.non_negative_factorization(X.toarray(), None, H0, backend="cpu", **kw)
    assert it == 60 and info.kernel == "cpu-sparse"
    np.testing.assert_array_equal(H, H0)
    bound = 1e-10 if dtype == np.float64 else 1e-4
    assert rel(W, Wd) <= bound, rel(W, Wd)
    assert rel(W, Ws) <= bound, rel(W, Ws)
    assert info.error == pytest.approx(oracle(beta_loss, X, W, H0),
                                       rel=1e-9 if dtype == np.float64 else 1e-5)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def _calls():
    """Every public entry that takes a sparse X, as X -> call."""
    return {
        "nnf": lambda A: dffkit.non_negative_factorization(A, n_components=2, max_iter=5),
        "NMF.fit": lambda A: dffkit.NMF(n_components=2, max_iter=5).fit(A),
        "initialize": lambda A: dffkit.initialize(A, 2, init="random"),
        "initialize-nndsvda": lambda A: dffkit.initialize(A, 2, init="nndsvda"),
    }


@pytest.mark.parametrize("bad, match", [(-1.0, "Negative values"), (np.nan, "NaN or infinity"),
                                        (np.inf, "NaN or infinity"),
                                        (-np.inf, "NaN or infinity")],
                         ids=["negative", "nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_bad_values_refused(bad, match, fmt):
    """A negative, NaN or infinite stored value is refused with the dense X's message."""
    dense = np.ones((6, 5))
    dense[::2] = 0.0
    dense[3, 2] = bad
    A = sp.csr_matrix(dense).asformat(fmt)
    for name, call in _calls().items():
        if name == "NMF.fit":  # scikit-learn's validation may word NaN/inf its own way
            with pytest.raises(ValueError):
                call(A)
            if match == "Negative values":
                with pytest.raises(ValueError, match=match):
                    call(A)
        else:
            with pytest.raises(ValueError, match=match):
                call(A)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_shape_refused(shape):
    """A sparse X with a zero dimension is refused as empty."""
    A = sp.csr_matrix(shape)
    with pytest.raises(ValueError, match="empty"):
        dffkit.non_negative_factorization(A, n_components=1, max_iter=5)
    with pytest.raises(ValueError, match="empty"):
        dffkit.initialize(A, 1, init="random")
    with pytest.raises(ValueError):
        dffkit.NMF(n_components=1).fit(A)


def test_cuda_backend_refuses_sparse(rng):
    """backend='cuda' with sparse X names the CPU backend; backend='auto' runs on the CPU."""
    X, W0, H0 = sparse_problem(rng, m=20, n=15, k=2)
    with pytest.raises(ValueError, match="sparse X runs on the CPU backend"):
        dffkit.non_negative_factorization(X, n_components=2, backend="cuda")
    with pytest.raises(ValueError, match="sparse X runs on the CPU backend"):
        dffkit.non_negative_factorization(X, W0, H0, n_components=2, init="custom",
                                          backend="cuda")
    with pytest.raises(ValueError, match="sparse X runs on the CPU backend"):
        dffkit.NMF(n_components=2, backend="cuda").fit(X)
    _, _, _, info = dffkit.non_negative_factorization(X, n_components=2, backend="auto",
                                                      max_iter=5, return_info=True)
    assert info.backend == "cpu" and info.kernel == "cpu-sparse"


def test_dense_only_entries_refuse_sparse(rng):
    """nmf_batched and group-sparse NMF refuse sparse X with a TypeError naming toarray()."""
    X, _, _ = sparse_problem(rng, m=20, n=15, k=2)
    with pytest.raises(TypeError, match="needs dense data"):
        dffkit.nmf_batched([X], n_components=2)
    with pytest.raises(TypeError, match="needs dense data"):
        dffkit.nmf_batched([X.toarray(), X], n_components=2)
    with pytest.raises(TypeError, match="toarray"):
        dffkit.GroupSparseNMF(n_components=2, lam=0.1).fit(X, groups=[0, 10, 20])
    with pytest.raises(TypeError, match="toarray"):
        dffkit.group_sparse_nmf(X, [0, 10, 20], 2, lam=0.1)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_malformed_sparse_structure_is_refused_before_scipy_reads_it(fmt):
    """An edited indptr or an index out of range: a clear ValueError, not scipy writing out of bounds."""
    X = sp.random(50, 40, density=0.2, format=fmt, random_state=0, dtype=np.float32)
    if fmt == "csr":
        X.indptr[1] = 100000
    elif fmt == "csc":
        X.indices[3] = 1000
    else:
        X.row[2] = -1
    for call in (lambda: dffkit.non_negative_factorization(X, n_components=3, backend="cpu"),
                 lambda: dffkit.NMF(3).fit(X)):
        with pytest.raises(ValueError, match="malformed scipy.sparse"):
            call()


def test_canonical_csr_is_read_in_place_without_touching_the_object():
    """A canonical float CSR X: no attribute of the caller's object is set or changed (not even scipy's cached flags)."""
    X = sp.random(60, 50, density=0.2, format="csr", random_state=1, dtype=np.float64)
    X.data += 0.1
    attrs = dict(vars(X))
    arrays = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    dffkit.non_negative_factorization(X, n_components=4, init="random", random_state=0,
                                      max_iter=20, backend="cpu")
    assert set(vars(X)) == set(attrs)
    for a, b in zip(arrays, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_fully_stored_sparse_X_matches_dense(beta_loss):
    """Every position stored: sparse and dense give the same iterates and error (the error's zero part is ~0 for any W, H)."""
    rng = np.random.default_rng(3)
    D = rng.random((300, 200)) + 0.1
    W0, H0 = dffkit.initialize(D, 6, init="random", random_state=0)
    kw = dict(n_components=6, init="custom", max_iter=50, tol=1e-4, beta_loss=beta_loss,
              backend="cpu", return_info=True)
    Ws, Hs, ns, infs = dffkit.non_negative_factorization(sp.csr_matrix(D), W0, H0, **kw)
    Wd, Hd, nd, infd = dffkit.non_negative_factorization(D, W0, H0, **kw)
    assert ns == nd
    np.testing.assert_allclose(Ws, Wd, rtol=1e-10, atol=1e-12)
    assert infs.error == pytest.approx(infd.error, rel=1e-10)


def test_verbose_lines_on_sparse_X(capsys):
    """verbose=1 on sparse X prints scikit-learn's 'Epoch' lines with the errors scikit-learn prints."""
    from sklearn.decomposition import NMF as SkNMF

    X = sp.random(200, 150, density=0.1, format="csr", random_state=2, dtype=np.float64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SkNMF(5, solver="mu", verbose=1, random_state=0, max_iter=45).fit(X)
        expect = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Epoch")]
        dffkit.NMF(5, verbose=1, random_state=0, max_iter=45).fit(X)
        got = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("Epoch")]
    assert len(got) == len(expect) >= 4
    for a, b in zip(got, expect):
        ea, eb = a.split("error: ")[-1], b.split("error: ")[-1]
        assert a.split(" reached")[0] == b.split(" reached")[0]
        if "error" in b:
            assert float(ea) == pytest.approx(float(eb), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# a topic model on real vectorizer output; integer duplicates; odd shapes and malformed input
# ---------------------------------------------------------------------------------------------

CORPUS = [
    "the cat sat on the mat", "dogs and cats are friends", "the dog chased the cat",
    "stock markets fell sharply today", "investors sold stocks and bonds",
    "the market rallied after the news", "a cat and a dog slept", "bond yields rose as markets fell",
    "my dog likes the mat", "news about the stock market", "cats chase mice at night",
    "bonds and stocks moved together",
]


@pytest.mark.parametrize("vectorizer", ["tfidf", "tfidf-float32", "count", "binary-int8"])
@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_vectorizer_output_matches_sklearn(vectorizer, beta_loss):
    """TfidfVectorizer / CountVectorizer output (csr, float64, float32, int64, int8): NMF and
    non_negative_factorization give scikit-learn's MU fit from its nndsvda start, with the
    penalties, the same n_iter with tol, the dtype kept (integers as float64); the vectorizer's
    unsorted csr is left as it was."""
    text = pytest.importorskip("sklearn.feature_extraction.text")
    make = {"tfidf": lambda: text.TfidfVectorizer(),
            "tfidf-float32": lambda: text.TfidfVectorizer(dtype=np.float32),
            "count": lambda: text.CountVectorizer(),
            "binary-int8": lambda: text.CountVectorizer(binary=True, dtype=np.int8)}[vectorizer]
    X = make().fit_transform(CORPUS * 3)
    assert sp.issparse(X)
    expect_dtype = np.float32 if X.dtype == np.float32 else np.float64
    bound = 1e-4 if expect_dtype == np.float32 else 1e-9
    snap = snapshot(X)
    kw = dict(n_components=3, init="nndsvda", beta_loss=beta_loss, tol=1e-4, max_iter=150,
              random_state=0, alpha_W=0.001, l1_ratio=0.5)
    ours, theirs = dffkit.NMF(**kw), sk_decomp.NMF(solver="mu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Wo = ours.fit_transform(X)
        Wf, Hf, n_iter = dffkit.non_negative_factorization(X, **kw)
        assert_unchanged(X, snap)
        Ws = theirs.fit_transform(X.copy())  # scikit-learn sorts an unsorted X's indices in place
    assert ours.n_iter_ == theirs.n_iter_ == n_iter
    assert Wo.dtype == ours.components_.dtype == Wf.dtype == expect_dtype
    assert rel(ours.components_, theirs.components_) <= bound
    assert rel(Wo, Ws) <= bound
    np.testing.assert_array_equal(Wf, Wo)
    np.testing.assert_array_equal(Hf, ours.components_)
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=bound)
    assert_unchanged(X, snap)


def _duplicated_counts(dtype):
    """A coo count matrix of `dtype` whose duplicates sum past what the dtype holds (200 + 100 in
    uint8, 100 + 100 in int8), or past True for bool."""
    big = {np.uint8: (200, 100), np.int8: (100, 100), np.bool_: (1, 1)}[dtype]
    rows = np.array([0, 0, 1, 2, 3, 3, 4])
    cols = np.array([0, 0, 1, 2, 0, 3, 4])
    vals = np.array([big[0], big[1], 5, 7, 3, 2, 1]).astype(dtype)
    return sp.coo_matrix((vals, (rows, cols)), shape=(5, 6))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_])
def test_integer_duplicates_are_summed_in_float64(dtype):
    """Duplicates of an integer (or bool) sparse X are summed in float64, the matrix
    X.astype(np.float64) is (and what NMF's validation already gave): the old path summed in the
    integer dtype, so uint8 200 + 100 wrapped to 44 silently and int8 100 + 100 to -56 (refused
    as negative), and non_negative_factorization disagreed with NMF on the same X."""
    A = _duplicated_counts(dtype)
    ref = A.astype(np.float64)
    assert ref.toarray()[0, 0] == (300.0 if dtype == np.uint8 else 200.0 if dtype == np.int8 else 2.0)
    snap = snapshot(A)
    kw = dict(n_components=2, init="nndsvda", tol=0, max_iter=20, random_state=0)
    W, H, _ = dffkit.non_negative_factorization(A, **kw)
    Wr, Hr, _ = dffkit.non_negative_factorization(ref, **kw)
    np.testing.assert_array_equal(W, Wr)
    np.testing.assert_array_equal(H, Hr)
    est = dffkit.NMF(**kw)
    np.testing.assert_array_equal(est.fit_transform(A), Wr)
    np.testing.assert_array_equal(est.components_, Hr)
    for init in ("random", "nndsvda"):
        for a, b in zip(dffkit.initialize(A, 2, init=init, random_state=1),
                        dffkit.initialize(ref, 2, init=init, random_state=1)):
            np.testing.assert_array_equal(a, b)
    assert_unchanged(A, snap)


def _coo_array_of(shape):
    try:
        return sp.coo_array(np.ones(shape))
    except (TypeError, ValueError, AttributeError):
        pytest.skip(f"this scipy has no {len(shape)}-D coo_array")


@pytest.mark.parametrize("shape", [(4,), (2, 3, 2)], ids=["1-D", "3-D"])
def test_sparse_array_not_2d_is_refused_with_the_fix(shape):
    """A 1-D or n-D scipy.sparse array: a ValueError saying 2-D and how to reshape (NMF.fit
    raised 'not enough values to unpack')."""
    A = _coo_array_of(shape)
    calls = [lambda: dffkit.NMF(1).fit(A), lambda: dffkit.NMF(1).fit_transform(A),
             lambda: dffkit.non_negative_factorization(A, n_components=1),
             lambda: dffkit.initialize(A, 1)]
    fitted = dffkit.NMF(1, max_iter=5).fit(np.ones((3, 4)))
    calls.append(lambda: fitted.transform(A))
    for call in calls:
        with pytest.raises(ValueError, match=r"must be 2-D .*reshape it"):
            call()


_LIL_OUT_OF_RANGE = """
import numpy as np, scipy.sparse as sp, dffkit
L = sp.lil_matrix((5, 4)); L[0, 0] = 1.0; L[1, 2] = 2.0
L.rows[1] = [2, 900000]; L.data[1] = [2.0, 3.0]
for call in (lambda: dffkit.non_negative_factorization(L, n_components=1, max_iter=3),
             lambda: dffkit.NMF(1, max_iter=3).fit(L), lambda: dffkit.initialize(L, 1)):
    try:
        call()
    except ValueError as exc:
        print("refused:", exc)
    else:
        print("accepted")
"""


def test_lil_index_out_of_range_is_refused_not_a_crash():
    """A LIL matrix whose row lists hold a column past the width: a ValueError (it ended the
    process with a segmentation fault, in scipy's transpose). Run in a child process so that a
    regression shows as a failure here, not as a dead test run."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(dffkit.__file__)), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _LIL_OUT_OF_RANGE], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    for line in lines:
        assert line.startswith("refused:") and "malformed scipy.sparse lil" in line, line
        assert "outside [0, 4)" in line


def test_lil_row_with_fewer_values_than_indices_is_refused():
    """A LIL row with more indices than values: scipy's tocsr read past the row's values (an
    uninitialised number in X); now a ValueError naming the row."""
    L = sp.lil_matrix((5, 4))
    L[0, 0], L[1, 2] = 1.0, 2.0
    L.rows[1], L.data[1] = [2, 3], [2.0]
    for call in (lambda: dffkit.non_negative_factorization(L, n_components=1, max_iter=3),
                 lambda: dffkit.NMF(1, max_iter=3).fit(L), lambda: dffkit.initialize(L, 1)):
        with pytest.raises(ValueError, match="lil matrix: row 1 has 2 indices but 1 values"):
            call()


def test_malformed_csr_messages_name_the_short_array():
    """A CSR whose data is shorter than indptr says so (it said 'past the 16 stored indices'
    with 16 indices); float index arrays are named (an IndexError inside dffkit before)."""
    X = sp.csr_matrix(np.ones((4, 4)))
    X.data = X.data[:3]
    with pytest.raises(ValueError, match="past the 16 stored indices and 3 stored values"):
        dffkit.non_negative_factorization(X, n_components=1)
    Y = sp.csr_matrix(np.ones((4, 4)))
    Y.indptr = Y.indptr.astype(np.float64)
    for call in (lambda: dffkit.non_negative_factorization(Y, n_components=1),
                 lambda: dffkit.NMF(1).fit(Y)):
        with pytest.raises(ValueError, match="indptr and indices must be integers"):
            call()


def test_sparse_factors_are_refused_with_toarray():
    """A scipy.sparse W or H (init='custom', update_H=False): a TypeError naming toarray()
    (it said 'H must have shape (3, 10), got ()')."""
    X = sp.random(20, 10, density=0.4, format="csr", random_state=0) + 0.0
    W0, H0 = dffkit.initialize(X, 3, init="random", random_state=0)
    for call, name in (
        (lambda: dffkit.non_negative_factorization(X, H=sp.csr_matrix(H0), n_components=3,
                                                   update_H=False), "H"),
        (lambda: dffkit.non_negative_factorization(X, sp.csr_matrix(W0), H0, n_components=3,
                                                   init="custom"), "W"),
        (lambda: dffkit.NMF(3, init="custom").fit_transform(X, W=W0, H=sp.csc_matrix(H0)), "H"),
        (lambda: dffkit.non_negative_factorization(X.toarray(), W0, sp.coo_matrix(H0),
                                                   n_components=3, init="custom"), "H"),
    ):
        with pytest.raises(TypeError, match=rf"{name} is a scipy.sparse matrix.*{name}.toarray\(\)"):
            call()


def test_negative_sparse_values_are_not_told_to_shift():
    """Negative stored values (HashingVectorizer's default alternate_sign) are refused with a
    fix that keeps X sparse: clip, not 'shift' (shifting fills every zero)."""
    text = pytest.importorskip("sklearn.feature_extraction.text")
    X = text.HashingVectorizer(n_features=64).transform(CORPUS)
    assert X.data.min() < 0
    for call in (lambda: dffkit.NMF(2).fit(X),
                 lambda: dffkit.non_negative_factorization(X, n_components=2),
                 lambda: dffkit.initialize(X, 2)):
        with pytest.raises(ValueError, match="Negative values") as info:
            call()
        assert "shift or clip" not in str(info.value)
        assert "clip the stored values" in str(info.value)
        assert "alternate_sign=False" in str(info.value)
    # the dense message is unchanged
    with pytest.raises(ValueError, match="shift or clip the data first"):
        dffkit.non_negative_factorization(-np.ones((3, 2)), n_components=1)


def test_complex_and_oversized_sparse_messages_name_the_fix():
    """complex sparse X: 'must be real' with X.real (it said 'must be numeric'); more than
    2**31 - 1 columns: the 32-bit limit and which columns to keep (it said 'split it')."""
    C = sp.csr_matrix(np.ones((3, 2), dtype=complex))
    with pytest.raises(TypeError, match=r"must be real, got complex dtype .*X\.real"):
        dffkit.non_negative_factorization(C, n_components=1)
    wide = sp.csr_matrix((np.ones(1), np.array([2**31 + 1], dtype=np.int64),
                          np.array([0, 1, 1], dtype=np.int64)), shape=(2, 2**31 + 5))
    for call in (lambda: dffkit.non_negative_factorization(wide, n_components=1),
                 lambda: dffkit.NMF(1).fit(wide)):
        with pytest.raises(ValueError, match=r"32-bit integers .*getnnz\(axis=0\) > 0"):
            call()
