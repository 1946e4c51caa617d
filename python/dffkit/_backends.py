"""Which engines are usable here, and why not.

``dffkit._cpu`` (C++/OpenMP) always builds. ``dffkit._cuda`` builds where CMake found nvcc and
is usable where a CUDA driver and device are present; ``_cuda.probe()`` says which.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

_reasons: dict[str, str] = {}
_modules: dict[str, object] = {}
# First loads, one at a time: each sets GOMP_SPINCOUNT around its import and removes it after,
# so a load on another thread (the CUDA module's failed import, say) would remove it while
# this one's import of libgomp still had to read it, and the CUDA probe would run twice.
_load_lock = threading.RLock()

# How long an idle OpenMP thread of the engine spins before it sleeps, read by libgomp once,
# when it is loaded. Its default (300000 spins, milliseconds) leaves a thread spinning after
# every parallel loop, on a core that numpy's BLAS or onnxruntime wants next: 8-image DFF maps
# took 9-10 ms instead of 5-6 on 2 cores. 10000 spins cost the engine nothing measurable
# (1960 x 512, k = 5, 200 iterations: 26-30 ms either way; 0 spins: 41 ms).
GOMP_SPINCOUNT = "10000"


@contextlib.contextmanager
def _openmp_spin_default():
    """GOMP_SPINCOUNT for the import of an engine module (which loads libgomp), unless the
    caller set it; the environment is as it was afterwards. No effect where libgomp is
    already loaded (another library's setting stands)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    try:
        yield
    finally:
        os.environ.pop("GOMP_SPINCOUNT", None)


def _load(name: str):
    if name in _modules:
        return _modules[name]
    with _load_lock:
        if name in _modules:  # loaded by another thread while this one waited
            return _modules[name]
        return _load_locked(name)


def _load_locked(name: str):
    module = None
    try:
        with _openmp_spin_default():
            module = importlib.import_module(f"dffkit._{name}")
    except ImportError as exc:
        _reasons[name] = (
            f"dffkit._{name} is not built ({exc}); "
            + ("reinstall dffkit" if name == "cpu" else "install dffkit on a machine where CMake finds nvcc")
        )
    if module is not None and name == "cpu":
        missing = _missing_instructions(getattr(module, "build_info", ""))
        if missing:
            _reasons[name] = (
                f"dffkit._cpu was compiled for instructions this CPU lacks ({', '.join(missing)}): "
                "it was built with -march=native on another machine (a wheel or Docker image built "
                "elsewhere, a shared home directory or pip cache), and running it would end the "
                "interpreter with 'Illegal instruction'. Reinstall it here (pip install --no-cache-dir "
                "--force-reinstall . in the source tree), or build for a target every machine has: "
                "DFFKIT_ARCH=x86-64-v3 pip wheel . (AVX2 and FMA), DFFKIT_NATIVE=OFF for the "
                "compiler's default"
            )
            module = None
    if module is not None and name == "cuda":
        ok, why = module.probe()
        if not ok:
            _reasons[name] = f"the CUDA module is built but cannot run here: {why}"
            module = None
    _modules[name] = module
    return module


def _cpu_flags():
    """The instruction set extensions this x86-64 CPU has, as Linux names them in /proc/cpuinfo
    (avx2, fma, avx512f, ...); None where that is not known (another OS, another machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def build_fields(build_info: str) -> dict:
    """An engine's build_info ("name=value" lines) as a dict."""
    return dict(line.split("=", 1) for line in str(build_info).splitlines() if "=" in line)


def _missing_instructions(build_info: str) -> list:
    """The instruction sets the engine's kernels were compiled for (its build_info's
    instruction_sets, as /proc/cpuinfo names them) that this CPU lacks; [] where the engine is
    not x86-64 or the CPU's flags are not known."""
    isa = build_fields(build_info).get("instruction_sets", "").split()
    if not isa or isa[0] != "x86-64":
        return []
    flags = _cpu_flags()
    if not flags:
        return []
    return [x for x in isa[1:] if x not in flags]


def cpu():
    """The CPU engine module; raises ImportError with the reason if it is missing."""
    module = _load("cpu")
    if module is None:
        raise ImportError(_reasons["cpu"])
    return module


def cuda():
    """The CUDA engine module; raises RuntimeError with the reason if it is not usable."""
    module = _load("cuda")
    if module is None:
        raise RuntimeError(f"backend='cuda' is not available: {_reasons['cuda']}")
    return module


def available_backends() -> list[str]:
    """Names of the usable backends, best first (``"cuda"`` before ``"cpu"``)."""
    return [name for name in ("cuda", "cpu") if _load(name) is not None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that is not usable, why not."""
    for name in ("cuda", "cpu"):
        _load(name)
    return dict(_reasons)
