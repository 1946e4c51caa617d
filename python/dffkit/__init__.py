"""dffkit: fast non-negative matrix factorization (C++/OpenMP and hand-written CUDA) and
concept discovery in CNN activations (Deep Feature Factorization, factorized convolutional
networks).

Quick use::

    import dffkit
    W, H, n_iter = dffkit.non_negative_factorization(X, n_components=10, init="random")
    model = dffkit.NMF(n_components=10).fit(X)       # a drop-in for sklearn's NMF(solver="mu")
"""
from dffkit._backends import available_backends, unavailable_reasons
from dffkit.nmf import (
    NMF,
    InvalidParameterError,
    NMFResult,
    get_num_threads,
    initialize,
    nmf_batched,
    non_negative_factorization,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "unavailable_reasons",
    "non_negative_factorization",
    "NMF",
    "NMFResult",
    "InvalidParameterError",
    "nmf_batched",
    "initialize",
    "set_num_threads",
    "get_num_threads",
]


def __getattr__(name):
    # the image pipeline is imported on first use: numpy-only users never load onnxruntime
    lazy = {
        "FeatureExtractor": ("dffkit.features", "FeatureExtractor"),
        "models": ("dffkit.models", None),
        "dff": ("dffkit.deep_feature_factorization", "dff"),
        "DFFResult": ("dffkit.deep_feature_factorization", "DFFResult"),
        "group_sparse_nmf": ("dffkit.group_sparse", "group_sparse_nmf"),
        "GroupSparseNMF": ("dffkit.group_sparse", "GroupSparseNMF"),
        "cluster_activations": ("dffkit.clustering", "cluster_activations"),
        "cluster_images": ("dffkit.clustering", "cluster_images"),
        "bench": ("dffkit.bench", None),
        "export_parts_model": ("dffkit.export_onnx", "export_parts_model"),
        "metrics": ("dffkit.metrics", None),
        "features": ("dffkit.features", None),
    }
    if name in lazy:
        import importlib

        module_name, attr = lazy[name]
        module = importlib.import_module(module_name)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module 'dffkit' has no attribute {name!r}")
