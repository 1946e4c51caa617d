"""Benchmark: NMF.transform (W for new rows against fixed components), the call a service makes
per request once a model is fitted.

A model (k components over n features) is fitted once; then ``transform`` of a batch of rows is
timed for dffkit and for scikit-learn's own NMF(solver="mu") fitted on the same data, side by
side in one process (median of --repeats calls; the defaults: max_iter=200, tol=1e-4, so both
stop by the same rule, and their iteration counts are printed). Both solve W with H fixed; with
the Frobenius loss both compute X H^T once (dffkit since session 14) and iterate on k x k
products. Also: one call of dffkit.non_negative_factorization(update_H=False, tol=0, 200 it).

``python3 benchmarks/bench_transform.py [--repeats 50] [--label NAME]`` writes
benchmarks/results/transform_<label>.json and .md.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, dffkit, machine, timed, write  # noqa: E402

CASES = [  # (rows per call, n features, k, loss)
    (1, 512, 20, "frobenius"), (64, 512, 20, "frobenius"), (1024, 512, 20, "frobenius"),
    (64, 4096, 64, "frobenius"), (64, 512, 20, "kullback-leibler"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--label", default="cpu")
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    try:
        from sklearn.decomposition import NMF as SkNMF
    except ImportError:
        SkNMF = None

    rng = np.random.default_rng(0)
    rows = []
    for b, n, k, loss in CASES:
        Xfit = (rng.random((2000, k)) @ rng.random((k, n)) + 0.1 * rng.random((2000, n))).astype(np.float32)
        Xnew = (rng.random((b, k)) @ rng.random((k, n)) + 0.1 * rng.random((b, n))).astype(np.float32)
        ours = dffkit.NMF(k, beta_loss=loss, init="random", random_state=0, max_iter=200, backend="cpu").fit(Xfit)
        row = dict(rows=b, n=n, k=k, loss=loss)
        row["dffkit_s"], row["dffkit_best_s"] = timed(lambda: ours.transform(Xnew), args.repeats)
        _, _, row["dffkit_n_iter"] = dffkit.non_negative_factorization(
            Xnew, H=ours.components_, n_components=k, update_H=False, beta_loss=loss, backend="cpu")
        row["dffkit_200it_s"], _ = timed(lambda: dffkit.non_negative_factorization(
            Xnew, H=ours.components_, n_components=k, update_H=False, beta_loss=loss, tol=0,
            max_iter=200, backend="cpu"), args.repeats)
        if SkNMF is not None:
            theirs = SkNMF(k, solver="mu", beta_loss=loss, init="random", random_state=0, max_iter=200).fit(Xfit)
            theirs.components_ = ours.components_.copy()  # the same fixed components
            row["sklearn_s"], row["sklearn_best_s"] = timed(lambda: theirs.transform(Xnew), args.repeats)
            row["ratio"] = row["sklearn_s"] / row["dffkit_s"]
        rows.append(row)
        print(row, flush=True)
    machine_ = machine()
    out = HERE / "results" / f"transform_{args.label}"
    lines = [f"# NMF.transform, {args.label}", "",
             f"Machine: {machine_['cpu']}, {machine_['cores']} cores, engine for "
             f"{machine_['engine'].get('instruction_sets', '?')}; load average "
             f"{', '.join(f'{v:.2f}' for v in machine_['load_average'])}.", "",
             "| rows | n | k | loss | dffkit transform | scikit-learn transform | sklearn / dffkit | dffkit n_iter | dffkit, 200 it, tol 0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sk = f"{r['sklearn_s'] * 1e3:.3f} ms" if "sklearn_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"| {r['rows']} | {r['n']} | {r['k']} | {r['loss']} | {r['dffkit_s'] * 1e3:.3f} ms | {sk} | "
                     f"{ratio} | {r['dffkit_n_iter']} | {r['dffkit_200it_s'] * 1e3:.3f} ms |")
    lines += ["", "Times: medians of the repeats (wall clock, one process); transform with max_iter=200, tol=1e-4 "
              "(scikit-learn's defaults), the same fixed components for both."]
    write(out, dict(machine=machine_, rows=rows), lines)

if __name__ == "__main__":
    main()
