"""Clustering metrics (dffkit.metrics) against scikit-learn and scipy as oracles: label kinds,
degenerate labelings, rectangular and maximising assignments with ties."""
import numpy as np
import pytest

from dffkit import metrics

skm = pytest.importorskip("sklearn.metrics")
scipy_opt = pytest.importorskip("scipy.optimize")

# scikit-learn's note on float labels ("expects discrete values"): they are labels here
pytestmark = pytest.mark.filterwarnings("ignore:Clustering metrics expects discrete values")


def accuracy_oracle(y, p):
    """Best one-to-one matching of clusters to classes by scipy's assignment."""
    M = skm.cluster.contingency_matrix(y, p)
    r, c = scipy_opt.linear_sum_assignment(M, maximize=True)
    return M[r, c].sum() / len(y)


LABELINGS = {
    "strings": (list("aabbcc"), list("xxyyyz")),
    "negative ints": ([-1, -1, 0, 0, 5, 5], [3, 3, -2, -2, -2, 7]),
    "floats": ([0.5, 0.5, 1.5, 1.5, 2.5, 2.5], [2.0, 2.0, 2.0, -3.0, -3.0, 1e9]),
    "strings against ints": (np.array(["cat", "cat", "dog", "dog", "owl"]), np.array([1, 1, 2, 2, 2])),
    "one cluster": ([0, 1, 2, 0, 1, 2], [4, 4, 4, 4, 4, 4]),
    "one class": ([7, 7, 7, 7], [0, 1, 0, 1]),
    "both constant": ([3, 3, 3], ["a", "a", "a"]),
    "all singletons": ([0, 1, 2, 3], [3, 1, 0, 2]),
    "single sample": ([5], [9]),
    "bools": ([True, False, True, True], [1, 0, 0, 1]),
    "object ints": (np.array([10, 10, 20, 20], dtype=object), [0, 0, 1, 0]),
}


@pytest.mark.parametrize("name", sorted(LABELINGS))
def test_scores_match_scikit_learn_on_any_label_kind(name):
    y, p = LABELINGS[name]
    assert metrics.normalized_mutual_info_score(y, p) == pytest.approx(
        skm.normalized_mutual_info_score(y, p), abs=1e-12)
    assert metrics.adjusted_rand_score(y, p) == pytest.approx(skm.adjusted_rand_score(y, p), abs=1e-12)
    assert metrics.clustering_accuracy(y, p) == pytest.approx(accuracy_oracle(y, p), abs=1e-12)
    np.testing.assert_array_equal(metrics.contingency_matrix(y, p), skm.cluster.contingency_matrix(y, p))


def test_empty_labelings_score_as_scikit_learn_does():
    assert metrics.normalized_mutual_info_score([], []) == skm.normalized_mutual_info_score([], []) == 1.0
    assert metrics.adjusted_rand_score([], []) == skm.adjusted_rand_score([], []) == 1.0
    assert metrics.clustering_accuracy([], []) == 1.0
    assert metrics.contingency_matrix([], []).shape == (0, 0)


@pytest.mark.parametrize("bad", [
    [0.0, np.nan, np.nan, 1.0],
    [0.0, np.inf, np.inf, 1.0],
    np.array([0, None, None, 1], dtype=object),
    np.array([0, float("nan"), float("nan"), 1], dtype=object),
])
@pytest.mark.parametrize("score", ["normalized_mutual_info_score", "adjusted_rand_score",
                                   "clustering_accuracy"])
def test_missing_labels_are_refused_not_pooled_into_one_class(bad, score):
    """NaN labels were all put in one class by np.unique (numpy >= 1.21), so two labelings
    with missing entries at the same places scored as agreeing there: 1.0 for
    ([nan, nan, 1], [0, 0, 1]). scikit-learn refuses NaN ("Input contains NaN")."""
    good = [0, 1, 1, 0]
    with pytest.raises(ValueError, match=r"labels_true holds NaN, infinity or None at 2 entries \(first at 1\)"):
        getattr(metrics, score)(bad, good)
    with pytest.raises(ValueError, match="labels_pred holds NaN"):
        getattr(metrics, score)(good, bad)


def test_labels_of_mixed_kinds_are_named():
    mixed = np.array([1, "a", 1, "a"], dtype=object)
    with pytest.raises(TypeError, match=r"labels_pred must hold labels of one kind.*\['int', 'str'\]"):
        metrics.adjusted_rand_score([0, 1, 0, 1], mixed)


def test_linear_sum_assignment_matches_scipy_rectangular_maximize_and_ties():
    rng = np.random.default_rng(0)
    for trial in range(400):
        r, c = (int(v) for v in rng.integers(0, 8, 2))
        kind = trial % 4
        if kind == 0:
            cost = rng.random((r, c))
        elif kind == 1:  # many ties
            cost = rng.integers(0, 3, (r, c)).astype(float)
        elif kind == 2:  # integers, negatives too
            cost = rng.integers(-5, 5, (r, c))
        else:  # large magnitudes
            cost = rng.normal(size=(r, c)) * 1e12
        maximize = bool(trial % 3 == 0)
        ri, ci = metrics.linear_sum_assignment(cost, maximize=maximize)
        rs, cs = scipy_opt.linear_sum_assignment(cost, maximize=maximize)
        assert ri.dtype == ci.dtype == np.int64
        assert len(ri) == len(ci) == len(rs) == min(r, c)
        assert np.all(np.diff(ri) > 0) and len(set(ci.tolist())) == len(ci)
        scale = max(1.0, float(np.abs(cost).max())) if cost.size else 1.0
        assert cost[ri, ci].sum() == pytest.approx(cost[rs, cs].sum(), abs=1e-9 * scale)


def test_linear_sum_assignment_all_tied_and_empty():
    ri, ci = metrics.linear_sum_assignment(np.ones((3, 5)))
    np.testing.assert_array_equal(ri, [0, 1, 2])
    assert len(set(ci.tolist())) == 3
    for shape in ((0, 3), (3, 0), (0, 0)):
        ri, ci = metrics.linear_sum_assignment(np.zeros(shape))
        assert ri.shape == ci.shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        metrics.linear_sum_assignment(np.zeros(3))
