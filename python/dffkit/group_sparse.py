"""Group-sparse NMF (GSNMF): NMF whose rows come in groups, each group using few components.

X (m x n) ~ W (m x k) H (k x n), rows of X in contiguous groups G_g (for images: all spatial
positions of one image). The objective, exactly as DESIGN.md writes it, with nothing rescaled::

    1/2 ||X - W H||_F^2 + lam * sum_g sum_j ||W[G_g, j]||_2 + 1/2 mu ||H||_F^2
        (+ scikit-learn's ordinary penalties alpha_W, alpha_H, l1_ratio)

minimised by the majorize-minimize multiplicative updates (one engine pass over X each)::

    W <- W * (X H^T) / (W (H H^T) + lam * W / max(Nrm, tiny))   Nrm[i, j] = ||W_old[G(i), j]||
    H <- H * (W^T X) / ((W^T W) H + mu * H)

which never increase the objective. lam = mu = 0 is plain NMF, bit for bit.

The group term costs little: time per iteration against plain NMF on the same problem
(float32, k = 20, groups of 196 rows, 100 iterations, best of 3; 2026-11-26):
H200 CUDA 200704 x 512: 9.01 vs 8.87 ms (1.02x), 19600 x 512: 1.08 vs 1.07 ms (1.01x);
16-core CPU of that machine 19600 x 512: 3.81 vs 3.45 ms (1.10x). CPU and CUDA agree to
4e-6 (relative, W and H after 50 iterations, 3000 x 64, k = 8).

``penalty_scale`` gives the units in which lam and mu are comparable across data sets (used
by the clustering defaults); ``group_sparse_nmf`` and ``GroupSparseNMF`` take lam and mu as
the absolute numbers of the objective.
"""
from __future__ import annotations

import numpy as np

from dffkit.metrics import _missing_labels
from dffkit.nmf import (
    NMF,
    _as_float_matrix,
    _check_flag,
    _check_real,
    _is_device_array,
    _not_fitted,
    _penalties,
    _solve,
)

__all__ = [
    "group_sparse_nmf",
    "GroupSparseNMF",
    "group_offsets",
    "group_norms",
    "group_objective",
    "penalty_scale",
]


_GROUP_KINDS = ("offsets", "labels")


def group_offsets(groups, n_rows):
    """Row offsets (n_groups + 1 ints, 0 ... n_rows) from offsets or from per-row labels.

    Parameters
    ----------
    groups : 1-D sequence, or a dict ``{"offsets": ...}`` / ``{"labels": ...}``
        Either group offsets ``[0, o_1, ..., n_rows]`` (n_groups + 1 non-decreasing integers
        from 0 to n_rows; an empty group is allowed), or one label per row (length
        ``n_rows``) whose equal labels are contiguous, as sorted labels are. Labels may be
        any values numpy holds (ints, strings, ..., mixed in an object array) except NaN,
        infinity or None. An object array of ints reads as an int array does.

        Which one a plain sequence is: one that reads as offsets (integers, starts at 0,
        ends at n_rows, non-decreasing) and does not have n_rows entries is offsets; one
        with n_rows entries that does not read as offsets is labels. A sequence that is
        both (n_rows entries that also read as offsets, e.g. ``[0, 0, 0, 6, 6, 6]`` for 6
        rows: labels of two groups, or offsets of five) is ambiguous and raises ValueError:
        say which with ``{"labels": groups}`` or ``{"offsets": groups}`` (accepted wherever
        ``groups`` is, e.g. by ``group_sparse_nmf`` and ``GroupSparseNMF.fit``), or renumber
        the labels 0, 1, 2, ... (``np.unique(labels, return_inverse=True)[1]``), which can
        never read as offsets (their largest value is below n_rows).
    n_rows : int, the number of rows of X (m).

    Returns
    -------
    offsets : int64 array (n_groups + 1,)
    """
    if groups is None:
        raise ValueError(
            "groups is required: give row offsets [0, ..., n_rows] or one label per row of X"
        )
    kind = None
    if isinstance(groups, dict):
        if len(groups) != 1 or next(iter(groups)) not in _GROUP_KINDS:
            raise ValueError(
                "groups given as a dict must have exactly one key, 'offsets' or 'labels' "
                f"(e.g. {{'labels': labels}}), got keys {list(groups)!r}"
            )
        kind, groups = next(iter(groups.items()))
        if groups is None:
            raise ValueError(f"groups[{kind!r}] is None; give the {kind} of the rows of X")
    if isinstance(groups, (set, frozenset)):
        raise TypeError(
            "groups must be an ordered 1-D sequence (a list or array of offsets or labels), got a "
            f"{type(groups).__name__}, which has no order; pass a sorted list"
        )
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise ValueError(f"groups must be 1-D (offsets or one label per row), got shape {arr.shape}")
    _check_finite_groups(arr)
    arr = _object_ints(arr)
    integral = arr.dtype.kind in "iu" or (
        arr.dtype.kind == "f" and bool(np.all(arr == np.round(arr)))
    )
    # in range before the cast: 2**64 - 1 (uint64) or 1e20 would wrap to negative int64
    ends_right = (integral and arr.size >= 2 and arr[0] == 0 and arr[-1] == n_rows
                  and bool(np.all((arr >= 0) & (arr <= n_rows))))
    off = arr.astype(np.int64) if ends_right else None
    increasing = ends_right and bool(np.all(np.diff(off) >= 0))
    if kind == "offsets":
        if not increasing:
            raise ValueError(
                f"groups['offsets'] must be non-decreasing integers from 0 to the number of rows "
                f"of X ({n_rows}), got {_short(arr)}"
            )
        return off
    if kind == "labels":
        if arr.size != n_rows:
            raise ValueError(
                f"groups['labels'] must have one label per row of X ({n_rows}), got {arr.size}"
            )
        return _offsets_from_labels(arr, n_rows)
    if arr.size == n_rows:
        if increasing:
            raise ValueError(
                f"groups {_short(arr)} is ambiguous: it has one entry per row of X ({n_rows}), so "
                f"it may be labels, but it also reads as offsets [0, ..., {n_rows}] of "
                f"{n_rows - 1} groups. Say which: groups={{'labels': groups}} or "
                "groups={'offsets': groups}; or renumber the labels 0, 1, 2, ... "
                "(np.unique(labels, return_inverse=True)[1]), which never read as offsets"
            )
        return _offsets_from_labels(arr, n_rows)
    if increasing:
        return off
    if ends_right:
        raise ValueError(f"group offsets must be non-decreasing, got {_short(off)}")
    if integral and arr.size >= 2 and arr[0] == 0 and arr[-1] == n_rows:
        raise ValueError(
            f"group offsets must lie between 0 and the number of rows of X ({n_rows}) and be "
            f"non-decreasing, got {_short(arr)}"
        )
    raise ValueError(
        f"groups has {arr.size} entries: it must be offsets [0, ..., {n_rows}] (non-decreasing "
        f"integers from 0 to the number of rows of X) or one label per row of X ({n_rows} "
        f"labels); got {_short(arr)}"
    )


def _check_finite_groups(arr):
    """NaN (which equals nothing, itself included), infinite or None labels / offsets: ValueError."""
    bad = _missing_labels(arr)
    if bad is not None and bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"groups holds NaN or infinity (or None) at {len(rows)} entr{'y' if len(rows) == 1 else 'ies'} "
            f"(first at {int(rows[0])}): labels and offsets must be finite (NaN equals no label, "
            "itself included, so each NaN row would become a group of its own; None is a missing "
            "label); give those rows a label, or drop them from X and groups"
        )


def _object_ints(arr):
    """An object array holding only Python / numpy ints (not bools) as int64, so that such
    offsets read as offsets; any other array unchanged."""
    if arr.dtype != object or arr.size == 0:
        return arr
    import numbers

    if all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in arr):
        if all(-2**63 <= int(v) < 2**63 for v in arr):
            return arr.astype(np.int64)
    return arr


def _distinct(values):
    """Whether the entries of ``values`` differ from each other, for any labels numpy holds:
    hashing, not sorting, so that labels of mixed types (None, ints and strings in an object
    array) are compared as ``==`` compares them."""
    if values.dtype != object:
        return len(np.unique(values)) == len(values)
    try:
        return len({v.item() if isinstance(v, np.generic) else v for v in values}) == len(values)
    except TypeError as exc:  # an unhashable label (a list, a dict)
        raise TypeError(
            f"group labels must be hashable values (ints, strings, ...), got {exc}; renumber "
            "them: np.unique(labels, return_inverse=True)[1]"
        ) from None


def _offsets_from_labels(labels, n_rows):
    if n_rows == 0:
        raise ValueError("X has no rows")
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], change])
    firsts = labels[starts]
    if not _distinct(firsts):
        seen = {}
        for s in starts:  # name the first label that comes back after another one
            key = labels[s].item() if hasattr(labels[s], "item") else labels[s]
            if key in seen:
                raise ValueError(
                    f"group labels must be contiguous (sorted), but label {key!r} appears at row "
                    f"{seen[key]} and again at row {s} after another label. Sort the rows of X by "
                    "group first: order = np.argsort(labels, kind='stable'); X, labels = "
                    "X[order], labels[order]"
                )
            seen[key] = int(s)
    return np.concatenate([starts, [n_rows]]).astype(np.int64)


def _short(a):
    a = list(np.asarray(a).tolist())
    return str(a) if len(a) <= 8 else f"[{', '.join(map(str, a[:4]))}, ..., {', '.join(map(str, a[-2:]))}]"


def group_norms(W, offsets):
    """Nrm (n_groups x k): Nrm[g, j] = ||W[G_g, j]||_2, computed in float64.

    ``offsets`` are row offsets ``[0, ..., m]`` (m = W's rows, non-decreasing; see
    :func:`group_offsets` to make them from labels). An empty group, anywhere (first, last,
    between), has norm 0: its row of the result is zeros. For images, row g is image g's
    code (how much it uses each part).
    """
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (m, k), got shape {W.shape}")
    m = W.shape[0]
    off = np.asarray(offsets)
    if (off.ndim != 1 or off.size < 2 or off.dtype.kind not in "iuf"
            or not np.all(np.isfinite(off)) or not np.all(off == np.round(off))):
        raise ValueError(
            f"offsets must be row offsets [0, ..., {m}] (1-D integers), got {_short(off)}; "
            "group_offsets(labels, m) makes them from one label per row"
        )
    if np.any(off < 0) or np.any(off > m):  # before the cast, which would wrap huge values
        raise ValueError(
            f"offsets must be non-decreasing from 0 to the number of rows of W ({m}), got "
            f"{_short(off)}"
        )
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != m or np.any(np.diff(off) < 0):
        raise ValueError(
            f"offsets must be non-decreasing from 0 to the number of rows of W ({m}), got "
            f"{_short(off)}"
        )
    sums = np.zeros((off.size - 1, W.shape[1]), dtype=np.float64)
    nonempty = np.flatnonzero(off[1:] > off[:-1])
    if nonempty.size:
        # the non-empty groups' starts are strictly increasing and below m; the segment from
        # one to the next is exactly that group (only empty groups lie between them)
        sums[nonempty] = np.add.reduceat(np.square(W, dtype=np.float64), off[nonempty], axis=0)
    return np.sqrt(sums)


def group_objective(X, W, H, offsets, *, lam=0.0, mu=0.0, l1_W=0.0, l2_W=0.0, l1_H=0.0, l2_H=0.0):
    """The GSNMF objective in float64, directly from its definition (no trace identity)."""
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    R = X - W @ H
    value = 0.5 * float(np.sum(R * R))
    value += lam * float(group_norms(W, offsets).sum()) + 0.5 * mu * float(np.sum(H * H))
    value += l1_W * float(W.sum()) + 0.5 * l2_W * float(np.sum(W * W))
    value += l1_H * float(H.sum()) + 0.5 * l2_H * float(np.sum(H * H))
    return value


def penalty_scale(X, groups, n_components):
    """Units (lam_unit, mu_unit) in which lam and mu mean the same on any data.

    With w0 = sqrt(mean(X) / k), the scale of scikit-learn's (and dffkit's) initial W and H::

        lam_unit = (1/2 ||X||_F^2) / (k * w0 * sum_g sqrt(|G_g|))
        mu_unit  = (1/2 ||X||_F^2) / (1/2 ||H0||_F^2),  ||H0||_F^2 = k * n * w0^2 = n * mean(X)

    so lam = r * lam_unit makes the group term, evaluated at factors of the initial scale
    (every entry w0), equal to r times 1/2 ||X||^2, and likewise for mu and the H term.
    Scaling X by c scales lam_unit by c^1.5 and mu_unit by c, which is exactly how the
    minimiser's lam and mu must scale (W and H each scale by sqrt(c)), so r is unit-free:
    the same r gives the same solution, up to that scaling, on data of any magnitude.
    """
    Xh = _as_float_matrix(X, whom="penalty_scale")
    _check_real("n_components", n_components, low=1, integer=True)
    off = group_offsets(groups, Xh.shape[0])
    k = int(n_components)
    m, n = Xh.shape
    sq = float(np.sum(np.square(Xh, dtype=np.float64)))
    mean = float(np.mean(Xh, dtype=np.float64))
    if sq == 0.0:
        return 0.0, 0.0
    w0 = np.sqrt(mean / k)
    sizes = np.diff(off).astype(np.float64)
    lam_unit = 0.5 * sq / (k * w0 * float(np.sqrt(sizes).sum()))
    mu_unit = sq / (n * mean)
    return lam_unit, mu_unit


def _check_groups_and_X(X, groups, whom):
    if _is_device_array(X):
        m = int(X.shape[0])
    else:
        X = _as_float_matrix(X, whom=whom)
        m = X.shape[0]
    return X, group_offsets(groups, m)


def group_sparse_nmf(X, groups, n_components, *, lam=0.0, mu=0.0, init=None, W=None, H=None,
                     update_H=True, max_iter=200, tol=1e-4, alpha_W=0.0, alpha_H="same",
                     l1_ratio=0.0, random_state=None, backend="auto", precision="fp32",
                     record_objective=False, verbose=0):
    """Group-sparse NMF of X (m x n) with row groups: X ~ W H.

    Parameters
    ----------
    X : array-like (m, n), non-negative; numpy (float32 stays float32) or a GPU array for
        the CUDA backend (read in place).
    groups : offsets ``[0, ..., m]`` (n_groups + 1 ints; empty groups allowed) or one label
        per row (length m, equal labels contiguous, e.g. sorted, never NaN); a sequence that
        could be either raises ValueError: pass ``{"offsets": ...}`` or ``{"labels": ...}``
        to say which. See :func:`group_offsets`.
    n_components : int, k.
    lam : float >= 0, the group penalty lam of the objective, used as given (no scaling;
        :func:`penalty_scale` gives a data-scaled unit).
    mu : float >= 0, the L2 weight on H: the objective has 1/2 mu ||H||^2.
    init : "random", "nndsvd", "nndsvda", "nndsvdar", "custom" or None (as in
        ``non_negative_factorization``).
    W, H : initial factors with init="custom"; H alone, fixed, with update_H=False. Never
        modified.
    update_H : False keeps H fixed and fits W only (W starts at sqrt(mean(X)/k), as
        scikit-learn's transform does).
    max_iter, tol : as in ``non_negative_factorization`` (tol=0 runs max_iter iterations).
    alpha_W, alpha_H, l1_ratio : scikit-learn's ordinary penalties, added to the objective.
    random_state, backend, precision, verbose : as in ``non_negative_factorization``.
    record_objective : also return the objective after each iteration (a list of floats).

    Returns
    -------
    W (m, k), H (k, n), n_iter  (+ objective list when ``record_objective``)
    """
    _check_real("lam", lam)
    _check_real("mu", mu)
    record_objective = _check_flag("record_objective", record_objective)
    if n_components is None or isinstance(n_components, str):
        raise TypeError(f"n_components must be an integer >= 1, got {n_components!r}")
    _check_real("n_components", n_components, low=1, integer=True)
    X, off = _check_groups_and_X(X, groups, "group_sparse_nmf")
    Wout, Hout, info = _solve(
        X, W, H, n_components=n_components, init=init, update_H=update_H, beta=2, tol=tol,
        max_iter=max_iter, penalties=lambda m, n: _penalties(alpha_W, alpha_H, l1_ratio, m, n),
        random_state=random_state, verbose=verbose, backend=backend, precision=precision,
        groups=off.tolist(), lam=float(lam), mu=float(mu), record_objective=record_objective,
        whom="group_sparse_nmf",
    )
    if record_objective:
        return Wout, Hout, info.n_iter, list(info.objective)
    return Wout, Hout, info.n_iter


class GroupSparseNMF(NMF):
    """Group-sparse NMF as a scikit-learn style estimator (an ``NMF`` with row groups).

    ``fit(X, groups=...)`` learns H (``components_``); ``transform(X, groups=...)`` fits W
    for new data with H fixed (W starts at sqrt(mean(X)/k) like scikit-learn's transform and
    runs the same updates, group term included). Parameters as in :func:`group_sparse_nmf`;
    lam and mu are the absolute weights of the objective.

    Attributes
    ----------
    components_ : (n_components, n_features) array, H
    n_components_, n_iter_, n_features_in_ : ints
    reconstruction_err_ : float, ||X - W H||_F at the end of fit
    objective_ : list of floats, the objective after each iteration of the last fit
    codes_ : (n_groups, n_components) array, group norms of the fitted W (one row per group;
        zeros for an empty group)
    group_offsets_ : int64 array, the offsets of the fitted groups
    backend_ : str
    kernel_ : str, the kernels that ran the last fit (``NMFResult.kernel``)
    """

    _accepts_sparse = False  # group-sparse NMF is for dense CNN features

    def __init__(self, n_components=None, *, lam=0.0, mu=0.0, init=None, tol=1e-4,
                 max_iter=200, alpha_W=0.0, alpha_H="same", l1_ratio=0.0, random_state=None,
                 verbose=0, backend="auto", precision="fp32", record_objective=True):
        self.n_components = n_components
        self.lam = lam
        self.mu = mu
        self.init = init
        self.tol = tol
        self.max_iter = max_iter
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.random_state = random_state
        self.verbose = verbose
        self.backend = backend
        self.precision = precision
        self.record_objective = record_objective

    def _run(self, X, groups, W=None, H=None, update_H=True, record=False):
        if update_H:
            n_components = self.n_components
            if n_components is None:
                raise ValueError(f"{type(self).__name__}: set n_components (an integer >= 1)")
            _check_real("n_components", n_components, low=1, integer=True)
        else:  # transform: the fitted components_, whatever set_params did since the fit
            n_components = int(H.shape[0])
        _check_real("lam", self.lam)
        _check_real("mu", self.mu)
        X, off = _check_groups_and_X(X, groups, type(self).__name__)
        W, H, info = _solve(
            X, W, H, n_components=n_components, init=self.init if update_H else "custom",
            update_H=update_H, beta=2, tol=self.tol, max_iter=self.max_iter,
            penalties=lambda m, n: _penalties(self.alpha_W, self.alpha_H, self.l1_ratio, m, n),
            random_state=self.random_state, verbose=self.verbose, backend=self.backend,
            precision=self.precision, groups=off.tolist(), lam=float(self.lam),
            mu=float(self.mu), record_objective=record, whom=type(self).__name__,
        )
        return W, H, info, off

    def fit_transform(self, X, y=None, groups=None, W=None, H=None):
        """Learn H from X (m, n) with row ``groups``; return W (m, n_components)."""
        if groups is None:
            raise ValueError(
                f"{type(self).__name__}.fit needs groups=: row offsets [0, ..., m] or one "
                "label per row of X"
            )
        record = _check_flag("record_objective", self.record_objective)
        X = self._validate(X, reset=True)
        W, H, info, off = self._run(X, groups, W, H, record=record)
        self.components_ = H
        self.n_components_ = H.shape[0]
        self.n_iter_ = info.n_iter
        self.reconstruction_err_ = info.error
        self.objective_ = list(info.objective)
        self.backend_ = info.backend
        self.kernel_ = info.kernel
        self.group_offsets_ = off
        if isinstance(W, np.ndarray):
            self.codes_ = group_norms(W, off)
        return W

    def fit(self, X, y=None, groups=None, **params):
        """Learn H from X (m, n) with row ``groups``; returns self."""
        self.fit_transform(X, groups=groups, **params)
        return self

    def transform(self, X, groups=None):
        """W (m, n_components) for new X with H fixed; ``groups`` as in fit.

        Without groups, all of X is one group (one image's positions, say).
        """
        if not hasattr(self, "components_"):
            raise _not_fitted(self)
        X = self._validate(X, reset=False)
        self._check_transform_dtype(X)
        if isinstance(self.components_, np.ndarray) and not self.components_.any():
            raise ValueError(
                f"{type(self).__name__}: the fitted components_ are all zero (the fit collapsed: "
                "X all zero, or lam, alpha_W or alpha_H too strong), so no W can be fitted against "
                "them; refit with weaker regularisation"
            )
        if groups is None:
            groups = {"offsets": [0, int(np.shape(X)[0])]}
        W, _, _, _ = self._run(X, groups, None, self.components_, update_H=False)
        return W

    def codes(self, X, groups):
        """Group norms (n_groups, n_components) of ``transform(X, groups)``: one code per group
        (a row of zeros for an empty group)."""
        off = group_offsets(groups, int(np.shape(X)[0]))
        W = self.transform(X, groups={"offsets": off})
        return group_norms(W, off)
