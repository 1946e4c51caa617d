"""DFF's heat-map kernels (cuda/dff_maps.cuh, issue 7) on the CPU emulator (cuda/emu/cuda_emu.hpp),
driven by the device path's own orchestration (``_maps`` -> ``_maps_by_kernels``) with numpy arrays
standing in for device arrays, against the host path (``_maps`` with ``_NumpyOps``): the same
maxima, heat maps and labels, bit for bit. What the GPU adds (launch limits, streams, the binding's
pointer checks) is tests/test_dff.py's GPU test."""
import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
from emu_harness import build

from dffkit import deep_feature_factorization as dffm


def _build(tmp_path_factory, flags=("-O2",)):
    """tests/emu/maps_emu.cpp compiled with ``flags`` (emu_harness.build: skips where unusable)."""
    return build(tmp_path_factory, "maps_emu.cpp", flags=flags)


@pytest.fixture(scope="module")
def maps_emu(tmp_path_factory):
    return _build(tmp_path_factory)


def _span(arrays, k):
    """The float32 memory that the (h*w, k) views ``arrays`` lie in, from the lowest to the end of
    the highest, and each view's first row in it: what the kernels see through the pointers."""
    addrs = [a.__array_interface__["data"][0] for a in arrays]
    lo = min(addrs)
    hi = max(p + a.nbytes for p, a in zip(addrs, arrays))
    assert all((p - lo) % (4 * k) == 0 for p in addrs)
    mem = np.frombuffer((ctypes.c_char * (hi - lo)).from_address(lo), dtype=np.float32).copy()
    return mem, np.array([(p - lo) // (4 * k) for p in addrs], np.int64)


class _EmuKernels:
    """``dffkit._cuda_backend.dff_maps``' contract, each call one launch of the emulated kernel."""

    def __init__(self, exe, workdir, heat_blocks=3, on_device=True):
        self.exe, self.workdir, self.heat_blocks = exe, Path(workdir), heat_blocks
        self.calls, self.peak_parts, self.params_made, self.on_device = 0, [], 0, on_device

    def device_params(self):
        return self.on_device

    def _run(self, d, meta):
        (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
        done = subprocess.run([str(self.exe), str(d)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr

    def dff_maps(self, maps, taps_y, taps_x, *, h, w, parts=None, params=None, threshold=None, heat=None,
                 labels=None, fused=False, params_out=None, joint=False):
        k, n = int(maps[0].shape[1]), len(maps)
        H, W = len(taps_y) // 4, len(taps_x) // 4
        assert all(m.shape == (h * w, k) and m.dtype == np.float32 and m.flags.c_contiguous for m in maps)
        mem, offsets = _span(maps, k)
        d = self.workdir / f"call{self.calls}"
        self.calls += 1
        d.mkdir()
        meta = dict(n=n, k=k, h=h, w=w, H=H, W=W, fused=int(fused), rows=len(mem) // k)
        mem.tofile(d / "W.bin")
        offsets.tofile(d / "offsets.bin")
        np.asarray(taps_y, np.int32).tofile(d / "ty.bin")
        np.asarray(taps_x, np.int32).tofile(d / "tx.bin")
        if parts is not None:
            meta.update(step="peaks", nb=parts.shape[2])
        else:
            meta.update(step="heat", grid=self.heat_blocks,
                        threshold_bits=int(np.float32(threshold).view(np.uint32)))
            np.ascontiguousarray(params, np.float32).tofile(d / "params.bin")
        self._run(d, meta)
        if parts is not None:
            parts[...] = np.fromfile(d / "parts.bin", np.float32).reshape(parts.shape)
            self.peak_parts.append(parts.copy())
            if params_out is not None:  # the params step, a launch of its own on the peaks' parts
                meta.update(step="params", joint=int(joint), threshold_bits=int(np.float32(threshold).view(np.uint32)))
                self._run(d, meta)
                params_out[...] = np.fromfile(d / "params.bin", np.float32).reshape(params_out.shape)
                self.params_made += 1
        else:
            heat[...] = np.fromfile(d / "heat.bin", np.float32).reshape(heat.shape)
            labels[...] = np.fromfile(d / "labels.bin", np.int16).reshape(labels.shape)


def _emu_ops(kernels):
    class EmuOps(dffm._ArrayOps):
        name = "emulated"  # numpy arrays stand in for device arrays, the kernels run emulated

        def map_kernels(self):
            return kernels

    return EmuOps()


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _problem(grids, k, mode, seed, ties=False):
    """W for images of the given feature grids: joint, one stacked matrix; per image, one each."""
    rng = np.random.default_rng(seed)
    blocks = [rng.random((h * w, k), dtype=np.float32) for h, w in grids]
    if ties and k > 2:
        for b in blocks:
            b[:, 2] = b[:, 1]  # concepts 1 and 2 equal everywhere: every pixel a tie
    return [np.concatenate(blocks)] if mode == "joint" else blocks


def _compare(maps_emu, tmp_path, grids, sizes, k, mode, threshold=0.2, ties=False, seed=0, fused=None,
             monkeypatch=None):
    Ws = _problem(grids, k, mode, seed, ties)
    kernels = _EmuKernels(maps_emu, tmp_path)
    if fused is not None:
        monkeypatch.setattr(dffm, "_host_resample_fuses", lambda: fused)
    got = dffm._maps(_emu_ops(kernels), Ws, grids, sizes, mode, threshold, "argmax")
    want = dffm._maps(dffm._NumpyOps(), [w.copy() for w in Ws], grids, sizes, mode, threshold, "argmax")
    assert kernels.calls >= 2, "the kernels' branch did not run"
    return got, want, kernels


CASES = [
    # (feature grids, image sizes, k, mode)
    ([(5, 7)] * 3, [(23, 31)] * 3, 5, "joint"),                        # non-integer factors, 3 images
    ([(5, 7), (3, 4), (5, 7)], [(23, 31), (11, 9), (23, 31)], 7, "joint"),  # a gap between rows
    ([(9, 6)] * 2, [(4, 3)] * 2, 7, "per_image"),                       # downsampling, H < h, W < w
    ([(1, 1), (1, 1)], [(13, 17), (5, 2)], 1, "joint"),                 # 1 x 1 grids, k = 1
    ([(4, 6), (2, 3)], [(9, 14), (7, 7)], 5, "per_image"),              # groups of other sizes
    ([(3, 4)], [(3, 4)], 1, "per_image"),                               # the grid's own size
]


@pytest.mark.parametrize("grids, sizes, k, mode", CASES)
def test_map_kernels_give_the_host_paths_bits(maps_emu, tmp_path, monkeypatch, grids, sizes, k, mode):
    """Maxima, heat maps (bits), labels, strength and loadings as the host path, the peaks spread
    over 3 blocks a map and the pixels over 3 blocks (grid-stride); present maps peak at 1.0."""
    monkeypatch.setattr(dffm, "_peak_blocks", lambda pixels: 3)
    got, want, kernels = _compare(maps_emu, tmp_path, grids, sizes, k, mode)
    heat_g, strength_g, labels_g, load_g = got
    heat_w, strength_w, labels_w, load_w = want
    np.testing.assert_array_equal(strength_g, strength_w)
    for i in range(len(sizes)):
        assert heat_g[i].shape == heat_w[i].shape == (k,) + tuple(sizes[i])
        np.testing.assert_array_equal(_bits(heat_g[i]), _bits(heat_w[i]), err_msg=f"heat of image {i}")
        np.testing.assert_array_equal(labels_g[i], labels_w[i], err_msg=f"labels of image {i}")
        assert labels_g[i].dtype == np.int16
        np.testing.assert_array_equal(load_g[i], load_w[i])
        present = strength_g[i] >= np.float32(0.2)
        for j in range(k):
            assert heat_g[i][j].max() == (1.0 if present[j] else 0.0), (i, j)
    # the maxima themselves: the blocks' partial maxima against the host's upsampled maps
    ups = [dffm._NumpyOps().resample(np.ascontiguousarray(l.transpose(2, 0, 1))[None], *s)[0]
           for l, s in zip(load_w, sizes)]
    parts = np.concatenate([p.reshape(-1, k, 3) for p in kernels.peak_parts])
    order = [i for _, idx in _batches(grids, sizes) for i in idx]
    for t, i in enumerate(order):
        np.testing.assert_array_equal(parts[t].max(axis=1), ups[i].max(axis=(1, 2)))


def _batches(grids, sizes):
    groups = {}
    for i, key in enumerate(tuple(g) + tuple(s) for g, s in zip(grids, sizes)):
        groups.setdefault(key, []).append(i)
    return list(groups.items())


@pytest.mark.parametrize("fused", [False, True])
def test_map_kernels_in_either_arithmetic(maps_emu, tmp_path, monkeypatch, fused):
    """Both ways of blending taps: plain (every product and sum rounded) equals the numpy
    reference bit for bit; each equals the host bit for bit where the host resampler was compiled
    that way (``_host_resample_fuses``), else within an ulp, and a present map still peaks at 1."""
    host_fuses = dffm._host_resample_fuses()
    grids, sizes, k = [(5, 7), (5, 7)], [(23, 31), (23, 31)], 5
    got, want, _ = _compare(maps_emu, tmp_path, grids, sizes, k, "joint", fused=fused, monkeypatch=monkeypatch)
    Ws = _problem(grids, k, "joint", 0)
    for i in range(2):
        if fused == host_fuses:
            np.testing.assert_array_equal(_bits(got[0][i]), _bits(want[0][i]))
            np.testing.assert_array_equal(got[2][i], want[2][i])
        else:
            np.testing.assert_allclose(got[0][i], want[0][i], rtol=2.5e-7, atol=1e-7)
        assert all(got[0][i][j].max() == 1.0 for j in range(k) if got[1][i, j] >= np.float32(0.2))
    if not fused:  # the numpy reference of the plain arithmetic, with the same heat and label steps
        A = Ws[0].reshape(2, 5, 7, k).transpose(0, 3, 1, 2)
        U = dffm._reference_resample(A, 23, 31)
        peaks = np.maximum(U.max(axis=(2, 3)), 0.0).astype(np.float64)
        strength, divisors = dffm._strength_divisors(peaks, "joint", 0.2)
        heat = dffm._ArrayOps().heat(U, divisors)
        labels = dffm._ArrayOps().labels_of(heat, strength, 0.2)
        for i in range(2):
            np.testing.assert_array_equal(_bits(got[0][i]), _bits(heat[i]))
            np.testing.assert_array_equal(got[2][i], labels[i])


def test_map_kernels_ties_go_to_the_first_concept_and_background_below_threshold(maps_emu, tmp_path):
    """Concepts 1 and 2 equal (every pixel a tie between them: 2 never wins); a high threshold
    leaves background (-1) pixels and a concept absent from an image (its heat all 0)."""
    grids, sizes, k = [(6, 5), (6, 5), (6, 5)], [(17, 13)] * 3, 5
    Ws = _problem(grids, k, "joint", 3, ties=True)
    Ws[0][60:90, 3] *= 0.05  # concept 3 faint in image 2: absent at threshold 0.6
    kernels = _EmuKernels(maps_emu, tmp_path)
    got = dffm._maps(_emu_ops(kernels), Ws, grids, sizes, "joint", 0.6, "argmax")
    want = dffm._maps(dffm._NumpyOps(), [Ws[0].copy()], grids, sizes, "joint", 0.6, "argmax")
    assert not dffm._presence(got[1], 0.6)[2, 3]
    assert (got[1][:, 1] == got[1][:, 2]).all()
    for i in range(3):
        np.testing.assert_array_equal(_bits(got[0][i]), _bits(want[0][i]))
        np.testing.assert_array_equal(got[2][i], want[2][i])
        np.testing.assert_array_equal(got[0][i][1], got[0][i][2])
        assert not (got[2][i] == 2).any() and (got[2][i] == 1).any()
        assert (got[2][i] == -1).any()
    assert not got[0][2][3].any() and not (got[2][2] == 3).any()


@pytest.mark.parametrize("threshold", [0.2, 1.0])
def test_map_kernels_on_flat_maps_tie_and_meet_the_threshold_like_the_host(maps_emu, tmp_path, threshold):
    """Two flat maps (constant columns of W): heat 1 everywhere and strength 1 (per image), so
    heat * strength ties at 1.0 in every pixel (concept 0 wins) and, at threshold 1.0, equals the
    threshold: not below it, so no pixel is background."""
    grids, sizes, k = [(4, 4)], [(9, 7)], 5
    W = np.random.default_rng(5).random((16, k), dtype=np.float32)
    W[:, 0] = 0.5
    W[:, 3] = 0.5
    kernels = _EmuKernels(maps_emu, tmp_path / str(threshold))
    (tmp_path / str(threshold)).mkdir()
    got = dffm._maps(_emu_ops(kernels), [W], grids, sizes, "per_image", threshold, "argmax")
    want = dffm._maps(dffm._NumpyOps(), [W.copy()], grids, sizes, "per_image", threshold, "argmax")
    np.testing.assert_array_equal(got[2][0], want[2][0])
    np.testing.assert_array_equal(_bits(got[0][0]), _bits(want[0][0]))
    assert (got[2][0] == 0).all()


@pytest.mark.parametrize("sanitizer", ["address,undefined", "thread"])
def test_map_kernels_under_sanitizers(tmp_path_factory, tmp_path, monkeypatch, sanitizer):
    """AddressSanitizer: a read past an image's block of W (the harness holds exactly the span
    of the blocks), past the taps or the parameters, a write past heat, labels or the partial
    maxima; ThreadSanitizer: the block reduction of the maxima without its barrier. A run with
    a report exits non-zero."""
    exe = _build(tmp_path_factory, ("-O1", "-g", f"-fsanitize={sanitizer}"))
    monkeypatch.setattr(dffm, "_peak_blocks", lambda pixels: 2)
    for n, (grids, sizes, k, mode) in enumerate(CASES[1:4] if sanitizer != "thread" else CASES[3:4]):
        (tmp_path / str(n)).mkdir()
        got, want, _ = _compare(exe, tmp_path / str(n), grids, sizes, k, mode)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(_bits(got[0][i]), _bits(want[0][i]))
            np.testing.assert_array_equal(got[2][i], want[2][i])


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_params_kernel_is_the_hosts_strength_and_divisors(maps_emu, tmp_path, mode):
    """The params step on its own (dff_params_kernel), on partial maxima made to reach every
    branch: a NaN among the blocks (numpy's max keeps it: in joint mode the concept's strength is
    then 0 in every image), blocks of -inf, maxima below 0 (peak 0: absent, divisor inf), a
    maximum of -0.0 (whose strength is +0.0, as numpy's maximum with 0 makes it), a strength
    exactly at the threshold (present), one just below it, and ordinary values. The
    params' bits are the host's (``_strength_divisors`` on the maxima as ``_maps_by_kernels``
    takes them)."""
    n, k, nb, threshold = 4, 6, 5, np.float32(0.25)
    rng = np.random.default_rng(11)
    parts = rng.random((n, k, nb), dtype=np.float32) * 3
    parts[1, 0, 2] = np.nan                      # concept 0: a NaN in image 1
    parts[:, 1, :] = -np.inf                     # concept 1: blocks with no pixels but one
    parts[:, 1, 0] = [0.5, 2.0, 1.0, 0.25]
    parts[2, 2, :] = -0.5                        # concept 2 below 0 in image 2
    parts[:, 3, :] = [[0.1], [0.4], [0.099999994], [0.4]]  # concept 3: 0.25 of 0.4 exactly, and below
    parts[3, 4, :] = 0.0                         # concept 4: 0 in image 3
    parts[0, 5, :] = -0.0                        # concept 5: -0.0 in image 0 (numpy's maximum gives +0.0)
    d = tmp_path / "params"
    d.mkdir()
    meta = dict(step="params", n=n, k=k, h=1, w=1, H=1, W=1, fused=0, rows=n, nb=nb, joint=int(mode == "joint"),
                threshold_bits=int(threshold.view(np.uint32)))
    np.zeros((n, k), np.float32).tofile(d / "W.bin")
    np.arange(n, dtype=np.int64).tofile(d / "offsets.bin")
    np.zeros(4, np.int32).tofile(d / "ty.bin")
    np.zeros(4, np.int32).tofile(d / "tx.bin")
    parts.tofile(d / "parts.bin")
    (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
    done = subprocess.run([str(maps_emu), str(d)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = np.fromfile(d / "params.bin", np.float32).reshape(n, 2 * k)
    peaks = np.zeros((n, k))
    with np.errstate(invalid="ignore"):
        peaks[:] = np.maximum(parts.max(axis=2), 0.0)
        strength, divisors = dffm._strength_divisors(peaks, mode, threshold)
    want = np.concatenate([divisors, strength], axis=1).astype(np.float32)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert np.isinf(got[2, 2]) and got[2, k + 2] == 0  # below 0: absent
    if mode == "joint":
        assert (got[:, k] == 0).all() and np.isinf(got[:, 0]).all()  # the NaN reference
        assert got[0, k + 3] == threshold and got[0, 3] == np.float32(0.1)  # exactly at the threshold
        assert np.isinf(got[2, 3]) and 0 < got[2, k + 3] < threshold


def test_one_batch_goes_in_one_trip(maps_emu, tmp_path):
    """Images of one grid and size (one batch): the peaks, the params on the device and the heat
    step, with no params made on the host; a module without the params step keeps the two-trip
    path; both give the host path's bits."""
    grids, sizes, k = [(5, 7)] * 3, [(23, 31)] * 3, 5
    Ws = _problem(grids, k, "joint", 4)
    want = dffm._maps(dffm._NumpyOps(), [Ws[0].copy()], grids, sizes, "joint", 0.2, "argmax")
    for on_device in (True, False):
        (tmp_path / str(on_device)).mkdir()
        kernels = _EmuKernels(maps_emu, tmp_path / str(on_device), on_device=on_device)
        got = dffm._maps(_emu_ops(kernels), [Ws[0].copy()], grids, sizes, "joint", 0.2, "argmax")
        assert kernels.params_made == int(on_device) and kernels.calls == 2
        np.testing.assert_array_equal(got[1], want[1])
        for i in range(3):
            np.testing.assert_array_equal(_bits(got[0][i]), _bits(want[0][i]))
            np.testing.assert_array_equal(got[2][i], want[2][i])
            np.testing.assert_array_equal(got[3][i], want[3][i])
