"""dffkit.features / dffkit.images: images -> activations through onnxruntime (issue 6).

The oracle is numpy: a small network (conv -> relu -> pool -> conv) built here and computed
by hand, PIL's bilinear filter written out, ImageNet normalisation written out."""
import io
import os
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from PIL import Image  # noqa: E402

from dffkit import features, models  # noqa: E402
from dffkit.features import FeatureExtractor, load_image, load_images, preprocess  # noqa: E402
from dffkit.images import IMAGENET_MEAN, IMAGENET_STD, resized_size  # noqa: E402

RNG = np.random.default_rng(20261123)
W1 = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
B1 = RNG.standard_normal(4).astype(np.float32)
W2 = RNG.standard_normal((5, 4, 3, 3)).astype(np.float32)
B2 = RNG.standard_normal(5).astype(np.float32)


# --------------------------------------------------------------------------- numpy oracle


def conv2d(x, w, b, pad):
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.float64)) + b[None, :, None, None]


def maxpool2(x):
    n, c, h, w = x.shape
    return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def reference(x):
    """The small network by hand: every intermediate layer."""
    conv1 = conv2d(x, W1, B1, 1)
    relu1 = np.maximum(conv1, 0)
    pool1 = maxpool2(relu1)
    conv2 = conv2d(pool1, W2, B2, 0)
    return {"conv1": conv1, "relu1": relu1, "pool1": pool1, "conv2": conv2}


def normalize_reference(batch_uint8):
    x = batch_uint8.astype(np.float64) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)


def bilinear_weights(n_in, n_out):
    """PIL's bilinear resampling matrix (triangle filter widened by the scale when shrinking)."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - width + 0.5), 0)
        hi = min(int(center + width + 0.5), n_in)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) / width))
        m[i, lo:hi] = w / w.sum()
    return m


def resize_reference(img, h, w):
    """Horizontal pass, rounded to 8 bits, then vertical, as Pillow does for RGB."""
    a = img.astype(np.float64)
    a = np.clip(np.round(np.einsum("ow,hwc->hoc", bilinear_weights(img.shape[1], w), a)), 0, 255)
    return np.clip(np.round(np.einsum("oh,hwc->owc", bilinear_weights(img.shape[0], h), a)), 0, 255)


# --------------------------------------------------------------------------- test models


def small_net(input_shape=("N", 3, "H", "W")):
    """conv1 (3->4, 3x3, pad 1) -> relu1 -> pool1 (2x2) -> conv2 (4->5, 3x3); plus a
    2-D tensor 'flat' (Flatten of pool1)."""
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "w2", "b2"], ["conv2"]),
        helper.make_node("Flatten", ["pool1"], ["flat"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "w1"), (B1, "b1"), (W2, "w2"), (B2, "b2"))]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("conv2", TensorProto.FLOAT, None), helper.make_tensor_value_info("flat", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = models.max_ir_version()
    return model


def nhwc_net():
    """A TensorFlow-converter-style graph: NHWC input and an NHWC named tensor."""
    nodes = [
        helper.make_node("Transpose", ["image"], ["to_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["to_nchw", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Transpose", ["relu1"], ["block1/relu:0"], perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(
        nodes, "keras_like",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("block1/relu:0", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = models.max_ir_version()
    return model


def images(n, h=32, w=32, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vgg_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dffkit-cache")


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("layer", ["conv1", "relu1", "pool1", "conv2"])
def test_small_net_layers_match_numpy(layer):
    fx = FeatureExtractor(small_net(), layer, providers="cpu", image_size=32)
    imgs = images(3)
    out = fx(imgs)
    ref = reference(normalize_reference(np.stack(imgs)))[layer]
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert fx.layer == layer and fx.provider == "CPUExecutionProvider"
    assert fx.last_sizes == [(32, 32)] * 3


def test_default_layer_of_small_net_is_last_conv():
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=32)
    assert fx.layer == "conv2"
    x = np.random.default_rng(1).standard_normal((2, 3, 20, 24)).astype(np.float32)
    np.testing.assert_allclose(fx.run(x), reference(x)["conv2"], rtol=1e-4, atol=1e-4)


def test_batches_of_any_size_agree():
    imgs = images(5, seed=3)
    whole = FeatureExtractor(small_net(), "pool1", providers="cpu", image_size=32, batch_size=16)(imgs)
    pieces = FeatureExtractor(small_net(), "pool1", providers="cpu", image_size=32, batch_size=2)(imgs)
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)


def test_fixed_input_size_and_batch_are_honoured():
    model = small_net(input_shape=(2, 3, 24, 24))
    fx = FeatureExtractor(model, "relu1", providers="cpu", image_size=64, batch_size=8)
    assert fx.image_size == (24, 24) and fx.batch_size == 2
    imgs = images(3, 40, 30, seed=4)
    out = fx(imgs)
    assert out.shape == (3, 4, 24, 24)
    x = preprocess(load_images(imgs), 24)
    np.testing.assert_allclose(out, reference(x)["relu1"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"takes \(24, 24\) images"):
        fx.run(np.zeros((1, 3, 32, 32), np.float32))


def test_model_zoo_style_file(tmp_path):
    """Old ONNX model-zoo files: IR version 3, initializers listed as graph inputs, opset 8,
    batch fixed at 1."""
    model = small_net(input_shape=(1, 3, 32, 32))
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    path = tmp_path / "zoo.onnx"
    onnx.save(model, str(path))
    fx = FeatureExtractor(str(path), "relu1", providers="cpu")
    assert fx.batch_size == 1 and fx.image_size == (32, 32) and fx.model_name == "zoo"
    imgs = images(3, seed=8)
    np.testing.assert_allclose(fx(imgs), reference(normalize_reference(np.stack(imgs)))["relu1"], rtol=1e-4, atol=1e-4)


def test_nhwc_model_gives_nchw_activations():
    fx = FeatureExtractor(nhwc_net(), "block1/relu:0", providers="cpu", image_size=16)
    imgs = images(2, 16, 16, seed=5)
    out = fx(imgs)
    ref = reference(normalize_reference(np.stack(imgs)))["relu1"]
    assert out.shape == (2, 4, 16, 16)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert fx.layers()[-1][0] == "block1/relu:0"


@pytest.mark.parametrize("make,name", [(small_net, "input"), (nhwc_net, "image")])
def test_the_input_itself_can_be_extracted(make, name):
    fx = FeatureExtractor(make(), name, providers="cpu", image_size=16)
    imgs = images(2, 16, 16, seed=6)
    np.testing.assert_allclose(fx(imgs), normalize_reference(np.stack(imgs)), rtol=1e-5, atol=1e-5)


def _normalised_f64(u8, normalization):
    """The four normalisations in float64, written out independently of dffkit.images."""
    x = u8.astype(np.float64)
    if normalization == "imagenet":
        x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif normalization == "caffe":
        x = x[..., ::-1] - np.array([103.939, 116.779, 123.68])
    elif normalization == "unit":
        x = x / 255.0
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("normalization", ["imagenet", "caffe", "unit", "none"])
@pytest.mark.parametrize("make,name", [(small_net, "input"), (nhwc_net, "image")])
def test_uint8_images_are_normalised_inside_the_model(make, name, normalization):
    """The session takes resized uint8 images and normalises them itself: the same bits as
    the host's normalisation fed to the float session, for both layouts."""
    from dffkit.images import normalize

    fx = FeatureExtractor(make(), name, providers="cpu", image_size=16, normalization=normalization)
    assert fx.session.get_inputs()[0].type == "tensor(uint8)"
    u8 = np.stack(images(3, 16, 16, seed=16))
    kept = u8.copy()
    inside = fx.run(u8)
    np.testing.assert_array_equal(u8, kept)  # the caller's array is not touched
    np.testing.assert_array_equal(inside, fx.run(normalize(u8, normalization)))
    np.testing.assert_allclose(inside, _normalised_f64(u8, normalization), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(fx(list(u8)), inside)  # the images path sends the same bytes


def test_float16_input_model_takes_uint8_images():
    """A model whose input is float16 (to_float16 without float32 I/O) gets a Cast after the
    normalisation; its activations agree with the float32 model's to float16 precision."""
    half = models.to_float16(small_net(), keep_io_float32=False)
    imgs = images(2, 32, 32, seed=17)
    full = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=32)(imgs)
    out = FeatureExtractor(half, "relu1", providers="cpu", image_size=32)(imgs)
    assert out.dtype == np.float32 and out.shape == full.shape
    np.testing.assert_allclose(out, full, rtol=2e-2, atol=2e-2 * np.abs(full).max())


def test_run_rejects_inputs_of_the_wrong_form():
    fx = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=16)
    with pytest.raises(ValueError, match=r"uint8 input must be resized RGB images \(N, H, W, 3\)"):
        fx.run(np.zeros((1, 3, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) float32"):
        fx.run(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        fx.run(np.array([[["a"]]]))
    with pytest.raises(ValueError, match="no images"):
        fx.run(np.zeros((0, 16, 16, 3), np.uint8))


def test_layers_lists_names_and_shapes():
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=(32, 40))
    listed = dict(fx.layers())
    assert listed["relu1"] == ("N", 4, 32, 40)
    assert listed["pool1"] == ("N", 4, 16, 20)
    assert listed["conv2"] == ("N", 5, 14, 18)
    assert "flat" in listed and len(listed["flat"]) == 2
    assert fx.output_shape((32, 40)) == (5, 14, 18)


def test_num_threads_reaches_onnxruntime():
    fx = FeatureExtractor(small_net(), providers="cpu", num_threads=1)
    assert fx.session.get_session_options().intra_op_num_threads == 1


def test_shorter_side_resize_and_extract_list():
    assert resized_size((480, 640), 256, "shorter") == (256, 341)
    assert resized_size((640, 480), 256, "shorter") == (341, 256)
    fx = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=20, resize="shorter")
    imgs = [images(1, 40, 60)[0], images(1, 60, 40, seed=1)[0], images(1, 30, 45, seed=2)[0]]
    outs = fx.extract_list(imgs)
    assert [o.shape for o in outs] == [(4, 20, 30), (4, 30, 20), (4, 20, 30)]
    assert fx.last_sizes == [(40, 60), (60, 40), (30, 45)]
    ref = reference(preprocess(load_images(imgs[1:2]), 20, "shorter"))["relu1"][0]
    np.testing.assert_allclose(outs[1], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="extract_list"):
        fx(imgs)
    same = fx([imgs[0], imgs[2]])  # one aspect ratio: one array
    assert same.shape == (2, 4, 20, 30)


# --------------------------------------------------------------------------- VGG-16


def test_random_vgg16_shapes(vgg_cache):
    with pytest.warns(models.UntrainedWeightsWarning):
        fx = FeatureExtractor("vgg16:random", providers="cpu", cache_dir=vgg_cache)
    assert fx.untrained and fx.model_name == "vgg16" and fx.layer == "relu5_3"
    out = fx([images(1, 300, 200)[0], Image.new("RGB", (500, 375), (200, 100, 50))])
    assert out.shape == (2, 512, 14, 14) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() > 0
    assert fx.last_sizes == [(300, 200), (375, 500)]
    big = fx.run(preprocess(load_images(images(1, 256, 256, seed=9)), 256))
    assert big.shape == (1, 512, 16, 16)


def test_vgg16_default_layer_is_conv5_3_after_relu(vgg_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", models.UntrainedWeightsWarning)
        relu = FeatureExtractor("vgg16:random", providers="cpu", cache_dir=vgg_cache, image_size=64)
        conv = FeatureExtractor("vgg16:random", "conv5_3", providers="cpu", cache_dir=vgg_cache, image_size=64)
    x = preprocess(load_images(images(1, 64, 64, seed=7)), 64)
    a, b = relu.run(x), conv.run(x)
    assert b.min() < 0  # before the ReLU
    np.testing.assert_allclose(a, np.maximum(b, 0), rtol=1e-5, atol=1e-5)
    assert relu.classifier_head() is None


def test_vgg16_name_falls_back_to_random_weights(vgg_cache):
    with pytest.warns(models.UntrainedWeightsWarning, match="untrained"):
        fx = FeatureExtractor("vgg16", providers="cpu", cache_dir=vgg_cache)
    assert fx.untrained and fx.weights == "random"


def test_filterbank_extractor_is_not_untrained():
    with warnings.catch_warnings():
        warnings.simplefilter("error", models.UntrainedWeightsWarning)
        fx = FeatureExtractor("filterbank", providers="cpu")
    assert not fx.untrained and fx.model_name == "filterbank"
    out = fx(images(2, 50, 70), )
    assert out.shape == (2, len(models.filterbank_channels()), 28, 28)


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", [(24, 20), (60, 90), (37, 37)])
def test_preprocess_matches_numpy_reference(size):
    img = np.random.default_rng(11).integers(0, 256, (45, 53, 3), dtype=np.uint8)
    out = preprocess(load_images([img]), size)
    ref = normalize_reference(resize_reference(img, *size)[None])
    assert out.shape == (1, 3, *size) and out.dtype == np.float32
    # Pillow's filter is fixed-point, rounded to 8 bits after each pass: grey levels apart
    levels = np.abs(out - ref) * 255 * IMAGENET_STD.reshape(1, 3, 1, 1)
    assert levels.max() <= 2 + 1e-3
    assert levels.mean() < 0.1


def test_preprocess_without_resize_is_exact_normalisation():
    img = np.random.default_rng(12).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    out = preprocess(load_images(img), None)
    np.testing.assert_allclose(out, normalize_reference(img), rtol=1e-6, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.jpg"
    Image.fromarray(a).save(path, quality=95, exif=exif.tobytes())
    (img,) = load_images([str(path)])
    assert img.size == (20, 40)  # (W, H): now portrait
    top, bottom = np.asarray(img)[5, 10].astype(int), np.asarray(img)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the stored left half (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=16)
    fx([str(path)])
    assert fx.last_sizes == [(40, 20)]


def _palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    return img


MODE_CASES = {
    "L": (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
    "1": (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
    "LA transparent": (lambda: Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
    "LA opaque": (lambda: Image.new("LA", (2, 2), (40, 255)), (40, 40, 40)),
    "RGBA half": (lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),
    "P": (lambda: Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)),
    "P transparent": (_palette_with_transparency, (255, 255, 255)),
    "I;16": (lambda: Image.fromarray(np.full((2, 2), 65535, np.uint16)), (255, 255, 255)),
    "I;16 mid": (lambda: Image.fromarray(np.full((2, 2), 257 * 100, np.uint16)), (100, 100, 100)),
    "I 8-bit values": (lambda: Image.fromarray(np.full((2, 2), 200, np.int32)), (200, 200, 200)),
    "F 0..1": (lambda: Image.fromarray(np.full((2, 2), 0.5, np.float32)), (128, 128, 128)),
    "CMYK white": (lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
    "CMYK cyan": (lambda: Image.new("CMYK", (2, 2), (255, 0, 0, 0)), (0, 255, 255)),
    "CMYK black": (lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 255)), (0, 0, 0)),
    "YCbCr": (lambda: Image.new("RGB", (2, 2), (0, 128, 255)).convert("YCbCr"), (0, 128, 255)),
    "uint8 gray array": (lambda: np.full((2, 2), 9, np.uint8), (9, 9, 9)),
    "uint8 (H, W, 1)": (lambda: np.full((2, 2, 1), 9, np.uint8), (9, 9, 9)),
    "uint16 RGB array": (lambda: np.full((2, 2, 3), 257 * 50, np.uint16), (50, 50, 50)),
    "RGBA array": (lambda: np.full((2, 2, 4), (255, 0, 0, 0), np.uint8), (255, 255, 255)),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_image_modes_convert_to_rgb(case):
    make, expected = MODE_CASES[case]
    (img,) = load_images([make()])
    assert img.mode == "RGB"
    np.testing.assert_allclose(np.asarray(img)[0, 0], expected, atol=2)


def test_encoded_bytes_and_file_objects():
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (1, 2, 3)).save(buf, "PNG")
    a, b = load_images([buf.getvalue(), io.BytesIO(buf.getvalue())])
    assert a.size == b.size == (6, 4) and np.asarray(a)[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="image 0 .*not an image"):
        load_images(b"definitely not a picture")


@pytest.mark.parametrize("fmt,mode,value,expected", [
    ("PNG", "I;16", 257 * 200, (200, 200, 200)),
    ("JPEG", "CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("PNG", "P", None, (10, 200, 30)),
])
def test_image_files_of_other_modes(tmp_path, fmt, mode, value, expected):
    if mode == "I;16":
        src = Image.fromarray(np.full((8, 8), value, np.uint16))
    elif mode == "CMYK":
        src = Image.new("CMYK", (8, 8), value)
    else:
        src = Image.new("RGB", (8, 8), expected).convert("P", palette=Image.Palette.ADAPTIVE)
    path = tmp_path / f"img.{fmt.lower()}"
    src.save(path, fmt)
    (img,) = load_images(str(path))
    np.testing.assert_allclose(np.asarray(img)[4, 4], expected, atol=6)


# --------------------------------------------------------------------------- bad input


def test_missing_file_names_it_and_its_index(tmp_path):
    missing = tmp_path / "nothere.jpg"
    with pytest.raises(FileNotFoundError, match=r"image 1 \(.*nothere.jpg\)"):
        load_images([images(1)[0], str(missing)])


def test_one_bad_image_in_a_batch_is_named(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(images(1)[0]).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image at all")
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=16, batch_size=2)
    with pytest.raises(ValueError, match=r"image 2 \(.*bad.jpg\): not an image"):
        fx([str(good), images(1)[0], str(bad), str(good)])


class _RendezvousFile(io.BytesIO):
    """An encoded image whose first read waits until ``barrier``'s other party reads too:
    two of them are read only if two threads read at once (else the barrier times out)."""

    def __init__(self, data, barrier):
        super().__init__(data)
        self.barrier, self.waited = barrier, False

    def read(self, *args):
        if not self.waited:
            self.waited = True
            self.barrier.wait()
        return super().read(*args)


def _png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_images_are_read_on_several_threads():
    import threading

    pair = images(2, 20, 20, seed=30)
    barrier = threading.Barrier(2, timeout=20)
    out = load_images([_RendezvousFile(_png(a), barrier) for a in pair], workers=2)
    assert [np.array_equal(np.asarray(im), a) for im, a in zip(out, pair)] == [True, True]


def test_the_next_batch_is_read_while_this_one_runs():
    """batch_size 1: image 1 is read while image 0 is still being read (and run), so the
    two reads meet at the barrier; one batch at a time would time out."""
    import threading

    pair = images(2, 16, 16, seed=31)
    fx = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=16, batch_size=1, workers=2)
    barrier = threading.Barrier(2, timeout=20)
    out = fx([_RendezvousFile(_png(a), barrier) for a in pair])
    np.testing.assert_array_equal(out, fx(pair))


def test_threads_change_nothing(tmp_path):
    """Several threads and one: the same activations and sizes (images of mixed sizes and
    kinds, several batches), and the same error: the first bad image in order, even when a
    later one fails sooner."""
    paths = []
    for i, a in enumerate(images(3, 30, 40, seed=32)):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(a).save(paths[-1])
    mixed = [str(paths[0]), images(1, 50, 20, seed=33)[0], Image.open(paths[1]), str(paths[2]), _png(images(1, 24, 24)[0])]
    serial = FeatureExtractor(small_net(), "pool1", providers="cpu", image_size=16, batch_size=2, workers=1)
    threaded = FeatureExtractor(small_net(), "pool1", providers="cpu", image_size=16, batch_size=2, workers=3)
    a = serial(mixed)
    mixed[2] = Image.open(paths[1])  # a fresh lazy PIL image
    b = threaded(mixed)
    np.testing.assert_array_equal(a, b)
    assert serial.last_sizes == threaded.last_sizes == [(30, 40), (50, 20), (30, 40), (30, 40), (24, 24)]
    big = tmp_path / "big.png"
    Image.fromarray(images(1, 1500, 1500, seed=34)[0]).save(big)
    slow_bad = tmp_path / "slow_bad.png"
    slow_bad.write_bytes(big.read_bytes()[:-5000])  # fails after decoding most of it
    for workers in (1, 4):
        with pytest.raises(ValueError, match=r"image 1 \(.*slow_bad.png\)"):
            load_images([str(paths[0]), str(slow_bad), str(paths[1]), str(tmp_path / "x.png")], workers=workers)


def test_images_in_memory_are_loaded_without_threads(monkeypatch, tmp_path):
    """PIL images with no file behind them (made in memory, or loaded) have nothing to decode:
    load_images does them in a loop, with the same result, and leaves the pool alone; a lazy
    image opened from a file still goes to the threads."""
    from dffkit import images as images_module

    used = []
    real = images_module._pool
    monkeypatch.setattr(images_module, "_pool", lambda workers: used.append(workers) or real(workers))
    arrays = images(3, 20, 20, seed=36)
    made = [Image.fromarray(a) for a in arrays]
    out = load_images(made, workers=3)
    assert used == [] and [np.array_equal(np.asarray(o), a) for o, a in zip(out, arrays)] == [True] * 3
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    lazy = Image.open(tmp_path / "a.png")
    out = load_images([made[1], lazy], workers=3)
    assert used and set(used) == {3} and np.array_equal(np.asarray(out[1]), arrays[0])


def test_arrays_at_the_size_skip_pillow_and_the_threads(monkeypatch):
    """RGB uint8 arrays already at the size asked for are taken as they are: no Pillow, no
    hand-over to a thread, the same pixels as through Pillow (a strided view too). An array that
    needs resizing, an RGBA and a uint16 array still go through Pillow, and a batch with any of
    them goes to the threads."""
    from dffkit import images as images_module

    used, read = [], []
    real_pool, real_read = images_module._pool, images_module._load_indexed
    monkeypatch.setattr(images_module, "_pool", lambda workers: used.append(workers) or real_pool(workers))
    monkeypatch.setattr(images_module, "_load_indexed", lambda i, item: read.append(i) or real_read(i, item))

    def run(batch, size):
        parts = list(images_module.resized_batches(batch, 2, size, workers=3))
        return [a for _, p in parts for a in p], [hw for s, _ in parts for hw in s]

    at_size = images(3, 16, 16, seed=40) + [images(1, 16, 32, seed=41)[0][:, ::2]]  # the last one strided
    copies = [a.copy() for a in at_size]
    out, sizes = run(at_size, 16)
    assert used == [] and read == []
    assert [np.array_equal(o, np.asarray(Image.fromarray(np.ascontiguousarray(a)))) for o, a in zip(out, at_size)] == [True] * 4
    assert sizes == [(16, 16)] * 4 and all(np.array_equal(a, c) for a, c in zip(at_size, copies))

    rgba = np.concatenate([images(1, 16, 16, seed=42)[0], np.full((16, 16, 1), 128, np.uint8)], axis=2)
    wide = (images(1, 16, 16, seed=43)[0].astype(np.uint16) * 257)
    bigger = images(1, 20, 24, seed=44)[0]
    for other in (rgba, wide, bigger):
        used.clear(), read.clear()
        out, _ = run([at_size[0], other], 16)
        ref = np.asarray(images_module.resize_image(load_image(other), 16))
        assert read == [1] and np.array_equal(out[1], ref) and np.array_equal(out[0], at_size[0])
        assert used  # not every image a plain copy: the threads, as before
    used.clear()
    run(at_size, 8)  # every one to resize
    assert used


def test_one_pil_image_twice_is_read_safely():
    """The same lazy PIL image twice in one call: not decoded by two threads at once."""
    data = _png(images(1, 64, 64, seed=35)[0])
    img = Image.open(io.BytesIO(data))
    out = load_images([img, img, img], workers=3)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert all(np.array_equal(np.asarray(o), ref) for o in out)


def test_workers_are_checked(monkeypatch):
    from dffkit.images import default_workers

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="workers must be a positive int"):
            load_images(images(1), workers=bad)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        FeatureExtractor(small_net(), providers="cpu", workers=0)
    monkeypatch.setenv("DFFKIT_IO_THREADS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("DFFKIT_IO_THREADS", "many")
    with pytest.raises(ValueError, match="DFFKIT_IO_THREADS must be a positive integer"):
        load_images(images(2))


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    # a container limited to 2 of the host's 64 cores: 2 readers, not 8
    from dffkit.images import default_workers

    monkeypatch.delenv("DFFKIT_IO_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers() == 8  # at most 8


def test_extractor_arguments_of_the_wrong_kind_are_type_errors():
    for model in (3, None, 2.5):
        with pytest.raises(TypeError, match="model must be one of"):
            FeatureExtractor(model, providers="cpu")
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match=r"num_threads must be an int >= 0 or None \(None or 0"):
            FeatureExtractor(small_net(), providers="cpu", num_threads=bad)
    with pytest.raises(ValueError, match="num_threads must be an int >= 0"):
        FeatureExtractor(small_net(), providers="cpu", num_threads=-1)
    FeatureExtractor(small_net(), providers="cpu", num_threads=0)  # onnxruntime's default


_FORK_SCRIPT = """
import multiprocessing, numpy as np
from dffkit.images import load_images

def shapes():
    return [(im.height, im.width) for im in load_images([np.zeros((5, 7, 3), np.uint8)] * 3, workers=2)]

if __name__ == "__main__":
    load_images([np.zeros((5, 7, 3), np.uint8)] * 2, workers=2)  # the parent's pool
    with multiprocessing.get_context("fork").Pool(1) as pool:
        print(pool.apply_async(shapes).get(timeout=60))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_reads_images_on_its_own_threads(tmp_path):
    """The parent's pool exists before the fork; the child (a data-loader worker, say) makes
    its own and does not hang. In a fresh interpreter: other threads of this test process
    (onnxruntime's) make any fork hazardous, whatever dffkit does."""
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[(5, 7), (5, 7), (5, 7)]"


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(images(1, 64, 64)[0]).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut.jpg.*truncated"):
        load_images(str(path))


def test_zero_size_and_unreadable_objects(tmp_path):
    with pytest.raises(ValueError, match="image 0 .*zero-size"):
        load_images([np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="zero-size"):
        load_images([Image.new("RGB", (0, 4))])
    with pytest.raises(ValueError, match="uint8"):
        load_images([np.zeros((4, 4, 3), np.float64)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        load_images([np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(ValueError, match="cannot read an image from a int"):
        load_images([7])
    with pytest.raises(ValueError, match="directory"):
        load_images([str(tmp_path)])
    with pytest.raises(ValueError, match="no images"):
        FeatureExtractor(small_net(), providers="cpu")([])


def test_unknown_layer_lists_close_matches():
    with pytest.raises(ValueError, match=r"no layer 'relu_1'.*'relu1'"):
        FeatureExtractor(small_net(), "relu_1", providers="cpu")


def test_layer_that_is_not_4d():
    with pytest.raises(ValueError, match=r"layer 'flat' has shape .* not \(N, C, h, w\)"):
        FeatureExtractor(small_net(), "flat", providers="cpu", image_size=32)


def test_model_file_errors(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("hello\n" * 50)
    with pytest.raises(ValueError, match="model.onnx is not an ONNX model"):
        FeatureExtractor(str(text), providers="cpu")
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        FeatureExtractor(str(tmp_path / "absent.onnx"), providers="cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="providers"):
        FeatureExtractor(small_net(), providers="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        FeatureExtractor(small_net(), providers="cpu", batch_size=0)
    with pytest.raises(ValueError, match="resize"):
        FeatureExtractor(small_net(), providers="cpu", resize="crop")
    with pytest.raises(ValueError, match="shorter"):
        FeatureExtractor(small_net(), providers="cpu", resize="shorter", image_size=(3, 4))
    with pytest.raises(ValueError, match="image_size must be positive"):
        FeatureExtractor(small_net(), providers="cpu", image_size=(0, 4))
    fx = FeatureExtractor(small_net(), providers="cpu")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fx.run(np.zeros((1, 4, 8, 8), np.float32))


@pytest.mark.skipif(features.cuda_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error():
    with pytest.raises(RuntimeError, match="providers='cuda' but"):
        FeatureExtractor(small_net(), providers="cuda")
    fx = FeatureExtractor(small_net(), providers="auto")
    assert fx.provider == "CPUExecutionProvider"


def test_device_output_needs_cuda():
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=16)
    with pytest.raises(RuntimeError, match="device_output=True needs the CUDA provider"):
        fx(images(1, 16, 16), device_output=True)


@pytest.mark.parametrize("batch_size,fixed", [(16, False), (2, False), (2, True)])
def test_device_output_binding_logic_in_host_memory(batch_size, fixed):
    """The I/O-binding path of device_output (one run into onnxruntime's buffer; several
    runs into slices of one buffer; a fixed batch padded), pointed at host memory so that it
    runs here; the GPU test below runs it for real."""
    model = small_net(input_shape=(2, 3, 16, 16)) if fixed else small_net()
    fx = FeatureExtractor(model, "pool1", providers="cpu", image_size=16, batch_size=batch_size)
    imgs = images(5, 16, 16, seed=30)
    host = fx(imgs)
    fx.provider, fx._device_type = "CUDAExecutionProvider", "cpu"
    dev = fx(imgs, device_output=True)
    assert isinstance(dev, features.DeviceActivations) and dev.shape == (5, 4, 8, 8) and len(dev) == 5
    np.testing.assert_array_equal(dev.numpy(), host)
    np.testing.assert_array_equal(np.asarray(dev), host)
    if fixed:  # the buffer holds 6 rows (3 runs of the fixed batch 2); DLPack would show them
        with pytest.raises(BufferError):
            dev.__dlpack__()
    else:  # zero-copy exchange: numpy reads the OrtValue's memory
        np.testing.assert_array_equal(np.from_dlpack(dev), host)


# --------------------------------------------------------------------------- audit regressions


def _caused_by(error, kind):
    """Whether ``kind`` is in the chain of causes of ``error``."""
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__
    return False


def _jpeg_with_exif(a, exif_bytes):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=95, exif=exif_bytes)
    return buf.getvalue()


def test_exif_that_pillow_cannot_rewrite_is_still_applied(tmp_path):
    """Orientation 6 plus a tag whose id says SamplesPerPixel but whose value is text:
    Pillow decodes the file but ImageOps.exif_transpose fails rewriting the EXIF. The image
    still comes back upright, as the same file with clean EXIF does."""
    from PIL import ImageOps

    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = (255, 0, 0)
    a[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"  # Orientation, Make (ASCII)
    clean = _jpeg_with_exif(a, exif.tobytes())
    broken = clean.replace(b"\x01\x0f\x00\x02", b"\x01\x15\x00\x02", 1)  # Make -> SamplesPerPixel, type ASCII kept
    assert broken != clean
    bad = tmp_path / "bad_exif.jpg"
    bad.write_bytes(broken)
    with Image.open(bad) as im:  # the premise: Pillow reads it, exif_transpose does not
        im.load()
        assert im.getexif().get(0x0112) == 6
        with pytest.raises(Exception):
            ImageOps.exif_transpose(im)
    ok, upright = load_images([clean, str(bad)])
    assert upright.size == ok.size == (8, 16)  # (W, H): portrait
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(ok))
    assert np.asarray(upright)[2, 4, 0] > 200 and np.asarray(upright)[13, 4, 2] > 200  # red on top
    fx = FeatureExtractor(small_net(), providers="cpu", image_size=16)
    assert fx([images(1, 16, 16)[0], str(bad)]).shape == (2, 5, 6, 6)
    assert fx.last_sizes == [(16, 16), (16, 8)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_fallback_matches_exif_transpose(monkeypatch, orientation):
    """Where exif_transpose fails, the transposition comes from the orientation tag: the
    same pixels as exif_transpose gives, for each of the 8 orientations."""
    from PIL import ImageOps

    a = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif.tobytes())
    (expected,) = load_images([buf.getvalue()])
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        np.testing.assert_array_equal(np.asarray(expected), np.asarray(ImageOps.exif_transpose(im).convert("RGB")))

    def broken(*args, **kwargs):
        raise SyntaxError("cannot write this EXIF back")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    source = Image.open(io.BytesIO(buf.getvalue()))
    (got,) = load_images([source])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert source.size == (10, 6)  # the caller's image is not turned


def test_every_unreadable_image_is_named(tmp_path):
    """A decompression bomb, data cut short given as bytes or a file object, and whatever
    else a file object raises: ValueError naming the image, the original error chained."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 20001)) + chunk(b"IEND", b""))
    ok = images(1, 16, 16)[0]
    with pytest.raises(ValueError, match=r"image 1 \(.*bomb.png\): .*MAX_IMAGE_PIXELS") as info:
        load_images([ok, str(bomb)])
    assert _caused_by(info.value, Image.DecompressionBombError)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        features.load_image(bomb.read_bytes())

    buf = io.BytesIO()
    Image.fromarray(images(1, 64, 64)[0]).save(buf, "JPEG")
    half = buf.getvalue()[:300]
    with pytest.raises(ValueError, match=r"image 1 \(bytes\): truncated or corrupt") as info:
        load_images([ok, half])
    assert _caused_by(info.value, OSError)
    with pytest.raises(ValueError, match=r"image 1 \(BytesIO\): truncated or corrupt"):
        load_images([ok, io.BytesIO(half)])

    class Failing(io.BytesIO):
        def read(self, *args):
            raise RuntimeError("the network share went away")

    fx = FeatureExtractor(small_net(), providers="cpu", image_size=16)
    with pytest.raises(ValueError, match=r"image 1 \(Failing\): cannot read it \(RuntimeError: the network share") as info:
        fx([ok, Failing(b"")])
    assert _caused_by(info.value, RuntimeError)


def test_float_tensors_run_on_a_float16_input_model():
    """run() takes normalised float32 (N, 3, H, W) (or float16) whatever the model's input
    type: the float session casts inside the graph."""
    half = models.to_float16(small_net(), keep_io_float32=False)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    fx = FeatureExtractor(half, "relu1", providers="cpu", image_size=16)
    u8 = np.stack(images(2, 16, 16, seed=40))
    x = normalize_reference(u8).astype(np.float32)
    ref = reference(x.astype(np.float64))["relu1"]
    for given in (x, x.astype(np.float16)):
        out = fx.run(given)
        assert out.dtype == np.float32 and out.shape == (2, 4, 16, 16)
        np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    np.testing.assert_allclose(fx.run(x), fx.run(u8), rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16  # the caller's model untouched


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_layers_between_an_nhwc_input_and_the_first_conv():
    """NHWC input -> Sub mean (NHWC) -> Transpose (NCHW) -> Conv -> Relu: each layer comes
    back (N, C, h, w) with the right values, the one already NCHW after the Transpose too."""
    mean = np.array([100, 110, 120], np.float32)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", "W", 3])], ["r"],
                   [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1")])
    u8 = np.random.default_rng(41).integers(0, 256, (2, 10, 12, 3), dtype=np.uint8)
    centred = (u8.astype(np.float64) - mean).transpose(0, 3, 1, 2)
    expected = {"x": u8.transpose(0, 3, 1, 2), "centred": centred, "nchw": centred,
                "r": np.maximum(conv2d(centred, W1, B1, 1), 0)}
    for layer, ref in expected.items():
        fx = FeatureExtractor(model, layer, providers="cpu", image_size=(10, 12), normalization="none")
        out = fx(list(u8))
        assert out.shape == ref.shape, layer
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3, err_msg=layer)
        np.testing.assert_allclose(fx.run(u8.astype(np.float32).transpose(0, 3, 1, 2)), ref, rtol=1e-4, atol=1e-3)


def _conv_relu_nhwc_slice(after_slice="Relu"):
    """Conv -> Relu -> Transpose to NHWC -> Slice of H -> ``after_slice``."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["r_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Slice", ["r_nhwc", "s0", "s1", "ax"], ["cropped_nhwc"]),
        helper.make_node(after_slice, ["cropped_nhwc"] + (["shape"] if after_slice == "Reshape" else []), ["out_nhwc"]),
    ]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
             numpy_helper.from_array(np.array([1], np.int64), "s0"), numpy_helper.from_array(np.array([9], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array([0, 8, 12, 4], np.int64), "shape")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])], ["out_nhwc"], inits)


def test_layers_after_a_transpose_and_a_slice_are_channel_first():
    model = _conv_relu_nhwc_slice()
    u8 = np.stack(images(2, 10, 12, seed=42))
    relu = np.maximum(conv2d(normalize_reference(u8), W1, B1, 1), 0)
    expected = {"r": relu, "r_nhwc": relu, "cropped_nhwc": relu[:, :, 1:9], "out_nhwc": relu[:, :, 1:9]}
    for layer, ref in expected.items():
        out = FeatureExtractor(model, layer, providers="cpu", image_size=(10, 12))(list(u8))
        assert out.shape == ref.shape, layer
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=layer)


def test_a_layer_whose_channel_axis_cannot_be_told_asks_for_it():
    """Behind a Reshape the layout is unknown: a ValueError naming the layer and the op,
    not a guess; channel_axis= says it."""
    model = _conv_relu_nhwc_slice("Reshape")
    with pytest.raises(ValueError, match=r"layer 'out_nhwc'.*Reshape.*channel_axis=3"):
        FeatureExtractor(model, "out_nhwc", providers="cpu", image_size=(10, 12))
    fx = FeatureExtractor(model, "out_nhwc", providers="cpu", image_size=(10, 12), channel_axis=3)
    assert fx.channel_axis == 3
    u8 = np.stack(images(1, 10, 12, seed=43))
    relu = np.maximum(conv2d(normalize_reference(u8), W1, B1, 1), 0)
    np.testing.assert_allclose(fx(list(u8)), relu[:, :, 1:9], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="channel_axis must be 1"):
        FeatureExtractor(model, "r", providers="cpu", channel_axis=2)


def _two_input_model():
    """Inputs [aux (1, 4, 5, 5), x (N, 3, H, W)]; r = Relu(Conv(x)); aux_out = Relu(aux);
    both = r + aux (depends on the two)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Relu", ["aux"], ["aux_out"]),
        helper.make_node("Add", ["r", "aux"], ["both"]),
    ]
    inputs = [helper.make_tensor_value_info("aux", TensorProto.FLOAT, [1, 4, 5, 5]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])]
    return _model(nodes, inputs, ["r", "aux_out", "both"], [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1")])


def test_the_image_input_is_the_one_the_layer_needs():
    model = _two_input_model()
    fx = FeatureExtractor(model, "r", providers="cpu", image_size=16, batch_size=8)
    assert fx.image_size == (16, 16) and fx.batch_size == 8
    assert dict(fx.layers())["r"] == ("N", 4, 16, 16)
    imgs = images(3, 16, 16, seed=44)
    out = fx(imgs)
    assert out.shape == (3, 4, 16, 16)
    np.testing.assert_allclose(out, np.maximum(conv2d(normalize_reference(np.stack(imgs)), W1, B1, 1), 0), rtol=1e-4, atol=1e-4)
    assert models.input_layout(model, "x") == "NCHW"
    assert models.image_input(model, "r") == "x"
    assert models.tensor_shapes(model, (16, 16), "x")["r"][1] == ("N", 4, 16, 16)
    with pytest.raises(ValueError, match=r"layer 'both' depends on 2 graph inputs \['aux', 'x'\]"):
        FeatureExtractor(model, "both", providers="cpu")
    with pytest.raises(ValueError, match=r"input 'aux' of shape \(1, 4, 5, 5\), which does not take RGB images"):
        FeatureExtractor(model, "aux_out", providers="cpu")


def _fixed_height_net(shape=("N", 3, 20, "W")):
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], ["r"],
                  [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1")])


def test_an_input_with_one_fixed_side():
    """(N, 3, 20, W): images get height 20 and the width image_size says; an image_size
    that contradicts the fixed side, or a resize that cannot honour it, fails at once."""
    model = _fixed_height_net()
    assert FeatureExtractor(model, providers="cpu").image_size == (20, 224)
    fx = FeatureExtractor(model, providers="cpu", image_size=32)
    assert fx.image_size == (20, 32) and fx.resize == "fixed"
    img = images(1, 30, 40, seed=45)[0]
    out = fx([img])
    assert out.shape == (1, 4, 20, 32)
    x = preprocess(load_images([img]), (20, 32))
    np.testing.assert_allclose(out, np.maximum(conv2d(x, W1, B1, 1), 0), rtol=1e-4, atol=1e-4)
    assert FeatureExtractor(model, providers="cpu", image_size=(20, 24)).image_size == (20, 24)
    with pytest.raises(ValueError, match=r"image_size \(24, 32\) asks for a height of 24.*fixed height of 20.*image_size=\(20, W\)"):
        FeatureExtractor(model, providers="cpu", image_size=(24, 32))
    with pytest.raises(ValueError, match="fixed height of 20.*resize='fixed'"):
        FeatureExtractor(model, providers="cpu", image_size=16, resize="shorter")
    with pytest.raises(ValueError, match="fixed height of 20"):
        FeatureExtractor(model, providers="cpu", image_size=None)
    with pytest.raises(ValueError, match=r"takes images of height 20, got \(16, 32\)"):
        fx.run(np.zeros((1, 3, 16, 32), np.float32))
    wide = FeatureExtractor(_fixed_height_net(("N", 3, "H", 24)), providers="cpu", image_size=12)
    assert wide.image_size == (12, 24) and wide([img]).shape == (1, 4, 12, 24)


def test_unclear_arguments_get_clear_errors():
    with pytest.raises(TypeError, match=r"layer must be the name of a tensor .*got int 5"):
        FeatureExtractor(small_net(), 5, providers="cpu")
    with pytest.raises(ValueError, match=r"'w1' is a weight \(an initializer or constant\) of the model, not an activation"):
        FeatureExtractor(small_net(), "w1", providers="cpu")
    for bad in [(16,), (16, 16, 3), 16.0, (16.0, 16), "16", True]:
        with pytest.raises(ValueError, match=r"image_size must be an int .*\(height, width\)"):
            FeatureExtractor(small_net(), providers="cpu", image_size=bad)
    with pytest.raises(ValueError, match="image_size must be positive"):
        FeatureExtractor(small_net(), providers="cpu", image_size=-3)
    assert FeatureExtractor(small_net(), providers="cpu", image_size=np.array([12, 16])).image_size == (12, 16)
    with pytest.raises(FileNotFoundError, match=r"'VGG16' is not a built-in model name; the built-in names are 'vgg16'.*did you mean 'vgg16'\?"):
        FeatureExtractor("VGG16", providers="cpu")
    with pytest.raises(FileNotFoundError, match=r"no such model file: resnet50 .*built-in names are 'vgg16', 'vgg16:random'"):
        FeatureExtractor("resnet50", providers="cpu")
    with pytest.raises(ValueError, match="the onnx.ModelProto given is not an ONNX model"):
        FeatureExtractor(onnx.ModelProto(), providers="cpu")


def test_a_corrupt_torchvision_cache_file_is_named(tmp_path):
    path = tmp_path / f"vgg16-torchvision-conv-v{models._CACHE_FORMAT}.onnx"
    path.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cached model .*vgg16-torchvision-conv-v1.onnx is corrupt.*weights='torchvision'"):
        FeatureExtractor("vgg16", providers="cpu", cache_dir=tmp_path)
    assert path.read_bytes() == b"junk"  # left for the user to look at


# --------------------------------------------------------------------------- GPU


@pytest.fixture
def cuda_extractor():
    if not features.cuda_available():
        pytest.skip("no CUDA device, or an onnxruntime without the CUDA provider")
    try:
        FeatureExtractor(small_net(), providers="cuda")
    except RuntimeError as e:  # a device, but onnxruntime's CUDA libraries do not load
        pytest.skip(str(e))
    return lambda *a, **k: FeatureExtractor(*a, providers="cuda", **k)


@pytest.mark.gpu
def test_cuda_activations_equal_cpu_and_stay_on_device(cuda_extractor):
    imgs = images(5, 32, 32, seed=21)
    cpu = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=32)(imgs)
    fx = cuda_extractor(small_net(), "relu1", image_size=32, batch_size=2)
    assert fx.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(fx(imgs), cpu, rtol=1e-3, atol=1e-3)
    dev = fx(imgs, device_output=True)
    assert isinstance(dev, features.DeviceActivations) and dev.shape == (5, 4, 32, 32)
    iface = dev.__cuda_array_interface__
    assert iface["shape"] == (5, 4, 32, 32) and iface["typestr"] == "<f4" and iface["data"][0] == dev.data_ptr
    assert dev.__dlpack_device__()[0] == 2  # kDLCUDA
    np.testing.assert_allclose(dev.numpy(), cpu, rtol=1e-3, atol=1e-3)
    try:
        import torch
    except ImportError:
        return
    t = torch.from_dlpack(dev)
    assert t.is_cuda and tuple(t.shape) == dev.shape
    np.testing.assert_allclose(t.cpu().numpy(), cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_vgg16_fp16_close_to_fp32(cuda_extractor, vgg_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", models.UntrainedWeightsWarning)
        model = models.vgg16(cache_dir=vgg_cache)
    imgs = images(2, 224, 224, seed=22)
    full = cuda_extractor(model)(imgs)
    half = cuda_extractor(models.to_float16(model))(imgs)
    assert full.shape == half.shape == (2, 512, 14, 14)
    assert np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_cuda_provider_options_defaults_and_overrides(monkeypatch):
    """The CUDA provider gets dffkit's defaults (NHWC convolutions) under the caller's own
    options, which win; checked with the device and onnxruntime's session faked, so it runs
    anywhere."""
    import onnxruntime as ort

    seen = []

    class FakeSession:
        def __init__(self, model_bytes, options, providers):
            seen.append(providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(features, "_cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(features, "_preload_cuda_libraries", lambda: "")
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    for given, nhwc in [(None, "1"), ({"prefer_nhwc": 0}, "0"), ({"use_tf32": 0}, "1")]:
        seen.clear()
        session, device = features._make_session(b"", "cuda:1", None, provider_options=given)
        (name, opts), cpu = seen[0]
        assert (name, cpu, device) == ("CUDAExecutionProvider", "CPUExecutionProvider", 1)
        assert opts["prefer_nhwc"] == nhwc and opts["device_id"] == 1
        for key, value in (given or {}).items():
            assert opts[key] == str(value)
    assert features.CUDA_PROVIDER_DEFAULTS == {"prefer_nhwc": "1"}  # the defaults are not mutated


# --------------------------------------------------------------------------- audit fixes (images, providers, messages)


def test_a_numpy_array_of_paths_is_a_sequence_of_paths(tmp_path):
    """A 1-D str or object array (pandas' df.path.values) was read as one image and refused:
    'image 0 (array (4,) <U45): an image array must be (H, W), ...'."""
    imgs = images(3, 16, 16)
    paths = []
    for i, a in enumerate(imgs):
        paths.append(str(tmp_path / f"p{i}.png"))
        Image.fromarray(a).save(paths[-1])
    fx = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=16)
    expected = fx(paths)
    for array in (np.array(paths), np.array(paths, dtype=object)):
        got = fx(array)
        np.testing.assert_array_equal(got, expected)
        assert fx.last_sizes == [(16, 16)] * 3
    from dffkit.images import as_image_list

    listed = as_image_list(np.array(paths))
    assert listed == paths and all(type(p) is str for p in listed)  # plain str, not np.str_
    assert len(as_image_list(np.zeros((4, 5), np.uint8))) == 1  # a 2-D uint8 array is still one image


def test_a_memoryview_of_encoded_bytes_is_one_image():
    """A memoryview was iterated: 'image 0 (int): cannot read an image from a int'."""
    a = images(1, 6, 4)[0]
    data = _png(a)
    (img,) = load_images(memoryview(data))
    np.testing.assert_array_equal(np.asarray(img), a)
    (img,) = load_images([memoryview(data)])
    np.testing.assert_array_equal(np.asarray(img), a)
    fx = FeatureExtractor(small_net(), "relu1", providers="cpu", image_size=16)
    np.testing.assert_array_equal(fx(memoryview(data)), fx(data))


def test_one_shared_folder_expansion():
    """dff and cluster_images list folders with one function, whose empty-folder error is
    both a FileNotFoundError (the command line) and a ValueError (bad input)."""
    from dffkit import clustering, deep_feature_factorization, images as images_module

    assert deep_feature_factorization._expand_images is images_module._expand_images
    assert clustering._expand_images is images_module._expand_images
    assert issubclass(images_module.NoImagesFound, FileNotFoundError)
    assert issubclass(images_module.NoImagesFound, ValueError)


def test_unknown_provider_in_a_list_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown onnxruntime provider 'BogusProvider'; this onnxruntime has \[.*'CPUExecutionProvider'"):
        FeatureExtractor("filterbank", providers=["BogusProvider"])
    with pytest.raises(ValueError, match=r"providers: a list of onnxruntime provider names .*got the entry 3"):
        FeatureExtractor("filterbank", providers=[3])
    with pytest.raises(ValueError, match="providers is an empty list"):
        FeatureExtractor("filterbank", providers=[])
    fx = FeatureExtractor("filterbank", providers=["CPUExecutionProvider"])
    assert fx.provider == "CPUExecutionProvider"


@pytest.mark.skipif(features.cuda_available(), reason="needs a machine without CUDA")
def test_cuda_in_a_provider_list_without_cuda_is_an_error():
    """providers=['CUDAExecutionProvider'] ran on the CPU, silently."""
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        FeatureExtractor("filterbank", providers=["CUDAExecutionProvider"])
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        FeatureExtractor("filterbank", providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])


def test_a_listed_provider_the_session_did_not_get_is_an_error(monkeypatch):
    """onnxruntime falls back to the CPU when a provider of the list cannot start; the
    session's own providers (session.get_providers()) are checked."""
    real = ort.InferenceSession

    class CpuOnly:  # a session whose listed provider failed to start
        def __init__(self, model, options, providers):
            self._session = real(model, options, providers=["CPUExecutionProvider"])

        def __getattr__(self, name):
            return getattr(self._session, name)

    monkeypatch.setattr(ort, "InferenceSession", CpuOnly)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["XnnpackExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "get_all_providers", lambda: ["XnnpackExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"could not start XnnpackExecutionProvider .*would run on \['CPUExecutionProvider'\]"):
        FeatureExtractor("filterbank", providers=["XnnpackExecutionProvider", "CPUExecutionProvider"])
    # a provider onnxruntime knows of but this build lacks
    monkeypatch.setattr(ort, "get_all_providers", lambda: ["XnnpackExecutionProvider", "DmlExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"asks for DmlExecutionProvider, which this onnxruntime does not have"):
        FeatureExtractor("filterbank", providers=["DmlExecutionProvider"])


def test_images_of_several_sizes_get_the_right_advice(tmp_path):
    """image_size=None was told "(resize='fixed', size=None); use resize='fixed' or process
    them one by one": resize was already 'fixed'; the fixes are an int image_size or
    extract_list()."""
    imgs = [images(1, 16, 16)[0], images(1, 20, 12, seed=1)[0]]
    fx = FeatureExtractor("filterbank", providers="cpu", image_size=None)
    with pytest.raises(ValueError) as info:
        fx(imgs)
    message = str(info.value)
    assert "image_size=None keeps each image's own size" in message
    assert "pass an int image_size (e.g. image_size=224)" in message and "extract_list()" in message
    assert "resize='fixed'" not in message and "16 x 16" in message and "20 x 12" in message
    # one image a batch: the batches stack, the activations differ: the same advice
    fx1 = FeatureExtractor("filterbank", providers="cpu", image_size=None, batch_size=1)
    with pytest.raises(ValueError, match=r"different sizes .*pass an int image_size .*extract_list\(\)"):
        fx1(imgs)
    shorter = FeatureExtractor("filterbank", providers="cpu", image_size=16, resize="shorter")
    with pytest.raises(ValueError, match=r"resize='shorter' keeps each image's aspect ratio: pass resize='fixed'"):
        shorter(imgs)
    from dffkit.images import preprocess as host_preprocess

    with pytest.raises(ValueError, match=r"size=None keeps each image's own size: pass an int size .*one by one"):
        host_preprocess(load_images(imgs), None)


@pytest.mark.parametrize("dtype,advice", [
    (np.int64, r"x.astype\(np.uint8\) for values in 0..255, x.astype\(np.uint16\)"),
    (np.int32, r"x.astype\(np.uint8\) for values in 0..255"),
    (np.bool_, r"a boolean array is a mask, not a picture: pass x.astype\(np.uint8\) \* 255"),
    (np.float32, r"convert floats yourself"),
])
def test_image_arrays_of_other_types_get_advice_for_their_type(dtype, advice):
    """int64 and bool arrays were told to 'convert floats yourself'."""
    with pytest.raises(ValueError, match=advice) as info:
        load_images([np.zeros((4, 4, 3), dtype)])
    if dtype is not np.float32:
        assert "floats" not in str(info.value)


def test_batch_size_must_be_a_positive_int_not_a_bool():
    """batch_size=True ran with batches of 1."""
    for bad in (True, False, 2.0, "4"):
        with pytest.raises(ValueError, match=r"batch_size must be a positive int \(images per onnxruntime run"):
            FeatureExtractor(small_net(), providers="cpu", batch_size=bad)
    assert FeatureExtractor(small_net(), providers="cpu", batch_size=np.int64(3)).batch_size == 3
