"""Benchmark: init="random" (the start of every fit with the default of nmf_batched and DFF).

dffkit draws W and H as sqrt(mean(X)/k) |N(0,1)| from a counter-based Philox stream (the same
bits on every backend, cpp/philox.hpp) after a float64 mean of X in a fixed chunked order. Timed
side by side in one process, each the best of --repeats calls:

- ``dffkit``: ``dffkit.initialize(X, k, init="random", random_state=0)`` (validation included);
- ``sklearn``: scikit-learn's own start for init="random" (``_initialize_nmf``: numpy's mean and
  its standard normal generator; different numbers, the same distribution).

Rates: draws per second (m k + k n of them) and the mean's pass over X in GB/s against the copy
bandwidth measured in the same run (numpy copyto of 64 MiB).

``python3 benchmarks/bench_init.py [--repeats 20] [--label NAME]`` writes
benchmarks/results/init_<label>.json and .md.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, dffkit, machine, timed, write  # noqa: E402

PROBLEMS = [  # (m, n, k): one image, ten images, a tall matrix, a square one
    (196, 512, 5), (1960, 512, 5), (50000, 512, 20), (4096, 4096, 64),
]


def copy_bandwidth():
    a = np.ones(64 << 18, dtype=np.float32)  # 64 MiB
    b = np.empty_like(a)
    _, t = timed(lambda: np.copyto(b, a), 10)
    return 2 * a.nbytes / t / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--label", default="cpu")
    args = ap.parse_args()
    try:
        from sklearn.decomposition._nmf import _initialize_nmf
    except ImportError:
        _initialize_nmf = None
    from dffkit import _backends

    rng = np.random.default_rng(0)
    bw = copy_bandwidth()
    rows = []
    for m, n, k in PROBLEMS:
        X = rng.random((m, n), dtype=np.float32)
        draws = m * k + k * n
        row = dict(problem=f"{m}x{n}", k=k, draws=draws)
        med, t = timed(lambda: dffkit.initialize(X, k, init="random", random_state=0), args.repeats)
        row.update(dffkit_s=t, dffkit_median_s=med, draws_per_s=draws / t,
                   mean_pass_gb_s=X.nbytes / t / 1e9)
        if _initialize_nmf is not None:
            meds, ts = timed(lambda: _initialize_nmf(X, k, init="random", random_state=0), args.repeats)
            row.update(sklearn_s=ts, sklearn_median_s=meds, ratio=ts / t)
        rows.append(row)
        print(row, flush=True)
    machine_ = dict(machine(), copy_gb_s=bw,
                    threads=dffkit.get_num_threads() or _backends.cpu().max_threads())
    out = HERE / "results" / f"init_{args.label}"
    lines = [f"# init='random', {args.label}", "",
             f"Machine: {machine_['cpu']}, {machine_['cores']} cores, engine for "
             f"{machine_['engine'].get('instruction_sets', '?')} (init path: "
             f"{machine_['engine'].get('random_init', 'scalar (before the vector path)')}); load "
             f"average {', '.join(f'{v:.2f}' for v in machine_['load_average'])}; copy bandwidth "
             f"{bw:.1f} GB/s.", "",
             "| X | k | draws | dffkit | scikit-learn | sklearn / dffkit | draws/s | pass over X |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sk = f"{r['sklearn_s'] * 1e3:.3f} ms" if "sklearn_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"| {r['problem']} | {r['k']} | {r['draws']} | {r['dffkit_s'] * 1e3:.3f} ms | {sk} | "
                     f"{ratio} | {r['draws_per_s'] / 1e6:.1f} M | {r['mean_pass_gb_s']:.1f} GB/s "
                     f"({100 * r['mean_pass_gb_s'] / bw:.0f}% of copy) |")
    lines += ["", "Times: the best of the repeats (wall clock, one process, all the engine's threads); "
              "'pass over X': X's bytes / dffkit's whole time (the mean is one of its two parts)."]
    write(out, dict(machine=machine_, rows=rows), lines)

if __name__ == "__main__":
    main()
