"""``dffkit info``: what this installation can do (backends, threads, devices)."""
from __future__ import annotations

import platform

import numpy as np

from dffkit import _backends


def describe() -> dict:
    """A plain dict describing the installation: version, backends, why others are missing."""
    import dffkit

    info = {
        "dffkit": dffkit.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "backends": _backends.available_backends(),
        "unavailable": _backends.unavailable_reasons(),
    }
    try:
        info["cpu_threads"] = _backends.cpu().max_threads()
    except ImportError:
        pass
    from dffkit.images import default_workers

    try:
        info["image_threads"] = default_workers()  # reading, resizing, drawing (DFFKIT_IO_THREADS)
    except ValueError as e:  # a bad DFFKIT_IO_THREADS: say so here rather than fail
        info["image_threads"] = f"invalid: {e}"
    if "cuda" in info["backends"]:
        cuda = _backends.cuda()
        info["cuda_devices"] = [cuda.device_info(i) for i in range(cuda.device_count())]
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
        if key == "unavailable":
            for name, why in value.items():
                print(f"{'backend ' + name + ':':<16} unavailable: {why}")
        else:
            print(f"{key + ':':<16} {value}")
    return 0


CLI = {"info": (_add_arguments, _run, "show the version, usable backends and devices")}
