"""``dffkit info``: what this installation can do (backends, threads, devices)."""
from __future__ import annotations

import os
import platform

import numpy as np

from dffkit import _backends


def engine_threads():
    """(threads the CPU engine runs on, where that number comes from): dffkit's own setting
    (set_num_threads, DFFKIT_NUM_THREADS) when not 0, else OpenMP's default
    (OMP_NUM_THREADS or all cores); (None, None) without the CPU engine."""
    from dffkit import nmf

    try:
        openmp = int(_backends.cpu().max_threads())
    except Exception:  # noqa: BLE001 - no CPU engine: nothing to say
        return None, None
    setting = nmf.get_num_threads()
    if setting <= 0:
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        return openmp, (f"OpenMP's default: OMP_NUM_THREADS={omp}" if omp
                        else "OpenMP's default: the cores this process may use")
    try:
        from_env = int(os.environ.get("DFFKIT_NUM_THREADS", "").strip()) == setting
    except ValueError:
        from_env = False
    return setting, ("DFFKIT_NUM_THREADS" if from_env else "set_num_threads")


# the optional packages dffkit works with, by import name: (distribution, what for)
OPTIONAL = {
    "scipy": ("scipy", "sparse X"),
    "sklearn": ("scikit-learn", "benchmark peer, tests"),
    "torch": ("torch", "benchmark peer, CUDA arrays, VGG-16 export"),
    "cupy": ("cupy", "benchmark peer, CUDA arrays"),
    "onnxruntime": ("onnxruntime", "feature extraction"),
    "PIL": ("pillow", "images"),
    "matplotlib": ("matplotlib", "benchmark plots"),
}


def _version(name: str, dist: str):
    """The installed version of ``dist`` (without importing it), None when not installed."""
    import importlib.util
    from importlib import metadata

    dists = (dist, "onnxruntime-gpu") if dist == "onnxruntime" else (dist,)
    for d in dists:
        try:
            return metadata.version(d) + ("" if d == dist else f" ({d})")
        except metadata.PackageNotFoundError:
            continue
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    return "installed (version unknown)"


def engine_build() -> dict:
    """How the loaded CPU engine was compiled: compiler, instruction_sets (those its kernels
    were compiled for: -march=native builds for the building machine), vector_bytes,
    vector_registers, random_init, openmp, sanitizers."""
    return _backends.build_fields(getattr(_backends.cpu(), "build_info", ""))


def _cpu() -> dict:
    from dffkit import _bench_report

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"model": _bench_report._cpu_model(), "cores": cores, "flags": _bench_report._cpu_flags()}


def describe() -> dict:
    """A plain dict describing the installation: version, backends, why others are missing,
    the CPU engine's threads, the optional packages found."""
    import dffkit

    info = {
        "dffkit": dffkit.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu(),
        "backends": _backends.available_backends(),
        "unavailable": _backends.unavailable_reasons(),
    }
    try:
        info["cpu_engine"] = _backends.cpu().__file__
        info["cpu_engine_build"] = engine_build()
    except (ImportError, AttributeError):
        pass
    threads, threads_from = engine_threads()
    if threads is not None:
        info["cpu_threads"] = threads
        info["cpu_threads_from"] = threads_from
    from dffkit.images import default_workers

    try:
        info["image_threads"] = default_workers()  # reading, resizing, drawing (DFFKIT_IO_THREADS)
    except ValueError as e:  # a bad DFFKIT_IO_THREADS: say so here rather than fail
        info["image_threads"] = f"invalid: {e}"
    if "cuda" in info["backends"]:
        cuda = _backends.cuda()
        info["cuda_devices"] = [cuda.device_info(i) for i in range(cuda.device_count())]
    info["optional"] = {dist: _version(name, dist) for name, (dist, _) in OPTIONAL.items()}
    return info


def _add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run(args) -> int:
    info = describe()
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if key == "cpu":
            flags = " ".join(value["flags"])
            print(f"{'cpu:':<16} {value['model']}, {value['cores']} cores" + (f" ({flags})" if flags else ""))
        elif key == "cpu_engine_build":
            print(f"{'cpu build:':<16} {value.get('compiler', '?')}; for {value.get('instruction_sets', '?')}; "
                  f"{value.get('vector_bytes', '?')}-byte vectors; OpenMP {value.get('openmp', '?')}"
                  + (f"; sanitizers {value['sanitizers']}" if value.get("sanitizers", "none") != "none" else ""))
        elif key == "optional":
            print(f"{'optional:':<16} " + ", ".join(
                f"{dist} {version or 'not installed'}" for dist, version in value.items()))
        elif key == "unavailable":
            for name, why in value.items():
                print(f"{'backend ' + name + ':':<16} unavailable: {why}")
        elif key == "cpu_threads_from":
            continue
        elif key == "cpu_threads" and info.get("cpu_threads_from"):
            print(f"{key + ':':<16} {value} ({info['cpu_threads_from']})")
        else:
            print(f"{key + ':':<16} {value}")
    return 0


CLI = {"info": (_add_arguments, _run, "show the version, usable backends and devices")}
