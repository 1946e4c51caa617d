"""End-to-end Deep Feature Factorization speed: extractor + NMF + heat maps (issue 7).

For each model it measures, in one process on one machine:

- the extractor alone: images/s over a batch of N images, and one image's latency;
- DFF joint (all N images factorized together) and DFF per image (batched solver): images/s,
  with the split into extract / factorize / maps;
- one image's concepts end to end (k concepts, image_size x image_size): latency p50 / p99.

Images are synthetic uint8 arrays already at the network's size (decoding JPEGs is not
measured); concept naming is off. ``throughput_vs_extractor`` is DFF's images/s over the
extractor's own: the factorization must not be the bottleneck (target on the H200: >= 0.9,
and one image in under 3 ms).

    python benchmarks/bench_dff.py                       # CPU, filter bank and VGG-16
    python benchmarks/bench_dff.py --device cuda         # GPU: CUDA provider + CUDA NMF

Writes benchmarks/results/dff_<device>.json and .md (``--out`` to change the stem).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:  # an installed dffkit (with its compiled modules) first; else this checkout's source
    import dffkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "python"))

import dffkit  # noqa: E402
from dffkit.deep_feature_factorization import dff  # noqa: E402
from dffkit.features import FeatureExtractor  # noqa: E402
from dffkit.nmf import _PRECISIONS  # noqa: E402


def machine() -> dict:
    try:
        from dffkit._bench_report import describe_machine

        return describe_machine()
    except Exception as exc:  # noqa: BLE001 - describe what we can
        import platform

        return {"platform": platform.platform(), "cores": os.cpu_count(), "note": f"describe_machine failed: {exc}"}


def images(n: int, size: int, seed: int = 0) -> list:
    """Textured synthetic images (a striped ellipse on noise), uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        bg = np.array([60, 140, 60]) + rng.normal(0, 25, (size, size, 3))
        stripe = (np.sin(2 * np.pi * (x + y) / 11.3 + i) > 0)[..., None]
        obj = np.where(stripe, np.array([220, 60, 40]), np.array([250, 200, 60]))
        cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [size // 4]
        mask = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r)[..., None]
        out.append(np.clip(np.where(mask, obj, bg), 0, 255).astype(np.uint8))
    return out


def percentiles(times) -> dict:
    t = np.asarray(times) * 1e3
    return {"p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
            "min_ms": round(float(t.min()), 3), "n": len(t)}


def timed(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def bench_model(model: str, args) -> dict:
    providers = "cuda" if args.device == "cuda" else "cpu"
    backend = "cuda" if args.device == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext = FeatureExtractor(model, providers=providers, image_size=args.image_size, batch_size=args.batch_size)
    batch = images(args.n_images, args.image_size)
    one = batch[:1]
    opts = dict(extractor=ext, backend=backend, max_iter=args.max_iter, tol=args.tol, random_state=0,
                name_concepts=False, negatives="clip", precision=args.precision)

    # the extractor's own speed: on a GPU with its output left in device memory, as DFF uses it
    device_output = args.device == "cuda"
    ext_times, acts = timed(lambda: ext(batch, device_output=device_output), args.repeats_batch)
    ext_one, _ = timed(lambda: ext(one, device_output=device_output), args.repeats_one, warmup=3)
    row = {
        "model": ext.model_name,
        "untrained": bool(ext.untrained),
        "layer": ext.layer,
        "provider": ext.provider,
        "activations": list(acts.shape),
        "extractor_device_output": device_output,
        "n_images": args.n_images,
        "k": args.k,
        "extractor_images_per_s": round(args.n_images / min(ext_times), 2),
        "extractor_one_image": percentiles(ext_one),
    }
    for mode in ("joint", "per_image"):
        times, result = timed(lambda: dff(batch, args.k, mode=mode, **opts), args.repeats_batch)
        row[f"dff_{mode}_images_per_s"] = round(args.n_images / min(times), 2)
        row[f"dff_{mode}_split_s"] = {k: round(v, 4) for k, v in result.timings.items()}
        row[f"dff_{mode}_n_iter"] = result.n_iter if mode == "joint" else int(np.median(result.n_iter))
        row[f"dff_{mode}_backend"] = result.backend
        row[f"dff_{mode}_device_path"] = bool(result.device_path)
        row[f"dff_{mode}_vs_extractor"] = round(row[f"dff_{mode}_images_per_s"] / row["extractor_images_per_s"], 3)
        times, result = timed(lambda: dff(one, args.k, mode=mode, **opts), args.repeats_one, warmup=3)
        row[f"dff_{mode}_one_image"] = percentiles(times)
        row[f"dff_{mode}_one_image_split_s"] = {k: round(v, 5) for k, v in result.timings.items()}
    if args.device == "cuda":  # per image without the pipeline (dff_module.PIPELINE), for the ratio it buys
        from dffkit import deep_feature_factorization as dff_module

        before = dff_module.PIPELINE
        dff_module.PIPELINE = False
        try:
            times, result = timed(lambda: dff(batch, args.k, mode="per_image", **opts), args.repeats_batch)
        finally:
            dff_module.PIPELINE = before
        row["dff_per_image_unpipelined_images_per_s"] = round(args.n_images / min(times), 2)
        row["dff_per_image_unpipelined_split_s"] = {k: round(v, 4) for k, v in result.timings.items()}
    if args.device == "cuda":  # one image with each GPU array library the maps can run on
        import importlib.util

        before = os.environ.get("DFFKIT_DEVICE_ARRAYS")
        try:
            for lib in ("cupy", "torch"):
                if importlib.util.find_spec(lib) is None:
                    continue
                os.environ["DFFKIT_DEVICE_ARRAYS"] = lib
                times, result = timed(lambda: dff(one, args.k, **opts), args.repeats_one, warmup=3)
                row[f"dff_joint_one_image_{lib}"] = dict(percentiles(times), device_path=bool(result.device_path),
                                                         split_ms={k: round(1e3 * v, 3) for k, v in result.timings.items()})
        finally:
            if before is None:
                os.environ.pop("DFFKIT_DEVICE_ARRAYS", None)
            else:
                os.environ["DFFKIT_DEVICE_ARRAYS"] = before
    return row


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# DFF end to end ({report['device']})",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB; GPUs: {m.get('gpus') or 'none'}; load average at start "
        f"{m.get('load_average')}, at the end {report.get('load_average_end')} (the machine is shared: "
        f"a load above the core count slows every number here). Settings: {m.get('environment') or 'defaults'}, "
        f"dffkit CPU threads {m.get('dffkit_cpu_threads')}. {report['date']}.",
        f"Images {report['image_size']} x {report['image_size']} (synthetic, in memory), batch of "
        f"{report['n_images']}, k = {report['k']}, max_iter {report['max_iter']}, tol {report['tol']}, "
        f"NMF precision {report.get('precision', 'fp32')}; "
        "concept naming off. Throughput: best of the repeats; latency: p50 / p99 over the repeats.",
        "",
        "| model | layer | provider | extractor img/s | DFF joint img/s | DFF per-image img/s | joint / extractor "
        "| extractor 1 img p50 | DFF 1 img p50 / p99 (joint) | DFF 1 img p50 / p99 (per image) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        name = r["model"] + (" (untrained)" if r["untrained"] else "")
        lines.append(
            f"| {name} | {r['layer']} {tuple(r['activations'][1:])} | {r['provider']} | {r['extractor_images_per_s']} "
            f"| {r['dff_joint_images_per_s']} | {r['dff_per_image_images_per_s']} | {r['dff_joint_vs_extractor']} "
            f"| {r['extractor_one_image']['p50_ms']} ms "
            f"| {r['dff_joint_one_image']['p50_ms']} / {r['dff_joint_one_image']['p99_ms']} ms "
            f"| {r['dff_per_image_one_image']['p50_ms']} / {r['dff_per_image_one_image']['p99_ms']} ms |")
    lines += ["", "Split of one DFF run over the batch (s):", ""]
    for r in report["results"]:
        for mode in ("joint", "per_image"):
            s = r[f"dff_{mode}_split_s"]
            lines.append(f"- {r['model']} {mode}: " + ", ".join(f"{k} {v}" for k, v in s.items())
                         + f"; {r[f'dff_{mode}_n_iter']} NMF iterations on {r[f'dff_{mode}_backend']}"
                         + (", device path" if r[f"dff_{mode}_device_path"] else ""))
        if "dff_per_image_unpipelined_images_per_s" in r:  # (per image's steps overlap: their sum is no wall time)
            lines.append(f"- {r['model']} per_image without the pipeline (dff's PIPELINE = False): "
                         f"{r['dff_per_image_unpipelined_images_per_s']} img/s; "
                         + ", ".join(f"{k} {v}" for k, v in r["dff_per_image_unpipelined_split_s"].items()))
    libs = [(r["model"], lib, r[f"dff_joint_one_image_{lib}"]) for r in report["results"] for lib in ("cupy", "torch")
            if f"dff_joint_one_image_{lib}" in r]
    if libs:
        lines += ["", "One image, joint, by the GPU array library of the maps (DFFKIT_DEVICE_ARRAYS):", ""]
        lines += [f"- {model} {lib}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms; split {v['split_ms']}"
                  + ("" if v["device_path"] else " (host path)") for model, lib, v in libs]
    lines += ["", "Split of the last one-image DFF run (ms):", ""]
    for r in report["results"]:
        for mode in ("joint", "per_image"):
            s = r.get(f"dff_{mode}_one_image_split_s") or {}
            lines.append(f"- {r['model']} {mode}: " + ", ".join(f"{k} {1e3 * v:.3f}" for k, v in s.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", default=["filterbank", "vgg16"],
                   help="'filterbank', 'vgg16' (random weights unless a trained export is cached) or ONNX paths")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-images", type=int, default=None, help="batch for throughput (default 16 CPU, 256 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="extractor batch (default 16 CPU, 64 GPU)")
    p.add_argument("--repeats-batch", type=int, default=None)
    p.add_argument("--repeats-one", type=int, default=None, help="latency samples (default 30 CPU, 300 GPU)")
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--precision", choices=_PRECISIONS, default="fp32",
                   help="the CUDA NMF's arithmetic (dff's precision)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/dff_<device>)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and "cuda" not in dffkit.available_backends():
        print(f"CUDA NMF not usable: {dffkit.unavailable_reasons().get('cuda')}", file=sys.stderr)
        return 1
    args.n_images = args.n_images or (256 if gpu else 16)
    args.batch_size = args.batch_size or (64 if gpu else 16)
    args.repeats_batch = args.repeats_batch or (5 if gpu else 2)
    args.repeats_one = args.repeats_one or (300 if gpu else 30)
    report = {
        "benchmark": "dff end to end (benchmarks/bench_dff.py)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": args.device,
        "image_size": args.image_size,
        "n_images": args.n_images,
        "k": args.k,
        "max_iter": args.max_iter,
        "tol": args.tol,
        "precision": args.precision,
        "machine": machine(),
        "results": [],
    }
    for model in args.models:
        print(f"{model} ...", file=sys.stderr, flush=True)
        report["results"].append(bench_model(model, args))
        print(json.dumps(report["results"][-1], indent=1), file=sys.stderr)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(report, Path(args.out) if args.out else HERE / "results" / f"dff_{args.device}", markdown(report))
    return 0


def write_report(report: dict, stem: Path, text: str) -> None:
    """stem.json (the report) and stem.md (``text``); the text printed too."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.json')} and .md", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
