"""Benchmark: CNN activations through onnxruntime (dffkit.features, issue 6).

Measures VGG-16 to conv5_3 (after ReLU; random He weights, which run exactly as fast as
trained ones) at 224 x 224:

- images/s at each batch size, and single-image latency p50 / p99 at batch 1;
- on the CPU provider: fp32, batch 1 and a small batch; also the built-in filter bank and
  the Pillow side (decode + resize + normalise per image);
- on the CUDA provider: fp32 and fp16 (``dffkit.models.to_float16``), batch 1 and 64, with
  the activations copied back to the host and left on the device (I/O binding,
  ``device_output=True``).

The input is prepared once and fed again and again (``FeatureExtractor.run``), so the model
is what is timed, in two forms: resized uint8 images (N, 224, 224, 3), normalised inside the
model (what ``extractor(images)`` sends), and normalised float32 tensors (N, 3, 224, 224).
On CUDA the host-to-device copy of the input is included: the uint8 form sends a quarter of
the bytes. ``--all-variants`` adds NCHW convolutions and fp32 without TF32.

Self-contained: ``python3 benchmarks/bench_features.py --device cuda --out DIR`` needs only
numpy, onnx, onnxruntime(-gpu) and Pillow; it imports dffkit from ../python when it is not
installed. Writes DIR/features_<device>.json and DIR/features_<device>.md.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:  # an installed dffkit (with its compiled modules) first; else this checkout's source
    import dffkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "python"))

import numpy as np  # noqa: E402


def machine(device):
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device == "cuda":
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
            info["gpu"] = q
        except (OSError, subprocess.SubprocessError):
            info["gpu"] = "unknown (no nvidia-smi)"
    import onnx
    import onnxruntime
    import PIL

    info.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, pillow=PIL.__version__, numpy=np.__version__)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def timed_runs(fn, warmup, repeats, budget_s):
    """Call fn() warmup times, then up to repeats times within budget_s; wall seconds per
    call, and the process's CPU seconds per call (all threads: robust to other load)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return np.array(times), np.array(cpu)


def summarise(name, batch, measured, **extra):
    times, cpu = measured
    row = {
        "config": name,
        "batch": batch,
        "runs": int(len(times)),
        "images_per_s": float(batch / np.median(times)),
        "ms_per_batch_p50": float(1e3 * np.median(times)),
        "ms_per_batch_p99": float(1e3 * np.percentile(times, 99)),
        "ms_per_batch_min": float(1e3 * times.min()),
        "cpu_ms_per_image": float(1e3 * np.median(cpu) / batch),
    }
    row.update(extra)
    print(
        f"  {name:44s} batch {batch:3d}: {row['images_per_s']:9.1f} img/s  "
        f"p50 {row['ms_per_batch_p50']:9.3f} ms  p99 {row['ms_per_batch_p99']:9.3f} ms  "
        f"cpu {row['cpu_ms_per_image']:8.2f} ms/img  ({row['runs']} runs)",
        flush=True,
    )
    return row


def bench_extractor(fx, name, batches, warmup, repeats, budget_s, device_output_too, size=224, inputs=("uint8", "float32")):
    """Each batch size, each input kind: resized uint8 images (N, H, W, 3), normalised in the
    model (what ``fx(images)`` sends), and normalised float32 tensors (N, 3, H, W)."""
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        fed = {
            "uint8": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
            "float32": rng.standard_normal((b, 3, size, size)).astype(np.float32),
        }
        fx.batch_size = b
        runs = repeats if b == 1 else max(3, repeats // 4)
        for kind in inputs:
            x = fed[kind]
            label = "uint8 images in" if kind == "uint8" else "float32 tensors in"
            times = timed_runs(lambda: fx.run(x), warmup, runs, budget_s)
            rows.append(summarise(f"{name}, {label}, activations to host", b, times, provider=fx.provider, input=kind))
            if device_output_too:
                times = timed_runs(lambda: fx.run(x, device_output=True), warmup, runs, budget_s)
                rows.append(summarise(f"{name}, {label}, activations on device", b, times, provider=fx.provider, input=kind))
    return rows


def bench_preprocess(repeats):
    """The host's part: read + resize (what ``extractor(images)`` sends, uint8), and with the
    normalisation to float32 as well (what a float32 input needs); one image thread and the
    default."""
    from dffkit.images import default_workers, load_images, normalize, resize_batch

    paths = [str(p) for p in sorted((HERE.parent / "python" / "dffkit" / "data" / "sample_images").glob("*.jpg"))]
    if not paths:
        return []
    rows = []
    for workers in sorted({1, default_workers()}):
        def uint8():
            return resize_batch(load_images(paths, workers=workers), 224)

        times = timed_runs(uint8, 1, repeats, 20.0)
        rows.append(summarise(f"Pillow: read + resize ({len(paths)} JPEGs, {workers} threads)", len(paths), times))
        times = timed_runs(lambda: normalize(uint8()), 1, repeats, 20.0)
        rows.append(summarise(f"Pillow: read + resize + normalise to float32 ({len(paths)} JPEGs, {workers} threads)",
                              len(paths), times))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", required=True, help="folder for features_<device>.json and .md")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default cpu 1,4; cuda 1,64)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs at batch 1 (default cpu 30, cuda 300)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per configuration at most")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (CPU)")
    p.add_argument("--spinning", action="store_true", help="CPU: also time with onnxruntime's spinning threads on")
    p.add_argument("--cache-dir", default=None, help="where the random VGG-16 is built and cached")
    p.add_argument("--all-variants", action="store_true",
                   help="CUDA: also NCHW convolutions and fp32 without TF32 (default: dffkit's settings only)")
    args = p.parse_args(argv)

    from dffkit import features, models

    cuda = args.device == "cuda"
    batches = [int(b) for b in (args.batches or ("1,64" if cuda else "1,4")).split(",")]
    repeats = args.repeats or (300 if cuda else 30)
    budget = args.budget or (20.0 if cuda else 12.0)
    warmup = 10 if cuda else 2
    info = machine(args.device)
    print(f"machine: {json.dumps(info)}", flush=True)

    warnings.simplefilter("ignore", models.UntrainedWeightsWarning)  # random weights time like trained ones
    t0 = time.perf_counter()
    vgg = models.vgg16(cache_dir=args.cache_dir)
    info["vgg16_build_or_load_s"] = round(time.perf_counter() - t0, 2)

    rows = []
    providers = "cuda" if cuda else "cpu"
    precisions = ("fp32", "fp16") if cuda else ("fp32",)
    for precision in precisions:
        model = vgg if precision == "fp32" else models.to_float16(vgg)
        # CUDA: NCHW and NHWC convolutions (dffkit's default is NHWC), and fp32 without TF32
        variants = [("", None)]
        if cuda and args.all_variants:
            variants = [(", NCHW", {"prefer_nhwc": 0}), (", prefer_nhwc", {"prefer_nhwc": 1})]
            if precision == "fp32":
                variants.append((", prefer_nhwc, use_tf32=0", {"prefer_nhwc": 1, "use_tf32": 0}))
        for suffix, opts in variants:
            try:
                fx = features.FeatureExtractor(model, providers=providers, num_threads=args.threads,
                                               batch_size=max(batches), provider_options=opts)
            except Exception as e:  # an onnxruntime without the option
                print(f"  {suffix or 'default'} not available: {e}", flush=True)
                continue
            assert fx.layer == "relu5_3"
            name = f"VGG-16 conv5_3 {precision} ({fx.provider.replace('ExecutionProvider', '')}){suffix}"
            rows += bench_extractor(fx, name, batches, warmup, repeats, budget, device_output_too=cuda)
            del fx  # one session on the GPU at a time
    if not cuda and args.spinning:
        fx = features.FeatureExtractor(vgg, providers="cpu", num_threads=args.threads, batch_size=max(batches),
                                       session_config={"session.intra_op.allow_spinning": "1"})
        rows += bench_extractor(fx, "VGG-16 conv5_3 fp32 (CPU), spinning threads", batches, warmup, repeats, budget, False)
        del fx
    fb = features.FeatureExtractor("filterbank", providers=providers, num_threads=args.threads, batch_size=max(batches))
    rows += bench_extractor(fb, f"filter bank fp32 ({fb.provider.replace('ExecutionProvider', '')})", batches, warmup, repeats, budget, cuda)
    rows += bench_preprocess(10)
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"features_{args.device}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    flags = " ".join(a for i, a in enumerate(sys.argv[1:]) if a != "--out" and (i == 0 or sys.argv[i] != "--out"))
    lines = [
        f"# CNN activations through onnxruntime: {args.device.upper()}",
        "",
        f"VGG-16 to conv5_3 (after ReLU, random He weights), 224 x 224 input; "
        f"`python3 benchmarks/bench_features.py {flags} --out DIR`.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("date",)) + f"; {info['date']}.",
        "",
        "| configuration | batch | images/s | ms per batch p50 | p99 | CPU ms per image | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['images_per_s']:.1f} | {r['ms_per_batch_p50']:.3f} | "
            f"{r['ms_per_batch_p99']:.3f} | {r['cpu_ms_per_image']:.2f} | {r['runs']} |"
        )
    lines.append("")
    lines.append("At batch 1 the p50 and p99 columns are the single-image latency. CPU ms per image is the "
                 "process's CPU time (all threads) per image: it does not grow when other processes take "
                 "the cores, so it tells the work apart from the waiting on a loaded machine.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
