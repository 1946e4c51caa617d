"""The contenders of ``dffkit bench``: dffkit's engines and the peers it is measured against.

A contender turns a problem and the shared start (X, W0, H0, float32 numpy) into W, H after a
given number of iterations. The harness calls, for each problem:

``setup`` (untimed: copy data to the device) -> ``start`` (untimed: fresh copies of the
start for solvers that update in place) -> ``solve`` (timed; returns once the result is
complete, device work included) -> ``fetch`` (untimed: W, H as numpy) -> ``teardown``.

``solver = "mu"`` contenders must reproduce the multiplicative updates from the shared start
(checked after one iteration against a float64 oracle); ``"cd"`` contenders are timed to a
target error instead.

On the sparse problems X is a scipy.sparse CSR float32 matrix: only contenders with
``accepts_sparse`` get them; the others are listed as skipped with :meth:`Contender.sparse_unsupported`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from dffkit._bench_problems import Problem, mu_iterations


@dataclass
class Setup:
    """What a contender gets: the problem, its data and start (numpy float32; X a scipy.sparse
    CSR float32 matrix on the sparse problems), and for GSNMF the group offsets and penalties
    in the objective's units."""

    problem: Problem
    X: np.ndarray
    W0: np.ndarray
    H0: np.ndarray
    offsets: list
    lam: float = 0.0
    mu: float = 0.0


class Contender:
    """Base class: subclass it to put another implementation into ``dffkit bench``."""

    name = "contender"
    solver = "mu"        # "mu" (same start, same iterations) or "cd" (time to a target error)
    device = "cpu"
    family = "peer"      # "dffkit" or "peer": speed ratios are against the best peer
    precision = "fp32"
    library = ""         # the package it exercises, for the machine description
    accepts_sparse = False  # True: it takes the sparse problems' scipy.sparse CSR X as it is

    def unavailable(self):
        """None when the contender can run here, else why not (shown as skipped)."""
        return None

    def sparse_unsupported(self):
        """None when the contender takes a scipy.sparse X, else why not (shown as skipped on
        the sparse problems, before :meth:`unavailable`: it holds on any machine)."""
        if self.accepts_sparse:
            return None
        return ("sparse X: this contender takes dense arrays only (a Contender with "
                "accepts_sparse = True gets the scipy.sparse CSR matrix)")

    def unsupported(self, problem: Problem):
        """None when the contender handles ``problem``, else why not."""
        return None

    def setup(self, s: Setup):
        return s

    def start(self, state):
        return None

    def solve(self, state, args, n_iter: int):
        raise NotImplementedError

    def sync(self):
        pass

    def fetch(self, state, out):
        return out

    def teardown(self, state):
        pass

    def notes(self, state) -> str:
        return ""


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cannot_import(module: str, package: str, install: str):
    """None when ``module`` imports, else why not: not installed, or installed but failing to
    import (a broken or mismatched build), with what to do. A contender whose library does not
    import is skipped with this reason instead of failing in its setup."""
    if not _have(module.split(".")[0]):
        return f"{package} is not installed ({install})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever a broken install raises
        return (f"{package} is installed but does not import ({type(exc).__name__}: {exc}); "
                f"repair or reinstall it ({install})")
    return None


def _importable(module: str) -> bool:
    return _cannot_import(module, module, "") is None


def to_numpy(a):
    """numpy from numpy, PyTorch (any device) or CuPy."""
    if isinstance(a, np.ndarray):
        return a
    mod = type(a).__module__
    if mod.startswith("torch"):
        return a.detach().cpu().numpy()
    if mod.startswith("cupy"):
        return a.get()
    return np.asarray(a)


# ---------------------------------------------------------------------------------------------
# dffkit
# ---------------------------------------------------------------------------------------------

def _group_sparse_entry():
    """dffkit.group_sparse_nmf when it exists (issue 8), else None (the harness then calls
    the solver core ``dffkit.nmf._solve`` with groups)."""
    if not _have("dffkit.group_sparse"):
        return None
    try:
        module = importlib.import_module("dffkit.group_sparse")
    except ImportError:
        return None
    return getattr(module, "group_sparse_nmf", None)


class DffkitContender(Contender):
    family = "dffkit"
    library = "dffkit"

    def __init__(self, backend="cpu", precision="fp32", engine=None):
        self.backend = backend
        self.device = backend
        self.precision = precision
        # engine "sweep": the CUDA row-tile sweep (DFFKIT_CUDA_GEMM=0) on the problems where
        # engine "auto" takes the gemm engine: the side-by-side row of the engine it replaced
        if engine not in (None, "sweep"):
            raise ValueError(f"engine must be None or 'sweep', not {engine!r}")
        self.engine = engine
        self.name = ("dffkit-" + backend + ("" if precision == "fp32" else "-" + precision)
                     + (f"-{engine}" if engine else ""))
        self._wh_on_device = None
        self._gs_entry = None
        self._kernels = []  # the kernels each solve reported (NMFResult.kernel)

    @property
    def accepts_sparse(self):
        return self.backend == "cpu"

    def sparse_unsupported(self):
        if self.accepts_sparse:
            return None
        return ("sparse X runs on the CPU backend: dffkit's CUDA engine refuses scipy.sparse X "
                "(ValueError); dffkit-cpu runs these problems")

    def unavailable(self):
        import dffkit

        if self.backend in dffkit.available_backends():
            return None
        return dffkit.unavailable_reasons().get(self.backend, f"backend {self.backend!r} is not usable")

    def unsupported(self, problem):
        if self.engine == "sweep" and (problem.batch or problem.beta != 2 or problem.is_gsnmf or problem.k > 64
                                       or problem.m * problem.n * problem.k <= 1 << 22):
            return ("the sweep's rows: the large single Frobenius problems with k <= 64, where "
                    "engine auto takes the gemm engine")
        if problem.is_gsnmf and self.precision != "fp32":
            gs = _group_sparse_entry()
            if gs is None or "precision" not in inspect.signature(gs).parameters:
                return "group-sparse NMF is offered in fp32 only"
        return None

    # device arrays for the CUDA engine: PyTorch, else CuPy, else numpy (copied per call)
    def _device_lib(self):
        if self.backend != "cuda":
            return None
        for lib in ("torch", "cupy"):
            if _importable(lib):
                return lib
        return None

    def setup(self, s):
        lib = self._device_lib()
        state = {"s": s, "lib": lib, "X": s.X, "W0": s.W0, "H0": s.H0}
        if s.problem.sparse:
            state["convert_s"] = _sparse_convert_time(s.X)
        if lib == "torch":
            import torch

            state["X"] = torch.from_numpy(s.X).cuda()
            state["W0d"] = torch.from_numpy(s.W0).cuda()
            state["H0d"] = torch.from_numpy(s.H0).cuda()
        elif lib == "cupy":
            import cupy

            state["X"] = cupy.asarray(s.X)
            state["W0d"] = cupy.asarray(s.W0)
            state["H0d"] = cupy.asarray(s.H0)
        self._wh_on_device = None if lib else False
        self.sync()
        return state

    def _call(self, state, W, H, n_iter):
        import dffkit
        from dffkit import nmf

        s, p = state["s"], state["s"].problem
        kw = {"backend": self.backend}
        if self.backend == "cuda":
            kw["precision"] = self.precision
        # every path starts from the shared start: on the CPU init="custom" (no initialisation
        # inside the timed call, as for the peers, which get W0, H0 ready-made); a CUDA batch
        # keeps its one-launch Philox init (seed + b: the same start, a single short kernel)
        # rather than nmf_batched's per-problem custom path, not yet timed on a GPU
        if p.batch:
            start = (dict(init="random", random_state=p.seed) if self.backend == "cuda"
                     else dict(init="custom", W=W, H=H))
            res = dffkit.nmf_batched(state["X"], p.k, beta_loss=p.loss, tol=0, max_iter=n_iter,
                                     **start, **kw)
            self._kernels.append(getattr(res[0][2], "kernel", ""))
            return [r[0] for r in res], [r[1] for r in res]
        if p.is_gsnmf:
            gs = self._gs_entry = _group_sparse_entry()
            if gs is not None:
                if "precision" not in inspect.signature(gs).parameters:
                    kw.pop("precision", None)
                out = gs(state["X"], s.offsets, p.k, lam=s.lam, mu=s.mu, init="custom", W=W, H=H,
                         max_iter=n_iter, tol=0, random_state=0, **kw)
                return out[0], out[1]
            Wo, Ho, _ = nmf._solve(state["X"], W, H, n_components=p.k, init="custom",
                                   update_H=True, beta=p.beta, tol=0, max_iter=n_iter,
                                   penalties=lambda m, n: (0.0, 0.0, 0.0, 0.0), random_state=0,
                                   verbose=0, groups=s.offsets, lam=s.lam, mu=s.mu, **kw)
            return Wo, Ho
        Wo, Ho, _, info = dffkit.non_negative_factorization(
            state["X"], W, H, p.k, init="custom", beta_loss=p.loss, tol=0, max_iter=n_iter,
            return_info=True, **kw)
        self._kernels.append(getattr(info, "kernel", ""))
        return Wo, Ho

    def solve(self, state, args, n_iter):
        if self.engine != "sweep":
            return self._solve(state, n_iter)
        old = os.environ.get("DFFKIT_CUDA_GEMM")
        os.environ["DFFKIT_CUDA_GEMM"] = "0"
        try:
            return self._solve(state, n_iter)
        finally:
            if old is None:
                os.environ.pop("DFFKIT_CUDA_GEMM", None)
            else:
                os.environ["DFFKIT_CUDA_GEMM"] = old

    def _solve(self, state, n_iter):
        if self._wh_on_device is None:  # the first call finds out whether W, H may live on the GPU
            try:
                out = self._call(state, state["W0d"], state["H0d"], n_iter)
                self._wh_on_device = True
            except (TypeError, ValueError, RuntimeError):
                self._wh_on_device = False
                out = self._call(state, state["W0"], state["H0"], n_iter)
        elif self._wh_on_device:
            out = self._call(state, state["W0d"], state["H0d"], n_iter)
        else:
            out = self._call(state, state["W0"], state["H0"], n_iter)
        self.sync()
        return out

    def sync(self):
        if self.backend != "cuda":
            return
        if _importable("torch"):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                return
        if _importable("cupy"):
            import cupy

            cupy.cuda.Device().synchronize()

    def fetch(self, state, out):
        W, H = out
        if isinstance(W, list):
            return np.stack([to_numpy(w) for w in W]), np.stack([to_numpy(h) for h in H])
        return to_numpy(W), to_numpy(H)

    def teardown(self, state):
        state.clear()
        _free_device_memory()

    def notes(self, state):
        out = []
        if self.backend == "cuda":
            lib = state.get("lib")
            out.append(f"X on the device ({lib})" if lib else "numpy in/out (copies timed)")
            if self._wh_on_device is False and lib:
                out.append("W0, H0 passed from the host")
        kernels = sorted({k for k in self._kernels if k})
        if kernels and self.backend == "cuda":
            out.append("kernels " + "/".join(kernels))
        self._kernels = []
        p = state.get("s").problem if state.get("s") else None
        if p is not None and p.batch:
            out.append("nmf_batched (init='random', seed+b: the shared start, on the device)"
                       if self.backend == "cuda" else "nmf_batched (init='custom': the shared start)")
        if p is not None and p.is_gsnmf:
            out.append("group_sparse_nmf" if self._gs_entry else "nmf._solve(groups=...)")
        if p is not None and p.sparse:
            out.append("scipy CSR X passed as it is (kernel " + ("/".join(kernels) or "?") + ")")
            if state.get("convert_s") is not None:
                out.append(f"each call copies X to its CSR and builds X^T: "
                           f"{state['convert_s'] * 1e3:.3g} ms of the time, measured apart")
        return "; ".join(out)


def _sparse_convert_time(X, repeats=3):
    """Seconds dffkit's sparse entry takes to copy X to its canonical CSR and build the CSR of
    X^T (inside every timed call), best of ``repeats``; None where that private step moved."""
    try:
        from dffkit.nmf import _SparseX
    except ImportError:
        return None
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            _SparseX(X).cols()
        except Exception:  # noqa: BLE001 - an internal that changed: no note, not a failure
            return None
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
    return best


def _free_device_memory():
    if "torch" in __import__("sys").modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "cupy" in __import__("sys").modules:
        import cupy

        try:
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001 - no device: nothing to free
            pass


# ---------------------------------------------------------------------------------------------
# scikit-learn
# ---------------------------------------------------------------------------------------------

class SklearnContender(Contender):
    family = "peer"
    library = "scikit-learn"
    device = "cpu"
    accepts_sparse = True  # MU and CD both take CSR X

    def __init__(self, solver="mu"):
        self.solver = solver
        self.name = f"sklearn-{solver}"

    def unavailable(self):
        return _cannot_import("sklearn.decomposition", "scikit-learn", "pip install scikit-learn")

    def unsupported(self, problem):
        if problem.is_gsnmf:
            return "scikit-learn has no group-sparse NMF"
        if self.solver == "cd" and problem.beta != 2:
            return "scikit-learn's CD solver supports only the Frobenius loss"
        if self.solver == "cd" and problem.batch:
            return "time-to-target is measured per problem; CD skips batches"
        return None

    def setup(self, s):
        from sklearn.decomposition import non_negative_factorization

        self._nnf = non_negative_factorization
        return s

    def start(self, s):
        return s.W0.copy(), s.H0.copy()  # scikit-learn updates W and H in place

    def solve(self, s, args, n_iter):
        W, H = args
        p = s.problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if p.batch:
                outs = [self._nnf(s.X[b], W[b], H[b], n_components=p.k, init="custom",
                                  solver=self.solver, beta_loss=p.loss, tol=0, max_iter=n_iter)
                        for b in range(p.batch)]
                return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
            Wo, Ho, _ = self._nnf(s.X, W, H, n_components=p.k, init="custom", solver=self.solver,
                                  beta_loss=p.loss, tol=0, max_iter=n_iter)
        return Wo, Ho

    def notes(self, state):
        if state.problem.sparse:
            return "scipy CSR X"
        return "loop over the batch" if state.problem.batch else ""


# ---------------------------------------------------------------------------------------------
# plain array-library MU loops
# ---------------------------------------------------------------------------------------------

class TorchContender(Contender):
    family = "peer"
    library = "torch"

    def __init__(self, device="cpu", precision="fp32"):
        self.device = device
        self.precision = precision
        self.name = f"torch-{device}" + ("" if precision == "fp32" else "-" + precision)

    def sparse_unsupported(self):
        return ("sparse X: this PyTorch MU loop takes dense tensors (torch.matmul); no sparse "
                "variant is benchmarked")

    def unavailable(self):
        why = _cannot_import("torch", "PyTorch", "pip install torch")
        if why:
            return why
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return "PyTorch sees no CUDA device"
        return None

    def setup(self, s):
        import torch

        self._torch = torch
        dev = torch.device(self.device)
        state = {"s": s, "X": torch.from_numpy(s.X).to(dev), "W0": torch.from_numpy(s.W0).to(dev),
                 "H0": torch.from_numpy(s.H0).to(dev)}
        if s.problem.is_gsnmf:
            sizes = torch.tensor(np.diff(s.offsets), device=dev)
            n_groups = len(s.offsets) - 1
            gid = torch.repeat_interleave(torch.arange(n_groups, device=dev), sizes)
            k = s.problem.k

            def segment_sum(A):
                acc = torch.zeros((n_groups, k), dtype=A.dtype, device=A.device)
                acc.index_add_(0, gid, A)
                return acc[gid]

            state["segment_sum"] = segment_sum
        self.sync()
        return state

    def start(self, state):
        return state["W0"].clone(), state["H0"].clone()

    def solve(self, state, args, n_iter):
        torch = self._torch
        s = state["s"]
        W, H = args

        class _xp:  # the few numpy names the loop uses
            maximum = staticmethod(lambda a, b: torch.clamp_min(a, b))
            sqrt = staticmethod(torch.sqrt)

        # TF32 is a process-wide switch: set for this contender's own solves only (set once in
        # setup, the last contender's setting held for every contender's timed solves, which run
        # round-robin after all setups: the fp32 rows of every GPU suite report up to session 6 ran
        # TF32)
        flags = torch.backends.cuda.matmul
        old = flags.allow_tf32
        flags.allow_tf32 = self.device == "cuda" and self.precision == "tf32"
        try:
            with torch.no_grad():
                mu_iterations(_xp, state["X"], W, H, s.problem.beta, n_iter, lam=s.lam, mu=s.mu,
                              segment_sum=state.get("segment_sum"))
            self.sync()
        finally:
            flags.allow_tf32 = old
        return W, H

    def sync(self):
        if self.device == "cuda":
            self._torch.cuda.synchronize() if hasattr(self, "_torch") else None

    def fetch(self, state, out):
        return to_numpy(out[0]), to_numpy(out[1])

    def teardown(self, state):
        state.clear()
        _free_device_memory()

    def notes(self, state):
        n = "torch.matmul (cuBLAS" + (", TF32" if self.precision == "tf32" else "") + ")" \
            if self.device == "cuda" else "torch.matmul (CPU BLAS)"
        return n


class CupyContender(Contender):
    family = "peer"
    library = "cupy"
    device = "cuda"
    name = "cupy-cuda"

    def sparse_unsupported(self):
        return ("sparse X: this CuPy MU loop takes dense arrays (cupy.matmul); no sparse "
                "variant is benchmarked")

    def unavailable(self):
        why = _cannot_import("cupy", "CuPy", "pip install cupy-cuda12x")
        if why:
            return why
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                return "CuPy sees no CUDA device"
        except Exception as exc:  # noqa: BLE001 - any CUDA failure means: not usable here
            return f"CuPy cannot use a CUDA device: {exc}"
        return None

    def setup(self, s):
        import cupy

        self._cp = cupy
        state = {"s": s, "X": cupy.asarray(s.X), "W0": cupy.asarray(s.W0), "H0": cupy.asarray(s.H0)}
        if s.problem.is_gsnmf:
            import cupyx

            sizes = np.diff(s.offsets)
            n_groups = len(sizes)
            gid = cupy.asarray(np.repeat(np.arange(n_groups), sizes))
            k = s.problem.k

            def segment_sum(A):
                acc = cupy.zeros((n_groups, k), dtype=A.dtype)
                cupyx.scatter_add(acc, gid, A)
                return acc[gid]

            state["segment_sum"] = segment_sum
        self.sync()
        return state

    def start(self, state):
        return state["W0"].copy(), state["H0"].copy()

    def solve(self, state, args, n_iter):
        s = state["s"]
        W, H = args
        mu_iterations(self._cp, state["X"], W, H, s.problem.beta, n_iter, lam=s.lam, mu=s.mu,
                      segment_sum=state.get("segment_sum"))
        self.sync()
        return W, H

    def sync(self):
        if hasattr(self, "_cp"):
            self._cp.cuda.Device().synchronize()

    def fetch(self, state, out):
        return to_numpy(out[0]), to_numpy(out[1])

    def teardown(self, state):
        state.clear()
        _free_device_memory()

    def notes(self, state):
        return "cupy.matmul (cuBLAS)"


def default_contenders() -> list:
    """Every contender the bench knows, dffkit first; unusable ones are reported as skipped."""
    return [
        DffkitContender("cpu"),
        DffkitContender("cuda", "fp32"),
        DffkitContender("cuda", "tf32"),
        DffkitContender("cuda", "bf16x"),
        DffkitContender("cuda", "fp32", engine="sweep"),
        DffkitContender("cuda", "bf16x", engine="sweep"),
        SklearnContender("mu"),
        SklearnContender("cd"),
        TorchContender("cpu"),
        TorchContender("cuda"),
        TorchContender("cuda", "tf32"),
        CupyContender(),
    ]
