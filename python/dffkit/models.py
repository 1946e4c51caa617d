"""ONNX models for feature extraction: VGG-16 (random, torchvision, or the user's file), the
built-in colour-and-texture filter bank, and the graph surgery the extractor relies on.

Every model this module writes carries an explicit IR version that the installed
onnxruntime accepts (``max_ir_version()``) and opset 17. Models it builds are labelled in
``metadata_props`` (keys ``dffkit.*``: ``model``, ``weights``, ``untrained``,
``normalization``; torchvision exports also ``exporter``; files written to the cache also
``weights_sha256``, checked with the labels and the structure when the file is read back);
``model_info(model)`` reads them back.

Nothing here needs torch: VGG-16 with random weights and the filter bank are written with
``onnx.helper``. Only ``export_vgg16_torchvision`` (``vgg16(weights="torchvision")``)
imports torch and torchvision, lazily.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "OPSET",
    "UntrainedWeightsWarning",
    "max_ir_version",
    "fit_ir_version",
    "cache_dir",
    "load_model",
    "model_info",
    "is_untrained",
    "vgg16",
    "export_vgg16_torchvision",
    "vgg16_layers",
    "default_layer",
    "filterbank",
    "filterbank_channels",
    "classifier_head",
    "ClassifierHead",
    "imagenet_classes",
    "to_float16",
    "tensor_shapes",
    "truncate",
    "input_layout",
    "image_input",
    "resolve_layer",
]

#: opset of every graph this module writes; onnxruntime >= 1.14 runs it.
OPSET = 17
#: bump when the random VGG-16 or the filter bank change, so stale cache files are not used.
_CACHE_FORMAT = 1
_VGG16_BLOCKS = (2, 2, 3, 3, 3)
_VGG16_WIDTHS = (64, 128, 256, 512, 512)


class UntrainedWeightsWarning(UserWarning):
    """Features come from a network with random (untrained) weights."""


# --------------------------------------------------------------------------- IR version


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime loads (probed once per process).

    onnx >= 1.23 writes IR version 14 by default, which older onnxruntime releases refuse;
    ``DFFKIT_ONNX_IR_VERSION`` overrides the probe.
    """
    env = os.environ.get("DFFKIT_ONNX_IR_VERSION")
    if env:
        return int(env)
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 6, -1):
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return ir
        except Exception:
            continue
    return 7


def fit_ir_version(model):
    """Lower ``model.ir_version`` in place to what onnxruntime accepts; returns the model."""
    limit = max_ir_version()
    if model.ir_version == 0 or model.ir_version > limit:
        model.ir_version = limit
    return model


def _make_model(graph, metadata: Dict[str, str], doc: str = ""):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dffkit")
    model.ir_version = min(model.ir_version, max_ir_version())
    model.doc_string = doc
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"dffkit.{key}", str(value)
    return model


def model_info(model) -> Dict[str, str]:
    """The ``dffkit.*`` metadata of a model, without the prefix (empty for foreign models)."""
    return {p.key[len("dffkit."):]: p.value for p in model.metadata_props if p.key.startswith("dffkit.")}


def is_untrained(model) -> bool:
    """True for models labelled as having random weights (dffkit's random VGG-16)."""
    return model_info(model).get("untrained", "0") in ("1", "true", "True")


# --------------------------------------------------------------------------- disk cache


def cache_dir(path=None) -> Path:
    """Folder for built and exported models: ``path``, else ``$DFFKIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dffkit``, else ``~/.cache/dffkit`` (an empty value counts as unset)."""
    if path is not None and not os.fspath(path).strip():
        path = None
    if path is None:
        path = os.environ.get("DFFKIT_CACHE_DIR", "").strip() or None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "dffkit")
    return Path(path)


#: ``metadata_props`` key of the digest of a cached model's weights (written with the file).
_DIGEST_KEY = "dffkit.weights_sha256"


def _weights_digest(model) -> str:
    """SHA-256 over the initializers' names, types, shapes and bytes, in graph order."""
    import hashlib

    from onnx import numpy_helper

    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(f"{t.name}|{t.data_type}|{tuple(t.dims)}|".encode())
        h.update(t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes())
    return h.hexdigest()


def _cache_problem(model, check) -> Optional[str]:
    """Why a model read from the cache cannot be used, or None: no graph, outputs or opset,
    weights that do not match the digest stored with them, or what ``check`` finds."""
    if len(model.graph.node) == 0 or len(model.graph.output) == 0 or len(model.opset_import) == 0:
        return "no graph, outputs or opset in it"
    stored = [p.value for p in model.metadata_props if p.key == _DIGEST_KEY]
    if stored and stored[-1] != _weights_digest(model):
        return "its weights do not match the checksum stored with them"
    return check(model) if check is not None else None


def _cached(name: str, build, folder=None, check=None, rebuild_if_invalid: bool = True, how_to_rebuild: str = ""):
    """Load ``name`` from the cache folder, or build it and store it there (atomically, with a
    checksum of its weights).

    A cached file that cannot be read, or that ``_cache_problem`` (``check``: a function of
    the model returning what is wrong with it, or None) rejects, is built again and
    overwritten; with ``rebuild_if_invalid=False`` (a build that needs a download or an
    export) it raises ValueError naming the file and ``how_to_rebuild`` instead."""
    import onnx

    path = cache_dir(folder) / name
    if path.is_file():
        try:
            model = onnx.load(str(path))
            problem = _cache_problem(model, check)
        except Exception as e:  # unreadable cache entry
            problem = f"it cannot be read ({type(e).__name__}: {e})"
        if problem is None:
            return fit_ir_version(model)
        if not rebuild_if_invalid:
            raise ValueError(f"the cached model {path} is corrupt ({problem}); delete it and {how_to_rebuild}")
    model = build()
    if not any(p.key == _DIGEST_KEY for p in model.metadata_props):
        entry = model.metadata_props.add()
        entry.key, entry.value = _DIGEST_KEY, _weights_digest(model)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=name, suffix=".tmp", dir=str(path.parent))
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"dffkit: could not cache {name} in {path.parent} ({e}); it will be built again next time", stacklevel=3)
    finally:
        if tmp is not None:  # a failed write (disk full, ...): no partial file left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return model


# --------------------------------------------------------------------------- loading


def load_model(model):
    """An ``onnx.ModelProto`` from a ModelProto, a path or serialized bytes.

    Raises FileNotFoundError for a missing file and ValueError for a file, bytes or a
    ModelProto that is not an ONNX model (no graph, outputs or opset). The IR version of a
    model read from a file or bytes is lowered to what onnxruntime accepts; a ModelProto is
    returned as it is, unchanged.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        # checked, not changed: the caller's model is left as it is (truncate and
        # with_image_input make copies with a suitable IR version)
        return _check_model(model, "the onnx.ModelProto given", fit=False)
    if isinstance(model, (bytes, bytearray)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as e:
            raise ValueError(f"the bytes given are not an ONNX model ({e})") from None
        return _check_model(proto, "the bytes given")
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a path, an onnx.ModelProto or bytes, got {type(model).__name__}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an ONNX model file")
    try:
        proto = onnx.load(path)
    except Exception as e:
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    return _check_model(proto, path)


def _check_model(proto, where: str, fit: bool = True):
    if len(proto.graph.node) == 0 or len(proto.graph.output) == 0 or len(proto.opset_import) == 0:
        raise ValueError(f"{where} is not an ONNX model (no graph, outputs or opset found)")
    return fit_ir_version(proto) if fit else proto


# --------------------------------------------------------------------------- graph helpers


class _Graph:
    """Read-only index over an ONNX graph: producers, consumers, constant tensors."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.producer = {}
        self.consumers: Dict[str, list] = {}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self._np = numpy_helper

    def is_constant(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.initializers or (node is not None and node.op_type == "Constant")

    def constant(self, name: str) -> Optional[np.ndarray]:
        if name in self.initializers:
            return self._np.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._np.to_array(attr.t)
        return None

    def constant_shape(self, name: str) -> Optional[Tuple[int, ...]]:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        value = self.constant(name)
        return None if value is None else value.shape

    def data_inputs(self) -> List[str]:
        return [v.name for v in self.graph.input if v.name not in self.initializers]

    def tensor_names(self) -> List[str]:
        return [out for node in self.nodes for out in node.output if out]

    def data_input(self, node) -> Optional[str]:
        """The first input of ``node`` that is not a constant."""
        for name in node.input:
            if name and not self.is_constant(name):
                return name
        return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _kernel_shape(g: _Graph, node) -> Optional[Tuple[int, ...]]:
    ks = _attr(node, "kernel_shape")
    if ks is not None:
        return tuple(ks)
    shape = g.constant_shape(node.input[1]) if len(node.input) > 1 else None
    return None if shape is None else tuple(shape[2:])


_ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "PRelu", "Elu", "Selu", "HardSwish", "Sigmoid", "Gelu")
_TRANSPARENT = ("Add", "BatchNormalization", "Identity", "Transpose", "Cast", "Mul", "InstanceNormalization")


def _activation_after(g: _Graph, tensor: str) -> str:
    """The activation that follows ``tensor`` through bias/normalisation/layout ops, or
    ``tensor`` itself when there is none. Other consumers of a tensor (an extra graph output
    computed from a convolution, say) do not hide its one activation."""
    current = tensor
    for _ in range(8):
        consumers = g.consumers.get(current, [])
        activations = [n for n in consumers if n.op_type in _ACTIVATIONS]
        if len(activations) == 1:
            return activations[0].output[0]
        if activations:  # several: none of them is *the* activation
            break
        transparent = [n for n in consumers if n.op_type in _TRANSPARENT]
        if len(transparent) != 1:
            break
        current = transparent[0].output[0]
    return tensor


#: ops that ONNX defines on channel-first tensors (N, C, ...): their output has its
#: channels on axis 1, whatever came before.
_CHANNELS_FIRST = {
    "Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "DeformConv", "MaxPool", "AveragePool", "LpPool",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxUnpool", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization", "LRN", "DepthToSpace", "SpaceToDepth",
}
#: ops whose output keeps the axis order of their (4-D) data inputs: element-wise ops, and
#: ops that change sizes but not the order of the axes.
_LAYOUT_KEEPING = {
    "Relu", "LeakyRelu", "Clip", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish",
    "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Shrink", "Erf", "Sqrt", "Abs", "Neg", "Exp", "Log",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "CastLike", "Dropout",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where",
    "Pad", "Concat", "Slice", "Split", "Tile", "Resize", "Upsample", "Softmax", "LogSoftmax", "Hardmax",
    "LpNormalization", "MeanVarianceNormalization",
}
_REDUCTIONS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare",
}


def _channel_axes(g: _Graph) -> Dict[str, object]:
    """For every tensor of the graph, the axis that holds its channels (an int) or, where
    that cannot be told, a str saying which node hides it.

    Followed forward in graph order: a graph input starts at axis 1 or, for an NHWC
    input, 3; an op that ONNX defines on (N, C, ...) tensors (Conv, pooling,
    normalisation) puts it on axis 1; a Transpose moves it by its ``perm``; element-wise
    ops, Pad, Concat, Slice, Resize and reductions that keep their dimensions keep it;
    any other op (Reshape, Flatten, Gather, MatMul, ...) loses it."""
    axes: Dict[str, object] = {name: 3 if input_layout(g.model, name) == "NHWC" else 1 for name in g.data_inputs()}
    for node in g.nodes:
        op = node.op_type
        where = f"a {op} node ({node.name or node.output[0]!r})"
        data = [axes[i] for i in node.input if i and i in axes and not g.is_constant(i)]
        if node.domain not in ("", "ai.onnx"):
            value = where
        elif op in _CHANNELS_FIRST:
            value = 1
        elif op == "Transpose":
            perm = _attr(node, "perm")
            perm = [3, 2, 1, 0] if perm is None else list(perm)
            if not data:
                value = where
            elif not isinstance(data[0], int):
                value = data[0]
            elif sorted(perm) != [0, 1, 2, 3]:
                value = f"{where} with perm {perm}, not of a 4-D tensor"
            else:
                value = perm.index(data[0])
        elif op in _LAYOUT_KEEPING or (op in _REDUCTIONS and _attr(node, "keepdims", 1)):
            known = [a for a in data if isinstance(a, int)]
            value = known[0] if known else (data[0] if data else where)
        else:
            value = where
        for out in node.output:
            if out:
                axes[out] = value
    return axes


def _channel_axis(g: _Graph, tensor: str) -> int:
    """Axis that holds the channels of a 4-D ``tensor`` (``_channel_axes``): 1 for ONNX's
    NCHW, 3 for the NHWC tensors of graphs from TensorFlow converters. ValueError, naming
    the op in the way, when it cannot be told."""
    value = _channel_axes(g).get(tensor, f"{tensor!r} is not a tensor of the graph")
    if isinstance(value, int):
        return value
    raise ValueError(
        f"cannot tell which axis of layer {tensor!r} holds the channels: {value} lies between it and the "
        "image input or the nearest convolution and may have moved them; pass channel_axis=1 if the layer is "
        "(N, C, h, w), channel_axis=3 if it is (N, h, w, C)"
    )


def input_layout(model, input_name: Optional[str] = None) -> str:
    """``"NCHW"`` or ``"NHWC"`` for the model's image input ``input_name`` (default: its
    first data input), from its declared shape: NHWC when the last axis is 3 and the
    second is not."""
    g = _Graph(model)
    inputs = g.data_inputs()
    if input_name is None:
        if not inputs:
            return "NCHW"
        input_name = inputs[0]
    value = next((v for v in model.graph.input if v.name == input_name), None)
    dims = None if value is None else _value_dims(value)
    if dims is not None and len(dims) == 4 and dims[1] != 3 and dims[3] == 3:
        return "NHWC"
    return "NCHW"


def _needed(g: _Graph, layer: str) -> Tuple[list, set]:
    """(the nodes that compute ``layer``, in graph order; every tensor name they read)."""
    import onnx

    needed_nodes = []
    needed = {layer}
    for node in reversed(g.nodes):
        if any(o in needed for o in node.output):
            needed_nodes.append(node)
            needed.update(i for i in node.input if i)
            # tensors captured by subgraphs (If/Loop bodies) are needed as well
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    needed_nodes.reverse()
    return needed_nodes, needed


def image_input(model, layer: str) -> str:
    """The graph input that tensor ``layer`` is computed from: the one the extractor feeds
    images to (it need not be the first input). ValueError when the layer depends on
    several data inputs, or on none."""
    g = _Graph(model)
    inputs = g.data_inputs()
    if layer in inputs:
        return layer
    used = [name for name in inputs if name in _needed(g, layer)[1]]
    if len(used) > 1:
        raise ValueError(
            f"layer {layer!r} depends on {len(used)} graph inputs {used}; the extractor feeds one image input "
            "and nothing else: choose a layer computed from the image input alone"
        )
    if not used:
        raise ValueError(
            f"layer {layer!r} depends on no graph input (it is computed from constants only), so it is not an "
            "activation of the image; choose another layer (see FeatureExtractor.layers())"
        )
    return used[0]


def _value_dims(value_info) -> Optional[List]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _convs(g: _Graph) -> list:
    return [n for n in g.nodes if n.op_type == "Conv"]


def vgg16_layers(model) -> Dict[str, str]:
    """Canonical VGG-16 names (``conv1_1`` ... ``conv5_3``, ``relu1_1`` ... ``relu5_3``,
    ``pool1`` ... ``pool5``) mapped to the model's tensor names, found by structure: the
    thirteen 3 x 3 convolutions in graph order, the activation after each, the five max
    pools. Empty when the model is not a VGG-16.
    """
    g = _Graph(model)
    convs = [n for n in _convs(g) if _kernel_shape(g, n) == (3, 3)]
    pools = [n for n in g.nodes if n.op_type == "MaxPool"]
    if len(convs) != sum(_VGG16_BLOCKS):
        return {}
    names: Dict[str, str] = {}
    k = 0
    for b, count in enumerate(_VGG16_BLOCKS, 1):
        for i in range(1, count + 1):
            conv = convs[k]
            names[f"conv{b}_{i}"] = conv.output[0]
            names[f"relu{b}_{i}"] = _activation_after(g, conv.output[0])
            k += 1
    for b, pool in enumerate(pools[: len(_VGG16_BLOCKS)], 1):
        names[f"pool{b}"] = pool.output[0]
    return names


def default_layer(model) -> str:
    """The layer the extractor takes when none is named.

    For a VGG-16 (thirteen 3 x 3 convolutions), conv5_3 after its ReLU: the activation
    that follows the 13th convolution, whatever the nodes are called (torchvision, Keras
    converters, the ONNX model zoo). For the filter bank, its output. For any other
    network, the activation after its last convolution.
    """
    info = model_info(model)
    if info.get("model") == "filterbank":
        return model.graph.output[0].name
    vgg = vgg16_layers(model)
    if vgg:
        return vgg["relu5_3"]
    g = _Graph(model)
    convs = _convs(g)
    if not convs:
        raise ValueError("the model has no convolution; name the layer to extract (see FeatureExtractor.layers())")
    return _activation_after(g, convs[-1].output[0])


def resolve_layer(model, layer: Optional[str]) -> str:
    """Tensor name for ``layer``: a tensor of the graph, a canonical VGG-16 name, or None
    for the default. TypeError for anything else than a str or None; ValueError for a
    weight (initializer), and with close matches when there is no such tensor."""
    if layer is None:
        return default_layer(model)
    if not isinstance(layer, str):
        raise TypeError(
            f"layer must be the name of a tensor of the model (a str, see FeatureExtractor.layers()) or None "
            f"for the default layer; got {type(layer).__name__} {layer!r}"
        )
    g = _Graph(model)
    names = g.tensor_names() + g.data_inputs()
    if layer in names:
        return layer
    vgg = vgg16_layers(model)
    if layer in vgg:
        return vgg[layer]
    if layer in g.initializers or g.is_constant(layer):
        raise ValueError(
            f"{layer!r} is a weight (an initializer or constant) of the model, not an activation: name a node output "
            "computed from the image (see FeatureExtractor.layers())"
        )
    candidates = list(dict.fromkeys(names + list(vgg)))
    close = difflib.get_close_matches(layer, candidates, n=6, cutoff=0.5)
    hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "see FeatureExtractor.layers() for the names"
    raise ValueError(f"the model has no layer {layer!r}; {hint}")


# --------------------------------------------------------------------------- shapes


def _strip_weights(model):
    """A copy whose large float initializers keep their dims but drop their data (enough for
    shape inference, and cheap for a 500 MB model)."""
    import onnx

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) and np.prod(t.dims) > 64:
            stub = light.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
        else:
            light.graph.initializer.add().CopyFrom(t)
    return light


def tensor_shapes(
    model, input_hw: Optional[Tuple[int, int]] = None, input_name: Optional[str] = None
) -> Dict[str, Tuple[int, Tuple]]:
    """Element type and shape (None for unknown dims, ``"N"`` for the batch) of every tensor,
    by ONNX shape inference, with the spatial size of the image input ``input_name``
    (default: the first data input; ``image_input`` finds the one a layer needs) set to
    ``input_hw``."""
    import onnx

    light = _strip_weights(model)
    g = _Graph(light)
    inputs = g.data_inputs()
    if input_name is None and inputs:
        input_name = inputs[0]
    if input_name in inputs:
        value = next(v for v in light.graph.input if v.name == input_name)
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4:
            layout = input_layout(model, input_name)
            hw_axes = (2, 3) if layout == "NCHW" else (1, 2)
            if not dims[0].HasField("dim_value"):
                dims[0].dim_param = "N"
            if input_hw is not None:
                for axis, size in zip(hw_axes, input_hw):
                    if not dims[axis].HasField("dim_value"):
                        dims[axis].dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:
        inferred = light
    out = {}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = v.type.tensor_type
        dims = _value_dims(v)
        out[v.name] = (t.elem_type, None if dims is None else tuple(dims))
    return out


# --------------------------------------------------------------------------- truncation


def truncate(model, layer: str, *, nchw_input: bool = True, channel_axis: Optional[int] = None):
    """The part of ``model`` that computes tensor ``layer``, with ``layer`` its only output.

    The output is float32 and channel-first (a Transpose is appended when the tensor is
    NHWC, a Cast when it is float16). With ``nchw_input`` the graph takes float32
    (N, 3, H, W): an NHWC model gets a Transpose in front, a model whose input is float16
    (or double) a Cast. The graph input kept is the one ``layer`` is computed from
    (``image_input``). Nodes the layer does not need are dropped, so the classifier of a
    full VGG-16 neither runs nor constrains the input size.

    ``channel_axis`` (1 or 3) says where the layer's channels are, for a layer behind an op
    that may move them (a Reshape, say: ValueError without it); default: followed through
    the graph from the image input's layout and the convolutions (``_channel_axes``).
    """
    import onnx
    from onnx import TensorProto, helper

    if channel_axis is not None and (isinstance(channel_axis, bool) or channel_axis not in (1, 3)):
        raise ValueError(f"channel_axis must be 1 (N, C, h, w), 3 (N, h, w, C) or None, got {channel_axis!r}")
    g = _Graph(model)
    inputs = g.data_inputs()
    source = image_input(model, layer)
    needed_nodes, needed = _needed(g, layer)
    layout = input_layout(model, source)
    shapes = tensor_shapes(model, None, source)
    elem = shapes.get(layer, (TensorProto.FLOAT, None))[0] or TensorProto.FLOAT

    nodes = list(needed_nodes)
    graph_input = next(v for v in model.graph.input if v.name == source)
    new_input = onnx.ValueInfoProto()
    new_input.CopyFrom(graph_input)
    in_elem = graph_input.type.tensor_type.elem_type
    front = []  # (op, attributes) between the new input and the model's own input
    if nchw_input and in_elem not in (0, TensorProto.FLOAT):
        front.append(("Cast", {"to": in_elem}))
        new_input.type.tensor_type.elem_type = TensorProto.FLOAT
    if nchw_input and layout == "NHWC":
        front.append(("Transpose", {"perm": [0, 2, 3, 1]}))
        dims = new_input.type.tensor_type.shape.dim
        src = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
        for i, d in enumerate(dims):
            src[i].CopyFrom(d)
        for dst, i in zip(dims, (0, 3, 1, 2)):
            dst.CopyFrom(src[i])
    if front:
        new_input.name = "dffkit_input_nchw" if layout == "NHWC" else "dffkit_input_float32"
        x = new_input.name
        for k, (op, attrs) in enumerate(front):
            out = source if k == len(front) - 1 else f"dffkit_input_{op.lower()}"
            name = "dffkit_to_nhwc" if op == "Transpose" else "dffkit_to_input_type"
            nodes.insert(k, helper.make_node(op, [x], [out], name=name, **attrs))
            x = out

    output = layer
    if output in inputs:
        # extracting the input itself: route it through an Identity so it has a producer
        nodes.append(helper.make_node("Identity", [output], ["dffkit_identity"]))
        output = "dffkit_identity"
    rank = shapes.get(layer, (None, None))[1]
    if rank is None or len(rank) == 4:
        axis = _channel_axis(g, layer) if channel_axis is None else channel_axis
        if axis != 1:
            perm = [0, axis] + [a for a in (1, 2, 3) if a != axis]
            nodes.append(helper.make_node("Transpose", [output], ["dffkit_nchw"], perm=perm, name="dffkit_to_nchw"))
            output = "dffkit_nchw"
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [output], ["dffkit_float32"], to=TensorProto.FLOAT, name="dffkit_cast"))
        output = "dffkit_float32"

    needed_inits = [t for t in model.graph.initializer if t.name in needed]
    graph = helper.make_graph(
        nodes,
        model.graph.name or "model",
        [new_input],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        needed_inits,
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.metadata_props.extend(model.metadata_props)
    out.producer_name = model.producer_name
    return fit_ir_version(out)


#: the uint8 image input ``with_image_input`` gives a model.
IMAGE_INPUT = "dffkit_images_uint8"


def with_image_input(model, normalization: str = "imagenet"):
    """``model`` (one image input, NCHW or NHWC, as ``truncate`` leaves it) fed from resized
    uint8 RGB images (N, H, W, 3) instead: Cast, the normalisation of
    ``dffkit.images.normalize`` (the same float32 operations in the same order), and the
    layout change run inside the graph.

    The host then sends a quarter of the bytes (on CUDA, the upload of a float32 batch was a
    large part of a batch's time) and does no float work per pixel.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .images import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    g = _Graph(model)
    inputs = g.data_inputs()
    if len(inputs) != 1:
        raise ValueError(f"the model has {len(inputs)} image inputs {inputs}; one is needed")
    image = next(v for v in model.graph.input if v.name == inputs[0])
    elem = image.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
        raise ValueError(f"the model's input {image.name!r} is not a float tensor (ONNX type {elem})")
    layout = input_layout(model)
    dims = _value_dims(image) or ["N", None, None, None]
    if len(dims) != 4:
        raise ValueError(f"the model's input {image.name!r} has {len(dims)} dimensions, not 4")
    n, h, w = (dims[0], dims[2], dims[3]) if layout == "NCHW" else (dims[0], dims[1], dims[2])
    new_input = helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8, [n, h, w, 3])

    # the layout change first, on the uint8 bytes (a quarter of the traffic of float32); the
    # constants then broadcast over the channel axis of either layout
    prefix = "dffkit_norm_"
    nodes, inits, x = [], [], IMAGE_INPUT
    axis, shape = 3, (3,)
    if layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [x], [prefix + "nchw"], perm=[0, 3, 1, 2], name=prefix + "to_nchw"))
        x, axis, shape = prefix + "nchw", 1, (3, 1, 1)
    nodes.append(helper.make_node("Cast", [x], [prefix + "float"], to=TensorProto.FLOAT, name=prefix + "cast"))
    x = prefix + "float"

    def constant(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, np.float32).reshape(shape), prefix + name))
        return prefix + name

    if normalization == "imagenet":
        scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
        shift = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
        nodes.append(helper.make_node("Mul", [x, constant("scale", scale)], [prefix + "scaled"]))
        nodes.append(helper.make_node("Sub", [prefix + "scaled", constant("shift", shift)], [prefix + "out"]))
        x = prefix + "out"
    elif normalization == "caffe":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), prefix + "bgr"))
        nodes.append(helper.make_node("Gather", [x, prefix + "bgr"], [prefix + "bgr_x"], axis=axis))
        nodes.append(helper.make_node("Sub", [prefix + "bgr_x", constant("mean", CAFFE_MEAN_BGR)], [prefix + "out"]))
        x = prefix + "out"
    elif normalization == "unit":
        nodes.append(helper.make_node("Mul", [x, constant("scale", [np.float32(1.0 / 255.0)] * 3)], [prefix + "out"]))
        x = prefix + "out"
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], [prefix + "typed"], to=elem, name=prefix + "to_input_type"))
        x = prefix + "typed"
    nodes.append(helper.make_node("Identity", [x], [image.name], name=prefix + "into_model"))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept = [v for v in graph.input if v.name != image.name]
    del graph.input[:]
    graph.input.extend([new_input] + kept)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.initializer.extend(inits)
    return fit_ir_version(out)


# --------------------------------------------------------------------------- VGG-16


class _Builder:
    def __init__(self):
        self.nodes = []
        self.initializers = []

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attrs))
        return output

    def graph(self, name: str, input_shape, output: str, output_shape=None):
        from onnx import TensorProto, helper

        return helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
            self.initializers,
        )


def _build_vgg16_random(include_classifier: bool, seed: int, widths=_VGG16_WIDTHS, fc_dims=(4096, 4096, 1000), spatial=7):
    """VGG-16 with He-normal weights (std sqrt(2 / fan_in)) drawn in layer order from
    ``numpy.random.default_rng(seed)``; biases zero. ``widths``/``fc_dims``/``spatial``
    exist so that tests can build a narrow copy of the same graph."""
    rng = np.random.default_rng(seed)
    b = _Builder()
    x, cin = "input", 3
    for block, (count, width) in enumerate(zip(_VGG16_BLOCKS, widths), 1):
        for i in range(1, count + 1):
            w = rng.standard_normal((width, cin, 3, 3), dtype=np.float32) * np.float32(math.sqrt(2.0 / (cin * 9)))
            conv = b.op(
                "Conv",
                [x, b.const(f"conv{block}_{i}.weight", w), b.const(f"conv{block}_{i}.bias", np.zeros(width, np.float32))],
                f"conv{block}_{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
            x = b.op("Relu", [conv], f"relu{block}_{i}")
            cin = width
        x = b.op("MaxPool", [x], f"pool{block}", kernel_shape=[2, 2], strides=[2, 2])
    output = x
    if include_classifier:
        x = b.op("Flatten", [x], "flatten", axis=1)
        fan_in = cin * spatial * spatial
        for j, units in enumerate(fc_dims, 6):
            w = rng.standard_normal((units, fan_in), dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
            x = b.op("Gemm", [x, b.const(f"fc{j}.weight", w), b.const(f"fc{j}.bias", np.zeros(units, np.float32))], f"fc{j}", transB=1)
            if j < 5 + len(fc_dims):
                x = b.op("Relu", [x], f"relu{j}")
            fan_in = units
        output = b.op("Identity", [x], "logits")
    graph = b.graph("vgg16_random", ["N", 3, "H", "W"], output)
    return _make_model(
        graph,
        {
            "model": "vgg16",
            "weights": "random",
            "untrained": "1",
            "init": f"He normal (std sqrt(2/fan_in)), zero bias, numpy default_rng({seed})",
            "seed": seed,
            "normalization": "imagenet",
            "default_layer": "relu5_3",
        },
        doc="VGG-16 with RANDOM, UNTRAINED weights (dffkit, for tests and offline use); "
        "its features do not mean what a trained VGG-16's do.",
    )


def _untrained_warning(what: str = "VGG-16") -> None:
    warnings.warn(
        f"{what} has random, untrained weights: its activations are not those of a trained network "
        "and do not separate objects by meaning (use dffkit.models.vgg16(weights='torchvision') or your own "
        "VGG-16 file, or the 'filterbank' model for colour and texture)",
        UntrainedWeightsWarning,
        stacklevel=3,
    )


def _vgg16_cache_check(expected: Dict[str, str], include_classifier: bool):
    """A ``_cached`` check for a cached VGG-16: its ``dffkit.*`` metadata (the labels a file
    cut short loses first, as they are written last), the 13 convolutions, the output."""
    output = "logits" if include_classifier else "pool5"

    def check(model) -> Optional[str]:
        info = model_info(model)
        for key, value in expected.items():
            if key not in info:
                return f"its metadata lacks dffkit.{key}"
            if value is not None and not info[key].startswith(value):
                return f"its metadata says dffkit.{key} = {info[key]!r}, not {value!r}"
        if not vgg16_layers(model):
            return "it does not have the 13 3x3 convolutions of a VGG-16"
        if [o.name for o in model.graph.output] != [output]:
            return f"its outputs are {[o.name for o in model.graph.output]}, not [{output!r}]"
        return None

    return check


def _looks_like_path(text: str) -> bool:
    """Whether a str that names no file was meant as one: it has a folder separator or ends
    in .onnx."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in text for sep in seps) or text.lower().endswith(".onnx")


def _unknown_weights_message(weights: str) -> str:
    message = (f"weights must be 'random', 'torchvision' or the path of a VGG-16 ONNX file; got {weights!r}, "
               "which is neither a known value nor an existing file")
    if weights.lower() in ("random", "torchvision"):
        message += f"; did you mean {weights.lower()!r}? (values are lower case)"
    elif weights.lower() in ("imagenet", "pretrained", "trained", "default", "imagenet1k_v1"):
        message += "; for ImageNet weights pass weights='torchvision' (exported from torchvision: needs torch and torchvision)"
    return message


def _vgg16(weights, include_classifier: bool, seed: int, cache: Optional[str]):
    if isinstance(weights, str) and weights == "random":
        part = "full" if include_classifier else "conv"
        return _cached(
            f"vgg16-random-{part}-seed{int(seed)}-v{_CACHE_FORMAT}.onnx",
            lambda: _build_vgg16_random(include_classifier, int(seed)),
            cache,
            check=_vgg16_cache_check(
                {"model": "vgg16", "weights": "random", "untrained": "1", "seed": str(int(seed)), "normalization": None},
                include_classifier,
            ),
        )
    if isinstance(weights, str) and weights == "torchvision":
        part = "full" if include_classifier else "conv"
        return _cached(
            f"vgg16-torchvision-{part}-v{_CACHE_FORMAT}.onnx",
            lambda: export_vgg16_torchvision(include_classifier=include_classifier),
            cache,
            check=_vgg16_cache_check(
                {"model": "vgg16", "weights": "torchvision", "untrained": None, "normalization": None, "exporter": None},
                include_classifier,
            ),
            rebuild_if_invalid=False,
            how_to_rebuild=(
                f"run dffkit.models.vgg16(weights='torchvision'{', include_classifier=True' if include_classifier else ''}) "
                "to export it again (needs torch and torchvision), or use the random VGG-16 (FeatureExtractor('vgg16:random'), "
                "vgg16(weights='random')) or the path of a VGG-16 ONNX file"
            ),
        )
    if isinstance(weights, str) and not os.path.exists(weights) and not _looks_like_path(weights):
        raise ValueError(_unknown_weights_message(weights))
    if isinstance(weights, (str, os.PathLike)):
        model = load_model(weights)
        if not vgg16_layers(model):
            n = sum(1 for n in _convs(_Graph(model)) if _kernel_shape(_Graph(model), n) == (3, 3))
            raise ValueError(f"{os.fspath(weights)} is not a VGG-16: it has {n} 3x3 convolutions, VGG-16 has 13 "
                             "(any ONNX network can be used through FeatureExtractor(path, layer=...))")
        if include_classifier and not any(n.op_type in ("Gemm", "MatMul") for n in model.graph.node):
            raise ValueError(f"{os.fspath(weights)} has no classifier (no Gemm/MatMul after the convolutions)")
        return model
    raise ValueError(f"weights must be 'random', 'torchvision' or a path to an ONNX file, got {weights!r}")


def vgg16(weights="random", include_classifier: bool = False, seed: int = 0, cache_dir=None):
    """VGG-16 as an ``onnx.ModelProto``.

    Parameters
    ----------
    weights : "random", "torchvision", or a path
        ``"random"``: built with ``onnx.helper``, He-normal weights from ``seed``, zero
        biases; deterministic; stored in the cache folder after the first build. It is
        labelled untrained (``metadata_props`` ``dffkit.untrained = 1``) and an
        ``UntrainedWeightsWarning`` is issued. ``"torchvision"``: ImageNet weights
        (IMAGENET1K_V1) exported from torchvision (needs torch, torchvision and, the
        first time, a network connection), then cached. A path: the user's VGG-16 ONNX
        file (torchvision export, Keras converter, ONNX model zoo).
    include_classifier : bool
        False: the convolutional part (input ``N x 3 x H x W``, any H, W >= 32, output
        ``pool5``). True: also fc6, fc7, fc8 -> 1000 logits (needs 224 x 224 input to run
        the classifier; ``classifier_head`` applies it to concept embeddings in numpy).
    seed : int
        Seed of the random weights.
    cache_dir : path, optional
        Overrides the default folder (``$DFFKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/dffkit``,
        else ``~/.cache/dffkit``: see ``cache_dir``).

    Node and tensor names of the built models are ``conv1_1 ... conv5_3``,
    ``relu1_1 ... relu5_3``, ``pool1 ... pool5`` (and ``fc6, relu6, fc7, relu7, fc8,
    logits``); the extractor finds conv5_3's ReLU by structure in any VGG-16.
    """
    model = _vgg16(weights, include_classifier, seed, cache_dir)
    if is_untrained(model):
        _untrained_warning()
    return model


#: torch.onnx exporters ``export_vgg16_torchvision`` tries, in order: the TorchScript one
#: (``dynamo=False``; deprecated since torch 2.9 but needs nothing more) and the
#: torch.export-based one (``dynamo=True``; needs onnxscript), for a torch without the former.
_TORCH_EXPORTERS = ("torchscript", "dynamo")


def _torch_export_torchscript(torch, module, example, output: str, dynamic_hw: bool):
    import inspect

    import onnx

    dynamic = {"input": {0: "N"}, output: {0: "N"}}
    if dynamic_hw:
        dynamic["input"].update({2: "H", 3: "W"})
        dynamic[output].update({2: "h", 3: "w"})
    kwargs = dict(input_names=["input"], output_names=[output], opset_version=OPSET, dynamic_axes=dynamic, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch >= 2.9 defaults to the dynamo exporter; torch < 2.5 has no argument
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is deprecated: nothing the caller can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), buffer, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def _torch_export_dynamo(torch, module, example, output: str, dynamic_hw: bool):
    import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with its name)

    dim = getattr(torch.export.Dim, "DYNAMIC", None)
    if dim is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.export.Dim.DYNAMIC (torch >= 2.6 has)")
    shapes = ({0: dim, 2: dim, 3: dim} if dynamic_hw else {0: dim},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        program = torch.onnx.export(
            module, (example,), None, input_names=["input"], output_names=[output], opset_version=OPSET,
            dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False,
        )
    model = program.model_proto
    # the exporter names dynamic dims by its symbols (s31, (s16//32)): use the TorchScript names
    names = {0: "N", 2: "H", 3: "W"}
    for value, labels in ((model.graph.input[0], names), (model.graph.output[0], {0: "N", 2: "h", 3: "w"})):
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and axis in labels:
                d.dim_param = labels[axis]
    del model.graph.value_info[:]  # intermediate shapes in the exporter's symbols
    return model


def export_vgg16_torchvision(path=None, include_classifier: bool = False, weights: str = "IMAGENET1K_V1"):
    """Export torchvision's VGG-16 to ONNX (needs torch and torchvision, imported here).

    The graph has input ``input`` (N x 3 x H x W, ImageNet normalisation) and output
    ``pool5`` (N x 512 x H/32 x W/32; H and W dynamic) or, with ``include_classifier``,
    ``logits`` (N x 1000; input 224 x 224), opset 17, the IR version onnxruntime accepts.
    ``weights=None`` exports torchvision's own random initialisation (labelled untrained);
    other weights are downloaded by torchvision once (network needed) into torch's hub
    cache. Written to ``path`` when given; returns the ModelProto.

    The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used where torch
    has it; otherwise the dynamo exporter, which needs onnxscript. Tensor names differ
    between the two (``/features/features.29/Relu_output_0`` or ``relu_12`` for conv5_3's
    ReLU): the extractor finds the layers by structure. ``metadata_props`` ``dffkit.exporter``
    says which one wrote the file.
    """
    try:
        import torch
        import torchvision
    except ImportError as e:
        raise ImportError(
            "exporting VGG-16 from torchvision needs torch and torchvision (pip install torch torchvision); "
            "or pass the path of a VGG-16 ONNX file, or use weights='random'"
        ) from e
    import onnx

    try:
        net = torchvision.models.vgg16(weights=weights).eval()
    except OSError as e:  # urllib's URLError included: no network for the one-time download
        raise OSError(
            f"could not get torchvision's VGG-16 weights {weights!r} ({type(e).__name__}: {e}); torchvision downloads "
            "them once into torch's hub cache ($TORCH_HOME, ~/.cache/torch): with no network, put vgg16-397923af.pth "
            "in its hub/checkpoints folder, or pass the path of a VGG-16 ONNX file, or use weights='random'"
        ) from e
    module = net if include_classifier else net.features
    output = "logits" if include_classifier else "pool5"
    exporters = {"torchscript": _torch_export_torchscript, "dynamo": _torch_export_dynamo}
    errors = []
    model = None
    for name in _TORCH_EXPORTERS:
        try:
            with torch.no_grad():
                model = exporters[name](torch, module, torch.zeros(1, 3, 224, 224), output, not include_classifier)
            break
        except Exception as e:  # noqa: BLE001 - the next exporter may work; all errors are reported
            errors.append((name, e))
    if model is None:
        detail = "; ".join(f"{name} exporter: {type(e).__name__}: {e}" for name, e in errors)
        raise RuntimeError(f"torch.onnx could not export VGG-16 (torch {torch.__version__}): {detail}") from errors[-1][1]
    if [v.name for v in model.graph.input] != ["input"] or [v.name for v in model.graph.output] != [output]:
        raise RuntimeError(
            f"torch.onnx ({name} exporter) wrote inputs {[v.name for v in model.graph.input]} and outputs "
            f"{[v.name for v in model.graph.output]}, not ['input'] and [{output!r}]"
        )
    model = fit_ir_version(model)
    for key, value in {
        "model": "vgg16",
        "weights": f"torchvision {weights}" if weights else "torchvision random init",
        "untrained": "0" if weights else "1",
        "normalization": "imagenet",
        "exporter": f"torch {torch.__version__} {name}, torchvision {torchvision.__version__}",
    }.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"dffkit.{key}", value
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


# --------------------------------------------------------------------------- classifier head


class ClassifierHead:
    """VGG-16's fully connected layers, in numpy, applied to conv5_3 concept embeddings.

    A concept embedding e (512 values, a row of DFF's H) is read as a feature map that
    equals e at every position of conv5_3: pool5 keeps it constant, so flattening gives e
    repeated at each of the 7 x 7 positions and fc6 reduces to
    ``W6_folded = sum over positions of W6``. ``head(E)`` with E of shape (k, 512) returns
    (k, n_classes) logits; ``head(P)`` with pool5 maps (k, 512, 7, 7) applies the unfolded
    fc6. Attributes: ``fc`` = [(W, b), ...] with W of shape (out, in) float32;
    ``channels``; ``positions``; ``order`` ("chw" for torchvision/ONNX-zoo flattening,
    "hwc" for Keras); ``untrained``.
    """

    def __init__(self, fc, channels: int, positions: int, order: str, untrained: bool):
        self.fc = fc
        self.channels = channels
        self.positions = positions
        self.order = order
        self.untrained = untrained
        w6 = fc[0][0].reshape(fc[0][0].shape[0], *((channels, positions) if order == "chw" else (positions, channels)))
        self.fc6_folded = w6.sum(axis=2 if order == "chw" else 1).astype(np.float32)

    @property
    def n_classes(self) -> int:
        return self.fc[-1][0].shape[0]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim == 2:
            if x.shape[1] != self.channels:
                raise ValueError(f"embeddings must have {self.channels} columns, got shape {x.shape}")
            h = x @ self.fc6_folded.T + self.fc[0][1]
        elif x.ndim == 4:
            flat = x.reshape(len(x), -1) if self.order == "chw" else x.transpose(0, 2, 3, 1).reshape(len(x), -1)
            h = flat @ self.fc[0][0].T + self.fc[0][1]
        else:
            raise ValueError(f"expected (k, {self.channels}) embeddings or (k, {self.channels}, h, w) maps, got {x.shape}")
        for w, b in self.fc[1:]:
            h = np.maximum(h, 0.0) @ w.T + b
        return h.astype(np.float32)

    def probabilities(self, x) -> np.ndarray:
        z = self(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def top(self, x, n: int = 5) -> List[List[Tuple[str, float]]]:
        """For each row: the ``n`` most probable (ImageNet label, probability) pairs."""
        p = self.probabilities(x)
        labels = imagenet_classes() if self.n_classes == 1000 else [str(i) for i in range(self.n_classes)]
        order = np.argsort(-p, axis=1)[:, :n]
        return [[(labels[j], float(p[i, j])) for j in row] for i, row in enumerate(order)]


def _fc_layers(g: _Graph):
    """(W (out, in), b) of the Gemm / MatMul(+Add) chain downstream of ``start``."""
    fcs = []
    order = None
    for node in g.nodes:
        if node.op_type == "Gemm":
            w = g.constant(node.input[1])
            if w is None:
                continue
            if _attr(node, "transB", 0):
                w = w.T
            w = w * _attr(node, "alpha", 1.0)
            b = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            b = np.zeros(w.shape[1], np.float32) if b is None else np.broadcast_to(b * _attr(node, "beta", 1.0), (w.shape[1],))
            fcs.append((np.ascontiguousarray(w.T, dtype=np.float32), np.asarray(b, np.float32)))
        elif node.op_type == "MatMul":
            w = g.constant(node.input[1])
            if w is None or w.ndim != 2:
                continue
            b = np.zeros(w.shape[1], np.float32)
            consumers = g.consumers.get(node.output[0], [])
            if len(consumers) == 1 and consumers[0].op_type == "Add":
                other = [i for i in consumers[0].input if i != node.output[0]]
                c = g.constant(other[0]) if other else None
                if c is not None:
                    b = np.broadcast_to(c, (w.shape[1],))
            fcs.append((np.ascontiguousarray(w.T, dtype=np.float32), np.asarray(b, np.float32)))
        else:
            continue
        if order is None:
            # how the first FC's input was flattened: follow its data input back to the 4-D map
            src = g.data_input(node)
            flat = g.producer.get(src)
            while flat is not None and flat.op_type not in ("Flatten", "Reshape"):
                flat = g.producer.get(g.data_input(flat) or "")
            try:
                axis = 1 if flat is None else _channel_axis(g, g.data_input(flat) or "")
            except ValueError:  # the layout before the flattening cannot be told: torchvision's
                axis = 1
            order = "chw" if axis == 1 else "hwc"
    return fcs, order or "chw"


def classifier_head(model) -> ClassifierHead:
    """The fully connected layers of a VGG-16 with classifier, as a numpy ``ClassifierHead``
    that scores conv5_3 concept embeddings (see ``ClassifierHead``). ValueError when the
    model has no classifier."""
    g = _Graph(model)
    layers = vgg16_layers(model)
    if not layers:
        raise ValueError("classifier_head needs a VGG-16 (13 3x3 convolutions)")
    channels = g.constant_shape(g.producer[layers["conv5_3"]].input[1])[0]
    fcs, order = _fc_layers(g)
    if len(fcs) < 1:
        raise ValueError("the model has no classifier (no Gemm/MatMul layers); build it with include_classifier=True")
    in_features = fcs[0][0].shape[1]
    if in_features % channels:
        raise ValueError(f"fc6 takes {in_features} inputs, not a multiple of conv5_3's {channels} channels")
    return ClassifierHead(fcs, channels, in_features // channels, order, is_untrained(model))


@functools.lru_cache(maxsize=2)
def _imagenet_table() -> Tuple[Tuple[int, str, Tuple[str, ...]], ...]:
    text = (Path(__file__).parent / "data" / "imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        index, wnid, names = line.split("\t")
        rows.append((int(index), wnid, tuple(n.strip() for n in names.split(","))))
    return tuple(rows)


def imagenet_classes(detail: bool = False):
    """The 1000 ILSVRC-2012 classes in the standard index order.

    ``detail=False``: a list of the short labels (first WordNet lemma, e.g. "tench").
    ``detail=True``: a list of (index, wnid, (all names...)).
    """
    table = _imagenet_table()
    return list(table) if detail else [names[0] for _, _, names in table]


# --------------------------------------------------------------------------- filter bank


def _gabor(wavelength: float, theta: float, phase: float, sigma_per_wavelength: float, aspect: float) -> np.ndarray:
    sigma = sigma_per_wavelength * wavelength
    half = int(math.ceil(2.5 * sigma))
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    envelope = np.exp(-(xr**2 + (aspect * yr) ** 2) / (2 * sigma**2))
    carrier = np.cos(2 * math.pi * xr / wavelength + phase)
    g = envelope * carrier
    g -= envelope * (g.sum() / envelope.sum())  # no response to flat regions
    return g / np.abs(g).sum()  # unit L1 norm: a response never exceeds the input's range


def filterbank_channels(orientations: int = 4, scales: int = 3, base_wavelength: float = 4.0) -> List[str]:
    """Names of the filter bank's output channels, in order."""
    names = []
    for s in range(scales):
        lam = base_wavelength * 2**s
        filters = [f"l{lam:g}_o{round(180.0 * o / orientations)}_{phase}" for o in range(orientations) for phase in ("even", "odd")]
        names += [f"gabor_{f}+" for f in filters] + [f"gabor_{f}-" for f in filters]
    names += ["light", "red", "yellow", "dark", "green", "blue", "flat"]
    return names


def _build_filterbank(orientations, scales, base_wavelength, pool, stride, texture_periods, texture_weight, colour_weight, flat_energy, flat_weight):
    from .images import IMAGENET_MEAN, IMAGENET_STD

    if stride % 2 ** (scales - 1) or pool % 2 ** (scales - 1) or (pool - stride) % 2:
        raise ValueError(f"pool ({pool}) and stride ({stride}) must be divisible by 2**(scales-1) = {2 ** (scales - 1)}, pool - stride even")
    b = _Builder()
    # normalised RGB -> rgb in 0..1 -> opponent channels, as one 1x1 convolution
    to_rgb = np.diag(IMAGENET_STD).astype(np.float64)  # rgb = std * x + mean
    opponent = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])
    w = opponent @ to_rgb
    bias = opponent @ IMAGENET_MEAN.astype(np.float64) - np.array([0.5, 0.0, 0.0])  # luminance centred on mid-grey
    opp = b.op("Conv", ["input", b.const("opponent.weight", w.reshape(3, 3, 1, 1).astype(np.float32)), b.const("opponent.bias", bias.astype(np.float32))], "opponent")
    lum = b.op("Slice", [opp, b.const("lum.start", np.array([0], np.int64)), b.const("lum.end", np.array([1], np.int64)), b.const("lum.axis", np.array([1], np.int64))], "luminance")

    kernels = [
        _gabor(base_wavelength, math.pi * o / orientations, phase, 0.56, 1.0)
        for o in range(orientations)
        for phase in (0.0, -math.pi / 2)
    ]
    bank = np.stack(kernels)[:, None].astype(np.float32)  # (2 * orientations, 1, k, k)
    half = bank.shape[-1] // 2
    b.const("gabor.weight", bank)
    b.const("gabor.pads", np.array([0, 0, half, half, 0, 0, half, half], np.int64))

    def halfwave(x, name):
        """[ReLU(x), ReLU(-x)] along the channels."""
        minus = b.op("Neg", [x], f"{name}_neg")
        return b.op("Concat", [b.op("Relu", [x], f"{name}_pos"), b.op("Relu", [minus], f"{name}_negrelu")], f"{name}_halfwave", axis=1)

    def pooled(x, level, window, name):
        factor = 2**level
        k, s = window // factor, stride // factor
        k += (k - s) % 2  # output size floor(H / stride) needs an even k - s
        p = (k - s) // 2
        return b.op("AveragePool", [x], name, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], count_include_pad=0)

    branches = []
    level_input = lum
    for level in range(scales):
        if level:
            level_input = b.op("AveragePool", [level_input], f"luminance_half{level}", kernel_shape=[2, 2], strides=[2, 2])
        # edge padding: zero padding would draw an edge around every image whose border is not mid-grey
        padded = b.op("Pad", [level_input, "gabor.pads"], f"luminance_padded{level}", mode="edge")
        resp = b.op("Conv", [padded, "gabor.weight"], f"gabor{level}")
        flat = halfwave(resp, f"gabor{level}")
        window = max(pool, int(math.ceil(texture_periods * base_wavelength * 2**level)))
        branches.append(pooled(flat, level, window, f"texture{level}"))
    texture = b.op("Concat", branches, "texture", axis=1)
    # "flat": 1 where the local texture energy is 0, falling to 0 at flat_energy
    energy = b.op("ReduceSum", [texture, b.const("energy.axes", np.array([1], np.int64))], "texture_energy", keepdims=1)
    flat = b.op("Relu", [b.op("Sub", [b.const("one", np.float32(1.0)), b.op("Mul", [energy, b.const("energy.scale", np.float32(1.0 / flat_energy))], "energy_scaled")], "flatness_linear")], "flatness")
    flat = b.op("Mul", [flat, b.const("flat.weight", np.float32(flat_weight))], "flat_weighted")
    texture = b.op("Mul", [texture, b.const("texture.weight", np.float32(texture_weight))], "texture_weighted")
    colour = halfwave(opp, "opponent")
    colour = b.op("Mul", [pooled(colour, 0, pool, "colour"), b.const("colour.weight", np.float32(colour_weight))], "colour_weighted")
    b.op("Concat", [texture, colour, flat], "features", axis=1)
    channels = len(filterbank_channels(orientations, scales, base_wavelength))
    graph = b.graph("filterbank", ["N", 3, "H", "W"], "features", ["N", channels, "h", "w"])
    return _make_model(
        graph,
        {
            "model": "filterbank",
            "weights": "formula (Gabor + colour opponent), no learned weights",
            "untrained": "0",
            "normalization": "imagenet",
            "channels": ",".join(filterbank_channels(orientations, scales, base_wavelength)),
        },
        doc="dffkit colour-and-texture filter bank: Gabor energy at several scales and orientations on "
        "luminance, colour-opponent channels, half-wave rectified, average-pooled. Not a trained network.",
    )


def filterbank(
    orientations: int = 4,
    scales: int = 3,
    base_wavelength: float = 4.0,
    pool: int = 16,
    stride: int = 8,
    texture_periods: float = 2.0,
    texture_weight: float = 2.0,
    colour_weight: float = 1.0,
    flat_energy: float = 0.2,
    flat_weight: float = 0.15,
):
    """A colour-and-texture network defined by formulas (no learned weights), as ONNX.

    From an ImageNet-normalised (N, 3, H, W) image of any size (H, W >= ``stride``) it
    computes, in this channel order (``filterbank_channels()`` names them):

    - texture, ``scales * orientations * 4`` channels (48 at the defaults): Gabor filters
      on luminance, even and odd phase, ``orientations`` orientations, envelope sigma =
      0.56 wavelength (one octave), zero mean, unit L1 norm, at wavelengths
      ``base_wavelength * 2**s`` px (4, 8, 16: the same kernels on a 2x-downsampled
      luminance pyramid); each response half-wave rectified (ReLU of + and -), then
      average-pooled over a window of ``max(pool, texture_periods * wavelength)`` px
      (local energy over at least two periods), times ``texture_weight``;
    - colour, 6 channels: light/dark (luminance - 0.5), red/green (R - G),
      yellow/blue ((R + G) / 2 - B), half-wave rectified, pooled over ``pool`` px, times
      ``colour_weight``;
    - flatness, 1 channel: ``flat_weight * max(0, 1 - E / flat_energy)`` with E the local
      texture energy (sum of the texture channels): the only channel that is high where
      a region is uniform, so that NMF can tell a flat region from a textured one of the
      same colour (without it, "flat" is a sub-pattern of "textured" and the
      factorization is ambiguous).

    Pooling has stride ``stride``: the output is (N, C, H // stride, W // stride), C = 55
    at the defaults. Channel scales: colour channels lie in 0..1 (0..0.5 for light/dark),
    a texture channel of a high-contrast pattern reaches about 0.1 to 0.2 before weighting.

    What it is: a fixed, explainable feature map under which NMF separates regions that
    differ in colour, in texture orientation or scale, or flat against textured (on
    synthetic object-on-background images DFF with k = 2 reaches a mean IoU above 0.9;
    tests/test_models.py measures it). What it is not: a recogniser. Its "concepts" are
    colour/texture segments (a striped red object on a noisy green background, sky
    against grass), not object parts or classes; two regions of the same colour and a
    similar texture are one concept to it. Texture boundaries are blurred by about
    one coarse wavelength (16 px). It is the offline default where no trained model is at
    hand; with a trained VGG-16, DFF finds semantic parts instead.
    """
    model = _build_filterbank(orientations, scales, base_wavelength, pool, stride, texture_periods, texture_weight, colour_weight, flat_energy, flat_weight)
    return model


# --------------------------------------------------------------------------- float16


def to_float16(model, keep_io_float32: bool = True):
    """A float16 copy of ``model``: float initializers (and Constant nodes) cast to float16,
    float32 casts retargeted; with ``keep_io_float32`` the graph still takes and returns
    float32 through Cast nodes at its boundary. For GPU inference (tensor cores)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    del g.value_info[:]
    if keep_io_float32:
        casts_in, casts_out = [], []
        for v in g.input:
            if v.type.tensor_type.elem_type == TensorProto.FLOAT and v.name not in {t.name for t in g.initializer}:
                inner = v.name + "_fp16"
                for node in g.node:
                    for i, name in enumerate(node.input):
                        if name == v.name:
                            node.input[i] = inner
                casts_in.append(helper.make_node("Cast", [v.name], [inner], to=TensorProto.FLOAT16, name=inner))
        for v in g.output:
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                inner = v.name + "_fp16"
                for node in g.node:
                    for i, name in enumerate(node.output):
                        if name == v.name:
                            node.output[i] = inner
                    for i, name in enumerate(node.input):
                        if name == v.name:
                            node.input[i] = inner
                casts_out.append(helper.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT, name=v.name + "_fp32"))
        nodes = casts_in + list(g.node) + casts_out
        del g.node[:]
        g.node.extend(nodes)
    else:
        for v in list(g.input) + list(g.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = TensorProto.FLOAT16
    entry = m.metadata_props.add()
    entry.key, entry.value = "dffkit.precision", "fp16"
    return fit_ir_version(m)


