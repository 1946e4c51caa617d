"""Deep Feature Factorization (issue 7): the pipeline, its conventions, the CLI."""
import json
import os
import warnings
from collections import OrderedDict, deque

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import dffkit
from dffkit import cli
from dffkit.deep_feature_factorization import (DFFResult, bilinear_matrix, colour_name, connected_components, dff,
                                               largest_component, mask_box, sample_images, upsample)
from dffkit.evaluation import jaccard

try:  # the extractor (issue 6); the tests that need it skip, visibly, without it
    from dffkit.features import FeatureExtractor
except ImportError as exc:  # pragma: no cover - only while features.py is missing
    FeatureExtractor = None
    _NO_EXTRACTOR = str(exc)

needs_extractor = pytest.mark.skipif(FeatureExtractor is None, reason="dffkit.features is not importable")


# ---------------------------------------------------------------------------------------------
# a synthetic co-segmentation set: a striped red/yellow ellipse on green noise or flat blue
# ---------------------------------------------------------------------------------------------

def coseg_set(n=6, size=96, seed=0):
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        H, W = size, size + 16 * (i % 3)
        if i % 2 == 0:
            bg = np.array([60, 140, 60]) + rng.normal(0, 25, (H, W, 3))
        else:
            bg = np.array([70, 90, 170]) + rng.normal(0, 8, (H, W, 3))
        y, x = np.mgrid[0:H, 0:W]
        stripe = (np.sin(2 * np.pi * (x + y) / (8 * np.sqrt(2))) > 0)[..., None]
        obj = np.where(stripe, np.array([220, 60, 40]), np.array([250, 200, 60]))
        cy, cx = rng.integers(H // 3, 2 * H // 3), rng.integers(W // 3, 2 * W // 3)
        ry, rx = rng.integers(H // 5, H // 3), rng.integers(W // 5, W // 3)
        mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        images.append(np.clip(np.where(mask[..., None], obj, bg), 0, 255).astype(np.uint8))
        masks.append(mask)
    return images, masks


def block_activations(n=3, C=8, h=6, w=10, seed=0):
    """Activations with two clean regions (top rows: channels 0..3, bottom: 4..7)."""
    rng = np.random.default_rng(seed)
    acts = np.zeros((n, C, h, w), np.float32)
    acts[:, : C // 2, : h // 2] = 1.0
    acts[:, C // 2:, h // 2:] = 1.0
    acts += rng.random(acts.shape).astype(np.float32) * 0.05
    images = [np.zeros((40 + 10 * i, 70, 3), np.uint8) + 100 for i in range(n)]
    return images, acts


def best_concept_iou(result, masks):
    return max(np.mean([jaccard(m, g) for m, g in zip(result.masks(j), masks)]) for j in range(result.n_concepts))


@pytest.fixture(scope="module")
def filterbank():
    if FeatureExtractor is None:
        pytest.skip(f"dffkit.features is not importable: {_NO_EXTRACTOR}")
    return FeatureExtractor("filterbank", providers="cpu")


# ---------------------------------------------------------------------------------------------
# quality on the synthetic set (the issue's acceptance test)
# ---------------------------------------------------------------------------------------------

@needs_extractor
def test_filterbank_joint_separates_object(filterbank):
    images, masks = coseg_set()
    result = dff(images, 3, extractor=filterbank, backend="cpu")
    iou = best_concept_iou(result, masks)
    assert iou >= 0.85, f"mean IoU of the best concept {iou:.3f}"
    assert result.model_name == "filterbank" and not result.untrained


@needs_extractor
@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_arrays_reach_dffkits_extractor_as_they_are(monkeypatch, tmp_path, mode):
    """dff hands dffkit's extractor the caller's RGB uint8 arrays themselves (at its size it
    takes their pixels without Pillow), PIL images and files as read here; the result equals
    that of the same pictures given as PIL images, and the arrays are left as they were. An
    extractor of the caller's (any callable) gets PIL images."""
    ext = FeatureExtractor("filterbank", providers="cpu", image_size=64)
    arrays, _ = coseg_set(n=3, size=64)  # 64 x 64 (at the size), 64 x 80 and 64 x 96 (resized)
    Image.fromarray(arrays[2]).save(tmp_path / "c.png")
    copies = [a.copy() for a in arrays]
    seen = []
    real = FeatureExtractor.__call__

    def kinds(images):
        return ["array" if isinstance(im, np.ndarray) else "PIL" if isinstance(im, Image.Image) else "?" for im in images]

    def spy(self, images, **kw):
        seen.append(kinds(images))
        return real(self, images, **kw)

    monkeypatch.setattr(FeatureExtractor, "__call__", spy)
    given = dff([arrays[0], arrays[1], str(tmp_path / "c.png")], 2, extractor=ext, mode=mode, backend="cpu")
    assert [t for call in seen for t in call] == ["array", "array", "PIL"]
    assert all(np.array_equal(a, c) for a, c in zip(arrays, copies))
    as_pil = dff([Image.fromarray(a) for a in arrays], 2, extractor=ext, mode=mode, backend="cpu")
    for a, b in zip(given.heatmaps + given.labels, as_pil.heatmaps + as_pil.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(given.concepts, as_pil.concepts)

    calls = []

    def own(images):
        calls.append(kinds(images))
        return ext(images)

    own.layer, own.model_name = ext.layer, ext.model_name
    dff(arrays, 2, extractor=own, mode=mode, backend="cpu")
    assert calls and all(t == "PIL" for call in calls for t in call)


@needs_extractor
def test_filterbank_per_image_separates_object(filterbank):
    images, masks = coseg_set()
    result = dff(images, 2, extractor=filterbank, mode="per_image", backend="cpu")
    per_image = [max(jaccard(result.masks(j)[i], masks[i]) for j in range(2)) for i in range(len(images))]
    assert np.mean(per_image) >= 0.85
    assert result.concepts.shape[:2] == (len(images), 2)
    assert len(result.concept_names) == len(images) and len(result.concept_names[0]) == 2


# ---------------------------------------------------------------------------------------------
# conventions of the result, on activations made here (every NMF backend)
# ---------------------------------------------------------------------------------------------

def _bilinear_oracle(a, H, W):
    """Per-pixel bilinear resampling with half-pixel centres and clamped edges."""
    h, w = a.shape
    out = np.empty((H, W))
    for y in range(H):
        sy = min(max((y + 0.5) * h / H - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); ty = sy - y0
        for x in range(W):
            sx = min(max((x + 0.5) * w / W - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); tx = sx - x0
            out[y, x] = ((1 - ty) * ((1 - tx) * a[y0, x0] + tx * a[y0, x1])
                         + ty * ((1 - tx) * a[y1, x0] + tx * a[y1, x1]))
    return out


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1, 4), (2, 4, 4, 4)])
def test_upsample_matches_oracle_and_pillow(shape):
    rng = np.random.default_rng(1)
    maps = rng.random(shape[1:]).astype(np.float32) if shape[0] == 1 else rng.random(shape[:3]).astype(np.float32)
    H, W = shape[3] * 3 + 1, shape[2] * 2 + 3
    up = upsample(maps, (H, W))
    for j in range(maps.shape[0]):
        np.testing.assert_allclose(up[j], _bilinear_oracle(maps[j].astype(np.float64), H, W), atol=1e-5)
        pil = np.asarray(Image.fromarray(maps[j], "F").resize((W, H), Image.BILINEAR))
        np.testing.assert_allclose(up[j], pil, atol=1e-5)
    np.testing.assert_allclose(bilinear_matrix(9, 4).sum(axis=1), 1.0, atol=1e-6)


def test_resampler_refuses_bad_tables():
    from dffkit import _backends
    from dffkit.deep_feature_factorization import bilinear_taps

    cpu = _backends.cpu()
    src = np.ones((2, 3, 4), np.float32)
    ty, tx = bilinear_taps(5, 3), bilinear_taps(6, 4)
    assert cpu.resample_bilinear(src, 5, 6, *ty, *tx).shape == (2, 5, 6)
    bad = (ty[0], ty[1] + 1, ty[2], ty[3])  # an index past the last row
    with pytest.raises(ValueError, match="iy1 out of range"):
        cpu.resample_bilinear(src, 5, 6, *bad, *tx)
    with pytest.raises(ValueError, match="ix0 must have 6 entries"):
        cpu.resample_bilinear(src, 5, 6, *ty, *bilinear_taps(7, 4))
    with pytest.raises(ValueError, match="planes, h, w"):
        cpu.resample_bilinear(src[0], 5, 6, *ty, *tx)


def test_heatmaps_follow_the_documented_formula(backend):
    images, acts = block_activations()
    result = dff(images, 2, activations=acts, backend=backend, random_state=3, tol=0, max_iter=50)
    X = acts.transpose(0, 2, 3, 1).reshape(-1, acts.shape[1])
    W, H, _ = dffkit.non_negative_factorization(X, n_components=2, init="random", random_state=3, tol=0,
                                                max_iter=50, backend=backend)
    W = np.asarray(W)
    n, _, h, w = acts.shape
    peaks = np.zeros((n, 2))
    for i, img in enumerate(images):
        maps = W[i * h * w:(i + 1) * h * w].T.reshape(2, h, w)
        up = np.stack([_bilinear_oracle(m, *img.shape[:2]) for m in maps.astype(np.float64)])
        peaks[i] = up.max(axis=(1, 2))
        np.testing.assert_allclose(result.heatmaps[i], up / peaks[i][:, None, None], atol=2e-4)
    np.testing.assert_allclose(result.strength, peaks / peaks.max(axis=0), atol=2e-4)
    np.testing.assert_allclose(result.concepts, np.asarray(H), rtol=1e-4, atol=1e-6)
    assert result.backend == backend


@pytest.mark.filterwarnings("ignore:n_concepts=.*channels:UserWarning")  # k > C is allowed, with a warning
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), C=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 4),
       H=st.integers(1, 30), W=st.integers(1, 30), mode=st.sampled_from(["joint", "per_image"]),
       seed=st.integers(0, 2**16))
def test_heatmap_shapes_and_ranges_for_any_sizes(n, C, h, w, k, H, W, mode, seed):
    k = min(k, h * w)
    rng = np.random.default_rng(seed)
    acts = rng.random((n, C, h, w)).astype(np.float32) * (rng.random((n, C, h, w)) < 0.7)
    acts[:, 0, 0, 0] += 0.1  # never all zero
    images = [np.zeros((H + i, W, 3), np.uint8) for i in range(n)]
    result = dff(images, k, activations=acts, mode=mode, max_iter=30)
    for i, hm in enumerate(result.heatmaps):
        assert hm.shape == (k, H + i, W) and hm.dtype == np.float32
        assert np.isfinite(hm).all() and hm.min() >= 0 and hm.max() <= 1
        peaks = hm.max(axis=(1, 2))
        assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))
        assert result.labels[i].shape == (H + i, W) and result.labels[i].min() >= -1
        assert result.labels[i].max() < k
    assert result.strength.shape == (n, k) and result.strength.max() <= 1


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_heatmap_and_label_contract(mode):
    images, acts = block_activations()
    result = dff(images, 2, activations=acts, mode=mode, threshold=0.3)
    assert isinstance(result, DFFResult) and result.n_images == 3
    for i, img in enumerate(images):
        hm = result.heatmaps[i]
        assert hm.shape == (2,) + img.shape[:2] and hm.dtype == np.float32
        assert hm.min() >= 0.0 and hm.max() <= 1.0
        for j in range(2):
            assert hm[j].max() == pytest.approx(1.0) if result.strength[i, j] > 0 else hm[j].max() == 0
        rel = hm * result.strength[i][:, None, None]
        expected = np.where(rel.max(axis=0) >= 0.3, rel.argmax(axis=0), -1)
        np.testing.assert_array_equal(result.labels[i], expected)
        assert result.labels[i].shape == img.shape[:2]
        # the two blocks get different concepts
        top, bottom = result.labels[i][2, 35], result.labels[i][-3, 35]
        assert {int(top), int(bottom)} == {0, 1}
    ref = result.strength.max(axis=0) if mode == "joint" else result.strength.max(axis=1)
    np.testing.assert_allclose(ref, 1.0, atol=1e-6)
    if mode == "joint":
        assert result.concepts.shape == (2, 8) and isinstance(result.n_iter, int)
    else:
        assert result.concepts.shape == (3, 2, 8) and len(result.n_iter) == 3
    assert result.loadings[0].shape == (6, 10, 2)


def test_kmeans_assignment_agrees_on_clean_regions():
    images, acts = block_activations()
    a = dff(images, 2, activations=acts, assign="argmax", threshold=0.0)
    b = dff(images, 2, activations=acts, assign="kmeans", threshold=0.0)
    for la, lb in zip(a.labels, b.labels):
        assert la.shape == lb.shape and set(np.unique(lb)) <= {-1, 0, 1}
        assert (la == lb).mean() > 0.95


def test_negative_activations():
    images, acts = block_activations()
    acts = acts - 0.5
    with pytest.raises(ValueError, match="negative.*negatives='clip'"):
        dff(images, 2, activations=acts)
    clipped = dff(images, 2, activations=acts, negatives="clip")
    shifted = dff(images, 2, activations=acts, negatives="shift")
    for r in (clipped, shifted):
        assert r.heatmaps[0].shape == (2, 40, 70)


def test_bad_input_gives_clear_errors():
    images, acts = block_activations(n=1, h=2, w=2)
    with pytest.raises(ValueError, match="no images"):
        dff([], 2, activations=acts)
    with pytest.raises(ValueError, match="at least 1"):
        dff(images, 0, activations=acts)
    with pytest.raises(TypeError, match="n_concepts must be an int"):
        dff(images, 2.5, activations=acts)
    with pytest.raises(ValueError, match="larger than the number of positions"):
        dff(images, 5, activations=acts)
    with pytest.raises(ValueError, match="mode must be one of"):
        dff(images, 2, activations=acts, mode="together")
    with pytest.raises(ValueError, match="threshold must be in"):
        dff(images, 2, activations=acts, threshold=2)
    with pytest.raises(ValueError, match="activations hold 1 images but 2"):
        dff(images * 2, 2, activations=acts)
    two, acts2 = block_activations(n=2, h=2, w=2)
    with pytest.raises(ValueError, match="smallest image's feature grid"):
        dff(two, 5, activations=acts2, mode="per_image")
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'tf32', 'bf16x'; got 'fp16'"):
        dff(images, 2, activations=acts, precision="fp16")


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_precision_goes_to_the_solver_and_the_result_says_what_ran(monkeypatch, mode):
    """dff's precision reaches the NMF (non_negative_factorization in joint mode, nmf_batched
    per image); the CPU engine ignores it, so its results equal fp32's and the result (and its
    JSON summary) says "fp32"."""
    from dffkit import nmf

    images, acts = block_activations(n=2, h=4, w=4)
    seen = []
    for name in ("non_negative_factorization", "nmf_batched"):
        real = getattr(nmf, name)

        def spy(*a, _real=real, **kw):
            seen.append(kw.get("precision"))
            return _real(*a, **kw)
        monkeypatch.setattr(nmf, name, spy)
    got = dff(images, 2, activations=acts, backend="cpu", mode=mode, precision="tf32", name_concepts=False)
    want = dff(images, 2, activations=acts, backend="cpu", mode=mode, name_concepts=False)
    assert seen == ["tf32", "fp32"]
    assert got.precision == want.precision == "fp32" and got.summary()["precision"] == "fp32"
    for a, b in zip(got.heatmaps, want.heatmaps):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# masks, boxes, connected components, consistency
# ---------------------------------------------------------------------------------------------

def _components_oracle(mask, connectivity):
    H, W = mask.shape
    labels = np.zeros((H, W), int)
    n = 0
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    for y in range(H):
        for x in range(W):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = n
                            queue.append((ny, nx))
    return labels, n


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_connected_components_match_flood_fill(connectivity, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.uniform(0.2, 0.7)
    labels, n = connected_components(mask, connectivity)
    expected, n_expected = _components_oracle(mask, connectivity)
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)  # both number components in raster order


def test_largest_component_box():
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:6] = True        # 9 pixels
    mask[10:18, 12:25] = True    # 104 pixels
    mask[18, 25] = True          # touches diagonally: joins with 8-connectivity
    assert mask_box(largest_component(mask)) == (12, 10, 26, 19)
    assert mask_box(largest_component(mask, connectivity=4)) == (12, 10, 25, 18)
    assert mask_box(np.zeros((3, 3), bool)) is None


def test_masks_boxes_and_consistency():
    images, acts = block_activations()
    result = dff(images, 2, activations=acts)
    top = int(result.labels[0][2, 35])
    masks = result.masks(top, 0.5)
    assert all(m.dtype == bool and m.shape == img.shape[:2] for m, img in zip(masks, images))
    for box, img in zip(result.boxes(top, 0.5), images):
        x0, y0, x1, y1 = box
        H, W = img.shape[:2]
        assert (x0, x1) == (0, W) and y0 == 0 and abs(y1 - H / 2) <= H / 6
    np.testing.assert_allclose(result.concept_consistency(), [1.0, 1.0])
    # by hand: concept 0 covers 50% of image 0 and 1% of image 1
    result.labels = [np.array([[0, 0], [1, 1]]), np.array([[1] * 99 + [0]])]
    result.heatmaps = result.heatmaps[:2]
    np.testing.assert_allclose(result.concept_consistency(min_area=0.02), [0.5, 1.0])
    with pytest.raises(ValueError, match="concept must be in 0..1"):
        result.masks(2)


# ---------------------------------------------------------------------------------------------
# pictures and files
# ---------------------------------------------------------------------------------------------

def test_overlay_and_save(tmp_path):
    images, acts = block_activations()
    result = dff(images, 2, activations=acts)
    ov = result.overlay(0)
    assert ov.mode == "RGB" and ov.width >= 70 and ov.height > 40  # legend below (as wide as its names)
    np.testing.assert_array_equal(np.asarray(ov)[:40, :70], np.asarray(result.overlay(0, legend=False)))
    written = result.save(tmp_path / "out")
    assert len(written["overlays"]) == 3 and len(written["heatmaps"]) == 6
    for kind in ("overlays", "heatmaps", "grid"):
        for path in written[kind]:
            with Image.open(path) as im:
                im.verify()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_concepts"] == 2 and len(summary["images"]) == 3
    assert summary["images"][0]["size"] == [40, 70]


def test_save_on_threads_writes_the_same_files(tmp_path):
    """Pictures drawn and encoded on several threads: the same files, byte for byte, listed
    in the same order as on one thread; heat maps over the photo as heatmap_image draws them."""
    from dffkit import visualize

    images, acts = block_activations(n=5)
    result = dff(images, 3, activations=acts)
    one = result.save(tmp_path / "one", workers=1)
    many = result.save(tmp_path / "many", workers=3)
    for kind in ("overlays", "heatmaps", "grid"):
        assert [os.path.relpath(p, tmp_path / "one") for p in one[kind]] == \
            [os.path.relpath(p, tmp_path / "many") for p in many[kind]]
        for a, b in zip(one[kind], many[kind]):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read(), a
    with Image.open(one["heatmaps"][4]) as im:  # image 1, concept 1
        np.testing.assert_array_equal(np.asarray(im), np.asarray(result.heatmap_image(1, 1)))
    photo = np.asarray(result.images[1])
    over = visualize.heatmap_over(result.heatmaps[1][1], visualize.desaturate(photo))
    np.testing.assert_array_equal(np.asarray(over), np.asarray(visualize.heatmap_image(result.heatmaps[1][1], photo)))
    with pytest.raises(ValueError, match="workers must be a positive int"):
        result.save(tmp_path / "bad", workers=0)


def test_filterbank_concepts_are_named_by_the_mean_colour_of_their_pixels():
    """Hand-made labels over photos of known colours: the mean of each concept's pixels (the
    background, -1, left out), per image and over the set; a concept with no pixel is absent."""
    from dffkit.deep_feature_factorization import _colour_names

    a = np.zeros((4, 6, 3), np.uint8)
    a[:, :3] = (200, 30, 30)     # red, concept 0
    a[:, 3:] = (40, 70, 200)     # blue, concept 1
    a[0] = (50, 160, 50)         # green row: background
    lab_a = np.where(np.arange(6)[None, :] < 3, 0, 1).repeat(4, 0).astype(np.int16)
    lab_a[0] = -1
    b = np.full((2, 5, 3), (235, 220, 50), np.uint8)  # yellow: concept 0 only
    lab_b = np.zeros((2, 5), np.int16)
    names = _colour_names([Image.fromarray(a), Image.fromarray(b)], [lab_a, lab_b], 3, per_image=True)
    assert names == [["red region", "blue region", "absent"], ["yellow region", "absent", "absent"]]
    # over the set, concept 0 mixes 9 red and 10 yellow pixels: (9 red + 10 yellow) / 19
    mixed = (9 * np.array([200, 30, 30]) + 10 * np.array([235, 220, 50])) / 19
    joint = _colour_names([Image.fromarray(a), Image.fromarray(b)], [lab_a, lab_b], 3, per_image=False)
    assert joint == [f"{colour_name(mixed)} region", "blue region", "absent"]
    # two concepts of one colour are told apart; absent ones stay "absent"
    c = np.full((2, 6, 3), (200, 30, 30), np.uint8)
    lab_c = np.array([[0, 0, 1, 1, 3, 3]] * 2, np.int16)
    assert _colour_names([Image.fromarray(c)], [lab_c], 5, per_image=False) == [
        "red region", "red region 2", "absent", "red region 3", "absent"]


@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("assign", ["argmax", "kmeans"])
def test_maps_computed_when_read_equal_the_kept_ones(mode, assign, tmp_path):
    """keep_maps=False: heat maps and labels computed image by image when read, against the
    ones kept in memory (images of three sizes); everything built on them agrees; at most
    two images' maps are held."""
    images, acts = block_activations(n=4)
    kw = dict(activations=acts, mode=mode, assign=assign)
    kept = dff(images, 2, **kw)
    lazy = dff(images, 2, keep_maps=False, **kw)
    assert isinstance(kept.heatmaps, list) and not isinstance(lazy.heatmaps, list)
    assert len(lazy.heatmaps) == len(lazy.labels) == lazy.n_images == 4
    assert "computed when read" in repr(lazy.heatmaps)
    np.testing.assert_array_equal(lazy.strength, kept.strength)
    for i in (2, 0, 3, 1, -1):
        np.testing.assert_allclose(lazy.heatmaps[i], kept.heatmaps[i], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(lazy.labels[i], kept.labels[i])
        assert lazy.heatmaps[i].dtype == np.float32 and lazy.labels[i].dtype == np.int16
    assert [h.shape for h in lazy.heatmaps[1:3]] == [h.shape for h in kept.heatmaps[1:3]]
    assert len(lazy.heatmaps._source._held) <= 2
    for j in range(2):
        assert [m.tolist() for m in lazy.masks(j)] == [m.tolist() for m in kept.masks(j)]
        assert lazy.boxes(j) == kept.boxes(j)
    np.testing.assert_array_equal(lazy.concept_consistency(), kept.concept_consistency())
    summaries = [r.summary() for r in (lazy, kept)]
    for summary in summaries:
        summary.pop("timings_s")
    assert summaries[0] == summaries[1]
    a, b = lazy.save(tmp_path / "lazy"), kept.save(tmp_path / "kept")
    for x, y in zip(a["heatmaps"] + a["overlays"], b["heatmaps"] + b["overlays"]):
        with Image.open(x) as u, Image.open(y) as v:
            assert np.abs(np.asarray(u, np.int16) - np.asarray(v, np.int16)).max() <= 1
    with pytest.raises(IndexError):
        lazy.heatmaps[4]
    with pytest.raises(TypeError):
        lazy.labels["0"]
    import pickle

    again = pickle.loads(pickle.dumps(lazy))
    np.testing.assert_array_equal(again.heatmaps[1], lazy.heatmaps[1])
    np.testing.assert_array_equal(again.labels[3], lazy.labels[3])


def test_keep_maps_auto_and_bad_values(monkeypatch):
    from dffkit import deep_feature_factorization as dff_module

    images, acts = block_activations(n=2)
    assert isinstance(dff(images, 2, activations=acts, keep_maps="auto").heatmaps, list)
    monkeypatch.setattr(dff_module, "KEEP_MAPS_BYTES", 1000)  # the maps here take 2 x 2800 x 10 bytes
    assert not isinstance(dff(images, 2, activations=acts, keep_maps="auto").heatmaps, list)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="keep_maps must be True, False or 'auto'"):
            dff(images, 2, activations=acts, keep_maps=bad)


def test_device_array_library_order(monkeypatch):
    """CuPy first, PyTorch where DFFKIT_DEVICE_ARRAYS=torch; each skipped when it does not
    import (stand-in modules here)."""
    import sys
    import types

    from dffkit import deep_feature_factorization as dff_module

    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    monkeypatch.delenv("DFFKIT_DEVICE_ARRAYS", raising=False)
    assert dff_module._first_array_library().name == "cupy"
    monkeypatch.setenv("DFFKIT_DEVICE_ARRAYS", "torch")
    assert dff_module._first_array_library().name == "torch"
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    assert dff_module._first_array_library().name == "cupy"
    monkeypatch.setenv("DFFKIT_DEVICE_ARRAYS", "jax")
    with pytest.raises(ValueError, match="DFFKIT_DEVICE_ARRAYS must be"):
        dff_module._first_array_library()


def test_colormap_table_is_within_one_level_of_the_interpolation():
    from dffkit import visualize

    values = np.concatenate([np.random.default_rng(41).random(20000), np.linspace(0, 1, 1001), [-1.0, 2.0]])
    for name, anchors in visualize.COLORMAPS.items():
        a = np.asarray(anchors, np.float64)
        x = np.clip(values, 0, 1) * (len(a) - 1)
        i0 = np.minimum(x.astype(int), len(a) - 2)
        exact = a[i0] * (1 - (x - i0))[:, None] + a[i0 + 1] * (x - i0)[:, None]
        got = visualize.apply_colormap(values.reshape(1, -1), name)[0].astype(np.float64)
        assert np.abs(got - exact).max() <= 1.0, name
        assert tuple(got[-2]) == tuple(anchors[0]) and tuple(got[-1]) == tuple(anchors[-1])
    special = visualize.apply_colormap(np.array([[np.nan, np.inf, -np.inf]]))
    assert [tuple(c) for c in special[0]] == [COLOURS_VIRIDIS_ENDS[0], COLOURS_VIRIDIS_ENDS[1], COLOURS_VIRIDIS_ENDS[0]]


COLOURS_VIRIDIS_ENDS = ((68, 1, 84), (253, 231, 37))


@needs_extractor
def test_random_vgg16_path_runs_and_is_labelled_untrained(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = FeatureExtractor("vgg16", providers="cpu", image_size=64, batch_size=2)
    images, _ = coseg_set(n=3, size=48)
    for mode in ("joint", "per_image"):
        result = dff(images, 3, extractor=ext, mode=mode, max_iter=50)
        assert result.untrained and result.layer == ext.layer
        assert [r.shape for r in result.heatmaps] == [(3,) + im.shape[:2] for im in images]
        assert result.feature_sizes == [(4, 4)] * 3
        assert result.concepts.shape[-1] == 512
    assert "untrained" in result.summary()["note"]
    assert "UNTRAINED" in result._caption()


@needs_extractor
def test_concepts_named_through_the_classifier_head():
    from dffkit import models

    proto = models._build_vgg16_random(True, 0, widths=(4, 4, 8, 8, 8), fc_dims=(16, 16, 1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = FeatureExtractor(proto, providers="cpu")
    images, _ = coseg_set(n=2, size=48)
    result = dff(images, 2, extractor=ext, max_iter=30)
    classes = result.concept_classes
    assert len(classes) == 2 and len(classes[0]) == 5
    assert all(name in models.imagenet_classes() for name, _ in classes[0])
    assert result.concept_names[0].endswith("(untrained)")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

@needs_extractor
def test_cli_dff_writes_the_promised_files(tmp_path, capsys):
    images, _ = coseg_set(n=3, size=64)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(im).save(paths[-1])
    out = tmp_path / "out"
    rc = cli.main(["dff", *paths, "-k", "3", "--out", str(out), "--backend", "cpu"])
    assert rc == 0
    text = capsys.readouterr()
    assert str(out.resolve()) in text.out and "features [" + "#" * 30 + "] 3/3 images" in text.err
    assert "pictures [" + "#" * 30 + "] 3/3 images" in text.err  # the bar over the pictures written
    assert "read " in text.out and " s, pictures " in text.out  # where the time went
    files = sorted(p.name for p in out.iterdir())
    assert "grid.png" in files and "summary.json" in files
    assert len([f for f in files if f.startswith("overlay_")]) == 3
    assert len(list((out / "heatmaps").iterdir())) == 9
    for p in list(out.glob("*.png")) + list((out / "heatmaps").glob("*.png")):
        with Image.open(p) as im:
            im.load()
    rc = cli.main(["dff", *paths, "-k", "2", "--per-image", "--out", str(tmp_path / "pi"), "--quiet", "--no-heatmaps",
                   "--precision", "tf32", "--backend", "cpu"])
    assert rc == 0 and not (tmp_path / "pi" / "heatmaps").exists()
    assert json.loads((tmp_path / "pi" / "summary.json").read_text())["precision"] == "fp32"  # the CPU's
    assert "[" not in capsys.readouterr().err  # --quiet: no bars


def test_progress_over_images_and_pictures(tmp_path):
    images, acts = block_activations(n=4)
    seen = []
    result = dff(images, 2, activations=acts, progress=lambda done, total: seen.append((done, total)))
    assert seen == []  # activations given: no extraction to report
    ext = _StandInHostExtractor(acts)
    seen.clear()
    dff(images, 2, extractor=ext, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 4), (2, 4), (4, 4)]
    seen.clear()
    result.save(tmp_path / "out", workers=3, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # counted under a lock: in order


@pytest.mark.parametrize("progress", ["a", 0, 1.0, [1]])
def test_progress_of_another_kind_is_a_type_error_before_any_work(tmp_path, progress):
    # anything but None, a bool or a callable was drawn as a bar (0 and "no" included)
    images, acts = block_activations(n=2)
    ext = _StandInHostExtractor(acts)
    with pytest.raises(TypeError, match="progress must be None or False"):
        dff(images, 2, extractor=ext, progress=progress)
    assert ext.start == 0  # no image was extracted
    result = dff(images, 2, activations=acts, progress=False)
    with pytest.raises(TypeError, match="progress must be"):
        result.save(tmp_path / "out", progress=progress)
    assert not (tmp_path / "out").exists()


def test_cli_info_says_backends_and_threads(capsys, monkeypatch):
    monkeypatch.setenv("DFFKIT_IO_THREADS", "3")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "'cpu'" in out and "image_threads:   3" in out
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "cpu" in info["backends"] and info["image_threads"] == 3
    monkeypatch.setenv("DFFKIT_IO_THREADS", "zero")
    assert cli.main(["info"]) == 0
    assert "image_threads:   invalid: DFFKIT_IO_THREADS must be a positive integer" in capsys.readouterr().out


def test_cli_dff_errors(tmp_path, capsys):
    assert cli.main(["dff", str(tmp_path / "missing.jpg"), "-k", "2"]) == 1
    assert "no such image file" in capsys.readouterr().err
    assert cli.main(["dff", str(tmp_path), "-k", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err


@needs_extractor
def test_cli_demo(tmp_path, capsys):
    assert len(sample_images()) == 4
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "colour and texture" in captured.err and "vgg16" in captured.err
    assert str(out.resolve()) in captured.out
    assert len(list(out.glob("overlay_*.png"))) == 4 and (out / "grid.png").is_file()


class _StandInHostExtractor:
    """A host extractor handing out precomputed activations, batch_size (2) at a time."""

    provider, layer, model_name, untrained, batch_size, resize, image_size = (
        "CPUExecutionProvider", "x", "stand-in", False, 2, "fixed", (8, 8))
    device = False

    def __init__(self, acts):
        self.acts, self.start = acts, 0

    def __call__(self, images, device_output=False):
        assert device_output == self.device
        out = self.acts[self.start:self.start + len(images)]
        self.start += len(images)
        return out


class _StandInDeviceExtractor(_StandInHostExtractor):
    """The same, claiming the CUDA provider (its activations "on the device")."""

    provider, device = "CUDAExecutionProvider", True


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_device_branch_runs_with_a_stand_in_array_library(monkeypatch, mode):
    from dffkit import deep_feature_factorization as dff_module

    class StandInOps(dff_module._ArrayOps):
        name = "stand-in"  # takes the device branches: the array-API steps CuPy runs, on numpy

    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: StandInOps())
    images, acts = block_activations(n=3)
    on_device = dff(images, 2, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu")
    host = dff(images, 2, activations=acts, mode=mode, backend="cpu")
    assert on_device.device_path and not host.device_path
    for a, b in zip(on_device.heatmaps, host.heatmaps):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(on_device.labels, host.labels):
        np.testing.assert_array_equal(a, b)
    # maxima on the device, maps computed on the host when read
    lazy = dff(images, 2, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", keep_maps=False)
    assert lazy.device_path
    for i in range(3):
        np.testing.assert_allclose(lazy.heatmaps[i], host.heatmaps[i], atol=1e-6)
        np.testing.assert_array_equal(lazy.labels[i], host.labels[i])


def test_host_map_steps_equal_the_array_api_steps():
    """The host's in-place, plane-by-plane steps against the batched array-API ones (what
    CuPy runs): upsampling within float32 rounding of a float64 reference; heat and labels
    the same bits, ties going to the first concept, -1 below the threshold."""
    from dffkit import deep_feature_factorization as dff_module

    rng = np.random.default_rng(40)
    host, generic = dff_module._NumpyOps(), dff_module._ArrayOps()
    A = rng.random((3, 4, 5, 6), dtype=np.float32)
    Ry, RxT = bilinear_matrix(23, 5), np.ascontiguousarray(bilinear_matrix(17, 6).T)
    U = host.resample(A, 23, 17)
    ref = np.einsum("Hh,nkhw,wW->nkHW", Ry.astype(np.float64), A.astype(np.float64), RxT.astype(np.float64))
    assert U.shape == (3, 4, 23, 17) and U.flags.c_contiguous
    np.testing.assert_allclose(U, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(generic.upsample(A, Ry, RxT), ref, rtol=1e-6, atol=1e-7)
    # the host's separable resampler (what dff uses on the host), up and down, one thread and a
    # team (over a million output samples)
    for shape, (H, W) in (((3, 4, 5, 6), (23, 17)), ((1, 2, 9, 7), (4, 3)), ((2, 3, 14, 14), (480, 400))):
        A = rng.random(shape, dtype=np.float32)
        Ry = bilinear_matrix(H, shape[2]).astype(np.float64)
        Rx = bilinear_matrix(W, shape[3]).astype(np.float64)
        R = host.resample(A, H, W)
        assert R.shape == shape[:2] + (H, W) and R.dtype == np.float32 and R.flags.c_contiguous
        np.testing.assert_allclose(R, np.einsum("Hh,nkhw,Ww->nkHW", Ry, A.astype(np.float64), Rx),
                                   rtol=1e-6, atol=1e-7)

    U = rng.random((3, 4, 23, 17), dtype=np.float32) * 2
    U[:, 2] = U[:, 1]  # exact ties between concepts 1 and 2
    inv = rng.random((3, 4)).astype(np.float32) + 0.5
    inv[:, 2] = inv[:, 1]
    strength = np.ones((3, 4), np.float32)
    strength[:, 0] = 0.3
    want_heat = generic.heat(U.copy(), inv)
    got_heat = host.heat(U.copy(), inv)
    np.testing.assert_array_equal(got_heat, want_heat)
    for threshold in (0.0, 0.5, 0.9):
        want = generic.labels_of(want_heat, strength, threshold)
        got = host.labels_of(got_heat, strength, threshold)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int16 and (got == 2).sum() == 0  # a tie never picks the later one
    assert (host.labels_of(got_heat, strength, 0.9) == -1).any()


# ---------------------------------------------------------------------------------------------
# GPU: the device path gives the host path's maps
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_extractor
def test_device_path_matches_host():
    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    images, masks = coseg_set()
    try:
        gpu_ext = FeatureExtractor("filterbank", providers="cuda")
    except RuntimeError as exc:
        pytest.skip(f"onnxruntime's CUDA provider is not usable: {exc}")
    gpu = dff(images, 3, extractor=gpu_ext, backend="cuda", tol=0, max_iter=100)
    cpu = dff(images, 3, extractor=FeatureExtractor("filterbank", providers="cpu"), backend="cpu", tol=0, max_iter=100)
    assert gpu.backend == "cuda" and gpu.provider == "CUDAExecutionProvider"
    for a, b in zip(gpu.heatmaps, cpu.heatmaps):  # same Philox start: fp32 rounding apart
        assert a.shape == b.shape and np.abs(a - b).mean() < 1e-2
    assert best_concept_iou(gpu, masks) >= 0.85
    import importlib.util

    if importlib.util.find_spec("cupy") or importlib.util.find_spec("torch"):
        assert gpu.device_path, "activations should have stayed on the GPU"


def test_a_folder_of_images_and_sources(tmp_path):
    images, acts = block_activations(n=2)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"b{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    result = dff(tmp_path, 2, activations=acts)
    assert [os.path.basename(s) for s in result.sources] == ["b0.png", "b1.png"]
    assert result.concept_names == ["concept 0", "concept 1"]
    result = dff(images, 2, activations=acts, keep_images=False)
    with pytest.raises(ValueError, match="keeps no images"):
        result.overlay(0)


def test_visualize_building_blocks():
    from dffkit import visualize

    assert visualize.concept_colors(3).shape == (3, 3)
    many = visualize.concept_colors(25)
    assert len({tuple(c) for c in many}) == 25
    cm = visualize.apply_colormap(np.array([[0.0, 1.0, 2.0, np.nan]]))
    assert tuple(cm[0, 0]) == (68, 1, 84) and tuple(cm[0, 1]) == (253, 231, 37)
    assert tuple(cm[0, 2]) == (253, 231, 37) and tuple(cm[0, 3]) == (68, 1, 84)  # clipped, NaN as 0
    with pytest.raises(ValueError, match="colour map"):
        visualize.apply_colormap(np.zeros((2, 2)), "jet")
    photo = np.full((10, 12, 3), 200, np.uint8)
    heat = np.zeros((2, 10, 12), np.float32)
    heat[0, :, :6] = 1.0
    out = np.asarray(visualize.overlay(photo, heat, opacity=1.0))
    np.testing.assert_array_equal(out[0, 0], visualize.concept_colors(2)[0])   # fully painted
    np.testing.assert_array_equal(out[0, 11], visualize.desaturate(photo)[0, 11])  # untouched
    lab = visualize.label_image(np.array([[0, 1], [-1, 1]]))
    assert lab.size == (2, 2) and lab.getpixel((0, 1)) == (0, 0, 0)
    tiles = [Image.new("RGB", (40, 20)), Image.new("RGB", (20, 40)), Image.new("RGB", (30, 30))]
    g = visualize.grid(tiles, ["a", "b", "a very long caption that will not fit"], cell=50)
    assert g.size == (2 * 54 + 4, 2 * (50 + 18 + 4) + 4)


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_device_failure_falls_back_to_the_host(monkeypatch, mode):
    """The first failure on the device path: one warning, the host from there on (per image:
    the later extractor batches of the pipeline too), the host path's maps."""
    from dffkit import deep_feature_factorization as dff_module

    class StandInOps(dff_module._NumpyOps):
        name = "stand-in"

    class Flaky(_StandInDeviceExtractor):
        device_calls = 0

        def __call__(self, images, device_output=False):
            if device_output:
                self.device_calls += 1
                raise RuntimeError("no device buffer today")
            return super().__call__(images, device_output=True)

    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: StandInOps())
    images, acts = block_activations(n=5)
    ext = Flaky(acts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dff(images, 2, extractor=ext, backend="cpu", mode=mode)
    assert len([w for w in caught if "continuing on the host" in str(w.message)]) == 1 == ext.device_calls
    assert not result.device_path
    host = dff(images, 2, activations=acts, backend="cpu", mode=mode)
    for a, b in zip(result.heatmaps, host.heatmaps):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dffkit_dff_stays_callable_after_the_module_is_imported():
    import importlib

    importlib.import_module("dffkit.deep_feature_factorization")  # dffkit.dff stays the function
    images, acts = block_activations(n=1)
    assert isinstance(dffkit.dff(images, 2, activations=acts), DFFResult)
    assert isinstance(dffkit.dff(images, 2, activations=acts), DFFResult)
    assert dffkit.DFFResult is DFFResult


# ---------------------------------------------------------------------------------------------
# regressions: exact peaks, absent concepts, sources, non-finite activations, the CLI's output
# ---------------------------------------------------------------------------------------------

def _peaks_off_by_one_ulp(n=4, seed=0):
    """float32 peaks whose float32 inverse does not bring them back to 1 (p * (1/p) < 1)."""
    rng = np.random.default_rng(seed)
    p = rng.random(4000).astype(np.float32) + np.float32(0.01)
    inv = (1.0 / p.astype(np.float64)).astype(np.float32)
    bad = p[p * inv < 1]
    assert len(bad) >= n
    return bad[:n]


def test_heat_steps_give_exactly_one_at_the_peak():
    """Host (in place) and array-API (CuPy, PyTorch) heat steps: the peak's pixel is exactly
    1.0 for peaks whose float32 inverse rounds down; absent concepts (infinite divisor) are 0."""
    from dffkit import deep_feature_factorization as dff_module

    peaks = _peaks_off_by_one_ulp(6)
    U = np.random.default_rng(1).random((2, 3, 5, 7), dtype=np.float32)
    U *= peaks.reshape(2, 3)[:, :, None, None] / U.max(axis=(2, 3), keepdims=True)
    U[0, 1, 2, 3] = peaks.reshape(2, 3)[0, 1]  # the peak itself, exactly
    present = np.ones((2, 3), bool)
    present[1, 2] = False
    divisors = dff_module._divisors(U.max(axis=(2, 3)), present)
    for ops in (dff_module._NumpyOps(), dff_module._ArrayOps()):
        heat = ops.heat(U.copy(), divisors)
        maxima = heat.max(axis=(2, 3))
        assert np.all(maxima[present] == 1.0), maxima
        assert not heat[1, 2].any()
        assert heat.min() >= 0


@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("keep_maps", [True, False])
def test_every_present_map_peaks_at_exactly_one(mode, keep_maps):
    """Over several k, both modes, maps kept or computed when read: the maximum of every
    present concept's map is 1.0 exactly, so masks(j, 1.0) is never empty there and boxes(j,
    1.0) never None; absent concepts' maps are all 0."""
    rng = np.random.default_rng(7)
    images = [np.zeros((37 + 5 * i, 53, 3), np.uint8) for i in range(3)]
    acts = rng.random((3, 6, 5, 7)).astype(np.float32)
    for k in (2, 3, 4, 6):
        result = dff(images, k, activations=acts, mode=mode, keep_maps=keep_maps, max_iter=40, threshold=0.1)
        present = result.present
        assert present.any()
        for j in range(k):
            masks, boxes = result.masks(j, 1.0), result.boxes(j, 1.0)
            for i in range(3):
                peak = float(result.heatmaps[i][j].max())
                if present[i, j]:
                    assert peak == 1.0, (k, i, j, peak)
                    assert masks[i].any() and boxes[i] is not None
                else:
                    assert peak == 0.0 and not masks[i].any() and boxes[i] is None


def test_device_branch_maps_peak_at_exactly_one(monkeypatch):
    """The array-API (GPU) branch, on numpy through a stand-in library: exact peaks too,
    kept and computed on the host when read (maxima found on the "device")."""
    from dffkit import deep_feature_factorization as dff_module

    class StandInOps(dff_module._ArrayOps):
        name = "stand-in"

    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: StandInOps())
    rng = np.random.default_rng(3)
    acts = rng.random((4, 6, 5, 7)).astype(np.float32)
    images = [np.zeros((41, 59, 3), np.uint8)] * 4
    for keep_maps in (True, False):
        for k in (3, 5):
            result = dff(images, k, extractor=_StandInDeviceExtractor(acts), backend="cpu", keep_maps=keep_maps,
                         max_iter=40, threshold=0.1)
            assert result.device_path
            for i in range(4):
                for j in range(k):
                    assert float(result.heatmaps[i][j].max()) == (1.0 if result.present[i, j] else 0.0)


def _one_concept_missing():
    """Image 0 holds regions of concepts A (channels 0..3) and B (4..7); image 1 only B, with
    a faint trace of A (1% of its level)."""
    rng = np.random.default_rng(0)
    acts = np.zeros((2, 8, 6, 6), np.float32)
    acts[0, :4, :3] = 1.0
    acts[0, 4:, 3:] = 1.0
    acts[1, 4:] = 1.0
    acts[1, :4, 2, 2] = 0.01
    acts += rng.random(acts.shape).astype(np.float32) * 1e-3
    return [np.zeros((48, 48, 3), np.uint8) + 100] * 2, acts


@pytest.mark.parametrize("keep_maps", [True, False])
def test_a_concept_absent_from_an_image_has_no_map_mask_or_box(keep_maps):
    images, acts = _one_concept_missing()
    result = dff(images, 2, activations=acts, keep_maps=keep_maps)
    a = int(result.labels[0][5, 24])  # concept A: the top half of image 0
    b = 1 - a
    assert result.strength[1, a] < result.threshold  # A is only a trace in image 1
    np.testing.assert_array_equal(result.present, [[True, True], [a == 1, a == 0]])
    assert not result.heatmaps[1][a].any() and result.heatmaps[1][b].max() == 1.0
    assert not result.masks(a)[1].any() and not result.masks(a, 0.0)[1].any()
    assert result.boxes(a)[1] is None and result.boxes(a)[0] is not None
    assert result.masks(a)[0].any() and result.masks(b)[1].all()
    np.testing.assert_allclose(result.concept_consistency()[[a, b]], [0.5, 1.0])
    summary = result.summary()
    assert summary["images"][1]["boxes"][a] is None and summary["images"][1]["boxes"][b] is not None
    assert summary["images"][1]["present"][a] is False and summary["images"][0]["present"] == [True, True]
    assert summary["images"][1]["strength"][a] == pytest.approx(float(result.strength[1, a]), abs=1e-4)
    # presence follows the labels' threshold: with threshold 0 the trace counts as present
    loose = dff(images, 2, activations=acts, keep_maps=keep_maps, threshold=0.0)
    assert loose.present.all() and loose.heatmaps[1][a].max() == 1.0


@needs_extractor
def test_absent_concept_on_real_pixels(filterbank):
    """The audit's case: a red square on blue, and an all-green image (no red, no blue)."""
    rng = np.random.default_rng(0)
    a = np.full((64, 64, 3), (30, 60, 200), np.float32)
    a[16:48, 16:48] = (220, 30, 30)
    b = np.full((64, 64, 3), (40, 180, 40), np.float32)
    a, b = (np.clip(x + rng.normal(0, 6, x.shape), 0, 255).astype(np.uint8) for x in (a, b))
    result = dff([a, b], 3, extractor=filterbank, backend="cpu")
    green = int(np.bincount(result.labels[1].ravel() + 1).argmax()) - 1
    for j in range(3):
        if j == green:
            continue
        assert not result.present[1, j], result.strength[1]
        assert not result.heatmaps[1][j].any() and not result.masks(j)[1].any() and result.boxes(j)[1] is None
        assert result.summary()["images"][1]["boxes"][j] is None
        assert result.present[0, j] and result.boxes(j)[0] is not None


def test_sources_keep_the_names_of_single_paths_and_iterators(tmp_path):
    import pathlib

    images, acts = block_activations(n=2)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"pic{i}.png"))
        Image.fromarray(im).save(paths[-1])
    one = acts[:1]
    assert dff(paths[0], 2, activations=one).sources == [paths[0]]
    assert dff(pathlib.Path(paths[0]), 2, activations=one).sources == [paths[0]]
    assert dff(iter(paths), 2, activations=acts).sources == paths
    assert dff((p for p in paths), 2, activations=acts).sources == paths
    assert dff([tmp_path], 2, activations=acts).sources == paths  # a folder inside a list
    with open(paths[1], "rb") as f:
        assert dff([Image.open(paths[0]), f], 2, activations=acts).sources == paths
    assert dff(list(images), 2, activations=acts).sources == ["image_0", "image_1"]
    written = dff(paths[1], 2, activations=acts[1:]).save(tmp_path / "out", heatmaps=False)
    assert [os.path.basename(p) for p in written["overlays"]] == ["overlay_000_pic1.png"]
    given = list(paths)
    dff(given, 2, activations=acts)
    assert given == paths  # the caller's list is left alone


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations_are_named_as_such(bad):
    images, acts = block_activations(n=3)
    acts = acts.copy()
    acts[1, 0, 0, 0] = bad
    for negatives in ("error", "clip", "shift"):
        with pytest.raises(ValueError, match=r"the activations you passed hold NaN or infinite values, "
                                             r"in image 1 \(image_1\)") as info:
            dff(images, 2, activations=acts, negatives=negatives)
        assert "negative values" not in str(info.value) and "layer None" not in str(info.value)
    with pytest.raises(ValueError, match="in image 1 "):
        dff(images, 2, activations=acts, mode="per_image")
    with pytest.raises(ValueError, match="activations of layer 'x' hold NaN"):
        dff(images, 2, extractor=_StandInHostExtractor(acts))
    with pytest.raises(ValueError, match=r"the activations you passed have negative values \(minimum -0.5"):
        dff(images, 2, activations=np.nan_to_num(acts, nan=0, posinf=0, neginf=0) - 0.5)


def _fail_if_run(*args, **kwargs):
    raise AssertionError("the work ran although the output location is unusable")


def test_cli_refuses_an_unusable_output_before_the_work(tmp_path, capsys, monkeypatch):
    from dffkit import deep_feature_factorization as dff_module

    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(dff_module, "dff", _fail_if_run)
    cases = [
        (["dff", str(image), "-k", "2", "--out", str(afile)], "is a file, not a folder"),
        (["dff", str(image), "-k", "2", "--out", str(afile / "sub")], "lies under"),
        (["demo", "--out", str(afile), "--quiet"], "is a file, not a folder"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert f"dffkit {argv[0]}: error: --out {argv[argv.index('--out') + 1]}" in err and message in err
        assert "Traceback" not in err
    assert afile.read_text() == "x"
    # a folder nothing can be written into (read-only, immutable, full): the probe fails
    from dffkit import cli as cli_module

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_module.tempfile, "mkstemp", denied)
    assert cli.main(["dff", str(image), "-k", "2", "--out", str(tmp_path / "ro")]) == 1
    assert "cannot write into the folder" in capsys.readouterr().err


def test_cli_turns_os_errors_into_one_line(tmp_path, capsys, monkeypatch):
    from dffkit import deep_feature_factorization as dff_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "grid.png"))

    monkeypatch.setattr(dff_module, "dff", disk_full)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    assert cli.main(["dff", str(image), "-k", "2", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    grid = tmp_path / "out" / "grid.png"
    assert err.strip().endswith(f"dffkit dff: error: cannot use {grid}: No space left on device")


def test_save_names_a_file_in_the_way(tmp_path):
    images, acts = block_activations(n=1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile is a file, not a folder"):
        dff(images, 2, activations=acts).save(tmp_path / "afile")


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_cli_image_size_must_be_a_positive_int(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["dff", "img.png", "-k", "2", "--image-size", value])
    assert info.value.code == 2
    assert "argument --image-size: must be a positive int (pixels)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# audit fixes: inputs, argument checks, save() and summary, warnings
# ---------------------------------------------------------------------------------------------

def test_a_numpy_array_of_paths_and_a_memoryview_are_read(tmp_path):
    """np.array(paths) was refused as one (N,) image; a memoryview was iterated as ints."""
    images, acts = block_activations(n=2)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"pic{i}.png"))
        Image.fromarray(im).save(paths[-1])
    for array in (np.array(paths), np.array(paths, dtype=object)):
        result = dff(array, 2, activations=acts)
        assert result.sources == paths and result.image_sizes == [(40, 70), (50, 70)]
    data = open(paths[1], "rb").read()
    result = dff(memoryview(data), 2, activations=acts[1:])
    assert result.image_sizes == [(50, 70)] and result.sources == ["image_0"]
    np.testing.assert_array_equal(np.asarray(result.images[0]), images[1])


def test_picture_methods_check_the_image_index():
    """overlay(4), heatmap_image(9, 0) gave bare IndexErrors, overlay(1.0) a list TypeError."""
    images, acts = block_activations(n=4)
    result = dff(images, 2, activations=acts)
    for call in (lambda: result.overlay(4), lambda: result.heatmap_image(9, 0), lambda: result.overlay(-5)):
        with pytest.raises(IndexError, match=r"image index i=-?\d out of range: this result has 4 images, "
                                             r"pass 0..3 \(or -4..-1 from the end\)"):
            call()
    for bad in (1.0, "0", True, None):
        with pytest.raises(TypeError, match=r"the image index i must be an int in 0..3"):
            result.overlay(bad)
    with pytest.raises(TypeError, match="the image index i must be an int"):
        result.heatmap_image(1.0, 0)
    # negative indices count from the end, as in a list
    np.testing.assert_array_equal(np.asarray(result.overlay(-1)), np.asarray(result.overlay(3)))
    np.testing.assert_array_equal(np.asarray(result.heatmap_image(-4, 1)), np.asarray(result.heatmap_image(0, 1)))
    np.testing.assert_array_equal(np.asarray(result.overlay(np.int64(2))), np.asarray(result.overlay(2)))


def test_overlay_opacity_is_a_number_in_0_1():
    """opacity=2 and -1 extrapolated the colours; 'a' failed inside numpy."""
    from dffkit import visualize

    images, acts = block_activations(n=2)
    result = dff(images, 2, activations=acts)
    for bad in (2, -1, 1.0001, float("nan")):
        with pytest.raises(ValueError, match=r"opacity must be in \[0, 1\] .*e.g. opacity=0.75"):
            result.overlay(0, opacity=bad)
    for bad in ("a", None, True, [0.5]):
        with pytest.raises(TypeError, match=r"opacity must be a number in \[0, 1\]"):
            result.overlay(0, opacity=bad)
    with pytest.raises(ValueError, match="opacity must be in"):
        visualize.heatmap_image(np.zeros((4, 4)), opacity=1.5)
    # the ends: 0 is the desaturated photo alone, 1 the concept colours alone where the heat is 1
    photo = visualize.desaturate(images[0])
    np.testing.assert_array_equal(np.asarray(result.overlay(0, opacity=0, legend=False)), photo)
    heat = result.heatmaps[0] * result.strength[0][:, None, None]
    rgb, strength = visualize.blend_concepts(heat)
    full = np.asarray(result.overlay(0, opacity=1, legend=False))
    at_one = strength == 1
    assert at_one.any()
    np.testing.assert_array_equal(full[at_one], np.round(rgb[at_one]).astype(np.uint8))


def test_grid_cell_and_columns_are_positive_ints():
    """grid(cell=0) gave a 12 x 130 picture, cell=-5 a 2 x 120 one, columns=0 was accepted."""
    from dffkit import visualize

    images, acts = block_activations(n=2)
    result = dff(images, 2, activations=acts)
    for kwargs in ({"cell": 0}, {"cell": -5}, {"columns": 0}, {"columns": -1}):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=rf"{name} must be a positive int \(at least 1\), e.g. {name}="):
            result.grid(**kwargs)
        with pytest.raises(ValueError, match=rf"{name} must be a positive int"):
            visualize.grid([Image.new("RGB", (4, 4))], **kwargs)
    for kwargs in ({"cell": 2.5}, {"cell": True}, {"columns": "2"}, {"columns": 1.0}):
        with pytest.raises(TypeError, match=rf"{next(iter(kwargs))} must be a positive int"):
            result.grid(**kwargs)
    # 3 tiles of cell 10 in 3 columns: 3 * (10 + 4) + 4 wide, 10 + 4 + 4 high (pad 4, no captions)
    assert visualize.grid([Image.new("RGB", (5, 5))] * 3, cell=10, columns=3).size == (46, 18)
    assert visualize.grid([Image.new("RGB", (5, 5))] * 3, cell=np.int64(10), columns=1).size == (18, 46)


def test_legend_of_a_one_pixel_wide_image_is_readable():
    """A 1-pixel-wide overlay got a 1-pixel-wide legend."""
    from dffkit import visualize

    column = np.zeros((30, 1, 3), np.uint8) + 90
    names = ["0: red region", "1: sky blue region"]
    out = np.asarray(visualize.add_legend(column, names))
    assert 80 <= out.shape[1] <= visualize.LEGEND_MIN_WIDTH  # the names fit, within the cap
    np.testing.assert_array_equal(out[:30, :1], column)  # the image at the top left
    assert (out[:30, 1:] == 255).all()  # white beside it
    assert (out[30:] != 255).any(axis=2).sum() > 50  # the legend is drawn below
    # beside a wide image the legend takes the image's width, as before
    wide = np.zeros((10, 300, 3), np.uint8)
    assert np.asarray(visualize.add_legend(wide, names)).shape[1] == 300
    # through a DFF result of 1-pixel-wide images
    acts = np.random.default_rng(0).random((2, 3, 4, 1)).astype(np.float32) + 0.1
    result = dff([np.zeros((30, 1, 3), np.uint8)] * 2, 2, activations=acts)
    assert result.overlay(0).width >= 80


def test_save_without_the_images_writes_the_summary_only(tmp_path):
    """keep_images=False: save() created out/ and out/heatmaps/, then raised."""
    images, acts = block_activations(n=2)
    result = dff(images, 2, activations=acts, keep_images=False)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"keeps no images .*wrote summary.json only"):
        written = result.save(out)
    assert written == {"overlays": [], "heatmaps": [], "grid": [], "summary": [str(out / "summary.json")]}
    assert sorted(os.listdir(out)) == ["summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {"overlays": [], "heatmaps": [], "grid": [], "summary": ["summary.json"]}
    assert summary == json.loads(json.dumps({**result.summary(), "files": summary["files"]}))


def test_summary_files_list_what_save_returns(tmp_path):
    """summary.json listed "summary": [] (itself left out); the returned dict listed it. The
    docstring promised heatmaps/heat_XXX_cJ.png; the files are heat_XXX_<name>_cJ.png."""
    images, acts = block_activations(n=2)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"pic{i}.png"))
        Image.fromarray(im).save(paths[-1])
    out = tmp_path / "out"
    written = dff(paths, 2, activations=acts).save(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == {k: [os.path.relpath(p, out) for p in v] for k, v in written.items()}
    assert summary["files"]["summary"] == ["summary.json"]
    assert summary["files"]["heatmaps"] == [os.path.join("heatmaps", f"heat_{i:03d}_pic{i}_c{j}.png")
                                            for i in range(2) for j in range(2)]
    assert "heatmaps/heat_XXX_<name>_cJ.png" in DFFResult.save.__doc__


def test_per_image_summary_keeps_the_imagenet_classes():
    """Per image, concept_classes (top classes per image and concept) was dropped from the
    summary."""
    images, acts = block_activations(n=2)
    result = dff(images, 2, activations=acts, mode="per_image")
    assert result.concept_classes is None
    assert [im["concept_classes"] for im in result.summary()["images"]] == [None, None]
    classes = [[[("tabby", 0.5), ("tiger cat", 0.25)], [("grass", 0.75)]],
               [[("lynx", 0.125)], [("sand", 0.625), ("dune", 0.0625)]]]
    result.concept_classes = classes
    summary = json.loads(json.dumps(result.summary()))
    assert summary["images"][0]["concept_classes"] == [[["tabby", 0.5], ["tiger cat", 0.25]], [["grass", 0.75]]]
    assert summary["images"][1]["concept_classes"] == [[["lynx", 0.125]], [["sand", 0.625], ["dune", 0.0625]]]
    assert [c["classes"] for c in summary["concepts"]] == [None, None]  # per image, not per concept
    joint = dff(images, 2, activations=acts)
    joint.concept_classes = classes[0]
    summary = json.loads(json.dumps(joint.summary()))
    assert [c["classes"] for c in summary["concepts"]] == [[["tabby", 0.5], ["tiger cat", 0.25]], [["grass", 0.75]]]
    assert [im["concept_classes"] for im in summary["images"]] == [None, None]


def test_a_file_named_heatmaps_is_found_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """A file out/heatmaps was found after the whole DFF run ('cannot use .../heatmaps: File
    exists'), with the overlays already written."""
    from dffkit import deep_feature_factorization as dff_module

    images, acts = block_activations(n=2)
    result = dff(images, 2, activations=acts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmaps").write_text("x")
    with pytest.raises(OSError, match=r"heatmaps is a file, and the heat maps go into a folder of that name.*heatmaps=False"):
        result.save(out)
    assert sorted(os.listdir(out)) == ["heatmaps"]  # nothing written
    assert result.save(out, heatmaps=False)["heatmaps"] == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "grid.png").mkdir()
    with pytest.raises(OSError, match=r"grid.png is a folder"):
        result.save(tmp_path / "other")
    assert sorted(os.listdir(tmp_path / "other")) == ["grid.png"]
    # the command line: before the work
    image = tmp_path / "img.png"
    Image.fromarray(images[0]).save(image)
    monkeypatch.setattr(dff_module, "dff", _fail_if_run)
    assert cli.main(["dff", str(image), "-k", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"dffkit dff: error: --out {out}: {out / 'heatmaps'} is a file" in err and "--no-heatmaps" in err


def test_init_custom_is_refused_before_the_images_are_read():
    """init='custom' failed after the work: 'W is required with init='custom': pass an array
    of shape (3136, 3)', although dff takes no W."""
    with pytest.raises(ValueError, match=r"init must be one of 'random', 'nndsvd', 'nndsvda', 'nndsvdar' or None, "
                                         r"got 'custom' \(dff computes its own start and takes no W or H"):
        dff(["/no/such/image.png"], 2, init="custom")
    with pytest.raises(ValueError, match=r"init must be one of .* got 'nndsvdx'"):
        dff(["/no/such/image.png"], 2, init="nndsvdx")
    images, acts = block_activations(n=2)
    assert dff(images, 2, activations=acts, init="nndsvda").n_concepts == 2
    assert dff(images, 2, activations=acts, init=None).n_concepts == 2


def test_public_helpers_check_their_arguments():
    """upsample, bilinear_matrix and mask_box failed with ZeroDivisionError, IndexError or
    'not enough values to unpack', or returned a nonsense box."""
    maps = np.ones((1, 2, 2))
    with pytest.raises(ValueError, match=r"size\[0\] \(height\) must be a positive int .*got 0"):
        upsample(maps, (0, 4))
    with pytest.raises(ValueError, match=r"size\[1\] \(width\) must be a positive int .*got -2"):
        upsample(maps, (4, -2))
    with pytest.raises(TypeError, match=r"size\[0\] \(height\) must be a positive int .*got 3.5"):
        upsample(maps, (3.5, 4))
    with pytest.raises(TypeError, match=r"size must be a \(height, width\) pair of positive ints, got 4"):
        upsample(maps, 4)
    with pytest.raises(ValueError, match=r"maps must be a 3-D array \(k, h, w\), got shape \(2, 3\); for one \(h, w\) map pass maps\[None\]"):
        upsample(np.zeros((2, 3)), (4, 4))
    with pytest.raises(ValueError, match=r"maps must have at least one row and column"):
        upsample(np.zeros((1, 0, 3)), (4, 4))
    np.testing.assert_array_equal(upsample(np.full((1, 1, 1), 3.0), (2, 3)), np.full((1, 2, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"n_out must be a positive int .*got 0"):
        bilinear_matrix(0, 3)
    with pytest.raises(ValueError, match=r"n_in must be a positive int .*got 0"):
        bilinear_matrix(3, 0)
    with pytest.raises(TypeError, match=r"n_out must be a positive int .*got 2.5"):
        bilinear_matrix(2.5, 3)
    # hand-computed: 2 -> 4 samples, centres aligned: source positions -0.25, 0.25, 0.75, 1.25 (clamped)
    np.testing.assert_allclose(bilinear_matrix(np.int64(4), 2), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    with pytest.raises(ValueError, match=r"mask must be a 2-D \(H, W\) array, got shape \(2, 2, 2\)"):
        mask_box(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match=r"mask must be a 2-D"):
        mask_box(np.ones(3))
    assert mask_box(np.eye(3, dtype=bool)) == (0, 0, 3, 3)


@pytest.mark.parametrize("shape", [(1, 0, 2, 2), (1, 3, 0, 2), (1, 3, 2, 0)])
def test_empty_activations_are_named(shape):
    """activations=np.zeros((4, 0, 14, 14)) gave 'cannot reshape array of size 0'."""
    images, _ = block_activations(n=1)
    with pytest.raises(ValueError, match=rf"the activations you passed are empty for image 0 \(image_0\): shape "
                                         rf"\(C, h, w\) = \({shape[1]}, {shape[2]}, {shape[3]}\).*C, h, w >= 1"):
        dff(images, 1, activations=np.zeros(shape, np.float32))


def test_more_concepts_than_channels_warns():
    """k = 3136 with the filter bank's 55 channels ran for minutes without a word."""
    images, acts = block_activations(n=2, C=4, h=3, w=3)
    with pytest.warns(UserWarning, match=r"n_concepts=5 is more than the 4 channels of the activations you passed: "
                                         r"the factorization cannot find more than 4 meaningful concepts.*n_concepts <= 4"):
        result = dff(images, 5, activations=acts, max_iter=5)
    assert result.n_concepts == 5  # a warning, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dff(images, 4, activations=acts, max_iter=5)


# ---------------------------------------------------------------------------------------------
# the device branch's checks: one pass over all images, the same results as the host's
# ---------------------------------------------------------------------------------------------

def _counting_stand_in_ops(dff_module):
    class StandInOps(dff_module._ArrayOps):
        name = "stand-in"  # the array-API steps CuPy runs, on numpy
        image_checks = 0

        def all_finite(self, a):
            type(self).image_checks += 1
            return super().all_finite(a)

    return StandInOps


@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_device_branch_checks_all_images_in_one_pass(monkeypatch, mode):
    """Finite activations: no image-by-image check (each was a trip to the host on a GPU); a
    NaN in image 2 is still named, in both modes."""
    from dffkit import deep_feature_factorization as dff_module

    ops = _counting_stand_in_ops(dff_module)
    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: ops())
    images, acts = block_activations(n=4)
    result = dff(images, 2, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu")
    assert result.device_path and ops.image_checks == 0
    bad = acts.copy()
    bad[2, 1, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"hold NaN or infinite values, in image 2 \(image_2\)"):
        dff(images, 2, extractor=_StandInDeviceExtractor(bad), mode=mode, backend="cpu")


@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("negatives", ["error", "clip", "shift"])
def test_device_branch_hands_the_solver_its_checked_matrix(monkeypatch, mode, negatives):
    """The matrix (joint) or batch (per image) dff has just found finite and non-negative goes to
    the solver marked as checked (no second pass over it on a GPU); values made by 'clip' or
    'shift' from negative activations are not marked (the solver checks them: a shift can
    overflow); the mark ends with the call."""
    from dffkit import deep_feature_factorization as dff_module
    from dffkit import nmf as nmf_module

    seen = []

    def recording(fn):
        def call(X, *args, **kwargs):
            seen.append(nmf_module._is_checked_input(X))
            return fn(X, *args, **kwargs)
        return call

    monkeypatch.setattr(nmf_module, "non_negative_factorization", recording(nmf_module.non_negative_factorization))
    monkeypatch.setattr(nmf_module, "nmf_batched", recording(nmf_module.nmf_batched))
    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: _counting_stand_in_ops(dff_module)())
    images, acts = block_activations(n=3)
    if negatives != "error":
        acts = acts - np.float32(0.25)
    result = dff(images, 2, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", negatives=negatives)
    assert result.device_path
    # per image: one solve per extractor batch of 2 (dff_module.PIPELINE), each batch marked
    assert seen == [negatives == "error"] * (2 if mode == "per_image" else 1)
    assert nmf_module._CHECKED_INPUT.get() is None


def _pipeline_runs(monkeypatch, acts, images, extractor_cls, make_options):
    """dff per image with the extraction pipelined (one extractor batch of 2 a group) and not,
    each with the options ``make_options()`` makes (numpy's global state seeded the same before
    each): (pipelined, all at once, the threads the extractor ran on, the progress reports)."""
    from dffkit import deep_feature_factorization as dff_module

    threads, reports = [], []

    class Recording(extractor_cls):
        def __call__(self, images, device_output=False):
            threads.append(threading.current_thread().name)
            return super().__call__(images, device_output)

    runs = []
    for pipeline in (True, False):
        monkeypatch.setattr(dff_module, "PIPELINE", pipeline)
        progress = (lambda done, total: reports.append((done, total))) if pipeline else None
        np.random.seed(11)
        runs.append(dff(images, 2, extractor=Recording(acts), mode="per_image", backend="cpu", progress=progress,
                        **make_options()))
    return runs[0], runs[1], threads, reports


@pytest.mark.parametrize("extractor_cls", [_StandInDeviceExtractor, _StandInHostExtractor], ids=["device", "host"])
@pytest.mark.parametrize("make_options", [dict, lambda: dict(random_state=np.random.RandomState(5), negatives="shift"),
                                          lambda: dict(assign="kmeans", random_state=None)],
                         ids=["defaults", "random-state-object-shift", "kmeans-global-state"])
def test_per_image_pipeline_gives_the_same_results(monkeypatch, extractor_cls, make_options):
    """per_image DFF over more images than one extractor batch: each batch extracted on a worker
    thread while the one before is factorized and mapped gives the results of all at once, bit
    for bit (each image's random_state seed + its number, a RandomState drawn from once, the
    negatives shifted per image, k-means labels); progress reaches every image in order."""
    from dffkit import deep_feature_factorization as dff_module

    if extractor_cls is _StandInDeviceExtractor:
        monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: _counting_stand_in_ops(dff_module)())
    images, acts = block_activations(n=5, seed=3)
    acts[:, 0, 0, :] += np.arange(5, dtype=np.float32)[:, None]  # images differ
    if make_options().get("negatives") == "shift":
        acts = acts - np.float32(0.3)
    piped, whole, threads, reports = _pipeline_runs(monkeypatch, acts, images, extractor_cls, make_options)
    assert threads[:3] != ["MainThread"] * 3 and all(t.startswith("dffkit-extract") for t in threads[:3])
    assert threads[3:] == ["MainThread"] * 3  # the run without the pipeline
    assert piped.device_path == whole.device_path == (extractor_cls is _StandInDeviceExtractor)
    assert piped.n_iter == whole.n_iter and piped.reconstruction_error == whole.reconstruction_error
    np.testing.assert_array_equal(piped.concepts, whole.concepts)
    np.testing.assert_array_equal(piped.strength, whole.strength)
    for name in ("heatmaps", "labels", "loadings"):
        for a, b in zip(getattr(piped, name), getattr(whole, name)):
            np.testing.assert_array_equal(a, b)
    assert piped.feature_sizes == whole.feature_sizes
    done = [d for d, total in reports if total == 5]
    assert done == sorted(done) and done[-1] == 5
    assert set(piped.timings) >= {"load", "extract", "factorize", "maps"}


def test_per_image_pipeline_checks_name_images_by_their_numbers(monkeypatch):
    """Checks in the second group of the pipeline name the image by its number in the call; a
    channel count that changes between groups is refused; k above C warns once."""
    from dffkit import deep_feature_factorization as dff_module

    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: _counting_stand_in_ops(dff_module)())
    images, acts = block_activations(n=4)
    bad = acts.copy()
    bad[3, 1, 2, 2] = np.inf
    with pytest.raises(ValueError, match=r"in image 3 \(image_3\)"):
        dff(images, 2, extractor=_StandInDeviceExtractor(bad), mode="per_image", backend="cpu")
    bad = acts.copy()
    bad[2, 0, 1, 1] = -1.0
    with pytest.raises(ValueError, match="negative values"):
        dff(images, 2, extractor=_StandInDeviceExtractor(bad), mode="per_image", backend="cpu")

    class Growing(_StandInDeviceExtractor):  # the second batch has more channels
        def __call__(self, images, device_output=False):
            out = super().__call__(images, device_output)
            return np.concatenate([out, out], axis=1) if self.start > 2 else out

    with pytest.raises(ValueError, match=r"different channel counts \[8, 16\]"):
        dff(images, 2, extractor=Growing(acts), mode="per_image", backend="cpu")
    with pytest.warns(UserWarning, match="more than the 8 channels") as caught:
        dff(images, 9, extractor=_StandInDeviceExtractor(acts[:, :, :3, :3].copy()), mode="per_image",
            backend="cpu", max_iter=5)
    assert len([w for w in caught if "channels" in str(w.message)]) == 1
    assert caught[0].filename == __file__


def test_checked_input_marks_one_object_in_one_context():
    """``_checked_input(X)``: that very object (not an equal copy, not another view), only inside
    the block, not in other threads; the mark is gone after an exception."""
    import threading

    from dffkit import nmf as nmf_module

    X = np.ones((3, 2), np.float32)
    assert not nmf_module._is_checked_input(X)
    with nmf_module._checked_input(X):
        assert nmf_module._is_checked_input(X)
        assert not nmf_module._is_checked_input(X.copy()) and not nmf_module._is_checked_input(X[:])
        assert not nmf_module._is_checked_input(None)
        other = []
        t = threading.Thread(target=lambda: other.append(nmf_module._is_checked_input(X)))
        t.start()
        t.join()
        assert other == [False]
    assert not nmf_module._is_checked_input(X)
    with pytest.raises(RuntimeError):
        with nmf_module._checked_input(X):
            raise RuntimeError("inside")
    assert not nmf_module._is_checked_input(X)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["joint", "per_image"])
def test_device_path_checks_the_activations_once(monkeypatch, mode):
    """On a GPU: one pass over the activations for the values (dff's, which brings ||X|| for
    the joint relative error too), none in the solver; the relative errors are the host
    path's (within float32)."""
    from dffkit import _cuda_backend
    from dffkit import deep_feature_factorization as dff_module

    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    ops = dff_module._first_array_library()
    if ops is None:
        pytest.skip("neither CuPy nor PyTorch is importable")
    calls = []
    stats = _cuda_backend.value_stats  # check_values' pass too
    monkeypatch.setattr(_cuda_backend, "value_stats", lambda x: calls.append(1) or stats(x))
    images, acts = block_activations(n=3)
    result = dff(images, 2, activations=ops.asarray(acts), mode=mode, backend="cuda")
    assert result.device_path and len(calls) == 1
    host = dff(images, 2, activations=acts, mode=mode, backend="cpu")
    np.testing.assert_allclose(result.reconstruction_error, host.reconstruction_error, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("precision", ["tf32", "bf16x"])
def test_device_path_in_another_precision(mode, precision):
    """On a GPU: dff's precision runs the CUDA NMF in that mode (the result says so) and gives
    the fp32 run's concepts: relative errors within 1e-3 and every label map the same on at
    least 99% of the pixels (block activations: two clear concepts)."""
    from dffkit import deep_feature_factorization as dff_module

    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    ops = dff_module._first_array_library()
    if ops is None:
        pytest.skip("neither CuPy nor PyTorch is importable")
    images, acts = block_activations(n=3)
    got = dff(images, 2, activations=ops.asarray(acts), mode=mode, backend="cuda", precision=precision)
    want = dff(images, 2, activations=ops.asarray(acts), mode=mode, backend="cuda")
    assert got.precision == precision and want.precision == "fp32" and got.device_path
    np.testing.assert_allclose(got.reconstruction_error, want.reconstruction_error, rtol=1e-3)
    for a, b in zip(got.labels, want.labels):
        assert np.mean(a == b) >= 0.99


@pytest.mark.parametrize("negatives", ["clip", "shift"])
def test_device_branch_per_image_negatives_and_errors_equal_the_host(monkeypatch, negatives):
    """per_image on the device branch (one batch): 'shift' subtracts each image's own channel
    minima, as the host does image by image; the relative errors use each image's own norm."""
    from dffkit import deep_feature_factorization as dff_module

    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: _counting_stand_in_ops(dff_module)())
    images, acts = block_activations(n=3)
    acts = acts - np.linspace(0.1, 0.6, 3, dtype=np.float32)[:, None, None, None]  # image-dependent minima
    on_device = dff(images, 2, extractor=_StandInDeviceExtractor(acts), mode="per_image", backend="cpu",
                    negatives=negatives)
    host = dff(images, 2, activations=acts, mode="per_image", backend="cpu", negatives=negatives)
    assert on_device.device_path and not host.device_path
    np.testing.assert_allclose(on_device.reconstruction_error, host.reconstruction_error, rtol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(on_device.heatmaps[i], host.heatmaps[i], atol=1e-6)
        np.testing.assert_array_equal(on_device.labels[i], host.labels[i])


# ---------------------------------------------------------------------------------------------
# the device path's map kernels (cuda/dff_maps.cuh, issue 7): their orchestration in _maps, on
# numpy through stand-ins of the kernels (the kernels themselves: tests/test_dff_maps_emu.py)
# ---------------------------------------------------------------------------------------------

class _StandInMapKernels:
    """numpy implementations of the contract of ``dffkit._cuda_backend.dff_maps`` (the two map
    kernels): the host's resampler through the taps the kernels are given, the peaks as partial
    maxima of blocks of 256 pixels taken in turn."""

    def __init__(self, on_device=False):
        self.launches = []
        self.waits = []  # copy_to_host calls: the number of arrays each brought back
        self.on_device = on_device  # whether the params step runs on the device (params_out)

    def device_params(self):
        return self.on_device

    def dff_maps(self, maps, taps_y, taps_x, *, h, w, parts=None, params=None, threshold=None, heat=None,
                 labels=None, fused=False, params_out=None, joint=False):
        from dffkit import deep_feature_factorization as dff_module

        assert params_out is None or (self.on_device and parts is not None)

        k, H, W = int(maps[0].shape[1]), len(taps_y) // 4, len(taps_x) // 4
        for taps, n_out, n_in in ((taps_y, H, h), (taps_x, W, w)):
            i0, i1, w0, w1 = dff_module.bilinear_taps(n_out, n_in)
            assert taps.dtype == np.int32
            np.testing.assert_array_equal(taps[:2 * n_out], np.concatenate([i0, i1]))
            np.testing.assert_array_equal(taps[2 * n_out:].view(np.float32), np.concatenate([w0, w1]))
        assert fused == dff_module._host_resample_fuses()
        assert all(m.shape == (h * w, k) and m.dtype == np.float32 and m.flags.c_contiguous for m in maps)
        A = np.stack([m.reshape(h, w, k).transpose(2, 0, 1) for m in maps])
        U = dff_module._NumpyOps().resample(A, H, W)
        if parts is not None:
            self.launches.append("peaks")
            flat, nb = U.reshape(len(maps), k, H * W), parts.shape[2]
            block = (np.arange(H * W) // 256) % nb
            for b in range(nb):
                parts[:, :, b] = flat[:, :, block == b].max(axis=2) if (block == b).any() else -np.inf
            if params_out is not None:  # the host's arithmetic on the parts (the emulator tests the kernel's)
                self.launches.append("params")
                peaks = np.maximum(parts.max(axis=2), 0.0).astype(np.float64)
                strength, divisors = dff_module._strength_divisors(peaks, "joint" if joint else "per_image", threshold)
                params_out[...] = np.concatenate([divisors, strength], axis=1)
            return
        self.launches.append("heat")
        assert params.shape == (len(maps), 2 * k) and params.dtype == np.float32
        heat[...] = np.clip(U / params[:, :k, None, None], 0.0, 1.0)
        labels[...] = dff_module._NumpyOps().labels_of(heat, params[:, k:], threshold)

    def copy_to_host(self, arrays, outs):
        """The contract of ``dffkit._cuda_backend.copy_to_host``: each array into its
        destination (shapes and dtypes must match), one wait for all."""
        self.waits.append(len(arrays))
        for a, out in zip(arrays, outs):
            assert a.shape == out.shape and a.dtype == out.dtype and out.flags.c_contiguous
            out[...] = a


def _kernel_stand_in_ops(dff_module, kernels, pinned=False):
    class StandInOps(dff_module._ArrayOps):
        name = "stand-in"  # numpy as the device library, the map kernels by stand-in
        uploads = 0
        pinned_arrays = 0

        def asarray(self, a):
            type(self).uploads += isinstance(a, np.ndarray)
            return super().asarray(a)

        def map_kernels(self):
            return kernels

        def pinned_empty(self, shape, dtype):  # with pinned=True: a pool of page-locked memory
            if not pinned:
                return None
            type(self).pinned_arrays += 1
            return np.full(shape, 99, dtype)

    return StandInOps


@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("sizes", [[(40, 70), (50, 70), (60, 70)], [(40, 70), (33, 21), (40, 70), (33, 21)],
                                   [(45, 45)] * 3])
def test_device_branch_map_kernels_give_the_host_paths_maps(monkeypatch, mode, sizes):
    """The device branch through the map kernels (stand-ins here): heat maps (bits), labels,
    strength and loadings equal the host path's, joint (strength across the images) and per
    image, one group of images or several, interleaved (images 0, 2 and 1, 3), with one peaks
    and one heat launch per group; kmeans and keep_maps=False keep the array steps."""
    from dffkit import deep_feature_factorization as dff_module

    kernels = _StandInMapKernels()
    monkeypatch.setattr(dff_module, "_device_ops", lambda ext, backend: _kernel_stand_in_ops(dff_module, kernels)())
    monkeypatch.setattr(dff_module, "PIPELINE", False)  # first the launches of one pass over all images
    _, acts = block_activations(n=len(sizes))
    images = [np.zeros(s + (3,), np.uint8) + 100 for s in sizes]
    on_device = dff(images, 3, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", threshold=0.3)
    host = dff(images, 3, activations=acts, mode=mode, backend="cpu", threshold=0.3)
    assert on_device.device_path and not host.device_path
    groups = len(set(sizes))
    assert kernels.launches == ["peaks"] * groups + ["heat"] * groups
    monkeypatch.setattr(dff_module, "PIPELINE", "auto")  # per image: groups of one extractor batch (2)
    piped = dff(images, 3, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", threshold=0.3)
    for got in (on_device, piped):
        assert got.device_path
        np.testing.assert_array_equal(got.strength, host.strength)
        for i in range(len(sizes)):
            np.testing.assert_array_equal(got.loadings[i], host.loadings[i])
            np.testing.assert_array_equal(got.heatmaps[i].view(np.uint32), host.heatmaps[i].view(np.uint32))
            np.testing.assert_array_equal(got.labels[i], host.labels[i])
            assert got.heatmaps[i].shape == (3,) + sizes[i] and got.labels[i].dtype == np.int16
    kernels.launches.clear()
    dff(images, 3, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", assign="kmeans")
    dff(images, 3, extractor=_StandInDeviceExtractor(acts), mode=mode, backend="cpu", keep_maps=False)
    assert kernels.launches == []


def test_device_branch_map_kernels_transfers_for_one_image(monkeypatch):
    """One image on the map kernels: two launches; W, the peaks, heat and labels down (4
    copies), divisors and strengths up in one array; the taps go up once per size."""
    from dffkit import deep_feature_factorization as dff_module

    kernels = _StandInMapKernels()
    ops = _kernel_stand_in_ops(dff_module, kernels)()
    downloads = []
    host = dff_module._host
    monkeypatch.setattr(dff_module, "_host", lambda a: downloads.append(a.shape) or host(a))
    monkeypatch.setattr(dff_module, "_DEVICE_TAPS", OrderedDict())
    W = np.random.default_rng(0).random((14 * 13, 5), dtype=np.float32)
    want = dff_module._maps(dff_module._NumpyOps(), [W], [(14, 13)], [(101, 77)], "joint", 0.2, "argmax")
    for uploads in (3, 1):  # the taps of both axes, then only the divisors and strengths
        type(ops).uploads, downloads[:] = 0, []
        kernels.launches.clear()
        got = dff_module._maps(ops, [W], [(14, 13)], [(101, 77)], "joint", 0.2, "argmax")
        assert kernels.launches == ["peaks", "heat"]
        assert len(downloads) == 4 and (14 * 13, 5) in downloads
        assert type(ops).uploads == uploads
        for g, h in zip(got, want):
            for a, b in zip(g, h):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("budget", [None, 0, "first"])
def test_device_branch_map_kernels_bring_the_maps_back_through_pinned_memory(monkeypatch, budget):
    """Where the array library has pinned memory, each step's copies down (W and the peaks;
    heat and labels) go into it in one ``copy_to_host`` (one wait each) while the call's
    PINNED_MAPS_BYTES allow, and into ordinary memory (one ``_host`` copy each) beyond; the
    maps are the same either way."""
    from dffkit import deep_feature_factorization as dff_module

    kernels = _StandInMapKernels()
    ops = _kernel_stand_in_ops(dff_module, kernels, pinned=True)()
    downloads = []
    host = dff_module._host
    monkeypatch.setattr(dff_module, "_host", lambda a: downloads.append(a.shape) or host(a))
    k, grid, size = 5, (14, 13), (101, 77)
    first = 4 * k * dff_module._peak_blocks(size[0] * size[1]) + 4 * grid[0] * grid[1] * k
    if budget == "first":  # room for the first step's copies, not for the heat maps
        monkeypatch.setattr(dff_module, "PINNED_MAPS_BYTES", first)
    elif budget == 0:
        monkeypatch.setattr(dff_module, "PINNED_MAPS_BYTES", 0)
    W = np.random.default_rng(0).random((grid[0] * grid[1], k), dtype=np.float32)
    want = dff_module._maps(dff_module._NumpyOps(), [W], [grid], [size], "joint", 0.2, "argmax")
    downloads.clear()
    got = dff_module._maps(ops, [W], [grid], [size], "joint", 0.2, "argmax")
    expected_waits = {None: [2, 2], 0: [], "first": [2]}[budget]
    assert kernels.waits == expected_waits
    assert len(downloads) == 4 - 2 * len(expected_waits)
    assert ops.pinned_arrays == len(expected_waits)  # one block per step, carved into its arrays
    for g, h in zip(got, want):
        for a, b in zip(g, h):
            np.testing.assert_array_equal(a, b)


def test_map_kernels_are_used_only_where_the_module_has_them(monkeypatch):
    """A CUDA module built before the map kernels (no dff_map_peaks) keeps the array steps;
    one with them gets dffkit._cuda_backend; none at all, too."""
    import types

    from dffkit import _backends, _cuda_backend
    from dffkit import deep_feature_factorization as dff_module

    def fail():
        raise RuntimeError("backend='cuda' is not available")

    monkeypatch.setattr(_backends, "cuda", lambda: types.SimpleNamespace(fit=None))
    assert dff_module._device_map_kernels() is None
    monkeypatch.setattr(_backends, "cuda", lambda: types.SimpleNamespace(dff_map_peaks=1, dff_heat_labels=1))
    assert dff_module._device_map_kernels() is _cuda_backend
    monkeypatch.setattr(_backends, "cuda", fail)
    assert dff_module._device_map_kernels() is None
    assert dff_module._ArrayOps().map_kernels() is None and dff_module._NumpyOps().map_kernels() is None


class _FakeCudaArray:
    """Device memory as __cuda_array_interface__ describes it (a made-up address)."""

    def __init__(self, shape, dtype, ptr, strides=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.__cuda_array_interface__ = dict(shape=self.shape, typestr=self.dtype.str, data=(ptr, False),
                                             strides=strides, version=3)


def test_dff_maps_wrapper_passes_pointers_and_checks_arrays(monkeypatch):
    """_cuda_backend.dff_maps: the pointers, sizes and float32 threshold the binding gets, on the
    arrays' stream; arrays of the wrong dtype, shape or layout are ValueErrors naming them."""
    from dffkit import _cuda_backend

    calls = []

    class Recorder:
        def dff_map_peaks(self, *args):
            calls.append(("peaks",) + args)

        def dff_heat_labels(self, *args):
            calls.append(("heat",) + args)

        def dff_map_params(self, *args):
            calls.append(("params",) + args)

    monkeypatch.setattr(_cuda_backend, "_cuda", lambda: Recorder())
    maps = [_FakeCudaArray((12, 5), np.float32, 4096), _FakeCudaArray((12, 5), np.float32, 8192)]
    ty, tx = _FakeCudaArray((4 * 9,), np.int32, 1 << 20), _FakeCudaArray((4 * 7,), np.int32, 2 << 20)
    _cuda_backend.dff_maps(maps, ty, tx, h=3, w=4, parts=_FakeCudaArray((2, 5, 3), np.float32, 3 << 20))
    params = _FakeCudaArray((2, 10), np.float32, 4 << 20)
    heat, labels = _FakeCudaArray((2, 5, 9, 7), np.float32, 5 << 20), _FakeCudaArray((2, 9, 7), np.int16, 6 << 20)
    _cuda_backend.dff_maps(maps, ty, tx, h=3, w=4, params=params, threshold=0.2, heat=heat, labels=labels,
                           fused=True)
    assert calls[0] == ("peaks", [4096, 8192], 5, 3, 4, 9, 7, 1 << 20, 2 << 20, 3, 3 << 20, False, 1)
    assert calls[1] == ("heat", [4096, 8192], 5, 3, 4, 9, 7, 1 << 20, 2 << 20, 4 << 20, float(np.float32(0.2)),
                        5 << 20, 6 << 20, True, 1)
    bad = [
        (dict(maps=[np.zeros((12, 5), np.float32)]), "maps\\[0\\] is not a CUDA array"),
        (dict(maps=[maps[0], _FakeCudaArray((12, 5), np.float64, 0)]), "maps\\[1\\] must be float32"),
        (dict(maps=[maps[0], _FakeCudaArray((11, 5), np.float32, 0)]), "maps\\[1\\] must have shape \\(12, 5\\)"),
        (dict(maps=[_FakeCudaArray((12, 5), np.float32, 0, strides=(4, 48))]), "maps\\[0\\] must be C-contiguous"),
        (dict(taps_y=_FakeCudaArray((36,), np.int64, 0)), "taps_y must be int32"),
        (dict(labels=_FakeCudaArray((2, 9, 7), np.int32, 0)), "labels must be int16"),
        (dict(heat=_FakeCudaArray((2, 5, 9, 8), np.float32, 0)), "heat must have shape \\(2, 5, 9, 7\\)"),
        (dict(params=_FakeCudaArray((2, 5), np.float32, 0)), "params must have shape \\(2, 10\\)"),
        (dict(maps=[]), "maps is empty"),
        (dict(heat=None), "pass parts"),
    ]
    for change, message in bad:
        kw = dict(maps=maps, taps_y=ty, taps_x=tx, params=params, threshold=0.2, heat=heat, labels=labels)
        kw.update(change)
        with pytest.raises(ValueError, match=message):
            _cuda_backend.dff_maps(kw.pop("maps"), kw.pop("taps_y"), kw.pop("taps_x"), h=3, w=4, **kw)
    assert len(calls) == 2
    # the params step after the peaks: its pointers, sizes, joint and float32 threshold
    params_out = _FakeCudaArray((2, 10), np.float32, 7 << 20)
    parts = _FakeCudaArray((2, 5, 3), np.float32, 3 << 20)
    _cuda_backend.dff_maps(maps, ty, tx, h=3, w=4, parts=parts, params_out=params_out, threshold=0.3, joint=True)
    assert calls[2][0] == "peaks" and calls[3] == ("params", 3 << 20, 2, 5, 3, True, float(np.float32(0.3)), 7 << 20, 1)
    with pytest.raises(ValueError, match="params_out must have shape \\(2, 10\\)"):
        _cuda_backend.dff_maps(maps, ty, tx, h=3, w=4, parts=parts, threshold=0.3,
                               params_out=_FakeCudaArray((2, 5), np.float32, 0))
    with pytest.raises(ValueError, match="params_out needs the threshold"):
        _cuda_backend.dff_maps(maps, ty, tx, h=3, w=4, parts=parts, params_out=params_out)
    assert len(calls) == 4  # nothing launched for the bad calls


@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("pinned", [True, False])
def test_device_branch_one_batch_makes_the_params_on_the_device_and_waits_once(mode, pinned):
    """Images of one grid and size, with a module that makes the params on the device: peaks,
    params and heat launched back to back, nothing uploaded, one copy down (params, W, heat and
    labels: one wait into pinned memory, or four ordinary copies); the host path's results. With
    images of two sizes (two batches) the two-trip path stays."""
    from dffkit import deep_feature_factorization as dff_module

    k = 4
    kernels = _StandInMapKernels(on_device=True)
    Ops = _kernel_stand_in_ops(dff_module, kernels, pinned=pinned)
    grids, sizes = [(6, 5)] * 3, [(30, 25)] * 3
    rng = np.random.default_rng(8)
    Ws = [rng.random((90, k), dtype=np.float32)] if mode == "joint" else [rng.random((30, k), dtype=np.float32)
                                                                          for _ in range(3)]
    want = dff_module._maps(dff_module._NumpyOps(), [w.copy() for w in Ws], grids, sizes, mode, 0.2, "argmax")
    dff_module._maps(Ops(), Ws, grids, sizes, mode, 0.2, "argmax")  # the taps go up once per size
    kernels.launches.clear()
    kernels.waits.clear()
    Ops.uploads = 0
    got = dff_module._maps(Ops(), Ws, grids, sizes, mode, 0.2, "argmax")
    assert kernels.launches == ["peaks", "params", "heat"]
    assert Ops.uploads == 0 and kernels.waits == ([4] if pinned else [])
    np.testing.assert_array_equal(got[1], want[1])
    for g, h in zip(got, want):
        for a, b in zip(g, h):
            np.testing.assert_array_equal(a, b)
    kernels.launches.clear()
    two = dff_module._maps(Ops(), [rng.random((60, k), dtype=np.float32)], [(6, 5), (6, 5)], [(30, 25), (20, 25)],
                           "joint", 0.2, "argmax")
    assert kernels.launches == ["peaks", "peaks", "heat", "heat"] and two[1].shape == (2, k)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["joint", "per_image"])
@pytest.mark.parametrize("sizes", [[(40, 70), (50, 70), (40, 70)], [(224, 224)], [(96, 96)] * 3])
def test_device_map_kernels_give_the_host_paths_maps(mode, sizes):
    """On a GPU: dff on the device path (activations in CuPy or PyTorch, the map kernels) gives
    the heat maps and labels that the host path makes from the same W, bit for bit."""
    from dffkit import deep_feature_factorization as dff_module

    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    ops = dff_module._first_array_library()
    if ops is None:
        pytest.skip("neither CuPy nor PyTorch is importable")
    if ops.map_kernels() is None:
        pytest.skip("the CUDA module was built before the map kernels")
    _, acts = block_activations(n=len(sizes), h=14, w=14)
    images = [np.zeros(s + (3,), np.uint8) for s in sizes]
    result = dff(images, 3, activations=ops.asarray(acts), mode=mode, backend="cuda", threshold=0.3)
    assert result.device_path
    k, grids = 3, result.feature_sizes
    blocks = [np.ascontiguousarray(l.reshape(-1, k)) for l in result.loadings]
    Ws = [np.concatenate(blocks)] if mode == "joint" else blocks
    heat, strength, labels, _ = dff_module._maps(dff_module._NumpyOps(), Ws, grids, sizes, mode, 0.3, "argmax")
    np.testing.assert_array_equal(result.strength, strength)
    for i in range(len(sizes)):
        np.testing.assert_array_equal(result.heatmaps[i].view(np.uint32), heat[i].view(np.uint32))
        np.testing.assert_array_equal(result.labels[i], labels[i])


@pytest.mark.gpu
def test_copy_to_host_checks_everything_before_copying_and_goes_on():
    """On a GPU: ``copy_to_host`` brings device arrays into pinned host arrays; a destination of
    the wrong shape or dtype is a ValueError naming it, with nothing copied, and the next call
    works."""
    from dffkit import _cuda_backend
    from dffkit import deep_feature_factorization as dff_module

    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    ops = dff_module._first_array_library()
    if ops is None:
        pytest.skip("neither CuPy nor PyTorch is importable")
    a_host = np.arange(12, dtype=np.float32).reshape(3, 4)
    b_host = np.arange(6, dtype=np.int16) - 3
    a, b = ops.asarray(a_host), ops.asarray(b_host)
    first = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"arrays\[1\] must have shape \(5,\), got \(6,\)"):
        _cuda_backend.copy_to_host([a, b], [first, np.zeros(5, np.int16)])
    with pytest.raises(ValueError, match=r"arrays\[0\] must be float64, got float32"):
        _cuda_backend.copy_to_host([a], [np.zeros((3, 4), np.float64)])
    assert not first.any()  # nothing copied
    outs = [ops.pinned_empty((3, 4), np.float32), ops.pinned_empty((6,), np.int16)]
    _cuda_backend.copy_to_host([a, b], outs)
    np.testing.assert_array_equal(outs[0], a_host)
    np.testing.assert_array_equal(outs[1], b_host)


@pytest.mark.gpu
def test_device_map_kernels_refuse_host_memory_and_go_on():
    """A host pointer where device memory belongs is a ValueError naming it, and leaves no error
    behind: the next call runs."""
    from dffkit import _backends
    from dffkit import deep_feature_factorization as dff_module

    if "cuda" not in dffkit.available_backends():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    ops = dff_module._first_array_library()
    if ops is None or ops.map_kernels() is None:
        pytest.skip("no CuPy or PyTorch, or a CUDA module without the map kernels")
    cuda = _backends.cuda()
    W = ops.asarray(np.random.default_rng(0).random((12, 2), dtype=np.float32))
    ty, tx = dff_module._device_taps(ops, 9, 3), dff_module._device_taps(ops, 7, 4)
    parts = ops.empty((1, 2, 1), np.float32)
    host = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="parts is not device memory|parts is not a device pointer"):
        cuda.dff_map_peaks([int(W.data_ptr() if hasattr(W, "data_ptr") else W.data.ptr)], 2, 3, 4, 9, 7,
                           int(ty.data_ptr() if hasattr(ty, "data_ptr") else ty.data.ptr),
                           int(tx.data_ptr() if hasattr(tx, "data_ptr") else tx.data.ptr), 1, host.ctypes.data)
    ops.map_kernels().dff_maps([W], ty, tx, h=3, w=4, parts=parts, fused=dff_module._host_resample_fuses())
    want = dff_module._NumpyOps().resample(dff_module._host(W).reshape(1, 3, 4, 2).transpose(0, 3, 1, 2).copy(), 9, 7)
    np.testing.assert_array_equal(dff_module._host(parts)[0, :, 0], want[0].max(axis=(1, 2)))
