"""Deep Feature Factorization (Collins, Achanta and Süsstrunk, ECCV 2018).

The activations of one CNN layer for a set of images are stacked into one non-negative
matrix X (positions x channels, N·h·w x C) and factorized, X ≈ W H, with rank k. Row j of H
is concept j's embedding (C values); column j of W, reshaped to each image's h x w grid and
upsampled bilinearly to the image's size, is where concept j appears in that image.

``dff(images, k)`` runs the whole path (features, factorization, heat maps, labels) and
returns a :class:`DFFResult`; ``CLI`` holds the ``dffkit dff`` and ``dffkit demo`` commands.

Heat-map conventions (one place, so that every consumer agrees):

- ``strength[i, j]``: the maximum of concept j's upsampled map in image i relative to
  concept j's largest maximum over the images factorized together (joint mode: all images;
  per-image mode: the image itself, so 1 wherever the map is not 0);
- presence: concept j is **present** in image i when ``strength[i, j] > 0`` and
  ``strength[i, j] >= threshold`` (the labels' background threshold, default 0.2); else it
  is absent (``DFFResult.present``). An absent concept cannot label any pixel of the image,
  since a pixel's relative heat is at most its map's strength;
- ``heatmaps[i][j]``: concept j in image i at the image's size, divided by its own maximum,
  so a present concept's map peaks at exactly 1.0; an absent concept's map is all 0;
  ``heatmaps[i][j] * strength[i, j]`` compares one concept across images;
- ``labels[i]``: argmax over j of ``heatmaps[i][j] * strength[i, j]``, -1 where that maximum
  is below ``threshold`` (``assign="argmax"``);
- ``masks``, ``boxes`` and ``summary()``'s boxes cover a concept's region only in the images
  where it is present (empty masks, None boxes elsewhere).
"""
from __future__ import annotations

import functools
import itertools
import json
import math
from collections import OrderedDict, abc
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dffkit import _backends
from dffkit.cli import positive_int, prepare_output_dir
from dffkit.images import IMAGE_SUFFIXES as _IMAGE_SUFFIXES
from dffkit.images import _expand_images, _image_index

__all__ = [
    "dff",
    "DFFResult",
    "bilinear_matrix",
    "upsample",
    "connected_components",
    "largest_component",
    "mask_box",
    "sample_images",
    "CLI",
]

_MODES = ("joint", "per_image")
_NEGATIVES = ("error", "clip", "shift")
_ASSIGN = ("argmax", "kmeans")


# ---------------------------------------------------------------------------------------------
# bilinear upsampling, connected components
# ---------------------------------------------------------------------------------------------

def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) float32 R with ``R @ v`` = v resampled bilinearly to n_out samples.

    Pixel centres are aligned (``align_corners=False`` in PyTorch, OpenCV's and Pillow's
    convention without antialiasing); samples beyond the outer centres repeat the edge.
    The array is shared between calls (read-only). ``n_out`` and ``n_in`` are positive ints
    (TypeError / ValueError otherwise).
    """
    return _bilinear_matrix(_positive_count("n_out", n_out), _positive_count("n_in", n_in))


def _positive_count(name: str, value, what: str = "samples") -> int:
    """``value`` as a positive int (numpy ints too, bools not), else TypeError / ValueError
    naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int (a number of {what}), got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (a number of {what}, at least 1), got {value}")
    return int(value)


def _source_taps(n_out: int, n_in: int):
    """For each output sample: its two input samples (i0, i1, int64) and the weight t of i1
    (float64), pixel centres aligned, clamped at the edges."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    i0, i1, t = _source_taps(n_out, n_in)
    R = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(R, (rows, i0), 1.0 - t)
    np.add.at(R, (rows, i1), t)
    R = R.astype(np.float32)
    R.setflags(write=False)
    return R


@functools.lru_cache(maxsize=64)
def bilinear_taps(n_out: int, n_in: int):
    """The two taps of each row of ``bilinear_matrix(n_out, n_in)``: (i0, i1) int64 and their
    weights (w0, w1) float32, each of length n_out (at the clipped edges w0 = 1, w1 = 0)."""
    R = _bilinear_matrix(int(n_out), int(n_in))
    i0, i1, _ = _source_taps(int(n_out), int(n_in))
    rows = np.arange(n_out)
    w0 = R[rows, i0].copy()
    w1 = np.where(i1 != i0, R[rows, i1], np.float32(0)).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


def upsample(maps, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of (k, h, w) maps (numpy, h, w >= 1) to (k, H, W) float32; ``size``
    is (H, W), a pair of positive ints. TypeError / ValueError naming the argument otherwise."""
    a = np.asarray(maps, dtype=np.float32)
    if a.ndim != 3:
        hint = "; for one (h, w) map pass maps[None]" if a.ndim == 2 else ""
        raise ValueError(f"maps must be a 3-D array (k, h, w), got shape {a.shape}{hint}")
    if a.shape[1] < 1 or a.shape[2] < 1:
        raise ValueError(f"maps must have at least one row and column (k, h, w with h, w >= 1), got shape {a.shape}")
    try:
        H, W = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be a (height, width) pair of positive ints, got {size!r}") from None
    size = (_positive_count("size[0] (height)", H, "pixels"), _positive_count("size[1] (width)", W, "pixels"))
    return np.ascontiguousarray(_upsampled(_NumpyOps(), a[None], size)[0])


def _upsampled(ops, A, size):
    """(n, k, h, w) maps of ``ops``' library -> (n, k, H, W), bilinear."""
    (H, W), (h, w) = size, A.shape[2:]
    if isinstance(ops, _NumpyOps):
        return ops.resample(A, H, W)
    Ry = ops.asarray(bilinear_matrix(H, h))
    RxT = ops.asarray(np.ascontiguousarray(bilinear_matrix(W, w).T))
    return ops.upsample(A, Ry, RxT)


def _presence(strength, threshold) -> np.ndarray:
    """(N, k) bool: concept j is present in image i when ``strength[i, j]`` is positive and at
    least ``threshold``, the labels' background threshold (compared in float32, as the labels
    compare). Below it no pixel of image i can be labelled j (a pixel's relative heat is at
    most its map's strength), so the concept has no region there: its heat map is 0, its
    masks empty and its boxes None."""
    s = np.asarray(strength, dtype=np.float32)
    return (s > 0) & (s >= np.float32(threshold))


def _divisors(peaks, present) -> np.ndarray:
    """What ``heat`` divides each upsampled map by: its peak (float32, the maximum of the map
    itself, so the peak's pixel becomes exactly 1), infinity where the concept is absent (its
    map becomes 0)."""
    peaks = np.asarray(peaks, dtype=np.float32)
    return np.where(np.asarray(present, dtype=bool) & (peaks > 0), peaks, np.float32(np.inf)).astype(np.float32)


def connected_components(mask, connectivity: int = 8):
    """Label the connected regions of a boolean (H, W) mask.

    Returns (labels, n): labels (H, W) int32 with 0 for background and 1..n for the
    components, numbered in raster order of their first pixel. Runs of each row are joined
    to the runs of the row above that touch them (union-find over runs), so the cost grows
    with the number of runs, not of pixels.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    H, W = mask.shape
    padded = np.zeros((H, W + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    r_start, c_start = np.nonzero(d == 1)
    _, c_end = np.nonzero(d == -1)  # exclusive ends; both come out in (row, column) order
    n_runs = len(r_start)
    labels = np.zeros((H, W), dtype=np.int32)
    if n_runs == 0:
        return labels, 0
    parent = list(range(n_runs))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    reach = 1 if connectivity == 8 else 0
    row_first = np.searchsorted(r_start, np.arange(H + 1))
    for r in range(1, H):
        a0, a1 = row_first[r - 1], row_first[r]
        b0, b1 = row_first[r], row_first[r + 1]
        if a0 == a1 or b0 == b1:
            continue
        j = a0
        for i in range(b0, b1):
            s, e = c_start[i], c_end[i]
            while j < a1 and c_end[j] + reach <= s:  # runs above that end before this one
                j += 1
            jj = j
            while jj < a1 and c_start[jj] < e + reach:
                ra, rb = find(i), find(jj)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
                jj += 1
    roots = np.array([find(i) for i in range(n_runs)])
    _, comp = np.unique(roots, return_inverse=True)  # roots are run indices: raster order
    for i in range(n_runs):
        labels[r_start[i], c_start[i]:c_end[i]] = comp[i] + 1
    return labels, int(comp.max()) + 1


def largest_component(mask, connectivity: int = 8) -> np.ndarray:
    """The largest connected region of a boolean mask (the first in raster order on ties)."""
    labels, n = connected_components(mask, connectivity)
    if n == 0:
        return np.zeros_like(labels, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    return labels == int(np.argmax(areas))


def mask_box(mask) -> Optional[Tuple[int, int, int, int]]:
    """Bounding box (x0, y0, x1, y1) of a boolean (H, W) mask, in pixels, x1 and y1
    exclusive; None for an empty mask. ValueError for a mask that is not 2-D."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array, got shape {mask.shape}; pass one image's mask")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# ---------------------------------------------------------------------------------------------
# array back ends for the heat maps: numpy on the host; CuPy or PyTorch on a GPU
# ---------------------------------------------------------------------------------------------

class _ArrayOps:
    """The few array operations the pipeline needs, written for the numpy API (CuPy runs
    them as they are); ``_NumpyOps`` has faster host versions of the map steps and
    ``_TorchOps`` maps them onto PyTorch."""

    name = "numpy"
    xp = np

    def asarray(self, a):
        return self.xp.asarray(a)

    def amax(self, a, axis):
        return a.max(axis=axis)

    def argmax(self, a, axis):
        return a.argmax(axis=axis)

    def rows_to_maps(self, W, n, h, w):
        """(n·h·w, k) rows of W -> (n, k, h, w) float32, contiguous."""
        return self.xp.ascontiguousarray(W.reshape(n, h, w, W.shape[1]).transpose(0, 3, 1, 2), dtype=self.xp.float32)

    def matrix(self, acts):
        """(N, C, h, w) -> (N·h·w, C) float32, C-contiguous."""
        return self.xp.ascontiguousarray(acts.transpose(0, 2, 3, 1).reshape(-1, acts.shape[1]), dtype=self.xp.float32)

    def upsample(self, A, Ry, RxT):
        """(n, k, h, w) maps -> (n, k, H, W): Ry @ A @ RxT for every map, as two plain
        matrix products (numpy's broadcasting matmul does not reach BLAS here)."""
        n, k, h, w = A.shape
        P = (A.reshape(-1, w) @ RxT).reshape(n * k, h, RxT.shape[1])
        Q = self.xp.tensordot(Ry, P, axes=([1], [1]))  # (H, n·k, W)
        return Q.transpose(1, 0, 2).reshape(n, k, Ry.shape[0], RxT.shape[1])

    def concat(self, parts):
        return self.xp.concatenate(parts, axis=0)

    def stack(self, parts):
        return self.xp.stack([self.asarray(p) for p in parts])

    def channel_min(self, X):
        return X.min(axis=0)

    def clip(self, X, lo, hi=None):
        return self.xp.clip(X, lo, hi)

    def labels(self, rel, threshold):
        """(n, k, H, W) relative heat -> (n, H, W) int16: argmax over k, -1 below threshold."""
        lab = self.argmax(rel, 1).astype(self.xp.int16)
        lab[self.amax(rel, 1) < threshold] = -1
        return lab

    def norm(self, X) -> float:
        """Frobenius norm."""
        return float(self.xp.linalg.norm(X))

    def all_finite(self, a) -> bool:
        """Whether every value of ``a`` is finite (no NaN, no infinity)."""
        return bool(self.xp.isfinite(a).all())

    def heat(self, U, divisors):
        """(n, k, H, W) upsampled maps divided by ``divisors`` (n, k) float32 (``_divisors``:
        their peaks, infinity for absent concepts), clipped to [0, 1]. A division, not a
        product with 1 / peak: the peak's pixel comes out exactly 1 (peak * float32(1 / peak)
        is 1 - 2**-24 for some peaks)."""
        return self.clip(U / self.asarray(divisors)[:, :, None, None], 0.0, 1.0)

    def labels_of(self, heat, strength, threshold):
        """Labels of ``heat`` weighted by ``strength`` (n, k): ``labels(heat * strength)``."""
        return self.labels(heat * self.asarray(strength)[:, :, None, None], threshold)

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous array of this library (numpy dtype)."""
        return self.xp.empty(shape, dtype=dtype)

    def device(self) -> int:
        """The current device of this library (0 on the host)."""
        return 0

    def synchronize(self) -> None:
        """Wait for the work queued on this library's current stream (nothing on the host)."""

    def map_kernels(self):
        """What runs ``_maps``' peaks and heat steps on this library's arrays as two kernels
        (an object with ``dff_maps`` and ``copy_to_host``, the contracts of
        ``dffkit._cuda_backend``'s), or None for the array steps above."""
        return None

    def pinned_empty(self, shape, dtype) -> Optional[np.ndarray]:
        """An uninitialised numpy array in pinned (page-locked) host memory from this library's
        pool, or None where the library has none."""
        return None


class _NumpyOps(_ArrayOps):
    """The host: the map steps work plane by plane in place, on contiguous (H, W) planes
    (for photographs of several megapixels the batched, strided versions spent most of
    their time in temporaries and in numpy's argmax over the concept axis)."""

    def norm(self, X) -> float:
        """Frobenius norm in float64, a million elements at a time, without BLAS (numpy's
        norm is a BLAS dot, which OpenBLAS may run on its threads: see ``resample``)."""
        flat = np.asarray(X).reshape(-1)
        step = 1 << 20
        return float(np.sqrt(sum(float(np.square(flat[i:i + step], dtype=np.float64).sum())
                                 for i in range(0, flat.size, step))))

    def resample(self, A, H, W):
        """(n, k, h, w) -> contiguous (n, k, H, W) with the CPU engine's separable resampler
        (two taps a sample and axis; no BLAS call, whose worker threads would go on spinning on
        the cores the next image's CNN wants: one-image VGG-16 DFF took 113 ms instead of 67
        on 2 cores)."""
        n, k, h, w = A.shape
        planes = np.ascontiguousarray(A, dtype=np.float32).reshape(n * k, h, w)
        out = _backends.cpu().resample_bilinear(planes, H, W, *bilinear_taps(H, h), *bilinear_taps(W, w))
        return out.reshape(n, k, H, W)

    def all_finite(self, a) -> bool:
        return bool(np.isfinite(a).all())

    def heat(self, U, divisors):
        """In place: U is this pipeline's own array (``resample``'s). Division costs what the
        product costs here (memory-bound)."""
        np.divide(U, np.asarray(divisors, np.float32)[:, :, None, None], out=U)
        return np.clip(U, 0.0, 1.0, out=U)

    def labels_of(self, heat, strength, threshold):
        """The same labels as ``labels(heat * strength)`` (the same float32 products, ties to
        the first concept), one (H, W) plane at a time."""
        n, k, H, W = heat.shape
        strength = np.asarray(strength, np.float32)
        lab = np.zeros((n, H, W), np.int16)
        best = np.empty((H, W), np.float32)
        value = np.empty((H, W), np.float32)
        for t in range(n):
            np.multiply(heat[t, 0], strength[t, 0], out=best)
            for j in range(1, k):
                np.multiply(heat[t, j], strength[t, j], out=value)
                better = value > best
                lab[t][better] = j
                np.maximum(best, value, out=best)
            lab[t][best < threshold] = -1
        return lab


class _CupyOps(_ArrayOps):
    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy

    def device(self) -> int:
        return int(self.xp.cuda.runtime.getDevice())

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def map_kernels(self):
        return _device_map_kernels()

    def pinned_empty(self, shape, dtype):
        import cupyx

        return cupyx.empty_pinned(tuple(shape), dtype=np.dtype(dtype))


class _TorchOps(_ArrayOps):
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def asarray(self, a):
        if isinstance(a, self.torch.Tensor):
            return a
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(a).cuda()
        return self.torch.from_dlpack(a) if hasattr(a, "__dlpack__") else self.torch.as_tensor(a, device="cuda")

    def amax(self, a, axis):
        return a.amax(dim=axis)

    def argmax(self, a, axis):
        return a.argmax(dim=axis)

    def rows_to_maps(self, W, n, h, w):
        return W.reshape(n, h, w, W.shape[1]).permute(0, 3, 1, 2).contiguous().float()

    def matrix(self, acts):
        return acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).contiguous().float()

    def upsample(self, A, Ry, RxT):
        return (Ry @ A) @ RxT

    def concat(self, parts):
        return self.torch.cat(parts, dim=0)

    def stack(self, parts):
        return self.torch.stack([self.asarray(p) for p in parts])

    def channel_min(self, X):
        return X.amin(dim=0)

    def clip(self, X, lo, hi=None):
        return X.clamp(lo, hi)

    def labels(self, rel, threshold):
        lab = rel.argmax(dim=1).to(self.torch.int16)
        lab[rel.amax(dim=1) < threshold] = -1
        return lab

    def norm(self, X) -> float:
        return float(X.norm())

    def all_finite(self, a) -> bool:
        return bool(self.torch.isfinite(a).all())

    def empty(self, shape, dtype):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, np.dtype(dtype).name), device="cuda")

    def device(self) -> int:
        return int(self.torch.cuda.current_device())

    def synchronize(self) -> None:
        self.torch.cuda.current_stream().synchronize()

    def map_kernels(self):
        return _device_map_kernels()

    def pinned_empty(self, shape, dtype):
        # the array keeps the tensor (and so the pinned block) alive: numpy() sets it as its base
        t = self.torch.empty(tuple(shape), dtype=getattr(self.torch, np.dtype(dtype).name), pin_memory=True)
        return t.numpy()


def _device_map_kernels():
    """``dffkit._cuda_backend`` when the loaded CUDA module has DFF's map kernels
    (cuda/dff_maps.cu), else None: a module built before them keeps the array steps."""
    try:
        cuda = _backends.cuda()
    except (ImportError, RuntimeError):
        return None
    if not (hasattr(cuda, "dff_map_peaks") and hasattr(cuda, "dff_heat_labels")):
        return None
    from dffkit import _cuda_backend

    return _cuda_backend


def _device_ops(extractor, backend):
    """The GPU array library to keep activations on the device, or None for the host path.

    The device path needs the CUDA NMF, an extractor running on CUDA, and CuPy or PyTorch
    to reshape and upsample on the GPU; anything missing means the host path.
    """
    if backend == "cpu" or extractor is None:
        return None
    from dffkit import _backends

    if "cuda" not in _backends.available_backends():
        return None
    if "cuda" not in str(getattr(extractor, "provider", "")).lower():
        return None
    return _first_array_library()


def _array_libraries() -> tuple:
    """The GPU array libraries in the order tried: CuPy, then PyTorch;
    ``DFFKIT_DEVICE_ARRAYS=torch`` puts PyTorch first (``cupy``: the default order)."""
    choice = os.environ.get("DFFKIT_DEVICE_ARRAYS", "").strip().lower()
    if choice not in ("", "cupy", "torch"):
        raise ValueError(f"DFFKIT_DEVICE_ARRAYS must be 'cupy' or 'torch', got {choice!r}")
    return (_TorchOps, _CupyOps) if choice == "torch" else (_CupyOps, _TorchOps)


def _first_array_library():
    """An instance of the first GPU array library of ``_array_libraries()`` that imports."""
    for ops in _array_libraries():
        try:
            return ops()
        except ImportError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------

class DFFResult:
    """What :func:`dff` found in a set of images.

    Attributes
    ----------
    heatmaps : list of N float32 arrays (k, H_i, W_i) in [0, 1]
        Concept j in image i at the image's original size, each map divided by its maximum
        (so exactly 1.0 at its peak) where the concept is present; all 0 where it is absent
        (see ``present``). Host memory. With ``dff(..., keep_maps=False)`` a sequence that
        computes an image's maps when read.
    strength : (N, k) float32
        Maximum of concept j in image i relative to its largest maximum over the images
        factorized together (see the module notes); kept for absent concepts too.
    present : (N, k) bool (a property)
        Concept j is present in image i when ``0 < strength[i, j]`` and
        ``strength[i, j] >= threshold``, the labels' background threshold: below it no pixel
        of the image can carry the concept's label. Absent concepts have a zero heat map,
        empty masks and no box.
    labels : list of N int16 arrays (H_i, W_i)
        Concept per pixel, -1 for background (below ``threshold``); a sequence computed
        when read with ``keep_maps=False``.
    concepts : (k, C) float32, the rows of H (joint mode); (N, k, C) in per-image mode,
        where each image has concepts of its own.
    loadings : list of N float32 arrays (h_i, w_i, k), the rows of W on each image's
        feature grid.
    concept_names : list of k str (joint) or N lists of k str (per image)
        ImageNet classes when the model has a classifier head (``concept_classes`` holds
        the top five with probabilities); for the filter bank the colour of the concept's
        pixels; else "concept j".
    images : list of PIL RGB images (the originals) or None; image_sizes : list of (H, W);
    sources : list of str (paths, or descriptions of in-memory images)
    mode, assign, threshold, n_concepts : the settings used
    model_name, layer, provider, untrained : the feature extractor's
    backend : the NMF engine that ran; precision : its arithmetic ("fp32", "tf32", "bf16x" on
    CUDA; "fp32" or "fp64" on the CPU); n_iter : int (joint) or list (per image)
    reconstruction_error : ||X - W H||_F / ||X||_F (per image: a list)
    timings : seconds spent in "load", "extract", "factorize", "maps"
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)

    # ---- small helpers
    @property
    def n_images(self) -> int:
        return len(self.heatmaps)

    def _index(self, i) -> int:
        """Image index ``i`` as an int in 0..N-1: an int (numpy ints too) in -N..N-1, negative
        ones counting from the end as in a list; TypeError / IndexError naming it otherwise."""
        return _image_index(i, self.n_images)

    def _concept(self, concept) -> int:
        if isinstance(concept, bool) or not isinstance(concept, (int, np.integer)):
            raise TypeError(f"concept must be an int index, got {concept!r}")
        if not 0 <= concept < self.n_concepts:
            raise ValueError(f"concept must be in 0..{self.n_concepts - 1}, got {concept}")
        return int(concept)

    @property
    def present(self) -> np.ndarray:
        """(N, k) bool: whether concept j is present in image i, ``0 < strength[i, j]`` and
        ``strength[i, j] >= threshold`` (the rule of the module notes)."""
        return _presence(self.strength, self.threshold)

    def names_for(self, i: int) -> List[str]:
        """The concept names that apply to image i."""
        if self.mode == "per_image":
            return list(self.concept_names[i])
        return list(self.concept_names)

    # ---- co-segmentation and co-localization
    def masks(self, concept: int, threshold: float = 0.5) -> List[np.ndarray]:
        """Boolean (H_i, W_i) masks where concept's heat map is at least ``threshold``
        (each map is relative to its own maximum, so the concept's strongest region in every
        image where it is present; ``threshold=1.0`` keeps its peak); empty in the images
        where it is absent (``present``)."""
        j = self._concept(concept)
        threshold = _check_fraction("threshold", threshold)
        present = self.present[:, j]
        return [hm[j] >= threshold if present[i] else np.zeros(hm.shape[1:], bool)
                for i, hm in enumerate(self.heatmaps)]

    def boxes(self, concept: int, threshold: float = 0.5) -> List[Optional[Tuple[int, int, int, int]]]:
        """Per image, the box (x0, y0, x1, y1; x1, y1 exclusive) of the largest connected
        region of ``masks(concept, threshold)``, or None where the mask is empty (the concept
        is absent from the image)."""
        return [mask_box(largest_component(m)) for m in self.masks(concept, threshold)]

    def concept_consistency(self, min_area: float = 0.02) -> np.ndarray:
        """(k,) float: for each concept, the fraction of images in which it is present
        (``present``) and its label covers at least ``min_area`` of the pixels (how common
        the concept is across the set)."""
        _check_fraction("min_area", min_area)
        k = self.n_concepts
        present = self.present
        count = np.zeros(k)
        for i, lab in enumerate(self.labels):
            area = np.bincount(lab[lab >= 0].ravel().astype(np.int64), minlength=k)[:k] / max(lab.size, 1)
            count += (area >= max(min_area, 1e-12)) & present[i]
        return count / max(self.n_images, 1)

    # ---- pictures
    def overlay(self, i: int, *, opacity: float = 0.75, legend: bool = True):
        """Image i as a PIL image: the photo desaturated, each concept painted in its own
        colour with opacity by heat (relative across images, ``heatmaps * strength``), and a
        legend of concept names.

        ``i``: an int in 0..N-1, or -N..-1 from the end (TypeError / IndexError otherwise);
        ``opacity``: a number in [0, 1], the colours' opacity where the heat is 1 (TypeError /
        ValueError otherwise)."""
        from dffkit import visualize

        i = self._index(i)
        opacity = visualize._check_opacity(opacity)
        image = self._image(i)
        heat = self.heatmaps[i] * self.strength[i][:, None, None]
        names = [f"{j}: {n}" for j, n in enumerate(self.names_for(i))] if legend else None
        return visualize.overlay(image, heat, opacity=opacity, names=names,
                                 title=self._caption() if legend else None)

    def heatmap_image(self, i: int, concept: int, *, colormap: str = "viridis"):
        """Concept's heat map in image i through a colour map, over the desaturated photo
        (``i`` as in ``overlay``)."""
        from dffkit import visualize

        i, j = self._index(i), self._concept(concept)
        return visualize.heatmap_image(self.heatmaps[i][j], self._image(i), colormap=colormap)

    def grid(self, *, cell: int = 256, columns: Optional[int] = None, workers: Optional[int] = 1):
        """All overlays (without legends) tiled in one picture, with one legend below;
        the overlays drawn on ``workers`` threads (None: ``dffkit.images.default_workers()``).
        ``cell`` (pixels per tile) and ``columns`` (None: about the square root of N) are
        positive ints (TypeError / ValueError otherwise)."""
        from dffkit import visualize
        from dffkit.images import _check_workers, _ordered

        cell = visualize._check_positive_int("cell", cell, 256)  # before the overlays are drawn
        if columns is not None:
            columns = visualize._check_positive_int("columns", columns, 4)
        self._image(0)  # a result without its images says so before anything is drawn
        tiles = _ordered(lambda i: self.overlay(i, legend=False), [(i,) for i in range(self.n_images)],
                         _check_workers(workers))
        captions = [Path(s).name if os.sep in s or "." in s else s for s in self.sources]
        picture = visualize.grid(tiles, captions, cell=cell, columns=columns)
        if self.mode == "joint":
            names = [f"{j}: {n}" for j, n in enumerate(self.concept_names)]
            picture = visualize.add_legend(picture, names, title=self._caption())
        return picture

    def _image(self, i: int):
        if self.images is None:
            raise ValueError("this result keeps no images (dff(..., keep_images=False)); run dff with "
                             "keep_images=True for pictures")
        return self.images[self._index(i)]

    def _caption(self) -> str:
        what = f"{self.model_name} {self.layer}" if self.layer else str(self.model_name)
        if self.untrained:
            what += " (UNTRAINED random weights)"
        elif self.model_name == "filterbank":
            what += " (colour and texture)"
        return f"DFF k={self.n_concepts}, {self.mode}, {what}"

    # ---- records
    def summary(self) -> dict:
        """A JSON-ready description: settings, model, concept names, consistency, per-image
        strength, presence, label area and box (None where absent) of each concept, timings
        (``timings_s``).
        ImageNet classes of the concepts (``concept_classes``, models with a classifier head):
        in ``concepts[j]["classes"]`` in joint mode, in ``images[i]["concept_classes"]`` (one
        list of (class, probability) pairs per concept) in per-image mode; None elsewhere.
        Works without the images (``keep_images=False``)."""
        consistency = self.concept_consistency()
        present = self.present
        return {
            "method": "Deep Feature Factorization (Collins et al., ECCV 2018)",
            "n_images": self.n_images,
            "n_concepts": self.n_concepts,
            "mode": self.mode,
            "assign": self.assign,
            "threshold": self.threshold,
            "model": self.model_name,
            "layer": self.layer,
            "untrained": bool(self.untrained),
            "note": _model_note(self.model_name, self.untrained),
            "provider": self.provider,
            "backend": self.backend,
            "precision": getattr(self, "precision", None),
            "n_iter": self.n_iter,
            "reconstruction_error": self.reconstruction_error,
            "concepts": [
                {"index": j, "name": self.concept_names[j] if self.mode == "joint" else None,
                 "classes": (_json_classes([self.concept_classes[j]])[0]
                             if self.concept_classes and self.mode == "joint" else None),
                 "consistency": float(consistency[j])}
                for j in range(self.n_concepts)
            ],
            "images": [
                {"source": self.sources[i], "size": list(self.image_sizes[i]),
                 "feature_size": list(self.feature_sizes[i]),
                 "concept_names": self.names_for(i) if self.mode == "per_image" else None,
                 "concept_classes": (_json_classes(self.concept_classes[i])
                                     if self.concept_classes and self.mode == "per_image" else None),
                 "strength": [round(float(s), 4) for s in self.strength[i]],
                 "present": [bool(p) for p in present[i]],
                 "area": [round(float((self.labels[i] == j).mean()), 4) for j in range(self.n_concepts)],
                 "boxes": [mask_box(largest_component(self.heatmaps[i][j] >= 0.5)) if present[i, j] else None
                           for j in range(self.n_concepts)]}
                for i in range(self.n_images)
            ],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def save(self, directory, *, heatmaps: bool = True, workers: Optional[int] = None,
             progress=None) -> Dict[str, List[str]]:
        """Write the pictures and the summary into ``directory`` (created if needed):
        ``overlay_XXX_<name>.png`` per image (with legend), ``heatmaps/heat_XXX_<name>_cJ.png``
        per image and concept (XXX: the image's index, <name>: its file name without the
        extension, J: the concept; ``heatmaps=False``: none), ``grid.png`` (all images) and
        ``summary.json`` (``summary()``, plus "files": the written paths relative to
        ``directory``). Returns the written paths by kind ("overlays", "heatmaps", "grid",
        "summary"): the lists of "files", each path joined to ``directory``.

        A result without its images (``dff(..., keep_images=False)``) has no pictures to draw:
        only ``summary.json`` is written, with a warning. The places the files go are checked
        before anything is written: OSError when ``directory`` is a file, or a file stands
        where the ``heatmaps`` folder goes (a folder where ``grid.png`` or ``summary.json``
        goes).

        Images are drawn and encoded on ``workers`` threads (default: the image threads of
        ``dffkit.images.default_workers()``, at most 4: each holds a few full-size float
        copies of its photo); PNGs at zlib level 1 (for photographs 5x faster to write than
        Pillow's default 6, and about as small). ``progress``: None, True (a bar on stderr)
        or a callable(done, total) over images, called from the drawing threads."""
        from dffkit import visualize
        from dffkit.images import _check_workers, _ordered

        pictures = self.images is not None
        heatmaps = heatmaps and pictures
        workers = _check_workers(workers) if workers is not None else min(4, _check_workers(None))
        _check_output_places(directory, "directory", heatmaps=heatmaps)
        report = _progress_callback(progress, self.n_images if pictures else 0, label="pictures ")
        done, done_lock = [0], threading.Lock()

        out = prepare_output_dir(directory, option="directory", probe=False)
        written: Dict[str, List[str]] = {"overlays": [], "heatmaps": [], "grid": [], "summary": []}
        if not pictures:
            warnings.warn("this result keeps no images (dff(..., keep_images=False)): wrote summary.json only, "
                          "no overlays, heat maps or grid; run dff with keep_images=True for the pictures",
                          UserWarning, stacklevel=2)
            return self._write_summary(out, written)
        if heatmaps:
            (out / "heatmaps").mkdir(exist_ok=True)
        stems = _unique_stems(self.sources)

        def draw(i):
            path = out / f"overlay_{i:03d}_{stems[i]}.png"
            self.overlay(i).save(path, compress_level=PNG_LEVEL)
            paths = [str(path)]
            if heatmaps:
                base = visualize.desaturate(self._image(i))
                for j in range(self.n_concepts):
                    path = out / "heatmaps" / f"heat_{i:03d}_{stems[i]}_c{j}.png"
                    visualize.heatmap_over(self.heatmaps[i][j], base).save(path, compress_level=PNG_LEVEL)
                    paths.append(str(path))
            with done_lock:
                done[0] += 1
                report(done[0])
            return paths

        drawn = _ordered(draw, [(i,) for i in range(self.n_images)], workers)
        written["overlays"] = [paths[0] for paths in drawn]
        written["heatmaps"] = [p for paths in drawn for p in paths[1:]]
        path = out / "grid.png"
        self.grid(workers=workers).save(path, compress_level=PNG_LEVEL)
        written["grid"].append(str(path))
        return self._write_summary(out, written)

    def _write_summary(self, out: Path, written: Dict[str, List[str]]) -> Dict[str, List[str]]:
        """summary.json in ``out``, its "files" the paths of ``written`` and its own."""
        path = out / "summary.json"
        written["summary"] = [str(path)]
        summary = self.summary()
        summary["files"] = {k: [os.path.relpath(p, out) for p in v] for k, v in written.items()}
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return written

    def __repr__(self) -> str:
        return (f"DFFResult({self.n_images} images, k={self.n_concepts}, mode={self.mode!r}, "
                f"model={self.model_name!r}, layer={self.layer!r}, backend={self.backend!r}"
                + (", UNTRAINED" if self.untrained else "") + ")")


#: zlib level of the PNGs ``DFFResult.save`` writes (Pillow's default is 6)
PNG_LEVEL = 1


def _json_classes(rows) -> list:
    """Rows of (class, probability) pairs as JSON lists: [[[class, p], ...], ...]."""
    return [[[str(label), float(p)] for label, p in row] for row in rows]


def _check_output_places(directory, option: str = "--out", *, heatmaps: bool = True) -> None:
    """OSError naming ``option`` before any work or writing, when something stands where
    ``DFFResult.save`` puts its files in ``directory``: a file named ``heatmaps`` (with
    ``heatmaps``), a folder named ``grid.png`` or ``summary.json``. (``directory`` itself is
    checked by ``dffkit.cli.prepare_output_dir``.)"""
    out = Path(directory)
    if not out.is_dir():
        return
    if heatmaps and (out / "heatmaps").exists() and not (out / "heatmaps").is_dir():
        raise OSError(f"{option} {directory}: {out / 'heatmaps'} is a file, and the heat maps go into a folder of "
                      f"that name: move or delete the file, choose another {option}, or leave the heat maps out "
                      f"({'--no-heatmaps' if option == '--out' else 'heatmaps=False'})")
    for name in ("grid.png", "summary.json"):
        if (out / name).is_dir():
            raise OSError(f"{option} {directory}: {out / name} is a folder, and {name} is written there: move it "
                          f"or choose another {option}")


def _unique_stems(sources: Sequence[str]) -> List[str]:
    stems, seen = [], {}
    for s in sources:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(s).stem)[:40] or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def _model_note(model_name, untrained) -> str:
    if untrained:
        return ("the network has random, untrained weights: its concepts carry no meaning; bring a trained "
                "VGG-16 (dffkit.models.vgg16(weights='torchvision'), or --model vgg16.onnx)")
    if model_name == "filterbank":
        return ("the built-in filter bank sees colour and texture, not objects: concepts are regions of "
                "similar colour and texture; for semantic concepts bring a trained VGG-16 "
                "(dffkit.models.vgg16(weights='torchvision'), or --model vgg16.onnx)")
    return ""


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# concept names
# ---------------------------------------------------------------------------------------------

_COLOUR_NAMES = {
    "black": (20, 20, 20), "dark grey": (70, 70, 70), "grey": (128, 128, 128), "light grey": (190, 190, 190),
    "white": (245, 245, 245), "red": (200, 30, 30), "dark red": (110, 20, 20), "orange": (240, 140, 30),
    "brown": (120, 75, 40), "tan": (200, 170, 120), "yellow": (235, 220, 50), "olive": (120, 120, 40),
    "green": (50, 160, 50), "dark green": (25, 80, 30), "teal": (30, 130, 130), "cyan": (60, 200, 220),
    "sky blue": (130, 180, 230), "blue": (40, 70, 200), "navy": (20, 30, 90), "purple": (120, 50, 150),
    "pink": (235, 140, 180), "magenta": (210, 50, 170),
}


def colour_name(rgb) -> str:
    """The nearest of a few plain colour names to an RGB triple (distance in RGB)."""
    names = list(_COLOUR_NAMES)
    table = np.array([_COLOUR_NAMES[n] for n in names], dtype=np.float64)
    d = ((table - np.asarray(rgb, dtype=np.float64)[None]) ** 2).sum(axis=1)
    return names[int(np.argmin(d))]


def _colour_names(images, labels, k, per_image: bool):
    """Name each concept by the mean colour of its pixels (the filter bank's concepts are
    colour-and-texture regions)."""
    def name(pixels_sum, count):
        return f"{colour_name(pixels_sum / count)} region" if count else "absent"

    if images is None:
        return [[f"concept {j}" for j in range(k)] for _ in labels] if per_image else [f"concept {j}" for j in range(k)]
    sums, counts = np.zeros((len(labels), k, 3)), np.zeros((len(labels), k))
    for i, (img, lab) in enumerate(zip(images, labels)):
        a = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
        bins = lab.ravel().astype(np.intp)
        bins += 1  # background (-1) into bin 0
        for c in range(3):
            sums[i, :, c] = np.bincount(bins, weights=a[:, c], minlength=k + 1)[1:k + 1]
        counts[i] = np.bincount(bins, minlength=k + 1)[1:k + 1]
    if per_image:
        return [_distinct([name(sums[i, j], counts[i, j]) for j in range(k)]) for i in range(len(labels))]
    return _distinct([name(sums[:, j].sum(0), counts[:, j].sum()) for j in range(k)])


def _distinct(names: List[str]) -> List[str]:
    """Names told apart where several concepts got the same one: the second "grey region"
    becomes "grey region 2", and so on ("absent" stays as it is)."""
    seen: Dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 or n == "absent" else f"{n} {seen[n]}")
    return out


def _classifier_head(extractor):
    """The extractor's ``classifier_head()`` (dffkit.models.ClassifierHead) when its model is
    a VGG-16 with the fully connected layers and the layer is conv5_3 after its ReLU, the
    tensor the head reads; else None."""
    model = getattr(extractor, "model", None)
    if model is None or not hasattr(model, "graph") or not hasattr(extractor, "classifier_head"):
        return None
    from dffkit import models

    layers = models.vgg16_layers(model)
    if not layers or getattr(extractor, "layer", None) != layers.get("relu5_3"):
        return None
    return extractor.classifier_head()


def _class_names(head, H, W_peak, top: int = 5):
    """Top ImageNet classes of each concept: the embedding is scaled to the activation at the
    concept's strongest position (W's maximum times the row of H) and read as a constant
    conv5_3 map through the fully connected layers."""
    if head is None or H.shape[-1] != head.channels:
        return None
    emb = H * W_peak[:, None]
    return [[(label, round(p, 4)) for label, p in row] for row in head.top(emb, top)]


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------

def _resolve_extractor(extractor, layer, backend):
    """A FeatureExtractor from None (the filter bank), a name or path, or the caller's."""
    from dffkit import features

    if extractor is None:
        extractor = "filterbank"
    if isinstance(extractor, (str, os.PathLike)) or hasattr(extractor, "graph"):
        providers = "cpu" if backend == "cpu" else "auto"
        return features.FeatureExtractor(extractor, layer, providers=providers)
    if layer is not None and layer != getattr(extractor, "layer", layer):
        raise ValueError(
            f"layer={layer!r} was given with an extractor built for layer {extractor.layer!r}; "
            "build the extractor with that layer instead"
        )
    if not callable(extractor):
        raise TypeError(f"extractor must be a FeatureExtractor, a model name or an ONNX path, got {type(extractor).__name__}")
    return extractor


def _check_init(init) -> None:
    """``init`` one of the NMF's starts that dff can use (not "custom": dff takes no W, H)."""
    from dffkit.nmf import _INITS

    allowed = tuple(i for i in _INITS if i != "custom")
    if init is not None and not (isinstance(init, str) and init in allowed):
        extra = (" (dff computes its own start and takes no W or H; to start from factors of your own, "
                 "factorize the activations with dffkit.non_negative_factorization(X, init='custom', W=..., H=...))"
                 if init == "custom" else "")
        raise ValueError(f"init must be one of {', '.join(repr(i) for i in allowed)} or None, got {init!r}{extra}")


def _check_k(n_concepts):
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, (int, np.integer)):
        raise TypeError(f"n_concepts must be an int, got {n_concepts!r} of type {type(n_concepts).__name__}")
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be at least 1, got {n_concepts}")
    return int(n_concepts)


def _check_progress(progress):
    """progress as the callers take it: None or False (silent), True (a bar on stderr) or a
    callable(done, total); TypeError for anything else (0, "yes", a file)."""
    if progress is None or isinstance(progress, (bool, np.bool_)) or callable(progress):
        return progress
    raise TypeError(
        f"progress must be None or False (silent), True (a bar on stderr) or a callable "
        f"(done, total), got {type(progress).__name__} {progress!r:.60}")


def _progress_callback(progress, total, label: str = "", unit: str = "images"):
    """A callable(done) reporting to ``progress`` (see _check_progress): nothing, a one-line
    bar on stderr counting ``unit``, or the caller's callable(done, total)."""
    _check_progress(progress)
    if progress is None or not progress:
        return lambda done: None
    if callable(progress) and not isinstance(progress, (bool, np.bool_)):
        return lambda done: progress(done, total)
    return _TextProgress(total, unit, label=label)


class _TextProgress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, unit: str, width: int = 30, stream=None, label: str = ""):
        self.total, self.unit, self.width, self.label = total, unit, width, label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def __call__(self, done: int) -> None:
        frac = done / self.total if self.total else 1.0
        bar = "#" * int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        rate = f" {done / elapsed:.1f} {self.unit}/s" if done and elapsed > 0 else ""
        end = "\n" if done >= self.total else ""
        self.stream.write(f"\r{self.label}[{bar:<{self.width}}] {done}/{self.total} {self.unit}{rate}{end}")
        self.stream.flush()


def _split_activations(acts) -> list:
    """Activations as a list of per-image (C, h, w) arrays or one (N, C, h, w) array kept
    whole (host or device). Lists from extractors that handle images of different sizes are
    flattened."""
    if isinstance(acts, (list, tuple)):
        out = []
        for a in acts:
            shape = tuple(a.shape)
            if len(shape) == 4:
                out.extend(a[i] for i in range(shape[0]))
            elif len(shape) == 3:
                out.append(a)
            else:
                raise ValueError(f"activations must be (C, h, w) per image or (N, C, h, w), got shape {shape}")
        return out
    shape = tuple(acts.shape)
    if len(shape) != 4:
        raise ValueError(f"activations must be a 4-D array (N, C, h, w), got shape {shape}")
    return [acts[i] for i in range(shape[0])]


def _describe_source(item, i) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fsdecode(item)
    for attr in ("filename", "name"):  # a PIL image read from a file; a file object
        name = getattr(item, attr, None)
        if isinstance(name, str) and name and not isinstance(item, np.ndarray):
            return name
    return f"image_{i}"


def _image_items(images) -> list:
    """``images`` as a new list of single images, their paths kept for ``sources``: one path
    (str or os.PathLike) is one image, a folder (alone or in a list) its image files in name
    order, an iterator is read once, a 4-D array is N images."""
    from dffkit.images import as_image_list

    items = []
    for item in as_image_list(images):
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            items.extend(_expand_images([os.fsdecode(item)]))
        else:
            items.append(item)
    return items


def _value_range(ops, X) -> Tuple[float, bool, Optional[float]]:
    """(minimum, every value finite, sum of squares or None) of X in one trip to the host: on a
    GPU the CUDA engine's own one-pass check where X is a device array it reads (the sum of
    squares comes with it), else both reductions on X's device and one copy of their two
    values (a NaN minimum is read as non-finite; no sum of squares)."""
    if isinstance(ops, _NumpyOps):
        return float(np.min(X)), bool(np.isfinite(X).all()), None
    from dffkit import _backends

    if "cuda" in _backends.available_backends():
        from dffkit import _cuda_backend

        if _cuda_backend.is_device_array(X):
            lo, nonfinite, sum_sq = _cuda_backend.value_stats(X)
            return lo, not nonfinite, sum_sq
    if ops.name == "torch":
        t = ops.torch
        both = t.stack([X.amin().double(), t.isfinite(X).all().double()])
    else:
        xp = ops.xp
        both = xp.stack([X.min().astype(xp.float64), xp.isfinite(X).all().astype(xp.float64)])
    lo, finite = (float(v) for v in _host(both))
    return lo, bool(finite) and lo == lo, None


def _checked_range(ops, X, per, sources, what: str,
                   images: Optional[Sequence[int]] = None) -> Tuple[float, Optional[float]]:
    """(minimum, sum of squares or None) of X, the matrix built from the activations ``per[i]``
    of the images i in ``images`` (all by default), in one pass over it (``_value_range``);
    ValueError naming the images whose activations hold NaN or infinity."""
    lo, finite, sum_sq = _value_range(ops, X)
    if not finite:
        _check_finite(ops, per, sources, what, images)
        raise ValueError(f"{what} hold NaN or infinite values: DFF needs finite activations")  # not reached
    return lo, sum_sq


def _checked_min(ops, X, per, sources, what: str, images: Optional[Sequence[int]] = None) -> float:
    """The minimum of ``_checked_range``."""
    return _checked_range(ops, X, per, sources, what, images)[0]


def _check_finite(ops, per, sources, what: str, images: Optional[Sequence[int]] = None) -> None:
    """ValueError naming the images (of ``images``, all by default) whose activations hold NaN
    or infinity (image by image: called once the one-pass check has found some)."""
    bad = [i for i in (range(len(per)) if images is None else images) if not ops.all_finite(per[i])]
    if not bad:
        return
    shown = ", ".join(f"{i} ({sources[i]})" for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ValueError(
        f"{what} hold NaN or infinite values, in image{'s' if len(bad) > 1 else ''} {shown}: DFF needs finite "
        "activations (negatives='clip' or 'shift' do not repair them); check the model and the layer, or the "
        "array, and replace those values"
    )


def dff(images, n_concepts: int, *, extractor=None, layer: Optional[str] = None, mode: str = "joint",
        backend: str = "auto", precision: str = "fp32", max_iter: int = 200, tol: float = 1e-4, random_state=0,
        init: str = "random", negatives: str = "error", assign: str = "argmax", threshold: float = 0.2, activations=None,
        keep_images: bool = True, name_concepts: bool = True, progress=None, keep_maps=True) -> DFFResult:
    """Deep Feature Factorization of a set of images.

    Parameters
    ----------
    images : path, PIL image, uint8 array (H, W, 3), encoded bytes, a sequence or iterator of
        them (a 1-D numpy array of paths, e.g. ``df.path.values``, too), or a folder
        Read with ``dffkit.images.load_images`` (EXIF orientation applied, any mode to RGB).
        Heat maps come back at each image's original size. ``sources`` keeps the paths (a
        folder, alone or in a list, stands for its image files in name order); in-memory
        images are named ``image_<i>`` (a PIL image opened from a file keeps its file name).
    n_concepts : int
        k, the number of concepts (rank of the factorization), 1 <= k <= number of positions
        (N·h·w jointly, h·w per image). A k above the number of channels C is allowed with a
        warning: no more than C concepts can be told apart, and the solver slows down.
    extractor : FeatureExtractor, model name ("filterbank", "vgg16"), ONNX path or ModelProto
        None: the built-in colour-and-texture filter bank (concepts of colour and texture);
        a trained VGG-16 (conv5_3) gives the paper's semantic concepts.
    layer : str, optional
        Tensor to factorize when the extractor is built here (default: the model's own).
    mode : "joint" | "per_image"
        joint: all images stacked into one (N·h·w x C) matrix, concepts shared across images;
        per_image: each image factorized on its own (batched solver), concepts per image; on a
        GPU the extraction of each extractor batch overlaps the factorization and maps of the
        batch before it (``PIPELINE``; the same results).
    backend : "auto" | "cpu" | "cuda"
        NMF engine. On a GPU (CUDA NMF, an extractor on CUDA, CuPy or PyTorch present)
        activations stay in device memory and the maps are computed there; only the final
        maps come back.
    precision : "fp32" | "tf32" | "bf16x"
        The CUDA NMF's arithmetic (``non_negative_factorization``'s; the CPU engine ignores
        it): "tf32" runs the products with X on tensor cores, "bf16x" keeps X as bfloat16.
        Joint DFF of 256 VGG-16 images on an H200 (200 iterations): fp32 35.2 ms, tf32 23.2,
        bf16x 25.3, the same relative error to five digits
        (benchmarks/results/profile_dff_joint_nmf_h200_run16.log). ``result.precision`` says
        what ran.
    max_iter, tol, random_state, init : the NMF's (see ``non_negative_factorization``); init is
        "random", "nndsvd", "nndsvda", "nndsvdar" or None ("custom" is refused: dff takes no
        W or H).
    negatives : "error" | "clip" | "shift"
        What to do with negative activations (a layer before its ReLU): refuse, set them to
        0, or subtract each channel's minimum (over the images factorized together).
    assign : "argmax" | "kmeans"
        Labels: the strongest concept per pixel, or k-means (k clusters, started at the k
        concepts) on the L2-normalised rows of W, upsampled by majority of bilinear weights.
    threshold : float in [0, 1]
        Pixels whose strongest relative heat (``heatmaps * strength``) is below it are
        labelled -1 (background). It also decides presence: concept j is present in image i
        when ``strength[i, j] > 0`` and ``strength[i, j] >= threshold`` (else no pixel of
        the image could carry its label); the heat map of an absent concept is 0, its masks
        are empty and its boxes None (``DFFResult.present``).
    activations : array (N, C, h, w) or list of (C, h, w), optional
        Precomputed non-negative activations of ``images`` (host or GPU): the extractor is
        not run. ``extractor`` may still be passed for its metadata and classifier head.
    keep_images : keep the PIL images in the result (overlays need them).
    name_concepts : name concepts (ImageNet classes through the model's classifier when it
        has one; the mean colour of each concept's pixels for the filter bank).
    progress : None or False (none), True (a bar on stderr) or a callable(done, total) over
        images.
    keep_maps : True | False | "auto"
        True: every heat map and label map is computed here and kept (lists of arrays at the
        images' full sizes: k·H·W·4 + H·W·2 bytes per image). False: only their maxima are
        found here; ``heatmaps`` and ``labels`` are sequences that compute an image's maps
        on the host when it is read (the same values; for many large photographs, whose
        maps would not fit in memory). "auto": True while the maps take at most
        ``KEEP_MAPS_BYTES``.

    Returns
    -------
    DFFResult (host numpy arrays).

    Raises
    ------
    ValueError : no images, k < 1, k larger than the number of positions, empty, NaN or
        infinite activations (naming the images), negative activations with
        ``negatives="error"``, unknown option values (init="custom" included).

    Warns
    -----
    UserWarning : k larger than the number of channels C.
    """
    from dffkit.images import image_sizes, load_images
    from dffkit.nmf import _PRECISIONS, _check_backend, _check_option

    k = _check_k(n_concepts)
    for name, value, allowed in (("mode", mode, _MODES), ("negatives", negatives, _NEGATIVES), ("assign", assign, _ASSIGN)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    _check_init(init)
    _check_backend(backend)
    _check_option("precision", precision, _PRECISIONS)
    threshold = _check_fraction("threshold", threshold)
    _check_progress(progress)
    _keep_maps(keep_maps, [], k)  # checked before the long work
    timings = {}

    t0 = time.perf_counter()
    if images is None:
        raise ValueError("no images given")
    items = _image_items(images)
    if not items:
        raise ValueError("no images given: pass at least one image path, PIL image or array")
    pil = load_images(items)
    sources = [_describe_source(it, i) for i, it in enumerate(items)]
    sizes = image_sizes(pil)
    timings["load"] = time.perf_counter() - t0
    keep = _keep_maps(keep_maps, sizes, k)
    solver = dict(init=init, tol=tol, max_iter=max_iter, random_state=random_state, backend=backend,
                  precision=precision)

    # ---- activations
    t0 = time.perf_counter()
    ops, piped = None, None
    if activations is not None:
        ext = None if extractor is None else _resolve_extractor(extractor, layer, backend)
        on_host = isinstance(activations, np.ndarray) or (
            isinstance(activations, (list, tuple)) and all(isinstance(a, np.ndarray) for a in activations))
        if not on_host and backend != "cpu":
            ops = _first_array_library()
        if ops is not None:
            parts = activations if isinstance(activations, (list, tuple)) else [activations]
            per = _split_activations([ops.asarray(a) for a in parts])
        else:
            per = [_host(a) for a in _split_activations(
                activations if on_host or isinstance(activations, (list, tuple)) else _host(activations))]
        if len(per) != len(pil):
            raise ValueError(f"activations hold {len(per)} images but {len(pil)} images were given")
    else:
        ext = _resolve_extractor(extractor, layer, backend)
        ops = _device_ops(ext, backend)
        report = _progress_callback(progress, len(pil), label="features ")
        groups = _pipeline_groups(ext, ops, len(pil)) if mode == "per_image" and keep else None
        feed = _extractor_inputs(ext, items, pil)
        if groups:  # each group's extraction overlaps the factorization and maps of the one before
            piped = _pipelined_per_image(
                ext, feed, ops, groups, report, sources, sizes, f"the activations of layer {getattr(ext, 'layer', layer)!r}",
                k, negatives, solver, threshold, assign, timings)
            if not piped[-1]:  # a group fell back to the host
                ops = None
        else:
            per, on_device = _extract(ext, feed, ops, report)
            if not on_device:  # the host path, by choice or by fallback
                ops = None
    ops = ops or _NumpyOps()
    if piped is not None:
        feature_sizes, Ws, Hs, n_iter_out, errors, engine, ran, heatmaps, strength, labels, loadings, _ = piped
    else:
        (feature_sizes, Ws, Hs, n_iter_out, errors, engine, ran, heatmaps, strength, labels,
         loadings) = _validate_factorize_map(
            ops, per, pil, sources, sizes, activations, ext, layer, k, mode, negatives, keep, threshold, assign,
            solver, timings, t0)

    concepts = _host(Hs[0]).astype(np.float32) if mode == "joint" else np.stack([_host(h) for h in Hs]).astype(np.float32)
    concept_names, concept_classes = None, None
    if name_concepts:
        head = _classifier_head(ext)
        if head is not None:
            if mode == "joint":
                peaks = _host(Ws[0]).max(axis=0)
                concept_classes = _class_names(head, concepts, peaks)
                concept_names = [row[0][0] for row in concept_classes] if concept_classes else None
            else:
                per_classes = [_class_names(head, concepts[i], _host(Ws[i]).max(axis=0)) for i in range(len(pil))]
                if all(per_classes):
                    concept_classes = per_classes
                    concept_names = [[row[0][0] for row in c] for c in per_classes]
            if concept_names is not None and getattr(ext, "untrained", False):
                concept_names = ([f"{n} (untrained)" for n in concept_names] if mode == "joint"
                                 else [[f"{n} (untrained)" for n in row] for row in concept_names])
        if concept_names is None and _model_name(ext) == "filterbank":
            concept_names = _colour_names(pil, labels, k, mode == "per_image")
    if concept_names is None:
        concept_names = ([f"concept {j}" for j in range(k)] if mode == "joint"
                         else [[f"concept {j}" for j in range(k)] for _ in pil])

    return DFFResult(
        heatmaps=heatmaps, strength=strength, labels=labels, concepts=concepts, loadings=loadings,
        concept_names=concept_names, concept_classes=concept_classes,
        images=pil if keep_images else None, image_sizes=[tuple(s) for s in sizes], feature_sizes=feature_sizes,
        sources=sources, mode=mode, assign=assign, threshold=threshold, n_concepts=k,
        model_name=_model_name(ext), layer=getattr(ext, "layer", layer),
        provider=getattr(ext, "provider", None), untrained=bool(getattr(ext, "untrained", False)),
        backend=engine, precision=ran, n_iter=n_iter_out, reconstruction_error=errors, timings=timings,
        device_path=ops.name != "numpy",
    )


#: the most bytes of heat maps and labels ``dff(..., keep_maps="auto")`` keeps in memory
KEEP_MAPS_BYTES = 2 << 30
#: the most bytes of upsampled maps ``_maps`` makes in one batch (host or GPU memory)
MAPS_BATCH_BYTES = 256 << 20
#: the most bytes of maps one call on the GPU brings back into pinned (page-locked) host memory,
#: which copies at about three times the speed of ordinary memory (one image's 1 MB of heat
#: maps: 36 against 115 us on the H200); the rest comes back into ordinary memory. The pinned
#: blocks come from the array library's pool (CuPy's, PyTorch's) and return to it when the
#: maps are freed; 0: none.
PINNED_MAPS_BYTES = 256 << 20


def _keep_maps(keep_maps, sizes, k: int) -> bool:
    if isinstance(keep_maps, str) and keep_maps == "auto":
        return sum(h * w * (4 * k + 2) for h, w in sizes) <= KEEP_MAPS_BYTES
    if keep_maps is True or keep_maps is False:
        return keep_maps
    raise ValueError(f"keep_maps must be True, False or 'auto', got {keep_maps!r}")


def _model_name(ext) -> Optional[str]:
    if ext is None:
        return "activations"
    return getattr(ext, "model_name", None) or type(ext).__name__


def _host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "numpy"):
        return np.asarray(a.numpy())
    return np.asarray(a)


def _extractor_inputs(ext, items, pil) -> list:
    """What the extractor reads: where it is dffkit's own, the caller's RGB uint8 arrays as they
    are (at its size it takes their pixels without Pillow: the same pixels without two
    conversions; 256 arrays of 224 x 224 went into batches in 21-24 ms against 61-95 as PIL
    images, session 20, 2 cores), the images read here for the rest; a callable of the caller's
    gets the PIL images."""
    from dffkit.features import FeatureExtractor
    from dffkit.images import _is_rgb_array

    if not isinstance(ext, FeatureExtractor):
        return pil
    return [item if _is_rgb_array(item) else img for item, img in zip(items, pil)]


def _extract(ext, pil, ops, report):
    """Run the extractor over the images in batches. Returns (per-image activations, whether
    they are device arrays of ``ops``); a failure on the device path falls back to the host."""
    batch = int(getattr(ext, "batch_size", 16) or 16)
    fixed_size = getattr(ext, "resize", "fixed") == "fixed" and getattr(ext, "image_size", 0) is not None
    if not fixed_size:
        ops = None
    per = []
    report(0)
    for start in range(0, len(pil), batch):
        chunk = pil[start:start + batch]
        if ops is not None:
            try:
                out = ops.asarray(ext(chunk, device_output=True))
                per.extend(out[i] for i in range(int(out.shape[0])))
            except (TypeError, ValueError, RuntimeError, ImportError, BufferError) as exc:  # host from here on
                warnings.warn(f"activations could not stay on the GPU ({exc}); continuing on the host",
                              RuntimeWarning, stacklevel=3)
                return _extract(ext, pil, None, report)[0], False
        elif fixed_size:
            per.extend(_split_activations(ext(chunk)))
        else:  # images keep their own sizes (resize="shorter" or image_size=None)
            per.extend(_split_activations(list(ext.extract_list(chunk))))
        report(min(start + batch, len(pil)))
    return per, ops is not None


def _validate_factorize_map(ops, per, pil, sources, sizes, activations, ext, layer, k, mode, negatives, keep,
                            threshold, assign, solver, timings, t0):
    """dff's steps after the activations (all images at once): their checks, the factorization
    (``solver``: the NMF's options), the maps. ``t0``: when the activations step began (its
    time ends with the checks). Returns (feature sizes, Ws, Hs, n_iter, errors, engine,
    precision, heatmaps, strength, labels, loadings)."""
    from dffkit.nmf import _checked_input, _no_convergence_warnings, non_negative_factorization

    what = ("the activations you passed" if activations is not None
            else f"the activations of layer {getattr(ext, 'layer', layer)!r}")
    C, feature_sizes, positions = _grids(per, sources, what, k, stacklevel=4)
    if mode == "joint" and k > sum(positions):
        raise ValueError(
            f"n_concepts={k} is larger than the number of positions ({sum(positions)}: "
            + (f"one image's {feature_sizes[0][0]} x {feature_sizes[0][1]} feature grid" if len(pil) == 1
               else f"{len(pil)} images x their feature grids")
            + "); use fewer concepts or more/larger images"
        )
    if mode == "per_image":
        _check_k_per_image(k, feature_sizes)
    timings["extract"] = time.perf_counter() - t0

    # ---- the factorization
    t0 = time.perf_counter()
    same_grid = len(set(feature_sizes)) == 1
    if mode == "joint":
        if same_grid:
            stacked = ops.asarray(per[0][None]) if len(per) == 1 else ops.stack(per)
            X = ops.matrix(stacked)
        else:
            X = ops.concat([ops.matrix(a[None]) for a in per])
        lo, sum_sq = _checked_range(ops, X, per, sources, what)
        X = _nonnegative(ops, X, negatives, what, lo)
        # found finite and >= 0 just above: the solver takes X without a second pass ('clip' and
        # 'shift' make new values, which it checks: a shift can overflow); the warnings filter
        # is thread-local: others' warnings stay theirs
        with _no_convergence_warnings(), _checked_input(X if lo >= 0 else None):
            W, H, n_iter, info = non_negative_factorization(X, n_components=k, return_info=True, **solver)
        Ws, Hs = [W], [H]
        n_iter_out, engine, ran = int(n_iter), info.backend, info.precision
        # ||X|| from the check's pass where it made one and X is still what it saw (no 'clip' or
        # 'shift' applied)
        norm = float(np.sqrt(sum_sq)) if sum_sq is not None and lo >= 0 else ops.norm(X)
        errors = float(info.error) / max(norm, 1e-30)
    else:
        Ws, Hs, n_iter_out, errors, engine, ran = _factorize_per_image(ops, per, sources, what, k, negatives, 0, solver)
    timings["factorize"] = time.perf_counter() - t0

    # ---- heat maps, strength, labels
    t0 = time.perf_counter()
    heatmaps, strength, labels, loadings = _maps(ops, Ws, feature_sizes, sizes, mode, threshold, assign, keep=keep)
    timings["maps"] = time.perf_counter() - t0
    return feature_sizes, Ws, Hs, n_iter_out, errors, engine, ran, heatmaps, strength, labels, loadings


#: per_image DFF over more images than one extractor batch: "auto" runs each batch's extraction
#: on a worker thread while this thread factorizes the batch before it and makes its maps, where
#: the activations stay on a GPU (the extractor's work and the maps' copies can then overlap the
#: NMF's; on the CPU both would share the same cores); True: also on the CPU path; False: never.
#: The results are the same either way.
PIPELINE = "auto"


def _pipeline_groups(ext, ops, n: int) -> Optional[List[Tuple[int, int]]]:
    """The groups of images (index ranges, one extractor batch each) whose extraction overlaps
    the previous group's factorization and maps (``PIPELINE``); None where there is one group
    or the setting does not apply."""
    if PIPELINE is False or (PIPELINE == "auto" and ops is None):
        return None
    batch = int(getattr(ext, "batch_size", 16) or 16)
    if n <= batch:
        return None
    return [(a, min(a + batch, n)) for a in range(0, n, batch)]


def _pipelined_per_image(ext, pil, ops, groups, report, sources, sizes, what, k, negatives, solver, threshold,
                         assign, timings):
    """per_image DFF group by group: the extraction of group g + 1 on a worker thread while this
    thread checks and factorizes group g and makes its maps (keep_maps). The same results as
    all groups at once: each image's random_state is seed + its number, the extractor runs
    the same batches, checks name images by their numbers, k above C warns once. timings'
    "extract", "factorize" and "maps" are each step's own time added over the groups (they
    overlap: their sum exceeds the wall time). Returns (feature sizes, Ws, Hs, n_iter, errors,
    engine, precision, heatmaps, strength, labels, loadings, whether every group stayed on the
    device)."""
    from concurrent.futures import ThreadPoolExecutor

    from dffkit.nmf import _seed_from

    solver = dict(solver, random_state=_seed_from(solver["random_state"]))  # drawn once
    spent = {"extract": 0.0, "factorize": 0.0, "maps": 0.0}
    source = [ops]  # None once a group has fallen back to the host: the rest follow, as in one pass

    def extract(a, b):
        t = time.perf_counter()
        out = _extract(ext, pil[a:b], source[0], lambda done: report(a + done))
        spent["extract"] += time.perf_counter() - t  # the worker's alone: read after its last result
        return out

    feature_sizes, Ws, Hs, n_iter, errors, heatmaps, strength, labels, loadings = ([] for _ in range(9))
    C, engine, ran, device = None, None, None, True
    with ThreadPoolExecutor(1, thread_name_prefix="dffkit-extract") as pool:
        upcoming = pool.submit(extract, *groups[0])
        for g, (a, b) in enumerate(groups):
            per, on_device = upcoming.result()
            if not on_device:
                source[0] = None  # (the next group is submitted only now)
            if g + 1 < len(groups):
                upcoming = pool.submit(extract, *groups[g + 1])
            group_ops = ops if on_device else _NumpyOps()
            device = device and on_device
            C, fs, _ = _grids(per, sources, what, k, a, C, stacklevel=4)
            _check_k_per_image(k, fs)
            t = time.perf_counter()
            Wg, Hg, it, err, engine, ran = _factorize_per_image(group_ops, per, sources, what, k, negatives, a, solver)
            spent["factorize"] += time.perf_counter() - t
            t = time.perf_counter()
            hm, st, lb, ld = _maps(group_ops, Wg, fs, sizes[a:b], "per_image", threshold, assign, keep=True)
            spent["maps"] += time.perf_counter() - t
            del per
            for out, part in zip((feature_sizes, Ws, Hs, n_iter, errors, heatmaps, strength, labels, loadings),
                                 (fs, Wg, Hg, it, err, hm, [st], lb, ld)):
                out.extend(part)
    timings.update(spent)
    return (feature_sizes, Ws, Hs, n_iter, errors, engine, ran, heatmaps, np.concatenate(strength), labels, loadings,
            device)


class _Numbered:
    """A group of images' activations indexed by the images' numbers in the whole call
    (``start`` + position), for the checks that name images."""

    def __init__(self, items, start: int):
        self.items, self.start = items, start

    def __getitem__(self, i):
        return self.items[i - self.start]

    def __len__(self) -> int:
        return self.start + len(self.items)


def _grids(per, sources, what: str, k: int, start: int = 0, channels: Optional[int] = None,
           stacklevel: int = 3) -> Tuple[int, list, list]:
    """(C, feature sizes, positions) of the activations ``per`` of images start, start + 1, ...
    (``channels``: the C of the images before them); ValueError for empty activations or
    channel counts that differ; the warning for k above C (once: where ``channels`` is None)."""
    empty = [i for i, a in enumerate(per) if 0 in tuple(a.shape)]
    if empty:
        i = empty[0]
        raise ValueError(
            f"{what} are empty for image {start + i} ({sources[start + i]}): shape (C, h, w) = "
            f"{tuple(int(d) for d in per[i].shape)}; "
            "DFF needs at least one channel and a feature grid of at least 1 x 1: pass activations (N, C, h, w) "
            "with C, h, w >= 1 (a convolutional layer's output)"
        )
    counts = {int(a.shape[0]) for a in per} | ({channels} if channels is not None else set())
    if len(counts) != 1:
        raise ValueError(f"activations of the images have different channel counts {sorted(counts)}")
    C = counts.pop()
    if k > C and channels is None:
        warnings.warn(
            f"n_concepts={k} is more than the {C} channels of {what}: the factorization cannot find more than {C} "
            f"meaningful concepts (the concepts are rows of a {k} x {C} matrix), the rest split or repeat them and "
            f"the solver slows down; use n_concepts <= {C}", UserWarning, stacklevel=stacklevel)
    feature_sizes = [(int(a.shape[1]), int(a.shape[2])) for a in per]
    return C, feature_sizes, [h * w for h, w in feature_sizes]


def _check_k_per_image(k: int, feature_sizes) -> None:
    positions = [h * w for h, w in feature_sizes]
    if k > min(positions):
        raise ValueError(
            f"n_concepts={k} is larger than the number of positions of the smallest image's feature grid "
            f"({min(positions)}, {feature_sizes[int(np.argmin(positions))]}); use fewer concepts or larger images"
        )


def _factorize_per_image(ops, per, sources, what: str, k: int, negatives: str, start: int, solver: dict):
    """per_image mode's factorization of images start, start + 1, ... (activations ``per``):
    their checks (named by their numbers in the call), negatives handled, one batched solve
    (``solver``: nmf_batched's options; image i's random_state is seed + i, as in one call
    over all images). Returns (Ws, Hs, n_iter per image, relative errors, engine, precision)."""
    from dffkit.nmf import _checked_input, _no_convergence_warnings, _seed_from, nmf_batched

    numbered = _Numbered(per, start)
    C = int(per[0].shape[0])
    same_grid = len({tuple(a.shape) for a in per}) == 1
    if start:
        solver = dict(solver, random_state=_seed_from(solver["random_state"]) + start)
    if same_grid and ops.name != "numpy":  # one (N, h w, C) batch, checked in one pass
        hw = int(per[0].shape[1]) * int(per[0].shape[2])
        X_all = ops.matrix(ops.asarray(per[0][None]) if len(per) == 1 else ops.stack(per))
        lo = _checked_min(ops, X_all, numbered, sources, what, range(start, start + len(per)))
        if lo < 0 and negatives == "shift":  # each image's own channel minima
            batch = ops.stack([_nonnegative(ops, X_all[i * hw:(i + 1) * hw], negatives, what)
                               for i in range(len(per))])
        else:
            batch = _nonnegative(ops, X_all, negatives, what, lo).reshape(len(per), hw, C)
        Xs = [batch[i] for i in range(len(per))]
    else:
        Xs = [ops.matrix(ops.asarray(a)[None]) for a in per]
        Xs = [_nonnegative(ops, x, negatives, what, _checked_min(ops, x, numbered, sources, what, [start + i]))
              for i, x in enumerate(Xs)]
        batch = Xs
    # a (B, h w, C) device batch found finite and >= 0 above: the solver takes it as it is
    checked = same_grid and ops.name != "numpy" and lo >= 0
    with _no_convergence_warnings(), _checked_input(batch if checked else None):
        solved = nmf_batched(batch, k, **solver)
    norms = _norms(ops, batch, Xs)
    return ([w for w, _, _ in solved], [h for _, h, _ in solved], [int(r.n_iter) for _, _, r in solved],
            [float(r.error) / max(nx, 1e-30) for (_, _, r), nx in zip(solved, norms)],
            solved[0][2].backend, solved[0][2].precision)


def _norms(ops, batch, Xs) -> List[float]:
    """The Frobenius norm of each problem: of a (B, m, n) device batch in one trip to the
    host (sums of squares in float64), else one problem at a time."""
    if isinstance(batch, list) or isinstance(ops, _NumpyOps):
        return [ops.norm(x) for x in Xs]
    if ops.name == "torch":
        sq = batch.square().sum(dim=(1, 2), dtype=ops.torch.float64)
    else:
        sq = ops.xp.square(batch).sum(axis=(1, 2), dtype=ops.xp.float64)
    return [float(v) for v in np.sqrt(np.asarray(_host(sq), dtype=np.float64))]


def _nonnegative(ops, X, negatives, what: str, lo: Optional[float] = None):
    """X with its negative values handled by ``negatives``; ``what`` names the activations
    in the error ("the activations of layer 'conv5_3'"). X is finite (``_checked_min``),
    ``lo`` its minimum where known."""
    if lo is None:
        lo = float(_host(X.min()))
    if lo >= 0:
        return X
    if negatives == "error":
        raise ValueError(
            f"{what} have negative values (minimum {lo:.4g}): DFF needs "
            "non-negative activations, e.g. a layer after its ReLU; or pass negatives='clip' (set them "
            "to 0) or negatives='shift' (subtract each channel's minimum)"
        )
    if negatives == "clip":
        return ops.clip(X, 0)
    return X - ops.channel_min(X)[None, :]


def _maps(ops, Ws, feature_sizes, sizes, mode, threshold, assign, chunk: int = 32, keep: bool = True):
    """Heat maps, strength and labels from W (joint: one (Σ h_i w_i, k) matrix; per image:
    one (h_i w_i, k) matrix per image), on the host or the device of ``ops``.

    Images with the same feature grid and size are processed together, ``chunk`` at a
    time: one batched pair of products with the bilinear matrices, one copy to the host.
    ``keep=False``: the maps are upsampled once for their maxima and dropped; heat maps and
    labels come back as lazy sequences (``_LazyMaps``) that compute an image's on the host
    when it is read, from the loadings (memory: a few images' maps, not all of them).
    On a GPU whose CUDA module has the map kernels (``ops.map_kernels()``), ``keep`` with
    ``assign="argmax"`` runs as two kernels per batch instead (``_maps_by_kernels``: the host
    path's bits).
    """
    n_images = len(sizes)
    rows = [0, *itertools.accumulate(int(h) * int(w) for h, w in feature_sizes)]
    groups: Dict[tuple, List[int]] = {}
    for i, (fs, size) in enumerate(zip(feature_sizes, sizes)):
        groups.setdefault(tuple(fs) + tuple(size), []).append(i)
    k = int(Ws[0].shape[1])
    batches = []
    for key, idx in groups.items():
        # at most `chunk` images and MAPS_BATCH_BYTES of upsampled maps at a time
        step = max(1, min(chunk, MAPS_BATCH_BYTES // max(1, 4 * k * key[2] * key[3])))
        batches += [(key, idx[s:s + step]) for s in range(0, len(idx), step)]
    kernels = ops.map_kernels() if keep and assign == "argmax" else None
    if kernels is not None and all(str(W.dtype).endswith("float32") for W in Ws):
        return _maps_by_kernels(ops, kernels, Ws, feature_sizes, rows, batches, mode, threshold, k)

    def loadings_of(idx, h, w):
        if mode == "joint" and idx == list(range(idx[0], idx[-1] + 1)):
            Wi = Ws[0][rows[idx[0]]:rows[idx[-1] + 1]]
        elif mode == "joint":
            Wi = ops.concat([Ws[0][rows[i]:rows[i + 1]] for i in idx])
        else:
            Wi = ops.concat([Ws[i] for i in idx])
        return ops.rows_to_maps(Wi, len(idx), h, w)  # (n, k, h, w)

    ups = []
    peaks = np.zeros((n_images, k))
    loadings: List[Optional[np.ndarray]] = [None] * n_images
    for (h, w, H, Wd), idx in batches:
        A = loadings_of(idx, h, w)
        U = _upsampled(ops, A, (H, Wd))  # (n, k, H, W)
        peaks[idx] = np.maximum(_host(ops.amax(U, (2, 3))), 0.0)
        A_host = _host(A)
        for t, i in enumerate(idx):
            loadings[i] = np.ascontiguousarray(A_host[t].transpose(1, 2, 0))
        ups.append(U if keep else None)
        del U
    strength, divisors = _strength_divisors(peaks, mode, threshold)
    if not keep:
        cells = _kmeans_cells(loadings, peaks, mode, threshold, k) if assign == "kmeans" else None
        lazy = _LazyMaps(loadings, sizes, divisors, strength, threshold, cells,
                         host_peaks=isinstance(ops, _NumpyOps))
        return lazy.heatmaps, strength, lazy.labels, loadings
    heatmaps: List[Optional[np.ndarray]] = [None] * n_images
    labels: List[Optional[np.ndarray]] = [None] * n_images
    for ((h, w, H, Wd), idx), U in zip(batches, ups):
        heat = ops.heat(U, divisors[idx])
        if assign == "argmax":
            lab = _host(ops.labels_of(heat, strength[idx], threshold))
            for t, i in enumerate(idx):
                labels[i] = lab[t]
        heat = _host(heat)
        for t, i in enumerate(idx):
            heatmaps[i] = heat[t]
    if assign == "kmeans":
        labels = _kmeans_labels(loadings, peaks, mode, sizes, threshold, k)
    return heatmaps, strength, labels, loadings


def _strength_divisors(peaks, mode, threshold):
    """(strength, divisors), (N, k) float32 each, from the maps' maxima ``peaks`` (N, k)."""
    reference = peaks.max(axis=0, keepdims=True) if mode == "joint" else peaks
    strength = np.where(reference > 0, peaks / np.where(reference > 0, reference, 1.0), 0.0).astype(np.float32)
    return strength, _divisors(peaks, _presence(strength, threshold))


def _maps_by_kernels(ops, kernels, Ws, feature_sizes, rows, batches, mode, threshold, k):
    """``_maps`` (keep, argmax) on the device through the two map kernels of
    ``kernels.dff_maps`` (cuda/dff_maps.cuh): per batch one launch for the maps' maxima and
    one for heat and labels, straight from W (no upsampled maps in memory). Transfers: W and
    the maxima down (one wait), divisors and strengths up (one array), heat and labels down
    per batch (one wait), into pinned host memory up to ``PINNED_MAPS_BYTES`` (``_download``);
    the bilinear taps go up once per size and device (``_device_taps``). The upsampling is the
    host resampler's arithmetic (``_host_resample_fuses``), so the results are the host path's
    bits. ``rows``: image i's rows of W are rows[i]:rows[i + 1] (joint: of Ws[0]; per image:
    of the Ws stacked)."""
    n_images = len(feature_sizes)
    Wd = Ws[0] if len(Ws) == 1 else ops.concat(Ws)
    blocks = [_whole_or_rows(Wd, rows[i], rows[i + 1]) for i in range(n_images)]
    fused = _host_resample_fuses()
    taps = [(_device_taps(ops, H, h), _device_taps(ops, Wo, w)) for (h, w, H, Wo), _ in batches]
    nbs = [_peak_blocks(H * Wo) for (_, _, H, Wo), _ in batches]
    if len(batches) == 1 and getattr(kernels, "device_params", lambda: False)():
        return _maps_in_one_trip(ops, kernels, Wd, blocks, feature_sizes, rows, batches[0], taps[0], nbs[0],
                                 fused, mode, threshold, k)
    ends = [0, *itertools.accumulate(len(idx) * k * nb for (_, idx), nb in zip(batches, nbs))]
    parts = ops.empty((ends[-1],), np.float32)
    for ((h, w, _, _), idx), (ty, tx), nb, a, b in zip(batches, taps, nbs, ends[:-1], ends[1:]):
        kernels.dff_maps([blocks[i] for i in idx], ty, tx, h=h, w=w,
                         parts=_whole_or_rows(parts, a, b).reshape(len(idx), k, nb), fused=fused)
    pinned = [PINNED_MAPS_BYTES]  # what this call may still bring back into pinned memory
    parts_host, W_host = _download(ops, kernels, [(parts, np.float32), (Wd, np.float32)], pinned)
    loadings = [W_host[rows[i]:rows[i + 1]].reshape(h, w, k) for i, (h, w) in enumerate(feature_sizes)]
    peaks = np.zeros((n_images, k))
    for ((_, _, _, _), idx), nb, a, b in zip(batches, nbs, ends[:-1], ends[1:]):
        peaks[idx] = np.maximum(parts_host[a:b].reshape(len(idx), k, nb).max(axis=2), 0.0)
    strength, divisors = _strength_divisors(peaks, mode, threshold)
    order = [i for _, idx in batches for i in idx]  # each batch's images one after another
    params = ops.asarray(np.ascontiguousarray(np.concatenate([divisors[order], strength[order]], axis=1),
                                              dtype=np.float32))
    heatmaps: List[Optional[np.ndarray]] = [None] * n_images
    labels: List[Optional[np.ndarray]] = [None] * n_images
    start = 0
    for ((h, w, H, Wo), idx), (ty, tx) in zip(batches, taps):
        n = len(idx)
        heat, lab = ops.empty((n, k, H, Wo), np.float32), ops.empty((n, H, Wo), np.int16)
        kernels.dff_maps([blocks[i] for i in idx], ty, tx, h=h, w=w, params=_whole_or_rows(params, start, start + n),
                         threshold=threshold, heat=heat, labels=lab, fused=fused)
        start += n
        heat, lab = _download(ops, kernels, [(heat, np.float32), (lab, np.int16)], pinned)
        for t, i in enumerate(idx):
            heatmaps[i], labels[i] = heat[t], lab[t]
    return heatmaps, strength, labels, loadings


def _maps_in_one_trip(ops, kernels, Wd, blocks, feature_sizes, rows, batch, taps, nb, fused, mode, threshold, k):
    """``_maps_by_kernels`` for one batch (every image of one feature grid and size, at most
    ``chunk`` of them: one image's DFF, for one): the peaks, the params made from them on the
    device (``params_out``: the host's ``_strength_divisors`` arithmetic, so the same bits),
    heat and labels, then one copy down of everything the result needs (params, W, heat,
    labels) and one wait, where the general path waits for the peaks before the heat step."""
    (h, w, H, Wo), idx = batch
    n = len(idx)
    parts, params = ops.empty((n, k, nb), np.float32), ops.empty((n, 2 * k), np.float32)
    heat, lab = ops.empty((n, k, H, Wo), np.float32), ops.empty((n, H, Wo), np.int16)
    maps = [blocks[i] for i in idx]
    kernels.dff_maps(maps, *taps, h=h, w=w, parts=parts, fused=fused, params_out=params, threshold=threshold,
                     joint=mode == "joint")
    kernels.dff_maps(maps, *taps, h=h, w=w, params=params, threshold=threshold, heat=heat, labels=lab, fused=fused)
    params_host, W_host, heat, lab = _download(
        ops, kernels, [(params, np.float32), (Wd, np.float32), (heat, np.float32), (lab, np.int16)],
        [PINNED_MAPS_BYTES])
    n_images = len(feature_sizes)
    strength = np.empty((n_images, k), np.float32)
    heatmaps: List[Optional[np.ndarray]] = [None] * n_images
    labels: List[Optional[np.ndarray]] = [None] * n_images
    for t, i in enumerate(idx):
        strength[i] = params_host[t, k:]
        heatmaps[i], labels[i] = heat[t], lab[t]
    loadings = [W_host[rows[i]:rows[i + 1]].reshape(hi, wi, k) for i, (hi, wi) in enumerate(feature_sizes)]
    return heatmaps, strength, labels, loadings


def _download(ops, kernels, arrays, pinned) -> List[np.ndarray]:
    """Host copies of the device arrays of ``arrays`` ((array, numpy dtype) pairs), with one
    wait for all of them: into one block of pinned memory of ``ops``' pool, carved into the
    arrays at 64-byte offsets (one allocation: 7.5 us each from CuPy's pool on the H200), by
    ``kernels.copy_to_host`` while ``pinned[0]``, the bytes this call may still pin, allows
    (and takes them from it), else one ``_host`` copy each. The arrays returned keep the whole
    block alive."""
    shapes = [tuple(int(d) for d in a.shape) for a, _ in arrays]
    sizes = [math.prod(shape) * np.dtype(dt).itemsize for shape, (_, dt) in zip(shapes, arrays)]
    offsets = [0, *itertools.accumulate(-(-n // 64) * 64 for n in sizes)]
    if sum(sizes) <= pinned[0]:
        try:
            block = ops.pinned_empty((offsets[-1],), np.uint8)
        except (MemoryError, RuntimeError):  # no page-locked memory to be had: ordinary memory
            block = None
        if block is not None:
            outs = [block[o:o + n].view(dt).reshape(shape)
                    for o, n, shape, (_, dt) in zip(offsets, sizes, shapes, arrays)]
            kernels.copy_to_host([a for a, _ in arrays], outs)
            pinned[0] -= sum(sizes)
            return outs
    return [_host(a) for a, _ in arrays]


def _whole_or_rows(a, lo: int, hi: int):
    """Rows lo:hi of device array ``a``, or ``a`` itself where they are all of it (a device
    library's slice costs microseconds; one image's maps take several)."""
    return a if lo == 0 and hi == int(a.shape[0]) else a[lo:hi]


def _peak_blocks(pixels: int) -> int:
    """Blocks per map of the peaks kernel: about 2048 pixels (8 a thread) each, at most 128."""
    return int(min(128, max(1, -(-pixels // 2048))))


@functools.lru_cache(maxsize=64)
def _packed_taps(n_out: int, n_in: int) -> np.ndarray:
    """``bilinear_taps(n_out, n_in)`` as the map kernels read them: int32 (4 n_out,), the
    indices i0, i1, then the bits of the weights w0, w1."""
    i0, i1, w0, w1 = bilinear_taps(n_out, n_in)
    return np.concatenate([i0.astype(np.int32), i1.astype(np.int32), w0.view(np.int32), w1.view(np.int32)])


_DEVICE_TAPS: "OrderedDict[tuple, object]" = OrderedDict()
_DEVICE_TAPS_LOCK = threading.Lock()
_DEVICE_TAPS_MAX = 128


def _device_taps(ops, n_out: int, n_in: int):
    """``_packed_taps(n_out, n_in)`` on the current device of ``ops``, uploaded once per size
    and device (the most recently used ``_DEVICE_TAPS_MAX`` kept)."""
    key = (ops.name, ops.device(), int(n_out), int(n_in))
    with _DEVICE_TAPS_LOCK:
        taps = _DEVICE_TAPS.get(key)
        if taps is not None:
            _DEVICE_TAPS.move_to_end(key)
            return taps
    taps = ops.asarray(_packed_taps(int(n_out), int(n_in)))
    ops.synchronize()  # complete before another stream reads it
    with _DEVICE_TAPS_LOCK:
        _DEVICE_TAPS[key] = taps
        while len(_DEVICE_TAPS) > _DEVICE_TAPS_MAX:
            _DEVICE_TAPS.popitem(last=False)
    return taps


def _reference_resample(A, H, W) -> np.ndarray:
    """(n, k, h, w) float32 -> (n, k, H, W): the host resampler's taps (``bilinear_taps``) with
    every product and sum rounded to float32 (no fused multiply-add), along x, then along y."""
    A = np.asarray(A, dtype=np.float32)
    iy0, iy1, wy0, wy1 = bilinear_taps(H, A.shape[2])
    ix0, ix1, wx0, wx1 = bilinear_taps(W, A.shape[3])
    r = A[..., ix0] * wx0 + A[..., ix1] * wx1
    return r[..., iy0, :] * wy0[:, None] + r[..., iy1, :] * wy1[:, None]


@functools.lru_cache(maxsize=1)
def _host_resample_fuses() -> bool:
    """Whether the CPU engine's resample_bilinear, as compiled here, blends two taps as
    fma(w0, a0, w1*a1) rather than rounding both products and the sum (GCC contracts
    ``w0*a0 + w1*a1`` so with its default -ffp-contract=fast on an FMA target such as
    -march=native). The map kernels then do the same, so that the device's maps are the host's
    bits. Decided once, on a small map whose pixels tell the two apart."""
    A = np.random.default_rng(7).random((1, 2, 5, 6), dtype=np.float32)
    return not np.array_equal(_NumpyOps().resample(A, 23, 17), _reference_resample(A, 23, 17))


def _kmeans_labels(loadings, peaks, mode, sizes, threshold, k, n_iter: int = 50):
    """k-means on the L2-normalised rows of W (started at the k unit vectors, so cluster j
    starts as concept j), background where the strongest relative loading is below
    ``threshold``; cluster maps upsampled by the largest bilinear weight."""
    cells = _kmeans_cells(loadings, peaks, mode, threshold, k, n_iter)
    return [_upsample_cells(c, size, k) for c, size in zip(cells, sizes)]


def _kmeans_cells(loadings, peaks, mode, threshold, k, n_iter: int = 50) -> List[np.ndarray]:
    """The k-means clusters (``_kmeans_labels``) on each image's feature grid: (h_i, w_i)
    ints, k for the background."""
    def relative(i):
        ref = peaks.max(axis=0) if mode == "joint" else peaks[i]
        return loadings[i] / np.where(ref > 0, ref, 1.0)

    if mode == "joint":
        groups = [list(range(len(loadings)))]
    else:
        groups = [[i] for i in range(len(loadings))]
    cells: List[Optional[np.ndarray]] = [None] * len(loadings)
    for group in groups:
        rel = [relative(i).reshape(-1, k) for i in group]
        Y = np.concatenate([loadings[i].reshape(-1, k) for i in group]).astype(np.float64)
        Y /= np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)
        fg = np.concatenate([r.max(axis=1) >= threshold for r in rel])
        centres = np.eye(k)
        assign = np.argmax(Y, axis=1)
        for _ in range(n_iter):
            assign_new = np.argmin(((Y[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
            for j in range(k):
                members = Y[(assign_new == j) & fg]
                if len(members):
                    centres[j] = members.mean(axis=0)
            if np.array_equal(assign_new, assign):
                break
            assign = assign_new
        assign = np.where(fg, assign, k)
        offset = 0
        for i in group:
            h, w = loadings[i].shape[:2]
            cells[i] = assign[offset:offset + h * w].reshape(h, w)
            offset += h * w
    return cells


def _upsample_cells(cells, size, k) -> np.ndarray:
    """(h, w) clusters (k: background) -> (H, W) int16 labels (-1: background), each pixel
    taking the cluster of the largest bilinear weight."""
    onehot = (cells[None] == np.arange(k + 1)[:, None, None]).astype(np.float32)
    lab = upsample(onehot, size).argmax(axis=0).astype(np.int16)
    lab[lab == k] = -1
    return lab


class _LazyMaps:
    """Heat maps and labels computed on the host when read (``dff(..., keep_maps=False)``),
    from each image's loadings and the maxima found once for all (``divisors``, see
    ``_divisors``): the same values as the maps kept in memory, a few images' worth held at a
    time (the last ``cache`` read). ``host_peaks=False``: the maxima were found on a GPU,
    whose upsampling rounds differently; each present map is then divided by the maximum of
    its host upsampling, so that it still peaks at exactly 1."""

    def __init__(self, loadings, sizes, divisors, strength, threshold, kmeans_cells=None, cache: int = 2,
                 host_peaks: bool = True):
        self.loadings, self.sizes = loadings, [tuple(s) for s in sizes]
        self.divisors, self.strength, self.threshold = divisors, strength, threshold
        self.kmeans_cells, self.cache, self.host_peaks = kmeans_cells, cache, host_peaks
        self._held: Dict[int, tuple] = {}
        self._lock = threading.Lock()
        self.heatmaps = _MapSequence(self, 0, "heat maps")
        self.labels = _MapSequence(self, 1, "labels")

    def __len__(self) -> int:
        return len(self.loadings)

    def __getstate__(self):  # pickled without the lock and the held maps
        state = dict(self.__dict__)
        state["_held"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, i: int) -> tuple:
        with self._lock:
            if i in self._held:
                maps = self._held.pop(i)
                self._held[i] = maps  # the most recently read last
                return maps
        maps = self._compute(i)
        with self._lock:
            self._held[i] = maps
            while len(self._held) > self.cache:
                self._held.pop(next(iter(self._held)))
        return maps

    def _compute(self, i: int) -> tuple:
        ops = _NumpyOps()
        A = np.ascontiguousarray(self.loadings[i].transpose(2, 0, 1))[None]  # (1, k, h, w)
        U = _upsampled(ops, A, self.sizes[i])
        divisors = self.divisors[i:i + 1]
        if not self.host_peaks:
            peaks = U.max(axis=(2, 3))
            divisors = np.where(np.isfinite(divisors) & (peaks > 0), peaks, np.float32(np.inf)).astype(np.float32)
        heat = ops.heat(U, divisors)
        if self.kmeans_cells is None:
            lab = ops.labels_of(heat, self.strength[i:i + 1], self.threshold)[0]
        else:
            lab = _upsample_cells(self.kmeans_cells[i], self.sizes[i], heat.shape[1])
        return heat[0], lab


class _MapSequence(abc.Sequence):
    """One kind of ``_LazyMaps``' maps as a read-only sequence over the images."""

    def __init__(self, source: _LazyMaps, which: int, what: str):
        self._source, self._which, self._what = source, which, what

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"image index must be an int or a slice, got {i!r}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"image index {i} out of range for {n} images")
        return self._source.get(int(i) % n)[self._which]

    def __repr__(self) -> str:
        return f"<{len(self)} {self._what}, computed when read (keep_maps=False)>"


# ---------------------------------------------------------------------------------------------
# command line: dffkit dff, dffkit demo
# ---------------------------------------------------------------------------------------------

def sample_images() -> List[str]:
    """Paths of the photographs shipped with dffkit (``dffkit/data/sample_images``)."""
    from importlib import resources

    folder = resources.files("dffkit").joinpath("data", "sample_images")
    paths = sorted(str(p) for p in folder.iterdir() if p.name.lower().endswith(_IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"no sample images found in {folder}")
    return paths


def _add_common_arguments(p, k_default: int):
    p.add_argument("-k", "--concepts", type=int, default=k_default, dest="k",
                   help=f"number of concepts (default {k_default})")
    p.add_argument("--model", default=None,
                   help="ONNX model file, or 'filterbank' (default: colour and texture) or 'vgg16' "
                        "(random weights offline: untrained)")
    p.add_argument("--layer", default=None, help="tensor to factorize (default: the model's own, conv5_3 for VGG-16)")
    p.add_argument("--per-image", action="store_true", help="factorize each image on its own")
    p.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto", help="NMF engine")
    from dffkit.nmf import _PRECISIONS

    p.add_argument("--precision", choices=_PRECISIONS, default="fp32",
                   help="the CUDA NMF's arithmetic (tf32: tensor cores for the products with X; bf16x: X kept as "
                        "bfloat16); the CPU ignores it")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.2,
                   help="background below this relative heat; a concept whose strength in an image is below "
                        "it is absent there (no heat map, mask or box)")
    p.add_argument("--assign", choices=_ASSIGN, default="argmax", help="label pixels by argmax or k-means")
    p.add_argument("--negatives", choices=_NEGATIVES, default="error",
                   help="negative activations: refuse, clip to 0, or shift by each channel's minimum")
    p.add_argument("--image-size", type=positive_int("pixels"), default=None,
                   help="resize images to this square size in pixels for the network, a positive int "
                        "(default: the extractor's, 224 for the built-in models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _dff_arguments(p):
    p.add_argument("images", nargs="+", help="image files or folders of images")
    _add_common_arguments(p, 5)
    p.add_argument("--out", default="dff_out", help="folder for overlays, heat maps, grid and summary.json")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the per-concept heat map PNGs")


def _demo_arguments(p):
    _add_common_arguments(p, 4)
    p.add_argument("--out", default="dffkit_demo", help="folder for the pictures (default ./dffkit_demo)")


def _build_extractor(args):
    from dffkit import features, models

    model = args.model or "filterbank"
    kwargs = {"providers": "cpu" if args.backend == "cpu" else "auto"}
    if args.image_size is not None:  # the parser lets positive ints only through (positive_int)
        kwargs["image_size"] = args.image_size
    with warnings.catch_warnings():
        # the command prints its own note about untrained weights
        warnings.simplefilter("ignore", models.UntrainedWeightsWarning)
        return features.FeatureExtractor(model, args.layer, **kwargs)


def _run(args, paths, *, noted: bool = False) -> int:
    ext = _build_extractor(args)
    prepare_output_dir(args.out)  # before the work: a file there, or no right to write, fails now
    _check_output_places(args.out, "--out", heatmaps=not getattr(args, "no_heatmaps", False))
    print(f"model {_model_name(ext)}, layer {ext.layer}, provider {getattr(ext, 'provider', '?')}; "
          f"{len(paths)} images, k={args.k}, {'per image' if args.per_image else 'joint'}", file=sys.stderr)
    note = _model_note(_model_name(ext), getattr(ext, "untrained", False))
    if note and not noted:
        print(f"note: {note}", file=sys.stderr)
    result = dff(paths, args.k, extractor=ext, mode="per_image" if args.per_image else "joint",
                 backend=args.backend, precision=args.precision, max_iter=args.max_iter, tol=args.tol, random_state=args.seed,
                 negatives=args.negatives, assign=args.assign, threshold=args.threshold,
                 progress=None if args.quiet else True, keep_maps="auto")
    t0 = time.perf_counter()
    written = result.save(args.out, heatmaps=not getattr(args, "no_heatmaps", False),
                          progress=None if args.quiet else True)
    t = dict(result.timings, save=time.perf_counter() - t0)
    print(f"{result.backend} NMF, {result.n_iter if result.mode == 'joint' else max(result.n_iter)} iterations; "
          f"read {t['load']:.2f} s, extract {t['extract']:.2f} s, factorize {t['factorize']:.2f} s, "
          f"maps {t['maps']:.2f} s, pictures {t['save']:.2f} s")
    consistency = result.concept_consistency()
    if result.mode == "joint":
        for j, name in enumerate(result.concept_names):
            print(f"  concept {j}: {name}  (in {consistency[j]:.0%} of the images)")
    else:
        for src, names in zip(result.sources, result.concept_names):
            print(f"  {Path(src).name}: " + ", ".join(f"{j}: {n}" for j, n in enumerate(names)))
    out = Path(args.out).resolve()
    print(f"wrote {len(written['overlays'])} overlays, {len(written['heatmaps'])} heat maps, grid.png and "
          f"summary.json to {out}")
    print(f"  open {out / 'grid.png'}")
    return 0


def run_dff(args) -> int:
    """``dffkit dff IMAGES... -k 5``: concepts of a set of images, pictures and a summary."""
    _check_k(args.k)
    return _run(args, _expand_images(args.images))


def run_demo(args) -> int:
    """``dffkit demo``: DFF on the bundled sample photographs."""
    paths = sample_images()
    if not args.model:
        print("dffkit demo: the built-in filter bank (Gabor texture + colour-opponent channels, no learned "
              "weights) sees colour and texture, so the concepts below are regions of similar colour and "
              "texture, not objects.\nFor semantic concepts bring a trained VGG-16: "
              "dffkit.models.vgg16(weights='torchvision') exports one where torch and torchvision are "
              "installed, or pass your own file: dffkit demo --model vgg16.onnx", file=sys.stderr)
    return _run(args, paths, noted=not args.model)


CLI = {
    "dff": (_dff_arguments, run_dff,
            "Deep Feature Factorization: concepts shared by a set of images, as heat maps and overlays"),
    "demo": (_demo_arguments, run_demo,
             "run DFF on the bundled sample photographs and write pictures (colour/texture filter bank "
             "unless --model is given)"),
}
