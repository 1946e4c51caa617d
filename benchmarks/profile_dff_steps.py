"""Each step of one image's DFF on the GPU timed alone (issue 7: one image in under 3 ms end to
end), to say where the time between the NMF kernel and the whole call goes.

Activations (1, 512, 14, 14) made on the device with PyTorch, the steps run on the array library
dff itself picks (CuPy first). Each step is run --reps times, the device synchronised after each
run; the table gives the median and the 90th percentile in microseconds. The Python-only steps
(reading an array's pointer, shape and stream) are timed without synchronising, over many runs.

    python3 benchmarks/profile_dff_steps.py [--reps 300] [-k 5]
"""
import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import dffkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "python"))

import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("-k", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    from PIL import Image

    import dffkit
    from dffkit import _backends, _cuda_backend
    from dffkit import deep_feature_factorization as dff_module
    from dffkit.images import load_images

    ops = dff_module._first_array_library()
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(1, 512, 14, 14, device="cuda"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    k, reps = args.k, args.reps
    sync = ops.synchronize
    rows = []

    def timed(name, fn, n=reps, synced=True):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            if synced:
                sync()
            ts.append(time.perf_counter() - t0)
        ts = 1e6 * np.asarray(ts)
        rows.append((name, float(np.median(ts)), float(np.percentile(ts, 90))))
        print(f"{name:58s} {rows[-1][1]:9.1f} {rows[-1][2]:9.1f}", flush=True)

    # the machine is shared: its load says how far these numbers can be compared with another run's
    print(f"load average at start {os.getloadavg()}")
    print(f"array library {ops.name}; {'step':49s} p50 us    p90 us")
    timed("sync alone (nothing queued)", lambda: None)
    a = ops.asarray(acts)
    timed("ops.asarray(torch activations)", lambda: ops.asarray(acts))
    stacked = ops.asarray(a[0][None])
    timed("ops.matrix (N, C, h, w) -> (N h w, C)", lambda: ops.matrix(stacked))
    X = ops.matrix(stacked)
    timed("value_stats (min, finite, sum of squares; one copy back)", lambda: _cuda_backend.value_stats(X))
    timed("random_init (W, H on the device)", lambda: _cuda_backend.random_init(X, k, 0))
    cuda = _backends.cuda()
    params = cuda.Params()
    params.max_iter, params.tol = 200, 1e-4
    params.beta = 2

    def init_and_fit():
        W0, H0 = _cuda_backend.random_init(X, k, 0)
        return _cuda_backend.fit(X, W0, H0, params, factors_are_ours=True)
    timed("random_init + fit (200 it, tol 1e-4)", init_and_fit)
    W, H, info = init_and_fit()
    print(f"  (fit: {info['n_iter']} iterations, kernel {info.get('kernel')})")
    timed("non_negative_factorization (the same, whole call)",
          lambda: dffkit.non_negative_factorization(X, n_components=k, init="random", random_state=0,
                                                    max_iter=200, tol=1e-4, backend="cuda"))
    timed("ops.norm(X)", lambda: ops.norm(X))
    timed("W to the host (196 x k)", lambda: dff_module._host(W))
    timed("_maps (peaks, heat, labels; 224 x 224)",
          lambda: dff_module._maps(ops, [W], [(14, 14)], [(224, 224)], "joint", 0.2, "argmax"))
    timed("H to the host (k x 512)", lambda: dff_module._host(H))
    # the heat maps' copy down (k x 224 x 224 float32, 1 MB): into pageable memory (what _host
    # does), into pinned memory, and into pinned memory then a host copy to pageable memory
    heat = ops.empty((1, k, 224, 224), np.float32)
    timed("heat maps to the host, pageable (1 MB)", lambda: dff_module._host(heat))
    if ops.name == "cupy":
        import cupyx

        pinned = cupyx.empty_pinned(heat.shape, np.float32)
        timed("heat maps to the host, pinned", lambda: heat.get(out=pinned))
        timed("heat maps to the host, pinned, then a host copy", lambda: heat.get(out=pinned).copy())
        timed("pinned allocation of 1 MB (CuPy's pool)", lambda: cupyx.empty_pinned(heat.shape, np.float32))
    kernels = ops.map_kernels()
    if kernels is not None:
        taps = (dff_module._device_taps(ops, 224, 14), dff_module._device_taps(ops, 224, 14))
        nb = dff_module._peak_blocks(224 * 224)
        parts = ops.empty((1, k, nb), np.float32)
        fused = dff_module._host_resample_fuses()
        timed("peaks kernel (dff_maps, parts)",
              lambda: kernels.dff_maps([W], *taps, h=14, w=14, parts=parts, fused=fused))
        params = ops.asarray(np.ones((1, 2 * k), np.float32))
        labels = ops.empty((1, 224, 224), np.int16)
        timed("heat + labels kernel (dff_maps)",
              lambda: kernels.dff_maps([W], *taps, h=14, w=14, params=params, threshold=0.2, heat=heat,
                                       labels=labels, fused=fused))
        timed("an upload of (1, 2k) float32 (the maps' params)",
              lambda: ops.asarray(np.ones((1, 2 * k), np.float32)))
    timed("dff (whole call, activations given)",
          lambda: dffkit.dff([image], k, activations=acts, backend="cuda", keep_images=False, name_concepts=False))
    many = 20 * reps
    timed("python: _cuda_backend._view(X)", lambda: _cuda_backend._view(X), n=many, synced=False)
    timed("python: _cuda_backend._stream_of(X)", lambda: _cuda_backend._stream_of(X), n=many, synced=False)
    timed("python: _cuda_backend.is_device_array(X)", lambda: _cuda_backend.is_device_array(X), n=many,
          synced=False)
    timed("python: _raw_device_array(X)",
          lambda: _cuda_backend._raw_device_array(X, "X", np.float32), n=many, synced=False)
    # the binding's own costs: a call that does nothing on the device, the pointer query every
    # launcher makes of each array it is given (cudaPointerGetAttributes), a launch of the peaks
    # kernel by the binding alone (pointers ready, no wait)
    raw = _cuda_backend._cuda()
    timed("binding: _cuda.current_device()", raw.current_device, n=many, synced=False)
    ptr = _cuda_backend._raw_device_array(X, "X", np.float32)
    timed("binding: _cuda.pointer_device(ptr) (cudaPointerGetAttributes)", lambda: raw.pointer_device(ptr),
          n=many, synced=False)
    if kernels is not None:
        wp, typ, txp, pp = (_cuda_backend._raw_device_array(a, "a", dt) for a, dt in
                            ((W, np.float32), (taps[0], np.int32), (taps[1], np.int32), (parts, np.float32)))
        stream = _cuda_backend._stream_of(W)
        timed("binding: _cuda.dff_map_peaks (4 pointers, a launch, no wait)",
              lambda: raw.dff_map_peaks([wp], k, 14, 14, 224, 224, typ, txp, nb, pp, fused, stream), n=reps,
              synced=False)
    timed("python: _image_items + load_images (one PIL image)",
          lambda: load_images(dff_module._image_items([image])), n=reps, synced=False)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
