"""Small driver for compute-sanitizer (memcheck, racecheck): every kernel path of dffkit._cuda
once, on tiny problems (the tools slow kernels down 10-100x). Exits non-zero on a wrong result.

    compute-sanitizer --tool memcheck python3 benchmarks/cuda_sanitize_driver.py
"""
import os
import sys

import numpy as np

from dffkit import _backends
from dffkit import _cuda_backend as cb

cuda = _backends.cuda()
cpu = _backends.cpu()
# the fast path's row-split kernel for every case below that does not ask for the column split
# (the default since session 15); SAN_ONLY="fast cols,gemm": only the cases whose name starts so
os.environ["DFFKIT_CUDA_SMALL_COLS"] = "0"
ONLY = tuple(s.strip() for s in os.environ.get("SAN_ONLY", "").split(",") if s.strip())


def params(mod, **kw):
    p = mod.Params()
    p.max_iter = kw.pop("max_iter", 4)
    p.tol = kw.pop("tol", 0.0)
    for key, v in kw.items():
        setattr(p, key, v)
    return p


def problem(m, n, k, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.random((m, k)) @ rng.random((k, n)) + 0.1 * rng.random((m, n))).astype(dtype)
    X[rng.random((m, n)) < 0.1] = 0
    W = rng.random((m, k)).astype(dtype) + 0.1
    H = rng.random((k, n)).astype(dtype) + 0.1
    return X, W, H


failures = 0


def check(name, X, W, H, groups=None, precision="fp32", tol=1e-3, kernel=None, **kw):
    global failures
    if ONLY and not name.startswith(ONLY):
        return
    Wg, Hg, ig = cb.fit(X, W, H, params(cuda, **kw), group_offsets=groups, precision=precision)
    if kernel is not None and ig["kernel"] != kernel:
        failures += 1
        print(f"BAD {name}: ran {ig['kernel']}, expected {kernel}", flush=True)
    kw.pop("engine", None)
    Wc, Hc = W.copy(), H.copy()
    cpu.fit(X, Wc, Hc, params(cpu, **kw), list(groups or []))
    rel = np.linalg.norm(Wg - Wc) / np.linalg.norm(Wc)
    ok = rel <= tol
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} {name}: rel diff W {rel:.2e}, n_iter {ig['n_iter']}", flush=True)


for engine in ("resident", "sweep"):
    for dtype in (np.float32, np.float64):
        X, W, H = problem(70, 45, 3, dtype)
        check(f"{engine} frobenius {np.dtype(dtype).name}", X, W, H, engine=engine)
        check(f"{engine} kl {np.dtype(dtype).name}", X, W, H, beta=1, engine=engine)
    X, W, H = problem(70, 45, 11)
    check(f"{engine} frobenius k=11 penalties", X, W, H, engine=engine, l1_W=0.1, l2_H=0.2)
    check(f"{engine} groups + objective", X, W, H, groups=[0, 20, 20, 70], lam=0.3, mu=0.1,
          record_objective=True, engine=engine)
    check(f"{engine} update_H=False", X, W, H, update_H=False, engine=engine)
    check(f"{engine} kl update_H=False", X, W, H, beta=1, update_H=False, engine=engine)
    check(f"{engine} stopping rule", X, W, H, max_iter=30, tol=1e-2, engine=engine)
    check(f"{engine} bf16x", X, W, H, precision="bf16x", tol=5e-2, engine=engine)
    check(f"{engine} tf32", X, W, H, precision="tf32", tol=5e-2, engine=engine)
    check(f"{engine} tf32 kl", X, W, H, beta=1, precision="tf32", tol=5e-2, engine=engine)
    check(f"{engine} max_iter=0", X, W, H, max_iter=0, engine=engine)
X, W, H = problem(196, 512, 5)  # fp32: a cluster of blocks per problem (Hopper)
check("resident cluster", X, W, H, engine="resident", max_iter=3)
check("resident cluster tf32", X, W, H, engine="resident", max_iter=3, precision="tf32", tol=5e-2)
X, W, H = problem(700, 512, 5)  # staged tiles (one block)
check("resident staged", X, W, H, engine="resident", max_iter=2, beta=1)
X, W, H = problem(64, 128, 4)  # 16-byte staging
check("resident aligned", X, W, H, engine="resident")
check("sweep aligned", X, W, H, engine="sweep")
# the gemm engine (Frobenius only): every column width, 4-wide and scalar loads, groups, float64
for k in (3, 20, 40):
    X, W, H = problem(150, 64, k)
    check(f"gemm k={k} aligned", X, W, H, engine="gemm")
X, W, H = problem(150, 45, 11)
check("gemm scalar loads + penalties", X, W, H, engine="gemm", l1_W=0.1, l2_H=0.2)
check("gemm groups + objective", X, W, H, groups=[0, 20, 20, 150], lam=0.3, mu=0.1,
      record_objective=True, engine="gemm")
check("gemm update_H=False", X, W, H, update_H=False, engine="gemm")
check("gemm bf16x", X, W, H, precision="bf16x", tol=5e-2, engine="gemm")
X, W, H = problem(150, 45, 11, np.float64)
check("gemm float64", X, W, H, engine="gemm")
# its single pass (sm_90): every column-tile count, padded columns, the largest layout (n = 512,
# k = 32), tf32 (DFFKIT_CUDA_GEMM_FUSED=1: float32 X takes the two passes by default; and
# DFFKIT_CUDA_GEMM_SIMT=0: at 16 < k <= 32 it takes CUDA cores, which the single pass lacks); then
# the same shape on the two-pass kernels (DFFKIT_CUDA_GEMM_FUSED=0)
if cuda.device_info(0)["cc"][0] >= 9:
    os.environ["DFFKIT_CUDA_GEMM_FUSED"] = "1"
    os.environ["DFFKIT_CUDA_GEMM_SIMT"] = "0"
    for k in (3, 20, 32):
        X, W, H = problem(150, 68, k)
        check(f"gemm fused k={k}", X, W, H, engine="gemm", kernel="gemm-fused")
    X, W, H = problem(100, 512, 32)
    check("gemm fused n=512 k=32", X, W, H, engine="gemm", max_iter=2, kernel="gemm-fused")
    check("gemm fused tf32", X, W, H, engine="gemm", max_iter=2, precision="tf32", tol=5e-2,
          kernel="gemm-fused")
    check("gemm fused update_H=False", X, W, H, engine="gemm", max_iter=2, update_H=False,
          kernel="gemm-fused")
    check("gemm fused bf16x", X, W, H, engine="gemm", max_iter=2, precision="bf16x", tol=5e-2,
          kernel="gemm-fused")
    os.environ["DFFKIT_CUDA_GEMM_FUSED"] = "0"
    check("gemm two-pass n=512 k=32", X, W, H, engine="gemm", max_iter=2, kernel="gemm")
    del os.environ["DFFKIT_CUDA_GEMM_FUSED"], os.environ["DFFKIT_CUDA_GEMM_SIMT"]
# the fast path's column-split kernel (DFFKIT_CUDA_SMALL_COLS=1, sm_90): clusters of 8 and 16
# (non-portable), the stopping rule (decided one cluster barrier late), bfloat16 X, fixed H
if cuda.device_info(0)["cc"][0] >= 9:
    os.environ["DFFKIT_CUDA_SMALL_COLS"] = "1"
    X, W, H = problem(196, 512, 5)
    check("fast cols", X, W, H, engine="resident", max_iter=3, kernel="resident-fast-cols")
    check("fast cols stopping rule", X, W, H, engine="resident", max_iter=30, tol=1e-2,
          kernel="resident-fast-cols")
    check("fast cols bf16x", X, W, H, engine="resident", max_iter=3, precision="bf16x", tol=5e-2,
          kernel="resident-fast-cols")
    check("fast cols update_H=False", X, W, H, engine="resident", max_iter=3, update_H=False,
          kernel="resident-fast-cols")
    os.environ["DFFKIT_CUDA_SMALL_COLS_C"] = "16"
    check("fast cols C=16", X, W, H, engine="resident", max_iter=3, kernel="resident-fast-cols")
    del os.environ["DFFKIT_CUDA_SMALL_COLS_C"]
    # its switches, each with the stopping rule and clusters of 16: the W update split over the
    # cluster (gather), the shares read four floats a request (vec), stored into every block (push)
    for name in ("gather", "vec", "push"):
        switch = f"DFFKIT_CUDA_SMALL_COLS_{name.upper()}"
        os.environ[switch] = "1"
        check(f"fast cols {name}", X, W, H, engine="resident", max_iter=3, kernel="resident-fast-cols")
        check(f"fast cols {name} stopping rule", X, W, H, engine="resident", max_iter=30, tol=1e-2,
              kernel="resident-fast-cols")
        os.environ["DFFKIT_CUDA_SMALL_COLS_C"] = "16"
        check(f"fast cols {name} C=16", X, W, H, engine="resident", max_iter=3, kernel="resident-fast-cols")
        del os.environ["DFFKIT_CUDA_SMALL_COLS_C"], os.environ[switch]
    os.environ["DFFKIT_CUDA_SMALL_COLS"] = "0"
probs = [problem(30 + 7 * b, 20 + 5 * b, 3, seed=b) for b in range(3)]
out = cb.fit_batched([p[0] for p in probs], [p[1] for p in probs], [p[2] for p in probs],
                     params(cuda, max_iter=5))
print("ok  batched", [o[2]["n_iter"] for o in out], flush=True)
Xd = cb.DeviceArray((50, 40), np.float32)
Xh = problem(50, 40, 3)[0]
cuda.memcpy_htod(Xd.ptr, Xh, 0)
Wd, Hd = cb.random_init(Xd, 3, 5)
Wc = np.empty((50, 3), np.float32)
Hc = np.empty((3, 40), np.float32)
cpu.random_init(Xh, Wc, Hc, 5)
same = np.array_equal(Wd.get(), Wc) and np.array_equal(Hd.get(), Hc)
failures += not same
print("ok " if same else "BAD", "random_init bits", flush=True)
print("ok  check_values", cb.check_values(Xd), flush=True)
print("ok  mean", cb.mean(Xd), float(Xh.mean()), flush=True)
lo, bad, sum_sq = cb.value_stats(Xd)
x64 = Xh.astype(np.float64)
same = lo == x64.min() and not bad and abs(sum_sq - float(np.dot(x64.ravel(), x64.ravel()))) <= 1e-12 * sum_sq
failures += not same
print("ok " if same else "BAD", "value_stats", (lo, bad, sum_sq), flush=True)
back = np.empty((50, 40), np.float32)
cb.copy_to_host([Xd], [back])
same = np.array_equal(back, Xh)
failures += not same
print("ok " if same else "BAD", "copy_to_host", flush=True)


def on_device(a):
    d = cb.DeviceArray(a.shape, a.dtype)
    cuda.memcpy_htod(d.ptr, np.ascontiguousarray(a), 0)
    return d


# DFF's map kernels (cuda/dff_maps.cuh): the three steps (peaks, params, heat) on two images of a
# 3 x 4 grid up to 7 x 9 (k = 3) and one 5 x 5 grid down to 2 x 3, against the host path's params
# and maps from the same W
if not ONLY or "dff maps".startswith(ONLY):
    from dffkit import deep_feature_factorization as dffm

    rng = np.random.default_rng(9)
    for n_img, (h, w), (Ho, Wo) in ((2, (3, 4), (7, 9)), (1, (5, 5), (2, 3))):
        k = 3
        W = rng.random((n_img * h * w, k)).astype(np.float32)
        fused = dffm._host_resample_fuses()
        ty = on_device(dffm._packed_taps(Ho, h))
        tx = on_device(dffm._packed_taps(Wo, w))
        blocks = [on_device(W[t * h * w:(t + 1) * h * w]) for t in range(n_img)]
        nb = dffm._peak_blocks(Ho * Wo)
        parts = cb.DeviceArray((n_img, k, nb), np.float32)
        params_d = cb.DeviceArray((n_img, 2 * k), np.float32)  # the params step's, on the device
        cb.dff_maps(blocks, ty, tx, h=h, w=w, parts=parts, fused=fused, params_out=params_d, threshold=0.1,
                    joint=True)
        peaks = np.maximum(parts.get().max(axis=2), 0.0).astype(np.float64)
        strength, divisors = dffm._strength_divisors(peaks, "joint", 0.1)
        params_ok = np.array_equal(params_d.get().view(np.uint32),
                                   np.concatenate([divisors, strength], axis=1).astype(np.float32).view(np.uint32))
        heat = cb.DeviceArray((n_img, k, Ho, Wo), np.float32)
        labels = cb.DeviceArray((n_img, Ho, Wo), np.int16)
        cb.dff_maps(blocks, ty, tx, h=h, w=w, params=params_d, threshold=0.1, heat=heat, labels=labels,
                    fused=fused)
        want_heat, _, want_labels, _ = dffm._maps(dffm._NumpyOps(), [W], [(h, w)] * n_img, [(Ho, Wo)] * n_img,
                                                  "joint", 0.1, "argmax")
        same = (params_ok and np.array_equal(heat.get(), np.stack(want_heat))
                and np.array_equal(labels.get(), np.stack(want_labels)))
        failures += not same
        print("ok " if same else "BAD", f"dff maps {n_img} x {h}x{w} -> {Ho}x{Wo}", flush=True)
sys.exit(1 if failures else 0)
