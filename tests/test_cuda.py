"""The CUDA engine against the CPU engine (issue 5). Every GPU test skips cleanly without a
usable device; the module-level checks (probe never crashes) run wherever _cuda is built."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import dffkit
from dffkit import _backends

try:
    from dffkit import _cuda as _cuda_mod  # built where CMake found nvcc
except ImportError:  # pragma: no cover - CPU-only builds
    _cuda_mod = None

try:
    CUDA = _backends.cuda()
except (RuntimeError, ImportError):
    CUDA = None

needs_gpu = pytest.mark.skipif(
    CUDA is None, reason="no usable CUDA device: " + _backends.unavailable_reasons().get("cuda", ""))


def _cpu():
    return _backends.cpu()


def _problem(m, n, k, dtype=np.float32, seed=0, zeros=False):
    rng = np.random.default_rng(seed)
    X = (rng.random((m, k + 2)) @ rng.random((k + 2, n)) + 0.05 * rng.random((m, n)))
    if zeros:
        X[rng.random((m, n)) < 0.2] = 0
    X = X.astype(dtype)
    s = np.sqrt(X.mean() / k)
    W = (s * np.abs(rng.standard_normal((m, k)))).astype(dtype)
    H = (s * np.abs(rng.standard_normal((k, n)))).astype(dtype)
    return X, W, H


def _params(mod, beta=2, max_iter=100, tol=0.0, pen=(0, 0, 0, 0), lam=0.0, mu=0.0, update_H=True,
            record=False, engine=None):
    p = mod.Params()
    if engine is not None:
        p.engine = engine
    p.beta = beta
    p.l1_W, p.l2_W, p.l1_H, p.l2_H = pen
    p.lam, p.mu = lam, mu
    p.max_iter, p.tol, p.update_H, p.record_objective = max_iter, tol, update_H, record
    return p


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _cpu_fit(X, W, H, groups=(), **kw):
    cpu = _cpu()
    W, H = W.copy(), H.copy()
    info = cpu.fit(X, W, H, _params(cpu, **kw), list(groups))
    return W, H, info


def _gpu_fit(X, W, H, groups=None, precision="fp32", **kw):
    from dffkit import _cuda_backend

    return _cuda_backend.fit(X, W, H, _params(CUDA, **kw), group_offsets=groups,
                             precision=precision)


def _mu_oracle(X, W, H, iters):
    """scikit-learn's Frobenius MU in float64, the obviously-correct reference."""
    X, W, H = (np.asarray(a, np.float64).copy() for a in (X, W, H))
    eps = np.finfo(np.float32).eps
    for _ in range(iters):
        den = W @ (H @ H.T)
        den[den == 0] = eps
        W *= (X @ H.T) / den
        den = (W.T @ W) @ H
        den[den == 0] = eps
        H *= (W.T @ X) / den
    return W, H


def _assert_float32_match(Wg, Hg, ig, Wc, Hc, ic):
    """A float32 GPU solve against the CPU engine's from the same start: factors within 1e-4,
    final error within 1e-3, initial error within 1e-5 (relative)."""
    assert _rel(Wg, Wc) <= 1e-4 and _rel(Hg, Hc) <= 1e-4
    assert abs(ig["error"] - ic["error"]) <= 1e-3 * ic["error"]
    assert abs(ig["error_init"] - ic["error_init"]) <= 1e-5 * ic["error_init"]


def _sm90():
    """Whether device 0 runs the kernels built for sm_90 only (fast path, single pass)."""
    return _cuda_mod.device_info(0)["cc"][0] >= 9


# ---- runs without a device ------------------------------------------------------------------

@pytest.mark.skipif(_cuda_mod is None, reason="dffkit._cuda is not built here")
def test_probe_never_raises():
    ok, why = _cuda_mod.probe()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok or why
    assert _cuda_mod.device_count() >= 0
    p = _cuda_mod.Params()
    p.precision = "bf16x"
    assert p.precision == "bf16x" and p.max_iter == 200 and p.tol == 1e-4


def test_is_device_array_numpy_false():
    from dffkit import _cuda_backend

    assert not _cuda_backend.is_device_array(np.zeros((2, 2)))
    assert not _cuda_backend.is_device_array([[1.0]])


def _sweep_fixed_bytes(k, esz):
    """Shared memory the sweep engine needs whatever n (cuda/nmf_engine_kernels.cuh's
    sweep_layout, counted here independently): the reduction scratch (256 doubles), G_H, its row
    sums, three 32 x k tiles, G_W and its column sums, each piece 16-byte aligned."""
    pieces = [256 * 8, k * k * esz, k * esz, 32 * k * esz, 32 * k * esz, 32 * k * esz,
              k * k * esz, k * esz]
    return sum((p + 15) // 16 * 16 for p in pieces)


def _layout_max_components(esz, limit):
    k = 0
    while _sweep_fixed_bytes(k + 1, esz) <= limit:
        k += 1
    return k


@pytest.mark.skipif(_cuda_mod is None, reason="dffkit._cuda is not built here")
def test_max_components_is_the_layouts_limit():
    # smem given: no device needed. H100/H200 (232448 bytes), A100 (166912), sm_86/89 (101376)
    assert _layout_max_components(8, 232448) == 97 and _layout_max_components(4, 232448) == 146
    for limit in (232448, 166912, 101376):
        for kl in (False, True):
            for n in (1, 600, 100000):
                for dtype, precision, esz in [("float64", "fp32", 8), ("float32", "fp32", 4),
                                              ("float32", "tf32", 4), ("float32", "bf16x", 4)]:
                    want = _layout_max_components(esz, limit)
                    got = _cuda_mod.max_components(n, dtype, kl=kl, precision=precision,
                                                   batched=True, smem=limit)
                    assert got == want, (limit, kl, n, dtype, precision, got, want)
                    # one problem: the gemm engine (Frobenius, k <= 64) may take more
                    single = _cuda_mod.max_components(n, dtype, kl=kl, precision=precision,
                                                      smem=limit)
                    assert single == want or (not kl and want < single <= 64)
    with pytest.raises(ValueError, match="smem"):
        _cuda_mod.max_components(100, "float32", smem=-1)
    with pytest.raises(ValueError, match="dtype"):
        _cuda_mod.max_components(100, "float16", smem=232448)


# ---- CPU vs CUDA from the same start --------------------------------------------------------

# one image (n a multiple of 4: 16-byte staging), and an odd shape (scalar staging, partial tiles)
SHAPES = [(196, 512, 5), (301, 131, 12)]
ENGINES = ["resident", "sweep"]  # one block per problem; a grid of blocks per problem


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [2, 1])
@pytest.mark.parametrize("pen", [(0, 0, 0, 0), (0.3, 0.2, 0.1, 0.4)])
@pytest.mark.parametrize(
    "dtype,tol", [(np.float32, 1e-4), (np.float64, 1e-9)])
@pytest.mark.gpu
@needs_gpu
def test_matches_cpu(shape, beta, pen, dtype, tol):
    X, W, H = _problem(*shape, dtype=dtype, zeros=beta == 1)
    Wc, Hc, ic = _cpu_fit(X, W, H, beta=beta, pen=pen)
    Wg, Hg, ig = _gpu_fit(X, W, H, beta=beta, pen=pen)
    assert Wg.dtype == dtype and Hg.dtype == dtype
    assert ig["n_iter"] == ic["n_iter"] == 100
    assert _rel(Wg, Wc) <= tol and _rel(Hg, Hc) <= tol
    assert abs(ig["error"] - ic["error"]) <= tol * ic["error"] * 10
    assert abs(ig["error_init"] - ic["error_init"]) <= tol * ic["error_init"] * 10
    assert ig["backend"] == "cuda" and ig["precision"] == "fp32"


def _fast_path_env(variant, monkeypatch):
    """The fast path's switches for a test variant (cuda/NOTES.md): "cuda-cores" is the row-split
    kernel on CUDA cores (the column split is the default since session 15)."""
    if variant == "cuda-cores":
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS", "0")
    if variant.startswith("tensor-cores"):
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_TC", "1")
    if variant.endswith("one-per-sm"):
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_ONE_PER_SM", "1")
    if variant.startswith("cols"):
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS", "1")
    if variant == "cols-C16":
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS_C", "16")


# The resident engine's fast path (cuda/nmf_small.cuh): every register width (k rounded up to
# 4, 5, 8, 12, 16), cluster sizes 1 to 8, n not a multiple of 4, fewer rows than a row group.
FAST_SHAPES = [(40, 37, 3), (7, 9, 2), (196, 512, 5), (500, 256, 7), (90, 1000, 12),
               (1200, 64, 16)]
FAST_OPTIONS = [dict(), dict(pen=(0.3, 0.2, 0.1, 0.4)), dict(mu=0.05), dict(update_H=False)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", FAST_SHAPES)
@pytest.mark.parametrize("opts", FAST_OPTIONS, ids=["plain", "penalties", "mu", "fixed_H"])
@pytest.mark.parametrize("tc", ["cuda-cores", "tensor-cores", "tensor-cores-one-per-sm", "cols", "cols-C16"])
def test_fast_path_matches_cpu_and_general_kernel(shape, opts, tc, monkeypatch):
    """The fast path (CUDA cores, or DFFKIT_CUDA_SMALL_TC=1: split-tf32 tensor cores; with
    DFFKIT_CUDA_SMALL_ONE_PER_SM=1 fewer, larger blocks per problem; DFFKIT_CUDA_SMALL_COLS=1: the
    column-split kernel, its cluster size from the shape or 16 where the problem has 16 quads of
    columns) against the CPU engine and the general resident kernel."""
    _fast_path_env(tc, monkeypatch)
    X, W, H = _problem(*shape)
    Wc, Hc, ic = _cpu_fit(X, W, H, **opts)
    Wf, Hf, i_f = _gpu_fit(X, W, H, engine="resident", **opts)
    monkeypatch.setenv("DFFKIT_CUDA_SMALL", "0")
    Wg, Hg, ig = _gpu_fit(X, W, H, engine="resident", **opts)
    for Wx, Hx, ix in ((Wf, Hf, i_f), (Wg, Hg, ig)):
        assert ix["n_iter"] == ic["n_iter"] == 100
        _assert_float32_match(Wx, Hx, ix, Wc, Hc, ic)
    if shape[1] >= 64:  # the two kernels add in different orders: the fast path really ran
        assert not np.array_equal(Wf, Wg)
    # which ran, as the result says: the fast path needs sm_90 code on an sm_90 device
    # (the column-split kernel replicates W on every block: 1200 rows keep the row split)
    fast = "resident-fast-cols" if tc.startswith("cols") and shape[0] < 1000 else "resident-fast"
    assert i_f["kernel"] == (fast if _sm90() else "resident")
    assert ig["kernel"] == "resident"
    if opts.get("update_H") is False:
        assert np.array_equal(Hf, H)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tc", ["cuda-cores", "tensor-cores", "cols", "cols-C16"])
def test_fast_path_stops_like_the_cpu(tc, monkeypatch):
    """The stopping rule: the column-split kernel decides one cluster barrier later, on the same
    numbers."""
    _fast_path_env(tc, monkeypatch)
    X, W, H = _problem(196, 512, 5, seed=3)
    Wc, Hc, ic = _cpu_fit(X, W, H, max_iter=1000, tol=1e-3)
    Wf, Hf, i_f = _gpu_fit(X, W, H, max_iter=1000, tol=1e-3, engine="resident")
    assert 10 <= ic["n_iter"] < 1000 and i_f["n_iter"] == ic["n_iter"]
    assert _rel(Wf, Wc) <= 1e-3


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [2, 1])
def test_update_H_false(shape, beta, engine):
    X, W, H = _problem(*shape, zeros=beta == 1)
    Wc, Hc, ic = _cpu_fit(X, W, H, beta=beta, update_H=False)
    Wg, Hg, ig = _gpu_fit(X, W, H, beta=beta, update_H=False, engine=engine)
    assert np.array_equal(Hg, H)
    assert _rel(Wg, Wc) <= 1e-4
    assert abs(ig["error"] - ic["error"]) <= 1e-3 * ic["error"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
def test_group_sparse(shape, engine):
    m = shape[0]
    X, W, H = _problem(*shape)
    groups = [0, m // 5, m // 5, 2 * m // 3, m]  # one empty group on purpose
    Wc, Hc, ic = _cpu_fit(X, W, H, groups=groups, lam=0.5, mu=0.2, record=True)
    Wg, Hg, ig = _gpu_fit(X, W, H, groups=groups, lam=0.5, mu=0.2, record=True, engine=engine)
    assert _rel(Wg, Wc) <= 1e-4 and _rel(Hg, Hc) <= 1e-4
    obj = np.array(ig["objective"])
    assert len(obj) == 100
    np.testing.assert_allclose(obj, ic["objective"], rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [2, 1])
def test_stopping_rule_and_float64_oracle(shape, beta, engine):
    X, W, H = _problem(*shape, dtype=np.float64, zeros=beta == 1)
    Wc, Hc, ic = _cpu_fit(X, W, H, beta=beta, max_iter=400, tol=3e-3)
    Wg, Hg, ig = _gpu_fit(X, W, H, beta=beta, max_iter=400, tol=3e-3, engine=engine)
    assert ig["n_iter"] == ic["n_iter"] < 400
    assert _rel(Wg, Wc) <= 1e-9
    if beta == 2:
        Wo, Ho = _mu_oracle(X, W, H, 10)
        Wg, Hg, _ = _gpu_fit(X, W, H, beta=2, max_iter=10, engine=engine)
        assert _rel(Wg, Wo) <= 1e-9 and _rel(Hg, Ho) <= 1e-9


@pytest.mark.gpu
@needs_gpu
def test_max_iter_zero_and_caller_arrays_untouched():
    X, W, H = _problem(196, 512, 5)
    W.flags.writeable = False
    H.flags.writeable = False
    Wg, Hg, ig = _gpu_fit(X, W, H, max_iter=0)
    assert ig["n_iter"] == 0 and ig["error"] == pytest.approx(ig["error_init"])
    assert ig["error"] == pytest.approx(_cpu().beta_error(X, W, H, 2), rel=1e-5)
    Wg, Hg, _ = _gpu_fit(X, W, H, max_iter=5)
    assert not np.array_equal(Wg, W)  # results are ours, the inputs stay as they were


# ---- the gemm engine (cuda/nmf_gemm.cuh; its kernels also run on the CPU emulator in
# tests/test_cuda_emu.py): Frobenius, k <= 64, every column width (16, 32, 64), n not a multiple
# of 4 (scalar loads), several row slices, partial row and column tiles

GEMM_SHAPES = [(301, 131, 12), (1000, 300, 20), (257, 520, 64), (90, 1000, 33), (3000, 40, 3)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(pen=(0.3, 0.2, 0.1, 0.4), mu=0.05), dict(update_H=False)],
                         ids=["plain", "penalties", "fixed_H"])
@pytest.mark.parametrize("kernels", ["split-tf32", "cuda-cores"])
def test_gemm_engine_matches_cpu_and_sweep(shape, opts, kernels, monkeypatch):
    """float32 on the gemm engine: tensor cores with split operands (3xTF32,
    DFFKIT_CUDA_GEMM_SIMT=0) or CUDA cores (=1); both hold the float32 bound against the CPU."""
    monkeypatch.setenv("DFFKIT_CUDA_GEMM_SIMT", "1" if kernels == "cuda-cores" else "0")
    X, W, H = _problem(*shape)
    Wc, Hc, ic = _cpu_fit(X, W, H, **opts)
    Wm, Hm, im = _gpu_fit(X, W, H, engine="gemm", **opts)
    Ws, Hs, is_ = _gpu_fit(X, W, H, engine="sweep", **opts)
    assert im["n_iter"] == ic["n_iter"] == 100
    _assert_float32_match(Wm, Hm, im, Wc, Hc, ic)
    assert _rel(Wm, Ws) <= 1e-4 and not np.array_equal(Wm, Ws)  # another kernel really ran
    if opts.get("update_H") is False:
        assert np.array_equal(Hm, H)


@pytest.mark.gpu
@needs_gpu
def test_gemm_engine_float32_kernels_by_width(monkeypatch):
    """The gemm engine's float32 default: CUDA cores at 16 < k <= 32 (faster there on the
    H200), split-tf32 tensor cores at k <= 16 and 32 < k <= 64: the default's bits are those of
    the kernels forced by DFFKIT_CUDA_GEMM_SIMT."""
    for shape, simt in (((1000, 300, 20), True), ((301, 131, 12), False), ((257, 520, 64), False)):
        X, W, H = _problem(*shape)
        monkeypatch.delenv("DFFKIT_CUDA_GEMM_SIMT", raising=False)
        Wd, Hd, _ = _gpu_fit(X, W, H, engine="gemm", max_iter=20)
        forced = {}
        for v in ("0", "1"):
            monkeypatch.setenv("DFFKIT_CUDA_GEMM_SIMT", v)
            forced[v] = _gpu_fit(X, W, H, engine="gemm", max_iter=20)[:2]
        assert not np.array_equal(forced["0"][0], forced["1"][0])  # two kernels really ran
        want = forced["1" if simt else "0"]
        assert np.array_equal(Wd, want[0]) and np.array_equal(Hd, want[1]), shape


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(301, 131, 12), (257, 520, 64)])
def test_gemm_engine_groups_float64_and_stopping(shape):
    m = shape[0]
    X, W, H = _problem(*shape)
    groups = [0, m // 5, m // 5, 2 * m // 3, m]
    Wc, Hc, ic = _cpu_fit(X, W, H, groups=groups, lam=0.5, mu=0.2, record=True)
    Wg, Hg, ig = _gpu_fit(X, W, H, groups=groups, lam=0.5, mu=0.2, record=True, engine="gemm")
    assert _rel(Wg, Wc) <= 1e-4 and _rel(Hg, Hc) <= 1e-4
    np.testing.assert_allclose(ig["objective"], ic["objective"], rtol=1e-4)
    X, W, H = _problem(*shape, dtype=np.float64)
    Wc, Hc, ic = _cpu_fit(X, W, H, max_iter=400, tol=3e-3)
    Wg, Hg, ig = _gpu_fit(X, W, H, max_iter=400, tol=3e-3, engine="gemm")
    assert ig["n_iter"] == ic["n_iter"] < 400
    assert _rel(Wg, Wc) <= 1e-9
    Wo, Ho = _mu_oracle(X, W, H, 10)
    Wg, Hg, _ = _gpu_fit(X, W, H, max_iter=10, engine="gemm")
    assert _rel(Wg, Wo) <= 1e-9 and _rel(Hg, Ho) <= 1e-9


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["bf16x", "tf32"])
def test_gemm_engine_low_precision(precision):
    X, W, H = _problem(1000, 300, 20)
    W32, H32, i32 = _gpu_fit(X, W, H, engine="gemm")
    Wl, Hl, il = _gpu_fit(X, W, H, precision=precision, engine="gemm")
    err_bound, factor_bound = LOW_PRECISION_BOUNDS[precision]
    assert abs(il["error"] - i32["error"]) <= err_bound * i32["error"]
    assert _rel(Wl, W32) <= factor_bound and _rel(Hl, H32) <= factor_bound
    # tf32: the products ran on tensor cores; bf16x: X was rounded. Either way not fp32's bits
    assert not np.array_equal(Wl, W32)


@pytest.mark.gpu
@needs_gpu
def test_gemm_engine_refuses_what_it_does_not_serve_and_auto_can_take_it(monkeypatch):
    X, W, H = _problem(301, 131, 12, zeros=True)
    with pytest.raises(ValueError, match="gemm engine serves the Frobenius"):
        _gpu_fit(X, W, H, beta=1, engine="gemm")
    X, W, H = _problem(200, 100, 65)
    with pytest.raises(ValueError, match="n_components <= 64"):
        _gpu_fit(X, W, H, engine="gemm")
    _gpu_fit(X, W, H, max_iter=3)  # the next call works
    # engine "auto" takes it for a problem too large for the resident engine; DFFKIT_CUDA_GEMM=0
    # gives the sweep back
    X, W, H = _problem(3000, 2000, 8)
    Wg, Hg, _ = _gpu_fit(X, W, H, max_iter=20, engine="gemm")
    Wa, Ha, ia = _gpu_fit(X, W, H, max_iter=20)
    assert ia["kernel"] == "gemm" and np.array_equal(Wa, Wg) and np.array_equal(Ha, Hg)
    monkeypatch.setenv("DFFKIT_CUDA_GEMM", "0")
    Wa, Ha, ia = _gpu_fit(X, W, H, max_iter=20)
    assert ia["kernel"] == "sweep" and not np.array_equal(Wa, Wg)


# ---- the gemm engine's single pass (cuda/nmf_fused.cuh; also on the CPU emulator): float32 X,
# k <= 32, n <= 512 and a multiple of 4, no groups; sm_90

FUSED_SHAPES = [(1000, 300, 20), (3000, 40, 3), (4099, 100, 17), (20000, 512, 32), (5000, 256, 8)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", FUSED_SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(pen=(0.3, 0.2, 0.1, 0.4), mu=0.05), dict(update_H=False),
                                  dict(max_iter=400, tol=3e-3)],
                         ids=["plain", "penalties", "fixed_H", "stopping"])
def test_gemm_fused_matches_cpu_and_two_pass(shape, opts, monkeypatch):
    """One pass over X per iteration (DFFKIT_CUDA_GEMM_FUSED=1: float32 X takes the two passes
    by default) against the CPU engine and against the two-pass kernels, from the same start.
    Both on split-tf32 tensor cores (DFFKIT_CUDA_GEMM_SIMT=0), the only products the single pass
    has: float32 X at 16 < k <= 32 takes CUDA cores by default."""
    if not _sm90():
        pytest.skip("the single-pass kernel is built for sm_90")
    monkeypatch.setenv("DFFKIT_CUDA_GEMM_SIMT", "0")
    X, W, H = _problem(*shape)
    opts = dict(opts)
    opts.setdefault("max_iter", 100 if shape[0] * shape[1] < 5e6 else 30)
    Wc, Hc, ic = _cpu_fit(X, W, H, **opts)
    Wt, Ht, it = _gpu_fit(X, W, H, engine="gemm", **opts)
    monkeypatch.setenv("DFFKIT_CUDA_GEMM_FUSED", "1")
    Wf, Hf, i_f = _gpu_fit(X, W, H, engine="gemm", **opts)
    assert i_f["kernel"] == "gemm-fused" and it["kernel"] == "gemm"
    assert i_f["n_iter"] == ic["n_iter"] == it["n_iter"]
    _assert_float32_match(Wf, Hf, i_f, Wc, Hc, ic)
    assert _rel(Wf, Wt) <= 1e-4 and _rel(Hf, Ht) <= 1e-4
    if opts.get("update_H") is False:
        assert np.array_equal(Hf, H)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16x"])
def test_gemm_fused_low_precision(precision, monkeypatch):
    """tf32 and bf16x run the single pass within their documented bounds of float32, and give
    what the two-pass kernels give in the same mode (bf16x: the same problem, X rounded once)."""
    if not _sm90():
        pytest.skip("the single-pass kernel is built for sm_90")
    X, W, H = _problem(3000, 200, 20)
    W32, H32, i32 = _gpu_fit(X, W, H, engine="gemm")
    Wl, Hl, il = _gpu_fit(X, W, H, precision=precision, engine="gemm")
    # the single pass by default in these modes; float32 X at float32 accuracy takes two passes
    assert il["kernel"] == "gemm-fused" and i32["kernel"] == "gemm"
    err_bound, factor_bound = LOW_PRECISION_BOUNDS[precision]
    assert abs(il["error"] - i32["error"]) <= err_bound * i32["error"]
    assert _rel(Wl, W32) <= factor_bound and not np.array_equal(Wl, W32)
    monkeypatch.setenv("DFFKIT_CUDA_GEMM_FUSED", "0")
    Wt, Ht, it = _gpu_fit(X, W, H, precision=precision, engine="gemm")
    assert it["kernel"] == "gemm"
    if precision == "bf16x":  # both split tf32 on the same rounded X: float32 agreement
        assert _rel(Wl, Wt) <= 1e-4 and _rel(Hl, Ht) <= 1e-4
    else:
        assert _rel(Wl, Wt) <= factor_bound


@pytest.mark.gpu
@needs_gpu
def test_gemm_fused_leaves_the_rest_to_two_passes():
    """Groups, float64, n beyond 512 or not a multiple of 4 (of 8 for bf16x), and k beyond 32
    take the two-pass kernels."""
    if not _sm90():
        pytest.skip("the single-pass kernel is built for sm_90")
    for shape, kw in (((3000, 200, 20), dict(groups=[0, 1000, 3000], lam=0.3)),
                      ((3000, 196, 20), dict(precision="bf16x")),
                      ((500, 516, 8), {}), ((500, 198, 8), {}), ((500, 200, 33), {})):
        X, W, H = _problem(*shape)
        assert _gpu_fit(X, W, H, engine="gemm", max_iter=3, **kw)[2]["kernel"] == "gemm"
    X, W, H = _problem(3000, 200, 20, dtype=np.float64)
    assert _gpu_fit(X, W, H, engine="gemm", max_iter=3)[2]["kernel"] == "gemm"


# ---- precision modes ------------------------------------------------------------------------

# Documented bounds (cuda/NOTES.md): bf16x solves the problem for X rounded to bfloat16
# (2^-9 relative per element); tf32 rounds the operands of the two products with X to 10-bit
# mantissas (2^-11). After 100 iterations the final error stays within 0.2% of fp32's and the
# factors within 2% (relative Frobenius norm); a CPU simulation of the bf16 rounding of X
# gives 2e-4 and 3e-3 on these problems.
LOW_PRECISION_BOUNDS = {"bf16x": (2e-3, 2e-2), "tf32": (2e-3, 2e-2)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["bf16x", "tf32"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [2, 1])
def test_low_precision_bounds(shape, beta, engine, precision):
    X, W, H = _problem(*shape, zeros=beta == 1)
    W32, H32, i32 = _gpu_fit(X, W, H, beta=beta, engine=engine)
    Wl, Hl, il = _gpu_fit(X, W, H, beta=beta, precision=precision, engine=engine)
    err_bound, factor_bound = LOW_PRECISION_BOUNDS[precision]
    assert il["precision"] == precision
    assert abs(il["error"] - i32["error"]) <= err_bound * i32["error"]
    assert _rel(Wl, W32) <= factor_bound and _rel(Hl, H32) <= factor_bound
    if precision == "tf32":
        # Frobenius with k <= 16 on the resident engine: the fp32 fast path runs tf32 (same bits);
        # elsewhere the tensor cores really ran (not fp32's bits)
        fast = engine == "resident" and beta == 2
        assert np.array_equal(Wl, W32) == fast and np.array_equal(Hl, H32) == fast


@pytest.mark.gpu
@needs_gpu
def test_low_precision_needs_float32():
    X, W, H = _problem(64, 64, 4, dtype=np.float64)
    for precision in ("tf32", "bf16x"):
        with pytest.raises(ValueError, match="float32"):
            _gpu_fit(X, W, H, precision=precision)


@pytest.mark.gpu
@needs_gpu
def test_too_many_components_names_the_limit_and_auto_takes_the_cpu():
    import dffkit
    from dffkit import _cuda_backend

    limit = _cuda_mod.device_info(_cuda_mod.current_device())["smem_per_block_optin"]
    most64 = _cuda_backend.max_components(48, np.float64)
    most32 = _cuda_backend.max_components(48, np.float32)
    assert most64 == _cuda_backend.max_components(48, np.float64, batched=True) == \
        _layout_max_components(8, limit)  # 97 on an H100/H200: beyond the gemm engine's 64
    assert most32 == _layout_max_components(4, limit)  # 146
    assert _cuda_backend.max_components(48, np.float64, beta=1) == most64
    # the largest k runs, and agrees with the CPU engine
    X, W, H = _problem(100, 48, most64, dtype=np.float64)
    Wg, Hg, ig = _gpu_fit(X, W, H, max_iter=3)
    Wc, Hc, ic = _cpu_fit(X, W, H, max_iter=3)
    assert _rel(Wg, Wc) <= 1e-8 and _rel(Hg, Hc) <= 1e-8
    # one more is refused with the limit, float32's limit and the fixes
    X, W, H = _problem(100, 48, most64 + 1, dtype=np.float64)
    with pytest.raises(ValueError) as e:
        _gpu_fit(X, W, H, max_iter=3)
    msg = str(e.value)
    for part in (f"n_components={most64 + 1} is too large for the CUDA engine", f"{limit} bytes",
                 f"n_components <= {most64} for float64 data",
                 f"n_components <= {most32} for float32 data", "float32 X", "backend='cpu'"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match=f"n_components <= {most64} for float64 data"):
        dffkit.nmf_batched([X, X[:50]], most64 + 1, max_iter=3, backend="cuda")
    X32, W32, H32 = _problem(100, 48, most32 + 1)
    with pytest.raises(ValueError, match=f"n_components={most32 + 1} .*n_components <= {most32} "
                                         "for float32 data. Use n_components <= .*backend='cpu'"):
        _gpu_fit(X32, W32, H32, max_iter=3)
    _gpu_fit(X32[:, :], W32[:, :most32], H32[:most32], max_iter=3)  # the next call works
    # backend='auto' takes the CPU for host X it would otherwise give CUDA, and says so
    rng = np.random.default_rng(0)
    Xb = rng.random((2000, 1000))  # 2e6 elements: CUDA's by size
    k = most64 + 1
    *_, r64 = dffkit.non_negative_factorization(Xb, n_components=k, max_iter=2, tol=0,
                                                random_state=0, return_info=True)
    *_, r32 = dffkit.non_negative_factorization(Xb.astype(np.float32), n_components=k,
                                                max_iter=2, tol=0, random_state=0,
                                                return_info=True)
    assert r64.backend == "cpu" and r32.backend == "cuda"
    out = dffkit.nmf_batched([Xb[:1000], Xb[1000:]], k, max_iter=2, tol=0, random_state=0)
    assert [r.backend for *_, r in out] == ["cpu", "cpu"]


# ---- batches --------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_batched_equals_one_at_a_time():
    from dffkit import _cuda_backend

    probs = [_problem(196, 512, 5, seed=s) for s in range(4)] + [
        _problem(50 + 30 * s, 70 + 11 * s, 5, seed=10 + s) for s in range(3)]
    p = _params(CUDA, max_iter=300, tol=1e-3)
    out = _cuda_backend.fit_batched([q[0] for q in probs], [q[1] for q in probs],
                                    [q[2] for q in probs], p)
    for (X, W, H), (Wb, Hb, ib) in zip(probs, out):
        Ws, Hs, i1 = _cuda_backend.fit(X, W, H, _params(CUDA, max_iter=300, tol=1e-3,
                                                        engine="resident"))
        assert ib["n_iter"] == i1["n_iter"]
        assert np.array_equal(Wb, Ws) and np.array_equal(Hb, Hs)
        assert ib["error"] == i1["error"]
    # each problem has its own iteration count
    assert len({o[2]["n_iter"] for o in out}) > 1


@pytest.mark.gpu
@needs_gpu
def test_fast_path_register_budgets_give_the_same_bits(monkeypatch):
    """The fast path's CUDA-core kernel compiled for one block per SM (255 registers) and for
    two (128): forced either way, and chosen per call (20 images: more blocks than SMs, so the
    batch takes two per SM, each image alone one), the same bits. (The row-split kernel's
    budgets: DFFKIT_CUDA_SMALL_COLS=0, since the column split is the default.)"""
    from dffkit import _cuda_backend

    monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS", "0")

    probs = [_problem(196, 512, 5, seed=40 + s) for s in range(20)]
    p = _params(CUDA, max_iter=60, tol=0)
    runs = {}
    for regs in ("1", "2", None):
        if regs is None:
            monkeypatch.delenv("DFFKIT_CUDA_SMALL_REGS", raising=False)
        else:
            monkeypatch.setenv("DFFKIT_CUDA_SMALL_REGS", regs)
        runs[regs] = _cuda_backend.fit_batched([q[0] for q in probs], [q[1] for q in probs],
                                               [q[2] for q in probs], p)
    for (Wa, Ha, ia), (Wb, Hb, ib), (Wc, Hc, ic) in zip(runs["1"], runs["2"], runs[None]):
        assert ia["kernel"] == ib["kernel"] == ic["kernel"] == "resident-fast"
        assert np.array_equal(Wa, Wb) and np.array_equal(Ha, Hb) and ia["error"] == ib["error"]
        assert np.array_equal(Wa, Wc) and np.array_equal(Ha, Hc)
    alone = _cuda_backend.fit(*probs[7], _params(CUDA, max_iter=60, tol=0, engine="resident"))
    assert np.array_equal(alone[0], runs[None][7][0]) and np.array_equal(alone[1], runs[None][7][1])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cluster", [None, "4", "16"])
def test_fast_path_cols_batched_equals_one_at_a_time(cluster, monkeypatch):
    """The column-split kernel: a batch of images (more blocks than SMs) gives each problem the
    bits it gets alone; its own iteration count per problem."""
    from dffkit import _cuda_backend

    monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS", "1")
    if cluster:
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS_C", cluster)
    probs = [_problem(196, 512, 5, seed=60 + s) for s in range(40)] + [_problem(90, 200, 8, seed=7)]
    p = _params(CUDA, max_iter=200, tol=1e-3)
    out = _cuda_backend.fit_batched([q[0] for q in probs], [q[1] for q in probs],
                                    [q[2] for q in probs], p)
    for i in (0, 17, 40):
        Ws, Hs, i1 = _cuda_backend.fit(*probs[i], _params(CUDA, max_iter=200, tol=1e-3, engine="resident"))
        Wb, Hb, ib = out[i]
        assert ib["kernel"] == i1["kernel"] == ("resident-fast-cols" if _sm90() else "resident")
        assert ib["n_iter"] == i1["n_iter"] and ib["error"] == i1["error"]
        assert np.array_equal(Wb, Ws) and np.array_equal(Hb, Hs)
    assert len({o[2]["n_iter"] for o in out}) > 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cluster", [None, "16"])
def test_fast_path_cols_vec_and_push_give_the_default_bits(cluster, monkeypatch):
    """DFFKIT_CUDA_SMALL_COLS_VEC=1 (the W update's distributed-shared-memory reads four floats a
    request) and DFFKIT_CUDA_SMALL_COLS_PUSH=1 (the shares of X H^T stored into every block) on
    the device: every problem of a batch (one image's shape, one whose m k is not a multiple of
    4, the stopping rule) and one image alone get the default kernel's bits."""
    from dffkit import _cuda_backend

    if not _sm90():
        pytest.skip("the column-split kernel needs sm_90")
    monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS", "1")
    if cluster:
        monkeypatch.setenv("DFFKIT_CUDA_SMALL_COLS_C", cluster)
    probs = [_problem(196, 512, 5, seed=80 + s) for s in range(12)] + [_problem(91, 200, 5, seed=9)]
    p = _params(CUDA, max_iter=120, tol=1e-3)
    runs = {}
    for switch in (None, "VEC", "PUSH"):
        for key in ("VEC", "PUSH"):
            monkeypatch.setenv(f"DFFKIT_CUDA_SMALL_COLS_{key}", "1" if key == switch else "0")
        out = _cuda_backend.fit_batched([q[0] for q in probs], [q[1] for q in probs],
                                        [q[2] for q in probs], p)
        alone = _cuda_backend.fit(*probs[3], _params(CUDA, max_iter=120, tol=1e-3, engine="resident"))
        runs[switch] = (out, alone)
    out0, alone0 = runs[None]
    for switch in ("VEC", "PUSH"):
        out1, alone1 = runs[switch]
        for (Wa, Ha, ia), (Wb, Hb, ib) in zip(out0, out1):
            assert ia["kernel"] == ib["kernel"] == "resident-fast-cols"
            assert ia["n_iter"] == ib["n_iter"] and ia["error"] == ib["error"], switch
            assert np.array_equal(Wa, Wb) and np.array_equal(Ha, Hb), switch
        assert np.array_equal(alone0[0], alone1[0]) and np.array_equal(alone0[1], alone1[1]), switch
        assert np.array_equal(alone1[0], out1[3][0]), switch


# ---- init -----------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(196, 512, 5), (1000, 4500, 7)])
def test_random_init_bit_identical(dtype, shape):
    from dffkit._cuda_backend import DeviceArray

    m, n, k = shape
    X = np.random.default_rng(3).random((m, n)).astype(dtype)
    Wc = np.empty((m, k), dtype)
    Hc = np.empty((k, n), dtype)
    _cpu().random_init(X, Wc, Hc, 12345)
    Xd = DeviceArray((m, n), dtype)
    CUDA.memcpy_htod(Xd.ptr, X, 0)
    Wd, Hd = DeviceArray((m, k), dtype), DeviceArray((k, n), dtype)
    CUDA.random_init(Xd.ptr, Wd.ptr, Hd.ptr, m, n, k, np.dtype(dtype).name, 12345, 0)
    assert np.array_equal(Wd.get(), Wc) and np.array_equal(Hd.get(), Hc)


# ---- foreign arrays -------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from dffkit import _cuda_backend

    X, W, H = _problem(196, 512, 5)
    Xt, Wt, Ht = (torch.from_numpy(a).cuda() for a in (X, W, H))
    W_before = Wt.clone()
    assert _cuda_backend.is_device_array(Xt) and not _cuda_backend.is_device_array(Xt.cpu())
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        Wo, Ho, info = _cuda_backend.fit(Xt, Wt, Ht, _params(CUDA))
    s.synchronize()
    assert isinstance(Wo, torch.Tensor) and Wo.is_cuda and Wo.dtype == torch.float32
    assert torch.equal(Wt, W_before)
    Wn, Hn, _ = _cuda_backend.fit(X, W, H, _params(CUDA))
    assert np.array_equal(Wo.cpu().numpy(), Wn) and np.array_equal(Ho.cpu().numpy(), Hn)
    # strided input: one deliberate copy, same result
    Wo2, _, _ = _cuda_backend.fit(Xt.t().contiguous().t(), Wt, Ht, _params(CUDA))
    assert torch.equal(Wo2, Wo)
    # our own buffer goes to torch without a copy
    d = _cuda_backend.DeviceArray((3, 4), np.float32)
    t = torch.from_dlpack(d)
    assert t.data_ptr() == d.ptr and t.shape == (3, 4)
    # device random init equals the CPU one
    Wr, Hr = _cuda_backend.random_init(Xt, 5, 7)
    Wc = np.empty((196, 5), np.float32)
    Hc = np.empty((5, 512), np.float32)
    _cpu().random_init(X, Wc, Hc, 7)
    assert np.array_equal(Wr.cpu().numpy(), Wc) and np.array_equal(Hr.cpu().numpy(), Hc)
    lo, bad = _cuda_backend.check_values(Xt)
    assert lo == pytest.approx(float(X.min())) and not bad
    Xbad = Xt.clone()
    Xbad[3, 4] = float("nan")
    assert _cuda_backend.check_values(Xbad)[1]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 255, 256 * 1024 + 77, 3 * 256 * 1024 + 5])
def test_value_stats_against_numpy(dtype, count):
    """value_stats: the minimum of the finite values, whether any is NaN or infinite, and the sum
    of the finite values' squares (float64), over sizes below one block, at the grid's limit of
    1024 blocks and beyond it (a grid-stride loop), with NaN and infinities in place."""
    import torch

    from dffkit import _cuda_backend

    rng = np.random.default_rng(count)
    x = (rng.standard_normal(count) * 10 ** rng.uniform(-3, 3, count)).astype(dtype)
    lo, bad, sq = _cuda_backend.value_stats(torch.from_numpy(x).cuda())
    x64 = x.astype(np.float64)
    assert lo == x64.min() and not bad
    assert sq == pytest.approx(float(np.dot(x64, x64)), rel=1e-12)
    if count > 2:
        x[[0, count // 2]] = [np.nan, np.inf]
        lo2, bad2, sq2 = _cuda_backend.value_stats(torch.from_numpy(x).cuda())
        finite = x.astype(np.float64)[np.isfinite(x)]
        assert bad2 and lo2 == finite.min()
        assert sq2 == pytest.approx(float(np.dot(finite, finite)), rel=1e-12)


@pytest.mark.gpu
@needs_gpu
def test_device_random_init_factors_are_fitted_in_place(monkeypatch):
    """init='random' on device X: the factors random_init made for the fit are updated in place
    and returned (no copies), with the same bits as a fit that copies them; a caller's own
    factors (init='custom') are copied and left alone."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from dffkit import _cuda_backend
    from dffkit.nmf import _seed_from

    X, _, _ = _problem(196, 512, 5)
    Xt = torch.from_numpy(X).cuda()
    made = []
    real = _cuda_backend.random_init

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(_cuda_backend, "random_init", recording)
    W, H, _ = dffkit.non_negative_factorization(Xt, n_components=5, init="random", random_state=3,
                                                backend="cuda", max_iter=50)
    assert W is made[0][0] and H is made[0][1]
    W0, H0 = real(Xt, 5, _seed_from(3))
    keep = (W0.clone(), H0.clone())
    Wc, Hc, _ = dffkit.non_negative_factorization(Xt, n_components=5, init="custom", W=W0, H=H0,
                                                  backend="cuda", max_iter=50)
    assert Wc is not W0 and torch.equal(W0, keep[0]) and torch.equal(H0, keep[1])
    assert torch.equal(Wc, W) and torch.equal(Hc, H)


@pytest.mark.gpu
@needs_gpu
def test_cupy_in_cupy_out():
    cupy = pytest.importorskip("cupy")
    from dffkit import _cuda_backend

    X, W, H = _problem(196, 512, 5)
    Xc = cupy.asarray(X)
    Wo, Ho, info = _cuda_backend.fit(Xc, cupy.asarray(W), H, _params(CUDA))
    assert isinstance(Wo, cupy.ndarray) and isinstance(Ho, cupy.ndarray)
    Wn, Hn, _ = _cuda_backend.fit(X, W, H, _params(CUDA))
    assert np.array_equal(cupy.asnumpy(Wo), Wn)
    d = _cuda_backend.DeviceArray((3, 4), np.float64)
    assert cupy.asarray(d).data.ptr == d.ptr


@pytest.mark.gpu
@needs_gpu
def test_batched_device_stack():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from dffkit import _cuda_backend

    Xs = np.stack([_problem(196, 512, 5, seed=s)[0] for s in range(3)])
    res = _cuda_backend.nmf_batched_device(torch.from_numpy(Xs).cuda(), 5, beta=2, tol=0,
                                           max_iter=50, penalties=lambda m, n: (0, 0, 0, 0),
                                           seed=11)
    for b, (Wb, Hb, r) in enumerate(res):
        Wc = np.empty((196, 5), np.float32)
        Hc = np.empty((5, 512), np.float32)
        _cpu().random_init(Xs[b], Wc, Hc, 11 + b)
        Ws, Hs, _ = _cuda_backend.fit(Xs[b], Wc, Hc, _params(CUDA, max_iter=50))
        assert np.array_equal(Wb.cpu().numpy(), Ws) and r.n_iter == 50


# ---- errors and recovery --------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_errors_then_next_call_works():
    p = _params(CUDA, max_iter=5)
    X, W, H = _problem(64, 48, 3)
    host = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="device"):
        CUDA.fit(host.ctypes.data, host.ctypes.data, host.ctypes.data, 4, 2, 2, "float32", p, [], 0)
    with pytest.raises(ValueError):
        CUDA.fit(12345, 12345, 12345, 4, 2, 2, "float32", p, [], 0)
    from dffkit._cuda_backend import DeviceArray

    d = DeviceArray((4, 4), np.float32)
    with pytest.raises(ValueError):
        CUDA.fit(d.ptr, d.ptr, d.ptr, 4, 4, 0, "float32", p, [], 0)
    with pytest.raises(ValueError):
        CUDA.fit(d.ptr, d.ptr, d.ptr, 4, 4, 2, "float16", p, [], 0)
    with pytest.raises(ValueError):
        CUDA.fit(d.ptr, d.ptr, d.ptr, 4, 4, 2, "float32", p, [0, 3], 0)  # offsets must end at m
    with pytest.raises(MemoryError):
        CUDA.DeviceMemory(1 << 52, 0)
    with pytest.raises(MemoryError):
        DeviceArray((1 << 26, 1 << 22), np.float32)
    Wc, Hc, ic = _cpu_fit(X, W, H, max_iter=5)
    Wg, Hg, ig = _gpu_fit(X, W, H, max_iter=5)
    assert _rel(Wg, Wc) <= 1e-5


@pytest.mark.gpu
@needs_gpu
def test_steady_state_allocates_nothing():
    X, W, H = _problem(3000, 300, 12)
    for engine in ENGINES:
        _gpu_fit(X, W, H, max_iter=3, engine=engine)
    held = CUDA.workspace_bytes()
    for _ in range(3):
        for engine in ENGINES:
            _gpu_fit(X, W, H, max_iter=3, engine=engine)
    assert CUDA.workspace_bytes() == held


@pytest.mark.gpu
@needs_gpu
def test_threads():
    probs = [_problem(*s, seed=i) for i, s in enumerate([(196, 512, 5), (3000, 300, 12)] * 3)]
    assert len(probs) == 6
    serial = [_gpu_fit(*q, max_iter=30) for q in probs]
    out = [None] * len(probs)
    errors = []

    def work(i):
        try:
            for _ in range(3):
                out[i] = _gpu_fit(*probs[i], max_iter=30)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(probs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(out, serial):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
