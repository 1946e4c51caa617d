"""Where one image's DFF time goes on the GPU once the activations are there (issue 7: one
image's concepts in under 3 ms end to end). No onnxruntime: the activations (1, 512, 14, 14)
are made on the device (PyTorch) and passed with ``activations=``, so what is timed is the
factorization and the heat maps, as ``dff`` runs them on the device path.

    python3 benchmarks/profile_dff_device.py [--runs 200] [--profile 50]

Prints the p50 / p99 of the whole call and of ``result.timings``' parts, then cProfile's top
functions over --profile calls (cumulative and own time), with every CUDA call synchronised by
the profiler's clock only where the code itself waits.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import dffkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "python"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--profile", type=int, default=50)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--max-iter", type=int, default=200)
    args = p.parse_args(argv)

    import torch

    import dffkit

    torch.manual_seed(0)
    acts = torch.relu(torch.randn(1, 512, 14, 14, device="cuda"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))

    def one():
        return dffkit.dff([image], args.k, activations=acts, backend="cuda", max_iter=args.max_iter,
                          keep_images=False, name_concepts=False)

    for _ in range(5):
        r = one()
    torch.cuda.synchronize()
    print(f"backend {r.backend}, device path {r.device_path}, n_iter {r.n_iter}; load average {os.getloadavg()}",
          flush=True)
    total, parts = [], {}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        r = one()
        total.append(time.perf_counter() - t0)
        for key, v in r.timings.items():
            parts.setdefault(key, []).append(v)
    def line(name, xs):
        xs = 1e3 * np.asarray(xs)
        return f"{name:10s} p50 {np.median(xs):7.3f} ms  p99 {np.percentile(xs, 99):7.3f} ms"
    print(line("total", total))
    for key, xs in parts.items():
        print(line(key, xs))

    # the NMF alone on the same matrix (what the factorize part adds around the kernel)
    X = acts[0].reshape(512, 196).T.contiguous()
    nmf_t = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        W, H, n_iter = dffkit.non_negative_factorization(X, n_components=args.k, init="random", random_state=0,
                                                         max_iter=args.max_iter, tol=1e-4, backend="cuda")
        torch.cuda.synchronize()
        nmf_t.append(time.perf_counter() - t0)
    print(line("nmf alone", nmf_t), f"({n_iter} iterations)")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.profile):
        one()
    prof.disable()
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(30)
        print(f"--- cProfile, {args.profile} calls, by {key}")
        print("\n".join(s.getvalue().splitlines()[:48]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
