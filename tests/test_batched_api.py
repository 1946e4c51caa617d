"""nmf_batched, non_negative_factorization and initialize as functions, the way users call them:
every problem of a batch against the same problem solved alone, the input forms a batch comes
in, bad input refused by name, and scikit-learn (or a float64 numpy loop) as the oracle."""
import itertools
import warnings

import numpy as np
import pytest
from sklearn.decomposition import non_negative_factorization as sk_nnf

import dffkit
from dffkit import nmf as nmf_mod
from dffkit.nmf import ConvergenceWarning


def _alone(X, k, b, seed, **kw):
    """Problem b of a batch solved alone with the documented seed rule (seed + b)."""
    return dffkit.non_negative_factorization(X, n_components=k, random_state=seed + b,
                                             backend="cpu", return_info=True, **kw)


def _assert_same_as_alone(Xs, out, k, seed, **kw):
    assert isinstance(out, list) and len(out) == len(Xs)
    for b, (X, (W, H, info)) in enumerate(zip(Xs, out)):
        W1, H1, n1, i1 = _alone(np.asarray(X), k, b, seed, **kw)
        assert W.dtype == W1.dtype and H.dtype == H1.dtype
        np.testing.assert_array_equal(W, W1)
        np.testing.assert_array_equal(H, H1)
        assert (info.n_iter, info.error_init, info.error, info.precision) == \
            (n1, i1.error_init, i1.error, i1.precision)


# ---------------------------------------------------------------------------------------------
# each problem of a batch is the problem solved alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("penalty", [(0.0, "same", 0.0), (0.1, "same", 0.5), (0.05, 0.2, 1.0),
                                     (0.3, 0.0, 0.0)])
def test_each_problem_equals_it_alone_with_penalties_and_edge_shapes(beta_loss, penalty):
    rng = np.random.default_rng(0)
    alpha_W, alpha_H, l1_ratio = penalty
    # 1 x 1, a single row, a single column, k larger than min(m, n), two problems of one shape
    shapes = [(1, 1), (1, 5), (5, 1), (2, 3), (7, 4), (12, 30), (7, 4)]
    for dtype in (np.float32, np.float64, np.int64):
        Xs = [(rng.random(s) * 5).astype(dtype) for s in shapes]
        kw = dict(init="random", beta_loss=beta_loss, alpha_W=alpha_W, alpha_H=alpha_H,
                  l1_ratio=l1_ratio, max_iter=40)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            out = dffkit.nmf_batched(Xs, 3, random_state=11, backend="cpu", **kw)
            _assert_same_as_alone(Xs, out, 3, 11, **kw)
        want = np.float64 if dtype == np.int64 else dtype
        assert all(W.dtype == want for W, _, _ in out)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar", None])
def test_each_problem_equals_it_alone_for_the_svd_inits(init):
    rng = np.random.default_rng(1)
    Xs = [rng.random((20, 10)), rng.random((9, 30)).astype(np.float32), rng.random((3, 3))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dffkit.nmf_batched(Xs, 3, init=init, random_state=4, max_iter=30,
                                 beta_loss="kullback-leibler", backend="cpu")
        _assert_same_as_alone(Xs, out, 3, 4, init=init, max_iter=30,
                              beta_loss="kullback-leibler")


def test_custom_starts_as_lists_and_stacks_equal_them_alone():
    rng = np.random.default_rng(2)
    X = rng.random((3, 10, 6)).astype(np.float32)
    W0 = rng.random((3, 10, 2)).astype(np.float32)
    H0 = rng.random((3, 2, 6)).astype(np.float32)
    copies = [a.copy() for a in (X, W0, H0)]
    for W, H in ((W0, H0), (list(W0), tuple(H0)), ((w for w in W0), iter(list(H0)))):
        out = dffkit.nmf_batched(X, 2, init="custom", W=W, H=H, tol=0, max_iter=15,
                                 alpha_W=0.01, backend="cpu")
        for b, (Wb, Hb, info) in enumerate(out):
            W1, H1, n1 = dffkit.non_negative_factorization(
                X[b], W0[b], H0[b], n_components=2, init="custom", tol=0, max_iter=15,
                alpha_W=0.01, backend="cpu")
            np.testing.assert_array_equal(Wb, W1)
            np.testing.assert_array_equal(Hb, H1)
            assert info.n_iter == n1 == 15
            assert not np.shares_memory(Wb, W0) and not np.shares_memory(Hb, H0)
    for a, c in zip((X, W0, H0), copies):
        np.testing.assert_array_equal(a, c)


def test_stacks_that_are_not_contiguous_or_writable_give_the_same_results_untouched():
    rng = np.random.default_rng(3)
    base = rng.random((3, 8, 10)).astype(np.float32)
    transposed = np.swapaxes(base, 1, 2)  # (3, 10, 8), not C-contiguous
    read_only = transposed.copy()
    read_only.flags.writeable = False
    for X in (transposed, read_only, base[:, ::2, 1:]):
        before = X.copy()
        out = dffkit.nmf_batched(X, 3, random_state=2, max_iter=20, tol=0, backend="cpu")
        _assert_same_as_alone(list(X), out, 3, 2, init="random", max_iter=20, tol=0)
        np.testing.assert_array_equal(X, before)
        assert not any(np.shares_memory(W, X) or np.shares_memory(H, X) for W, H, _ in out)


# ---------------------------------------------------------------------------------------------
# the forms a batch comes in
# ---------------------------------------------------------------------------------------------

def test_generators_tuples_and_object_arrays_are_batches():
    # a generator used to become a 0-d object array: "got shape ()" for a valid batch
    rng = np.random.default_rng(4)
    Xs = [rng.random((6, 5)), rng.random((4, 7))]
    ref = dffkit.nmf_batched(Xs, 2, random_state=0, max_iter=10, tol=0, backend="cpu")
    ragged = np.empty(2, dtype=object)  # what a pandas column of arrays gives (.values)
    ragged[0], ragged[1] = Xs
    for form in ((x for x in Xs), tuple(Xs), map(np.asarray, Xs), ragged):
        out = dffkit.nmf_batched(form, 2, random_state=0, max_iter=10, tol=0, backend="cpu")
        for (W, H, _), (W1, H1, _) in zip(out, ref):
            np.testing.assert_array_equal(W, W1)
            np.testing.assert_array_equal(H, H1)


@pytest.mark.parametrize("X", [None, "images", {0: np.ones((3, 3))}, 3.0, {1, 2}])
def test_what_cannot_be_a_batch_is_a_type_error_naming_the_forms(X):
    with pytest.raises(TypeError, match=r"X must be a 3-D array \(B, m, n\) or a list"):
        dffkit.nmf_batched(X, 2, backend="cpu")


def test_a_sparse_matrix_as_the_batch_says_what_to_do():
    import scipy.sparse as sp

    with pytest.raises(TypeError, match="sparse matrix; nmf_batched takes dense problems"):
        dffkit.nmf_batched(sp.random(5, 5, density=0.5, format="csr"), 2, backend="cpu")


def test_bad_problems_are_named():
    good = np.ones((3, 3))
    with pytest.raises(ValueError, match="empty batch"):
        dffkit.nmf_batched(iter([]), 2, backend="cpu")
    with pytest.raises(ValueError, match="empty batch"):
        dffkit.nmf_batched(np.zeros((0, 3, 3)), 2, backend="cpu")
    with pytest.raises(ValueError, match=r"X\[1\] is empty \(shape \(0, 3\)\)"):
        dffkit.nmf_batched([good, np.zeros((0, 3))], 2, backend="cpu")
    with pytest.raises(ValueError, match=r"Input X\[2\] contains NaN"):
        dffkit.nmf_batched([good, good, np.array([[np.nan, 1.0]])], 1, backend="cpu")
    stack = np.ones((3, 2, 2))
    stack[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"Input X\[1\] contains NaN or infinity"):
        dffkit.nmf_batched(stack, 1, backend="cpu")
    with pytest.raises(ValueError, match=r"X\[1\] must be a 2-D array.*NoneType"):
        dffkit.nmf_batched([good, None], 1, backend="cpu")


# ---------------------------------------------------------------------------------------------
# random_state
# ---------------------------------------------------------------------------------------------

def test_custom_starts_leave_numpys_global_random_state_alone():
    # with init='custom' nothing is drawn; the batch used to take a seed from np.random anyway
    rng = np.random.default_rng(5)
    X = rng.random((2, 6, 4))
    W0, H0 = rng.random((2, 6, 2)), rng.random((2, 2, 4))
    np.random.seed(0)
    expected = np.random.rand(3)
    np.random.seed(0)
    dffkit.nmf_batched(X, 2, init="custom", W=W0, H=H0, max_iter=5, tol=0, backend="cpu")
    np.testing.assert_array_equal(np.random.rand(3), expected)
    with pytest.raises(ValueError, match="random_state must be None, an int"):
        dffkit.nmf_batched(X, 2, init="custom", W=W0, H=H0, random_state="seed", backend="cpu")


def test_random_state_none_follows_numpys_global_seed():
    X = np.random.default_rng(6).random((3, 5, 4))
    runs = []
    for _ in range(2):
        np.random.seed(7)
        runs.append(dffkit.nmf_batched(X, 2, max_iter=5, tol=0, backend="cpu"))
    for (W, _, _), (W1, _, _) in zip(*runs):
        np.testing.assert_array_equal(W, W1)


def test_random_state_is_checked_where_no_start_is_drawn():
    # scikit-learn refuses a bad random_state with init='custom' or update_H=False too; dffkit
    # used to accept anything there
    rng = np.random.default_rng(7)
    X, W0, H0 = rng.random((6, 4)), rng.random((6, 2)), rng.random((2, 4))
    for bad in ("seed", 1.5, True):
        with pytest.raises(ValueError, match="random_state must be None, an int"):
            dffkit.non_negative_factorization(X, W0, H0, n_components=2, init="custom",
                                              random_state=bad, backend="cpu")
        with pytest.raises(ValueError, match="random_state must be None, an int"):
            dffkit.non_negative_factorization(X, None, H0, n_components=2, update_H=False,
                                              random_state=bad, backend="cpu")
    dffkit.non_negative_factorization(X, W0, H0, n_components=2, init="custom",
                                      random_state=np.random.default_rng(0), backend="cpu")


def test_a_random_state_of_the_wrong_type_is_a_type_error_for_every_init():
    # InvalidParameterError is a ValueError and a TypeError; the NNDSVD inits raised a plain
    # ValueError where init='random' raised InvalidParameterError for the same value
    X = np.random.default_rng(8).random((6, 5))
    for init in ("random", "nndsvd", "nndsvda", "nndsvdar"):
        with pytest.raises(TypeError, match="random_state must be None, an int"):
            dffkit.initialize(X, 2, init=init, random_state=1.5)


# ---------------------------------------------------------------------------------------------
# many problems
# ---------------------------------------------------------------------------------------------

class _CountingTuple(tuple):
    """A penalty tuple that counts how often it is compared."""

    compared = 0
    __hash__ = tuple.__hash__

    def __eq__(self, other):
        type(self).compared += 1
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)


def test_many_shapes_are_grouped_in_linear_work(monkeypatch):
    # problems were grouped by (dtype, penalties) with a scan of the whole batch per group:
    # B problems of B distinct shapes with a penalty took B**2 comparisons (8000 images of
    # different sizes: 14 s, the solves 1 s)
    real = nmf_mod._penalties
    monkeypatch.setattr(nmf_mod, "_penalties", lambda *a: _CountingTuple(real(*a)))
    _CountingTuple.compared = 0
    rng = np.random.default_rng(9)
    Xs = [rng.random((2 + b % 20, 2 + b // 20)) for b in range(300)]
    out = dffkit.nmf_batched(Xs, 2, alpha_W=0.1, random_state=0, max_iter=2, tol=0,
                             backend="cpu")
    assert len(out) == 300
    assert _CountingTuple.compared < 3 * len(Xs)  # was about len(Xs)**2 / 2
    b = 123
    W1, H1, _ = dffkit.non_negative_factorization(Xs[b], n_components=2, init="random",
                                                  alpha_W=0.1, random_state=b, max_iter=2,
                                                  tol=0, backend="cpu")
    np.testing.assert_array_equal(out[b][0], W1)


# ---------------------------------------------------------------------------------------------
# non_negative_factorization and initialize as functions
# ---------------------------------------------------------------------------------------------

def test_return_info_must_be_a_bool():
    X = np.random.default_rng(10).random((6, 4))
    for bad in ("no", np.array([1, 2]), 1):
        with pytest.raises(ValueError, match="return_info must be True or False"):
            dffkit.non_negative_factorization(X, n_components=2, return_info=bad, backend="cpu")
    assert len(dffkit.non_negative_factorization(X, n_components=2, init="random",
                                                 return_info=np.bool_(True), backend="cpu")) == 4


@pytest.mark.parametrize("call", [
    lambda X: dffkit.non_negative_factorization(X, n_components=2, backend="cpu"),
    lambda X: dffkit.initialize(X, 2),
])
def test_none_or_a_scalar_as_x_is_named(call):
    # X=None ended in AttributeError: 'bool' object has no attribute 'astype'
    with pytest.raises(ValueError, match=r"X must be a 2-D array \(samples x features\), got NoneType"):
        call(None)
    with pytest.raises(ValueError, match="X must be a 2-D array .* got str 'abc'"):
        call("abc")


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar", "custom"])
def test_agrees_with_scikit_learn_from_the_same_start(beta_loss, init):
    rng = np.random.default_rng(11)
    for dtype, (alpha_W, alpha_H, l1_ratio) in itertools.product(
            (np.float32, np.float64), [(0.0, "same", 0.0), (0.1, "same", 0.5), (0.05, 0.2, 1.0)]):
        X = (rng.random((20, 12)) * 3).astype(dtype)
        W0 = rng.random((20, 3)).astype(dtype) if init == "custom" else None
        H0 = rng.random((3, 12)).astype(dtype) if init == "custom" else None
        kw = dict(n_components=3, init=init, beta_loss=beta_loss, alpha_W=alpha_W,
                  alpha_H=alpha_H, l1_ratio=l1_ratio, random_state=4, max_iter=50, tol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # scikit-learn updates a custom W and H in place: give it copies
            Ws, Hs, ns = sk_nnf(X, None if W0 is None else W0.copy(),
                                None if H0 is None else H0.copy(), solver="mu", **kw)
            W, H, n = dffkit.non_negative_factorization(X, W0, H0, backend="cpu", **kw)
        assert W.dtype == Ws.dtype == dtype
        tol = 1e-4 if dtype == np.float32 else 1e-9
        assert n == ns
        assert np.linalg.norm(W - Ws) <= tol * np.linalg.norm(Ws)
        assert np.linalg.norm(H - Hs) <= tol * np.linalg.norm(Hs)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_fixed_h_is_transform(beta_loss):
    rng = np.random.default_rng(12)
    X, H = rng.random((25, 9)), rng.random((3, 9))
    H_before = H.copy()
    kw = dict(update_H=False, beta_loss=beta_loss, alpha_W=0.1, l1_ratio=0.0, max_iter=50)
    Ws, _, ns = sk_nnf(X, None, H.copy(), n_components=3, solver="mu", **kw)
    W, H_out, n = dffkit.non_negative_factorization(X, None, H, n_components="auto",
                                                    backend="cpu", **kw)
    assert n == ns and np.linalg.norm(W - Ws) <= 1e-9 * np.linalg.norm(Ws)
    np.testing.assert_array_equal(H_out, H_before)
    np.testing.assert_array_equal(H, H_before)
    with pytest.warns(RuntimeWarning, match="provided initial W is not used"):
        dffkit.non_negative_factorization(X, np.ones((25, 3)), H, n_components=3,
                                          update_H=False, max_iter=2, backend="cpu")
    with pytest.raises(ValueError, match=r"H must have shape \(4, 9\)"):
        dffkit.non_negative_factorization(X, None, H, n_components=4, update_H=False,
                                          backend="cpu")


def test_fixed_h_kullback_leibler_with_l1_follows_the_formula():
    # the float64 update W <- W (R H^T) / (1 H^T + l1_W + l2_W W), R = X / (W H). scikit-learn
    # 1.x differs here: with update_H=False it caches sum(H) and its `denominator += l1_reg_W`
    # adds l1_W to that cache in place, once more every iteration
    rng = np.random.default_rng(13)
    X, H = rng.random((25, 9)), rng.random((3, 9))
    m, n = X.shape
    alpha_W, l1_ratio = 0.1, 0.5
    l1_W, l2_W = n * alpha_W * l1_ratio, n * alpha_W * (1 - l1_ratio)
    eps = np.finfo(np.float32).eps
    W = np.full((m, 3), np.sqrt(X.mean() / 3))
    for _ in range(30):
        WH = np.maximum(W @ H, eps)
        W = W * ((X / WH) @ H.T) / (H.sum(axis=1)[None, :] + l1_W + l2_W * W)
    Wd, _, _ = dffkit.non_negative_factorization(X, None, H, n_components=3, update_H=False,
                                                 beta_loss="kullback-leibler", alpha_W=alpha_W,
                                                 l1_ratio=l1_ratio, max_iter=30, tol=0,
                                                 backend="cpu")
    assert np.abs(Wd - W).max() <= 1e-12 * np.abs(W).max()
