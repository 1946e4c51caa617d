"""dffkit's CUDA engine against a plain PyTorch MU loop, same process, same card (issue 5's four
target shapes). CUDA events, warm-up, median of repeats; achieved bandwidth (one pass over X per
iteration) and FLOP rate against a copy-bandwidth and matrix-product ceiling measured here.

    python3 benchmarks/cuda_bench.py [--quick] [--ab] [--large] [--cases one,batch,tall,square]
        [--variants rows,general,...]   # JSON to $OUT/cuda_bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from dffkit import _backends

cuda = _backends.cuda()
dev = torch.device("cuda")
OUT = os.environ.get("OUT", ".")
QUICK = "--quick" in sys.argv
# --ab: the small-problem cases also with the fast path switched off (the general resident
# kernel) and with its products on tensor cores (DFFKIT_CUDA_SMALL_TC=1), side by side
AB = "--ab" in sys.argv
# --large: only the two large single problems (the sweep and gemm engines side by side)
LARGE = "--large" in sys.argv
# --cases one,batch,tall,square: only the cases whose name starts so; --variants rows,cols: only
# those --ab variants (besides each precision's default)
def _listed(flag):
    if flag not in sys.argv[:-1]:
        return None
    return tuple(v.strip() for v in sys.argv[sys.argv.index(flag) + 1].split(",") if v.strip())


CASES = _listed("--cases")
ONLY_VARIANTS = _listed("--variants")


def timed(fn, reps, prep=None, warm=1):
    for _ in range(warm):
        if prep:
            prep()
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if prep:
            prep()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), ts


def ceilings():
    x = torch.empty(1 << 28, device=dev)  # 1 GiB
    y = torch.empty_like(x)
    t, _ = timed(lambda: y.copy_(x), 10)
    bw = 2 * x.numel() * 4 / (t * 1e-3)
    del x, y
    a = torch.rand(8192, 8192, device=dev)
    b = torch.rand(8192, 8192, device=dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    t32, _ = timed(lambda: a @ b, 5)
    torch.backends.cuda.matmul.allow_tf32 = True
    ttf, _ = timed(lambda: a @ b, 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    f = 2 * 8192 ** 3
    return {"copy_TBps": bw / 1e12, "sgemm_TFLOPs": f / (t32 * 1e-3) / 1e12,
            "tf32_TFLOPs": f / (ttf * 1e-3) / 1e12}


def torch_mu(X, W, H, iters):
    # numerator and denominator both from the old factor (run 2 updated W in place before the
    # denominator: the same work, but not MU, and its error column read NaN)
    for _ in range(iters):
        num, den = X @ H.transpose(-1, -2), W @ (H @ H.transpose(-1, -2))
        W.mul_(num).div_(den)
        num, den = W.transpose(-1, -2) @ X, (W.transpose(-1, -2) @ W) @ H
        H.mul_(num).div_(den)


def frob_err(X, W, H):
    return float(torch.linalg.norm((X - W @ H).double()))


def params(iters, precision="fp32", engine=None):
    p = cuda.Params()
    p.max_iter, p.tol, p.precision = iters, 0.0, precision
    if engine:
        p.engine = engine
    return p


def stream():
    return torch.cuda.current_stream().cuda_stream


all_precisions = ("fp32", "tf32", "bf16x")


def case(name, B, m, n, k, iters, reps, precisions=("fp32",), torch_reps=3, dffkit_iters=None):
    if CASES is not None and not name.startswith(CASES):
        return []
    torch.manual_seed(0)
    shape = (B, m, n) if B > 1 else (m, n)
    X = torch.rand(shape, device=dev)
    s = float(X.mean() / k) ** 0.5
    W0 = s * torch.rand(shape[:-1] + (k,), device=dev)
    H0 = s * torch.rand(shape[:-2] + (k, n), device=dev)
    W, H = W0.clone(), H0.clone()
    rows = []
    floor_bytes = iters * B * m * n * 4
    flops = iters * B * (4 * m * n * k + 2 * (m + n) * k * k)
    # (precision, variant): None = engine "auto"; "general" = the fast path off; "tc" = its
    # products on tensor cores ("tc 1/SM": and fewer, larger blocks); "regs 1/SM" / "regs 2/SM" =
    # its CUDA-core kernel's register budget forced (auto: one block per SM's when the launch's
    # blocks fit one to an SM); "rows" = its row-split kernel (two cluster barriers per
    # iteration; the default until session 15, when the column-split kernel, one barrier, took
    # over: "cols C=4" / "cols C=16": that one's cluster size forced; "cols gather": its W update
    # split over the cluster, session 16, not yet timed); "gemm" = the gemm engine
    # forced (single problems too large for the resident engine; float32 and bf16x on split-tf32
    # tensor cores; one pass over X by default for tf32 and bf16x where the single-pass kernel
    # serves the shape), "gemm 1-pass" / "gemm 2-pass" = the single pass / the two-pass kernels
    # forced, "gemm simt" / "gemm split" = those on CUDA cores / on split-tf32 tensor cores for
    # every float32 case (auto: CUDA cores at 16 < k <= 32 only), "sweep" = the row-tile sweep (engine auto's
    # choice before session 6)
    variants = [(p, None) for p in precisions]
    if AB and m * n <= (1 << 22):
        # the newest question first (rows are logged as they are timed)
        variants += [("fp32", "cols gather"), ("fp32", "cols gather C=16"),
                     ("fp32", "rows"), ("fp32", "cols C=16"), ("fp32", "cols C=4"), ("bf16x", "rows"),
                     ("fp32", "general"), ("fp32", "tc"), ("bf16x", "tc"), ("fp32", "tc 1/SM"),
                     ("fp32", "regs 1/SM"), ("fp32", "regs 2/SM")]
    if B == 1 and m * n * k > (1 << 22):
        variants += [("fp32", "sweep"), ("tf32", "sweep"), ("fp32", "gemm simt"), ("fp32", "gemm split")]
        if n <= 512:
            variants += [(p, v) for v in ("gemm 1-pass", "gemm 2-pass") for p in all_precisions]
    if ONLY_VARIANTS is not None:
        variants = [(p, v) for p, v in variants if v is None or v in ONLY_VARIANTS]
    for prec, variant in variants:
        it_d = dffkit_iters or iters
        fit_iters = it_d  # what run() asks for
        label = f"dffkit {prec}" + (f" {variant}" if variant else "")
        engine = ("gemm" if variant and variant.startswith("gemm")
                  else "sweep" if variant == "sweep" else None)
        set_variant_env(variant)
        kernel = []

        def prep():
            W.copy_(W0)
            H.copy_(H0)

        if B > 1:
            def run():
                cuda.fit_batched_strided(X.data_ptr(), W.data_ptr(), H.data_ptr(), B, m, n, k,
                                         "float32", params(fit_iters, prec), stream())
        else:
            def run():
                kernel[:] = [cuda.fit(X.data_ptr(), W.data_ptr(), H.data_ptr(), m, n, k, "float32",
                                      params(fit_iters, prec, engine), [], stream())["kernel"]]
        fixed, t_full = None, None
        try:
            t, ts = timed(run, reps, prep, warm=1 if reps > 1 else 0)
            t_full = t
            if it_d != iters:
                # a line through it_d and 2 it_d iterations: the per-fit work (the initial and
                # final error, a pass over X each since session 11) is not scaled with them
                fit_iters = 2 * it_d
                t2, _ = timed(run, reps, prep, warm=0)
                per_iter = (t2 - t) / it_d
                fixed = t - it_d * per_iter
                t_full = fixed + iters * per_iter
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append({"case": name, "impl": label, "error": repr(exc)})
            continue
        err = frob_err(X[0] if B > 1 else X, W[0] if B > 1 else W, H[0] if B > 1 else H)
        rows.append({"case": name, "impl": label, "kernel": kernel[0] if kernel else "batched",
                     "ms": t_full, "all_ms": ts,
                     "extrapolated_from_iters": [it_d, 2 * it_d] if it_d != iters else None,
                     "per_fit_ms": fixed,
                     "TBps_one_pass": floor_bytes / (t_full * 1e-3) / 1e12,
                     "TFLOPs": flops / (t_full * 1e-3) / 1e12, "err_problem0": err})
        print(rows[-1]["case"], rows[-1]["impl"], f"{t_full:.3f} ms", flush=True)
    set_variant_env(None)
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32

        def prep():
            W.copy_(W0)
            H.copy_(H0)

        t, ts = timed(lambda: torch_mu(X, W, H, iters), torch_reps, prep)
        err = frob_err(X[0] if B > 1 else X, W[0] if B > 1 else W, H[0] if B > 1 else H)
        rows.append({"case": name, "impl": f"torch {'tf32' if tf32 else 'fp32'}", "ms": t,
                     "all_ms": ts, "TBps_one_pass": floor_bytes / (t * 1e-3) / 1e12,
                     "TFLOPs": flops / (t * 1e-3) / 1e12, "err_problem0": err})
        print(rows[-1]["case"], rows[-1]["impl"], f"{t:.3f} ms", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    del X, W, H, W0, H0
    torch.cuda.empty_cache()
    return rows


# the switches each variant sets (cuda/NOTES.md); every other one is unset
VARIANT_ENV = {
    "general": {"DFFKIT_CUDA_SMALL": "0"},
    "rows": {"DFFKIT_CUDA_SMALL_COLS": "0"},
    "tc": {"DFFKIT_CUDA_SMALL_TC": "1"},
    "tc 1/SM": {"DFFKIT_CUDA_SMALL_TC": "1", "DFFKIT_CUDA_SMALL_ONE_PER_SM": "1"},
    "regs 1/SM": {"DFFKIT_CUDA_SMALL_REGS": "1"},
    "regs 2/SM": {"DFFKIT_CUDA_SMALL_REGS": "2"},
    "cols": {"DFFKIT_CUDA_SMALL_COLS": "1"},
    "cols C=4": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_C": "4"},
    "cols C=16": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_C": "16"},
    "cols gather": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_GATHER": "1"},
    "cols gather C=16": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_GATHER": "1",
                         "DFFKIT_CUDA_SMALL_COLS_C": "16"},
    "cols vec": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_VEC": "1"},
    "cols vec C=16": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_VEC": "1",
                      "DFFKIT_CUDA_SMALL_COLS_C": "16"},
    "cols push": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_PUSH": "1"},
    "cols push C=16": {"DFFKIT_CUDA_SMALL_COLS": "1", "DFFKIT_CUDA_SMALL_COLS_PUSH": "1",
                       "DFFKIT_CUDA_SMALL_COLS_C": "16"},
    "gemm simt": {"DFFKIT_CUDA_GEMM_SIMT": "1"},
    "gemm split": {"DFFKIT_CUDA_GEMM_SIMT": "0"},
    "gemm 1-pass": {"DFFKIT_CUDA_GEMM_FUSED": "1", "DFFKIT_CUDA_GEMM_SIMT": "0"},  # (float32: split tf32)
    "gemm 2-pass": {"DFFKIT_CUDA_GEMM_FUSED": "0"},
}


def set_variant_env(variant):
    for key in {key for env in VARIANT_ENV.values() for key in env}:
        os.environ.pop(key, None)
    os.environ.update(VARIANT_ENV.get(variant, {}))


def main():
    t0 = time.time()
    info = cuda.device_info(0)
    ceil = ceilings()
    print("device", info, "ceilings", ceil, flush=True)
    rows = []
    if not LARGE:
        rows += case("one image 196x512 k=5 200 it", 1, 196, 512, 5, 200, 20, all_precisions, 5)
        rows += case("batch 4096x196x512 k=5 100 it", 4096, 196, 512, 5, 100, 3, all_precisions)
    rows += case("tall 200000x512 k=20 100 it", 1, 200000, 512, 20, 100, 3, all_precisions)
    if not QUICK:
        rows += case("square 16384^2 k=64 50 it", 1, 16384, 16384, 64, 50, 1, ("fp32", "tf32"),
                     2, dffkit_iters=5)
    res = {"device": info, "ceilings": ceil, "rows": rows, "wall_s": time.time() - t0}
    with open(os.path.join(OUT, "cuda_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{'case':34s} {'impl':22s} {'kernel':13s} {'ms':>10s} {'TB/s':>7s} {'TFLOP/s':>8s} "
          f"{'err':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:34s} {r['impl']:22s} ERROR {r['error']}")
            continue
        ext = "*" if r.get("extrapolated_from_iters") else " "
        print(f"{r['case']:34s} {r['impl']:22s} {r.get('kernel', ''):13s} {r['ms']:9.3f}{ext} "
              f"{r['TBps_one_pass']:7.2f} "
              f"{r['TFLOPs']:8.2f} {r['err_problem0']:10.4g}")
    print(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, SGEMM {ceil['sgemm_TFLOPs']:.1f} "
          f"TFLOP/s, TF32 {ceil['tf32_TFLOPs']:.1f} TFLOP/s; * = timed at 5 and 10 iterations, "
          "extended along that line")


if __name__ == "__main__":
    main()
