"""Where one image's DFF call spends its time on the GPU, function by function, without a
profiler's overhead: the functions named below are wrapped in timers that add up their
inclusive wall time (waits included: a function that waits for the device is charged with the
device's work queued before it), the call is run --reps times (the device synchronised after
each), and the table gives each function's mean microseconds per dff call, its calls per dff
call, and what the wrapped functions leave unexplained (Python between them).

Activations (1, 512, 14, 14) made on the device with PyTorch (as profile_dff_steps.py); dff runs
on the array library it picks itself (CuPy first). With CuPy, the map kernels are also timed by
CUDA events (cupyx.profiler.benchmark): device time against the host's time for the same call.

    python3 benchmarks/profile_dff_breakdown.py [--reps 200] [-k 5]
"""
import argparse
import os
import time
from collections import defaultdict

import _common  # noqa: F401  (dffkit from an install or this checkout)
import numpy as np


class Timers:
    """Inclusive wall time and calls of wrapped functions, while ``on``."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.on = False

    def wrap(self, owner, attr, label=None):
        fn = getattr(owner, attr)
        label = label or f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
        timers = self

        def timed(*args, **kwargs):
            if not timers.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.total[label] += time.perf_counter() - t0
                timers.calls[label] += 1

        setattr(owner, attr, timed)
        return fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    import dffkit
    from dffkit import _cuda_backend, nmf
    from dffkit import images as images_module
    from dffkit import deep_feature_factorization as dff_module

    ops = dff_module._first_array_library()
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(1, 512, 14, 14, device="cuda"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    k = args.k

    def one():
        return dffkit.dff([image], k, activations=acts, backend="cuda", keep_images=False, name_concepts=False)

    def times(warmup):
        """Seconds of each of --reps calls (the device synchronised after each), after warmup calls."""
        for _ in range(warmup):
            one()
        ops.synchronize()
        out = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            one()
            ops.synchronize()
            out.append(time.perf_counter() - t0)
        return out

    plain = times(5)

    timers = Timers()
    cuda = _cuda_backend._cuda()
    ops_type = type(ops)
    # what dff calls, outermost first (inclusive times: the rows overlap); dff imports
    # load_images and non_negative_factorization when called: wrapped where they live
    for owner, attr in [(dff_module, "_image_items"), (images_module, "load_images"),
                        (dff_module, "_checked_range"), (dff_module, "_nonnegative"),
                        (nmf, "non_negative_factorization"), (nmf, "_solve"),
                        (_cuda_backend, "random_init"), (_cuda_backend, "fit"), (_cuda_backend, "value_stats"),
                        (dff_module, "_maps"), (dff_module, "_maps_by_kernels"), (dff_module, "_maps_in_one_trip"),
                        (dff_module, "_download"),
                        (dff_module, "_device_taps"), (dff_module, "_strength_divisors"),
                        (_cuda_backend, "dff_maps"), (_cuda_backend, "copy_to_host"),
                        (_cuda_backend, "_raw_device_array"), (_cuda_backend, "_view"),
                        (_cuda_backend, "_stream_of"), (dff_module, "_host"), (dff_module, "DFFResult")]:
        if hasattr(owner, attr):
            timers.wrap(owner, attr)
    for attr in ["asarray", "matrix", "empty", "pinned_empty", "stack", "norm"]:
        if hasattr(ops_type, attr):
            timers.wrap(ops_type, attr, f"ops.{attr}")
    for attr in ["fit", "random_init", "value_stats", "dff_map_peaks", "dff_map_params", "dff_heat_labels",
                 "memcpy", "synchronize"]:
        if hasattr(cuda, attr):
            try:
                timers.wrap(cuda, attr, f"_cuda.{attr}")
            except (AttributeError, TypeError):  # a module's attributes may be read-only
                pass
    for _ in range(3):  # the wrapped functions warmed up before the timers count
        one()
    timers.on = True
    wrapped = times(0)
    timers.on = False

    print(f"load average {os.getloadavg()}; array library {ops.name}; {args.reps} calls of dff (one image, "
          f"k = {k}, activations given)")
    print(f"dff whole call: p50 {1e6 * np.median(plain):.1f} us unwrapped, {1e6 * np.median(wrapped):.1f} us "
          f"with the timers (mean {1e6 * np.mean(wrapped):.1f})")
    print(f"{'function (inclusive)':44s} {'us/call of dff':>15s} {'calls':>7s}")
    for label, tot in sorted(timers.total.items(), key=lambda kv: -kv[1]):
        print(f"{label:44s} {1e6 * tot / args.reps:15.1f} {timers.calls[label] / args.reps:7.1f}")

    if ops.name == "cupy":
        import cupyx.profiler

        W = ops.asarray(np.random.default_rng(0).random((196, k), dtype=np.float32))
        kernels = ops.map_kernels()
        taps = (dff_module._device_taps(ops, 224, 14), dff_module._device_taps(ops, 224, 14))
        nb = dff_module._peak_blocks(224 * 224)
        parts = ops.empty((1, k, nb), np.float32)
        fused = dff_module._host_resample_fuses()
        params = ops.asarray(np.ones((1, 2 * k), np.float32))
        heat, labels = ops.empty((1, k, 224, 224), np.float32), ops.empty((1, 224, 224), np.int16)
        cases = [("peaks kernel call", lambda: kernels.dff_maps([W], *taps, h=14, w=14, parts=parts, fused=fused)),
                 ("heat + labels kernel call",
                  lambda: kernels.dff_maps([W], *taps, h=14, w=14, params=params, threshold=0.2, heat=heat,
                                           labels=labels, fused=fused)),
                 ("_maps (one image, 224 x 224)",
                  lambda: dff_module._maps(ops, [W], [(14, 14)], [(224, 224)], "joint", 0.2, "argmax"))]
        print(f"{'CUDA events (cupyx.profiler.benchmark)':44s} {'host us':>9s} {'device us':>10s}")
        for name, fn in cases:
            r = cupyx.profiler.benchmark(fn, n_repeat=args.reps, n_warmup=5)
            print(f"{name:44s} {1e6 * np.median(r.cpu_times):9.1f} {1e6 * np.median(r.gpu_times[0]):10.1f}")


if __name__ == "__main__":
    main()
