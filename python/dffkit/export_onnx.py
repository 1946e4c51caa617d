"""Export learned parts as a feed-forward ONNX model: image -> part maps and code.

The graph is the CNN up to the chosen layer followed by a fixed number of multiplicative
updates of W with the parts H fixed, written with plain ONNX operators (MatMul, Mul, Div,
Add, Sub, Max, Sqrt, ReduceSum, ReduceMean, Equal, Where, ArgMax, and Transpose, Reshape,
Shape, Slice, Concat, ConstantOfShape for the layout), so that onnxruntime alone
maps images to what ``transform`` computes. By default its input is the one of a
``FeatureExtractor``'s session: resized uint8 RGB images (N, H, W, 3), cast and normalised
inside the graph (``dffkit.models.with_image_input``), so a caller only resizes the images
(``FeatureExtractor.resize_images``) and feeds the pixels. For each image of the batch,
separately (one group per image, so an image's result does not depend on the rest of the
batch)::

    X   = activations (C, h, w) -> (h*w, C)              rows: positions, row-major
    W_0 = sqrt(mean(X) / k)  everywhere                    (scikit-learn's transform start)
    W  <- W * (X H^T) / den,  den = W (H H^T) + lam * W / max(Nrm, tiny),  den == 0 -> eps
         Nrm[j] = ||W[:, j]||_2 of the previous W; repeated n_iter times
    part_maps = W as (k, h, w);  code[j] = ||W[:, j]||_2

tiny is float32's smallest normal number and eps float32's machine epsilon, the engine's
guards. With ``centers`` (k-means centres in normalised-code space, as in a
``ClusteringResult``) the graph also outputs each image's cluster (nearest centre).
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["export_parts_model", "parts_graph_outputs"]

IR_VERSION = 9
OPSET = 17
_EPS = float(np.finfo(np.float32).eps)
_TINY = float(np.finfo(np.float32).tiny)
#: output names of the exported graph
parts_graph_outputs = ("part_maps", "code")


def _resolve_parts(parts, lam):
    """(H float32 (k, C), lam, centers) from an array, a GroupSparseNMF or a ClusteringResult."""
    centers = None
    if hasattr(parts, "components_"):  # a fitted GroupSparseNMF
        H = parts.components_
        lam = float(parts.lam) if lam is None else lam
    elif hasattr(parts, "parts") and hasattr(parts, "labels"):  # a ClusteringResult
        if parts.parts is None:
            raise ValueError("this ClusteringResult has no parts (method='kmeans'); use method='fcn'")
        H = parts.parts
        lam = float(parts.lam) if lam is None else lam
        if parts.assign == "kmeans":
            centers = parts.centers
    else:
        H = parts
    H = np.asarray(H)
    if H.ndim != 2 or 0 in H.shape:
        raise ValueError(f"parts H must be a non-empty 2-D array (n_parts, C), got shape {H.shape}")
    if not np.isfinite(H).all() or H.min() < 0:
        raise ValueError("parts H must be finite and non-negative")
    lam = 0.0 if lam is None else float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return H.astype(np.float32), lam, centers


_INPUTS = ("uint8", "float")


def _cnn_graph(extractor_or_model, layer, n_channels, input, normalization):
    """(ModelProto whose one output is the activations (N, C, h, w) float32, its output name,
    a description of its input for the metadata).

    Raises ValueError when the layer's channel count (by shape inference) is not
    ``n_channels``, the C of the parts."""
    import onnx
    from onnx import TensorProto, helper

    if extractor_or_model is None:  # the graph starts at the activations
        if input is not None or normalization is not None:
            raise ValueError(
                "input and normalization apply to a network: with extractor_or_model=None the "
                "graph's input is the activations (N, C, h, w); leave them out"
            )
        graph = helper.make_graph(
            [helper.make_node("Identity", ["activations"], ["dffkit_activations"])], "parts",
            [helper.make_tensor_value_info("activations", TensorProto.FLOAT,
                                           ["N", int(n_channels), None, None])],
            [helper.make_tensor_value_info("dffkit_activations", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model, "dffkit_activations", "activations"
    from dffkit import models

    if input == "float" and normalization is not None:
        raise ValueError(
            "normalization applies to input='uint8' (the graph normalises the pixels); with "
            "input='float' the images come normalised: leave normalization out"
        )
    obj = extractor_or_model
    channel_axis, probe_hw, what = None, None, "the network"
    if not isinstance(obj, (onnx.ModelProto, str, bytes, bytearray, os.PathLike)):
        # a FeatureExtractor: its model, layer, normalisation and image size
        model = getattr(obj, "model_proto", None) or getattr(obj, "model", None)
        if layer is None:
            layer = getattr(obj, "layer_name", None) or getattr(obj, "layer", None)
        if model is None:
            raise TypeError(
                "extractor_or_model must be a FeatureExtractor, an onnx.ModelProto, a path to an "
                f".onnx file or None, got {type(obj).__name__}"
            )
        if normalization is None and input != "float":
            normalization = getattr(obj, "normalization", None)
        channel_axis = getattr(obj, "channel_axis", None)
        size = getattr(obj, "image_size", None)
        probe_hw = size if isinstance(size, tuple) else None
        what = "the extractor"
        obj = model
    model = models.load_model(obj)
    name = models.resolve_layer(model, layer)
    cut = models.truncate(model, name, channel_axis=channel_axis)
    channels = _layer_channels(models, cut, probe_hw)
    if channels is not None and channels != n_channels:
        raise ValueError(
            f"the parts have {n_channels} channels but layer {name!r} of {what} has {channels}: "
            "export the parts with the network and layer they were learned on (or parts "
            f"learned on this layer's {channels}-channel activations)"
        )
    if input == "float":
        return cut, cut.graph.output[0].name, "float"
    if normalization is None:
        normalization = models.model_info(model).get("normalization", "imagenet")
    # as FeatureExtractor builds its session: an NHWC network keeps its own input layout
    source = models.image_input(model, name)
    native = cut if models.input_layout(model, source) == "NCHW" else models.truncate(
        model, name, nchw_input=False, channel_axis=channel_axis)
    fed = models.with_image_input(native, normalization)
    return fed, fed.graph.output[0].name, f"uint8 {normalization}"


def _layer_channels(models, cut, probe_hw):
    """C of the truncated network's output (N, C, h, w) by shape inference, or None."""
    out = cut.graph.output[0].name
    for hw in ((probe_hw, None) if probe_hw is not None else (None,)):
        try:
            shape = models.tensor_shapes(cut, hw).get(out, (0, None))[1]
        except Exception:  # shape inference cannot tell: onnxruntime will
            shape = None
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
            return int(shape[1])
    return None


def _opset_of(model):
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return OPSET


def export_parts_model(extractor_or_model, parts, n_iter, path=None, *, lam=None, layer=None,
                       centers=None, input=None, normalization=None):
    """Write (and return) an ONNX model mapping images to part maps and codes.

    Parameters
    ----------
    extractor_or_model : a ``dffkit.FeatureExtractor``, an ONNX model (``onnx.ModelProto``,
        path or bytes), or None. With a network, the graph's input is (``input``):
        ``"uint8"`` (the default) resized uint8 RGB images (N, H, W, 3), named
        ``dffkit_images_uint8``, normalised inside the graph exactly as the extractor's own
        session does (``FeatureExtractor.resize_images`` makes such a batch; H, W as the
        extractor's ``image_size``); ``"float"`` the network's float32 input (N, 3, H, W),
        already resized and normalised (``FeatureExtractor.preprocess``). With None the input
        is the activations themselves, "activations" (N, C, h, w), and ``input`` and
        ``normalization`` must be left out.
    parts : H (k, C), or a fitted ``GroupSparseNMF``, or a ``ClusteringResult`` (method
        "fcn"; then lam and, for assign="kmeans", the cluster centres come with it).
    n_iter : int >= 1, the number of W updates (unrolled in the graph).
    path : where to save the model (None: only return it).
    lam : the group penalty of the W updates (default: the one of ``parts``, else 0).
    layer : the layer of the network (default: the extractor's layer, else the model's
        default layer).
    centers : (n_clusters, k) k-means centres in normalised-code space: adds output "cluster".
    input : "uint8" (default) or "float", the network's input (above).
    normalization : with input="uint8": "imagenet", "caffe", "unit" or "none" (default: the
        extractor's, else the model's ``dffkit.normalization`` metadata, else "imagenet").

    The parts' channel count (C of H) must be the layer's (ValueError naming both
    otherwise, where shape inference gives the layer's channels).

    Returns
    -------
    onnx.ModelProto with outputs "part_maps" (N, k, h, w), "code" (N, k) [, "cluster" (N,)],
    the IR version the higher of 9 and the network's (lowered to what the installed
    onnxruntime loads, ``dffkit.models.max_ir_version()``) and the network's opset (17 for
    graphs built here).

    Its outputs agree with ``group_sparse_nmf(X_i, {"offsets": [0, h*w]}, k, H=H,
    update_H=False, lam=lam, max_iter=n_iter, tol=0)`` for each image's activations X_i
    (``dffkit.clustering.transform_codes``), to float32 rounding; with input="uint8" the
    activations are those the extractor computes from the same uint8 pixels.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H, lam, auto_centers = _resolve_parts(parts, lam)
    if centers is None:
        centers = auto_centers
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    if input is not None and (not isinstance(input, str) or input not in _INPUTS):
        raise ValueError(f"input must be 'uint8' (images, the default) or 'float' (normalised "
                         f"tensors), got {input!r}")
    k, C = H.shape
    model, act, fed = _cnn_graph(extractor_or_model, layer, C, input, normalization)
    opset = _opset_of(model)
    if opset < 13:
        raise ValueError(
            f"the network uses opset {opset}; convert it first with "
            "onnx.version_converter.convert_version(model, 17)"
        )

    nodes, inits = [], []
    counter = [0]

    def const(name, array):
        t = numpy_helper.from_array(np.asarray(array), f"dffkit_parts_{name}")
        inits.append(t)
        return t.name

    def op(op_type, inputs, **attrs):
        counter[0] += 1
        out = f"dffkit_parts_{op_type.lower()}_{counter[0]}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def reduce(op_type, x, axes, keepdims):
        # axes became an input of ReduceSum at opset 13 and of the other reductions at 18
        if op_type == "ReduceSum" or opset >= 18:
            return op(op_type, [x, const(f"axes_{op_type}_{counter[0]}", np.asarray(axes, np.int64))],
                      keepdims=keepdims)
        return op(op_type, [x], axes=list(axes), keepdims=keepdims)

    Ht = const("Ht", H.T.copy())                          # (C, k)
    HHt = const("HHt", (H.astype(np.float64) @ H.T.astype(np.float64)).astype(np.float32))
    zero = const("zero", np.float32(0.0))
    eps = const("eps", np.float32(_EPS))
    if lam > 0:
        tiny = const("tiny", np.float32(_TINY))
        lam_c = const("lam", np.float32(lam))

    xt = op("Transpose", [act], perm=[0, 2, 3, 1])        # (N, h, w, C)
    X = op("Reshape", [xt, const("shape_X", np.asarray([0, -1, C], np.int64))])  # (N, hw, C)
    mean = reduce("ReduceMean", X, [1, 2], 1)             # (N, 1, 1)
    w0 = op("Sqrt", [op("Div", [mean, const("k", np.float32(k))])])
    nhw = op("Slice", [op("Shape", [X]), const("s0", np.asarray([0], np.int64)),
                       const("s2", np.asarray([2], np.int64))])
    shape_W = op("Concat", [nhw, const("kk", np.asarray([k], np.int64))], axis=0)
    ones = op("ConstantOfShape", [shape_W],
              value=numpy_helper.from_array(np.asarray([1.0], np.float32)))
    W = op("Mul", [ones, w0])                             # (N, hw, k)
    XHt = op("MatMul", [X, Ht])                           # (N, hw, k)

    def norms(Wx, keepdims):
        return op("Sqrt", [reduce("ReduceSum", op("Mul", [Wx, Wx]), [1], keepdims)])

    for _ in range(int(n_iter)):
        den = op("MatMul", [W, HHt])
        if lam > 0:
            nrm = norms(W, 1)                             # (N, 1, k)
            den = op("Add", [den, op("Div", [op("Mul", [W, lam_c]), op("Max", [nrm, tiny])])])
        den = op("Where", [op("Equal", [den, zero]), eps, den])
        W = op("Mul", [W, op("Div", [XHt, den])])

    nhw3 = op("Slice", [op("Shape", [xt]), const("t0", np.asarray([0], np.int64)),
                        const("t3", np.asarray([3], np.int64))])
    maps = op("Reshape", [W, op("Concat", [nhw3, const("kk2", np.asarray([k], np.int64))], axis=0)])
    nodes.append(helper.make_node("Transpose", [maps], ["part_maps"], perm=[0, 3, 1, 2]))
    code = norms(W, 0)
    nodes.append(helper.make_node("Identity", [code], ["code"]))
    outputs = [helper.make_tensor_value_info("part_maps", TensorProto.FLOAT, ["N", k, None, None]),
               helper.make_tensor_value_info("code", TensorProto.FLOAT, ["N", k])]
    if centers is not None:
        Cc = np.asarray(centers, dtype=np.float64)
        if Cc.ndim != 2 or Cc.shape[1] != k:
            raise ValueError(f"centers must have shape (n_clusters, {k}), got {Cc.shape}")
        # nearest centre of the L2-normalised code: argmax_c (2 x.c - ||c||^2)
        nrm = op("Sqrt", [reduce("ReduceSum", op("Mul", [code, code]), [1], 1)])
        safe = op("Where", [op("Equal", [nrm, zero]), const("one", np.float32(1.0)), nrm])
        xn = op("Div", [code, safe])
        score = op("Sub", [op("MatMul", [xn, const("Ct2", (2.0 * Cc.T).astype(np.float32))]),
                           const("Csq", (Cc * Cc).sum(1).astype(np.float32))])
        nodes.append(helper.make_node("ArgMax", [score], ["cluster"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("cluster", TensorProto.INT64, ["N"]))

    g = model.graph
    graph = helper.make_graph(list(g.node) + nodes, "dffkit_parts", list(g.input), outputs,
                              list(g.initializer) + inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="dffkit")
    out.ir_version = max(IR_VERSION, int(model.ir_version))
    try:  # never above what the installed onnxruntime loads
        from dffkit.models import fit_ir_version

        fit_ir_version(out)
    except ImportError:  # pragma: no cover
        pass
    out.doc_string = (f"dffkit parts model: {k} parts, {int(n_iter)} multiplicative updates of W "
                      f"with H fixed, lam={lam!r}")
    for key, value in [("n_parts", k), ("n_iter", int(n_iter)), ("lam", repr(lam)),
                       ("input", fed)]:
        entry = out.metadata_props.add()
        entry.key, entry.value = f"dffkit.parts.{key}", str(value)
    for p in model.metadata_props:
        out.metadata_props.add().CopyFrom(p)
    onnx.checker.check_model(out)
    if path is not None:
        onnx.save(out, os.fspath(path))
    return out
