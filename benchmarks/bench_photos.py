"""Benchmark: DFF on photographs read from files, end to end (issue 7's path as a user runs it).

``dffkit dff photos/*.jpg`` spends its time where the 224 x 224 benchmarks do not look: decoding
JPEGs of several megapixels, heat maps and labels at each photo's own size, and writing the
PNGs. This times each stage, with one thread for the images (``DFFKIT_IO_THREADS=1``) and with
the default (``dffkit.images.default_workers()``), in the same run:

- ``extractor``: ``FeatureExtractor(...)(paths)`` (read, resize, run), images/s;
- ``dff``: ``dffkit.dff(paths, k)`` with its own split (load, extract, factorize, maps);
- ``save``: ``DFFResult.save(dir)`` (overlays, per-concept heat maps, grid, summary).

The photographs are made here (textured regions and noise, JPEG quality 90), so the run needs
no data. ``python3 benchmarks/bench_photos.py [--n 8] [--size 2000x1500] [--device cuda]``
writes benchmarks/results/photos_<device>.json and .md.
"""
import argparse
import json
import os
import sys
import tempfile
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
from dffkit.features import FeatureExtractor  # noqa: E402
from dffkit.images import default_workers  # noqa: E402

sys.path.insert(0, str(HERE))
from bench_dff import write_report  # noqa: E402  (the sibling script: one report writer)


def make_photos(folder: Path, n: int, width: int, height: int) -> list:
    """n JPEGs of textured regions (stripes of two periods, two colours) under noise."""
    from PIL import Image

    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        inside = ((y - cy) / (0.3 * height)) ** 2 + ((x - cx) / (0.3 * width)) ** 2 < 1
        stripes = np.sin((x + y) / (9 + i)) > 0
        rgb = np.where(inside[..., None], np.where(stripes[..., None], [200, 60, 40], [240, 190, 60]),
                       [70, 120, 70] + 30 * np.sin(x / 37.0)[..., None])
        rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:02d}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        paths.append(str(path))
    return paths


def best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def run(paths, args, workers: int, scratch: Path) -> dict:
    os.environ["DFFKIT_IO_THREADS"] = str(workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        providers = "cuda" if args.device == "cuda" else "cpu"
        fx = FeatureExtractor(args.model, providers=providers, batch_size=args.batch_size)
    backend = "cuda" if args.device == "cuda" else "cpu"
    fx(paths[:2])  # warm up the session
    n = len(paths)
    t_fx, _ = best(lambda: fx(paths), args.repeats)
    t_dff, result = best(lambda: dffkit.dff(paths, args.k, extractor=fx, backend=backend), args.repeats)
    t_save, written = best(lambda: result.save(scratch / f"out_{workers}"), args.repeats)
    pictures = sum(len(v) for k, v in written.items() if k != "summary")
    return {
        "workers": workers,
        "provider": fx.provider,
        "extractor_images_per_s": round(n / t_fx, 2),
        "dff_s": round(t_dff, 3),
        "dff_split_s": {k: round(v, 3) for k, v in result.timings.items()},
        "dff_images_per_s": round(n / t_dff, 2),
        "save_s": round(t_save, 3),
        "pictures_written": pictures,
        "end_to_end_images_per_s": round(n / (t_dff + t_save), 2),
    }


def markdown(report) -> str:
    m = report["machine"]
    lines = [
        f"# DFF on photographs from files ({report['device']})",
        "",
        f"{report['n']} JPEGs of {report['size']} (made by the benchmark), model {report['model']}, "
        f"k = {report['k']}; best of {report['repeats']}. Machine: {m.get('cpu_model', '?')}, "
        f"{m.get('cores', '?')} cores; load average at start {m.get('load_average')}. {report['date']}.",
        "`python3 benchmarks/bench_photos.py " + " ".join(report["argv"]) + "`.",
        "",
        "| image threads | extractor img/s | dff s | load | extract | factorize | maps | save s (pictures) "
        "| end to end img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        s = r["dff_split_s"]
        lines.append(
            f"| {r['workers']} | {r['extractor_images_per_s']} | {r['dff_s']} | {s.get('load')} | {s.get('extract')} "
            f"| {s.get('factorize')} | {s.get('maps')} | {r['save_s']} ({r['pictures_written']}) "
            f"| {r['end_to_end_images_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="filterbank")
    p.add_argument("--n", type=int, default=8, help="photographs")
    p.add_argument("--size", default="2000x1500", help="WIDTHxHEIGHT of each photograph")
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/photos_<device>)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    try:
        from dffkit._bench_report import describe_machine

        machine = describe_machine()
    except Exception as exc:  # noqa: BLE001 - describe what we can
        machine = {"note": f"describe_machine failed: {exc}"}
    report = {"benchmark": "DFF on photographs (benchmarks/bench_photos.py)", "device": args.device,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "n": args.n, "size": args.size,
              "model": args.model, "k": args.k, "repeats": args.repeats, "argv": list(argv or sys.argv[1:]),
              "machine": machine, "results": []}
    before = os.environ.get("DFFKIT_IO_THREADS")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            paths = make_photos(scratch, args.n, width, height)
            os.environ.pop("DFFKIT_IO_THREADS", None)
            default = default_workers()
            for workers in sorted({1, default}):
                print(f"image threads {workers} ...", file=sys.stderr, flush=True)
                report["results"].append(run(paths, args, workers, scratch))
                print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    finally:
        if before is None:
            os.environ.pop("DFFKIT_IO_THREADS", None)
        else:
            os.environ["DFFKIT_IO_THREADS"] = before
    write_report(report, Path(args.out) if args.out else HERE / "results" / f"photos_{args.device}", markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
