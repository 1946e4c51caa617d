"""What the small benchmark scripts share: dffkit from an install or this checkout, timing, and
the machine's description for the results files."""
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:  # an installed dffkit (with its compiled modules) first; else this checkout's source
    import dffkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "python"))

import dffkit  # noqa: E402,F811


def timed(fn, repeats, warmup=1):
    """(median, best) wall time of ``repeats`` calls of fn, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(min(times))


def machine() -> dict:
    """CPU, the cores this process may use, load, how the engine was built, versions."""
    from dffkit.info import engine_build

    return dict(cpu=platform.processor() or platform.machine(), cores=len(os.sched_getaffinity(0)),
                load_average=os.getloadavg(), engine=engine_build(), numpy=np.__version__,
                dffkit=dffkit.__version__)


def write(out: Path, payload: dict, lines) -> None:
    """out.json (payload) and out.md (lines), printed."""
    import json

    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
