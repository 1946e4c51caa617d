"""Image clustering with a factorized convolutional network (Gui et al., WACV 2018).

Two layers on top of CNN activations A (N, C, h, w):

1. **Parts.** Group-sparse NMF of the local features: X (N*h*w, C), the rows of image i are
   its h*w positions (row-major) and form group i, X ~ W H with rank ``n_parts``. The rows of
   H are the parts (directions in channel space); the group term makes each image use few of
   them. Image i's **code** is its vector of group norms, code[i, j] = ||W[G_i, j]||_2, and
   W[G_i, j] reshaped to (h, w) is the heat map of part j in image i.
2. **Clusters.** Either ``assign="kmeans"`` (the default): k-means (k-means++ seeding, 10
   restarts) on the L2-normalised codes; or ``assign="argmax"``: NMF of the codes with rank
   ``n_clusters`` and the argmax of each image's row of W2, as in the paper.

``method="kmeans"`` is the baseline: k-means on the L2-normalised mean-pooled activations.

Why k-means on normalised codes is the default. Measured (2026-11-26, CPU backend, float32,
defaults lam_rel=0.1, mu_rel=0.01, n_parts=3*n_clusters, n_init=4) on
``synthetic_parts_activations`` (30 images per class, 8x8 positions, 32 channels; classes
differ only in which 2 parts their images hold, mean-pooled features equal in expectation),
3 and 4 classes x 0, 1, 2 parts shared by all classes x 8 data seeds x lam_rel in
{0.03, 0.1, 0.3}, 144 runs, both assignments on the same codes:

    ====================  ==============  =============  ===============================
    layer 2               mean accuracy   min accuracy   runs with accuracy >= 0.9
    ====================  ==============  =============  ===============================
    assign="kmeans"       0.992           0.608          143 / 144
    assign="argmax"       0.991           0.692          142 / 144
    method="kmeans"       0.468           0.375          0 / 48  (baseline, mean pooling)
    ====================  ==============  =============  ===============================

    by lam_rel (kmeans / argmax mean): 0.03: 0.999 / 0.998, 0.1: 0.998 / 0.998,
    0.3: 0.979 / 0.977. Paired, kmeans minus argmax: mean +0.001, kmeans lower in 11 of 144.

With fewer restarts and parts the two stay level (n_init=1 or 4, n_parts = 2 or 3 per
cluster, 160 runs per assignment without shared parts: 0.947 vs 0.946 with n_init=1, 0.983 vs 0.984 with
n_init=4), and with shared parts and n_init=2 k-means led (96 runs: mean 0.965 vs 0.957,
worst case at lam_rel=0.3 0.80 vs 0.625). So on this data the two are close; k-means on
normalised codes is the default because it is never clearly behind, is ahead where the codes
carry shared parts, and needs no second factorization with local minima of its own.
Restarts matter more than the assignment: the lowest-objective restart is the one that finds
the parts (with 1 restart, 6 parts for 3 classes: 0.82 mean accuracy at lam_rel=0.01).
``tests/test_clustering.py::test_measure_kmeans_against_argmax_assignment`` (marked slow)
reruns a reduced version.

End to end on pixels (``cluster_images`` with the built-in filter bank at 64 x 64, 60 grey
images with two flat rectangles of complementary colours, red + cyan, green + magenta or
blue + yellow, per class; 3 image seeds): fcn 1.00 / 1.00 / 1.00 at lam_rel 0.03 and 0.1
(both assignments), 0.87 / 0.78 / 0.85 at lam_rel 0.3; the mean-pooling baseline
0.57 / 0.75 / 0.78.

Scaling of the penalties. Unless given, lam = lam_rel * lam_unit and mu = mu_rel * mu_unit
with the units of :func:`dffkit.group_sparse.penalty_scale`: with w0 = sqrt(mean(X)/k),
lam_unit = (1/2 ||X||^2) / (k * w0 * sum_i sqrt(h*w)) and mu_unit = ||X||^2 / (C * mean(X)),
so that lam_rel is the ratio of the group term to 1/2 ||X||^2 for factors of the initial
scale, and mu_rel likewise for the H term. Both units scale with the data exactly as the
minimiser's lam and mu must (lam ~ c^1.5, mu ~ c when X -> c X), so the defaults mean the
same for activations of any magnitude.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from dffkit.images import _expand_images, _image_index
from dffkit.metrics import adjusted_rand_score, clustering_accuracy, normalized_mutual_info_score
from dffkit.group_sparse import group_norms, group_sparse_nmf, penalty_scale
from dffkit.nmf import (
    ConvergenceWarning,
    _check_backend,
    _check_max_iter,
    _check_random_state,
    _check_real,
    _no_convergence_warnings,
    _seed_from,
    non_negative_factorization,
)

__all__ = [
    "ClusteringResult",
    "cluster_activations",
    "cluster_images",
    "transform_codes",
    "assign_clusters",
    "kmeans",
    "synthetic_parts_activations",
    "contact_sheet",
    "write_clusters",
    "clustering_accuracy",
    "normalized_mutual_info_score",
    "adjusted_rand_score",
    "CLI",
]

DEFAULT_LAM_REL = 0.1
DEFAULT_MU_REL = 0.01
_METHODS = ("fcn", "kmeans")
_ASSIGN = ("kmeans", "argmax")


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------

def _sq_dist(X, C):
    d = (X * X).sum(1)[:, None] - 2.0 * X @ C.T + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(X, k, rng):
    """k-means++ seeding (one candidate per step, D^2 sampling)."""
    n = X.shape[0]
    centers = np.empty((k, X.shape[1]))
    centers[0] = X[rng.integers(n)]
    d = _sq_dist(X, centers[:1])[:, 0]
    for c in range(1, k):
        total = d.sum()
        if total <= 0:
            idx = rng.integers(n)
        else:
            idx = int(np.searchsorted(np.cumsum(d), rng.random() * total, side="right"))
            idx = min(idx, n - 1)
        centers[c] = X[idx]
        d = np.minimum(d, _sq_dist(X, centers[c:c + 1])[:, 0])
    return centers


def kmeans(X, n_clusters, *, n_init=10, max_iter=300, tol=1e-8, random_state=0):
    """Lloyd's k-means with k-means++ seeding, deterministic for a given ``random_state``.

    Parameters
    ----------
    X : (n, d) array of finite reals.
    n_clusters : int, 1 <= n_clusters <= n.
    n_init : restarts; the one with the lowest inertia wins.
    max_iter : Lloyd iterations per restart at most, an int >= 1; tol : a real >= 0, the
        squared centre shift that stops a restart.

    Returns
    -------
    labels (n,) int64, centers (n_clusters, d) float64, inertia float
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty 2-D array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinity")
    _check_real("n_clusters", n_clusters, low=1, integer=True)
    _check_real("n_init", n_init, low=1, integer=True)
    _check_real("max_iter", max_iter, low=1, integer=True)  # 0 left no labels to return
    _check_real("tol", tol)
    k = int(n_clusters)
    if k > X.shape[0]:
        raise ValueError(f"n_clusters={k} is larger than the number of samples ({X.shape[0]})")
    rng = np.random.default_rng(_seed_from(random_state))
    best = None
    for _ in range(int(n_init)):
        centers = _kmeans_pp(X, k, rng)
        labels = None
        for _ in range(int(max_iter)):
            d = _sq_dist(X, centers)
            new_labels = d.argmin(1)
            new_centers = np.zeros_like(centers)
            np.add.at(new_centers, new_labels, X)
            counts = np.bincount(new_labels, minlength=k)
            empty = np.flatnonzero(counts == 0)
            if empty.size:  # an empty cluster takes the points farthest from their centres
                far = np.argsort(-d[np.arange(len(X)), new_labels])
                for e, idx in zip(empty, far):
                    new_labels[idx] = e
                new_centers = np.zeros_like(centers)
                np.add.at(new_centers, new_labels, X)
                counts = np.bincount(new_labels, minlength=k)
            new_centers /= counts[:, None]
            shift = float(((new_centers - centers) ** 2).sum())
            centers = new_centers
            converged = labels is not None and np.array_equal(labels, new_labels)
            labels = new_labels
            if converged or shift <= tol:
                break
        inertia = float(_sq_dist(X, centers)[np.arange(len(X)), labels].sum())
        if best is None or inertia < best[2] - 1e-12 * max(1.0, abs(best[2])):
            best = (labels.astype(np.int64), centers, inertia)
    return best


def _l2_normalise(V):
    nrm = np.linalg.norm(V, axis=1, keepdims=True)
    return V / np.where(nrm > 0, nrm, 1.0)


# ---------------------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------------------

def synthetic_parts_activations(n_per_class=30, n_classes=3, *, size=8, n_channels=32,
                                noise=0.1, shared_parts=0, random_state=0):
    """Activations (N, C, size, size) float32 whose classes differ only in WHICH parts they hold.

    One positive vector U over the channels is split, for each class c, into two
    complementary halves U * m_c and U * (1 - m_c) (m_c a random half of the channels):
    the class's two parts. Every image of class c holds both of its parts, each in a random
    rectangle with random amplitude, over uniform background noise in [0, noise). All classes
    then have the same expected mean-pooled feature (U times the expected part area), so
    pooling cannot tell them apart, while the parts can. ``shared_parts`` more parts (random
    positive vectors) appear in every image of every class, each in its own rectangle.

    Returns
    -------
    A : float32 (N, n_channels, size, size), N = n_per_class * n_classes, classes shuffled
    y : int64 (N,), the class of each image
    parts : float64 (2 * n_classes + shared_parts, n_channels), the true parts
    """
    rng = np.random.default_rng(_seed_from(random_state))
    U = rng.uniform(0.5, 1.5, n_channels)
    parts = []
    for _ in range(n_classes):
        m = np.zeros(n_channels)
        m[rng.choice(n_channels, n_channels // 2, replace=False)] = 1.0
        parts += [U * m, U * (1.0 - m)]
    for _ in range(shared_parts):
        parts.append(rng.uniform(0.0, 1.0, n_channels))
    parts = np.array(parts)
    shared = list(range(2 * n_classes, 2 * n_classes + shared_parts))
    A, y = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            amap = rng.uniform(0.0, noise, (size, size, n_channels))
            for p in [2 * c, 2 * c + 1] + shared:
                h, w = rng.integers(2, size // 2 + 1, size=2)
                r0, c0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                amap[r0:r0 + h, c0:c0 + w] += rng.uniform(0.6, 1.4, (h, w, 1)) * parts[p]
            A.append(amap.transpose(2, 0, 1))
            y.append(c)
    order = rng.permutation(len(y))
    return np.asarray(A, dtype=np.float32)[order], np.asarray(y, dtype=np.int64)[order], parts


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------

def _short_list(values, head=8):
    return str(values) if len(values) <= head else f"[{', '.join(map(str, values[:head]))}, ... ({len(values)} in all)]"


@dataclass(repr=False)
class ClusteringResult:
    """What ``cluster_activations`` / ``cluster_images`` return.

    Attributes
    ----------
    labels : int64 (N,), the cluster of each image, 0 .. n_clusters - 1
    codes : float64 (N, n_parts), image i's group norms ||W[G_i, j]|| (method "fcn"); for
        method "kmeans", the L2-normalised mean-pooled activations (N, C)
    parts : float (n_parts, C), the rows of H, or None (method "kmeans")
    part_maps : float (N, n_parts, h, w), W[G_i, j] as a map over image i's positions, or None
    parts_used : list of N int arrays, the parts image i uses (code >= ``used_threshold``
        times its largest code), strongest first
    method, assign : the methods used
    lam, mu : the absolute penalties the GSNMF ran with
    objective : float, the final GSNMF objective (of the best restart)
    n_iter : int, iterations of the best restart
    centers : (n_clusters, n_parts) k-means centres in normalised-code space (assign "kmeans")
    layer2 : (n_clusters, n_parts) H of the code NMF (assign "argmax")
    images : the names of the images (``cluster_images``), else None
    """

    labels: np.ndarray
    codes: np.ndarray
    parts: np.ndarray | None
    part_maps: np.ndarray | None
    parts_used: list
    method: str
    assign: str
    lam: float = 0.0
    mu: float = 0.0
    objective: float = float("nan")
    n_iter: int = 0
    centers: np.ndarray | None = None
    layer2: np.ndarray | None = None
    images: list | None = None
    params: dict = field(default_factory=dict)

    @property
    def n_clusters(self):
        return int(self.params.get("n_clusters", int(self.labels.max()) + 1))

    def __repr__(self):
        """A summary a person can read (the arrays are in the attributes): the dataclass's
        own repr printed every array and every image's parts, tens of kB per 100 images."""
        labels = np.asarray(self.labels) if self.labels is not None else np.zeros(0, np.int64)
        sizes = np.bincount(labels, minlength=self.n_clusters).tolist() if labels.size else []
        text = (f"ClusteringResult({len(labels)} images, {self.n_clusters} clusters of sizes "
                f"{_short_list(sizes)}, method={self.method!r}")
        if self.method == "fcn":
            n_parts = None if self.parts is None else int(np.shape(self.parts)[0])
            text += (f", assign={self.assign!r}, n_parts={n_parts}, lam={self.lam:.4g}, "
                     f"mu={self.mu:.4g}, objective={self.objective:.6g}, n_iter={self.n_iter}")
        if self.images:
            text += f", images=[{self.images[0]!r}, ...]" if len(self.images) > 1 else f", images={self.images!r}"
        return text + ")"

    def heat_maps(self, i):
        """{part: (h, w) map} of the parts image i uses, strongest first ({} for method
        "kmeans", which has no parts). ``i``: an int in 0..N-1, or -N..-1 from the end
        (TypeError / IndexError otherwise)."""
        i = _image_index(i, len(self.labels))
        if self.part_maps is None:
            return {}
        return {int(j): self.part_maps[i, j] for j in self.parts_used[i]}

    def clusters(self):
        """List of index arrays, one per cluster."""
        return [np.flatnonzero(self.labels == c) for c in range(self.n_clusters)]

    def predict_activations(self, A, *, max_iter=None):
        """Cluster labels for new activations (N, C, h, w) with the learned parts fixed.

        The activations must have the channels (C) of those the result was learned on (the
        same network and layer); ``max_iter`` (default: the fit's) is the number of W updates
        per image.
        """
        A = _check_activations(A)
        learned = self.centers if self.method != "fcn" else self.parts
        if learned is not None and A.shape[1] != learned.shape[1]:
            what = "the parts were" if self.method == "fcn" else "the clusters were"
            raise ValueError(
                f"activations have {A.shape[1]} channels, {what} learned on {learned.shape[1]}: "
                "give activations of the same network and layer as those clustered"
            )
        if self.method != "fcn":
            feats = _l2_normalise(A.mean(axis=(2, 3), dtype=np.float64))
            return _sq_dist(feats, self.centers).argmin(1)
        if max_iter is None:
            max_iter = self.params.get("max_iter", 200)
        _check_max_iter(max_iter)
        codes = transform_codes(A, self.parts, lam=self.lam, max_iter=max_iter)
        return _assign_codes(codes, self)


def _check_activations(A):
    if isinstance(A, (list, tuple)):
        arrays = [np.asarray(a) for a in A]
        for i, a in enumerate(arrays[1:], 1):
            if a.shape != arrays[0].shape:
                raise ValueError(
                    f"activations of image {i} have shape {a.shape}, those of image 0 "
                    f"{arrays[0].shape}: all must have one shape (C, h, w); resize the images to "
                    "one size before extracting (FeatureExtractor's image_size)")
        A = np.stack(arrays) if arrays else np.zeros((0, 0, 0, 0))
    A = np.asarray(A)
    if A.ndim != 4:
        raise ValueError(
            f"activations must be 4-D (N, C, h, w), got shape {A.shape}; for one image use "
            "A[None]"
        )
    if 0 in A.shape:
        raise ValueError(f"activations are empty (shape {A.shape})")
    if A.dtype.kind not in "fiu":
        raise TypeError(f"activations must be numeric, got dtype {A.dtype}")
    if A.dtype not in (np.float32, np.float64):
        A = A.astype(np.float32)
    if not np.isfinite(A).all():
        raise ValueError("activations contain NaN or infinity")
    if A.min() < 0:
        raise ValueError(
            "activations must be non-negative (take them after a ReLU, or clip: np.maximum(A, 0))"
        )
    return A


def _rows(A):
    """X (N*h*w, C): image i's positions, row-major, are rows i*h*w ... (i+1)*h*w - 1."""
    N, C, h, w = A.shape
    X = np.ascontiguousarray(A.transpose(0, 2, 3, 1).reshape(N * h * w, C))
    return X, np.arange(N + 1, dtype=np.int64) * (h * w)


def transform_codes(A, parts, *, lam=0.0, max_iter=200, backend="auto"):
    """Codes (N, k) of activations (N, C, h, w) with the parts H (k, C) fixed.

    Each image is fitted on its own (one group), W starting at sqrt(mean(X_i)/k) and running
    exactly ``max_iter`` updates: what ``export_parts_model`` computes in ONNX.
    """
    A = _check_activations(A)
    H = np.asarray(parts, dtype=A.dtype)
    codes = []
    for a in A:
        X, off = _rows(a[None])
        W, _, _ = group_sparse_nmf(X, {"offsets": off}, H.shape[0], H=H, update_H=False, lam=lam,
                                   max_iter=max_iter, tol=0.0, backend=backend)
        codes.append(group_norms(W, off)[0])
    return np.asarray(codes)


def _assign_codes(codes, result):
    if result.assign == "kmeans":
        return _sq_dist(_l2_normalise(codes), result.centers).argmin(1)
    W2, _, _ = non_negative_factorization(
        codes, H=np.asarray(result.layer2, dtype=codes.dtype), n_components=result.layer2.shape[0],
        update_H=False, max_iter=500, tol=1e-6)
    return W2.argmax(1)


# ---------------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------------

def _warn_few_distinct(feats, n_clusters, what):
    """Warn (as scikit-learn's KMeans does) when the images have fewer distinct points than
    clusters: the labels then split identical images arbitrarily."""
    distinct = len(np.unique(np.asarray(feats), axis=0))
    if distinct < n_clusters:
        warnings.warn(
            f"the images' {what} take only {distinct} distinct value{'s' if distinct != 1 else ''} "
            f"for n_clusters={n_clusters}: images with the same {what} are split between "
            "clusters arbitrarily (activations all zero, or the same image repeated?); ask for "
            "fewer clusters, or check the images and the extractor",
            ConvergenceWarning, stacklevel=3)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_params(n_images, n_clusters, *, n_parts=None, lam=None, mu=None,
                  lam_rel=DEFAULT_LAM_REL, mu_rel=DEFAULT_MU_REL, method="fcn", assign="kmeans",
                  n_init=4, max_iter=300, tol=1e-5, random_state=0, backend="auto",
                  used_threshold=0.05, images=None, progress=None):
    """The checks of ``cluster_activations`` that need no activations, so that
    ``cluster_images`` makes them before it extracts any feature (which may take minutes)."""
    _check_real("n_clusters", n_clusters, low=1, integer=True)
    if n_clusters > n_images:
        raise ValueError(
            f"n_clusters={n_clusters} is larger than the number of images ({n_images})")
    _check_choice("method", method, _METHODS)
    _check_choice("assign", assign, _ASSIGN)
    _check_real("n_init", n_init, low=1, integer=True)
    _check_real("used_threshold", used_threshold)
    if used_threshold > 1:
        raise ValueError(
            f"used_threshold must be in [0, 1] (a fraction of an image's largest code), got "
            f"{used_threshold!r}: above 1 no part would count as used")
    _check_max_iter(max_iter)
    _check_real("tol", tol)
    if n_parts is not None:
        _check_real("n_parts", n_parts, low=1, integer=True)
    for name, value in (("lam", lam), ("mu", mu)):
        if value is not None:
            _check_real(name, value)
    if lam is None:
        _check_real("lam_rel", lam_rel)
    if mu is None:
        _check_real("mu_rel", mu_rel)
    _check_backend(backend)
    _check_random_state(random_state)
    if images is not None:
        if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
            raise TypeError(
                f"images must be a list of {n_images} names (one per image), got "
                f"{type(images).__name__} {images!r:.60}")
        if len(images) != n_images:
            raise ValueError(f"images has {len(images)} names for {n_images} images")
    from dffkit.deep_feature_factorization import _check_progress

    _check_progress(progress)


def _progress(progress, total, unit, label):
    """A callable(done) reporting to ``progress``: nothing (None, False), a one-line bar on
    stderr (True), or the caller's callable(done, total)."""
    from dffkit.deep_feature_factorization import _progress_callback

    return _progress_callback(progress, total, label=label, unit=unit)


def cluster_activations(A, n_clusters, *, n_parts=None, lam=None, mu=None,
                        lam_rel=DEFAULT_LAM_REL, mu_rel=DEFAULT_MU_REL, method="fcn",
                        assign="kmeans", n_init=4, max_iter=300, tol=1e-5, random_state=0,
                        backend="auto", used_threshold=0.05, images=None, progress=None):
    """Cluster images from their CNN activations (N, C, h, w) with a factorized network.

    Parameters
    ----------
    A : array (N, C, h, w), non-negative (activations after a ReLU), numpy float32/float64
        or anything numpy reads; a list of (C, h, w) arrays of one shape.
    n_clusters : int, 1 <= n_clusters <= N.
    n_parts : int, rank of layer 1 (default 3 * n_clusters).
    lam, mu : absolute GSNMF penalties (see ``dffkit.group_sparse_nmf``); None (default)
        means lam_rel * lam_unit and mu_rel * mu_unit, the data-scaled units of
        :func:`dffkit.group_sparse.penalty_scale` (documented in this module's docstring).
    lam_rel, mu_rel : floats >= 0, the relative strengths used when lam / mu are None.
    method : "fcn" (GSNMF parts, then layer 2) or "kmeans" (the baseline: k-means on the
        L2-normalised mean-pooled activations).
    assign : layer 2 of "fcn": "kmeans" (k-means on L2-normalised codes; the default, the more
        robust in our measurement) or "argmax" (NMF of the codes, rank n_clusters, argmax).
    n_init : GSNMF restarts (random initialisations from random_state); the lowest final
        objective wins.
    max_iter, tol : of each GSNMF run: an int >= 0 and a real number >= 0.
    random_state : int seed; one seed gives one result.
    backend : engine of the GSNMF ("auto", "cpu", "cuda").
    used_threshold : a number in [0, 1]: a part counts as used by an image when its code is at
        least this fraction of the image's largest code.
    images : optional names of the images (a list of N str), kept in the result.
    progress : None (silent), True (a one-line bar on stderr over the GSNMF restarts) or a
        callable ``progress(done, total)``, called with done = 0 .. n_init.

    Returns
    -------
    ClusteringResult
    """
    A = _check_activations(A)
    N, C, h, w = A.shape
    _check_params(N, n_clusters, n_parts=n_parts, lam=lam, mu=mu, lam_rel=lam_rel, mu_rel=mu_rel,
                  method=method, assign=assign, n_init=n_init, max_iter=max_iter, tol=tol,
                  random_state=random_state, backend=backend, used_threshold=used_threshold,
                  images=images, progress=progress)
    seed = _seed_from(random_state)
    params = dict(n_clusters=int(n_clusters), method=method, assign=assign, n_init=int(n_init),
                  max_iter=int(max_iter), tol=float(tol), random_state=random_state)
    if images is not None:
        images = list(images)

    if method == "kmeans":
        feats = _l2_normalise(A.mean(axis=(2, 3), dtype=np.float64))
        _warn_few_distinct(feats, n_clusters, "mean-pooled activations")
        labels, centers, _ = kmeans(feats, n_clusters, random_state=seed)
        return ClusteringResult(labels=labels, codes=feats, parts=None, part_maps=None,
                                parts_used=[np.zeros(0, dtype=np.int64)] * N, method=method,
                                assign="kmeans", centers=centers, images=images, params=params)

    k = 3 * int(n_clusters) if n_parts is None else n_parts
    _check_real("n_parts", k, low=1, integer=True)
    k = int(k)
    X, off = _rows(A)
    lam_unit, mu_unit = penalty_scale(X, {"offsets": off}, k)
    if lam is None:
        _check_real("lam_rel", lam_rel)
        lam = lam_rel * lam_unit
    if mu is None:
        _check_real("mu_rel", mu_rel)
        mu = mu_rel * mu_unit
    _check_real("lam", lam)
    _check_real("mu", mu)
    params.update(n_parts=k, lam_rel=float(lam / lam_unit) if lam_unit else 0.0,
                  mu_rel=float(mu / mu_unit) if mu_unit else 0.0)

    best = None
    report = _progress(progress, int(n_init), "restarts", "parts    ")
    report(0)
    unconverged = 0
    with _no_convergence_warnings():  # counted here, one warning for all the runs
        for r in range(int(n_init)):
            W, H, n_iter = group_sparse_nmf(
                X, {"offsets": off}, k, lam=lam, mu=mu, init="random", max_iter=max_iter, tol=tol,
                random_state=(seed + r) & 0xFFFFFFFFFFFFFFFF, backend=backend)
            unconverged += bool(tol > 0 and max_iter > 0 and n_iter == max_iter)  # nmf's rule
            obj = _objective(X, W, H, off, lam, mu)
            if best is None or obj < best[0]:
                best = (obj, W, H, n_iter)
            report(r + 1)
    if unconverged:
        warnings.warn(f"{unconverged} of {n_init} GSNMF runs stopped at max_iter={max_iter} "
                      "before meeting tol; raise max_iter to converge further",
                      ConvergenceWarning, stacklevel=2)
    obj, W, H, n_iter = best
    codes = group_norms(W, off)
    part_maps = W.reshape(N, h, w, k).transpose(0, 3, 1, 2).copy()
    parts_used = []
    for c in codes:
        top = c.max()
        idx = np.flatnonzero(c >= used_threshold * top) if top > 0 else np.zeros(0, np.int64)
        parts_used.append(idx[np.argsort(-c[idx], kind="stable")].astype(np.int64))
    _warn_few_distinct(_l2_normalise(codes) if assign == "kmeans" else codes, n_clusters, "codes")
    result = ClusteringResult(labels=None, codes=codes, parts=H, part_maps=part_maps,
                              parts_used=parts_used, method=method, assign=assign, lam=float(lam),
                              mu=float(mu), objective=float(obj), n_iter=int(n_iter),
                              images=images, params=params)
    result.labels, result.centers, result.layer2 = assign_clusters(codes, n_clusters, assign,
                                                                   random_state=seed)
    return result


def assign_clusters(codes, n_clusters, assign="kmeans", *, random_state=0):
    """Layer 2: cluster labels from codes (N, k).

    ``assign="kmeans"``: k-means (k-means++, 10 restarts) on the L2-normalised codes;
    ``assign="argmax"``: NMF of the codes with rank n_clusters (nndsvda start, float64 codes,
    1000 iterations at most), label = argmax of each row of W2.

    Returns
    -------
    labels (N,) int64, centers (n_clusters, k) or None, H2 (n_clusters, k) or None
    """
    _check_choice("assign", assign, _ASSIGN)
    codes = np.asarray(codes, dtype=np.float64)
    if assign == "kmeans":
        labels, centers, _ = kmeans(_l2_normalise(codes), n_clusters, random_state=random_state)
        return labels, centers, None
    init = "nndsvda" if n_clusters <= min(codes.shape) else "random"
    W2, H2, _ = non_negative_factorization(codes, n_components=int(n_clusters), init=init,
                                           max_iter=1000, tol=1e-6, random_state=random_state,
                                           backend="cpu")
    return W2.argmax(1).astype(np.int64), None, H2


def _objective(X, W, H, off, lam, mu):
    """The GSNMF objective in float64 (trace identity: one pass over X)."""
    Xd = X.astype(np.float64, copy=False)
    Wd = W.astype(np.float64)
    Hd = H.astype(np.float64)
    fit = float(np.sum(Xd * Xd)) - 2.0 * float(np.sum((Wd.T @ Xd) * Hd)) + float(
        np.sum((Wd.T @ Wd) * (Hd @ Hd.T)))
    return 0.5 * max(fit, 0.0) + lam * float(group_norms(W, off).sum()) + 0.5 * mu * float(np.sum(Hd * Hd))


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def _image_name(item, i):
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    name = getattr(item, "filename", None)
    return name if isinstance(name, str) and name else f"image {i}"


def _make_extractor(extractor, layer):
    if extractor is None or isinstance(extractor, (str, os.PathLike, bytes)) or type(extractor).__name__ == "ModelProto":
        from dffkit.features import FeatureExtractor

        return FeatureExtractor("filterbank" if extractor is None else extractor, layer=layer)
    if not callable(extractor):
        raise TypeError(
            "extractor must be None (the built-in filter bank), a dffkit.FeatureExtractor, a "
            f"model (path or onnx.ModelProto) or a callable images -> (N, C, h, w); got "
            f"{type(extractor).__name__}"
        )
    return extractor


def _image_items(images):
    """``images`` as a list of single images: a path or ``os.PathLike`` is one image, or, for
    a folder, its image files (``_expand_images``); otherwise as the feature extractor reads
    them (``dffkit.images.as_image_list``: a 4-D array is N images, a 3-D one one image, a
    1-D array of str or object dtype a sequence of paths)."""
    if isinstance(images, (str, os.PathLike)):
        return _expand_images([os.fspath(images)])
    from dffkit.images import as_image_list

    return as_image_list(images)


def cluster_images(images, n_clusters, *, extractor=None, layer=None, progress=None, **kwargs):
    """Cluster images (paths, PIL images or uint8 arrays) by the parts their activations hold.

    Parameters
    ----------
    images : a sequence of images (paths, PIL images, uint8 arrays; a 1-D numpy array of
        paths, e.g. ``df.path.values``, too), a 4-D uint8 array (N images), or one path /
        ``os.PathLike``: an image file, or a folder, whose image files (by extension, sorted
        by name) are the images.
    n_clusters : int.
    extractor : None (default: ``dffkit.FeatureExtractor("filterbank")``, the built-in
        colour-and-texture network), a ``FeatureExtractor``, an ONNX model (path or
        ModelProto, wrapped in a FeatureExtractor with ``layer``), or any callable mapping a
        list of images to float32 activations (N, C, h, w).
    layer : the layer, when ``extractor`` is a model.
    progress : None (silent), True (one-line bars on stderr: over the images as their
        features are extracted, then over the GSNMF restarts) or a callable
        ``progress(done, total)``, called with done = 0 .. N over the images, then with
        done = 0 .. n_init over the restarts (as ``dffkit.dff`` calls it, stage after stage).
    **kwargs : passed to :func:`cluster_activations` (n_parts, lam, mu, lam_rel, method,
        assign, random_state, backend, ...); checked, with ``n_clusters``, before any image is
        read.

    Returns
    -------
    ClusteringResult with ``images`` holding the image names (paths, or "image i").
    """
    images = _image_items(images)
    if not images:
        raise ValueError("no images given")
    unknown = sorted(set(kwargs) - _CLUSTER_OPTIONS)
    if unknown:
        raise TypeError(
            f"cluster_images got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; it takes extractor, layer, progress and those of "
            f"cluster_activations: {', '.join(sorted(_CLUSTER_OPTIONS))}")
    _check_params(len(images), n_clusters, progress=progress, **kwargs)  # before the slow part
    fx = _make_extractor(extractor, layer)
    A = _extract_all(fx, images, progress)
    if A.ndim != 4 or A.shape[0] != len(images):
        raise ValueError(
            f"the extractor returned shape {A.shape} for {len(images)} images; it must return "
            "(N, C, h, w)"
        )
    names = [_image_name(item, i) for i, item in enumerate(images)]
    return cluster_activations(A, n_clusters, images=names, progress=progress, **kwargs)


#: the keyword arguments ``cluster_images`` passes on to ``cluster_activations``
_CLUSTER_OPTIONS = frozenset({
    "n_parts", "lam", "mu", "lam_rel", "mu_rel", "method", "assign", "n_init", "max_iter", "tol",
    "random_state", "backend", "used_threshold"})


def _extract_all(fx, images, progress):
    """The extractor's activations of all ``images``: one call without ``progress``, batches
    of the extractor's ``batch_size`` (16 by default) with it, reported as they are done."""
    if progress is None or progress is False:
        return np.asarray(fx(images))
    report = _progress(progress, len(images), "images", "features ")
    batch = getattr(fx, "batch_size", None)
    batch = int(batch) if isinstance(batch, (int, np.integer)) and batch > 0 else 16
    report(0)
    parts = []
    for start in range(0, len(images), batch):
        out = np.asarray(fx(images[start:start + batch]))
        if out.ndim != 4 or out.shape[0] != len(images[start:start + batch]):
            raise ValueError(
                f"the extractor returned shape {out.shape} for {len(images[start:start + batch])} "
                "images; it must return (N, C, h, w)")
        parts.append(out)
        report(min(start + batch, len(images)))
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise ValueError(
            "the extractor returned activations of different shapes for different images "
            f"({sorted({p.shape[1:] for p in parts})}); they must all be (C, h, w) of one size: "
            "resize the images to one size (FeatureExtractor's image_size)")
    return np.concatenate(parts)


def _load_rgb(item):
    try:
        from dffkit.images import load_image

        return load_image(item)
    except ImportError:  # pragma: no cover - images.py ships with the package
        from PIL import Image

        if isinstance(item, np.ndarray):
            return Image.fromarray(item).convert("RGB")
        if hasattr(item, "convert"):
            return item.convert("RGB")
        return Image.open(item).convert("RGB")


def _check_thumb(thumb):
    import numbers

    if isinstance(thumb, bool) or not isinstance(thumb, numbers.Integral) or thumb < 1:
        raise ValueError(
            f"thumb must be a positive int (the thumbnail size in pixels, e.g. 128), got {thumb!r}"
        )
    return int(thumb)


def contact_sheet(images, maps=None, *, title="", thumb=128, columns=6):
    """A PIL image: thumbnails of ``images`` in a grid, each with its heat map (h, w) in red.

    ``thumb`` (a positive int) is the size in pixels of a thumbnail's longer side; ``columns``
    the number of thumbnails per row at most.
    """
    from PIL import Image, ImageDraw

    thumb = _check_thumb(thumb)
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, (n + columns - 1) // columns)
    pad, head = 4, 18 if title else 0
    sheet = Image.new("RGB", (columns * (thumb + pad) + pad, rows * (thumb + pad) + pad + head),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0))
    for i, item in enumerate(images):
        img = _load_rgb(item)
        img.thumbnail((thumb, thumb))
        if maps is not None and maps[i] is not None and np.max(maps[i]) > 0:
            m = np.asarray(maps[i], dtype=np.float64)
            m = (255 * m / m.max()).astype(np.uint8)
            mask = Image.fromarray(m).resize(img.size, Image.BILINEAR)
            red = Image.new("RGB", img.size, (255, 0, 0))
            img = Image.composite(red, img, mask.point(lambda v: int(v * 0.5)))
        x = pad + (i % columns) * (thumb + pad) + (thumb - img.width) // 2
        y = head + pad + (i // columns) * (thumb + pad) + (thumb - img.height) // 2
        sheet.paste(img, (x, y))
    return sheet


def write_clusters(result, images, out_dir, *, thumb=128, extra=None):
    """Write ``clusters.json`` and one contact sheet ``cluster_XX.png`` per cluster to out_dir.

    ``images`` are the clustered images, in the order of ``result.labels`` (what
    ``cluster_images`` took: paths, a folder, PIL images or uint8 arrays), or None for the
    files named in ``result.images``. Each thumbnail carries the heat map of the strongest
    part its image uses (method "fcn"); ``thumb`` (a positive int) is its size in pixels.
    ``extra``: a dict added to the JSON (numpy numbers and arrays are written as numbers and
    lists). Returns the path of the JSON file.
    """
    thumb = _check_thumb(thumb)  # before anything is written
    n = len(result.labels)
    if images is None:
        if not result.images or not all(os.path.isfile(x) for x in result.images):
            raise ValueError(
                "images=None takes the image files named in result.images, but they are not "
                "files here (the result of arrays or PIL images): pass the images clustered")
        images = list(result.images)
    else:
        images = _image_items(images)
    if len(images) != n:
        raise ValueError(
            f"images has {len(images)} images, but the result clustered {n}: pass the images "
            "clustered, in the same order")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict (added to clusters.json) or None, got {type(extra).__name__}")
    json.dumps(extra, default=_json_value)  # an extra JSON cannot hold fails before any file is written
    os.makedirs(out_dir, exist_ok=True)
    names = result.images or [_image_name(x, i) for i, x in enumerate(images)]
    clusters = []
    for c, idx in enumerate(result.clusters()):
        sheet_name = f"cluster_{c:02d}.png"
        maps = None
        if result.part_maps is not None:
            maps = [result.part_maps[i, result.parts_used[i][0]] if len(result.parts_used[i]) else None
                    for i in idx]
        if len(idx):
            contact_sheet([images[i] for i in idx], maps, title=f"cluster {c}: {len(idx)} images",
                          thumb=thumb).save(os.path.join(out_dir, sheet_name))
        else:
            sheet_name = None
        clusters.append({"cluster": c, "size": int(len(idx)), "sheet": sheet_name,
                         "images": [names[i] for i in idx]})
    doc = {
        "n_clusters": result.n_clusters,
        "method": result.method,
        "assign": result.assign if result.method == "fcn" else None,
        "n_parts": None if result.parts is None else int(result.parts.shape[0]),
        "lam": result.lam,
        "mu": result.mu,
        "params": {k: v for k, v in result.params.items() if isinstance(v, (int, float, str, type(None)))},
        "clusters": clusters,
        "images": [
            {"image": names[i], "cluster": int(result.labels[i]),
             "code": [round(float(v), 6) for v in result.codes[i]] if result.method == "fcn" else None,
             "parts_used": [int(j) for j in result.parts_used[i]]}
            for i in range(len(names))
        ],
    }
    if extra:
        doc.update(extra)
    path = os.path.join(out_dir, "clusters.json")
    text = json.dumps(doc, indent=1, default=_json_value)  # before the file is opened
    with open(path, "w") as f:
        f.write(text)
    return path


def _json_value(value):
    """numpy scalars and arrays (in ``extra``) as JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} {value!r:.60} in write_clusters' extra cannot be "
                    "written to JSON: give numbers, strings, lists or dicts")


# ---------------------------------------------------------------------------------------------
# command line: dffkit cluster IMAGES... -n N [--model M.onnx] [--out DIR]
# ---------------------------------------------------------------------------------------------

def _add_arguments(parser):
    from dffkit.cli import positive_int

    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, or directories of images")
    parser.add_argument("-n", "--n-clusters", type=int, required=True, help="number of clusters")
    parser.add_argument("--model", default=None,
                        help="ONNX model for the activations (default: the built-in filter bank)")
    parser.add_argument("--layer", default=None, help="layer of --model (default: its last conv)")
    parser.add_argument("--out", default="clusters", help="output directory (default: ./clusters)")
    parser.add_argument("--parts", type=int, default=None,
                        help="number of parts, layer 1 rank (default: 3 x clusters)")
    parser.add_argument("--method", choices=_METHODS, default="fcn")
    parser.add_argument("--assign", choices=_ASSIGN, default="kmeans")
    parser.add_argument("--lam-rel", type=float, default=DEFAULT_LAM_REL,
                        help=f"relative group penalty (default {DEFAULT_LAM_REL})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=positive_int("GSNMF restarts"), default=4,
                        help="GSNMF restarts, the lowest objective wins (default 4)")
    parser.add_argument("--max-iter", type=int, default=300,
                        help="iterations of each GSNMF restart at most (default 300)")
    parser.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (features, GSNMF restarts) on stderr")
    parser.add_argument("--thumb", type=positive_int("pixels"), default=128,
                        help="thumbnail size in the sheets, in pixels (default 128)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write parts.onnx: the network + 100 W updates, mapping "
                             "resized uint8 RGB images (N, H, W, 3) to their part maps, codes and "
                             "clusters (needs --method fcn)")


def _run(args):
    from dffkit.cli import prepare_output_dir

    if args.onnx and args.method != "fcn":  # before any work: the baseline has no parts
        raise ValueError(f"--onnx needs --method fcn (the parts model); --method {args.method} "
                         "learns no parts: drop --onnx or use --method fcn")
    _check_thumb(args.thumb)
    paths = _expand_images(args.images)
    if args.n_clusters < 1 or args.n_clusters > len(paths):
        raise ValueError(f"-n must be between 1 and the number of images ({len(paths)})")
    prepare_output_dir(args.out)  # before the work: a file there, or no right to write, fails now
    extractor = None if args.model is None else args.model
    result = cluster_images(paths, args.n_clusters, extractor=extractor, layer=args.layer,
                            n_parts=args.parts, method=args.method, assign=args.assign,
                            lam_rel=args.lam_rel, random_state=args.seed, backend=args.backend,
                            n_init=args.n_init, max_iter=args.max_iter,
                            progress=None if args.quiet else True)
    path = write_clusters(result, paths, args.out, thumb=args.thumb,
                          extra={"model": args.model or "filterbank", "layer": args.layer})
    if args.onnx:
        from dffkit.export_onnx import export_parts_model

        fx = _make_extractor(extractor, args.layer)
        onnx_path = os.path.join(args.out, "parts.onnx")
        export_parts_model(fx, result, 100, onnx_path)
        print(f"wrote {onnx_path}")
    for c, idx in enumerate(result.clusters()):
        print(f"cluster {c}: {len(idx)} images")
    print(f"wrote {path}")
    return 0


CLI = {
    "cluster": (
        _add_arguments,
        _run,
        "cluster images by the parts their CNN activations hold (group-sparse NMF, FCN)",
    )
}
