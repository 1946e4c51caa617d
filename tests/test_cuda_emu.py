"""The gemm engine's CUDA kernels (cuda/nmf_gemm.cuh), run on the CPU emulator
(cuda/emu/cuda_emu.hpp: a std::thread per CUDA thread, a std::barrier per __syncthreads), against
a float64 numpy oracle. This checks on any machine what the kernels compute: the tiling, the
bounds of the last row and column tiles, the 4-wide and the scalar load paths, the slices of the
partial sums, the W update's epilogue (penalties, groups, the first iteration's error terms). It
does not check speed or anything the GPU adds (tests/test_cuda.py runs the engine there)."""
import os
import subprocess

import numpy as np
import pytest
from emu_harness import build
EPS32 = float(np.finfo(np.float32).eps)


def _build(tmp_path_factory, source, defines=()):
    """tests/emu/<source> compiled against the kernels (skip where there is no C++ compiler);
    defines: build switches of the kernels (NAME=VALUE)."""
    return build(tmp_path_factory, source, defines=defines)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory, "gemm_emu.cpp")


def _bf16_round(x):
    """float32 -> bfloat16 bits (round to nearest even) and their float32 values."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def _tf32(a):
    """float32 -> tf32 as cvt.rna rounds it (10 mantissa bits, ties away from zero), as float64."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


def _run(emu, tmp_path, *, m, n, k, dtype="f32", first=1, vec=1, l1=0.0, l2=0.0, lam=0.0,
         groups=None, max_slices=1 << 30, seed=0, zero_rows=()):
    rng = np.random.default_rng(seed)
    T = np.float64 if dtype == "f64" else np.float32
    X = rng.random((m, n)).astype(T)
    W = rng.random((m, k)).astype(T)
    for i in zero_rows:
        W[i] = 0
    H = rng.random((k, n)).astype(T)
    if dtype.startswith("bf16x"):
        xbits, X = _bf16_round(X)
    GH = (H.astype(np.float64) @ H.T.astype(np.float64)).astype(T)
    goff = np.asarray(groups if groups is not None else [], dtype=np.int64)
    ng = max(len(goff) - 1, 0)
    gnorm = np.stack([np.linalg.norm(W[goff[g]:goff[g + 1]].astype(np.float64), axis=0)
                      for g in range(ng)]) if ng else np.zeros((0, k))
    d = tmp_path / f"case_{dtype}_{m}_{n}_{k}_{seed}"
    d.mkdir()
    meta = dict(m=m, n=n, k=k, dtype=dtype, first=first, vec=vec, l1=l1, l2=l2, lam=lam, ngroups=ng,
                max_slices=max_slices)
    (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
    (xbits if dtype.startswith("bf16x") else X).tofile(d / "X.bin")
    for name, a in (("W", W), ("H", H), ("GH", GH)):
        a.tofile(d / f"{name}.bin")
    goff.tofile(d / "goff.bin")
    gnorm.astype(np.float64).tofile(d / "gnorm.bin")
    done = subprocess.run([str(emu), str(d)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    plan = dict(line.split() for line in (d / "plan.txt").read_text().splitlines())
    plan = {key: int(v) for key, v in plan.items()}
    S = plan["slices"]
    out = dict(
        W_new=np.fromfile(d / "W_new.bin", dtype=T).reshape(m, k),
        Ppart=np.fromfile(d / "Ppart.bin", dtype=T).reshape(S, k, n),
        Gpart=np.fromfile(d / "Gpart.bin", dtype=T).reshape(S, k, k),
        GHpart=np.fromfile(d / "GHpart.bin", dtype=T).reshape(plan["h_slices"], k, k),
        d0=np.fromfile(d / "d0.bin", dtype=np.float64),
        gg=np.fromfile(d / "gg.bin", dtype=np.float64),
        plan=plan,
    )
    return dict(X=X, W=W, H=H, GH=GH, goff=goff, gnorm=gnorm), out


def _oracle_w(inp, l1, l2, lam, tf32=False):
    """The W step in float64 (mu_step of cpp/mu_update.hpp); tf32: N from tf32-rounded X, H."""
    X, W, H, GH = (inp[key].astype(np.float64) for key in ("X", "W", "H", "GH"))
    N = _tf32(inp["X"]) @ _tf32(inp["H"]).T if tf32 else X @ H.T
    base = W @ GH
    den = base.copy()
    if l1 > 0:
        den += l1
    if l2 > 0:
        den += l2 * W
    goff = inp["goff"]
    if lam > 0 and len(goff) > 1:
        tiny = np.finfo(inp["W"].dtype).tiny
        for g in range(len(goff) - 1):
            rows = slice(goff[g], goff[g + 1])
            den[rows] += lam * W[rows] / np.maximum(inp["gnorm"][g], tiny)
    den[den == 0] = EPS32
    return W * (N / den), N, base


def _check(inp, out, *, l1=0.0, l2=0.0, lam=0.0, first=1, rtol=3e-5, tf32=False):
    m, k = inp["W"].shape
    W_ref, N, base = _oracle_w(inp, l1, l2, lam, tf32)
    scale = np.abs(W_ref).max() + 1e-30
    np.testing.assert_allclose(out["W_new"], W_ref, rtol=rtol, atol=rtol * scale, err_msg="W update")

    # the partials of P and G: each slice of rows on its own, from the kernel's new W
    plan = out["plan"]
    Wn = out["W_new"].astype(np.float64)
    X = inp["X"].astype(np.float64)
    Wr, Xr = (_tf32(out["W_new"]), _tf32(inp["X"])) if tf32 else (Wn, X)
    rows = plan["slice_rows"]
    assert plan["slices"] == -(-m // rows), "every slice holds rows"
    for s in range(plan["slices"]):
        sl = slice(s * rows, min(m, (s + 1) * rows))
        P_ref = Wr[sl].T @ Xr[sl]
        G_ref = Wn[sl].T @ Wn[sl]
        np.testing.assert_allclose(out["Ppart"][s], P_ref, rtol=rtol, atol=rtol * (np.abs(P_ref).max() + 1e-30),
                                   err_msg=f"P slice {s}")
        np.testing.assert_allclose(out["Gpart"][s], G_ref, rtol=rtol, atol=rtol * (np.abs(G_ref).max() + 1e-30),
                                   err_msg=f"G slice {s}")
    H = inp["H"].astype(np.float64)
    cols = plan["h_slice_cols"]
    assert plan["h_slices"] == -(-H.shape[1] // cols)
    for s in range(plan["h_slices"]):  # G_H = H H^T over slices of H's columns
        Hs = H[:, s * cols:(s + 1) * cols]
        np.testing.assert_allclose(out["GHpart"][s], Hs @ Hs.T, rtol=rtol, atol=rtol * np.abs(Hs @ Hs.T).max(),
                                   err_msg=f"G_H slice {s}")
    assert out["d0"].shape == (plan["n_blocks"],)
    if first:
        W0 = inp["W"].astype(np.float64)
        np.testing.assert_allclose(out["d0"].sum(), (N * W0).sum(), rtol=rtol)
        np.testing.assert_allclose(out["gg"].sum(), (base * W0).sum(), rtol=rtol)
    else:  # not written: the sentinel stays
        assert np.all(out["d0"] == -7.0)


@pytest.mark.parametrize("case", [
    # k = 20 (width 32): two N blocks, the last one partial; five P slices, the last partial
    dict(m=300, n=200, k=20),
    # width 16, n not a multiple of 4 (scalar loads), penalties, a zero row of W, not first
    dict(m=130, n=37, k=5, l1=0.05, l2=0.1, first=0, zero_rows=(3, 129)),
    # width 64, scalar loads forced, groups with the group term
    dict(m=129, n=64, k=64, vec=0, lam=0.3, groups=[0, 40, 41, 129]),
    # float64, k = 33 (width 64), P column tile partial
    dict(m=100, n=300, k=33, dtype="f64"),
    # bfloat16 X, k = 17 (width 32)
    dict(m=70, n=48, k=17, dtype="bf16x"),
    # one row, one column, k = 1
    dict(m=1, n=1, k=1),
    # the partials' memory cap: two slices only
    dict(m=200, n=40, k=8, max_slices=2),
    # tensor cores (tf32 mma.sync, emulated by fragment layout): every width, partial tiles
    dict(m=300, n=200, k=20, dtype="tf32"),
    dict(m=129, n=37, k=64, dtype="tf32", l1=0.05),
    dict(m=520, n=530, k=9, dtype="tf32", first=0),
    # tensor cores with float32 accuracy (3xTF32): float32 X, and bfloat16 X
    dict(m=300, n=200, k=20, dtype="f32split"),
    dict(m=129, n=37, k=64, dtype="f32split", vec=0, lam=0.3, groups=[0, 40, 41, 129]),
    dict(m=70, n=48, k=17, dtype="bf16xsplit", l2=0.1),
], ids=["k20", "k5-scalar-penalties", "k64-groups", "f64-k33", "bf16x-k17", "1x1", "two-slices",
        "tf32-k20", "tf32-k64-scalar", "tf32-k9", "split-k20", "split-k64-groups", "bf16x-split-k17"])
def test_gemm_kernels_match_float64_oracle(emu, tmp_path, case):
    dtype = case.get("dtype", "f32")
    inp, out = _run(emu, tmp_path, **case)
    # split (3xTF32): float32-level error (measured ~8e-7), ten times below tf32's (~5e-5)
    rtol = {"f64": 1e-11, "f32split": 3e-6, "bf16xsplit": 3e-6}.get(dtype, 3e-5)
    _check(inp, out, l1=case.get("l1", 0.0), l2=case.get("l2", 0.0), lam=case.get("lam", 0.0),
           first=case.get("first", 1), rtol=rtol, tf32=dtype == "tf32")
    if dtype == "tf32":  # the operands really were rounded: the exact products are further away
        args = (case.get("l1", 0.0), case.get("l2", 0.0), case.get("lam", 0.0))
        d_exact = np.abs(out["W_new"] - _oracle_w(inp, *args)[0]).max()
        d_tf32 = np.abs(out["W_new"] - _oracle_w(inp, *args, tf32=True)[0]).max()
        assert d_exact > 10 * d_tf32
    if case.get("max_slices") == 2:
        assert out["plan"]["slices"] == 2


@pytest.fixture(scope="module")
def emu_pad8(tmp_path_factory):
    return _build(tmp_path_factory, "gemm_emu.cpp", defines=["DFFKIT_GEMM_PAD8=1"])


@pytest.mark.parametrize("case", [
    dict(m=300, n=200, k=20), dict(m=130, n=37, k=5, l1=0.05, first=0),
    dict(m=129, n=64, k=64, vec=0, lam=0.3, groups=[0, 40, 41, 129]),
    dict(m=520, n=530, k=9, dtype="tf32", first=0), dict(m=300, n=200, k=20, dtype="f32split"),
    dict(m=129, n=37, k=64, dtype="f32split"), dict(m=70, n=48, k=17, dtype="bf16xsplit"),
], ids=["k20", "k5-scalar", "k64-groups", "tf32-k9", "split-k20", "split-k64", "bf16x-split-k17"])
def test_gemm_pad8_layout_gives_the_same_bits(emu, emu_pad8, tmp_path, case):
    """The build switch DFFKIT_GEMM_PAD8 (another staging layout: pads and which thread stages
    which rows) changes where the tiles sit in shared memory, not the order of any sum: every
    output equals the default build's bit for bit (the default build is checked against the
    float64 oracle above)."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "pad8").mkdir()
    _, ref = _run(emu, tmp_path / "ref", **case)
    _, out = _run(emu_pad8, tmp_path / "pad8", **case)
    assert ref.keys() == out.keys()
    for name in ref:
        if name != "plan":
            np.testing.assert_array_equal(out[name], ref[name], err_msg=name)


def test_gemm_staging_layout_bank_conflicts(tmp_path_factory):
    """Bank conflicts of the two-pass kernels' shared-memory accesses, counted by enumeration
    from their geometry (tests/emu/gemm_banks_emu.cpp). The default layout: every mma fragment
    read and the N kernel's transposed stores 2-way, what ncu measured on the H200 (session 6).
    DFFKIT_GEMM_PAD8=1: all conflict-free but the H/W staging at k <= 16 (2-way, a few stores)."""
    def counts(defines):
        exe = _build(tmp_path_factory, "gemm_banks_emu.cpp", defines)
        done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = [line.split() for line in done.stdout.splitlines() if len(line.split()) == 4]
        return {(r[0], int(r[1])): (int(r[2]), int(r[3])) for r in rows}

    default, pad8 = counts([]), counts(["DFFKIT_GEMM_PAD8=1"])
    assert len(default) == len(pad8) == 24
    for (name, kp), (req, wf) in default.items():
        if name.startswith(("n_frag", "p_frag")) or name == "n_store_x":
            assert wf == 2 * req, (name, kp)
    for (name, kp), (req, wf) in pad8.items():
        fewest = 4 * req if name == "p_store_x" else req  # 16-byte stores: 4 quarter warps
        if name in ("n_store_h", "p_store_w") and kp == 16:
            assert wf == 2 * req, (name, kp)
        else:
            assert wf == fewest, (name, kp)


def test_gemm_plan_covers_the_rows_once(emu, tmp_path):
    """The plan's slices tile the rows exactly (the oracle above checks each slice's rows);
    here: more rows than one slice size, so several slices, each a multiple of 16 rows."""
    inp, out = _run(emu, tmp_path, m=1000, n=8, k=3)
    plan = out["plan"]
    assert plan["slices"] > 1 and plan["slice_rows"] % 16 == 0
    assert (plan["slices"] - 1) * plan["slice_rows"] < 1000 <= plan["slices"] * plan["slice_rows"]
    _check(inp, out)


def _sanitized(tmp_path_factory, sanitizer, source):
    """The emulator harness `source` built with -fsanitize=<sanitizer> (skip where unusable)."""
    return build(tmp_path_factory, source, flags=("-O1", "-g", f"-fsanitize={sanitizer}"))


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_gemm_kernels_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """The same kernels under ThreadSanitizer and AddressSanitizer. TSan: a missing
    __syncthreads between writing and reading a staging buffer is a data race between the
    emulated threads (checked by deleting the main loop's barrier: it reported the race).
    ASan: a read or write past a tile's end, in shared memory (one allocation of exactly the
    launch's bytes) or in X, W, H and the partials. A run with a report exits non-zero."""
    exe = _sanitized(tmp_path_factory, sanitizer, "gemm_emu.cpp")
    for case in (dict(m=300, n=200, k=20), dict(m=129, n=37, k=64, lam=0.3, groups=[0, 40, 129]),
                 dict(m=70, n=48, k=5, dtype="f64", first=0), dict(m=130, n=40, k=20, dtype="tf32"),
                 dict(m=33, n=20, k=16, dtype="bf16x"), dict(m=40, n=24, k=20, dtype="f32split")):
        inp, out = _run(exe, tmp_path, **case)
        _check(inp, out, lam=case.get("lam", 0.0), first=case.get("first", 1),
               rtol=1e-11 if case.get("dtype") == "f64" else 3e-5, tf32=case.get("dtype") == "tf32")


# ---- the resident fast path (cuda/nmf_small_kernel.cuh): the whole solve, clusters included ----

@pytest.fixture(scope="module")
def small_emu(tmp_path_factory):
    return _build(tmp_path_factory, "small_emu.cpp")


def _small_problem(B, m, n, k, seed):
    """B problems of one shape (float32), stacked."""
    probs = [_resident_problem(m, n, k, seed=seed + b) for b in range(B)]
    return tuple(np.stack(parts) for parts in zip(*probs))


def _run_small(exe, tmp_path, X, W, H, *, C, bf16=False, tc=False, cols=False, max_iter=30, tol=0.0,
               pen=(0, 0, 0, 0), mu=0.0, update_H=True, skew_us=0, gather=False, vec=False, push=False):
    """One launch of the fast path on the emulator (cols: the column-split kernel; skew_us: rank r
    held back r x skew_us after every cluster barrier; gather: its W update split over the
    cluster, DFFKIT_CUDA_SMALL_COLS_GATHER; vec: its W update reading the shares four floats a
    request, DFFKIT_CUDA_SMALL_COLS_VEC; push: its shares stored into every block,
    DFFKIT_CUDA_SMALL_COLS_PUSH)."""
    B, m, n = X.shape
    k = W.shape[2]
    d = tmp_path / f"small_{B}_{m}_{n}_{k}_{C}_{int(bf16)}_{int(tc)}_{int(cols)}_{max_iter}_{skew_us}_{int(gather)}_{int(vec)}_{int(push)}"
    d.mkdir()
    meta = dict(B=B, m=m, n=n, k=k, C=C, bf16=int(bf16), tc=int(tc), cols=int(cols), gather=int(gather), vec=int(vec), push=int(push),
                max_iter=max_iter, tol=tol,
                l1_W=pen[0], l2_W=pen[1],
                l1_H=pen[2], l2_H=pen[3], mu=mu, update_H=int(update_H))
    (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
    for name, a in (("X", X), ("W", W), ("H", H)):
        np.ascontiguousarray(a, dtype=np.float32).tofile(d / f"{name}.bin")
    env = dict(os.environ, DFFKIT_EMU_CLUSTER_SKEW_US=str(skew_us))
    done = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    Wo = np.fromfile(d / "W_out.bin", dtype=np.float32).reshape(B, m, k)
    Ho = np.fromfile(d / "H_out.bin", dtype=np.float32).reshape(B, k, n)
    outs = [tuple(float(v) for v in line.split()) for line in (d / "out.txt").read_text().splitlines()]
    return Wo, Ho, outs


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


SMALL_CASES = [
    # widths 4, 5, 8, 12, 16; clusters of 1, 2, 4, 8 blocks; n not a multiple of 4; a batch of
    # three problems; penalties, fixed H, bf16 X; the stopping rule. Few iterations: every
    # emulated barrier costs a round of all C x 256 threads on the CPU (~0.3 s an iteration at C = 8)
    dict(B=1, m=40, n=37, k=3, C=1, max_iter=12),
    dict(B=3, m=50, n=64, k=5, C=2, max_iter=4),
    dict(B=1, m=33, n=70, k=8, C=8, max_iter=3),
    dict(B=1, m=24, n=96, k=12, C=4, max_iter=3, pen=(0.3, 0.2, 0.1, 0.4), mu=0.05),
    dict(B=1, m=20, n=40, k=16, C=2, max_iter=4, update_H=False),
    dict(B=1, m=30, n=48, k=5, C=2, max_iter=4, bf16=True),
    dict(B=1, m=60, n=20, k=4, C=1, max_iter=40, tol=5e-2),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=["k3-C1", "k5-C2-batch", "k8-C8", "k12-C4-penalties",
                                                   "k16-C2-fixedH", "k5-C2-bf16", "stopping-rule"])
@pytest.mark.parametrize("tc", [False, True], ids=["cuda-cores", "tensor-cores"])
def test_fast_path_kernel_matches_cpu_engine(small_emu, tmp_path, case, tc):
    """The CUDA-core kernel and the tensor-core one (split tf32: float32 accuracy) hold the
    same bound against the CPU engine."""
    _check_small_case(small_emu, tmp_path, case, tc=tc)


def _check_small_case(exe, tmp_path, case, **kernel):
    """One of SMALL_CASES / COLS_CASES on the emulator against the CPU engine: n_iter, W, H, the
    initial and final errors; the caller's arrays untouched. Returns the kernel's W, H, outs."""
    case = dict(case)
    B, m, n, k, C, max_iter = (case.pop(key) for key in ("B", "m", "n", "k", "C", "max_iter"))
    bf16 = case.pop("bf16", False)
    X, W, H = _small_problem(B, m, n, k, seed=m + n + k)
    W0, H0 = W.copy(), H.copy()
    Wg, Hg, outs = _run_small(exe, tmp_path, X, W, H, C=C, bf16=bf16, max_iter=max_iter, **kernel, **case)
    assert np.array_equal(W, W0) and np.array_equal(H, H0)
    Xr = _bf16_round(X)[1].reshape(X.shape) if bf16 else X  # bf16x: the problem for rounded X
    for b in range(B):
        Wc, Hc, ic = _cpu_fit_full(Xr[b], W[b], H[b], max_iter=max_iter, **case)
        n_iter, e0, e = outs[b]
        assert n_iter == ic["n_iter"]
        assert (n_iter < max_iter) == ("tol" in case)  # the stopping rule case stops early
        # float32-level agreement (measured 1-3e-7 for both kernels; plain tf32 would be ~1e-4)
        assert _rel(Wg[b], Wc) <= 3e-6 and _rel(Hg[b], Hc) <= 3e-6
        assert abs(e - ic["error"]) <= 1e-5 * ic["error"]
        assert abs(e0 - ic["error_init"]) <= 1e-5 * ic["error_init"]
        if not case.get("update_H", True):
            assert np.array_equal(Hg[b], H[b])
    return Wg, Hg, outs


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_fast_path_kernel_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """The fast path with a cluster of two blocks under ThreadSanitizer (a peer's shared memory
    read while it is written, between the cluster barriers, is a race) and AddressSanitizer."""
    exe = _sanitized(tmp_path_factory, sanitizer, "small_emu.cpp")
    X, W, H = _small_problem(1, 30, 37, 5, seed=1)
    Wc, Hc, ic = _cpu_fit_full(X[0], W[0], H[0], max_iter=3)
    for tc in (False, True):
        Wg, Hg, outs = _run_small(exe, tmp_path, X, W, H, C=2, tc=tc, max_iter=3)
        assert _rel(Wg[0], Wc) <= 1e-4 and _rel(Hg[0], Hc) <= 1e-4


# ---- the fast path's column-split kernel (cuda/nmf_small_cols_kernel.cuh): one cluster barrier
# per iteration, the stopping decision one barrier late ------------------------------------------

COLS_CASES = SMALL_CASES + [
    # beyond those: a cluster of 16 blocks (wider than a portable cluster), and
    # blocks of 64+ quads (the P step's slices per row slice rather than per warp)
    dict(B=1, m=40, n=150, k=5, C=16, max_iter=3),
    dict(B=1, m=9, n=600, k=5, C=2, max_iter=3),
]


COLS_IDS = ["k3-C1", "k5-C2-batch", "k8-C8", "k12-C4-penalties", "k16-C2-fixedH", "k5-C2-bf16",
            "stopping-rule", "k5-C16", "k5-C2-wide-blocks"]


@pytest.mark.parametrize("case", COLS_CASES, ids=COLS_IDS)
def test_fast_path_cols_kernel_matches_cpu_engine(small_emu, tmp_path, case):
    """The column-split kernel holds the row-split kernel's bound against the CPU engine: the
    same iterates, n_iter and errors (initial and final) to float32 rounding."""
    _check_small_case(small_emu, tmp_path, case, cols=True)


def test_fast_path_cols_kernel_gives_the_same_bits_alone_and_in_a_batch(small_emu, tmp_path):
    """A problem's bits do not depend on its neighbours in the launch."""
    X, W, H = _small_problem(3, 26, 44, 5, seed=7)
    Wb, Hb, ob = _run_small(small_emu, tmp_path, X, W, H, C=4, cols=True, max_iter=5)
    W1, H1, o1 = _run_small(small_emu, tmp_path, X[1:2], W[1:2], H[1:2], C=4, cols=True, max_iter=5)
    assert np.array_equal(Wb[1], W1[0]) and np.array_equal(Hb[1], H1[0]) and ob[1] == o1[0]


# COLS_CASES with one more row where k = 5 (m k then not a multiple of 4: the scalar tail after
# the float4 loads); k5-C16: the second round of loads
VEC_CASES = [dict(c, m=c["m"] + 1) if c["k"] == 5 else c for c in COLS_CASES]


@pytest.mark.parametrize("case", VEC_CASES, ids=COLS_IDS)
def test_fast_path_cols_vec_and_push_give_the_default_bits(small_emu, tmp_path, case):
    """DFFKIT_CUDA_SMALL_COLS_VEC (the shares of X H^T read four floats a request, the first
    round issued before G_H's sums) and DFFKIT_CUDA_SMALL_COLS_PUSH (the shares stored into
    every block, added there from its own memory) change no bit: W, H, n_iter and both errors
    equal the default kernel's, and all hold the bound against the CPU engine."""
    default = _check_small_case(small_emu, tmp_path, case, cols=True)
    for switch in ("vec", "push"):
        Wv, Hv, ov = _check_small_case(small_emu, tmp_path, case, cols=True, **{switch: True})
        assert np.array_equal(default[0], Wv) and np.array_equal(default[1], Hv) and default[2] == ov, switch


@pytest.mark.parametrize("C", [2, 4])
def test_fast_path_cols_kernel_with_skewed_blocks(small_emu, tmp_path, C):
    """The lower ranks run ahead after every cluster barrier (the emulator holds rank r back
    r x 50 ms): a block that overwrites an exchange buffer its peers have not read yet gives wrong
    numbers here (checked: one buffer instead of two fails this test; ThreadSanitizer missed it)."""
    X, W, H = _small_problem(1, 24, 40, 5, seed=3)
    Wc, Hc, ic = _cpu_fit_full(X[0], W[0], H[0], max_iter=6)
    for switch in ({}, {"vec": True}, {"push": True}):
        Wg, Hg, outs = _run_small(small_emu, tmp_path, X, W, H, C=C, cols=True, max_iter=6, skew_us=50000,
                                  **switch)
        assert _rel(Wg[0], Wc) <= 3e-6 and _rel(Hg[0], Hc) <= 3e-6
        assert abs(outs[0][2] - ic["error"]) <= 1e-5 * ic["error"]


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_fast_path_cols_kernel_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """The column-split kernel with clusters of 2 and 4 blocks under ThreadSanitizer (its one
    barrier per iteration and the two exchange buffers: a buffer written while a peer reads it is
    a race) and AddressSanitizer; with the stopping rule, which ends the loop one barrier late."""
    exe = _sanitized(tmp_path_factory, sanitizer, "small_emu.cpp")
    X, W, H = _small_problem(1, 30, 37, 5, seed=1)
    # the second and third stop at iteration 10; the third reads the shares four floats a
    # request (DFFKIT_CUDA_SMALL_COLS_VEC), its first loads before the stopping test
    # (the fourth stores the shares into every block: DFFKIT_CUDA_SMALL_COLS_PUSH)
    for C, max_iter, tol, switch in ((2, 3, 0.0, None), (4, 12, 0.99, None), (4, 12, 0.99, "vec"),
                                     (4, 12, 0.99, "push")):
        Wc, Hc, ic = _cpu_fit_full(X[0], W[0], H[0], max_iter=max_iter, tol=tol)
        Wg, Hg, outs = _run_small(exe, tmp_path, X, W, H, C=C, cols=True, max_iter=max_iter, tol=tol,
                                  **({switch: True} if switch else {}))
        assert outs[0][0] == ic["n_iter"] == (10 if tol else max_iter)
        assert _rel(Wg[0], Wc) <= 1e-4 and _rel(Hg[0], Hc) <= 1e-4


# ---- the general resident kernel (cuda/nmf_engine_kernels.cuh): KL, groups, the objective,
# k > 16, staged rows, P and R in global memory, float64, bf16 X, tf32, clusters ---------------

@pytest.fixture(scope="module")
def resident_emu(tmp_path_factory):
    return _build(tmp_path_factory, "resident_emu.cpp")


def _solve_case(exe, d, meta, X, W, H, goff, dtype):
    """Write one whole-solve case (meta.txt, X as T or bfloat16 bits, W, H, group offsets), run the
    harness on it, read back W, H, the objective and (n_iter, error_init, error)."""
    m, n = X.shape
    k = W.shape[1]
    T = np.float64 if dtype == "f64" else np.float32
    d.mkdir()
    (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
    if dtype.startswith("bf16x"):
        _bf16_round(X)[0].tofile(d / "X.bin")
    else:
        np.ascontiguousarray(X, dtype=T).tofile(d / "X.bin")
    np.ascontiguousarray(W, dtype=T).tofile(d / "W.bin")
    np.ascontiguousarray(H, dtype=T).tofile(d / "H.bin")
    goff.tofile(d / "goff.bin")
    done = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    n_iter, e0, e = (float(v) for v in (d / "out.txt").read_text().split())
    return dict(W=np.fromfile(d / "W_out.bin", dtype=T).reshape(m, k),
                H=np.fromfile(d / "H_out.bin", dtype=T).reshape(k, n),
                objective=np.fromfile(d / "objective.bin", dtype=np.float64)[:int(n_iter)],
                n_iter=int(n_iter), error_init=e0, error=e)


def _run_solve(exe, tmp_path, X, W, H, harness_meta, *, dtype, beta=2, limit=227 * 1024, max_iter=4, tol=0.0,
               pen=(0, 0, 0, 0), lam=0.0, mu=0.0, update_H=True, record=False, groups=None):
    """One whole solve on a harness (resident_emu, driver_emu): the options as meta.txt, plus the
    harness's own keys; the layout the harness reports, where it does."""
    m, n = X.shape
    k = W.shape[1]
    goff = np.asarray(groups if groups is not None else [], dtype=np.int64)
    meta = dict(harness_meta, m=m, n=n, k=k, dtype=dtype, beta=beta, limit=limit, max_iter=max_iter, tol=tol,
                l1_W=pen[0], l2_W=pen[1], l1_H=pen[2], l2_H=pen[3], lam=lam, mu=mu, update_H=int(update_H),
                record=int(record), ngroups=max(len(goff) - 1, 0))
    d = tmp_path / "_".join(f"{v}" for v in (exe.stem, dtype, beta, m, n, k, limit, max_iter, int(record),
                                              int(update_H), *harness_meta.values()))
    out = _solve_case(exe, d, meta, X, W, H, goff, dtype)
    if (d / "layout.txt").exists():
        out["layout"] = {key: int(v) for key, v in
                         (line.split() for line in (d / "layout.txt").read_text().splitlines())}
    return out


def _run_resident(exe, tmp_path, X, W, H, *, C=1, dtype="f32", **kw):
    return _run_solve(exe, tmp_path, X, W, H, dict(C=C), dtype=dtype, **kw)


def _cpu_fit_full(X, W, H, *, beta=2, max_iter=4, tol=0.0, pen=(0, 0, 0, 0), lam=0.0, mu=0.0, update_H=True,
                  record=False, groups=None):
    from dffkit import _backends

    cpu = _backends.cpu()
    p = cpu.Params()
    p.beta = beta
    p.l1_W, p.l2_W, p.l1_H, p.l2_H = pen
    p.lam, p.mu, p.max_iter, p.tol, p.update_H, p.record_objective = lam, mu, max_iter, tol, update_H, record
    W, H = W.copy(), H.copy()
    info = cpu.fit(np.ascontiguousarray(X), W, H, p, list(groups or []))
    return W, H, info


def _resident_problem(m, n, k, dtype=np.float32, seed=0, zeros=False):
    rng = np.random.default_rng(seed)
    X = rng.random((m, k + 2)) @ rng.random((k + 2, n)) + 0.05 * rng.random((m, n))
    if zeros:
        X[rng.random((m, n)) < 0.2] = 0
    s = np.sqrt(X.mean() / k)
    W = s * np.abs(rng.standard_normal((m, k)))
    H = s * np.abs(rng.standard_normal((k, n)))
    return X.astype(dtype), W.astype(dtype), H.astype(dtype)


def _check_solve(out, X, W, H, case, dtype, error_init=False):
    """A whole solve against the CPU engine from the same start (for bf16 X: the problem for the
    rounded X): iteration count, the stopping rule, factors to float32 (float64) accuracy, the
    final error, the objective, H untouched when it is fixed."""
    Xr = _bf16_round(X)[1].reshape(X.shape) if dtype.startswith("bf16x") else X
    Wc, Hc, ic = _cpu_fit_full(Xr, W, H, **case)
    tol = 1e-9 if dtype == "f64" else 3e-6
    assert out["n_iter"] == ic["n_iter"]
    assert (out["n_iter"] < case["max_iter"]) == (case.get("tol", 0) > 0)
    assert _rel(out["W"], Wc) <= tol and _rel(out["H"], Hc) <= tol
    assert abs(out["error"] - ic["error"]) <= 1e-5 * ic["error"]
    if error_init:
        assert abs(out["error_init"] - ic["error_init"]) <= 1e-5 * ic["error_init"]
    if case.get("record"):
        np.testing.assert_allclose(out["objective"], ic["objective"], rtol=1e-5)
    if not case.get("update_H", True):
        assert np.array_equal(out["H"], H)


RESIDENT_CASES = {
    # everything on chip
    "kl": dict(shape=(40, 37, 3), beta=2 - 1),
    # X rows beyond shared memory go through the staging tiles
    "kl-staged": dict(shape=(150, 64, 5), beta=1, limit=40 * 1024, staged=True),
    # R (KL) in global memory, and X read from global memory (no room for a staging tile)
    "kl-globalR": dict(shape=(40, 256, 5), beta=1, limit=40 * 1024, expect=dict(R_s=0, nbuf=0)),
    # groups, penalties, the objective
    "groups-objective": dict(shape=(60, 40, 6), pen=(0.1, 0.2, 0.05, 0.1), lam=0.3, mu=0.1, record=True,
                             groups=[0, 20, 20, 60]),
    # k = 20: register tile 24
    "k20": dict(shape=(50, 48, 20), pen=(0.2, 0.1, 0.0, 0.3)),
    # H and P in global memory (they do not fit)
    "globalHP": dict(shape=(30, 300, 12), limit=16 * 1024, expect=dict(H_s=0, P_s=0)),
    "f64-kl": dict(shape=(30, 20, 4), beta=1, dtype="f64"),
    "bf16x": dict(shape=(64, 40, 5), dtype="bf16x"),
    "cluster2": dict(shape=(64, 40, 5), C=2),
    "stopping": dict(shape=(60, 30, 4), max_iter=40, tol=5e-2),
    "fixed-H-kl": dict(shape=(40, 37, 3), beta=1, update_H=False),
}


@pytest.mark.parametrize("name", list(RESIDENT_CASES))
def test_resident_kernel_matches_cpu_engine(resident_emu, tmp_path, name):
    case = dict(RESIDENT_CASES[name])
    m, n, k = case.pop("shape")
    dtype = case.pop("dtype", "f32")
    expect = case.pop("expect", {})
    staged = case.pop("staged", False)
    run_kw = {key: case.pop(key) for key in ("C", "limit") if key in case}
    case.setdefault("max_iter", 4)
    beta = case.get("beta", 2)
    X, W, H = _resident_problem(m, n, k, np.float64 if dtype == "f64" else np.float32, seed=m + n + k,
                                zeros=beta == 1)
    out = _run_resident(resident_emu, tmp_path, X, W, H, dtype=dtype, **run_kw, **case)
    for key, v in expect.items():
        assert out["layout"][key] == v, (key, out["layout"])
    if staged:
        assert out["layout"]["nbuf"] > 0 and out["layout"]["xs_rows"] < m
    _check_solve(out, X, W, H, case, dtype)


def test_resident_kernel_tf32_runs_on_tensor_cores(resident_emu, tmp_path):
    """MODE 1 (precision tf32): the products through the emulated mma.sync; within the tf32
    bound of the CPU engine, and not the float32 kernel's result."""
    X, W, H = _resident_problem(40, 48, 7, seed=3)
    out = _run_resident(resident_emu, tmp_path, X, W, H, dtype="tf32")
    f32 = _run_resident(resident_emu, tmp_path, X, W, H, dtype="f32", max_iter=4, limit=226 * 1024)
    Wc, Hc, ic = _cpu_fit_full(X, W, H)
    assert _rel(out["W"], Wc) <= 2e-3 and _rel(out["H"], Hc) <= 2e-3
    assert _rel(f32["W"], Wc) <= 3e-6
    assert _rel(out["W"], Wc) > 10 * _rel(f32["W"], Wc)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_resident_kernel_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """The general resident kernel with staged rows (cp.async groups, two staging tiles) and
    KL, and with a cluster of two blocks, under ThreadSanitizer and AddressSanitizer."""
    exe = _sanitized(tmp_path_factory, sanitizer, "resident_emu.cpp")
    for beta, shape, kw in ((1, (150, 64, 5), dict(limit=40 * 1024)), (2, (64, 40, 5), dict(C=2))):
        X, W, H = _resident_problem(*shape, seed=2, zeros=beta == 1)
        out = _run_resident(exe, tmp_path, X, W, H, beta=beta, max_iter=2, **kw)
        Wc, Hc, ic = _cpu_fit_full(X, W, H, beta=beta, max_iter=2)
        assert _rel(out["W"], Wc) <= 3e-6 and _rel(out["H"], Hc) <= 3e-6


# ---- whole solves with the sweep and gemm engines' kernels, in the order of their driver ---------

@pytest.fixture(scope="module")
def driver_emu(tmp_path_factory):
    return _build(tmp_path_factory, "driver_emu.cpp")


def _run_driver(exe, tmp_path, X, W, H, *, engine="gemm", dtype="f32split", max_slices=1 << 30, max_stages=None,
                **kw):
    meta = dict(engine=engine, max_slices=max_slices)
    if max_stages is not None:  # the single pass: at most this many tile buffers
        meta["max_stages"] = max_stages
    return _run_solve(exe, tmp_path, X, W, H, meta, dtype=dtype, **kw)


GEMM_SOLVE_CASES = {
    # split tf32 (the float32 default), several N blocks, P slices and H slices
    "split": dict(shape=(300, 200, 20)),
    "split-penalties-mu": dict(shape=(150, 70, 9), pen=(0.1, 0.2, 0.05, 0.1), mu=0.05),
    "groups-objective": dict(shape=(129, 64, 12), lam=0.3, mu=0.1, record=True, groups=[0, 40, 40, 129]),
    "fixed-H": dict(shape=(100, 48, 5), update_H=False),
    "stopping": dict(shape=(120, 40, 4), max_iter=40, tol=5e-2),
    "cuda-cores": dict(shape=(130, 37, 33), dtype="f32"),
    "f64": dict(shape=(90, 60, 7), dtype="f64"),
    "bf16x": dict(shape=(100, 64, 6), dtype="bf16xsplit"),
    "two-slices": dict(shape=(200, 40, 8), max_slices=2),
}


@pytest.mark.parametrize("name", list(GEMM_SOLVE_CASES))
def test_gemm_engine_solve_matches_cpu_engine(driver_emu, tmp_path, name):
    case = dict(GEMM_SOLVE_CASES[name])
    m, n, k = case.pop("shape")
    dtype = case.pop("dtype", "f32split")
    max_slices = case.pop("max_slices", 1 << 30)
    case.setdefault("max_iter", 4)
    X, W, H = _resident_problem(m, n, k, np.float64 if dtype == "f64" else np.float32, seed=m + n + k)
    out = _run_driver(driver_emu, tmp_path, X, W, H, dtype=dtype, max_slices=max_slices, **case)
    _check_solve(out, X, W, H, case, dtype, error_init=True)


SWEEP_CASES = {
    "frobenius-penalties": dict(shape=(150, 64, 5), pen=(0.1, 0.2, 0.05, 0.1)),
    "kl": dict(shape=(150, 64, 5), beta=1),
    # R (KL) and the X tiles read from global memory: a small shared-memory limit
    "kl-globalR": dict(shape=(100, 256, 4), beta=1, limit=30 * 1024, expect=dict(R_s=0)),
    "groups-objective": dict(shape=(129, 40, 6), lam=0.3, mu=0.1, record=True, groups=[0, 40, 40, 129]),
    # (k > 16, register tile 24: the resident kernel's case "k20" runs the same tile routine)
    "f64-kl": dict(shape=(80, 30, 4), beta=1, dtype="f64"),
    "bf16x": dict(shape=(100, 64, 6), dtype="bf16x"),
    "stopping-kl": dict(shape=(48, 30, 3), beta=1, max_iter=40, tol=5e-2),
    "fixed-H": dict(shape=(100, 48, 5), update_H=False),
}


@pytest.mark.parametrize("name", list(SWEEP_CASES))
def test_sweep_engine_solve_matches_cpu_engine(driver_emu, tmp_path, name):
    """The sweep engine (row tiles of 32, per-block partials, both losses) on the emulator."""
    case = dict(SWEEP_CASES[name])
    m, n, k = case.pop("shape")
    dtype = case.pop("dtype", "f32")
    expect = case.pop("expect", {})
    limit = case.pop("limit", 227 * 1024)
    case.setdefault("max_iter", 4)
    beta = case.get("beta", 2)
    X, W, H = _resident_problem(m, n, k, np.float64 if dtype == "f64" else np.float32, seed=m + n + k,
                                zeros=beta == 1)
    out = _run_driver(driver_emu, tmp_path, X, W, H, engine="sweep", dtype=dtype, limit=limit, **case)
    for key, v in expect.items():
        assert out["layout"][key] == v, (key, out["layout"])
    _check_solve(out, X, W, H, case, dtype)


def test_sweep_engine_tf32_runs_on_tensor_cores(driver_emu, tmp_path):
    X, W, H = _resident_problem(120, 48, 7, seed=5)
    out = _run_driver(driver_emu, tmp_path, X, W, H, engine="sweep", dtype="tf32")
    Wc, Hc, ic = _cpu_fit_full(X, W, H)
    assert 3e-6 < _rel(out["W"], Wc) <= 2e-3 and _rel(out["H"], Hc) <= 2e-3


# ---- the gemm engine's single-pass kernel for tall problems (cuda/nmf_fused.cuh) ------------------

FUSED_CASES = {
    # n = 200: the X tile padded to 224 columns (zero), k = 20 padded to 24, a partial last tile
    "split": dict(shape=(300, 200, 20)),
    # the largest shape it takes: n = 512, k = 32 (four P^T column tiles per warp)
    "n512-k32": dict(shape=(40, 512, 32), max_iter=2),
    # one column tile (k <= 8), 20 padded columns
    "k8-padded": dict(shape=(100, 44, 8), pen=(0.1, 0.2, 0.05, 0.1), mu=0.05, record=True),
    # two blocks for 7 tiles: a block walks several tiles (both buffers, P kept across tiles)
    "tiles-per-block": dict(shape=(200, 64, 12), max_slices=2),
    "fixed-H": dict(shape=(100, 48, 5), update_H=False),
    "stopping": dict(shape=(120, 40, 4), max_iter=40, tol=5e-2),
    # X as bfloat16 (two mma per product: X exact in tf32), 56 padded columns, a partial tile
    "bf16x": dict(shape=(150, 200, 20), dtype="bf16xsplit"),
    "bf16x-tiles-per-block": dict(shape=(200, 40, 12), dtype="bf16xsplit", max_slices=2),
}


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_kernel_solve_matches_cpu_engine(driver_emu, tmp_path, name):
    """The single-pass kernel (split tf32) in the gemm engine's loop, against the CPU engine (for
    bfloat16 X: on the rounded X)."""
    case = dict(FUSED_CASES[name])
    m, n, k = case.pop("shape")
    max_slices = case.pop("max_slices", 1 << 30)
    dtype = case.pop("dtype", "f32split")
    case.setdefault("max_iter", 4)
    X, W, H = _resident_problem(m, n, k, seed=m + n + k)
    out = _run_driver(driver_emu, tmp_path, X, W, H, engine="fused", dtype=dtype, max_slices=max_slices, **case)
    _check_solve(out, X, W, H, case, dtype, error_init=True)


@pytest.mark.parametrize("dtype", ["f32split", "bf16xsplit"])
def test_fused_kernel_tile_buffers_change_no_bits(driver_emu, tmp_path, dtype):
    """Two blocks walking 6 tiles each with 2, 3 or 4 tile buffers (1 to 3 tiles in flight,
    buffers reused, empty copy groups at the end): the same bits, and those of the CPU engine's
    solve."""
    X, W, H = _resident_problem(370, 64, 12, seed=6)
    outs = [_run_driver(driver_emu, tmp_path, X, W, H, engine="fused", dtype=dtype, max_slices=2,
                        max_stages=s, max_iter=2) for s in (2, 3, 4)]
    assert [o["layout"]["stages"] for o in outs] == [2, 3, 4]
    assert all(o["layout"]["blocks"] == 2 for o in outs)
    for o in outs[1:]:
        assert np.array_equal(o["W"], outs[0]["W"]) and np.array_equal(o["H"], outs[0]["H"])
    _check_solve(outs[0], X, W, H, dict(max_iter=2), dtype)


def test_fused_kernel_tf32_runs_on_tensor_cores(driver_emu, tmp_path):
    """Precision tf32: one mma per product, operands rounded; within the tf32 bound, and not
    the float32 result."""
    X, W, H = _resident_problem(130, 96, 10, seed=8)
    out = _run_driver(driver_emu, tmp_path, X, W, H, engine="fused", dtype="tf32")
    Wc, Hc, ic = _cpu_fit_full(X, W, H)
    assert 3e-6 < _rel(out["W"], Wc) <= 2e-3 and _rel(out["H"], Hc) <= 2e-3


def test_fused_kernel_refuses_what_it_does_not_serve(driver_emu, tmp_path):
    """n beyond 512, n not a multiple of 4 (of 8 for bfloat16 X), k beyond 32, groups: the plan
    says no (the engine then runs the two-pass kernels)."""
    for shape, kw in (((40, 516, 4), {}), ((40, 42, 4), {}), ((40, 64, 33), {}),
                      ((40, 44, 4), dict(dtype="bf16xsplit")), ((40, 64, 4), dict(lam=0.1, groups=[0, 20, 40]))):
        X, W, H = _resident_problem(*shape, seed=1)
        with pytest.raises(AssertionError, match="single-pass kernel does not serve"):
            _run_driver(driver_emu, tmp_path, X, W, H, engine="fused", max_iter=1, **kw)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_fused_kernel_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """The single-pass kernel under ThreadSanitizer (a barrier missing between the N partials,
    the W step and the P step, or a tile buffer refilled while it is read, is a race) and
    AddressSanitizer (shared memory is one allocation of exactly the layout's bytes): a block
    walking several tiles, padded columns and a partial last tile."""
    exe = _sanitized(tmp_path_factory, sanitizer, "driver_emu.cpp")
    X, W, H = _resident_problem(130, 44, 20, seed=4)  # 5 tiles: blocks of 3 and 2
    out = _run_driver(exe, tmp_path, X, W, H, engine="fused", max_slices=2, max_iter=1)
    Wc, Hc, ic = _cpu_fit_full(X, W, H, max_iter=1)
    assert _rel(out["W"], Wc) <= 3e-6 and _rel(out["H"], Hc) <= 3e-6


def test_fused_plan_serves_its_whole_range(tmp_path_factory):
    """Every shape the single pass is documented to take (n <= 512, a multiple of 4 or of 8 for
    bfloat16, k <= 32) fits an H100/H200 block's 227 KB, and the largest ones still get two
    tile buffers."""
    exe = _build(tmp_path_factory, "plan_emu.cpp")
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]
    stages = dict(tuple(map(int, line.split()[1:])) for line in done.stdout.splitlines()
                  if line.startswith("stages"))
    assert set(stages) <= {2, 3, 4} and stages.get(2, 0) > 0 and stages.get(4, 0) > 0


# ---- the float32 error where the fit is good: from a pass over X, not the trace identity ---------

def _near_solution_problem(m, n, k, seed=0, B=None):
    """X exactly of rank k (float32) and a start within 5 % of a solution: the error is about
    1e-3 of ||X||, where the trace identity's float32 terms cancel to noise."""
    rng = np.random.default_rng(seed)
    Wt, Ht = rng.random((m, k)) + 0.5, rng.random((k, n)) + 0.5
    X = (Wt @ Ht).astype(np.float32)
    W = (Wt * (1 + 0.05 * rng.random(Wt.shape))).astype(np.float32)
    H = (Ht * (1 + 0.05 * rng.random(Ht.shape))).astype(np.float32)
    return X, W, H


def _true_error(X, W, H):
    return float(np.linalg.norm(X.astype(np.float64) - W.astype(np.float64) @ H.astype(np.float64)))


NEAR_CASES = {
    "fast-path-C1": dict(kind="small", C=1),
    "fast-path-C2": dict(kind="small", C=2),
    "fast-path-tensor-cores": dict(kind="small", C=2, tc=True),
    "fast-path-cols-C2": dict(kind="small", C=2, cols=True),
    "resident": dict(kind="resident", C=1),
    "resident-cluster2": dict(kind="resident", C=2),
    "sweep": dict(kind="driver", engine="sweep", dtype="f32"),
    "gemm": dict(kind="driver", engine="gemm", dtype="f32split"),
    "fused": dict(kind="driver", engine="fused", dtype="f32split"),
}


@pytest.mark.parametrize("name", list(NEAR_CASES))
def test_float32_error_is_measured_not_cancelled(small_emu, resident_emu, driver_emu, tmp_path, name):
    """Every float32 path reports the true initial and final errors of a near-exact fit, and
    the tol test stops where the CPU engine's does."""
    case = dict(NEAR_CASES[name])
    kind = case.pop("kind")
    X, W, H = _near_solution_problem(64, 40, 4, seed=1)
    opts = dict(max_iter=40, tol=1e-2)
    if kind == "small":
        Wg, Hg, outs = _run_small(small_emu, tmp_path, X[None], W[None], H[None], **case, **opts)
        Wg, Hg, (n_iter, e0, e) = Wg[0], Hg[0], outs[0]
    else:
        exe = resident_emu if kind == "resident" else driver_emu
        run = _run_resident if kind == "resident" else _run_driver
        out = run(exe, tmp_path, X, W, H, **case, **opts)
        Wg, Hg, n_iter, e0, e = out["W"], out["H"], out["n_iter"], out["error_init"], out["error"]
    Wc, Hc, ic = _cpu_fit_full(X, W, H, **opts)
    assert e0 == pytest.approx(_true_error(X, W, H), rel=1e-4)
    assert e == pytest.approx(_true_error(X, Wg, Hg), rel=1e-3)
    assert n_iter == ic["n_iter"]


# ---- the full-pass error kernel (error_kernel, cuda/nmf_engine_kernels.cuh): register tiles ------

@pytest.fixture(scope="module")
def error_emu(tmp_path_factory):
    return _build(tmp_path_factory, "error_emu.cpp")


def _run_error(exe, d, X, W, H, *, dtype, kl=False, blocks=0, stopped=False):
    """error_kernel's per-block partials for X (stored as bfloat16 for dtype bf16x), W, H, launched
    on `blocks` blocks (0: as the engines launch it), and the engines' block count."""
    m, n = X.shape
    k = W.shape[1]
    T = np.float64 if dtype == "f64" else np.float32
    d.mkdir()
    meta = dict(m=m, n=n, k=k, dtype=dtype, kl=int(kl), blocks=blocks, stopped=int(stopped))
    (d / "meta.txt").write_text("".join(f"{key} {v}\n" for key, v in meta.items()))
    if dtype == "bf16x":
        _bf16_round(X)[0].tofile(d / "X.bin")
    else:
        np.ascontiguousarray(X, dtype=T).tofile(d / "X.bin")
    np.ascontiguousarray(W, dtype=T).tofile(d / "W.bin")
    np.ascontiguousarray(H, dtype=T).tofile(d / "H.bin")
    done = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return np.fromfile(d / "spart.bin", dtype=np.float64), int((d / "blocks.txt").read_text())


def _error_oracle(X, W, H, kl):
    """sum (x - wh)^2, or the KL divergence's terms x log(x / max(wh, eps)) - x + wh (x > eps; wh
    otherwise), in float64 from the values the kernel reads."""
    X64, WH = X.astype(np.float64), W.astype(np.float64) @ H.astype(np.float64)
    if not kl:
        return float(np.sum((X64 - WH) ** 2))
    eps = float(np.finfo(np.float32).eps)
    pos = X64 > eps
    x, wh = X64[pos], WH[pos]
    return float(np.sum(x * np.log(x / np.maximum(wh, eps)) - x + wh) + np.sum(WH[~pos]))


# shapes that are no multiple of a tile, one row, one column, several tiles both ways
ERROR_SHAPES = [(37, 29), (130, 70), (1, 300), (300, 1), (130, 300)]
# one column of W; within one staged slice of k (float64: 16, float32: 32); just past one; several
ERROR_KS = [1, 5, 17, 33, 64, 100]


@pytest.mark.parametrize("kl", [False, True], ids=["frobenius", "kl"])
@pytest.mark.parametrize("dtype", ["f32", "f64", "bf16x"])
def test_error_kernel_matches_float64_oracle(error_emu, tmp_path, dtype, kl):
    """The error pass's total (its partials summed in order, as finalize_kernel does) against
    float64 numpy, from the values the kernel reads (X rounded to bfloat16 for bf16x): X with
    zeros (KL's wh-only terms) and a zero row of W (wh below eps)."""
    T = np.float64 if dtype == "f64" else np.float32
    rtol = 1e-12 if dtype == "f64" else 1e-6  # measured: 4e-16, 2e-8
    for m, n in ERROR_SHAPES:
        for k in ERROR_KS:
            rng = np.random.default_rng(m * 1000 + n + k)
            X = rng.random((m, n))
            X[rng.random((m, n)) < 0.2] = 0
            W = rng.random((m, k)) * np.sqrt(2 / k)
            H = rng.random((k, n)) * np.sqrt(2 / k)
            if m > 2:
                W[m // 2] = 0
            X, W, H = X.astype(T), W.astype(T), H.astype(T)
            Xr = _bf16_round(X)[1].reshape(X.shape) if dtype == "bf16x" else X
            spart, blocks = _run_error(error_emu, tmp_path / f"{m}_{n}_{k}", X, W, H, dtype=dtype, kl=kl)
            assert len(spart) == blocks and 1 <= blocks <= 1024
            total = sum(float(v) for v in spart)
            assert total == pytest.approx(_error_oracle(Xr, W, H, kl), rel=rtol), (m, n, k)


@pytest.mark.parametrize("dtype", ["f32", "f64", "bf16x"])
def test_error_kernel_tiles_cover_every_element_once(error_emu, tmp_path, dtype):
    """Integer W, H in {0, 1} and X = W H + (1, 2 or 3): every element's term is a positive
    integer, every sum exact, so an element dropped (a partial tile, a tail of k) or counted
    twice, or a product from the wrong row or column, changes the total: it equals the oracle
    exactly, on the engines' grid and on two blocks that walk all the tiles."""
    T = np.float64 if dtype == "f64" else np.float32
    for m, n in ERROR_SHAPES + [(65, 129), (200, 257)]:
        for k in (1, 16, 17, 32, 33, 100):
            rng = np.random.default_rng(m + n + k)
            W = rng.integers(0, 2, (m, k)).astype(T)
            H = rng.integers(0, 2, (k, n)).astype(T)
            X = (W.astype(np.float64) @ H + rng.integers(1, 4, (m, n))).astype(T)  # <= 103: exact in bfloat16
            want = _error_oracle(X, W, H, False)
            for blocks in (0, 2):
                spart, _ = _run_error(error_emu, tmp_path / f"{m}_{n}_{k}_{blocks}", X, W, H, dtype=dtype,
                                      blocks=blocks)
                assert (spart >= 0).all(), "every block writes its partial"
                assert sum(float(v) for v in spart) == want, (m, n, k, blocks)


def test_error_kernel_returns_once_stopped(error_emu, tmp_path):
    """After the stopping rule fired (State::stopped) the pass writes nothing."""
    X, W, H = _resident_problem(70, 40, 5, seed=1)
    spart, blocks = _run_error(error_emu, tmp_path / "stopped", X, W, H, dtype="f32", stopped=True)
    assert len(spart) == blocks and (spart == -7).all()


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_error_kernel_under_sanitizers(tmp_path_factory, tmp_path, sanitizer):
    """ThreadSanitizer: a slice restaged while a thread still multiplies the previous one is a
    race; AddressSanitizer: a read past W, H or X at the last row, column or column of W."""
    exe = _sanitized(tmp_path_factory, sanitizer, "error_emu.cpp")
    for dtype, (m, n, k), blocks in (("f32", (130, 150, 33), 2), ("f64", (70, 29, 17), 0),
                                     ("bf16x", (65, 129, 40), 0)):
        X, W, H = _resident_problem(m, n, k, np.float64 if dtype == "f64" else np.float32, seed=k)
        Xr = _bf16_round(X)[1].reshape(X.shape) if dtype == "bf16x" else X
        for kl in (False, True):
            spart, _ = _run_error(exe, tmp_path / f"{dtype}_{kl}", X, W, H, dtype=dtype, kl=kl, blocks=blocks)
            assert sum(spart) == pytest.approx(_error_oracle(Xr, W, H, kl), rel=1e-5)
