"""CNN activations through onnxruntime: any layer of any ONNX model, VGG-16 by default.

``FeatureExtractor(model, layer)`` cuts the model down to the named tensor (the graph keeps
only the nodes that tensor needs, and the tensor becomes its output), opens one
onnxruntime session on it, and turns images into activations (N, C, h, w) float32::

    fx = FeatureExtractor("vgg16")              # conv5_3 after ReLU
    acts = fx(["a.jpg", "b.png"])               # numpy (2, 512, 14, 14)
    fx.last_sizes                               # [(H, W) of a.jpg, of b.png]

The session takes the resized uint8 pixels and normalises them inside the graph (Pillow
resizes on the host; a GPU receives a quarter of the bytes of float32).

On the CUDA provider, ``fx(images, device_output=True)`` leaves the activations in GPU
memory (onnxruntime I/O binding) and returns a ``DeviceActivations`` that exposes them
through ``__cuda_array_interface__`` and ``__dlpack__`` without a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import models as _models
from .images import (
    _check_workers,
    _different_sizes_advice,
    as_image_list,
    image_sizes,
    load_image,
    load_images,
    normalize,
    preprocess,
    resize_batch,
    resized_batches,
    resized_size,
    stack_resized,
)

__all__ = [
    "FeatureExtractor",
    "DeviceActivations",
    "load_images",
    "load_image",
    "preprocess",
    "image_sizes",
    "cuda_available",
    "MODEL_NAMES",
]

#: names ``FeatureExtractor`` accepts in place of a model file.
MODEL_NAMES = ("vgg16", "vgg16:random", "vgg16:torchvision", "filterbank")
_FLOAT_TYPES = (0, 1, 10, 11, 16)  # unknown, float, float16, double, bfloat16


# --------------------------------------------------------------------------- providers


def _cuda_device_status() -> Tuple[bool, str]:
    """(usable, reason): the CUDA provider is in this onnxruntime and a device answers."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDA provider (install onnxruntime-gpu, not onnxruntime)"
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return False, "no NVIDIA driver (libcuda) found"
    rc = lib.cuInit(0)
    if rc != 0:
        return False, f"the CUDA driver failed to initialise (cuInit error {rc})"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return False, "no CUDA device visible"
    return True, f"{count.value} CUDA device(s)"


def cuda_available() -> bool:
    """True when onnxruntime's CUDA provider is installed and a CUDA device is visible
    (whether its libraries load is known only once a session is made)."""
    return _cuda_device_status()[0]


_PRELOAD_LOG: Optional[str] = None


def _preload_cuda_libraries() -> str:
    """``onnxruntime.preload_dlls()`` once per process (it finds the CUDA and cuDNN
    libraries of the nvidia-* wheels); what it printed is kept for error messages."""
    global _PRELOAD_LOG
    if _PRELOAD_LOG is None:
        import onnxruntime as ort

        buffer = io.StringIO()
        if hasattr(ort, "preload_dlls"):
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                try:
                    ort.preload_dlls()
                except Exception as e:  # a failed preload is not fatal: system libraries may do
                    print(f"preload_dlls failed: {e}")
        _PRELOAD_LOG = buffer.getvalue().strip()
    return _PRELOAD_LOG


def _parse_providers(providers) -> Tuple[str, int]:
    if isinstance(providers, str):
        kind, _, device = providers.lower().partition(":")
        if kind in ("auto", "cpu", "cuda") and (not device or (kind == "cuda" and device.isdigit())):
            return kind, int(device or 0)
    raise ValueError(f"providers must be 'auto', 'cpu', 'cuda' or 'cuda:<device>', or a list of onnxruntime providers; got {providers!r}")


def _provider_names(providers) -> List[str]:
    """The names in a list of onnxruntime providers (each a name or a (name, options dict)
    pair); ValueError for anything else, or for a name onnxruntime does not know (listing
    the providers this onnxruntime has)."""
    import onnxruntime as ort

    names = []
    for entry in providers:
        name = entry[0] if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict) else entry
        if not isinstance(name, str):
            raise ValueError(
                "providers: a list of onnxruntime provider names or (name, options dict) pairs, e.g. "
                f"['CUDAExecutionProvider', 'CPUExecutionProvider']; got the entry {entry!r}"
            )
        names.append(name)
    if not names:
        raise ValueError("providers is an empty list: name at least one, e.g. ['CPUExecutionProvider'], or pass 'auto'")
    available = ort.get_available_providers()
    known = set(ort.get_all_providers()) | set(available)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"providers: unknown onnxruntime provider{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)}; this onnxruntime has {available} "
            "(or pass providers='auto', 'cpu' or 'cuda')"
        )
    return names


def _session_from_list(ort, model_bytes: bytes, options, providers):
    """A session on the caller's list of providers, and its device id. Every provider named
    must run it: RuntimeError naming the one the session did not get and why, never a
    silent fallback to the CPU."""
    names = _provider_names(providers)
    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            why = ("install onnxruntime-gpu, not onnxruntime" if name == "CUDAExecutionProvider"
                   else "install an onnxruntime package built with it")
            raise RuntimeError(
                f"providers={list(providers)!r} asks for {name}, which this onnxruntime does not have "
                f"(it has {available}): {why}, or leave {name} out"
            )
    log = ""
    if "CUDAExecutionProvider" in names:
        usable, reason = _cuda_device_status()
        if not usable:
            raise RuntimeError(f"providers={list(providers)!r} asks for CUDAExecutionProvider but {reason}")
        log = _preload_cuda_libraries()
    session = ort.InferenceSession(model_bytes, options, providers=list(providers))
    got = session.get_providers()
    missing = [n for n in names if n not in got]
    if missing:
        reason = (f"onnxruntime could not start {', '.join(missing)} (its libraries missing or of the wrong version?) "
                  f"and would run on {got}")
        if log:
            reason += f"; preload_dlls said: {log}"
        raise RuntimeError(f"providers={list(providers)!r}: {reason}; fix the installation or leave "
                           f"{', '.join(missing)} out")
    device_id = 0
    for entry in providers:
        if isinstance(entry, tuple) and entry[0] == "CUDAExecutionProvider":
            device_id = int(entry[1].get("device_id", 0))
    return session, device_id


#: session config entries set unless the caller overrides them. Spinning worker threads
#: keep the cores busy between runs: on a 2-core machine that slowed onnxruntime's own
#: next run and whatever ran next (the NMF) more than it saved.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


# onnxruntime CUDA provider options dffkit sets unless the caller gives them: NHWC convolutions
# (cuDNN's tensor-core kernels want channels last; measured on the H200 with VGG-16 to conv5_3,
# benchmarks/results/features_cuda_h200.md). provider_options={"prefer_nhwc": 0} turns it off.
CUDA_PROVIDER_DEFAULTS = {"prefer_nhwc": "1"}


def _make_session(model_bytes: bytes, providers, num_threads: Optional[int], provider_options=None, session_config=None):
    """An onnxruntime session and the device id it runs on; never a silent CPU fallback
    when CUDA was asked for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in {**SESSION_CONFIG, **(session_config or {})}.items():
        options.add_session_config_entry(key, str(value))
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
            raise TypeError(f"num_threads must be an int >= 0 or None (None or 0: onnxruntime's "
                            f"default), got {type(num_threads).__name__} {num_threads!r}")
        if num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0 or None (None or 0: onnxruntime's "
                             f"default), got {num_threads!r}")
        options.intra_op_num_threads = int(num_threads)
    if isinstance(providers, (list, tuple)):
        return _session_from_list(ort, model_bytes, options, providers)
    kind, device_id = _parse_providers(providers)
    if kind in ("auto", "cuda"):
        usable, reason = _cuda_device_status()
        if usable:
            log = _preload_cuda_libraries()
            cuda_options = {"device_id": device_id, **CUDA_PROVIDER_DEFAULTS,
                            **{k: str(v) for k, v in (provider_options or {}).items()}}
            session = ort.InferenceSession(
                model_bytes, options, providers=[("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
            )
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return session, device_id
            reason = "onnxruntime could not start its CUDA provider (CUDA or cuDNN libraries missing or of the wrong version?)"
            if log:
                reason += f"; preload_dlls said: {log}"
            if kind == "cuda":
                raise RuntimeError(f"providers='cuda' but {reason}")
            warnings.warn(f"dffkit: a CUDA device is present but {reason}; running on the CPU", RuntimeWarning, stacklevel=3)
            return session, 0
        if kind == "cuda":
            raise RuntimeError(f"providers='cuda' but {reason}")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]), 0


# --------------------------------------------------------------------------- device output


class DeviceActivations:
    """Activations (N, C, h, w) float32 in the GPU memory of one onnxruntime OrtValue.

    Exposes ``__cuda_array_interface__`` (CuPy, Numba, PyTorch via ``torch.as_tensor``)
    and ``__dlpack__`` / ``__dlpack_device__`` (``torch.from_dlpack``,
    ``cupy.from_dlpack``) without a copy; the memory lives as long as this object (or a
    consumer's DLPack capsule). ``numpy()`` copies to the host. The data is complete when
    the extractor returns (onnxruntime synchronises its stream at the end of a run).
    """

    def __init__(self, ortvalue, shape: Tuple[int, ...], device_id: int):
        self.ortvalue = ortvalue
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.float32)
        self.device_id = device_id

    @property
    def data_ptr(self) -> int:
        return int(self.ortvalue.data_ptr())

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": "<f4",
            "descr": [("", "<f4")],
            "data": (self.data_ptr, False),
            "strides": None,
            "version": 3,
        }

    def __dlpack__(self, *, stream=None, **kwargs):
        if tuple(self.ortvalue.shape()) != self.shape:
            raise BufferError("this buffer is padded to the model's fixed batch size; use __cuda_array_interface__")
        return self.ortvalue.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.ortvalue.__dlpack_device__()

    def numpy(self) -> np.ndarray:
        """A host copy, (N, C, h, w) float32."""
        return np.asarray(self.ortvalue.numpy(), dtype=np.float32)[: self.shape[0]]

    def __array__(self, dtype=None, copy=None):
        out = self.numpy()
        return out if dtype is None else out.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeviceActivations(shape={self.shape}, dtype=float32, device='cuda:{self.device_id}')"


# --------------------------------------------------------------------------- the extractor


def _resolve_model(model, cache_dir=None):
    """(ModelProto, model_name) for a name, a path, bytes or a ModelProto."""
    import onnx

    if isinstance(model, str) and model in MODEL_NAMES:
        if model == "filterbank":
            return _models.filterbank(), "filterbank"
        weights = model.partition(":")[2]
        if not weights:
            torchvision_file = _models.cache_dir(cache_dir) / f"vgg16-torchvision-conv-v{_models._CACHE_FORMAT}.onnx"
            weights = "torchvision" if torchvision_file.is_file() else "random"
        return _models._vgg16(weights, False, 0, cache_dir), "vgg16"
    if isinstance(model, onnx.ModelProto):
        return _models.load_model(model), _models.model_info(model).get("model") or model.graph.name or "model"
    if isinstance(model, (bytes, bytearray)):
        proto = _models.load_model(model)
        return proto, _models.model_info(proto).get("model") or proto.graph.name or "model"
    if isinstance(model, str) and not os.path.exists(model):
        raise FileNotFoundError(_unknown_model_message(model))
    if isinstance(model, (str, os.PathLike)):
        proto = _models.load_model(model)
        return proto, os.path.splitext(os.path.basename(os.fspath(model)))[0]
    raise TypeError(f"model must be one of {MODEL_NAMES}, a path to an ONNX file or an onnx.ModelProto; got {type(model).__name__}")


def _unknown_model_message(name: str) -> str:
    """For a model str that is neither a file nor a built-in name: both, and the names."""
    import difflib

    names = ", ".join(repr(n) for n in MODEL_NAMES)
    message = f"no such model file: {name} (and {name!r} is not a built-in model name; the built-in names are {names})"
    lower = [n for n in MODEL_NAMES if n == name.lower()]
    close = lower or difflib.get_close_matches(name.lower(), MODEL_NAMES, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?" + (" (names are lower case)" if lower else "")
    return message


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_image_size(image_size, resize: str):
    """``image_size`` as None, an int or an (height, width) tuple of ints; ValueError for
    anything else, naming the parameter and what it takes."""
    if image_size is None:
        return None
    if _is_int(image_size):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        return int(image_size)
    if resize == "shorter":
        raise ValueError(f"resize='shorter' needs an int image_size (the shorter side), got {image_size!r}")
    try:
        pair = tuple(image_size)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise ValueError(
            "image_size must be an int (square images, or the shorter side with resize='shorter'), "
            f"a (height, width) pair of ints, or None (each image's own size); got {image_size!r}"
        )
    if min(pair) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return int(pair[0]), int(pair[1])


class FeatureExtractor:
    """Activations of one layer of an ONNX model, computed by onnxruntime.

    Parameters
    ----------
    model : str, path, bytes or onnx.ModelProto
        ``"vgg16"`` (the cached torchvision export if ``dffkit.models.vgg16(weights=
        "torchvision")`` has made one, else VGG-16 with random weights, with an
        ``UntrainedWeightsWarning``), ``"vgg16:random"``, ``"vgg16:torchvision"``,
        ``"filterbank"`` (the built-in colour-and-texture network,
        ``dffkit.models.filterbank``), a path to an ONNX file, or a ModelProto.
    layer : str, optional
        Any tensor of the graph (a node output), or for a VGG-16 a canonical name
        (``conv4_3``, ``relu5_3``, ``pool4``, ...). Default: conv5_3 after ReLU for a
        VGG-16 (found by structure: the activation after the 13th convolution), the
        output of the filter bank, otherwise the activation after the last convolution.
        A wrong name raises ValueError listing close matches; a weight (initializer), a
        tensor that is not 4-D, or one computed from another input than the image (or
        from several inputs) raises ValueError; anything but a str or None, TypeError.
        The image input is the graph input the layer is computed from (a model may have
        others).
    providers : "auto", "cpu", "cuda", "cuda:<id>", or a list for onnxruntime
        ``"auto"``: CUDA when the provider really starts (checked with
        ``session.get_providers()``), else the CPU. ``"cuda"``: RuntimeError when CUDA
        cannot run, never a silent fallback. A list (names or (name, options) pairs, as
        onnxruntime takes them): ValueError for a name onnxruntime does not know (the
        message lists the providers it has), RuntimeError naming a provider the session
        did not get, and why; never a silent fallback either.
    batch_size : int
        Images per onnxruntime run.
    image_size : int, (H, W) or None
        With ``resize="fixed"``, every image is resized to this size (an int means
        square); with ``resize="shorter"``, the shorter side is resized to it (an int),
        aspect kept; None keeps each image's size. A model whose input has a fixed H, W
        gets images of that size whatever is passed here. One whose input fixes one side
        only (say (N, 3, 20, W)) gets that side at the model's size and the other from
        ``image_size`` (an int, or an (H, W) that agrees with the fixed side: ValueError
        otherwise); it needs ``resize="fixed"`` and an image_size (ValueError otherwise).
        Anything but None, a positive int or a (height, width) pair of positive ints
        raises ValueError.
    resize : "fixed" or "shorter"
    num_threads : int, optional
        onnxruntime's intra-op threads (CPU provider); None (or 0) lets onnxruntime choose.
    normalization : "imagenet", "caffe", "unit", "none", optional
        Default: the model's ``dffkit.normalization`` metadata, else ImageNet mean/std
        (torchvision and the ONNX model zoo). Keras VGG16 files want ``"caffe"``.
    cache_dir : path, optional
        Where built models are cached (default ``$DFFKIT_CACHE_DIR``, else
        ``$XDG_CACHE_HOME/dffkit``, else ``~/.cache/dffkit``: ``dffkit.models.cache_dir``).
    provider_options : dict, optional
        Options of onnxruntime's CUDA provider, over ``CUDA_PROVIDER_DEFAULTS`` (NHWC
        convolutions on; ``{"prefer_nhwc": 0}`` turns them off).
    session_config : dict, optional
        onnxruntime session config entries, over ``SESSION_CONFIG`` (thread spinning off).
    workers : int, optional
        Threads that read and resize images (default ``dffkit.images.default_workers()``:
        ``$DFFKIT_IO_THREADS``, else the cores up to 8; 1: none). Results do not depend on it.
    channel_axis : 1, 3 or None
        Where the layer's channels are: 1 for (N, C, h, w), 3 for (N, h, w, C) (returned
        as (N, C, h, w)). Default None: followed through the graph from the image input's
        layout (NCHW or NHWC) and the convolutions, across Transposes and the ops that keep
        the axis order; a layer behind an op that may move them (Reshape, Flatten, Gather,
        MatMul, a custom op, ...) raises ValueError that asks for it.

    Attributes
    ----------
    layer : the tensor name extracted.  provider : the provider running the session.
    model : the whole onnx.ModelProto (classifier included, if it has one).
    model_name, untrained, weights, image_size, resize, normalization, batch_size,
    channel_axis.
    session : the onnxruntime session (input ``input_name``: resized uint8 RGB images
        (N, H, W, 3), normalised inside the graph; output ``output_name``).
    last_sizes : (H, W) of each image of the last call, after EXIF orientation.
    """

    def __init__(
        self,
        model,
        layer: Optional[str] = None,
        *,
        providers="auto",
        batch_size: int = 16,
        image_size=224,
        resize: str = "fixed",
        num_threads: Optional[int] = None,
        normalization: Optional[str] = None,
        cache_dir=None,
        provider_options: Optional[dict] = None,
        session_config: Optional[dict] = None,
        workers: Optional[int] = None,
        channel_axis: Optional[int] = None,
    ):
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (images per onnxruntime run, e.g. 16), got {batch_size!r}")
        if resize not in ("fixed", "shorter"):
            raise ValueError(f"resize must be 'fixed' or 'shorter', got {resize!r}")
        if isinstance(providers, (list, tuple)):
            _provider_names(providers)  # before the model is built
        else:
            _parse_providers(providers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _models.UntrainedWeightsWarning)
            proto, self.model_name = _resolve_model(model, cache_dir)
        info = _models.model_info(proto)
        self.untrained = _models.is_untrained(proto)
        self.weights = info.get("weights", "unknown")
        self.normalization = normalization or info.get("normalization", "imagenet")
        if self.normalization not in ("imagenet", "caffe", "unit", "none"):
            raise ValueError(f"normalization must be 'imagenet', 'caffe', 'unit' or 'none', got {self.normalization!r}")
        self.batch_size = int(batch_size)
        self.resize = resize
        self.workers = _check_workers(workers)
        self.num_threads = num_threads
        self.layer = _models.resolve_layer(proto, layer)
        if channel_axis is not None and (isinstance(channel_axis, bool) or channel_axis not in (1, 3)):
            raise ValueError(f"channel_axis must be 1 (N, C, h, w), 3 (N, h, w, C) or None, got {channel_axis!r}")
        self.channel_axis = channel_axis
        size = _check_image_size(image_size, resize)

        # the image input: the graph input the layer is computed from (not necessarily the
        # first one), its layout, fixed batch, fixed spatial size
        self._image_input = _models.image_input(proto, self.layer)
        dims = _models._value_dims(next(v for v in proto.graph.input if v.name == self._image_input)) or []
        layout = _models.input_layout(proto, self._image_input)
        if len(dims) == 4:
            channels = dims[1] if layout == "NCHW" else dims[3]
            if isinstance(channels, int) and channels != 3:
                raise ValueError(
                    f"layer {self.layer!r} is computed from the model's input {self._image_input!r} of shape "
                    f"{tuple(dims)}, which does not take RGB images (3 channels): choose a layer computed from the "
                    "image input"
                )
        hw = (dims[2], dims[3]) if layout == "NCHW" and len(dims) == 4 else (dims[1], dims[2]) if len(dims) == 4 else (None, None)
        fixed = tuple(d if isinstance(d, int) and d > 0 else None for d in hw)
        self._fixed_dims = fixed
        self._fixed_hw = fixed if None not in fixed else None
        self._fixed_batch = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
        if self._fixed_hw is not None:
            if resize == "shorter":
                warnings.warn(f"the model takes {self._fixed_hw} images only: resize='shorter' is ignored", stacklevel=2)
            self.image_size, self.resize = self._fixed_hw, "fixed"
        elif fixed != (None, None):
            self.image_size, self.resize = self._partly_fixed_size(fixed, size, resize, tuple(dims)), "fixed"
        elif size is None:
            self.image_size = None
        elif resize == "fixed":
            self.image_size = size if isinstance(size, tuple) else (size, size)
        else:
            self.image_size = size
        if self._fixed_batch is not None:
            self.batch_size = self._fixed_batch

        probe_hw = self.image_size if isinstance(self.image_size, tuple) else None
        shapes = _models.tensor_shapes(proto, probe_hw, self._image_input)
        elem, shape = shapes.get(self.layer, (0, None))
        if shape is not None and len(shape) != 4:
            raise ValueError(
                f"layer {layer or self.layer!r} has shape {shape}, not (N, C, h, w): choose a convolutional layer "
                "(see FeatureExtractor.layers())"
            )
        if elem not in _FLOAT_TYPES:
            raise ValueError(f"layer {self.layer!r} is not a float tensor (ONNX type {elem})")

        self.model = proto
        self._light = _models._strip_weights(proto)
        truncated = _models.truncate(proto, self.layer, channel_axis=channel_axis)
        self._shape_model = _models._strip_weights(truncated)
        # the session takes resized uint8 images and normalises them itself (a quarter of the
        # bytes to send); a second one, for already normalised float tensors, opens on first use
        native = truncated if layout == "NCHW" else _models.truncate(proto, self.layer, nchw_input=False, channel_axis=channel_axis)
        fed_images = _models.with_image_input(native, self.normalization)
        self._session_args = (providers, num_threads, provider_options, session_config)
        self.session, self._device_id = _make_session(fed_images.SerializeToString(), *self._session_args)
        self._tensor_session = None
        self.provider = self.session.get_providers()[0]
        self._device_type = "cuda"  # where device_output puts the activations
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._out_shapes = {}
        self.last_sizes: List[Tuple[int, int]] = []
        if self.untrained:
            _models._untrained_warning(f"FeatureExtractor({self.model_name!r})")

    def _partly_fixed_size(self, fixed, size, resize: str, dims) -> Tuple[int, int]:
        """(H, W) for an input that fixes one side only: that side the model's, the other
        from ``image_size`` (an int, or its part of an (H, W) that agrees with the fixed one)."""
        sides = ("height", "width")
        k = 0 if fixed[0] is not None else 1
        side, other, value = sides[k], sides[1 - k], fixed[k]
        example = f"({value}, W)" if k == 0 else f"(H, {value})"
        where = f"the model's input {self._image_input!r} {dims} has a fixed {side} of {value} pixels and a free {other}"
        if size is None or resize == "shorter":
            raise ValueError(
                f"{where}, so images must be resized to that {side}: resize='shorter' and image_size=None cannot be "
                f"honoured; use resize='fixed' with image_size={example} (or an int, the {other})"
            )
        if isinstance(size, tuple):
            if size[k] != value:
                raise ValueError(
                    f"image_size {size} asks for a {side} of {size[k]}, but {where}; pass image_size={example} "
                    f"(or an int, the {other})"
                )
            return size
        return (value, size) if k == 0 else (size, value)

    # ------------------------------------------------------------------ information

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(model={self.model_name!r}, layer={self.layer!r}, provider={self.provider!r}, "
            f"image_size={self.image_size!r}, resize={self.resize!r}, untrained={self.untrained})"
        )

    def layers(self) -> List[Tuple[str, Optional[tuple]]]:
        """Candidate layers: (tensor name, shape) for every float node output, in graph
        order. Shapes come from ONNX shape inference at this extractor's image size (None
        where unknown; the batch is ``"N"``)."""
        hw = self.image_size if isinstance(self.image_size, tuple) else None
        shapes = _models.tensor_shapes(self._light, hw, self._image_input)
        out = []
        for node in self._light.graph.node:
            if node.op_type == "Constant":
                continue
            for name in node.output:
                elem, shape = shapes.get(name, (0, None))
                if name and elem in _FLOAT_TYPES:
                    out.append((name, shape))
        return out

    def classifier_head(self):
        """``dffkit.models.ClassifierHead`` of the model when it is a VGG-16 with its fully
        connected layers, for scoring conv5_3 concept embeddings; None otherwise."""
        if not any(n.op_type in ("Gemm", "MatMul") for n in self.model.graph.node):
            return None
        try:
            return _models.classifier_head(self.model)
        except ValueError:
            return None

    def output_shape(self, image_hw: Tuple[int, int]) -> Optional[Tuple[int, int, int]]:
        """(C, h, w) of the activations of one image of size ``image_hw`` (after resizing),
        from shape inference; None where it cannot tell."""
        key = tuple(image_hw)
        if key not in self._out_shapes:
            shapes = _models.tensor_shapes(self._shape_model, key)
            shape = shapes.get(self.output_name, (0, None))[1]
            ok = shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
            self._out_shapes[key] = tuple(shape[1:]) if ok else None
        return self._out_shapes[key]

    # ------------------------------------------------------------------ running

    def _tensors_session(self):
        """The session for normalised float tensors (N, 3, H, W), opened on first use."""
        if self._tensor_session is None:
            # float32 (N, 3, H, W) in, whatever the model's own input type and layout
            truncated = _models.truncate(self.model, self.layer, channel_axis=self.channel_axis)
            session, _ = _make_session(truncated.SerializeToString(), *self._session_args)
            runs_on = session.get_providers()[0]
            if runs_on != self.provider:
                raise RuntimeError(f"the float-tensor session runs on {runs_on}, the image session on {self.provider}")
            self._tensor_session = session
        return self._tensor_session

    def _check_input(self, x) -> Tuple[np.ndarray, bool]:
        """(contiguous batch, whether it is uint8 images (N, H, W, 3)); float input is
        normalised tensors (N, 3, H, W)."""
        if isinstance(x, np.ndarray) and x.dtype == np.uint8:
            if x.ndim != 4 or x.shape[3] != 3:
                raise ValueError(f"uint8 input must be resized RGB images (N, H, W, 3), got shape {x.shape}")
            images, hw = True, x.shape[1:3]
        else:
            x = np.asarray(x)
            if x.dtype.kind not in "fiu":
                raise ValueError(f"input must be (N, 3, H, W) float32 or (N, H, W, 3) uint8, got dtype {x.dtype}")
            x = x.astype(np.float32, copy=False)
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"input must be (N, 3, H, W) float32 (normalised) or (N, H, W, 3) uint8 images, got shape {x.shape}"
                )
            images, hw = False, x.shape[2:]
        if x.shape[0] == 0:
            raise ValueError("no images given")
        if any(f is not None and f != v for f, v in zip(self._fixed_dims, hw)):
            if self._fixed_hw is not None:
                wanted = f"{self._fixed_hw} images"
            else:
                wanted = f"images of height {self._fixed_dims[0]}" if self._fixed_dims[0] else f"images of width {self._fixed_dims[1]}"
            raise ValueError(f"the model takes {wanted}, got {tuple(int(v) for v in hw)}")
        return np.ascontiguousarray(x), images

    def _session_for(self, images: bool):
        """(session, input name) for uint8 images or for float tensors."""
        if images:
            return self.session, self.input_name
        session = self._tensors_session()
        return session, session.get_inputs()[0].name

    def _pad(self, x: np.ndarray) -> np.ndarray:
        b = self._fixed_batch
        if b is None or len(x) == b:
            return x
        pad = np.zeros((b - len(x),) + x.shape[1:], x.dtype)
        return np.concatenate([x, pad])

    def _run_host(self, x: np.ndarray, images: bool) -> np.ndarray:
        n = len(x)
        session, name = self._session_for(images)
        out = session.run([self.output_name], {name: self._pad(x)})[0]
        if out.ndim != 4:
            raise ValueError(f"layer {self.layer!r} gives shape {out.shape}, not (N, C, h, w): choose a convolutional layer")
        return out[:n]

    def _device_buffer(self, n_total: int, chunk: np.ndarray, images: bool):
        """A device OrtValue for all N outputs (padded to the fixed batch if needed)."""
        import onnxruntime as ort

        per = self.output_shape(chunk.shape[1:3] if images else chunk.shape[2:])
        if per is None:  # shape inference could not tell: run once to learn it
            session, name = self._session_for(images)
            io_binding = session.io_binding()
            io_binding.bind_cpu_input(name, self._pad(chunk))
            io_binding.bind_output(self.output_name, self._device_type, self._device_id)
            session.run_with_iobinding(io_binding)
            per = tuple(io_binding.get_outputs()[0].shape()[1:])
        b = self._fixed_batch
        n_alloc = n_total if b is None else -(-n_total // b) * b
        value = ort.OrtValue.ortvalue_from_shape_and_type((n_alloc,) + per, np.float32, self._device_type, self._device_id)
        return value, per

    def _forward(self, chunks, n_total: int, device_output: bool):
        """Run chunks (each at most batch_size images: uint8 (n, H, W, 3) images or float
        (n, 3, H, W) tensors) into one result."""
        if device_output and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(
                f"device_output=True needs the CUDA provider, but this extractor runs on {self.provider}; "
                "create it with providers='cuda' (or use the numpy result)"
            )
        out = buffer = per = None
        start = 0
        for x in chunks:
            x, images = self._check_input(x)
            n = len(x)
            if device_output:
                session, name = self._session_for(images)
            if device_output and n == n_total and self._fixed_batch is None:
                # one run: onnxruntime's own (arena) allocation is the buffer, no extra cudaMalloc
                io_binding = session.io_binding()
                io_binding.bind_cpu_input(name, x)
                io_binding.bind_output(self.output_name, self._device_type, self._device_id)
                session.run_with_iobinding(io_binding)
                buffer = io_binding.get_outputs()[0]
                per = tuple(buffer.shape()[1:])
                if len(per) != 3:
                    raise ValueError(f"layer {self.layer!r} gives shape {tuple(buffer.shape())}, not (N, C, h, w)")
            elif device_output:
                hw = x.shape[1:3] if images else x.shape[2:]
                if buffer is None:
                    buffer, per = self._device_buffer(n_total, x, images)
                    base = buffer.data_ptr()
                elif self.output_shape(hw) not in (None, per):
                    raise ValueError(f"images of different sizes cannot go into one device buffer; {self._size_advice()}")
                rows = n if self._fixed_batch is None else self._fixed_batch
                io_binding = session.io_binding()
                io_binding.bind_cpu_input(name, self._pad(x))
                io_binding.bind_output(
                    self.output_name, self._device_type, self._device_id, np.float32, (rows,) + per, base + start * int(np.prod(per)) * 4
                )
                session.run_with_iobinding(io_binding)
            else:
                y = self._run_host(x, images)
                if out is None:
                    out = np.empty((n_total,) + y.shape[1:], np.float32)
                elif y.shape[1:] != out.shape[1:]:
                    raise ValueError(
                        f"images give activations of different sizes {out.shape[1:]} and {y.shape[1:]}; "
                        + self._size_advice()
                    )
                out[start : start + n] = y
            start += n
        if device_output:
            return DeviceActivations(buffer, (n_total,) + per, self._device_id)
        return out

    def run(self, x, *, device_output: bool = False):
        """Activations for an already prepared batch ``x``: either resized uint8 RGB images
        (N, H, W, 3), normalised inside the model (the fast path: a quarter of the bytes of
        float32, no float work on the host), or normalised float32 tensors (N, 3, H, W) as
        ``preprocess`` makes them (a second onnxruntime session, opened on first use; float16
        or float64 arrays are taken as float32, and a model whose input is float16 gets them
        cast inside the graph).

        Returns (N, C, h, w) float32 numpy, or ``DeviceActivations`` with
        ``device_output=True`` (CUDA provider only)."""
        x, _ = self._check_input(x)
        chunks = (x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size))
        return self._forward(chunks, len(x), device_output)

    def resize_images(self, pil_images: Sequence) -> np.ndarray:
        """RGB PIL images -> (N, H, W, 3) uint8, resized to this extractor's size: what
        ``run`` takes (``preprocess`` is the same, normalised on the host)."""
        return resize_batch(pil_images, self.image_size, self.resize, **self._size_words())

    def preprocess(self, pil_images: Sequence) -> np.ndarray:
        """RGB PIL images -> (N, 3, H, W) float32 at this extractor's size and normalisation."""
        return normalize(self.resize_images(pil_images), self.normalization)

    def _size_words(self) -> dict:
        """How the size messages of ``dffkit.images`` name this extractor's parameters."""
        return {"size_name": "image_size", "alternative": "use extract_list() for activations at each image's own size"}

    def _size_advice(self) -> str:
        """How to get activations of one size from images of several sizes."""
        return _different_sizes_advice(self.image_size, self.resize, **self._size_words())

    def __call__(self, images, *, device_output: bool = False):
        """Activations (N, C, h, w) float32 of the layer for ``images``.

        ``images``: a path, PIL image, encoded bytes or uint8 array (H, W[, 3|4]), or a
        sequence of them (a 4-D uint8 array is N images, a 1-D array of str or object dtype
        a sequence of paths). They are read with Pillow (EXIF
        orientation applied, any mode converted to RGB) and resized on ``workers``
        threads, the next batch while onnxruntime runs this one, and run ``batch_size``
        at a time (normalised inside the model); ``last_sizes`` then holds each image's
        original (H, W).

        Returns numpy float32 (N, C, h, w); with ``device_output=True`` (CUDA provider
        only, RuntimeError otherwise) a ``DeviceActivations`` in GPU memory. All images
        must give activations of one size: with ``resize="shorter"`` or
        ``image_size=None`` use ``extract_list``.

        Raises FileNotFoundError / ValueError naming the image (index and path) that
        cannot be read.
        """
        items = as_image_list(images)
        if not items:
            raise ValueError("no images given")
        sizes: List[Tuple[int, int]] = []

        def chunks():
            for part_sizes, arrays in resized_batches(items, self.batch_size, self.image_size, self.resize,
                                                      workers=self.workers):
                sizes.extend(part_sizes)
                yield stack_resized(arrays, self.image_size, self.resize, **self._size_words())

        out = self._forward(chunks(), len(items), device_output)
        self.last_sizes = sizes
        return out

    def extract_list(self, images) -> List[np.ndarray]:
        """Activations of each image at its own size: a list of (C, h, w) float32 arrays
        (for ``resize="shorter"`` or ``image_size=None``, where shapes differ). Images
        of one size are batched together."""
        items = as_image_list(images)
        if not items:
            raise ValueError("no images given")
        results: List[Optional[np.ndarray]] = [None] * len(items)
        sizes: List[Tuple[int, int]] = []
        for start in range(0, len(items), self.batch_size):
            pil = load_images(items[start : start + self.batch_size], start=start, workers=self.workers)
            sizes.extend(image_sizes(pil))
            groups = {}
            for i, im in enumerate(pil):
                key = resized_size((im.height, im.width), self.image_size, self.resize)
                groups.setdefault(key, []).append(i)
            for idx in groups.values():
                acts = self._run_host(self.resize_images([pil[i] for i in idx]), True)
                for i, a in zip(idx, acts):
                    results[start + i] = a
        self.last_sizes = sizes
        return results
