"""Image clustering with a factorized convolutional network, its metrics and its ONNX export
(issue 8)."""
import json
import math
import os

import numpy as np
import pytest

import dffkit
from dffkit import metrics
from dffkit.clustering import (
    ClusteringResult,
    cluster_activations,
    cluster_images,
    kmeans,
    synthetic_parts_activations,
    transform_codes,
)
from dffkit.export_onnx import export_parts_model
from dffkit.group_sparse import group_norms, group_sparse_nmf

from conftest import readonly

pytestmark = [pytest.mark.filterwarnings("ignore:Maximum number of iterations"),
              pytest.mark.filterwarnings("ignore:.*GSNMF runs stopped at max_iter")]

SAMPLES = os.path.join(os.path.dirname(dffkit.__file__), "data", "sample_images")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def test_accuracy_hand_computed():
    assert metrics.clustering_accuracy([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    # contingency [[2, 1, 0], [0, 1, 2]]: best matching 2 + 2 of 6
    assert metrics.clustering_accuracy([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(4 / 6)
    # string labels, more classes than clusters: the unmatched class counts as wrong
    assert metrics.clustering_accuracy(list("aabbcc"), [7, 7, 7, 7, 3, 3]) == pytest.approx(4 / 6)


def test_nmi_and_ari_hand_computed():
    y, p = [0, 0, 1, 1], [0, 0, 0, 1]
    # contingency [[2, 0], [1, 1]]
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_u = math.log(2)
    h_v = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.normalized_mutual_info_score(y, p) == pytest.approx(mi / ((h_u + h_v) / 2))
    # sum C(n_ij, 2) = 1, sum C(a_i, 2) = 2, sum C(b_j, 2) = 3, C(4, 2) = 6: expected 1, max 2.5
    assert metrics.adjusted_rand_score(y, p) == pytest.approx((1 - 1) / (2.5 - 1))
    y, p = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    # sum C(n_ij, 2) = 1 + 1 = 2; a: 3 + 3 = 6; b: 1 + 1 + 1 = 3; C(6, 2) = 15
    expected = 6 * 3 / 15
    assert metrics.adjusted_rand_score(y, p) == pytest.approx((2 - expected) / ((6 + 3) / 2 - expected))
    assert metrics.adjusted_rand_score([1, 1, 2, 2], [5, 5, 9, 9]) == 1.0
    assert metrics.normalized_mutual_info_score([1, 1, 2, 2], [5, 5, 9, 9]) == pytest.approx(1.0)
    assert metrics.normalized_mutual_info_score([0, 0, 0], [1, 1, 1]) == 1.0
    assert metrics.normalized_mutual_info_score([0, 1, 0, 1], [0, 0, 0, 0]) == 0.0


def test_metrics_against_sklearn_and_scipy():
    skm = pytest.importorskip("sklearn.metrics")
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        y = rng.integers(0, rng.integers(1, 6), n)
        p = rng.integers(0, rng.integers(1, 7), n)
        assert metrics.normalized_mutual_info_score(y, p) == pytest.approx(skm.normalized_mutual_info_score(y, p), abs=1e-12)
        assert metrics.adjusted_rand_score(y, p) == pytest.approx(skm.adjusted_rand_score(y, p), abs=1e-12)
        r, c = rng.integers(1, 9, 2)
        cost = rng.random((r, c)) if rng.random() < 0.5 else rng.integers(0, 4, (r, c)).astype(float)
        ri, ci = metrics.linear_sum_assignment(cost)
        rs, cs = scipy_opt.linear_sum_assignment(cost)
        assert len(ri) == min(r, c) and len(set(ci.tolist())) == len(ci)
        assert cost[ri, ci].sum() == pytest.approx(cost[rs, cs].sum())
        M = metrics.contingency_matrix(y, p)
        rs, cs = scipy_opt.linear_sum_assignment(M, maximize=True)
        assert metrics.clustering_accuracy(y, p) == pytest.approx(M[rs, cs].sum() / n)


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="same length"):
        metrics.clustering_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="1-D"):
        metrics.adjusted_rand_score(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.linear_sum_assignment([[0.0, np.nan]])


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------

def test_kmeans_finds_separated_blobs_deterministically():
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    y = np.repeat(np.arange(4), 25)
    X = centers[y] + rng.normal(size=(100, 2))
    labels, found, inertia = kmeans(X, 4, random_state=3)
    assert metrics.clustering_accuracy(y, labels) == 1.0
    again = kmeans(X, 4, random_state=3)
    np.testing.assert_array_equal(again[0], labels)
    np.testing.assert_array_equal(again[1], found)
    assert inertia == pytest.approx(sum(((X[labels == c] - found[c]) ** 2).sum() for c in range(4)))
    with pytest.raises(ValueError, match="larger than the number of samples"):
        kmeans(X[:3], 4)


# ---------------------------------------------------------------------------------------------
# clustering
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts_data():
    A, y, parts = synthetic_parts_activations(n_per_class=30, n_classes=3, random_state=0)
    return A, y, parts


@pytest.fixture(scope="module")
def fcn_result(parts_data):
    A, y, _ = parts_data
    return cluster_activations(readonly(A), 3, random_state=0, backend="cpu")


def test_synthetic_classes_differ_by_parts_not_by_mean_pooling(parts_data):
    A, y, parts = parts_data
    pooled = A.mean(axis=(2, 3))
    class_means = np.array([pooled[y == c].mean(0) for c in range(3)])
    between = np.linalg.norm(class_means - class_means.mean(0), axis=1).max()
    within = np.mean([np.linalg.norm(pooled[y == c] - class_means[c], axis=1).mean() for c in range(3)])
    assert between < 0.5 * within  # pooling sees mostly noise
    # the two parts of one class sum to the same vector for every class
    sums = parts[0::2] + parts[1::2]
    np.testing.assert_allclose(sums, np.broadcast_to(sums[0], sums.shape))


def test_fcn_clusters_by_parts_and_beats_kmeans(parts_data, fcn_result):
    A, y, _ = parts_data
    fcn = fcn_result
    base = cluster_activations(A, 3, method="kmeans", random_state=0)
    acc_fcn = metrics.clustering_accuracy(y, fcn.labels)
    acc_base = metrics.clustering_accuracy(y, base.labels)
    assert acc_fcn >= 0.9, acc_fcn
    assert acc_fcn >= acc_base + 0.2, (acc_fcn, acc_base)
    assert metrics.normalized_mutual_info_score(y, fcn.labels) > 0.8
    assert metrics.adjusted_rand_score(y, fcn.labels) > 0.8
    # each image uses about 2 of the 6 parts
    used = np.array([len(u) for u in fcn.parts_used])
    assert np.median(used) == 2


def test_fcn_argmax_layer2_runs_and_is_accurate_here(parts_data):
    A, y, _ = parts_data
    res = cluster_activations(A, 3, assign="argmax", random_state=0, backend="cpu")
    assert res.layer2.shape == (3, 9) and res.centers is None
    assert set(res.labels.tolist()) <= {0, 1, 2}
    assert metrics.clustering_accuracy(y, res.labels) >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DFFKIT_SLOW_TESTS") != "1",
                    reason="a measurement (about 1 minute): set DFFKIT_SLOW_TESTS=1 to run it")
def test_measure_kmeans_against_argmax_assignment():
    """The measurement behind the default assign="kmeans" (clustering.py's docstring), reduced."""
    from dffkit.clustering import assign_clusters

    acc = {"kmeans": [], "argmax": []}
    for shared in (0, 1):
        for seed in range(3):
            A, y, _ = synthetic_parts_activations(30, 4, shared_parts=shared, random_state=1000 + seed)
            for lam_rel in (0.03, 0.1, 0.3):
                res = cluster_activations(A, 4, lam_rel=lam_rel, random_state=seed, backend="cpu")
                for assign in acc:
                    labels = assign_clusters(res.codes, 4, assign, random_state=seed)[0]
                    acc[assign].append(metrics.clustering_accuracy(y, labels))
    print({a: (np.mean(v), np.min(v)) for a, v in acc.items()})
    assert np.mean(acc["kmeans"]) >= np.mean(acc["argmax"]) - 0.01
    assert np.mean(acc["kmeans"]) >= 0.9


def test_result_contents(parts_data):
    A, y, _ = parts_data
    N, C, h, w = A.shape
    res = cluster_activations(A[:30], 3, n_parts=5, random_state=1, n_init=1, backend="cpu")
    assert isinstance(res, ClusteringResult)
    assert res.labels.shape == (30,) and res.labels.dtype == np.int64
    assert res.codes.shape == (30, 5) and res.parts.shape == (5, C)
    assert res.part_maps.shape == (30, 5, h, w)
    # the code is the norm of the heat map; the maps of the parts used come back per image
    np.testing.assert_allclose(np.sqrt((res.part_maps.astype(np.float64) ** 2).sum(axis=(2, 3))),
                               res.codes, rtol=1e-5)
    for i in range(30):
        maps = res.heat_maps(i)
        assert list(maps) == res.parts_used[i].tolist()
        assert all(m.shape == (h, w) for m in maps.values())
        top = res.codes[i].max()
        assert set(res.parts_used[i].tolist()) == set(np.flatnonzero(res.codes[i] >= 0.05 * top).tolist())
    assert sum(len(c) for c in res.clusters()) == 30
    assert res.lam > 0 and res.mu > 0 and np.isfinite(res.objective)


def test_default_penalties_scale_with_the_data(parts_data):
    A, y, _ = parts_data
    kw = dict(random_state=0, n_init=1, backend="cpu", max_iter=100, tol=0)
    a = cluster_activations(A[:45].astype(np.float64), 3, **kw)
    b = cluster_activations(250.0 * A[:45].astype(np.float64), 3, **kw)
    assert b.lam == pytest.approx(250.0 ** 1.5 * a.lam) and b.mu == pytest.approx(250.0 * a.mu)
    np.testing.assert_allclose(b.codes, np.sqrt(250.0) * a.codes, rtol=1e-6)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_predict_on_the_training_images(parts_data, fcn_result):
    A, y, _ = parts_data
    res = fcn_result
    pred = res.predict_activations(A[:30], max_iter=100)
    assert metrics.clustering_accuracy(y[:30], pred) >= 0.9
    assert metrics.clustering_accuracy(res.labels[:30], pred) >= 0.9


def test_predict_names_a_channel_mismatch(parts_data, fcn_result):
    """Activations of another layer (10 channels for parts learned on 32) were blamed on H."""
    A, _, _ = parts_data
    with pytest.raises(ValueError, match="activations have 10 channels, the parts were learned on 32"):
        fcn_result.predict_activations(A[:4, :10])
    base = cluster_activations(A[:12], 3, method="kmeans")
    with pytest.raises(ValueError, match="activations have 10 channels, the clusters were learned on 32"):
        base.predict_activations(A[:4, :10])
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        fcn_result.predict_activations(A[:4], max_iter=-1)


def test_activations_of_two_positions_per_image():
    """h*w == 2: an image's offsets [0, 2] have one entry per row, which group_offsets now
    refuses as ambiguous; the clustering passes them as explicit offsets."""
    rng = np.random.default_rng(0)
    A = rng.random((1, 4, 1, 2)).astype(np.float32)
    H = rng.random((2, 4)).astype(np.float32)
    codes = transform_codes(A, H, max_iter=5)
    X = A[0].transpose(1, 2, 0).reshape(2, 4)
    W, _, _ = group_sparse_nmf(X, {"offsets": [0, 2]}, 2, H=H, update_H=False, max_iter=5, tol=0)
    np.testing.assert_allclose(codes[0], group_norms(W, [0, 2])[0], rtol=1e-6)
    res = cluster_activations(A, 1, n_parts=2, n_init=1, max_iter=5, backend="cpu")
    assert res.codes.shape == (1, 2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(A=np.ones((2, 3, 4))), ValueError, "4-D"),
    (dict(A=-np.ones((4, 3, 2, 2))), ValueError, "non-negative"),
    (dict(A=np.full((4, 3, 2, 2), np.nan)), ValueError, "NaN"),
    (dict(n_clusters=5), ValueError, "larger than the number of images"),
    (dict(n_clusters=0), ValueError, "n_clusters must be >= 1"),
    (dict(method="spectral"), ValueError, "method must be one of"),
    (dict(assign="nearest"), ValueError, "assign must be one of"),
    (dict(lam=-1.0), ValueError, "lam must be >= 0"),
    (dict(lam_rel="x"), TypeError, "lam_rel must be a real number"),
    (dict(images=["a"]), ValueError, "names for 4 images"),
    # checked before any conversion (float(None) and int(None) named no parameter)
    (dict(tol=None), TypeError, "tol must be a real number"),
    (dict(tol="abc"), TypeError, "tol must be a real number"),
    (dict(tol=-1.0), ValueError, "tol must be >= 0"),
    (dict(max_iter=None), TypeError, "max_iter must be an integer"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an integer"),
    (dict(max_iter=None, method="kmeans"), TypeError, "max_iter must be an integer"),
])
def test_bad_input_is_named(kwargs, exc, match):
    args = dict(A=np.random.default_rng(0).random((4, 3, 2, 2)), n_clusters=2)
    args.update(kwargs)
    A, n = args.pop("A"), args.pop("n_clusters")
    with pytest.raises(exc, match=match):
        cluster_activations(A, n, **args)


def test_cluster_images_with_any_extractor(parts_data):
    A, y, _ = parts_data
    images = [f"img{i}.png" for i in range(len(A))]
    lookup = dict(zip(images, A))

    def fake_extractor(items):
        return np.stack([lookup[i] for i in items])

    res = cluster_images(images[:45], 3, extractor=fake_extractor, random_state=0, n_init=1,
                         max_iter=100, backend="cpu")
    direct = cluster_activations(A[:45], 3, random_state=0, n_init=1, max_iter=100, backend="cpu")
    assert res.images == images[:45]
    np.testing.assert_array_equal(res.labels, direct.labels)
    with pytest.raises(TypeError, match="extractor must be"):
        cluster_images(images, 3, extractor=42)
    with pytest.raises(ValueError, match="no images"):
        cluster_images([], 3, extractor=fake_extractor)


def test_cluster_images_takes_one_path_or_a_folder(tmp_path, parts_data):
    """A single path string was iterated character by character ("no such image file: i")."""
    from PIL import Image

    A, _, _ = parts_data
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(6):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    (folder / "notes.txt").write_text("not an image")
    seen = []

    def fake_extractor(items):
        seen.append(list(items))
        return np.stack([A[paths.index(os.fspath(i))] for i in items])

    kw = dict(extractor=fake_extractor, n_init=1, max_iter=20, backend="cpu")
    one = cluster_images(paths[2], 1, **kw)
    assert one.images == [paths[2]] and seen[-1] == [paths[2]]
    one = cluster_images(folder / "img03.png", 1, **kw)
    assert one.images == [paths[3]]
    res = cluster_images(str(folder), 2, **kw)
    assert res.images == paths and len(res.labels) == 6
    res = cluster_images(folder, 2, **kw)
    assert res.images == paths
    with pytest.raises(FileNotFoundError, match="no images"):
        cluster_images(str(tmp_path), 1, **kw)
    # one uint8 image (H, W, 3) is one image, not H rows
    got = []
    cluster_images(np.zeros((8, 8, 3), np.uint8), 1, n_init=1, max_iter=5, backend="cpu",
                   extractor=lambda items: got.append(len(items)) or A[:len(items)])
    assert got == [1]


def test_contact_sheet_and_write_clusters_check_thumb(tmp_path, parts_data, fcn_result):
    from dffkit.clustering import contact_sheet, write_clusters

    images = [np.full((16, 16, 3), 100, np.uint8)] * 2
    for bad in (0, -5, 2.5, None, True):
        with pytest.raises(ValueError, match="thumb must be a positive int"):
            contact_sheet(images, thumb=bad)
    assert contact_sheet(images, thumb=8).size == (2 * (8 + 4) + 4, 8 + 8)
    res = cluster_activations(parts_data[0][:4], 2, n_init=1, max_iter=5, backend="cpu")
    with pytest.raises(ValueError, match="thumb must be a positive int"):
        write_clusters(res, [np.zeros((8, 8, 3), np.uint8)] * 4, tmp_path / "o", thumb=0)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def colour_pair_images(n_per_class=20, size=64, seed=0):
    """Grey images holding two flat rectangles whose colours are complementary: red + cyan,
    green + magenta or blue + yellow (the class). Each pair sums to the same grey, so the
    classes differ by which colours appear together more than by their average."""
    rng = np.random.default_rng(seed)
    pairs = [((255, 0, 0), (0, 255, 255)), ((0, 255, 0), (255, 0, 255)), ((0, 0, 255), (255, 255, 0))]
    images, y = [], []
    for c, pair in enumerate(pairs):
        for _ in range(n_per_class):
            im = np.clip(128 + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
            for colour in pair:
                h, w = rng.integers(size // 5, size // 2 + 1, 2)
                r0, c0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
                im[r0:r0 + h, c0:c0 + w] = colour
            images.append(im)
            y.append(c)
    return images, np.array(y)


def test_cluster_images_end_to_end_with_the_filterbank():
    features = pytest.importorskip("dffkit.features")
    images, y = colour_pair_images(seed=0)
    fx = features.FeatureExtractor("filterbank", image_size=64, providers="cpu")
    res = cluster_images(images, 3, extractor=fx, random_state=0, backend="cpu")
    base = cluster_images(images, 3, extractor=fx, method="kmeans", random_state=0)
    acc, acc_base = (metrics.clustering_accuracy(y, r.labels) for r in (res, base))
    assert acc >= 0.9 and acc >= acc_base + 0.2, (acc, acc_base)
    assert res.images == ["image %d" % i for i in range(len(images))]


# ---------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------

def _session(model):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_lam", [False, True])
def test_export_reproduces_transform_on_activations(parts_data, fcn_result, tmp_path, with_lam):
    A, y, _ = parts_data
    res = fcn_result
    lam = res.lam if with_lam else 0.0
    path = tmp_path / "parts.onnx"
    model = export_parts_model(None, res.parts, 40, path, lam=lam, centers=res.centers)
    assert path.exists() and model.ir_version == 9
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    maps, code, cluster = _session(model).run(None, {"activations": A[:12]})
    k = res.parts.shape[0]
    for i in range(12):
        X = A[i].transpose(1, 2, 0).reshape(-1, A.shape[1])
        W, _, _ = group_sparse_nmf(X, [0, len(X)], k, H=res.parts, update_H=False, lam=lam,
                                   max_iter=40, tol=0, backend="cpu")
        np.testing.assert_allclose(maps[i].transpose(1, 2, 0).reshape(-1, k), W, rtol=1e-4,
                                   atol=1e-5 * W.max())
        np.testing.assert_allclose(code[i], group_norms(W, [0, len(X)])[0], rtol=1e-4,
                                   atol=1e-5 * W.max())
    np.testing.assert_allclose(code, transform_codes(A[:12], res.parts, lam=lam, max_iter=40),
                               rtol=1e-4, atol=1e-5 * code.max())
    # the cluster output is the nearest centre of the normalised code
    unit = code / np.linalg.norm(code, axis=1, keepdims=True)
    nearest = ((unit[:, None, :] - res.centers[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(cluster, nearest)
    if with_lam:
        np.testing.assert_array_equal(cluster, res.predict_activations(A[:12], max_iter=40))
    # the batch does not change an image's result
    alone = _session(model).run(["code"], {"activations": A[3:4]})[0]
    np.testing.assert_allclose(alone[0], code[3], rtol=1e-5, atol=1e-6 * code.max())


def _tiny_cnn(opset=17):
    """Conv 3 -> 8 channels, stride 4, then ReLU: a stand-in CNN written with onnx.helper."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weight = rng.normal(size=(8, 3, 4, 4)).astype(np.float32)
    bias = np.abs(rng.normal(size=8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["conv"], strides=[4, 4]),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["pooled"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset <= 19 else 10
    return model


@pytest.mark.parametrize("opset", [13, 17, 19])  # reductions take axes as an input from 18 on
def test_export_with_a_network_maps_images_to_parts(tmp_path, opset):
    cnn = _tiny_cnn(opset)
    rng = np.random.default_rng(2)
    images = rng.normal(size=(6, 3, 32, 32)).astype(np.float32)
    A = _session(_cut(cnn)).run(None, {"image": images})[0]
    assert A.shape == (6, 8, 8, 8)
    X = A.transpose(0, 2, 3, 1).reshape(-1, 8)
    _, H, _ = group_sparse_nmf(X, np.arange(7) * 64, 3, lam=0.5, mu=0.1, init="random",
                               random_state=0, max_iter=50, backend="cpu")
    model = export_parts_model(cnn, H, 25, tmp_path / "m.onnx", lam=0.5, layer="relu",
                               input="float")
    assert [o.name for o in model.graph.output] == ["part_maps", "code"]
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    maps, code = _session(model).run(None, {"image": images})
    assert maps.shape == (6, 3, 8, 8)
    np.testing.assert_allclose(code, transform_codes(A, H, lam=0.5, max_iter=25), rtol=1e-4,
                               atol=1e-5 * code.max())


@pytest.mark.parametrize("opset", [13, 17, 19])
def test_export_takes_uint8_images_like_the_extractor(tmp_path, opset):
    """By default the exported graph takes what the extractor's own session takes: resized
    uint8 RGB images (N, H, W, 3), normalised inside the graph; onnxruntime alone then maps
    pixels to the part maps and codes of the Python path."""
    features = pytest.importorskip("dffkit.features")
    cnn = _tiny_cnn(opset)
    fx = features.FeatureExtractor(cnn, layer="relu", providers="cpu")
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    A = fx.run(pixels)
    assert A.shape == (6, 8, 8, 8)
    _, H, _ = group_sparse_nmf(A.transpose(0, 2, 3, 1).reshape(-1, 8), np.arange(7) * 64, 3,
                               lam=0.5, init="random", random_state=0, max_iter=50, backend="cpu")
    for source in (cnn, fx):
        model = export_parts_model(source, H, 25, lam=0.5, layer="relu")
        (inp,) = model.graph.input
        assert inp.name == fx.input_name
        assert inp.type.tensor_type.elem_type == 2  # uint8
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [32, 32, 3]
        maps, code = _session(model).run(None, {inp.name: pixels})
        np.testing.assert_allclose(code, transform_codes(A, H, lam=0.5, max_iter=25), rtol=1e-4,
                                   atol=1e-5 * code.max())
        X = A[2].transpose(1, 2, 0).reshape(-1, 8)
        W, _, _ = group_sparse_nmf(X, [0, 64], 3, H=H, update_H=False, lam=0.5, max_iter=25,
                                   tol=0, backend="cpu")
        np.testing.assert_allclose(maps[2].transpose(1, 2, 0).reshape(-1, 3), W, rtol=1e-4,
                                   atol=1e-5 * W.max())
    # another normalisation is another graph: "unit" scales the pixels by 1/255 only
    unit = export_parts_model(cnn, H, 25, lam=0.5, layer="relu", normalization="unit")
    A_unit = _session(_cut(cnn)).run(None, {"image": (pixels.transpose(0, 3, 1, 2) / np.float32(255)).astype(np.float32)})[0]
    code = _session(unit).run(["code"], {fx.input_name: pixels})[0]
    np.testing.assert_allclose(code, transform_codes(A_unit, H, lam=0.5, max_iter=25), rtol=1e-4,
                               atol=1e-5 * code.max())
    with pytest.raises(ValueError, match="input must be 'uint8'.*or 'float'"):
        export_parts_model(cnn, H, 5, layer="relu", input="float16")
    with pytest.raises(ValueError, match="normalization applies to input='uint8'"):
        export_parts_model(cnn, H, 5, layer="relu", input="float", normalization="caffe")
    with pytest.raises(ValueError, match="with extractor_or_model=None"):
        export_parts_model(None, H, 5, input="uint8")


def test_export_refuses_parts_of_another_channel_count():
    """Parts with 5 channels on an 8-channel layer exported, passed onnx.checker and failed
    in onnxruntime with a Reshape error; now the export says which counts differ."""
    cnn = _tiny_cnn()
    H = np.ones((2, 5), np.float32)
    for kw in ({}, dict(input="float")):
        with pytest.raises(ValueError, match="the parts have 5 channels but layer 'relu' of the network has 8"):
            export_parts_model(cnn, H, 5, layer="relu", **kw)
    features = pytest.importorskip("dffkit.features")
    fx = features.FeatureExtractor("filterbank", image_size=64, providers="cpu")
    with pytest.raises(ValueError, match="the parts have 32 channels but layer .* of the extractor has 55"):
        export_parts_model(fx, np.ones((3, 32), np.float32), 5)
    # the activations input declares its channels, so onnxruntime names a wrong count too
    (inp,) = export_parts_model(None, H, 5).graph.input
    assert inp.type.tensor_type.shape.dim[1].dim_value == 5


def _cut(cnn):
    from dffkit import models

    return models.truncate(cnn, "relu")


def test_export_with_the_filterbank_extractor(tmp_path):
    features = pytest.importorskip("dffkit.features")
    fx = features.FeatureExtractor("filterbank", image_size=64, providers="cpu")
    files = sorted(os.path.join(SAMPLES, f) for f in os.listdir(SAMPLES) if f.endswith(".jpg"))
    A = fx(files)
    est = dffkit.GroupSparseNMF(4, lam=0.0, mu=0.0, init="random", random_state=0, max_iter=30,
                                backend="cpu")
    N, C, h, w = A.shape
    est.fit(A.transpose(0, 2, 3, 1).reshape(-1, C), groups=np.repeat(np.arange(N), h * w))
    est.lam = 0.01 * float(A.mean()) ** 1.5
    from dffkit.images import load_images

    expected = transform_codes(A, est.components_, lam=est.lam, max_iter=20)
    # the default: uint8 pixels resized to the extractor's size, nothing else on the host
    model = export_parts_model(fx, est, 20, tmp_path / "fb.onnx")
    sess = _session(model)
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    pixels = fx.resize_images(load_images(files))
    assert pixels.dtype == np.uint8 and pixels.shape == (len(files), 64, 64, 3)
    maps, code = sess.run(None, {sess.get_inputs()[0].name: pixels})
    np.testing.assert_allclose(code, expected, rtol=1e-4, atol=1e-5 * code.max())
    X = A[1].transpose(1, 2, 0).reshape(-1, C)
    W, _, _ = group_sparse_nmf(X, [0, h * w], 4, H=est.components_, update_H=False, lam=est.lam,
                               max_iter=20, tol=0, backend="cpu")
    np.testing.assert_allclose(maps[1].transpose(1, 2, 0).reshape(-1, 4), W, rtol=1e-3,
                               atol=1e-4 * W.max())
    # input="float": the normalised float32 tensors of fx.preprocess
    model = export_parts_model(fx, est, 20, input="float")
    sess = _session(model)
    assert sess.get_inputs()[0].type == "tensor(float)"
    maps, code = sess.run(None, {sess.get_inputs()[0].name: fx.preprocess(load_images(files))})
    np.testing.assert_allclose(code, expected, rtol=1e-3, atol=1e-4 * code.max())


def test_export_bad_input():
    with pytest.raises(ValueError, match="n_iter"):
        export_parts_model(None, np.ones((2, 3)), 0)
    with pytest.raises(ValueError, match="non-negative"):
        export_parts_model(None, -np.ones((2, 3)), 5)
    with pytest.raises(ValueError, match="2-D"):
        export_parts_model(None, np.ones(3), 5)
    with pytest.raises(ValueError, match="centers"):
        export_parts_model(None, np.ones((2, 3)), 5, centers=np.ones((3, 5)))
    with pytest.raises(TypeError, match="extractor_or_model"):
        export_parts_model(object(), np.ones((2, 3)), 5)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

def test_cli_cluster_writes_json_and_contact_sheets(tmp_path, capsys):
    pytest.importorskip("dffkit.features")
    from dffkit.cli import main

    out = tmp_path / "out"
    rc = main(["cluster", SAMPLES, "-n", "2", "--out", str(out), "--parts", "3", "--onnx"])
    assert rc == 0
    assert (out / "parts.onnx").exists()
    doc = json.loads((out / "clusters.json").read_text())
    assert doc["n_clusters"] == 2 and doc["method"] == "fcn" and doc["n_parts"] == 3
    assert sum(c["size"] for c in doc["clusters"]) == 4 == len(doc["images"])
    for c in doc["clusters"]:
        if c["size"]:
            assert (out / c["sheet"]).exists()
    assert "cluster 0" in capsys.readouterr().out
    assert main(["cluster", str(tmp_path / "missing.jpg"), "-n", "2"]) == 1
    # parts.onnx takes the extractor's uint8 images (N, H, W, 3)
    sess = _session(pytest.importorskip("onnx").load(str(out / "parts.onnx")))
    assert sess.get_inputs()[0].type == "tensor(uint8)"


def test_cli_cluster_refuses_bad_options_before_the_work(tmp_path, capsys, monkeypatch):
    """--thumb 0 crashed in PIL after all the work (ZeroDivisionError), --thumb -5 said
    "scale must be > 0"; --onnx with --method kmeans failed after writing the results."""
    from dffkit import clustering
    from dffkit.cli import main

    monkeypatch.setattr(clustering, "cluster_images", lambda *a, **k: pytest.fail("clustered in vain"))
    out = tmp_path / "out"
    for thumb in ("0", "-5", "big"):
        with pytest.raises(SystemExit) as exit_info:
            main(["cluster", SAMPLES, "-n", "2", "--thumb", thumb, "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --thumb: must be a positive int (pixels)" in err and "Traceback" not in err
    assert main(["cluster", SAMPLES, "-n", "2", "--method", "kmeans", "--onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "dffkit cluster: error: --onnx needs --method fcn" in err
    assert not out.exists()


def test_cli_cluster_refuses_an_unusable_output_before_the_work(tmp_path, capsys, monkeypatch):
    from dffkit import clustering
    from dffkit.cli import main

    monkeypatch.setattr(clustering, "cluster_images", lambda *a, **k: pytest.fail("clustered in vain"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is a file, not a folder"), (afile / "sub", "which is a file, not a folder")):
        assert main(["cluster", SAMPLES, "-n", "2", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"dffkit cluster: error: --out {out}" in err and message in err and "Traceback" not in err
    assert afile.read_text() == "x"


def test_heat_maps_checks_the_image_index(fcn_result):
    """heat_maps(100) raised a bare IndexError from numpy."""
    n = len(fcn_result.labels)  # 90
    with pytest.raises(IndexError, match=rf"image index i=100 out of range: this result has {n} images, "
                                         rf"pass 0..{n - 1} \(or -{n}..-1 from the end\)"):
        fcn_result.heat_maps(100)
    with pytest.raises(IndexError, match=f"i=-{n + 1} out of range"):
        fcn_result.heat_maps(-n - 1)
    for bad in (1.0, "0", True, None):
        with pytest.raises(TypeError, match=r"the image index i must be an int"):
            fcn_result.heat_maps(bad)
    last = fcn_result.heat_maps(-1)  # from the end, as a list does
    assert list(last) == fcn_result.parts_used[n - 1].tolist()
    for j, m in last.items():
        np.testing.assert_array_equal(m, fcn_result.part_maps[n - 1, j])
    assert list(fcn_result.heat_maps(np.int64(3))) == fcn_result.parts_used[3].tolist()


def test_cluster_images_takes_a_numpy_array_of_paths(tmp_path, parts_data):
    """A 1-D str array (pandas' df.path.values) was refused as one image of shape (N,)."""
    from PIL import Image

    A, _, _ = parts_data
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(paths[-1])
    seen = []

    def fake_extractor(items):
        seen.append(list(items))
        return np.stack([A[paths.index(i)] for i in items])

    for array in (np.array(paths), np.array(paths, dtype=object)):
        res = cluster_images(array, 2, extractor=fake_extractor, n_init=1, max_iter=20, backend="cpu")
        assert res.images == paths and seen[-1] == paths


# ---------------------------------------------------------------------------------------------
# audit regressions: checks before the slow part, progress, results a person can read
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_clusters, kwargs, exc, match", [
    ("2", {}, TypeError, "n_clusters must be an integer"),
    (7, {}, ValueError, r"n_clusters=7 is larger than the number of images \(6\)"),
    (2, dict(n_part=3), TypeError, "unknown keyword argument 'n_part'.*n_parts"),
    (2, dict(method="spectral"), ValueError, "method must be one of"),
    (2, dict(n_parts=0), ValueError, "n_parts must be >= 1"),
    (2, dict(lam_rel=float("nan")), ValueError, "lam_rel must be finite"),
    (2, dict(random_state=-1), ValueError, "random_state must be >= 0"),
    (2, dict(backend="gpu"), ValueError, "backend must be one of"),
    (2, dict(used_threshold=2.0), ValueError, r"used_threshold must be in \[0, 1\]"),
    (2, dict(progress="yes"), TypeError, "progress must be None or False"),
])
def test_cluster_images_checks_its_arguments_before_extracting(n_clusters, kwargs, exc, match):
    """A wrong n_clusters or a misspelt option was found only after the features of every
    image had been extracted (minutes for a large folder)."""
    def extractor(items):
        pytest.fail("features extracted before the arguments were checked")

    images = [np.zeros((8, 8, 3), np.uint8)] * 6
    with pytest.raises(exc, match=match):
        cluster_images(images, n_clusters, extractor=extractor, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(used_threshold=1.5), ValueError, r"used_threshold must be in \[0, 1\].*no part would count"),
    (dict(images="abcd"), TypeError, "images must be a list of 4 names"),
    (dict(A=[np.ones((3, 2, 2)), np.ones((3, 2, 3))]), ValueError,
     r"activations of image 1 have shape \(3, 2, 3\), those of image 0 \(3, 2, 2\)"),
])
def test_more_bad_input_is_named(kwargs, exc, match):
    """used_threshold=1.5 left every image without a used part (no heat maps, plain contact
    sheets); images="abcd" named the images 'a', 'b', 'c', 'd'; activations of two shapes
    failed in np.stack ("all input arrays must have the same shape")."""
    args = dict(A=np.random.default_rng(0).random((4, 3, 2, 2)), n_clusters=2)
    args.update(kwargs)
    A, n = args.pop("A"), args.pop("n_clusters")
    with pytest.raises(exc, match=match):
        cluster_activations(A, min(n, len(A)), n_init=1, max_iter=5, backend="cpu", **args)


def test_progress_over_the_images_then_the_restarts(parts_data, capsys):
    """cluster_images ran minutes on a large folder without a word; progress reports the
    feature extraction (in the extractor's batches) and the GSNMF restarts."""
    A, _, _ = parts_data
    images = [f"img{i}.png" for i in range(10)]
    lookup = dict(zip(images, A))
    calls = []

    class Extractor:
        batch_size = 4

        def __call__(self, items):
            calls.append(len(items))
            return np.stack([lookup[i] for i in items])

    kw = dict(extractor=Extractor(), n_init=2, max_iter=20, random_state=0, backend="cpu")
    seen = []
    res = cluster_images(images, 2, progress=lambda done, total: seen.append((done, total)), **kw)
    assert calls == [4, 4, 2]
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10), (0, 2), (1, 2), (2, 2)]
    quiet = cluster_images(images, 2, **kw)
    assert calls[-1] == 10  # without progress, one call as before
    np.testing.assert_array_equal(res.labels, quiet.labels)
    np.testing.assert_array_equal(res.parts, quiet.parts)
    capsys.readouterr()
    cluster_images(images, 2, progress=True, **kw)
    err = capsys.readouterr().err
    assert "10/10 images" in err and "2/2 restarts" in err


def test_result_repr_is_a_summary(fcn_result):
    """The dataclass repr printed every array and each image's parts: 40 kB for 120 images,
    megabytes for a real folder, whenever a notebook showed the result."""
    text = repr(fcn_result)
    assert len(text) < 400, len(text)
    sizes = np.bincount(fcn_result.labels, minlength=3).tolist()
    assert text.startswith(f"ClusteringResult(90 images, 3 clusters of sizes {sizes}, method='fcn'")
    assert "n_parts=9" in text and "lam=" in text
    many = ClusteringResult(labels=np.arange(20), codes=np.zeros((20, 1)), parts=None, part_maps=None,
                            parts_used=[], method="kmeans", assign="kmeans", images=["a.png"] * 20)
    assert repr(many) == ("ClusteringResult(20 images, 20 clusters of sizes [1, 1, 1, 1, 1, 1, 1, 1, "
                          "... (20 in all)], method='kmeans', images=['a.png', ...])")


def test_identical_images_warn_that_clusters_are_arbitrary():
    """All-zero activations (a black folder, a broken extractor) gave arbitrary labels silently."""
    A = np.zeros((6, 4, 3, 3), np.float32)
    for method in ("fcn", "kmeans"):
        with pytest.warns(UserWarning, match=r"only 1 distinct value for n_clusters=3.*split between clusters arbitrarily"):
            cluster_activations(A, 3, method=method, n_init=1, max_iter=5, backend="cpu")


def test_write_clusters_checks_the_images_and_writes_numpy_extras(tmp_path, parts_data):
    """A folder path as images indexed its characters (IndexError), a shorter list raised
    IndexError and a longer one gave thumbnails of the wrong images; an extra holding numpy
    numbers failed in json after the contact sheets were written."""
    from PIL import Image

    from dffkit.clustering import write_clusters

    A, _, _ = parts_data
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(4):
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(paths[-1])
    res = cluster_images(str(folder), 2, extractor=lambda items: A[:len(items)], n_init=1,
                         max_iter=5, backend="cpu")
    for images in (paths[:3], paths + paths):
        with pytest.raises(ValueError, match=f"images has {len(images)} images, but the result clustered 4"):
            write_clusters(res, images, tmp_path / "bad")
    with pytest.raises(TypeError, match="extra.*cannot be written to JSON"):
        write_clusters(res, paths, tmp_path / "bad", extra={"model": object()})
    assert not (tmp_path / "bad").exists()
    for images in (str(folder), folder, None):  # the folder, or the files named in the result
        path = write_clusters(res, images, tmp_path / "out", extra={"seed": np.int64(3), "w": np.ones(2)})
        doc = json.loads(open(path).read())
        assert doc["seed"] == 3 and doc["w"] == [1.0, 1.0]
        assert [d["image"] for d in doc["images"]] == paths
    arrays = cluster_images(np.zeros((4, 8, 8, 3), np.uint8), 2, extractor=lambda items: A[:len(items)],
                            n_init=1, max_iter=5, backend="cpu")
    with pytest.raises(ValueError, match="images=None takes the image files named in result.images"):
        write_clusters(arrays, None, tmp_path / "arrays")


def test_cli_cluster_passes_restarts_iterations_and_progress(tmp_path, monkeypatch, capsys):
    from dffkit import clustering
    from dffkit.cli import main

    got = []

    def fake(paths, n, **kwargs):
        got.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(clustering, "cluster_images", fake)
    argv = ["cluster", SAMPLES, "-n", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert got[-1]["progress"] is True and got[-1]["n_init"] == 4 and got[-1]["max_iter"] == 300
    assert main(argv + ["--quiet", "--n-init", "1", "--max-iter", "50"]) == 1
    assert got[-1]["progress"] is None and got[-1]["n_init"] == 1 and got[-1]["max_iter"] == 50
    capsys.readouterr()
    assert main(argv + ["--max-iter", "-1"]) == 1
    assert "--max-iter must be a non-negative int" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(max_iter=0), ValueError, "max_iter must be >= 1"),
    (dict(max_iter=-3), ValueError, "max_iter must be >= 1"),
    (dict(max_iter=None), TypeError, "max_iter must be an integer"),
    (dict(tol="x"), TypeError, "tol must be a real number"),
])
def test_kmeans_checks_max_iter_and_tol(kwargs, exc, match):
    """max_iter=0 (or below) ended in AttributeError: 'NoneType' object has no attribute 'astype'."""
    with pytest.raises(exc, match=match):
        kmeans(np.random.default_rng(0).random((10, 2)), 2, **kwargs)
