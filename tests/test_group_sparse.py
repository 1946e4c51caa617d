"""Group-sparse NMF (issue 8): the objective of DESIGN.md, its monotone updates, the API."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dffkit
from dffkit.nmf import InvalidParameterError
from dffkit.group_sparse import (
    GroupSparseNMF,
    group_norms,
    group_objective,
    group_offsets,
    group_sparse_nmf,
    penalty_scale,
)

from conftest import readonly

pytestmark = pytest.mark.filterwarnings("ignore:Maximum number of iterations")


def objective_oracle(X, W, H, offsets, lam, mu, l1_W=0.0, l2_W=0.0, l1_H=0.0, l2_H=0.0):
    """DESIGN.md's objective, written out in float64 with a loop over the groups."""
    X, W, H = (np.asarray(a, dtype=np.float64) for a in (X, W, H))
    value = 0.5 * np.sum((X - W @ H) ** 2)
    for g in range(len(offsets) - 1):
        block = W[offsets[g]:offsets[g + 1]]
        value += lam * np.sum(np.sqrt(np.sum(block ** 2, axis=0)))
    value += 0.5 * mu * np.sum(H ** 2)
    value += l1_W * W.sum() + 0.5 * l2_W * np.sum(W ** 2) + l1_H * H.sum() + 0.5 * l2_H * np.sum(H ** 2)
    return float(value)


def random_offsets(rng, m, n_groups):
    cuts = np.sort(rng.choice(np.arange(1, m), size=min(n_groups - 1, m - 1), replace=False))
    return np.concatenate([[0], cuts, [m]]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the objective and the updates
# ---------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(4, 40), n=st.integers(2, 12), k=st.integers(1, 5), n_groups=st.integers(1, 6),
    lam=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0]), mu=st.sampled_from([0.0, 1e-3, 0.1, 2.0]),
    alpha_W=st.sampled_from([0.0, 0.01, 0.1]), l1_ratio=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_objective_never_increases_float64(m, n, k, n_groups, lam, mu, alpha_W, l1_ratio, seed):
    rng = np.random.default_rng(seed)
    X = rng.random((m, n)) * rng.choice([1.0, 0.0], size=(m, n), p=[0.8, 0.2])
    X[0, 0] = 1.0
    off = random_offsets(rng, m, n_groups)
    W0 = rng.random((m, k)) + 0.01
    H0 = rng.random((k, n)) + 0.01
    # explicit: with m - 1 groups the offsets have m entries and could be read as labels
    W, H, n_iter, obj = group_sparse_nmf(
        readonly(X), {"offsets": off}, k, lam=lam, mu=mu, init="custom", W=readonly(W0), H=readonly(H0),
        max_iter=30, tol=0.0, alpha_W=alpha_W, l1_ratio=l1_ratio, backend="cpu",
        record_objective=True)
    pen = dict(l1_W=n * alpha_W * l1_ratio, l2_W=n * alpha_W * (1 - l1_ratio),
               l1_H=m * alpha_W * l1_ratio, l2_H=m * alpha_W * (1 - l1_ratio))
    start = objective_oracle(X, W0, H0, off, lam, mu, **pen)
    values = np.array([start] + obj)
    assert n_iter == 30 and len(obj) == 30
    scale = max(abs(start), 1e-300)
    steps = np.diff(values)
    assert steps.max() <= 1e-10 * scale, f"objective rose by {steps.max()} at step {steps.argmax()}"
    # the engine's trace-identity value equals the direct float64 recomputation
    assert obj[-1] == pytest.approx(objective_oracle(X, W, H, off, lam, mu, **pen), rel=1e-9, abs=1e-12 * scale)


def test_recorded_objective_matches_numpy_each_iteration(rng):
    X = rng.random((60, 9))
    off = [0, 20, 45, 60]
    W0, H0 = rng.random((60, 4)), rng.random((4, 9))
    lam, mu = 0.7, 0.3
    obj = group_sparse_nmf(X, off, 4, lam=lam, mu=mu, init="custom", W=W0, H=H0, max_iter=5,
                           tol=0, record_objective=True, backend="cpu")[3]
    for t in range(1, 6):
        W, H, _ = group_sparse_nmf(X, off, 4, lam=lam, mu=mu, init="custom", W=W0, H=H0,
                                   max_iter=t, tol=0, backend="cpu")
        assert obj[t - 1] == pytest.approx(objective_oracle(X, W, H, off, lam, mu), rel=1e-10)
        assert group_objective(X, W, H, off, lam=lam, mu=mu) == pytest.approx(obj[t - 1], rel=1e-10)


def test_one_update_follows_the_formula(rng):
    """One iteration against DESIGN.md's update written in numpy (float64)."""
    X = rng.random((30, 7))
    off = np.array([0, 10, 30])
    W0, H0 = rng.random((30, 3)), rng.random((3, 7))
    lam, mu = 0.4, 0.2
    W, H, _ = group_sparse_nmf(X, off, 3, lam=lam, mu=mu, init="custom", W=W0, H=H0, max_iter=1,
                               tol=0, backend="cpu")
    nrm = np.repeat(group_norms(W0, off), np.diff(off), axis=0)
    W_ref = W0 * (X @ H0.T) / (W0 @ H0 @ H0.T + lam * W0 / np.maximum(nrm, np.finfo(float).tiny))
    H_ref = H0 * (W_ref.T @ X) / (W_ref.T @ W_ref @ H0 + mu * H0)
    np.testing.assert_allclose(W, W_ref, rtol=1e-12)
    np.testing.assert_allclose(H, H_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lam0_mu0_is_plain_nmf_bit_for_bit(rng, dtype):
    X = rng.random((90, 13)).astype(dtype)
    off = [0, 30, 60, 90]
    W0, H0 = dffkit.initialize(X, 5, init="random", random_state=3)
    Wg, Hg, ng = group_sparse_nmf(X, off, 5, lam=0.0, mu=0.0, init="custom", W=W0, H=H0,
                                  max_iter=50, tol=1e-4, backend="cpu")
    Wp, Hp, npl = dffkit.non_negative_factorization(X, W0, H0, 5, init="custom", max_iter=50,
                                                    tol=1e-4, backend="cpu")
    assert ng == npl
    assert Wg.dtype == dtype and Hg.dtype == dtype
    np.testing.assert_array_equal(Wg, Wp)
    np.testing.assert_array_equal(Hg, Hp)
    # the same through the random initialisation with one seed
    Wg, Hg, _ = group_sparse_nmf(X, off, 5, init="random", random_state=11, max_iter=20, backend="cpu")
    Wp, Hp, _ = dffkit.non_negative_factorization(X, n_components=5, init="random", random_state=11,
                                                  max_iter=20, backend="cpu")
    np.testing.assert_array_equal(Wg, Wp)
    np.testing.assert_array_equal(Hg, Hp)


def test_raising_lam_zeroes_more_image_part_pairs():
    rng = np.random.default_rng(7)
    n_images, rows, k = 24, 16, 6
    parts = rng.random((k, 20)) ** 3
    X = np.concatenate([rng.random((rows, 2)) @ parts[rng.choice(k, 2, replace=False)]
                        for _ in range(n_images)]) + 0.01 * rng.random((n_images * rows, 20))
    off = np.arange(n_images + 1) * rows
    lam_unit, mu_unit = penalty_scale(X, off, k)
    zeros = []
    for r in (0.0, 0.03, 0.1, 0.3):
        W, _, _ = group_sparse_nmf(X, off, k, lam=r * lam_unit, mu=0.01 * mu_unit, init="random",
                                   random_state=0, max_iter=300, tol=0, backend="cpu")
        codes = group_norms(W, off)
        zeros.append(int((codes < 1e-3 * codes.max()).sum()))
    assert zeros == sorted(zeros), zeros
    assert zeros[-1] > zeros[0] + n_images, zeros  # at least one more zero pair per image


def test_penalty_scale_makes_lam_and_mu_unit_free(rng):
    """X -> c X with lam = r lam_unit, mu = s mu_unit gives W, H -> sqrt(c) W, sqrt(c) H."""
    X = rng.random((48, 10))
    off = [0, 16, 32, 48]
    W0, H0 = rng.random((48, 4)), rng.random((4, 10))
    out = []
    for c in (1.0, 37.0):
        lu, mu_u = penalty_scale(c * X, off, 4)
        W, H, _ = group_sparse_nmf(c * X, off, 4, lam=0.2 * lu, mu=0.05 * mu_u, init="custom",
                                   W=np.sqrt(c) * W0, H=np.sqrt(c) * H0, max_iter=40, tol=0,
                                   backend="cpu")
        out.append((W / np.sqrt(c), H / np.sqrt(c)))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-9, atol=1e-12)
    lu, mu_u = penalty_scale(X, off, 4)
    w0 = np.sqrt(X.mean() / 4)
    assert lu == pytest.approx(0.5 * np.sum(X ** 2) / (4 * w0 * 3 * np.sqrt(16)))
    assert mu_u == pytest.approx(np.sum(X ** 2) / (10 * X.mean()))


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------

def test_groups_as_labels_or_offsets_give_the_same_bits(rng):
    X = rng.random((12, 5))
    W0, H0 = rng.random((12, 2)), rng.random((2, 5))
    kw = dict(lam=0.3, mu=0.1, init="custom", W=W0, H=H0, max_iter=20, backend="cpu")
    ref = group_sparse_nmf(X, [0, 3, 7, 12], 2, **kw)
    for labels in ([0] * 3 + [1] * 4 + [2] * 5, list("aaabbbbccccc"), [5] * 3 + [2] * 4 + [9] * 5):
        out = group_sparse_nmf(X, labels, 2, **kw)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])


def test_group_offsets_parsing():
    np.testing.assert_array_equal(group_offsets([0, 2, 2, 5], 5), [0, 2, 2, 5])  # empty group ok
    np.testing.assert_array_equal(group_offsets(np.array([1, 1, 4, 4, 4]), 5), [0, 2, 5])
    np.testing.assert_array_equal(group_offsets([0, 0, 1, 1], 4), [0, 2, 4])  # labels
    with pytest.raises(ValueError, match=r"contiguous \(sorted\).*np.argsort\(labels"):
        group_offsets([0, 1, 0, 1], 4)
    with pytest.raises(ValueError, match="offsets"):
        group_offsets([0, 3, 4], 5)
    with pytest.raises(ValueError, match="1-D"):
        group_offsets(np.zeros((2, 2)), 4)
    with pytest.raises(ValueError, match="groups is required"):
        group_offsets(None, 4)


@pytest.mark.parametrize("off", [[0, 10, 20, 20], [0, 0, 10, 20], [0, 10, 10, 20],
                                 [0, 0, 10, 10, 20, 20, 20]])
def test_empty_groups_anywhere_give_zero_codes(off):
    """An empty group (first, between, last, several) is allowed everywhere group_sparse_nmf
    allows it: its code row is zeros (a trailing one made np.add.reduceat raise IndexError)."""
    rng = np.random.default_rng(0)
    X = readonly(rng.random((20, 6)))
    off_before = list(off)
    W = readonly(rng.random((20, 3)))
    H = rng.random((3, 6))
    empty = np.diff(off) == 0
    nrm = group_norms(W, off)
    assert nrm.shape == (len(off) - 1, 3)
    assert np.all(nrm[empty] == 0)
    oracle = [np.sqrt((W[a:b] ** 2).sum(0)) for a, b in zip(off[:-1], off[1:])]
    np.testing.assert_allclose(nrm, oracle, rtol=1e-15)
    assert group_objective(X, W, H, off, lam=0.1) == pytest.approx(
        objective_oracle(X, W, H, off, 0.1, 0.0), rel=1e-12)
    est = GroupSparseNMF(3, lam=0.1, init="random", random_state=0, max_iter=20, tol=0,
                         backend="cpu").fit(X, groups=off)
    assert est.codes_.shape == (len(off) - 1, 3) and np.all(est.codes_[empty] == 0)
    assert np.all(est.codes_[~empty] > 0)
    codes = est.codes(X, off)
    assert codes.shape == (len(off) - 1, 3) and np.all(codes[empty] == 0)
    assert list(off) == off_before  # the caller's groups are not changed
    # offsets that do not cover W's rows are refused, naming them (not silently re-cut)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing from 0 to the number of rows of W \(20\)"):
        group_norms(W, [0, 10, 15])


def test_labels_that_read_as_offsets_are_ambiguous_and_loud():
    """[0, 0, 0, 6, 6, 6] for 6 rows: labels of 2 groups, or offsets of 5. It was silently
    read as offsets (one group holding every row); now it raises and says how to choose."""
    with pytest.raises(ValueError, match=r"ambiguous.*\{'labels': groups\}.*\{'offsets': groups\}"):
        group_offsets([0, 0, 0, 6, 6, 6], 6)
    with pytest.raises(ValueError, match="ambiguous"):
        group_offsets(np.array([0, 1, 3]), 3)  # 3 labels or offsets of 2 groups
    np.testing.assert_array_equal(group_offsets({"labels": [0, 0, 0, 6, 6, 6]}, 6), [0, 3, 6])
    np.testing.assert_array_equal(group_offsets({"offsets": [0, 0, 0, 6, 6, 6]}, 6),
                                  [0, 0, 0, 6, 6, 6])
    renumbered = np.unique([0, 0, 0, 6, 6, 6], return_inverse=True)[1]
    np.testing.assert_array_equal(group_offsets(renumbered, 6), [0, 3, 6])
    # unambiguous input is read as before
    np.testing.assert_array_equal(group_offsets([0, 3, 6], 6), [0, 3, 6])
    np.testing.assert_array_equal(group_offsets([0, 0, 0, 1, 1, 1], 6), [0, 3, 6])
    # the explicit forms go through every entry point that takes groups
    rng = np.random.default_rng(1)
    X = rng.random((6, 4))
    kw = dict(lam=0.2, init="random", random_state=0, max_iter=10, tol=0, backend="cpu")
    ref = group_sparse_nmf(X, [0, 3, 6], 2, **kw)
    out = group_sparse_nmf(X, {"labels": [0, 0, 0, 6, 6, 6]}, 2, **kw)
    np.testing.assert_array_equal(out[0], ref[0])
    with pytest.raises(ValueError, match="ambiguous"):
        group_sparse_nmf(X, [0, 0, 0, 6, 6, 6], 2, **kw)
    est = GroupSparseNMF(2, **kw).fit(X, groups={"labels": [0, 0, 0, 6, 6, 6]})
    np.testing.assert_array_equal(est.group_offsets_, [0, 3, 6])
    assert est.codes(X, {"labels": [0, 0, 0, 6, 6, 6]}).shape == (2, 2)
    assert penalty_scale(X, {"labels": [0, 0, 0, 6, 6, 6]}, 2) == penalty_scale(X, [0, 3, 6], 2)
    # transform without groups (one group) on 2 rows, where [0, 2] would be ambiguous
    assert est.transform(X[:2]).shape == (2, 2)
    with pytest.raises(ValueError, match="exactly one key, 'offsets' or 'labels'"):
        group_offsets({"rows": [0, 6]}, 6)
    with pytest.raises(ValueError, match=r"groups\['labels'\] must have one label per row of X \(6\)"):
        group_offsets({"labels": [0, 6]}, 6)
    with pytest.raises(ValueError, match=r"groups\['offsets'\] must be non-decreasing"):
        group_offsets({"offsets": [0, 4, 2, 6]}, 6)


@pytest.mark.parametrize("labels", [
    np.array([1, 1, np.nan, np.nan, np.nan, 2.0]),
    np.array([np.nan] * 6),
    np.array([1.0, 1.0, np.inf, np.inf, 2.0, 2.0]),
    np.array([1, 1, np.nan, np.nan, 2, 2], dtype=object),
])
def test_nan_labels_are_refused(labels):
    """NaN equals nothing, so each NaN row became a group of its own, silently."""
    with pytest.raises(ValueError, match="NaN or infinity.*must be finite"):
        group_offsets(labels, 6)
    with pytest.raises(ValueError, match="NaN or infinity"):
        group_sparse_nmf(np.ones((6, 3)), labels, 2, backend="cpu")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lam=-1.0), ValueError, "lam must be >= 0"),
    (dict(mu=float("nan")), ValueError, "mu must be finite"),
    (dict(lam="big"), TypeError, "lam must be a real number"),
    (dict(groups=[0, 1, 0, 1, 0, 1, 0, 1, 0, 1]), ValueError, "contiguous"),
    (dict(groups=[0, 4, 11]), ValueError, "offsets"),
    (dict(n_components=0), ValueError, "n_components must be >= 1"),
    (dict(n_components=None), TypeError, "n_components"),
    (dict(X=-np.ones((10, 3))), ValueError, "Negative values"),
    (dict(X=np.ones(10)), ValueError, "2-D"),
    (dict(init="custom"), ValueError, "W is required"),
])
def test_bad_input_is_named(kwargs, exc, match):
    args = dict(X=np.ones((10, 3)), groups=[0, 4, 10], n_components=2)
    args.update(kwargs)
    X, groups, k = args.pop("X"), args.pop("groups"), args.pop("n_components")
    with pytest.raises(exc, match=match):
        group_sparse_nmf(X, groups, k, **args)


# ---------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------

def test_estimator_fit_transform_and_history(rng):
    X = rng.random((40, 6)).astype(np.float32)
    labels = np.repeat(np.arange(4), 10)
    est = GroupSparseNMF(3, lam=0.05, mu=0.01, init="random", random_state=0, max_iter=60, tol=0,
                         backend="cpu")
    W = est.fit_transform(X, groups=labels)
    W_fn, H_fn, n_iter, obj = group_sparse_nmf(X, labels, 3, lam=0.05, mu=0.01, init="random",
                                               random_state=0, max_iter=60, tol=0, backend="cpu",
                                               record_objective=True)
    np.testing.assert_array_equal(W, W_fn)
    np.testing.assert_array_equal(est.components_, H_fn)
    assert est.components_.dtype == np.float32
    assert est.objective_ == obj and len(obj) == 60 and est.n_iter_ == 60
    assert est.backend_ == "cpu" and est.kernel_ == "cpu"
    np.testing.assert_allclose(est.codes_, group_norms(W, [0, 10, 20, 30, 40]))
    # transform: H fixed, W from sqrt(mean(X)/k), group term included
    Wt = est.transform(X[:10])
    Wt_fn, H_same, _ = group_sparse_nmf(X[:10], [0, 10], 3, H=est.components_, update_H=False,
                                        lam=0.05, max_iter=60, tol=0, backend="cpu")
    np.testing.assert_array_equal(Wt, Wt_fn)
    np.testing.assert_array_equal(H_same, est.components_)
    assert est.codes(X, labels).shape == (4, 3)
    np.testing.assert_allclose(est.inverse_transform(W), W @ est.components_)
    assert est.get_feature_names_out().tolist() == ["groupsparsenmf0", "groupsparsenmf1", "groupsparsenmf2"]


def test_estimator_is_a_scikit_learn_estimator():
    sklearn_base = pytest.importorskip("sklearn.base")
    est = GroupSparseNMF(4, lam=0.5, mu=0.1)
    clone = sklearn_base.clone(est)
    assert clone.get_params() == est.get_params()
    assert "lam=0.5" in repr(est)
    with pytest.raises(ValueError, match="groups="):
        est.fit(np.ones((4, 3)))
    with pytest.raises(Exception, match="not fitted"):
        est.transform(np.ones((4, 3)))


def test_estimator_checks_n_features(rng):
    est = GroupSparseNMF(2, backend="cpu", max_iter=5).fit(rng.random((8, 4)), groups=[0, 4, 8])
    with pytest.raises(ValueError, match="expecting 4 features"):
        est.transform(rng.random((8, 5)))


# ---------------------------------------------------------------------------------------------
# CPU and CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cpu_and_cuda_agree():
    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    rng = np.random.default_rng(0)
    X = rng.random((3000, 64)).astype(np.float32)
    off = np.arange(31) * 100
    W0, H0 = dffkit.initialize(X, 8, init="random", random_state=0)
    lu, mu_u = penalty_scale(X, off, 8)
    out = {}
    for backend in ("cpu", "cuda"):
        W, H, n_iter, obj = group_sparse_nmf(X, off, 8, lam=0.1 * lu, mu=0.01 * mu_u, init="custom",
                                             W=W0, H=H0, max_iter=50, tol=0, backend=backend,
                                             record_objective=True)
        out[backend] = (np.asarray(W), np.asarray(H), obj)
    np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], rtol=2e-3, atol=1e-5 * out["cpu"][0].max())
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], rtol=2e-3, atol=1e-5 * out["cpu"][1].max())
    np.testing.assert_allclose(out["cuda"][2], out["cpu"][2], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# audit regressions: the estimator as a scikit-learn user drives it, groups of odd kinds
# ---------------------------------------------------------------------------------------------

def test_estimator_refits_repeats_and_leaves_the_callers_arrays_alone(rng):
    sklearn_base = pytest.importorskip("sklearn.base")
    X = rng.random((30, 8))
    labels = np.repeat([3, 1, 2], 10)
    X_before, labels_before = X.copy(), labels.copy()
    est = GroupSparseNMF(3, lam=0.2, mu=0.05, init="random", random_state=4, max_iter=40, tol=0,
                         backend="cpu")
    W = est.fit_transform(readonly(X), groups=readonly(labels))
    np.testing.assert_array_equal(X, X_before)
    np.testing.assert_array_equal(labels, labels_before)
    # one random_state, one result: refit, a clone, and the function
    again = sklearn_base.clone(est).fit(X, groups=labels)
    np.testing.assert_array_equal(again.components_, est.components_)
    np.testing.assert_array_equal(est.fit_transform(X, groups=labels), W)
    W_fn, H_fn, _ = group_sparse_nmf(X, labels, 3, lam=0.2, mu=0.05, init="random", random_state=4,
                                     max_iter=40, tol=0, backend="cpu")
    np.testing.assert_array_equal(W, W_fn)
    np.testing.assert_array_equal(est.components_, H_fn)
    # non-contiguous views (Fortran order, a column stride) give the contiguous input's bits
    for view in (np.asfortranarray(X), np.repeat(X, 2, axis=1)[:, ::2]):
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(sklearn_base.clone(est).fit_transform(view, groups=labels), W)
    # a refit on data of another shape replaces every fitted attribute
    X2 = rng.random((12, 5)).astype(np.float32)
    est.fit(X2, groups=[0, 4, 12])
    assert est.components_.shape == (3, 5) and est.components_.dtype == np.float32
    assert est.n_features_in_ == 5 and est.codes_.shape == (2, 3)
    np.testing.assert_array_equal(est.group_offsets_, [0, 4, 12])
    assert est.transform(X2).dtype == np.float32
    with pytest.raises(ValueError, match="expecting 5 features"):
        est.transform(X)


def test_record_objective_must_be_a_bool(rng):
    """record_objective='no' was taken as True (a non-empty string), silently."""
    X = rng.random((10, 4))
    with pytest.raises(InvalidParameterError, match="record_objective must be True or False, got 'no'"):
        GroupSparseNMF(2, record_objective="no", max_iter=5, backend="cpu").fit(X, groups=[0, 5, 10])
    with pytest.raises(InvalidParameterError, match="record_objective must be True or False"):
        group_sparse_nmf(X, [0, 5, 10], 2, record_objective="no", max_iter=5, backend="cpu")
    est = GroupSparseNMF(2, record_objective=False, max_iter=5, backend="cpu").fit(X, groups=[0, 5, 10])
    assert est.objective_ == []


def test_transform_after_a_collapsed_fit_names_the_fit(rng):
    """transform after a fit whose components_ are all zero said "H is all zeros ... use another
    initialisation", about an H the caller never passed (NMF.transform says what happened)."""
    est = GroupSparseNMF(2, init="random", random_state=0, max_iter=5, backend="cpu")
    est.fit(np.zeros((10, 4)), groups=[0, 5, 10])
    with pytest.raises(ValueError, match="the fitted components_ are all zero.*refit"):
        est.transform(rng.random((10, 4)))


def test_transform_uses_the_fitted_components_after_set_params(rng):
    """set_params(n_components=5) after a fit with 3 made transform fail with "H must have
    shape (5, 4)" for an H the caller never passed; transform uses what was fitted."""
    X = rng.random((12, 4))
    est = GroupSparseNMF(3, lam=0.1, init="random", random_state=0, max_iter=10, backend="cpu")
    est.fit(X, groups=[0, 6, 12])
    W = est.transform(X)
    est.set_params(n_components=5)
    np.testing.assert_array_equal(est.transform(X), W)
    assert est.codes(X, [0, 6, 12]).shape == (2, 3)


@pytest.mark.parametrize("groups, shown", [
    (np.array([0, 2**63 + 5, 40], dtype=np.uint64), "9223372036854775813"),
    ([0.0, 1e20, 40.0], "1e+20"),
])
def test_huge_offsets_are_shown_as_given_not_wrapped(groups, shown):
    """Offsets past int64 were cast first and reported wrapped: "must be non-decreasing, got
    [0, -9223372036854775803, 40]", a value the caller never wrote."""
    with pytest.raises(ValueError, match="between 0 and the number of rows of X") as info:
        group_offsets(groups, 40)
    assert shown in str(info.value) and "-922" not in str(info.value)
    with pytest.raises(ValueError, match=r"from 0 to the number of rows of W \(40\)") as info:
        group_norms(np.ones((40, 2)), groups)
    assert shown in str(info.value) and "-922" not in str(info.value)


def test_groups_of_object_dtype_and_mixed_labels():
    """An object array of ints (a pandas object column) is read as offsets like an int array;
    labels of mixed kinds (ints and strings in an object array) group by equality: np.unique
    raised "'<' not supported between instances of 'str' and 'int'" for them."""
    np.testing.assert_array_equal(group_offsets(np.array([0, 20, 40], dtype=object), 40), [0, 20, 40])
    mixed = np.array([0, 0, "a", "a", "a", 1], dtype=object)
    np.testing.assert_array_equal(group_offsets(mixed, 6), [0, 2, 5, 6])
    with pytest.raises(ValueError, match=r"label 0 appears at row 0 and again at row 5"):
        group_offsets(np.array([0, 0, "a", "a", "a", 0], dtype=object), 6)
    # None is a missing label, refused like NaN; a set has no order
    with pytest.raises(ValueError, match=r"NaN or infinity \(or None\) at 2 entries"):
        group_offsets(np.array([None, None, 1, 1], dtype=object), 4)
    with pytest.raises(TypeError, match="ordered 1-D sequence.*set"):
        group_offsets({0, 4}, 4)


def update_oracle(X, W, H, offsets, lam, mu, l1_W, l2_W, l1_H, l2_H, n_iter):
    """DESIGN.md's GSNMF updates with scikit-learn's penalties and zero-denominator guard, in
    float64, group norms by a loop over the groups."""
    X, W, H = (np.array(a, dtype=np.float64) for a in (X, W, H))
    eps = np.finfo(np.float32).eps
    for _ in range(n_iter):
        nrm = np.zeros_like(W)
        for a, b in zip(offsets[:-1], offsets[1:]):
            nrm[a:b] = np.sqrt(np.sum(W[a:b] ** 2, axis=0))
        den = W @ (H @ H.T) + lam * W / np.maximum(nrm, np.finfo(float).tiny) + l1_W + l2_W * W
        W = W * (X @ H.T) / np.where(den == 0, eps, den)
        den = (W.T @ W) @ H + mu * H + l1_H + l2_H * H
        H = H * (W.T @ X) / np.where(den == 0, eps, den)
    return W, H


@pytest.mark.parametrize("off", [[0, 7, 7, 20, 33], [0, 0, 33], [0, 33, 33], [0, 33]])
@pytest.mark.parametrize("alpha_W, l1_ratio", [(0.0, 0.0), (0.05, 0.3)])
def test_ten_updates_follow_the_formulas_with_penalties_and_empty_groups(off, alpha_W, l1_ratio):
    rng = np.random.default_rng(5)
    m, n, k = 33, 9, 4
    X = rng.random((m, n)) * (rng.random((m, n)) < 0.7)
    W0, H0 = rng.random((m, k)), rng.random((k, n))
    lam, mu = 0.6, 0.2
    pen = dict(l1_W=n * alpha_W * l1_ratio, l2_W=n * alpha_W * (1 - l1_ratio),
               l1_H=m * alpha_W * l1_ratio, l2_H=m * alpha_W * (1 - l1_ratio))
    W_ref, H_ref = update_oracle(X, W0, H0, off, lam, mu, n_iter=10, **pen)
    kw = dict(lam=lam, mu=mu, init="custom", max_iter=10, tol=0, alpha_W=alpha_W, l1_ratio=l1_ratio,
              backend="cpu")
    W, H, _ = group_sparse_nmf(X, {"offsets": off}, k, W=W0, H=H0, **kw)
    np.testing.assert_allclose(W, W_ref, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(H, H_ref, rtol=1e-11, atol=1e-14)
    f32 = [a.astype(np.float32) for a in (X, W0, H0)]
    W, H, _ = group_sparse_nmf(f32[0], {"offsets": off}, k, W=f32[1], H=f32[2], **kw)
    assert W.dtype == H.dtype == np.float32
    np.testing.assert_allclose(W, W_ref, rtol=2e-4, atol=1e-6 * W_ref.max())
    np.testing.assert_allclose(H, H_ref, rtol=2e-4, atol=1e-6 * H_ref.max())
