"""The NMF contract (issue 3): parity with scikit-learn's MU, determinism, monotonicity,
initialisation, bad input. Every body runs on every available backend."""
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dffkit
from dffkit import _backends

from conftest import readonly

sk_decomp = pytest.importorskip("sklearn.decomposition")


def make_problem(rng, m=60, n=40, k=4, dtype=np.float64, zeros=False):
    X = rng.random((m, k)) @ rng.random((k, n)) + 0.05 * rng.random((m, n))
    if zeros:
        X[rng.random((m, n)) < 0.2] = 0.0
    W0 = rng.random((m, k)) + 0.1
    H0 = rng.random((k, n)) + 0.1
    return X.astype(dtype), W0.astype(dtype), H0.astype(dtype)


def rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


PENALTIES = [
    {},
    {"alpha_W": 0.01, "l1_ratio": 1.0},                   # l1 on both (alpha_H="same")
    {"alpha_W": 0.02, "l1_ratio": 0.0},                   # l2 on both
    {"alpha_W": 0.01, "alpha_H": 0.0, "l1_ratio": 0.5},   # W only, mixed
    {"alpha_W": 0.0, "alpha_H": 0.03, "l1_ratio": 0.3},   # H only
]


# ---------------------------------------------------------------------------------------------
# parity with scikit-learn
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()) or "none")
def test_parity_with_sklearn_mu(backend, rng, beta_loss, dtype, penalty):
    X, W0, H0 = make_problem(rng, dtype=dtype, zeros=beta_loss == "kullback-leibler")
    for n_iter in (1, 10, 200):
        Ws, Hs, _ = sk_decomp.non_negative_factorization(
            X, W0.copy(), H0.copy(), n_components=W0.shape[1], init="custom", solver="mu",
            beta_loss=beta_loss, tol=0, max_iter=n_iter, **penalty)
        Wd, Hd, it = dffkit.non_negative_factorization(
            readonly(X), readonly(W0), readonly(H0), n_components=W0.shape[1], init="custom",
            beta_loss=beta_loss, tol=0, max_iter=n_iter, backend=backend, **penalty)
        assert it == n_iter
        assert Wd.dtype == dtype and Hd.dtype == dtype
        if dtype == np.float64:
            bound = 1e-8
        else:
            bound = 1e-4 if n_iter <= 10 else 1e-3
        assert rel(Wd, Ws) <= bound, (n_iter, rel(Wd, Ws))
        assert rel(Hd, Hs) <= bound, (n_iter, rel(Hd, Hs))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(77, 9, 11), (130, 64, 17), (130, 65, 17), (35, 1, 2), (2000, 48, 24),
                                   (700, 400, 16), (700, 400, 24), (520, 600, 100), (1100, 300, 36),
                                   (1100, 2000, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_parity_narrow_and_wide_shapes(backend, rng, dtype, shape):
    # the CPU engine computes X H^T from X^T when X has at most 64 columns and 8 MiB (a vector of
    # rows at a time, 8 columns of the result at a time, masked tails); by outer products with H^T when
    # X is over 1 MiB and k >= 16 fills its vectors (the last five shapes: one to four vectors of
    # columns, tiles of 6 and 8 rows and the last rows of a block, masked stores; k = 20 only over
    # 8 MiB); else by dot products along rows
    m, n, k = shape
    X, W0, H0 = make_problem(rng, m=m, n=n, k=k, dtype=dtype)
    if backend == "cuda":
        # the CUDA engine keeps its k x k statistics in shared memory: beyond the largest k it
        # serves (float64 k = 100 on an H100/H200, which hold k <= 97; float32 k <= 146) it
        # refuses with a ValueError that names the limit and the fixes
        from dffkit import _cuda_backend

        most = _cuda_backend.max_components(n, dtype)
        if k > most:
            name = np.dtype(dtype).name
            with pytest.raises(ValueError, match=rf"n_components={k} is too large for the CUDA "
                               rf"engine.* n_components <= {most} for {name} data.*"
                               rf"Use n_components <= {most}.*backend='cpu'"):
                dffkit.non_negative_factorization(X, W0, H0, n_components=k, init="custom",
                                                  tol=0, max_iter=1, backend=backend)
            return
    for n_iter in (1, 10):
        Ws, Hs, _ = sk_decomp.non_negative_factorization(
            X, W0.copy(), H0.copy(), n_components=k, init="custom", solver="mu", tol=0, max_iter=n_iter)
        Wd, Hd, _ = dffkit.non_negative_factorization(
            X, W0, H0, n_components=k, init="custom", tol=0, max_iter=n_iter, backend=backend)
        bound = 1e-8 if dtype == np.float64 else 1e-4
        assert rel(Wd, Ws) <= bound, (n_iter, rel(Wd, Ws))
        assert rel(Hd, Hs) <= bound, (n_iter, rel(Hd, Hs))


def _fake_cuda_limit(monkeypatch, most):
    """backend='auto' as on a machine with a usable CUDA engine that serves n_components <= most
    (the engine's answer, _cuda_backend.max_components, mocked); host X of any size goes to
    CUDA when it fits. The CUDA engine itself must not run. Returns the recorded queries."""
    from dffkit import _cuda_backend, nmf as nmf_mod

    queries = []

    def max_components(n, dtype, beta=2, precision="fp32", batched=False, device=None):
        queries.append((n, np.dtype(dtype), beta, precision, batched))
        return most

    def no_cuda():
        raise AssertionError("backend='auto' ran the CUDA engine for a problem it cannot serve")

    monkeypatch.setattr(_backends, "available_backends", lambda: ["cuda", "cpu"])
    monkeypatch.setattr(_backends, "cuda", no_cuda)
    monkeypatch.setattr(_cuda_backend, "max_components", max_components)
    monkeypatch.setattr(nmf_mod, "_AUTO_CUDA_MIN_ELEMENTS", 1000)
    return queries


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_auto_backend_falls_back_to_cpu_beyond_the_cuda_components_limit(monkeypatch, rng, dtype,
                                                                         beta_loss):
    from dffkit.nmf import _resolve_backend

    X, W0, H0 = make_problem(rng, m=60, n=40, k=6, dtype=dtype, zeros=beta_loss != "frobenius")
    beta = 2 if beta_loss == "frobenius" else 1
    kw = dict(n_components=6, init="custom", beta_loss=beta_loss, tol=0, max_iter=20)
    queries = _fake_cuda_limit(monkeypatch, 5)
    W, H, _, res = dffkit.non_negative_factorization(X, W0, H0, backend="auto", return_info=True,
                                                     **kw)
    assert res.backend == "cpu" and res.kernel == "cpu"
    assert queries == [(40, np.dtype(dtype), beta, "fp32", False)]
    Wc, Hc, _, rc = dffkit.non_negative_factorization(X, W0, H0, backend="cpu", return_info=True,
                                                      **kw)
    assert np.array_equal(W, Wc) and np.array_equal(H, Hc) and res.error == rc.error
    # the estimator goes the same way, and says so
    est = dffkit.NMF(backend="auto", **kw).fit(X, W=W0, H=H0)
    assert est.backend_ == "cpu"
    # within the limit, auto keeps CUDA; small problems stay on the CPU without asking; an
    # explicit backend is never second-guessed
    assert _resolve_backend("auto", False, 2400, k=5, problems=[(40, dtype)], beta=beta) == "cuda"
    assert _resolve_backend("auto", False, 2400, k=6, problems=[(40, dtype)], beta=beta) == "cpu"
    del queries[:]
    assert _resolve_backend("auto", False, 999, k=6, problems=[(40, dtype)]) == "cpu"
    assert not queries
    assert _resolve_backend("cpu", False, 10 ** 9, k=6, problems=[(40, dtype)]) == "cpu"


def test_auto_backend_batched_falls_back_to_cpu_beyond_the_cuda_components_limit(monkeypatch):
    rng = np.random.default_rng(7)
    Xs = [make_problem(rng, m=m, n=n, k=6, dtype=dt)[0]
          for m, n, dt in [(60, 40, np.float32), (50, 30, np.float64), (40, 40, np.float32)]]
    queries = _fake_cuda_limit(monkeypatch, 5)
    out = dffkit.nmf_batched(Xs, 6, random_state=3, tol=0, max_iter=15, backend="auto")
    assert [r.backend for _, _, r in out] == ["cpu"] * 3
    # at most one query per (n_features, dtype), for the batched solver (the first refusal
    # decides)
    assert queries and len(set(queries)) == len(queries)
    assert set(queries) <= {(40, np.dtype(np.float32), 2, "fp32", True),
                            (30, np.dtype(np.float64), 2, "fp32", True)}
    ref = dffkit.nmf_batched(Xs, 6, random_state=3, tol=0, max_iter=15, backend="cpu")
    for (W, H, r), (Wc, Hc, rc) in zip(out, ref):
        assert np.array_equal(W, Wc) and np.array_equal(H, Hc) and r.error == rc.error


def _portable_flag_sets():
    """Compiler flags for builds of the CPU engine other than the package's -march=native: the
    compiler's default target (SSE2 on x86-64: no AVX-512 code path), and AVX2 with FMA."""
    import platform
    sets = [[]]
    if platform.machine().lower() in ("x86_64", "amd64"):
        sets.append(["-march=x86-64-v3"])
    return sets


def _cxx():
    """The C++ compiler ($CXX, c++, g++ or clang++); skips the test where there is none."""
    import shutil
    cxx = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++")
                if c and shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


@pytest.fixture(scope="module")
def portable_engines(tmp_path_factory):
    from pathlib import Path
    cxx = _cxx()
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("portable")
    probe = out / "probe.cpp"
    probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")

    def accepted(flags):  # the compiler takes -fopenmp (and the flags) at all
        return subprocess.run([cxx, "-fopenmp", *flags, str(probe), "-o", str(out / "probe")],
                              capture_output=True).returncode == 0

    if not accepted([]):
        pytest.skip(f"{cxx} does not build OpenMP programs with -fopenmp")
    exes = {}
    for flags in filter(accepted, _portable_flag_sets()):
        exe = out / ("engine" + "".join(flags).replace("=", "_"))
        cmd = [cxx, "-std=c++17", "-O2", "-fopenmp", "-Wall", "-Wextra", "-Werror", *flags,
               f"-I{root / 'cpp'}", str(root / "tests" / "cpp" / "engine_portable.cpp"),
               str(root / "cpp" / "nmf_mu_sparse.cpp"), "-o", str(exe)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(flags) or 'default flags'}:\n{done.stderr[-4000:]}"
        exes[" ".join(flags) or "default"] = exe
    return exes


@pytest.mark.parametrize("case", [
    (77, 9, 11, np.float32, "frobenius", 0),     # narrow X: the transposed-copy path, masked tails
    (130, 65, 17, np.float64, "frobenius", 0),   # row dot products, tails
    (300, 200, 40, np.float32, "frobenius", 0),  # a larger rank
    (700, 400, 24, np.float32, "frobenius", 0),  # X over 1 MiB: outer products from H^T
    (400, 400, 40, np.float64, "frobenius", 0),
    (3000, 120, 8, np.float32, "frobenius", 0),  # several chunks on two threads
    (60, 40, 4, np.float32, "kullback-leibler", 0),
    # the sparse engine: rows of 1, 2, 4 and 9+ machine vectors (register-resident kernels up to
    # 4 with 16 registers, 8 with 32; beyond, the any-k kernel and blocked denominators)
    (300, 200, 5, np.float32, "frobenius", 1),
    (300, 200, 20, np.float32, "kullback-leibler", 1),
    (301, 230, 40, np.float64, "frobenius", 1),
    (290, 210, 140, np.float32, "frobenius", 1),
    (250, 180, 140, np.float32, "kullback-leibler", 1),
], ids=lambda c: f"{c[0]}x{c[1]}k{c[2]}-{np.dtype(c[3]).name}-{c[4][:3]}{'-sparse' if c[5] else ''}")
def test_engine_builds_and_agrees_without_native_flags(portable_engines, rng, tmp_path, case):
    # the package is compiled with -march=native; these builds compile (with -Werror) and run the
    # code the engines use on machines without AVX-512 (16- and 32-byte vectors, tiles for 16
    # registers), and must agree with scikit-learn as the package's build does
    m, n, k, dtype, loss, sparse = case
    X, W0, H0 = make_problem(rng, m=m, n=n, k=k, dtype=dtype, zeros=loss != "frobenius")
    if sparse:
        X[rng.random(X.shape) < 0.85] = 0.0  # 15 % stored
    n_iter = 10
    Ws, Hs, _ = sk_decomp.non_negative_factorization(
        X, W0.copy(), H0.copy(), n_components=k, init="custom", solver="mu", beta_loss=loss,
        tol=0, max_iter=n_iter)
    bound = 1e-8 if dtype == np.float64 else 1e-4
    for name, exe in portable_engines.items():
        d = tmp_path / name.replace(" ", "_").replace("=", "_")
        d.mkdir()
        meta = dict(m=m, n=n, k=k, dtype="f64" if dtype == np.float64 else "f32",
                    loss="kl" if loss != "frobenius" else "frobenius", max_iter=n_iter, threads=2,
                    sparse=sparse)
        (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
        for arr, fname in ((X, "X"), (W0, "W"), (H0, "H")):
            np.ascontiguousarray(arr).tofile(d / f"{fname}.bin")
        done = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (name, done.stderr)
        W = np.fromfile(d / "W_out.bin", dtype=dtype).reshape(m, k)
        H = np.fromfile(d / "H_out.bin", dtype=dtype).reshape(k, n)
        assert rel(W, Ws) <= bound, (name, rel(W, Ws))
        assert rel(H, Hs) <= bound, (name, rel(H, Hs))
        it, _, err = (float(v) for v in (d / "out.txt").read_text().split())
        assert it == n_iter
        ref = np.linalg.norm(X.astype(np.float64) - Ws.astype(np.float64) @ Hs.astype(np.float64))
        if loss == "frobenius":
            assert abs(err - ref) <= 1e-4 * ref, (name, err, ref)


def test_random_fill_is_the_scalar_draws_in_every_build(tmp_path):
    # init="random" fills a machine vector of draws at a time where the build has vector FMA
    # (AVX-512, AVX2): the bits must be philox_half_normal's (the CUDA backend draws one element
    # per thread with it), the elements the vector path hands back to it (4.6 %) included, in
    # the package's build (-march=native), an AVX2 one and one without vectors
    from pathlib import Path
    cxx = _cxx()
    root = Path(__file__).resolve().parent.parent
    builds = 0
    for flags in _portable_flag_sets() + [["-march=native"]]:
        exe = tmp_path / ("check" + "".join(flags).replace("=", "_"))
        cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *flags, f"-I{root / 'cpp'}",
               str(root / "tests" / "cpp" / "philox_check.cpp"), "-o", str(exe)]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0 and flags == ["-march=native"] and "march" in built.stderr:
            continue  # a compiler without -march=native (the package's build says so too)
        assert built.returncode == 0, f"{' '.join(flags) or 'default flags'}:\n{built.stderr[-4000:]}"
        done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (flags, done.stdout, done.stderr)
        words = done.stdout.split()
        checked, fallback = int(words[words.index("checked") + 1]), int(words[words.index("fallback") + 1])
        assert checked > 1_000_000 and 0.03 < fallback / checked < 0.06, done.stdout
        builds += 1
    assert builds >= 1


def _chunked_mean(X):
    """mean(X) in the engine's fixed order: 4096 consecutive elements summed in float64 in
    order, then the chunk sums in order (np.cumsum adds one element at a time)."""
    flat = np.ascontiguousarray(X, dtype=np.float64).ravel()
    sums = [np.cumsum(flat[c:c + 4096])[-1] for c in range(0, flat.size, 4096)]
    return np.cumsum(sums)[-1] / flat.size


@pytest.mark.parametrize("shape", [(3, 100), (40, 4096 // 5 * 8 + 3), (1, 4096 * 19 + 11), (700, 600)],
                         ids=["one-chunk", "groups-and-tail", "partial-group", "parallel"])
def test_random_init_scale_is_the_chunked_mean(rng, shape):
    # the engine sums eight chunks side by side (eight chains); the bits must be those of one
    # chunk at a time, in order: the CUDA backend sums in that order, and init="random" on each
    # backend must start from the same W and H. A 1 x 1 X holding the reference mean gives the
    # same scale (and so the same first draws of W and of H) only if the means are equal.
    X = rng.random(shape) * 3.7 + rng.random(shape) ** 9 * 1e3  # float64: every bit of the sum shows
    k, seed = 3, 2**33 + 7
    W, H = dffkit.initialize(X, k, init="random", random_state=seed)
    W1, H1 = dffkit.initialize(np.array([[_chunked_mean(X)]]), k, init="random", random_state=seed)
    assert np.array_equal(W.ravel()[:k], W1.ravel()) and np.array_equal(H.ravel()[:k], H1.ravel())


@pytest.mark.parametrize("k, ms", [(24, range(121, 129)), (64, range(129, 135)), (40, range(121, 129)),
                                   (16, range(121, 129))], ids=["k24", "k64", "k40", "k16"])
def test_outer_product_every_tile_height(rng, k, ms):
    # X of 2200 float32 columns (over 1 MiB) and one chunk of rows: blocks of 24 rows at k = 16
    # and 24, k rows at k = 40 and 64. With AVX-512, X H^T goes by tiles of 8 rows (6 at k = 64)
    # and one shorter tile for the rows that are left, so consecutive m give the last block every
    # tile height
    for m in ms:
        X, W0, H0 = make_problem(rng, m=m, n=2200, k=k, dtype=np.float32)
        Ws, Hs, _ = sk_decomp.non_negative_factorization(
            X, W0.copy(), H0.copy(), n_components=k, init="custom", solver="mu", tol=0, max_iter=2)
        Wd, Hd, _ = dffkit.non_negative_factorization(
            X, W0, H0, n_components=k, init="custom", tol=0, max_iter=2, backend="cpu")
        assert rel(Wd, Ws) <= 1e-5, (m, rel(Wd, Ws))
        assert rel(Hd, Hs) <= 1e-5, (m, rel(Hd, Hs))


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_parity_update_H_false(backend, rng, beta_loss, dtype):
    X, _, H0 = make_problem(rng, dtype=dtype)
    for n_iter in (1, 10, 200):
        Ws, Hs, _ = sk_decomp.non_negative_factorization(
            X, None, H0.copy(), n_components=H0.shape[0], init="custom", update_H=False,
            solver="mu", beta_loss=beta_loss, tol=0, max_iter=n_iter)
        Wd, Hd, _ = dffkit.non_negative_factorization(
            X, None, H0, n_components=H0.shape[0], init="custom", update_H=False,
            beta_loss=beta_loss, tol=0, max_iter=n_iter, backend=backend)
        bound = 1e-8 if dtype == np.float64 else (1e-4 if n_iter <= 10 else 1e-3)
        assert rel(Wd, Ws) <= bound
        np.testing.assert_array_equal(Hd, H0)  # H is fixed


@pytest.mark.parametrize("shape", [(77, 9, 11), (130, 65, 17), (700, 400, 24), (3000, 120, 8)],
                         ids=["narrow-X", "row-dots", "outer-products", "chunks"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fixed_components_frobenius_every_product_path(rng, shape, dtype):
    # update_H=False with the Frobenius loss computes X H^T once (scikit-learn caches it too)
    # with whichever product the shape takes (X^T copies for narrow X, outer products from H^T
    # for X over 1 MiB at k >= 16, row dot products), then m k^2 work an iteration: against
    # scikit-learn with penalties, the tol test's n_iter included, on 1 and 2 threads
    m, n, k = shape
    X, W0, H0 = make_problem(rng, m=m, n=n, k=k, dtype=dtype)
    kw = dict(update_H=False, alpha_W=0.002, l1_ratio=0.3, tol=1e-4, max_iter=300)
    Ws, _, its = sk_decomp.non_negative_factorization(X, None, H0.copy(), n_components=k,
                                                      solver="mu", **kw)
    runs = []
    for threads in (1, 2):
        before = dffkit.get_num_threads()
        dffkit.set_num_threads(threads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(dffkit.non_negative_factorization(X, None, H0, n_components=k, backend="cpu",
                                                              return_info=True, **kw))
        finally:
            dffkit.set_num_threads(before)
    (W, H, it, info), (W2, _, it2, info2) = runs
    np.testing.assert_array_equal(W, W2)  # the thread count changes no bit
    assert it == it2 == its
    assert rel(W, Ws) <= (1e-9 if dtype == np.float64 else 2e-3), rel(W, Ws)
    np.testing.assert_array_equal(H, H0)
    ref = np.linalg.norm(X.astype(np.float64) - W.astype(np.float64) @ H0.astype(np.float64))
    assert info.error == pytest.approx(ref, rel=1e-6) and info2.error == info.error


@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_same_n_iter_as_sklearn_with_tol(backend, rng, beta_loss, tol):
    X, W0, H0 = make_problem(rng, m=80, n=50, k=5)
    _, _, it_s = sk_decomp.non_negative_factorization(
        X, W0.copy(), H0.copy(), n_components=5, init="custom", solver="mu",
        beta_loss=beta_loss, tol=tol, max_iter=1000)
    _, _, it_d = dffkit.non_negative_factorization(
        X, W0, H0, n_components=5, init="custom", beta_loss=beta_loss, tol=tol, max_iter=1000,
        backend=backend)
    assert it_d == it_s
    assert it_d % 10 == 0 and it_d < 1000


def test_reported_error_matches_numpy(backend, rng):
    X, W0, H0 = make_problem(rng)
    for beta_loss in ("frobenius", "kullback-leibler"):
        W, H, _, info = dffkit.non_negative_factorization(
            X, W0, H0, n_components=4, init="custom", beta_loss=beta_loss, tol=0, max_iter=30,
            backend=backend, return_info=True)
        if beta_loss == "frobenius":
            expect0, expect = np.linalg.norm(X - W0 @ H0), np.linalg.norm(X - W @ H)
        else:
            def kl(W_, H_):
                WH = W_ @ H_
                return np.sqrt(2 * np.sum(X * np.log(X / WH) - X + WH))
            expect0, expect = kl(W0, H0), kl(W, H)
        assert info.error_init == pytest.approx(expect0, rel=1e-9)
        assert info.error == pytest.approx(expect, rel=1e-9)
        assert info.backend == backend
        # which kernels ran: the small problem stays on chip on a GPU
        assert info.kernel == "cpu" if backend == "cpu" else info.kernel in (
            "resident", "resident-fast", "resident-fast-cols")


@pytest.mark.parametrize("start", ["near", "nndsvda"])
def test_float32_error_is_accurate_when_the_fit_is_good(backend, start):
    """float32, a rank-2 X: the reported error is the true one, and the tol test stops where the
    float64 fit from the same start stops. (Taken from sums of float32 products, the error is a
    difference of terms of the size of ||X||^2: rounding noise, 2.94 reported for 1.98 true, and
    the tol test stopped at 470 of 990 iterations.)"""
    rng = np.random.default_rng(0)
    Wt, Ht = rng.random((2000, 2)) + 0.5, rng.random((2, 100)) + 0.5
    X64 = Wt @ Ht
    if start == "near":
        W0 = Wt * (1 + 0.05 * rng.random(Wt.shape))
        H0 = Ht * (1 + 0.05 * rng.random(Ht.shape))
    else:
        W0, H0 = dffkit.initialize(X64, 2, init="nndsvda")
    fits = {}
    for dtype in (np.float32, np.float64):
        X = X64.astype(dtype)
        W, H, n_iter, info = dffkit.non_negative_factorization(
            X, W0.astype(dtype), H0.astype(dtype), n_components=2, init="custom", tol=1e-4,
            max_iter=2000, backend=backend, return_info=True)
        true0 = np.linalg.norm(X.astype(float) - W0.astype(dtype).astype(float) @ H0.astype(dtype))
        true = np.linalg.norm(X.astype(float) - W.astype(float) @ H.astype(float))
        assert info.error_init == pytest.approx(true0, rel=1e-4)
        assert info.error == pytest.approx(true, rel=1e-3)
        fits[dtype] = (n_iter, true)
    assert abs(fits[np.float32][0] - fits[np.float64][0]) <= 10
    assert fits[np.float32][1] == pytest.approx(fits[np.float64][1], rel=0.02)


# ---------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------

def test_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    reason = ("scikit-learn's own NMF(solver='mu') fails it too: multiplicative updates "
              "converge slowly, so fit_transform and a later transform differ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(
            dffkit.NMF(backend="cpu"),
            expected_failed_checks={
                "check_transformer_general": reason,
                "check_transformer_data_not_an_array": reason,
            },
        )


def test_estimator_matches_sklearn_estimator(backend, rng):
    X, _, _ = make_problem(rng, m=50, n=30, k=3)
    ours = dffkit.NMF(n_components=3, init="nndsvda", tol=0, max_iter=50, backend=backend)
    theirs = sk_decomp.NMF(n_components=3, init="nndsvda", solver="mu", tol=0, max_iter=50)
    Wd = ours.fit_transform(X)
    Ws = theirs.fit_transform(X)
    assert rel(ours.components_, theirs.components_) < 1e-6
    assert rel(Wd, Ws) < 1e-6
    assert ours.reconstruction_err_ == pytest.approx(theirs.reconstruction_err_, rel=1e-6)
    assert ours.n_iter_ == theirs.n_iter_ == 50
    assert ours.n_features_in_ == 30 and ours.n_components_ == 3
    # float64 on a GPU: the general resident kernel (the fast path is float32)
    assert ours.backend_ == backend and ours.kernel_ == ("cpu" if backend == "cpu" else "resident")
    Wt = ours.transform(X[:7])
    np.testing.assert_allclose(Wt, theirs.transform(X[:7]), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(ours.inverse_transform(Wd), Wd @ ours.components_)
    assert ours.get_params()["backend"] == backend
    assert ours.set_params(max_iter=7).max_iter == 7


def test_solver_cd_refused():
    with pytest.raises(ValueError, match="solver='mu'"):
        dffkit.NMF(solver="cd").fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="solver='mu'"):
        dffkit.non_negative_factorization(np.ones((4, 3)), n_components=2, solver="cd")


# ---------------------------------------------------------------------------------------------
# determinism, threads, monotonicity
# ---------------------------------------------------------------------------------------------

def test_same_seed_same_bits(backend, rng):
    X, _, _ = make_problem(rng, m=300, n=64, k=6, dtype=np.float32)
    a = dffkit.non_negative_factorization(X, n_components=6, init="random", random_state=7,
                                          max_iter=50, backend=backend)
    b = dffkit.non_negative_factorization(X, n_components=6, init="random", random_state=7,
                                          max_iter=50, backend=backend)
    c = dffkit.non_negative_factorization(X, n_components=6, init="random", random_state=8,
                                          max_iter=50, backend=backend)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("beta", [2, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, n, k", [(3000, 200, 7), (8000, 50, 7), (3000, 200, 24), (600, 2100, 32)],
                         ids=["rows", "narrow", "outer", "outer-wide"])  # several row chunks; each
# form of X H^T; the last with H^T and H H^T made on all threads (k^2 n >= 2^21)
def test_thread_count_does_not_change_bits(rng, beta, dtype, m, n, k):
    cpu = _backends.cpu()
    X, W0, H0 = make_problem(rng, m=m, n=n, k=k, dtype=dtype)
    out = []
    for threads in (1, 2):
        W, H = W0.copy(), H0.copy()
        p = cpu.Params()
        p.beta, p.max_iter, p.tol, p.num_threads = beta, 25, 0.0, threads
        info = cpu.fit(X, W, H, p)
        out.append((W, H, info["error"]))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert out[0][2] == out[1][2]


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3),
)
def test_frobenius_loss_never_increases(m, n, k, seed, scale):
    rng = np.random.default_rng(seed)
    X = rng.random((m, n)) * scale
    X[rng.random((m, n)) < 0.3] = 0.0
    W = rng.random((m, k)) + 1e-3
    H = rng.random((k, n)) + 1e-3
    loss = 0.5 * np.sum((X - W @ H) ** 2)
    for _ in range(15):
        if not (W.any() and H.any()):  # X == 0 drives a factor to zero: nothing left to update
            break
        W, H, _ = dffkit.non_negative_factorization(X, W, H, n_components=k, init="custom",
                                                    tol=0, max_iter=1, backend="cpu")
        new = 0.5 * np.sum((X - W @ H) ** 2)
        assert new <= loss * (1 + 1e-12) + 1e-12
        loss = new


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------

def _philox4x32(ctr, key):
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c = list(ctr)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return c


def _half_normal_reference(seed, stream, index):
    attempt = 0
    while True:
        r = _philox4x32([index & 0xFFFFFFFF, index >> 32, stream, attempt],
                        (seed & 0xFFFFFFFF, seed >> 32))
        for p in (0, 2):
            u = (2.0 * r[p] + 1.0) / 2**32 - 1.0
            v = (2.0 * r[p + 1] + 1.0) / 2**32 - 1.0
            s = u * u + v * v
            if 0.0 < s < 1.0:
                return abs(u * math.sqrt(-2.0 * math.log(s) / s))
        attempt += 1


def test_random_init_is_philox_half_normal(rng):
    X = rng.random((30, 20)) * 3
    W, H = dffkit.initialize(X, 4, init="random", random_state=2**40 + 5)
    scale = math.sqrt(X.mean() / 4)
    for idx in (0, 1, 7, 119):
        assert W.flat[idx] == pytest.approx(scale * _half_normal_reference(2**40 + 5, 0, idx), rel=1e-14)
    for idx in (0, 3, 79):
        assert H.flat[idx] == pytest.approx(scale * _half_normal_reference(2**40 + 5, 1, idx), rel=1e-14)
    # scikit-learn's scale: E|N(0,1)| = sqrt(2/pi)
    big_W, _ = dffkit.initialize(rng.random((4000, 50)), 5, init="random", random_state=1)
    assert big_W.mean() == pytest.approx(math.sqrt(0.5 / 5) * math.sqrt(2 / math.pi), rel=0.02)


@pytest.mark.parametrize("init", ["nndsvd", "nndsvda", "nndsvdar"])
def test_nndsvd_matches_sklearn(rng, init):
    from sklearn.decomposition._nmf import _initialize_nmf

    X = rng.random((60, 6)) @ rng.random((6, 30))
    Wd, Hd = dffkit.initialize(X, 4, init=init, random_state=0)
    Ws, Hs = _initialize_nmf(X, 4, init=init, random_state=0)
    if init == "nndsvdar":  # the zeros of NNDSVD get random fills: compare the other entries
        mask = dffkit.initialize(X, 4, init="nndsvd")[0] > 0
        np.testing.assert_allclose(Wd[mask], Ws[mask], rtol=1e-6)
        assert (Wd[~mask] > 0).all() and (Wd[~mask] < X.mean()).all()
    else:
        np.testing.assert_allclose(Wd, Ws, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(Hd, Hs, rtol=1e-6, atol=1e-9)


def test_default_init_follows_sklearn(backend, rng):
    X, _, _ = make_problem(rng, m=20, n=10)
    # k <= min(m, n): nndsvda, deterministic
    a = dffkit.non_negative_factorization(X, n_components=3, max_iter=5, tol=0, backend=backend)
    b = sk_decomp.non_negative_factorization(X, n_components=3, solver="mu", max_iter=5, tol=0)
    assert rel(a[0], b[0]) < 1e-6


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------

def test_inputs_never_modified_and_layouts(backend, rng):
    X, W0, H0 = make_problem(rng)
    Xf = np.asfortranarray(X)
    Xs = X[:, ::1].copy()[::1]
    copies = [a.copy() for a in (X, W0, H0)]
    ref = dffkit.non_negative_factorization(X, W0, H0, n_components=4, init="custom", tol=0,
                                            max_iter=20, backend=backend)
    for variant in (readonly(X.copy()), Xf, np.repeat(X, 2, axis=1)[:, ::2], Xs):
        out = dffkit.non_negative_factorization(variant, W0, H0, n_components=4, init="custom",
                                                tol=0, max_iter=20, backend=backend)
        np.testing.assert_array_equal(out[0], ref[0])
    for a, c in zip((X, W0, H0), copies):
        np.testing.assert_array_equal(a, c)


def test_integer_input_becomes_float64(backend):
    X = np.arange(1, 13, dtype=np.int32).reshape(4, 3)
    W, H, _ = dffkit.non_negative_factorization(X, n_components=2, init="random", random_state=0,
                                                max_iter=10, backend=backend)
    assert W.dtype == np.float64 and H.dtype == np.float64


def test_float32_stays_float32(backend, rng):
    X, _, _ = make_problem(rng, dtype=np.float32)
    W = dffkit.NMF(n_components=3, max_iter=20, backend=backend).fit_transform(X)
    assert W.dtype == np.float32


BAD = [
    (lambda: np.array([[1.0, -1.0], [0.5, 0.2]]), {}, ValueError, "Negative values"),
    (lambda: np.array([[1.0, np.nan], [0.5, 0.2]]), {}, ValueError, "NaN"),
    (lambda: np.array([[1.0, np.inf], [0.5, 0.2]]), {}, ValueError, "infinity"),
    (lambda: np.ones(5), {}, ValueError, "2-D"),
    (lambda: np.ones((2, 2, 2)), {}, ValueError, "2-D"),
    (lambda: np.ones((0, 3)), {}, ValueError, "empty"),
    (lambda: np.ones((3, 3)), {"n_components": 0}, ValueError, "n_components"),
    (lambda: np.ones((3, 3)), {"n_components": 2.5}, TypeError, "n_components"),
    (lambda: np.ones((3, 3)), {"init": "magic"}, ValueError, "init"),
    (lambda: np.ones((3, 3)), {"beta_loss": "itakura-saito"}, ValueError, "itakura-saito"),
    (lambda: np.ones((3, 3)), {"beta_loss": 0.5}, ValueError, "beta_loss"),
    (lambda: np.ones((3, 3)), {"backend": "tpu"}, ValueError, "available here"),
    (lambda: np.ones((3, 3)), {"tol": -1.0}, ValueError, "tol"),
    (lambda: np.ones((3, 3)), {"max_iter": -1}, ValueError, "max_iter"),
    (lambda: np.ones((3, 3)), {"alpha_W": -0.1}, ValueError, "alpha_W"),
    (lambda: np.ones((3, 3)), {"l1_ratio": 2.0}, ValueError, "l1_ratio"),
    (lambda: np.ones((3, 3)), {"init": "custom", "W": np.ones((3, 3)), "H": np.ones((2, 3))}, ValueError, "shape"),
    (lambda: np.ones((3, 3)), {"init": "custom", "W": -np.ones((3, 2)), "H": np.ones((2, 3))}, ValueError, "Negative"),
    (lambda: np.ones((3, 3)), {"init": "custom", "W": np.ones((3, 2), np.float32), "H": np.ones((2, 3))}, TypeError, "dtype"),
    (lambda: np.ones((3, 3)), {"init": "custom", "W": None, "H": np.ones((2, 3))}, ValueError, "W is required"),
    (lambda: np.ones((3, 3)), {"init": "nndsvd", "n_components": 5}, ValueError, "n_components <= min"),
    (lambda: np.array([["a", "b"]]), {}, TypeError, "numeric"),
]


@pytest.mark.parametrize("make_x, kwargs, exc, match", BAD)
def test_bad_input(make_x, kwargs, exc, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("n_components", 2)
    kwargs.setdefault("backend", "cpu")
    W, H = kwargs.pop("W", None), kwargs.pop("H", None)
    with pytest.raises(exc, match=match):
        dffkit.non_negative_factorization(make_x(), W, H, **kwargs)


def test_overflow_is_an_error_not_nan(backend):
    """float32 X of ~1e30: the Frobenius updates' products (X H^T, W H H^T) leave float32's range.
    A clear error naming X and the fix, not NaN factors; the fixes it names work (float64, or X
    scaled down). The KL updates work with ratios X / (W H) and stay finite there: no error."""
    rng = np.random.default_rng(5)
    X = (rng.random((30, 20)) * 1e30).astype(np.float32)
    opts = dict(n_components=3, init="random", random_state=0, max_iter=30, tol=0, backend=backend)
    top = re.escape(f"{float(X.max()):.3g}")
    with pytest.raises(ValueError, match=rf"overflowed float32 \(its largest value is {top}\).*Scale X down"):
        dffkit.non_negative_factorization(X, **opts)
    with np.errstate(all="raise"):
        W, H, _ = dffkit.non_negative_factorization(X / X.max(), **opts)
    assert np.isfinite(W).all() and np.isfinite(H).all()
    if backend == "cpu":  # float64 on the device is correct but slow; the host shows it
        W, H, _ = dffkit.non_negative_factorization(X.astype(np.float64), **opts)
        assert np.isfinite(W).all() and np.isfinite(W @ H).all()
    W, H, _ = dffkit.non_negative_factorization(X, beta_loss="kullback-leibler", **opts)
    assert np.isfinite(W).all() and np.isfinite(H).all()
    Xs = [X[:10] / X.max(), X, X[:15]]
    with pytest.raises(ValueError, match=r"nmf_batched: the factorization of X\[1\].*so did X\[2\]"):
        dffkit.nmf_batched(Xs, 3, max_iter=20, backend=backend)


def test_nndsvd_overflow_is_an_error():
    """X of 1e200: scikit-learn's randomized SVD (the start of init='nndsvda') stays finite, the
    factorization then overflows float64: an error that says so and the way out, not NaN."""
    X = np.full((6, 5), 1e200)
    X[0, 0] = 3e200
    with pytest.raises(ValueError, match="overflowed float64.*Scale X down"):
        dffkit.non_negative_factorization(X, n_components=2, init="nndsvda", backend="cpu")


def test_sparse_input_is_refused_clearly_where_dense_data_is_needed():
    sp = pytest.importorskip("scipy.sparse")
    X = sp.csr_matrix(np.ones((3, 3)))
    with pytest.raises(TypeError, match=r"nmf_batched needs dense data: pass X\[0\].toarray"):
        dffkit.nmf_batched([X], n_components=2, backend="cpu")
    with pytest.raises(ValueError, match="sparse X runs on the CPU backend.*backend='cpu'"):
        dffkit.non_negative_factorization(X, n_components=2, backend="cuda")


def test_backends_are_reported():
    names = dffkit.available_backends()
    assert "cpu" in names
    reasons = dffkit.unavailable_reasons()
    for name in ("cpu", "cuda"):
        assert (name in names) != (name in reasons)
    if "cuda" not in names:
        with pytest.raises(RuntimeError, match="not available"):
            dffkit.non_negative_factorization(np.ones((3, 3)), n_components=2, backend="cuda")


# ---------------------------------------------------------------------------------------------
# batched problems
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta_loss", ["frobenius", "kullback-leibler"])
def test_batched_equals_one_at_a_time(backend, rng, beta_loss):
    shapes = [(49, 64), (30, 64), (49, 64), (12, 20)]
    Xs = [rng.random(s).astype(np.float32) for s in shapes]
    out = dffkit.nmf_batched(Xs, 4, init="random", random_state=3, max_iter=60, tol=1e-4,
                             beta_loss=beta_loss, backend=backend)
    assert len(out) == len(Xs)
    for b, (X, (W, H, info)) in enumerate(zip(Xs, out)):
        W1, H1, it1 = dffkit.non_negative_factorization(
            X, n_components=4, init="random", random_state=3 + b, max_iter=60, tol=1e-4,
            beta_loss=beta_loss, backend=backend)
        assert info.n_iter == it1
        assert info.kernel == "cpu" if backend == "cpu" else info.kernel in (
            "resident", "resident-fast", "resident-fast-cols")
        if backend == "cpu":
            np.testing.assert_array_equal(W, W1)
            np.testing.assert_array_equal(H, H1)
        else:
            assert rel(W, W1) < 1e-5
    # a (B, m, n) array works the same as the list
    stacked = np.stack([Xs[0], Xs[2]])
    out2 = dffkit.nmf_batched(stacked, 4, init="random", random_state=3, max_iter=60,
                              beta_loss=beta_loss, backend=backend)
    np.testing.assert_array_equal(out2[0][0], out[0][0])
    # a batch of one (the CPU engine gives it the whole thread budget): the same bits, also for
    # a problem large enough to run on several threads
    cases = [(Xs[0], out[0])]
    if backend == "cpu":
        cases.append((rng.random((3000, 200)).astype(np.float32), None))
    for X, ref in cases:
        (W, H, info), = dffkit.nmf_batched([X], 4, init="random", random_state=3, max_iter=30 if ref is None else 60,
                                           tol=1e-4, beta_loss=beta_loss, backend=backend)
        if ref is None:
            ref = dffkit.non_negative_factorization(X, n_components=4, init="random", random_state=3, max_iter=30,
                                                    tol=1e-4, beta_loss=beta_loss, backend=backend)
        if backend == "cpu":
            np.testing.assert_array_equal(W, ref[0])
            np.testing.assert_array_equal(H, ref[1])
        else:
            assert rel(W, ref[0]) < 1e-5


def test_batched_bad_input():
    with pytest.raises(ValueError, match="empty batch"):
        dffkit.nmf_batched([], 3, backend="cpu")
    with pytest.raises(ValueError, match=r"X\[1\]"):
        dffkit.nmf_batched([np.ones((4, 4)), -np.ones((4, 4))], 2, backend="cpu")
    with pytest.raises(ValueError, match="3-D"):
        dffkit.nmf_batched(np.ones((4, 4)), 2, backend="cpu")


# ---------------------------------------------------------------------------------------------
# GIL and Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_gil_is_released_during_a_fit(rng):
    X = rng.random((4000, 256)).astype(np.float32)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    t = threading.Thread(target=ticker)
    t.start()
    start = time.perf_counter()
    dffkit.non_negative_factorization(X, n_components=16, init="random", random_state=0,
                                      tol=0, max_iter=600, backend="cpu")
    elapsed = time.perf_counter() - start
    done.set()
    t.join()
    during = [x for x in ticks if start < x < start + elapsed]
    # with the GIL held for the whole fit (well over 0.1 s) the ticker could not run at all
    assert elapsed > 0.1
    assert len(during) >= 3


@pytest.mark.parametrize("user_value", [None, "7"])
def test_openmp_spin_setting_leaves_the_environment_as_it_was(user_value):
    # the engine's import sets GOMP_SPINCOUNT for libgomp to read, then removes it; a value the
    # caller set is neither overridden nor removed
    code = textwrap.dedent("""
        import os
        from dffkit import _backends
        _backends.cpu()
        print(os.environ.get("GOMP_SPINCOUNT"))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("GOMP_SPINCOUNT", None)
    env.pop("OMP_WAIT_POLICY", None)
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(user_value)


def test_initial_error_at_an_exact_start_is_the_direct_sum():
    # float64 takes the error from the trace identity; at an exact start its terms cancel to
    # sqrt(eps) ||X|| of noise (4e-8 for ||X|| ~ 10), and the tol test, relative to the initial
    # error, stopped elsewhere than scikit-learn's. The direct sum is used there instead.
    rng = np.random.default_rng(5)
    W0, H0 = rng.random((40, 1)) + 0.5, rng.random((1, 30)) + 0.5
    E = 1e-7 * rng.random((40, 30))
    X = W0 @ H0 + E                                   # a start 1e-7 from X: error ~1e-7 ||X||
    direct = float(np.linalg.norm(X - W0 @ H0))
    *_, info = dffkit.non_negative_factorization(X, W0, H0, n_components=1, init="custom",
                                                 max_iter=50, backend="cpu", return_info=True)
    assert info.error_init == pytest.approx(direct, rel=1e-6)
    sk = pytest.importorskip("sklearn.decomposition")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ones = np.ones((3, 3))
        assert dffkit.NMF(1).fit(ones).n_iter_ == sk.NMF(1, solver="mu").fit(ones).n_iter_


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_workers_after_a_threaded_fit_finish_with_the_same_bits(tmp_path):
    # libgomp's pool does not survive fork: before the fix, a multiprocessing.Pool ("fork")
    # made after a 2-thread fit never returned. The children run on one thread; the bits do not
    # depend on the thread count, so they equal the parent's (dense and sparse engines).
    script = tmp_path / "fork_pool.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp, sys, numpy as np, scipy.sparse as sp, dffkit
        X = np.random.default_rng(0).random((3000, 800))
        S = sp.random(3000, 800, density=0.05, format="csr", random_state=0)
        def work(seed):
            kw = dict(n_components=5, init="random", random_state=seed, max_iter=10, tol=0)
            return (dffkit.non_negative_factorization(X, backend="cpu", **kw)[0],
                    dffkit.non_negative_factorization(S, backend="cpu", **kw)[0])
        if __name__ == "__main__":
            dffkit.set_num_threads(2)
            parent = [work(s) for s in (1, 2)]
            with mp.get_context("fork").Pool(2) as pool:
                children = pool.map_async(work, [1, 2]).get(timeout=90)
            same = all(np.array_equal(a, b) for p, c in zip(parent, children) for a, b in zip(p, c))
            print("same" if same else "different")
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "same"


def test_ctrl_c_stops_a_long_fit(tmp_path):
    script = tmp_path / "long_fit.py"
    script.write_text(textwrap.dedent("""
        import sys, time, numpy as np, dffkit
        X = np.random.default_rng(0).random((2000, 300)).astype(np.float32)
        print("ready", flush=True)
        t = time.perf_counter()
        try:
            dffkit.non_negative_factorization(X, n_components=10, init="random", tol=0,
                                              max_iter=10**7, backend="cpu")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert "interrupted" in out
    assert time.perf_counter() - sent < 3.0  # generous: the poll is every 50 ms, the rest is process exit under load


def test_kl_error_is_accurate_near_an_exact_fit():
    """The KL error near an exact fit equals the float64 oracle (no cancellation of large sums)."""
    rng = np.random.default_rng(12345)
    A, B = rng.random((300, 4)) + 0.5, rng.random((4, 200)) + 0.5
    X = A @ B
    for d in (1e-3, 1e-5):
        W0 = A * (1 + d * (rng.random(A.shape) - 0.5))
        H0 = B * (1 + d * (rng.random(B.shape) - 0.5))
        *_, info = dffkit.non_negative_factorization(
            X, W0, H0, n_components=4, init="custom", max_iter=0, beta_loss="kullback-leibler",
            backend="cpu", return_info=True)
        u = (W0 @ H0 - X) / X  # the divergence term by term, x (u - log1p(u)), u = wh / x - 1
        oracle = np.sqrt(2 * np.sum(X * (u - np.log1p(u))))
        assert info.error_init == pytest.approx(oracle, rel=1e-9)


def _epoch_lines(text):
    """(epoch, error or None) of each of scikit-learn's verbose 'Epoch NN reached ...' lines."""
    import re

    out = []
    for line in text.splitlines():
        hit = re.match(r"Epoch (\d+) reached after [0-9.]+ seconds(?:, error: ([0-9.eE+-]+))?\.?$", line)
        if hit:
            out.append((int(hit.group(1)), None if hit.group(2) is None else float(hit.group(2))))
    return out


@pytest.mark.parametrize("max_iter", [200, 35])
def test_verbose_prints_scikit_learns_lines(capsys, max_iter):
    """verbose=1 prints scikit-learn's 'Epoch' lines: one per tol test with its error, the last."""
    skl = pytest.importorskip("sklearn.decomposition")
    X = np.random.default_rng(0).random((200, 50))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skl.NMF(5, solver="mu", verbose=1, random_state=0, max_iter=max_iter).fit(X)
        expect = _epoch_lines(capsys.readouterr().out)
        dffkit.NMF(5, verbose=1, random_state=0, max_iter=max_iter, backend="cpu").fit(X)
        got = _epoch_lines(capsys.readouterr().out)
    assert [e for e, _ in got] == [e for e, _ in expect] and len(got) >= 3
    for (_, a), (_, b) in zip(got, expect):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-6)
