"""dffkit.models: IR versions, VGG-16 (random build, cache, structure), classifier head,
ImageNet classes, the colour-and-texture filter bank, float16 conversion (issue 6)."""
import contextlib
import math
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dffkit import models  # noqa: E402
from dffkit.images import normalize  # noqa: E402

NARROW = dict(widths=(4, 4, 8, 8, 8), fc_dims=(16, 12, 10))


def narrow_vgg(include_classifier=False, seed=0):
    """A VGG-16 graph (same structure as the real one) with few channels, fast to run."""
    return models._build_vgg16_random(include_classifier, seed, **NARROW)


def session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no spinning pool to slow numpy's BLAS threads down
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rename_all(model, prefix):
    """Rename every node and non-input tensor the way other exporters would, so only the
    structure identifies the layers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = {v.name for v in m.graph.input} | {t.name for t in m.graph.initializer}
    mapping = {}
    for i, node in enumerate(m.graph.node):
        node.name = f"{prefix}/node{i}/{node.op_type}"
        for j, out in enumerate(node.output):
            mapping[out] = f"{prefix}/node{i}/{node.op_type}_output_{j}"
            node.output[j] = mapping[out]
    for node in m.graph.node:
        for j, inp in enumerate(node.input):
            if inp not in keep:
                node.input[j] = mapping.get(inp, inp)
    for out in m.graph.output:
        out.name = mapping.get(out.name, out.name)
    del m.metadata_props[:]
    return m, mapping


# --------------------------------------------------------------------------- IR version


def test_ir_version_is_one_onnxruntime_accepts():
    ir = models.max_ir_version()
    assert 7 <= ir <= onnx.IR_VERSION
    model = models.filterbank()
    assert model.ir_version <= ir
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [models.OPSET]
    session(model)  # loads
    if ir < onnx.IR_VERSION:  # the probe found a real limit: one above it is refused
        model.ir_version = ir + 1
        with pytest.raises(Exception):
            session(model)


def test_fit_ir_version_lowers_only():
    model = models.filterbank()
    model.ir_version = 99
    assert models.fit_ir_version(model).ir_version == models.max_ir_version()
    model.ir_version = 7
    assert models.fit_ir_version(model).ir_version == 7


# --------------------------------------------------------------------------- VGG-16


def test_random_vgg16_is_deterministic_cached_and_labelled(tmp_path):
    with pytest.warns(models.UntrainedWeightsWarning, match="untrained"):
        a = models.vgg16(cache_dir=tmp_path)
    files = list(tmp_path.glob("vgg16-random-conv-seed0-*.onnx"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with pytest.warns(models.UntrainedWeightsWarning):
        b = models.vgg16(cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # read back, not rebuilt
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    info = models.model_info(a)
    assert info["untrained"] == "1" and info["weights"] == "random"
    assert models.is_untrained(a) and "UNTRAINED" in a.doc_string
    # He initialisation: std sqrt(2 / fan_in)
    w = wa["conv3_2.weight"]
    assert w.shape == (256, 256, 3, 3)
    assert w.std() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert abs(w.mean()) < 0.01 * w.std()
    assert sum(v.size for v in wa.values()) == 14714688  # VGG-16's convolutional part


def test_random_vgg16_depends_on_seed():
    a = narrow_vgg(seed=0)
    b = narrow_vgg(seed=1)
    wa = numpy_helper.to_array(a.graph.initializer[0])
    wb = numpy_helper.to_array(b.graph.initializer[0])
    assert not np.array_equal(wa, wb)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DFFKIT_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    assert models.cache_dir(tmp_path / "d") == tmp_path / "d"


def test_vgg16_layers_found_by_structure_whatever_the_names():
    model = narrow_vgg()
    ours = models.vgg16_layers(model)
    assert ours["conv5_3"] == "conv5_3" and ours["relu5_3"] == "relu5_3" and ours["pool4"] == "pool4"
    assert models.default_layer(model) == "relu5_3"
    renamed, mapping = rename_all(model, "/features")
    layers = models.vgg16_layers(renamed)
    assert layers["relu5_3"] == mapping["relu5_3"]
    assert layers["conv4_1"] == mapping["conv4_1"]
    assert models.default_layer(renamed) == mapping["relu5_3"]
    assert models.resolve_layer(renamed, "conv4_3") == mapping["conv4_3"]


def test_default_layer_with_bias_add_between_conv_and_relu():
    """Converters that split the bias off (Conv -> Add -> Relu) still give the ReLU."""
    model = narrow_vgg()
    g = model.graph
    nodes = []
    for node in g.node:
        if node.op_type == "Conv":
            bias = node.input[2]
            del node.input[2]
            out = node.output[0]
            node.output[0] = out + "_nobias"
            nodes += [node, helper.make_node("Add", [out + "_nobias", bias + "_r"], [out])]
            g.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), bias + "_r"))
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    assert models.default_layer(model) == "relu5_3"


def test_default_layer_of_other_networks_is_last_conv_activation():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c1"]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"]),
            helper.make_node("LeakyRelu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["y"]),
        ],
        "g", [x], [y], [w, numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert models.default_layer(model) == "r2"


def test_vgg16_from_a_file(tmp_path):
    path = tmp_path / "vgg.onnx"
    onnx.save(rename_all(narrow_vgg(), "/m")[0], str(path))
    model = models.vgg16(weights=str(path))
    assert models.vgg16_layers(model)
    with pytest.raises(ValueError, match="no classifier"):
        models.vgg16(weights=str(path), include_classifier=True)
    other = tmp_path / "fb.onnx"
    onnx.save(models.filterbank(), str(other))
    with pytest.raises(ValueError, match="not a VGG-16"):
        models.vgg16(weights=str(other))
    with pytest.raises(FileNotFoundError, match="nothere.onnx"):
        models.vgg16(weights=str(tmp_path / "nothere.onnx"))


def test_load_model_errors(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(ValueError, match="notes.onnx is not an ONNX model"):
        models.load_model(str(text))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.onnx is not an ONNX model"):
        models.load_model(str(empty))
    with pytest.raises(ValueError, match="directory"):
        models.load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        models.load_model(str(tmp_path / "missing.onnx"))


def test_truncate_drops_the_classifier_and_frees_the_input_size():
    model = narrow_vgg(include_classifier=True)
    cut = models.truncate(model, "relu5_3")
    assert not any(n.op_type in ("Gemm", "Flatten") for n in cut.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 64)).astype(np.float32)
    (y,) = session(cut).run(None, {"input": x})
    assert y.shape == (1, 8, 6, 4)


# --------------------------------------------------------------------------- classifier head


def _full_outputs(model, x):
    pool5 = session(models.truncate(model, "pool5")).run(None, {"input": x})[0]
    logits = session(models.truncate(model, "logits")).run(None, {"input": x})[0]
    return pool5, logits


def test_classifier_head_matches_the_network():
    model = narrow_vgg(include_classifier=True)
    head = models.classifier_head(model)
    assert head.channels == 8 and head.positions == 49 and head.order == "chw" and head.n_classes == 10
    assert head.untrained
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    pool5, logits = _full_outputs(model, x)
    np.testing.assert_allclose(head(pool5), logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    # an embedding is a constant conv5_3 map: the folded fc6 gives what the full fc6 gives
    emb = np.abs(np.random.default_rng(2).standard_normal((3, 8))).astype(np.float32)
    maps = np.broadcast_to(emb[:, :, None, None], (3, 8, 7, 7))
    np.testing.assert_allclose(head(emb), head(maps), rtol=1e-4, atol=1e-5)
    p = head.probabilities(emb)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    top = head.top(emb, 3)
    assert len(top) == 3 and len(top[0]) == 3
    assert top[0][0][1] == pytest.approx(p[0].max(), rel=1e-5)


def test_classifier_head_keras_layout():
    """Keras flattens pool5 as (h, w, c) and uses MatMul + Add: the head follows."""
    base = narrow_vgg()
    rng = np.random.default_rng(3)
    w6 = rng.standard_normal((7 * 7 * 8, 16)).astype(np.float32)
    w7 = rng.standard_normal((16, 5)).astype(np.float32)
    b6 = rng.standard_normal(16).astype(np.float32)
    g = base.graph
    g.node.extend([
        helper.make_node("Transpose", ["pool5"], ["pool5_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["pool5_nhwc", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w6"], ["mm6"]),
        helper.make_node("Add", ["mm6", "b6"], ["fc6"]),
        helper.make_node("Relu", ["fc6"], ["relu6"]),
        helper.make_node("MatMul", ["relu6", "w7"], ["logits"]),
    ])
    g.initializer.extend([
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(w6, "w6"), numpy_helper.from_array(b6, "b6"), numpy_helper.from_array(w7, "w7"),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    head = models.classifier_head(base)
    assert head.order == "hwc" and head.n_classes == 5
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    pool5, logits = _full_outputs(base, x)
    np.testing.assert_allclose(head(pool5), logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())


def test_classifier_head_needs_a_classifier():
    with pytest.raises(ValueError, match="no classifier"):
        models.classifier_head(narrow_vgg())
    with pytest.raises(ValueError, match="VGG-16"):
        models.classifier_head(models.filterbank())


def test_imagenet_classes():
    names = models.imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"
    detail = models.imagenet_classes(detail=True)
    assert [row[0] for row in detail] == list(range(1000))
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for _, w, _ in detail)
    assert len({w for _, w, _ in detail}) == 1000
    assert detail[0][2][1] == "Tinca tinca"


# --------------------------------------------------------------------------- filter bank


def _filterbank_run(x_uint8):
    return session(models.filterbank()).run(None, {"input": normalize(x_uint8)})[0]


@pytest.mark.parametrize("hw", [(224, 224), (100, 60), (37, 53), (8, 8)])
def test_filterbank_any_input_size(hw):
    x = np.random.default_rng(0).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    y = _filterbank_run(x)
    assert y.shape == (2, len(models.filterbank_channels()), hw[0] // 8, hw[1] // 8)
    assert y.dtype == np.float32 and y.min() >= 0


def test_filterbank_channels_mean_what_they_say():
    names = models.filterbank_channels()
    idx = {n: i for i, n in enumerate(names)}
    texture = [i for i, n in enumerate(names) if n.startswith("gabor")]
    for grey in (0, 128, 255):  # zero-mean filters, edge padding: no texture in a flat image, borders included
        y = _filterbank_run(np.full((1, 64, 64, 3), grey, np.uint8))[0]
        assert np.abs(y[texture]).max() < 1e-5
        assert y[idx["flat"]].min() == pytest.approx(0.15, rel=1e-3)
    assert y[idx["light"]].min() == pytest.approx(0.5, rel=1e-3) and y[idx["dark"]].max() == 0
    red = np.zeros((1, 64, 64, 3), np.uint8)
    red[..., 0] = 220
    y = _filterbank_run(red)[0]
    assert y[idx["red"]].mean() > 0.5 and y[idx["green"]].max() == 0
    assert y[idx["yellow"]].mean() > 0.2 and y[idx["blue"]].max() == 0
    # vertical stripes (luminance varying along x) excite the 0-degree filters, not 90
    xs = np.arange(64)
    stripes = np.repeat((128 + 100 * np.sin(2 * np.pi * xs / 8))[None, None, :, None], 64, axis=1)
    y = _filterbank_run(np.repeat(stripes, 3, axis=3).astype(np.uint8))[0][:, 2:-2, 2:-2]
    e0 = sum(y[idx[f"gabor_l8_o0_{p}{s}"]].mean() for p in ("even", "odd") for s in "+-")
    e90 = sum(y[idx[f"gabor_l8_o90_{p}{s}"]].mean() for p in ("even", "odd") for s in "+-")
    assert e0 > 20 * e90


def _texture(kind, h, w, rng):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    if kind == "flat":
        return np.zeros((h, w))
    if kind == "noise":
        return rng.uniform(-0.5, 0.5, (h, w))
    if kind.startswith("stripes"):
        _, lam, deg = kind.split(":")
        t = math.radians(float(deg))
        return 0.5 * np.sin(2 * np.pi * (x * math.cos(t) + y * math.sin(t)) / float(lam) + rng.uniform(0, 6.3))
    if kind.startswith("checker"):
        s = int(kind.split(":")[1])
        return ((x // s + y // s) % 2) - 0.5
    raise ValueError(kind)


def _scene(rng, bg, fg, shape, size=224):
    """An object (disk, square or ellipse) of one texture and colour on a background of
    another; returns the uint8 image and the object's mask."""
    layers = [np.clip(np.array(c)[None, None] + 0.3 * _texture(t, size, size, rng)[..., None], 0, 1) for t, c in (bg, fg)]
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    mask = {
        "disk": (y - cy) ** 2 + (x - cx) ** 2 < r**2,
        "square": (abs(y - cy) < r) & (abs(x - cx) < r),
        "ellipse": ((y - cy) / (1.3 * r)) ** 2 + ((x - cx) / (0.8 * r)) ** 2 < 1,
    }[shape]
    img = np.where(mask[..., None], layers[1], layers[0])
    return (img * 255).round().astype(np.uint8), mask


def _nmf(X, k, iters=400):
    """Frobenius NMF: NNDSVDa start (from the eigenvectors of the small Gram matrix), then
    multiplicative updates; returns W (m, k)."""
    X = X.astype(np.float64)
    evals, V = np.linalg.eigh(X.T @ X)
    order = np.argsort(evals)[::-1][:k]
    s = np.sqrt(np.maximum(evals[order], 0))
    V = V[:, order]
    U = X @ V / np.maximum(s, 1e-12)
    W, H = np.zeros((X.shape[0], k)), np.zeros((k, X.shape[1]))
    for j in range(k):
        u, v = U[:, j], V[:, j]
        up, un, vp, vn = np.maximum(u, 0), np.maximum(-u, 0), np.maximum(v, 0), np.maximum(-v, 0)
        pos = np.linalg.norm(up) * np.linalg.norm(vp)
        neg = np.linalg.norm(un) * np.linalg.norm(vn)
        a, b, n = (up, vp, pos) if pos >= neg else (un, vn, neg)
        scale = np.sqrt(s[j] * n) if j else np.sqrt(s[j])
        W[:, j] = scale * a / (np.linalg.norm(a) or 1) if j else scale * np.abs(u)
        H[j] = scale * b / (np.linalg.norm(b) or 1) if j else scale * np.abs(v)
    W[W == 0], H[H == 0] = X.mean(), X.mean()
    eps = np.finfo(np.float32).eps
    for _ in range(iters):
        W *= (X @ H.T) / np.maximum(W @ (H @ H.T), eps)
        H *= (W.T @ X) / np.maximum((W.T @ W) @ H, eps)
    return W


def _upsample(maps, size):
    """Bilinear (align_corners=False) upsampling of (k, h, w) maps to (k, size, size)."""
    k, h, w = maps.shape

    def matrix(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - (pos - lo)
        m[np.arange(n_out), hi] += pos - lo
        return m

    return matrix(size, h) @ maps @ matrix(size, w).T


SCENES = {
    "texture only (noise vs stripes)": (("noise", (0.5, 0.5, 0.5)), ("stripes:8:0", (0.5, 0.5, 0.5))),
    "orientation only": (("stripes:8:0", (0.5, 0.5, 0.5)), ("stripes:8:90", (0.5, 0.5, 0.5))),
    "scale only": (("stripes:4:45", (0.5, 0.5, 0.5)), ("stripes:16:45", (0.5, 0.5, 0.5))),
    "colour only, flat": (("flat", (0.3, 0.6, 0.3)), ("flat", (0.8, 0.3, 0.3))),
    "colour only, same noise": (("noise", (0.3, 0.3, 0.7)), ("noise", (0.8, 0.7, 0.2))),
    "colour and texture": (("noise", (0.3, 0.6, 0.3)), ("stripes:8:45", (0.8, 0.3, 0.3))),
    "flat vs checker, same colour": (("flat", (0.6, 0.5, 0.4)), ("checker:6", (0.6, 0.5, 0.4))),
}


def test_filterbank_nmf_separates_colour_and_texture_regions():
    """DFF on the filter bank's activations (3 images stacked, k = 2, heat maps scaled by
    their maximum, argmax) segments objects from backgrounds that differ in colour,
    texture, orientation or scale: mean IoU >= 0.9, every kind >= 0.75."""
    try:  # small matrices: BLAS threads only cost time
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(1)
    except ImportError:
        limit = contextlib.nullcontext()
    with limit:
        per_kind = _separation_scores()
    assert np.mean(list(per_kind.values())) >= 0.9, per_kind
    assert min(per_kind.values()) >= 0.75, per_kind


def _separation_scores():
    sess = session(models.filterbank())
    rng = np.random.default_rng(0)
    per_kind = {}
    for name, (bg, fg) in SCENES.items():
        images, masks = zip(*[_scene(rng, bg, fg, s) for s in ("disk", "square", "ellipse")])
        acts = sess.run(None, {"input": normalize(np.stack(images))})[0]
        n, c, h, w = acts.shape
        W = _nmf(acts.transpose(0, 2, 3, 1).reshape(-1, c), 2)
        maps = W.reshape(n, h, w, 2).transpose(0, 3, 1, 2)
        maps = maps / (maps.max(axis=(0, 2, 3), keepdims=True) + 1e-12)
        ious = []
        for i in range(n):
            label = _upsample(maps[i], 224).argmax(0)
            ious.append(max(((label == j) & masks[i]).sum() / ((label == j) | masks[i]).sum() for j in range(2)))
        per_kind[name] = float(np.mean(ious))
    return per_kind


# --------------------------------------------------------------------------- float16


def test_to_float16_keeps_float32_io_and_agrees():
    model = narrow_vgg()
    half = models.to_float16(model)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(t.data_type != TensorProto.FLOAT for t in half.graph.initializer)
    assert models.model_info(half)["precision"] == "fp16"
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    ref = session(model).run(None, {"input": x})[0]
    out = session(half).run(None, {"input": x})[0]
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.02 * np.abs(ref).max())


# --------------------------------------------------------------------------- torchvision
# torchvision's VGG-16 with its own random init (weights=None: no download), exported and
# compared with the same network in torch (same seed). Skipped where torch or torchvision
# cannot be imported (CI).

TV_SEED = 7


def _torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    return torch, torchvision


def _tv_net(torch, torchvision):
    """The network ``export_vgg16_torchvision(weights=None)`` builds after ``manual_seed(TV_SEED)``."""
    torch.manual_seed(TV_SEED)
    return torchvision.models.vgg16(weights=None).eval()


def _tv_export(torch, include_classifier, path=None):
    torch.manual_seed(TV_SEED)
    return models.export_vgg16_torchvision(path, include_classifier=include_classifier, weights=None)


@pytest.fixture(scope="module")
def tv_conv(tmp_path_factory):
    torch, torchvision = _torchvision()
    path = tmp_path_factory.mktemp("tv") / "vgg16_conv.onnx"
    return _tv_export(torch, False, path), path, _tv_net(torch, torchvision)


@pytest.fixture(scope="module")
def tv_full():
    torch, torchvision = _torchvision()
    return _tv_export(torch, True), _tv_net(torch, torchvision)


def _tv_images():
    return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


def _tv_extract(model):
    """FeatureExtractor on the CPU: (extractor, activations of _tv_images(), its normalised input)."""
    from PIL import Image

    import dffkit

    with pytest.warns(models.UntrainedWeightsWarning):
        fx = dffkit.FeatureExtractor(model, providers="cpu", batch_size=2)
    images = _tv_images()
    x = fx.preprocess([Image.fromarray(im) for im in images])
    np.testing.assert_array_equal(x, normalize(images))
    return fx, fx(images), x


def _assert_conv5_3_relu(model, layer):
    """``layer`` is the ReLU of the 13th 3x3 convolution, whatever the exporter named it."""
    g = models._Graph(model)
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    assert len(convs) == 13
    relu = g.producer[layer]
    assert relu.op_type == "Relu" and g.producer[relu.input[0]] is convs[-1]
    assert layer == models.default_layer(model) == models.vgg16_layers(model)["relu5_3"]


def _close(y, ref, rtol=1e-4):
    """allclose within ``rtol`` of each value, or of the largest one for values near 0."""
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


def _tv_torch(net, x, part):
    torch, _ = _torchvision()
    with torch.no_grad():
        return part(net, torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _full_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_torchvision_export_conv_part(tv_conv):
    model, path, net = tv_conv
    assert path.is_file()
    assert models.load_model(str(path)).SerializeToString() == model.SerializeToString()
    assert model.ir_version <= models.max_ir_version()
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [models.OPSET]
    assert [v.name for v in model.graph.input] == ["input"] and [v.name for v in model.graph.output] == ["pool5"]
    assert models._value_dims(model.graph.input[0]) == ["N", 3, "H", "W"]
    assert models._value_dims(model.graph.output[0]) == ["N", 512, "h", "w"]
    info = models.model_info(model)
    assert info["model"] == "vgg16" and info["weights"] == "torchvision random init"
    assert info["normalization"] == "imagenet" and "torchscript" in info["exporter"]
    assert models.is_untrained(model)  # torchvision's random init, labelled so

    fx, y, x = _tv_extract(model)
    _assert_conv5_3_relu(model, fx.layer)
    assert y.shape == (2, 512, 14, 14)
    _close(y, _tv_torch(net, x, lambda n, t: n.features[:30](t)))

    # H and W are dynamic: pool5 of a 64 x 96 batch of 3
    x2 = np.random.default_rng(1).standard_normal((3, 3, 64, 96)).astype(np.float32)
    (p,) = _full_session(model).run(None, {"input": x2})
    assert p.shape == (3, 512, 2, 3)
    _close(p, _tv_torch(net, x2, lambda n, t: n.features(t)))


def test_torchvision_export_with_classifier(tv_full):
    model, net = tv_full
    assert model.ir_version <= models.max_ir_version()
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [models.OPSET]
    assert [v.name for v in model.graph.output] == ["logits"]
    assert models._value_dims(model.graph.input[0]) == ["N", 3, 224, 224]
    assert models._value_dims(model.graph.output[0]) == ["N", 1000]
    assert models.is_untrained(model)

    fx, y, x = _tv_extract(model)
    _assert_conv5_3_relu(model, fx.layer)
    assert fx.image_size == (224, 224) and y.shape == (2, 512, 14, 14)
    _close(y, _tv_torch(net, x, lambda n, t: n.features[:30](t)))

    (logits,) = _full_session(model).run(None, {"input": x})
    ref = _tv_torch(net, x, lambda n, t: n(t))
    assert logits.shape == (2, 1000)
    _close(logits, ref)

    # the numpy classifier head reads fc6..fc8 out of the export
    head = fx.classifier_head()
    assert head is not None
    assert (head.channels, head.positions, head.order, head.n_classes, head.untrained) == (512, 49, "chw", 1000, True)
    assert models.classifier_head(model).order == "chw"
    pool5 = _tv_torch(net, x, lambda n, t: n.features(t))
    _close(head(pool5), ref)
    # an embedding scores as the constant conv5_3 map it stands for scores in torch
    emb = np.abs(np.random.default_rng(2).standard_normal((3, 512))).astype(np.float32)
    maps = np.broadcast_to(emb[:, :, None, None], (3, 512, 7, 7))
    _close(head(emb), _tv_torch(net, maps, lambda n, t: n.classifier(n.avgpool(t).flatten(1))))
    assert len(head.top(emb, 5)[0]) == 5


def test_torchvision_export_dynamo_exporter(monkeypatch):
    """The torch.export-based exporter (used where torch has no TorchScript exporter) gives a
    model that meets the same contract, though its tensor names differ."""
    torch, torchvision = _torchvision()
    pytest.importorskip("onnxscript")
    if not hasattr(torch.export.Dim, "DYNAMIC"):
        pytest.skip("torch.export.Dim.DYNAMIC needs torch >= 2.6")
    monkeypatch.setattr(models, "_TORCH_EXPORTERS", ("dynamo",))
    model = _tv_export(torch, False)
    assert "dynamo" in models.model_info(model)["exporter"]
    assert model.ir_version <= models.max_ir_version()
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [models.OPSET]
    assert models._value_dims(model.graph.input[0]) == ["N", 3, "H", "W"]
    assert models._value_dims(model.graph.output[0]) == ["N", 512, "h", "w"]
    net = _tv_net(torch, torchvision)
    fx, y, x = _tv_extract(model)
    _assert_conv5_3_relu(model, fx.layer)
    assert y.shape == (2, 512, 14, 14)
    _close(y, _tv_torch(net, x, lambda n, t: n.features[:30](t)))


def test_torchvision_export_errors(monkeypatch):
    import urllib.error

    torch, torchvision = _torchvision()

    def offline(weights=None, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    with monkeypatch.context() as m:
        m.setattr(torchvision.models, "vgg16", offline)
        with pytest.raises(OSError, match="hub cache"):
            models.export_vgg16_torchvision(weights="IMAGENET1K_V1")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="could not export VGG-16.*torchscript exporter: RuntimeError: exporter broke"):
        models.export_vgg16_torchvision(weights=None)


# --------------------------------------------------------------------------- audit regressions


def test_default_layer_is_the_relu_when_conv5_3_has_another_consumer():
    """An extra graph output computed from conv5_3 does not make the default (and the
    canonical relu5_3) fall back to conv5_3 before its ReLU."""
    model = narrow_vgg()
    model.graph.node.append(helper.make_node("ReduceMean", ["conv5_3"], ["conv5_3_mean"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("conv5_3_mean", TensorProto.FLOAT, None))
    assert models.vgg16_layers(model)["relu5_3"] == "relu5_3"
    assert models.default_layer(model) == "relu5_3"
    assert models.resolve_layer(model, "relu5_3") == "relu5_3"
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert session(models.truncate(model, models.default_layer(model))).run(None, {"input": x})[0].min() >= 0
    # two activations after one tensor: neither is "the" activation
    model.graph.node.append(helper.make_node("Sigmoid", ["conv5_3"], ["conv5_3_sigmoid"]))
    assert models.vgg16_layers(model)["relu5_3"] == "conv5_3"


def test_channel_axes_follow_transposes_and_stop_at_unknown_ops():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 3])
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["scaled"]),                                # NHWC: 3
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),         # 1
        helper.make_node("Conv", ["nchw", "w"], ["c"]),                                 # 1
        helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1),               # 1
        helper.make_node("Transpose", ["c"], ["back"], perm=[0, 2, 3, 1]),              # 3
        helper.make_node("Flatten", ["back"], ["flat"]),                                # unknown
        helper.make_node("Relu", ["flat"], ["after"]),                                  # unknown
        helper.make_node("Add", ["after", "c"], ["mixed"]),                             # the known one: 1
        helper.make_node("Transpose", ["c"], ["reversed"]),                             # default perm: reversed
    ]
    inits = [numpy_helper.from_array(np.float32(2.0), "s"), numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    g = models._Graph(model)
    axes = models._channel_axes(g)
    assert {k: axes[k] for k in ("x", "scaled", "nchw", "c", "m", "back", "mixed", "reversed")} == {
        "x": 3, "scaled": 3, "nchw": 1, "c": 1, "m": 1, "back": 3, "mixed": 1, "reversed": 2}
    assert "Flatten" in axes["flat"] and "Flatten" in axes["after"]
    with pytest.raises(ValueError, match=r"layer 'after'.*a Flatten node.*channel_axis=1.*channel_axis=3"):
        models._channel_axis(g, "after")


def _vgg_cache(monkeypatch, tmp_path):
    """The random VGG-16 built narrow (fast), cached in tmp_path: (path of the file, vgg16())."""
    build = models._build_vgg16_random
    monkeypatch.setattr(models, "_build_vgg16_random", lambda include_classifier, seed: build(include_classifier, seed, **NARROW))
    path = tmp_path / f"vgg16-random-conv-seed0-v{models._CACHE_FORMAT}.onnx"

    def load():
        with pytest.warns(models.UntrainedWeightsWarning):
            return models.vgg16(cache_dir=tmp_path)

    return path, load


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_cache_file_is_checked_and_rebuilt(monkeypatch, tmp_path):
    """An empty file, a file cut short at a protobuf field boundary (it parses, without its
    labels) and a file with a flipped weight byte are built again, not used."""
    path, load = _vgg_cache(monkeypatch, tmp_path)
    first = load()
    good = path.read_bytes()
    assert models.model_info(first)["weights_sha256"] == models._weights_digest(first)
    reference = _weights(first)

    cut = next(k for k in range(1, 400) if _parses_without_labels(good[:-k]))
    flipped = bytearray(good)
    w = numpy_helper.to_array(first.graph.initializer[0]).tobytes()
    at = good.index(w[:32]) + 5
    flipped[at] ^= 0x40
    for content in (b"", good[:-cut], bytes(flipped)):
        path.write_bytes(content)
        model = load()
        info = models.model_info(model)
        assert info["untrained"] == "1" and info["weights"] == "random"
        assert all(np.array_equal(_weights(model)[k], v) for k, v in reference.items())
        assert path.read_bytes() == good  # overwritten with a good build
    # a file from before the checksum (or whose checksum was cut off) is used if its labels are whole
    old = onnx.load_from_string(good)
    keep = [p for p in old.metadata_props if p.key != "dffkit.weights_sha256"]
    del old.metadata_props[:]
    old.metadata_props.extend(keep)
    path.write_bytes(old.SerializeToString())
    mtime = path.stat().st_mtime_ns
    assert "weights_sha256" not in models.model_info(load())
    assert path.stat().st_mtime_ns == mtime


def _parses_without_labels(data):
    try:
        model = onnx.load_from_string(data)
    except Exception:
        return False
    return len(model.graph.node) > 0 and "untrained" not in models.model_info(model)


def test_a_corrupt_torchvision_export_is_named_not_rebuilt(monkeypatch, tmp_path):
    def export(**kwargs):
        raise AssertionError("must not export again")

    monkeypatch.setattr(models, "export_vgg16_torchvision", export)
    path = tmp_path / f"vgg16-torchvision-conv-v{models._CACHE_FORMAT}.onnx"
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match=rf"cached model {path} is corrupt .*delete it and run dffkit.models.vgg16\(weights='torchvision'\)"):
        models.vgg16(weights="torchvision", cache_dir=tmp_path)
    model = narrow_vgg()  # a torchvision export as an earlier dffkit wrote it: labels, no checksum
    del model.metadata_props[:]
    for key, value in {"model": "vgg16", "weights": "torchvision IMAGENET1K_V1", "untrained": "0",
                       "normalization": "imagenet", "exporter": "torch 2.5"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"dffkit.{key}", value
    path.write_bytes(model.SerializeToString())
    assert models.model_info(models.vgg16(weights="torchvision", cache_dir=tmp_path))["exporter"] == "torch 2.5"
    del model.metadata_props[-1]  # cut short: the exporter label lost
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="corrupt .*lacks dffkit.exporter"):
        models.vgg16(weights="torchvision", cache_dir=tmp_path)


def test_an_empty_cache_dir_setting_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for value in ("", "  "):
        monkeypatch.setenv("DFFKIT_CACHE_DIR", value)
        assert models.cache_dir() == tmp_path / "xdg" / "dffkit"
    assert models.cache_dir("") == tmp_path / "xdg" / "dffkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert str(models.cache_dir()) == os.path.join(os.path.expanduser("~"), ".cache", "dffkit")


def test_a_failed_cache_write_leaves_no_partial_file(monkeypatch, tmp_path):
    import errno
    import os

    path, load = _vgg_cache(monkeypatch, tmp_path)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    for _ in range(2):
        with pytest.warns(UserWarning, match="could not cache .*No space left"):
            model = load()
        assert models.vgg16_layers(model)
        assert list(tmp_path.iterdir()) == []


def test_load_model_checks_a_model_proto_without_changing_it():
    with pytest.raises(ValueError, match="the onnx.ModelProto given is not an ONNX model"):
        models.load_model(onnx.ModelProto())
    model = narrow_vgg()
    model.ir_version = 99
    assert models.load_model(model) is model and model.ir_version == 99
    assert models.truncate(model, "relu1_1").ir_version <= models.max_ir_version()


def test_truncate_takes_float32_for_a_float16_model():
    half = models.to_float16(narrow_vgg(), keep_io_float32=False)
    cut = models.truncate(half, "relu1_2")
    assert cut.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = session(models.truncate(narrow_vgg(), "relu1_2")).run(None, {"input": x})[0]
    out = session(cut).run(None, {cut.graph.input[0].name: x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.02 * np.abs(ref).max())
    assert models.truncate(half, "relu1_2", nchw_input=False).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


@pytest.mark.parametrize("weights,hint", [
    ("imagenet", r"for ImageNet weights pass weights='torchvision'"),
    ("Random", r"did you mean 'random'\?"),
    ("resnet", r""),
])
def test_vgg16_weights_that_are_neither_a_value_nor_a_file_name_the_values(weights, hint, tmp_path):
    """weights='imagenet' raised FileNotFoundError 'no such model file: imagenet', never
    naming 'random', 'torchvision' or a path."""
    with pytest.raises(ValueError, match=r"weights must be 'random', 'torchvision' or the path of a VGG-16 ONNX file; "
                                         rf"got '{weights}'.*{hint}"):
        models.vgg16(weights=weights, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was built


def test_vgg16_weights_that_look_like_a_path_are_read_as_one(tmp_path):
    for missing in (str(tmp_path / "vgg16.onnx"), "vgg16.onnx", "models/vgg16"):
        with pytest.raises(FileNotFoundError, match="no such model file"):
            models.vgg16(weights=missing, cache_dir=tmp_path)
