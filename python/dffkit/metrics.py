"""Clustering metrics in numpy: accuracy under the best matching, NMI, ARI.

They agree with ``sklearn.metrics`` (``normalized_mutual_info_score`` with the arithmetic
mean, ``adjusted_rand_score``) without depending on it; ``linear_sum_assignment`` is a small
Hungarian solver (shortest augmenting paths, O(n^3)) so that scipy is not needed either.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "linear_sum_assignment",
    "contingency_matrix",
    "clustering_accuracy",
    "normalized_mutual_info_score",
    "adjusted_rand_score",
]


def linear_sum_assignment(cost, maximize=False):
    """Rows and columns of a minimum-cost one-to-one assignment (like scipy's).

    Parameters
    ----------
    cost : (r, c) array of finite reals; every row (if r <= c) or every column is assigned.
    maximize : find the maximum-weight assignment instead.

    Returns
    -------
    row_ind, col_ind : int arrays of length min(r, c), row_ind sorted.
    """
    C = np.asarray(cost, dtype=np.float64)
    if C.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError("cost contains NaN or infinity")
    if maximize:
        C = -C
    transposed = C.shape[0] > C.shape[1]
    if transposed:
        C = C.T
    n, m = C.shape  # n <= m: assign every row
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # potentials u (rows), v (columns); p[j] = row matched to column j (1-based, 0 = free)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = C[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    rows = p[1:] - 1
    cols = np.arange(m)
    keep = rows >= 0
    rows, cols = rows[keep], cols[keep]
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def _missing_labels(a):
    """The entries of the 1-D array ``a`` that are no label (NaN, infinity, None) as a bool
    mask, or None where its dtype cannot hold any (ints, strings)."""
    if a.dtype.kind in "fc":
        return ~np.isfinite(a)
    if a.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, (float, complex, np.inexact)) and not np.isfinite(v))
                         for v in a], dtype=bool)
    return None


def _labels(y, name):
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    bad = _missing_labels(a)
    if bad is not None and bad.any():
        # np.unique puts every NaN in one class (numpy >= 1.21), which would score missing
        # labels as agreeing with each other; scikit-learn refuses them
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} holds NaN, infinity or None at {len(rows)} entr{'y' if len(rows) == 1 else 'ies'} "
            f"(first at {int(rows[0])}): a missing label is no class; drop those samples from "
            "both labelings first"
        )
    return a


def _codes(a, name):
    """Class codes 0 .. n_classes - 1 of the labels ``a`` (np.unique's inverse)."""
    try:
        return np.unique(a, return_inverse=True)[1].ravel()
    except TypeError as exc:  # e.g. ints mixed with strings in an object array
        raise TypeError(
            f"{name} must hold labels of one kind that compare with each other (all ints, all "
            f"strings, ...), got an object array that mixes {sorted({type(v).__name__ for v in a})} "
            f"({exc})"
        ) from None


def contingency_matrix(labels_true, labels_pred):
    """Counts (n_classes, n_clusters): entry (c, k) = number of samples of class c in cluster k."""
    t = _labels(labels_true, "labels_true")
    p = _labels(labels_pred, "labels_pred")
    if t.shape != p.shape:
        raise ValueError(
            f"labels_true and labels_pred must have the same length, got {t.size} and {p.size}"
        )
    ti = _codes(t, "labels_true")
    pi = _codes(p, "labels_pred")
    M = np.zeros((ti.max(initial=-1) + 1, pi.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(M, (ti, pi), 1)
    return M


def clustering_accuracy(labels_true, labels_pred):
    """Fraction of samples right under the best one-to-one matching of clusters to classes.

    Clusters left unmatched (more clusters than classes) count as wrong.
    """
    M = contingency_matrix(labels_true, labels_pred)
    if M.size == 0:
        return 1.0
    r, c = linear_sum_assignment(M, maximize=True)
    return float(M[r, c].sum()) / float(M.sum())


def _entropy(counts):
    counts = counts[counts > 0].astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts / total
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info_score(labels_true, labels_pred):
    """MI(U, V) / mean(H(U), H(V)) (natural logs; scikit-learn's "arithmetic" normalisation).

    Two constant labelings score 1.
    """
    M = contingency_matrix(labels_true, labels_pred)
    if M.shape[0] == M.shape[1] == 1 or M.size == 0:
        return 1.0
    n = float(M.sum())
    a = M.sum(axis=1).astype(np.float64)
    b = M.sum(axis=0).astype(np.float64)
    nz = M > 0
    Mn = M[nz].astype(np.float64)
    outer = np.outer(a, b)[nz]
    mi = float(np.sum(Mn / n * (np.log(Mn) + np.log(n) - np.log(outer))))
    mi = max(mi, 0.0)
    h = 0.5 * (_entropy(a) + _entropy(b))
    return float(mi / max(h, np.finfo(np.float64).eps))


def adjusted_rand_score(labels_true, labels_pred):
    """Rand index adjusted for chance (Hubert and Arabie), from pair counts in exact integers."""
    M = contingency_matrix(labels_true, labels_pred)
    n = int(M.sum())
    sum_sq = int(np.sum(M.astype(object) ** 2))
    a = [int(x) for x in M.sum(axis=1)]
    b = [int(x) for x in M.sum(axis=0)]
    # pair confusion (ordered pairs), as scikit-learn computes it
    tp = sum_sq - n
    fp = sum(x * x for x in b) - sum_sq
    fn = sum(x * x for x in a) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))
