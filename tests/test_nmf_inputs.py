"""The NMF API's inputs against scikit-learn: the NNDSVD starts (scikit-learn's randomized SVD,
its random_state rules), the integer limits of the engines, nmf_batched's init / custom
factors / precision / dtypes / ConvergenceWarning, initialize's n_components, and the
messages of parameter errors (they name the parameter and the fix)."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import dffkit
from dffkit import nmf as nmf_module

sk_decomp = pytest.importorskip("sklearn.decomposition")
sk_nmf = pytest.importorskip("sklearn.decomposition._nmf")
ConvergenceWarning = dffkit.nmf.ConvergenceWarning
ROOT = Path(__file__).resolve().parent.parent


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def data(m, n, dtype=np.float64, seed=0, rank=6):
    """Non-negative m x n data: a rank-`rank` product plus noise (a spectrum with a gap and a
    tail, as real data has)."""
    rng = np.random.default_rng(seed)
    X = rng.random((m, rank)) @ rng.random((rank, n)) + 0.1 * rng.random((m, n))
    return X.astype(dtype)


def same_state(a, b):
    """Two RandomStates at the same point of their streams."""
    return a.randint(1 << 30, size=4).tolist() == b.randint(1 << 30, size=4).tolist()


# ---------------------------------------------------------------------------------------------
# A. the NNDSVD starts are scikit-learn's
# ---------------------------------------------------------------------------------------------

# (m, n, k): tall and wide (transpose='auto' decomposes X.T when m < n), k well below 0.1
# min(m, n) (7 power iterations) and above (4), k = min(m, n) (more columns sampled than X has)
SHAPES = [(100, 80, 10), (80, 100, 10), (300, 20, 3), (20, 300, 3), (200, 150, 12),
          (40, 30, 30), (30, 40, 29), (7, 5, 5), (50, 50, 1)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar", None])
def test_initialize_is_sklearns_initialize_nmf(m, n, k, dtype, init):
    X = data(m, n, dtype, seed=m + n + k)
    tol = 1e-9 if dtype == np.float64 else 1e-6
    for seed in (0, 7):
        Ws, Hs = sk_nmf._initialize_nmf(X, k, init=init, random_state=seed)
        Wd, Hd = dffkit.initialize(X, k, init=init, random_state=seed)
        assert Wd.dtype == Hd.dtype == Ws.dtype == dtype
        assert Wd.flags.c_contiguous and Hd.flags.c_contiguous
        assert rel(Wd, Ws) < tol and rel(Hd, Hs) < tol, (seed, rel(Wd, Ws), rel(Hd, Hs))
    # a RandomState instance: used as is, and left where scikit-learn leaves it
    ours, theirs = np.random.RandomState(11), np.random.RandomState(11)
    for _ in range(2):  # twice: the second call goes on from the first's stream
        Ws, Hs = sk_nmf._initialize_nmf(X, k, init=init, random_state=theirs)
        Wd, Hd = dffkit.initialize(X, k, init=init, random_state=ours)
        assert rel(Wd, Ws) < tol and rel(Hd, Hs) < tol
    assert same_state(ours, theirs)


def test_initialize_seed_matters_as_in_sklearn():
    """The randomized SVD does not resolve the small singular vectors of a noisy X: the start
    depends on the seed, in scikit-learn and so in dffkit (the old exact SVD matched neither)."""
    X = np.random.default_rng(1).random((100, 80))
    W0, _ = dffkit.initialize(X, 10, init="nndsvda", random_state=0)
    W1, _ = dffkit.initialize(X, 10, init="nndsvda", random_state=1)
    assert rel(W0, W1) > 1e-3
    np.testing.assert_allclose(W0, sk_nmf._initialize_nmf(X, 10, init="nndsvda", random_state=0)[0],
                               rtol=1e-9, atol=1e-12)


def test_initialize_none_uses_numpys_global_random_state():
    X = data(60, 90)
    np.random.seed(5)
    Ws, Hs = sk_nmf._initialize_nmf(X, 6, init="nndsvdar")
    after_sk = np.random.rand()
    np.random.seed(5)
    Wd, Hd = dffkit.initialize(X, 6, init="nndsvdar")
    after_ours = np.random.rand()
    np.testing.assert_array_equal(Wd, Ws)
    np.testing.assert_array_equal(Hd, Hs)
    assert after_ours == after_sk


def test_initialize_fortran_and_integer_input():
    X = data(70, 40)
    Xf = np.asfortranarray(X)
    Ws, Hs = sk_nmf._initialize_nmf(Xf, 5, init="nndsvda", random_state=3)
    Wd, Hd = dffkit.initialize(Xf, 5, init="nndsvda", random_state=3)
    assert rel(Wd, Ws) < 1e-9 and rel(Hd, Hs) < 1e-9
    Xi = (X * 10).astype(np.int64)
    Ws, Hs = sk_nmf._initialize_nmf(Xi.astype(np.float64), 5, init="nndsvda", random_state=3)
    Wd, Hd = dffkit.initialize(Xi, 5, init="nndsvda", random_state=3)
    assert Wd.dtype == np.float64 and rel(Wd, Ws) < 1e-9 and rel(Hd, Hs) < 1e-9


def test_initialize_without_scipy_is_close(monkeypatch):
    """Without scipy the same algorithm runs on numpy's QR and SVD: the same subspace, so the
    start agrees to rounding."""
    monkeypatch.setattr(nmf_module, "_scipy_linalg", lambda: None)
    for (m, n, k), dtype, tol in [((100, 80, 10), np.float64, 1e-10),
                                  ((80, 300, 5), np.float64, 1e-10),
                                  ((100, 80, 10), np.float32, 2e-4)]:
        X = data(m, n, dtype, seed=4)
        Ws, Hs = sk_nmf._initialize_nmf(X, k, init="nndsvda", random_state=0)
        Wd, Hd = dffkit.initialize(X, k, init="nndsvda", random_state=0)
        assert Wd.dtype == dtype
        assert rel(Wd, Ws) < tol and rel(Hd, Hs) < tol


def test_initialize_generator_and_wide_seeds():
    """Beyond scikit-learn (which refuses them): a numpy Generator and seeds >= 2**32 work,
    deterministically."""
    X = data(40, 30)
    a = dffkit.initialize(X, 5, init="nndsvdar", random_state=np.random.default_rng(4))
    b = dffkit.initialize(X, 5, init="nndsvdar", random_state=np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = dffkit.initialize(X, 5, init="nndsvdar", random_state=2**40 + 1)
    d = dffkit.initialize(X, 5, init="nndsvdar", random_state=2**40 + 1)
    np.testing.assert_array_equal(c[0], d[0])
    with pytest.raises(ValueError, match="random_state must be >= 0"):
        dffkit.initialize(X, 5, init="nndsvda", random_state=-1)
    with pytest.raises(ValueError, match="random_state must be None, an int"):
        dffkit.initialize(X, 5, init="nndsvda", random_state="seed")


FITS = [(100, 80, 10), (80, 100, 10), (300, 20, 3), (20, 300, 3), (40, 30, 28), (60, 200, 5)]


@pytest.mark.parametrize("m,n,k", FITS)
def test_default_fit_is_sklearns_fit(m, n, k):
    """dffkit.NMF(k, random_state=0) = sklearn NMF(k, solver='mu', random_state=0): the default
    init (None -> nndsvda) included, float64, tol stopping and all."""
    X = data(m, n, seed=k)
    theirs = sk_decomp.NMF(k, solver="mu", random_state=0).fit(X)
    ours = dffkit.NMF(k, random_state=0, backend="cpu").fit(X)
    assert ours.n_iter_ == theirs.n_iter_
    assert rel(ours.components_, theirs.components_) < 1e-5
    assert rel(ours.transform(X), theirs.transform(X)) < 1e-5
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-6)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
@pytest.mark.parametrize("m,n,k", [(120, 50, 6), (50, 120, 6)])
def test_nndsvd_fits_are_sklearns(init, m, n, k):
    X = data(m, n, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (0, "instance"):
            rs = (lambda: np.random.RandomState(9)) if seed == "instance" else (lambda: 0)
            Ws, Hs, ns = sk_decomp.non_negative_factorization(
                X, n_components=k, init=init, solver="mu", random_state=rs())
            Wd, Hd, nd = dffkit.non_negative_factorization(
                X, n_components=k, init=init, random_state=rs(), backend="cpu")
            assert nd == ns
            assert rel(Wd, Ws) < 1e-5 and rel(Hd, Hs) < 1e-5


@pytest.mark.parametrize("m,n,k", [(100, 80, 10), (20, 300, 3)])
def test_default_fit_float32_is_sklearns(m, n, k):
    """float32: the same start (decomposed in float32, as scikit-learn does), then the same
    iterates to float32 rounding (tol=0: the iteration count does not hang on the error)."""
    X = data(m, n, np.float32, seed=k)
    theirs = sk_decomp.NMF(k, solver="mu", random_state=0, tol=0, max_iter=100).fit(X)
    ours = dffkit.NMF(k, random_state=0, tol=0, max_iter=100, backend="cpu").fit(X)
    assert ours.components_.dtype == np.float32
    assert ours.n_iter_ == theirs.n_iter_ == 100
    assert rel(ours.components_, theirs.components_) < 1e-4


# ---------------------------------------------------------------------------------------------
# B. integers the engines take as C ints
# ---------------------------------------------------------------------------------------------

def test_max_iter_beyond_c_int_means_unlimited():
    X = data(30, 20)
    ref = dffkit.non_negative_factorization(X, n_components=3, init="random", random_state=0,
                                            tol=1e-2, max_iter=2**31 - 1, backend="cpu")
    for big in (2**31, 2**40, 10**30):
        W, H, n_iter = dffkit.non_negative_factorization(
            X, n_components=3, init="random", random_state=0, tol=1e-2, max_iter=big,
            backend="cpu")
        assert n_iter == ref[2] < 1000
        np.testing.assert_array_equal(W, ref[0])
    model = dffkit.NMF(3, init="random", random_state=0, tol=1e-2, max_iter=2**31, backend="cpu").fit(X)
    assert model.n_iter_ == ref[2]
    (Wb, Hb, info), = dffkit.nmf_batched([X], 3, random_state=0, tol=1e-2, max_iter=2**31,
                                         backend="cpu")
    np.testing.assert_array_equal(Wb, ref[0])
    W, H, _ = dffkit.group_sparse_nmf(X, [0, 30], 3, init="random", random_state=0, tol=1e-2,
                                      max_iter=2**33, backend="cpu")
    assert np.isfinite(W).all()
    with pytest.raises(ValueError, match="max_iter"):
        dffkit.nmf_batched([X], 3, max_iter=-1, backend="cpu")


def test_set_num_threads_is_bounded():
    before = dffkit.get_num_threads()
    try:
        for bad in (2**31, 10**6, 4097, -1):
            with pytest.raises(ValueError, match=r"n must be an integer from 0 to 4096"):
                dffkit.set_num_threads(bad)
            assert dffkit.get_num_threads() == before
        with pytest.raises(TypeError, match="n must be an integer"):
            dffkit.set_num_threads(2.0)
        dffkit.set_num_threads(2)
        assert dffkit.get_num_threads() == 2
        W, H, _ = dffkit.non_negative_factorization(data(30, 20), n_components=3, max_iter=5,
                                                    backend="cpu")
        assert np.isfinite(W).all()
    finally:
        dffkit.set_num_threads(before)


def _import_with_threads_env(value):
    env = dict(os.environ, DFFKIT_NUM_THREADS=value,
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    code = ("import warnings; warnings.simplefilter('always'); import dffkit; "
            "print(dffkit.get_num_threads())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("value", ["auto", "99999999999", "-2", "2.5"])
def test_bad_threads_env_warns_and_imports(value):
    done = _import_with_threads_env(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    assert "DFFKIT_NUM_THREADS" in done.stderr and repr(value) in done.stderr
    assert "from 0 to 4096" in done.stderr


def test_good_threads_env_is_used():
    done = _import_with_threads_env(" 3 ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3" and "DFFKIT_NUM_THREADS" not in done.stderr


# ---------------------------------------------------------------------------------------------
# C. nmf_batched
# ---------------------------------------------------------------------------------------------

def test_batched_init_none_follows_sklearns_rule_per_problem():
    rng = np.random.default_rng(0)
    # k = 4: nndsvda for the first two problems, random for the 3 x 30 one (k > min)
    Xs = [rng.random((40, 20)), rng.random((25, 60)), rng.random((3, 30))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = dffkit.nmf_batched(Xs, 4, init=None, random_state=5, backend="cpu")
        for b, (X, (W, H, info)) in enumerate(zip(Xs, out)):
            W1, H1, n1 = dffkit.non_negative_factorization(X, n_components=4, random_state=5 + b,
                                                          backend="cpu")
            np.testing.assert_array_equal(W, W1)
            np.testing.assert_array_equal(H, H1)
            assert info.n_iter == n1
        # and the nndsvda ones are scikit-learn's fits
        Ws, Hs, ns = sk_decomp.non_negative_factorization(Xs[1], n_components=4, solver="mu",
                                                          random_state=6)
    assert out[1][2].n_iter == ns and rel(out[1][0], Ws) < 1e-5


def test_batched_custom_factors():
    rng = np.random.default_rng(1)
    Xs = [rng.random((30, 12)), rng.random((18, 25)).astype(np.float32)]
    W0 = [rng.random((30, 3)), rng.random((18, 3)).astype(np.float32)]
    H0 = [rng.random((3, 12)), rng.random((3, 25)).astype(np.float32)]
    copies = [a.copy() for a in W0 + H0]
    out = dffkit.nmf_batched(Xs, 3, init="custom", W=W0, H=H0, tol=0, max_iter=25,
                             backend="cpu")
    for b, (W, H, info) in enumerate(out):
        W1, H1, _ = dffkit.non_negative_factorization(Xs[b], W0[b], H0[b], n_components=3,
                                                      init="custom", tol=0, max_iter=25,
                                                      backend="cpu")
        assert W.dtype == Xs[b].dtype
        np.testing.assert_array_equal(W, W1)
        np.testing.assert_array_equal(H, H1)
    for a, c in zip(W0 + H0, copies):  # never written
        np.testing.assert_array_equal(a, c)
    # (B, m, k) / (B, k, n) arrays for a stacked X
    Xst = rng.random((2, 10, 8))
    Wst, Hst = rng.random((2, 10, 3)), rng.random((2, 3, 8))
    out = dffkit.nmf_batched(Xst, 3, init="custom", W=Wst, H=Hst, tol=0, max_iter=10,
                             backend="cpu")
    ref = dffkit.non_negative_factorization(Xst[1], Wst[1], Hst[1], n_components=3,
                                            init="custom", tol=0, max_iter=10, backend="cpu")
    np.testing.assert_array_equal(out[1][0], ref[0])


def test_batched_custom_factor_errors():
    rng = np.random.default_rng(2)
    Xs = [rng.random((6, 5)), rng.random((7, 4))]
    W0 = [rng.random((6, 2)), rng.random((7, 2))]
    H0 = [rng.random((2, 5)), rng.random((2, 4))]
    with pytest.raises(ValueError, match="init='custom' needs W= and H="):
        dffkit.nmf_batched(Xs, 2, init="custom", backend="cpu")
    with pytest.raises(ValueError, match=r"one initial W per problem \(2\), got 1"):
        dffkit.nmf_batched(Xs, 2, init="custom", W=W0[:1], H=H0, backend="cpu")
    with pytest.raises(ValueError, match=r"H\[1\] must have shape \(2, 4\)"):
        dffkit.nmf_batched(Xs, 2, init="custom", W=W0, H=[H0[0], H0[0]], backend="cpu")
    with pytest.raises(TypeError, match=r"W\[1\] must have the same dtype as X"):
        dffkit.nmf_batched(Xs, 2, init="custom", W=[W0[0], W0[1].astype(np.float32)], H=H0,
                           backend="cpu")
    with pytest.warns(RuntimeWarning, match="init!='custom'"):
        dffkit.nmf_batched(Xs, 2, init="random", W=W0, H=H0, max_iter=3, tol=0, backend="cpu")


def test_batched_init_errors_name_the_problem_and_never_contradict():
    Xs = [np.ones((6, 5)), np.ones((3, 2)) + 0.5]
    with pytest.raises(ValueError, match=r"X\[1\].*needs n_components <= min"):
        dffkit.nmf_batched(Xs, 3, init="nndsvda", backend="cpu")
    with pytest.raises(ValueError, match="init must be one of") as err:
        dffkit.nmf_batched(Xs, 2, init="magic", backend="cpu")
    assert "'custom'" in str(err.value)  # listed because it is accepted


def test_batched_precision_is_validated_like_the_solver():
    X = [np.ones((4, 3))]
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'tf32', 'bf16x'"):
        dffkit.nmf_batched(X, 2, precision="fp8", backend="cpu")
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'tf32', 'bf16x'"):
        dffkit.non_negative_factorization(X[0], n_components=2, precision="fp8", backend="cpu")


def test_batched_mixed_dtypes_keep_their_dtype():
    rng = np.random.default_rng(0)
    A = rng.random((20, 10))
    B = rng.random((30, 8)).astype(np.float32)
    C = rng.random((20, 10)).astype(np.float32)  # same shape (penalties) as A, other dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        out = dffkit.nmf_batched([A, B, C], 3, random_state=0, backend="cpu")
        for b, X in enumerate([A, B, C]):
            W, H, info = out[b]
            W1, H1, n1, i1 = dffkit.non_negative_factorization(
                X, n_components=3, init="random", random_state=b, backend="cpu",
                return_info=True)
            assert W.dtype == H.dtype == X.dtype
            assert info.precision == ("fp32" if X.dtype == np.float32 else "fp64")
            np.testing.assert_array_equal(W, W1)
            np.testing.assert_array_equal(H, H1)
            assert info.n_iter == n1 and info.error == i1.error


def test_batched_convergence_warning_names_the_problems():
    rng = np.random.default_rng(3)
    Wt, Ht = rng.random((20, 2)) + 0.1, rng.random((2, 15)) + 0.1
    easy = Wt @ Ht  # started at its exact factors: stops at an early tol check
    hard = rng.random((40, 30))  # from a random start: runs to max_iter
    Xs = [hard, easy, hard, easy]
    W0 = [rng.random((40, 2)), Wt, rng.random((40, 2)), Wt]
    H0 = [rng.random((2, 30)), Ht, rng.random((2, 30)), Ht]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dffkit.nmf_batched(Xs, 2, init="custom", W=W0, H=H0, max_iter=30, backend="cpu")
    n_iter = [r[2].n_iter for r in out]
    assert n_iter[0] == n_iter[2] == 30 and n_iter[1] < 30 and n_iter[3] < 30
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    msg = str(conv[0].message)
    assert "Maximum number of iterations 30" in msg and "2 of 4" in msg and "indices 0, 2)" in msg
    assert conv[0].filename == __file__  # points at the caller
    # none when all converge, none with tol=0 (max_iter is the request then)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        dffkit.nmf_batched([easy, easy], 2, init="custom", W=[Wt, Wt], H=[Ht, Ht], max_iter=30,
                           backend="cpu")
        dffkit.nmf_batched([hard], 2, random_state=0, max_iter=5, tol=0, backend="cpu")


# ---------------------------------------------------------------------------------------------
# D. initialize validates n_components and init
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["random", "nndsvda"])
@pytest.mark.parametrize("k,exc", [(2.7, TypeError), (0, ValueError), (-1, ValueError),
                                   (None, TypeError), ("a", TypeError), (True, TypeError),
                                   (np.arange(3), TypeError)])
def test_initialize_refuses_bad_n_components(init, k, exc):
    X = np.random.default_rng(0).random((6, 5))
    with pytest.raises(exc, match="n_components must be a positive integer"):
        dffkit.initialize(X, k, init=init)


def test_initialize_accepts_numpy_integers_and_refuses_custom():
    X = np.random.default_rng(0).random((6, 5))
    W, H = dffkit.initialize(X, np.int64(3), init="nndsvda", random_state=0)
    assert W.shape == (6, 3) and H.shape == (3, 5)
    with pytest.raises(ValueError, match="init='custom' is not an initialization method"):
        dffkit.initialize(X, 3, init="custom")
    with pytest.raises(ValueError, match="init must be one of") as err:
        dffkit.initialize(X, 3, init="magic")
    assert "custom" not in str(err.value)
    # None: scikit-learn's rule
    np.testing.assert_array_equal(dffkit.initialize(X, 3, init=None, random_state=0)[0],
                                  dffkit.initialize(X, 3, init="nndsvda", random_state=0)[0])
    np.testing.assert_array_equal(dffkit.initialize(X, 6, init=None, random_state=0)[0],
                                  dffkit.initialize(X, 6, init="random", random_state=0)[0])


# ---------------------------------------------------------------------------------------------
# E. messages
# ---------------------------------------------------------------------------------------------

def test_transform_in_another_dtype_says_so():
    X = np.random.default_rng(0).random((30, 10))
    for fit_dtype, other in ((np.float32, np.float64), (np.float64, np.float32)):
        model = dffkit.NMF(3, max_iter=20, backend="cpu").fit(X.astype(fit_dtype))
        with pytest.raises(TypeError) as err:
            model.transform(X.astype(other))
        msg = str(err.value)
        assert f"fitted on {np.dtype(fit_dtype).name} data" in msg
        assert f"X is {np.dtype(other).name}" in msg and f"X.astype(np.{np.dtype(fit_dtype).name})" in msg
        assert "H must" not in msg
        # scikit-learn refuses the mismatch as well (a TypeError); the same dtype works
        theirs = sk_decomp.NMF(3, solver="mu", max_iter=20).fit(X.astype(fit_dtype))
        with pytest.raises(TypeError):
            theirs.transform(X.astype(other))
        assert model.transform(X.astype(fit_dtype)).dtype == fit_dtype
    gs = dffkit.GroupSparseNMF(3, max_iter=10, backend="cpu").fit(X.astype(np.float32), groups=[0, 30])
    with pytest.raises(TypeError, match="fitted on float32 data, but X is float64"):
        gs.transform(X)


def test_update_H_false_without_H_says_so():
    X = np.random.default_rng(0).random((6, 5))
    for call in (lambda: dffkit.non_negative_factorization(X, n_components=3, update_H=False),
                 lambda: dffkit.non_negative_factorization(X, update_H=False),
                 lambda: dffkit.group_sparse_nmf(X, [0, 6], 3, update_H=False)):
        with pytest.raises(ValueError, match="H is required when update_H=False") as err:
            call()
        assert "init='custom'" not in str(err.value)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_components=np.arange(3)), TypeError, "n_components must be a positive integer"),
    (dict(n_components="all"), TypeError, "n_components must be a positive integer"),
    (dict(n_components=3, alpha_H=np.array([1.0, 2.0])), TypeError, "alpha_H must be a real number"),
    (dict(n_components=3, alpha_H="different"), ValueError, "alpha_H must be a real number >= 0 or 'same'"),
    (dict(n_components=3, init=np.array([1])), ValueError, "init must be one of"),
    (dict(n_components=3, precision=np.array(["fp32"])), ValueError, "precision must be one of"),
    (dict(n_components=3, solver=np.array(["mu"])), ValueError, "solver="),
    (dict(n_components=3, backend=np.array(["cpu"])), ValueError, "backend must be one of"),
])
def test_array_valued_parameters_give_parameter_errors(kwargs, exc, match):
    X = np.random.default_rng(0).random((6, 5))
    with pytest.raises(exc, match=match):
        dffkit.non_negative_factorization(X, **kwargs)


def test_estimator_array_n_components_gives_a_parameter_error():
    X = np.random.default_rng(0).random((6, 5))
    with pytest.raises(TypeError, match="n_components must be a positive integer"):
        dffkit.NMF(n_components=np.arange(3), backend="cpu").fit(X)
    with pytest.raises(TypeError, match="alpha_H must be a real number"):
        dffkit.NMF(3, alpha_H=np.array([1.0, 2.0]), backend="cpu").fit(X)


def test_overflow_message_does_not_suggest_float64_for_float64():
    X = np.full((6, 5), 1e200)
    X[0, 0] = 3e200
    with pytest.raises(ValueError, match="overflowed float64") as err:
        dffkit.non_negative_factorization(X, n_components=2, init="nndsvda", backend="cpu")
    assert "pass X as float64" not in str(err.value)
    X32 = np.full((6, 5), 1e30, dtype=np.float32)
    with pytest.raises(ValueError, match="overflowed float32.*pass X as float64"):
        dffkit.non_negative_factorization(X32, n_components=2, init="random", backend="cpu")


def test_nndsvd_init_overflow_names_the_dtype():
    """The randomized SVD works in X's dtype: float64 data near 1e300 has a start (scikit-learn
    gives the same), float32 data near its limit overflows with an error that names float32."""
    X = np.full((6, 5), 1e300)
    X[0, 0] = 1.5e300
    Ws, Hs = sk_nmf._initialize_nmf(X, 2, init="nndsvda", random_state=0)
    Wd, Hd = dffkit.initialize(X, 2, init="nndsvda", random_state=0)
    assert np.isfinite(Wd).all() and rel(Wd, Ws) < 1e-9 and rel(Hd, Hs) < 1e-9
    X32 = np.full((6, 5), 3e37, dtype=np.float32)
    with pytest.raises(ValueError, match="init='nndsvda': the SVD of X overflowed float32.*"
                                         "pass X as float64.*init='random'"):
        dffkit.initialize(X32, 2, init="nndsvda", random_state=0)


# ---------------------------------------------------------------------------------------------
# scikit-learn's input and parameter rules (session 13 audit)
# ---------------------------------------------------------------------------------------------

def test_object_arrays_of_numbers_are_taken_as_float64():
    # scikit-learn's check_array converts them; dffkit refused them ("an object array")
    X = data(12, 9)
    Xo = X.astype(object)
    Xo[0, 0] = int(round(X[0, 0] * 0))  # a Python int among floats
    Xf = Xo.astype(np.float64)
    kw = dict(n_components=2, init="nndsvd", random_state=0, max_iter=20, tol=0, backend="cpu")
    W, H, _ = dffkit.non_negative_factorization(Xo, **kw)
    Wf, Hf, _ = dffkit.non_negative_factorization(Xf, **kw)
    assert W.dtype == np.float64
    np.testing.assert_array_equal(W, Wf)
    np.testing.assert_array_equal(H, Hf)
    Xo[1, 1] = None
    with pytest.raises(ValueError, match="NaN"):
        dffkit.non_negative_factorization(Xo, **kw)
    Xo[1, 1] = "x"
    with pytest.raises(TypeError, match="X must be numeric.*not all numbers"):
        dffkit.non_negative_factorization(Xo, **kw)


def test_pandas_nullable_and_mixed_frames_are_taken_as_float64():
    pd = pytest.importorskip("pandas")
    kw = dict(n_components=1, init="nndsvda", random_state=0, max_iter=20, tol=0, backend="cpu")
    ref = np.array([[1, 3], [2, 1], [3, 2], [4, 5]], dtype=np.float64)
    df = pd.DataFrame({"a": pd.array([1, 2, 3, 4], dtype="Int64"),
                       "b": pd.array([3, 1, 2, 5], dtype="Int64")})
    np.testing.assert_array_equal(dffkit.non_negative_factorization(df, **kw)[0],
                                  dffkit.non_negative_factorization(ref, **kw)[0])
    mixed = pd.DataFrame({"a": [True, False, True, True], "b": [3.0, 1.0, 2.0, 5.0]})
    np.testing.assert_array_equal(
        dffkit.non_negative_factorization(mixed, **kw)[0],
        dffkit.non_negative_factorization(np.array([[1, 3], [0, 1], [1, 2], [1, 5]], float), **kw)[0])
    df.loc[1, "a"] = pd.NA
    with pytest.raises(ValueError, match="NaN"):
        dffkit.non_negative_factorization(df, **kw)


@pytest.mark.parametrize("call", ["function", "batched", "estimator"])
def test_random_state_none_follows_numpy_global_seed(call):
    # scikit-learn's check_random_state(None) is numpy's global RandomState: np.random.seed
    # makes init="random" reproducible (dffkit drew from os.urandom)
    X = data(30, 20)

    def run():
        if call == "function":
            return dffkit.non_negative_factorization(X, n_components=3, init="random",
                                                     max_iter=5, backend="cpu")[0]
        if call == "batched":
            return dffkit.nmf_batched([X, X[:10]], 3, init="random", max_iter=5,
                                      backend="cpu")[1][0]
        return dffkit.NMF(3, init="random", max_iter=5, backend="cpu").fit_transform(X)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.random.seed(7)
        a = run()
        np.random.seed(7)
        b = run()
        c = run()  # the global stream moved on: another start
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shuffle_is_taken_and_checked():
    # scikit-learn's NMF has shuffle (coordinate descent's; MU ignores it): its get_params must
    # build a dffkit.NMF
    params = sk_decomp.NMF(solver="mu").get_params()
    model = dffkit.NMF(**params)
    assert model.get_params()["shuffle"] is False
    X = data(20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = dffkit.NMF(2, shuffle=True, random_state=0, max_iter=20).fit_transform(X)
        b = dffkit.NMF(2, shuffle=False, random_state=0, max_iter=20).fit_transform(X)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(dffkit.nmf.InvalidParameterError, match="shuffle must be True or False"):
        dffkit.NMF(2, shuffle="yes").fit(X)
    with pytest.raises(dffkit.nmf.InvalidParameterError, match="shuffle must be True or False"):
        dffkit.non_negative_factorization(X, n_components=2, shuffle=1)


def test_update_h_and_verbose_must_be_flags():
    # update_H="False" read as True: H updated and the caller's H ignored
    X = data(20, 10)
    H0 = np.full((2, 10), 0.5)
    with pytest.raises(ValueError, match="update_H must be True or False, got 'False'"):
        dffkit.non_negative_factorization(X, H=H0, n_components=2, update_H="False")
    with pytest.raises(ValueError, match="verbose must be an integer"):
        dffkit.non_negative_factorization(X, n_components=2, verbose="yes")
    W, H, _ = dffkit.non_negative_factorization(X, H=H0, n_components=2, update_H=np.False_,
                                                max_iter=5, tol=0)
    np.testing.assert_array_equal(H, H0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_components=2.0), "n_components must be a positive integer"),
    (dict(n_components=2, max_iter=2.5), "max_iter must be an integer"),
    (dict(n_components=2, alpha_H=None), "alpha_H"),
    (dict(n_components=2, tol=None), "tol must be a real number"),
    (dict(n_components=2, init="nope"), "init must be one of"),
])
def test_parameter_errors_are_both_value_and_type_errors(kwargs, match):
    # scikit-learn's InvalidParameterError is both: `except ValueError` around a drop-in call
    # must catch dffkit's too
    X = data(10, 6)
    for kind in (ValueError, TypeError):
        with pytest.raises(kind, match=match):
            dffkit.non_negative_factorization(X, **kwargs)
    with pytest.raises(ValueError) as err:
        sk_decomp.non_negative_factorization(X, solver="mu", **kwargs)
    assert isinstance(err.value, TypeError)  # the oracle: scikit-learn's error is both too


def test_integer_bounds_print_as_integers():
    with pytest.raises(ValueError, match=r"max_iter must be >= 0, got -1$"):
        dffkit.non_negative_factorization(data(10, 6), n_components=2, max_iter=-1)


def test_inverse_transform_takes_sparse_and_checks_the_shape():
    sp = pytest.importorskip("scipy.sparse")
    X = data(20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = dffkit.NMF(3, random_state=0, max_iter=20).fit(X)
    W = model.transform(X[:4])
    W[0, 1] = 0.0
    out = model.inverse_transform(sp.csr_matrix(W))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, W @ model.components_, rtol=1e-14)
    with pytest.raises(ValueError, match="n_components_ = 3 columns"):
        model.inverse_transform(W[:, :2])
    with pytest.raises(ValueError, match="n_components_ = 3 columns"):
        model.inverse_transform(sp.csr_matrix(W[:, :2]))


def test_transform_after_a_collapsed_fit_names_the_fit():
    # the message blamed "H ... use another initialisation": an H and init the caller never gave
    X = data(20, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dffkit.NMF(2, alpha_W=100.0, alpha_H=100.0, l1_ratio=1.0, random_state=0).fit(X)
    assert not model.components_.any()
    with pytest.raises(ValueError, match="fitted components_ are all zero"):
        model.transform(X)


def test_bad_option_values_are_invalid_parameter_errors():
    # as scikit-learn's InvalidParameterError (a ValueError and a TypeError): every parameter of
    # the wrong value, not only the wrong type; solver='cd' is a real solver dffkit lacks
    X = np.random.default_rng(0).random((6, 5))
    bad = [dict(beta_loss="x"), dict(beta_loss=3), dict(backend="tpu"), dict(random_state=-1),
           dict(alpha_H="other"), dict(solver="xyz")]
    for kwargs in bad:
        with pytest.raises(dffkit.InvalidParameterError):
            dffkit.NMF(2, max_iter=5, **kwargs).fit(X)
        with pytest.raises(dffkit.InvalidParameterError):
            dffkit.non_negative_factorization(X, n_components=2, max_iter=5, **kwargs)
    with pytest.raises(dffkit.InvalidParameterError):
        dffkit.set_num_threads(-1)
    with pytest.raises(ValueError, match="not offered") as info:
        dffkit.NMF(2, solver="cd").fit(X)
    assert not isinstance(info.value, dffkit.InvalidParameterError)


@pytest.mark.parametrize("init", ["random", "nndsvda", None])
def test_x_is_checked_once_per_fit(monkeypatch, init):
    # the finiteness and sign check is a pass over X (14 ms at 50000 x 512 float32); the start
    # used to check X a second time through the public initialize()
    from dffkit import nmf

    seen = []
    check = nmf._check_values
    monkeypatch.setattr(nmf, "_check_values", lambda v, *a, **kw: seen.append(v.shape) or check(v, *a, **kw))
    X = np.random.default_rng(0).random((50, 20)).astype(np.float32)
    dffkit.non_negative_factorization(X, n_components=3, init=init, max_iter=2, tol=0)
    assert seen == [X.shape]


def test_estimator_checks_a_float_array_once_and_gives_what_other_inputs_give(monkeypatch):
    # a float numpy X skips scikit-learn's validate_data (its dataframe probes cost 85 of the
    # 270 us of a one-row transform) and is checked once, by dffkit, for fit and for transform;
    # the results are those of the same X given as a list (scikit-learn's path)
    from dffkit import nmf

    rng = np.random.default_rng(4)
    X = rng.random((40, 12)).astype(np.float32)
    seen = []
    check = nmf._check_values
    monkeypatch.setattr(nmf, "_check_values", lambda v, *a, **kw: seen.append(v.shape) or check(v, *a, **kw))
    model = dffkit.NMF(3, init="random", random_state=0, max_iter=30, backend="cpu")
    W = model.fit_transform(X)
    assert seen == [X.shape] and model.n_features_in_ == 12
    seen.clear()
    Wt = model.transform(X[:5])
    assert seen == [(5, 12)]
    monkeypatch.setattr(nmf, "_check_values", check)
    other = dffkit.NMF(3, init="random", random_state=0, max_iter=30, backend="cpu")
    W64 = other.fit_transform(X.astype(np.float64).tolist())  # a list: scikit-learn's path, float64
    ref = dffkit.NMF(3, init="random", random_state=0, max_iter=30, backend="cpu").fit_transform(X.astype(np.float64))
    np.testing.assert_array_equal(W64, ref)
    np.testing.assert_array_equal(Wt, model.transform(X[:5].copy(order="F")))  # F order: copied, same bits
    with pytest.raises(ValueError, match="X has 11 features, but NMF is expecting 12 features as input"):
        model.transform(X[:, :11])
    with pytest.raises(ValueError, match="Negative values"):
        model.transform(-X[:2])
    assert X.flags.writeable and np.isfinite(X).all()  # the caller's array as it was


def test_feature_names_follow_scikit_learn_with_the_array_fast_path():
    pd = pytest.importorskip("pandas")
    X = np.random.default_rng(5).random((30, 4))
    frame = pd.DataFrame(X, columns=list("abcd"))
    model = dffkit.NMF(2, init="random", random_state=0, max_iter=20, backend="cpu").fit(frame)
    assert list(model.feature_names_in_) == list("abcd")
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        model.transform(X)  # an array after a fit on names: scikit-learn's warning
    model.fit(X)  # a refit on an array forgets the names
    assert not hasattr(model, "feature_names_in_")
