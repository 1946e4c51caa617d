"""The NMF of joint DFF over a batch (issue 7: DFF's joint throughput at 0.9 of the extractor's)
in each precision mode of the CUDA engine: X = the conv5_3 activations of --images images stacked
((images * 196) x 512, float32, made on the device), k = 5, --iters iterations with tol 0 (every
iteration run), init 'random'. Prints ms per fit (median of --reps), the kernel, microseconds per
iteration, and the bandwidth that one and two passes over X per iteration would need at that
speed, next to a copy's measured in the same run. Beyond each mode's default engine, the rows
"sweep" (DFFKIT_CUDA_GEMM=0: the one-pass row-tile sweep on CUDA cores, untimed at this shape)
and "1-pass" (the gemm engine's single pass with float32 accuracy by split tf32: DFFKIT_CUDA_GEMM_FUSED=1,
DFFKIT_CUDA_GEMM_SIMT=0).

    python3 benchmarks/profile_dff_joint_nmf.py [--images 256] [--iters 200] [--reps 5]
"""
import argparse
import os
import time

import _common  # noqa: F401  (dffkit from an install or this checkout)
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    import dffkit

    torch.manual_seed(0)
    m, n = args.images * 196, 512
    X = torch.relu(torch.randn(m, n, device="cuda"))
    nbytes = X.numel() * 4
    a, b = torch.empty(1 << 28, device="cuda"), torch.empty(1 << 28, device="cuda")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    copy_tbps = 10 * 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e12
    del a, b
    print(f"X {m} x {n} float32 ({nbytes / 1e6:.0f} MB), k = {args.k}, {args.iters} iterations, tol 0; "
          f"copy {copy_tbps:.2f} TB/s")
    switches = ("DFFKIT_CUDA_GEMM", "DFFKIT_CUDA_GEMM_FUSED", "DFFKIT_CUDA_GEMM_SIMT")
    rows = [("fp32", "fp32", {}), ("tf32", "tf32", {}), ("bf16x", "bf16x", {}),
            ("fp32 sweep", "fp32", {"DFFKIT_CUDA_GEMM": "0"}),
            ("bf16x sweep", "bf16x", {"DFFKIT_CUDA_GEMM": "0"}),
            ("fp32 1-pass", "fp32", {"DFFKIT_CUDA_GEMM_FUSED": "1", "DFFKIT_CUDA_GEMM_SIMT": "0"})]
    for label, precision, env in rows:
        for key in switches:
            os.environ.pop(key, None)
        os.environ.update(env)
        ts, info = [], None
        for r in range(args.reps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, _, _, info = dffkit.non_negative_factorization(
                X, n_components=args.k, init="random", random_state=0, max_iter=args.iters, tol=0.0,
                backend="cuda", precision=precision, return_info=True)
            torch.cuda.synchronize()
            if r:
                ts.append(time.perf_counter() - t0)
        t = float(np.median(ts))
        per_it = t / max(1, info.n_iter)
        xb = nbytes // 2 if precision == "bf16x" else nbytes
        print(f"{label:12s} {1e3 * t:8.2f} ms  kernel {info.kernel:18s} {1e6 * per_it:7.1f} us/it  "
              f"one pass {xb / per_it / 1e12:5.2f} TB/s, two {2 * xb / per_it / 1e12:5.2f} TB/s  "
              f"(error {info.error:.6g})", flush=True)


if __name__ == "__main__":
    main()
