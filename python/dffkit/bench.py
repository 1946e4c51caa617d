"""``dffkit bench``: NMF backends side by side on built-in problems.

Every contender (dffkit's CPU and CUDA engines, scikit-learn MU and CD, plain PyTorch and CuPy
MU loops) solves the same generated problems from the same initial W, H for the same number
of iterations; scikit-learn's CD solver is timed to the error the MU reference reaches.
Each multiplicative-update contender is checked against a float64 oracle after one iteration
from the shared start and flagged when it disagrees. Contenders that cannot run here are
listed as skipped, with why. The sparse problems (``tfidf-*``: a scipy.sparse CSR TF-IDF X)
run the contenders that take sparse X (dffkit's CPU engine, scikit-learn); the others are
skipped for it, and all of them when scipy is not installed.

From Python::

    from dffkit import bench
    report = bench.run("quick")             # or "default", "sparse", "issue3", "gpu"
    print(report.to_text())
    report.write(json="bench.json", markdown="bench.md", plot="bench.png")

From the shell: ``dffkit bench --quick`` (see ``dffkit bench --help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fnmatch
import json as _json
import math
import numbers
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dffkit import _bench_report as _report
from dffkit._bench_contenders import (
    Contender,
    CupyContender,
    DffkitContender,
    Setup,
    SklearnContender,
    TorchContender,
    default_contenders,
)
from dffkit._bench_problems import (
    ErrorMeter,
    Problem,
    Suite,
    Target,
    bytes_per_iter,
    flops_per_iter,
    oracle_step,
    relative_difference,
    sparse_unavailable,
    suites,
)

__all__ = [
    "run",
    "Report",
    "Problem",
    "Suite",
    "Target",
    "Contender",
    "Setup",
    "DffkitContender",
    "SklearnContender",
    "TorchContender",
    "CupyContender",
    "default_contenders",
    "suites",
    "AGREE_TOL",
    "CLI",
]

SCHEMA = "dffkit-bench/1"

# relative difference from the float64 oracle after one iteration that still counts as
# "the same multiplicative update from the same start", by precision
AGREE_TOL = {"fp32": 1e-4, "fp64": 1e-8, "tf32": 1e-2, "bf16x": 3e-2}
# batches: the agreement check looks at this many problems of the batch
_AGREE_BATCH = 64
# pause before a CPU contender's timed solves, for the previous library's idle threads to sleep
_SETTLE_S = 0.1
# the Skipped table's contender for a problem none can run (a sparse problem without scipy)
ALL_CONTENDERS = "(every contender)"


class Report:
    """A bench result: ``data`` is the JSON document (machine, ceilings, problems, rows,
    skipped contenders, targets)."""

    def __init__(self, data: dict):
        self.data = data

    @property
    def rows(self) -> list:
        return self.data["rows"]

    @property
    def skipped(self) -> list:
        return self.data["skipped"]

    @property
    def targets(self) -> list:
        return self.data["targets"]

    def row(self, problem: str, contender: str):
        for r in self.rows:
            if r["problem"] == problem and r["contender"] == contender:
                return r
        return None

    def flagged(self) -> list:
        return [r for r in self.rows if r.get("agrees") is False]

    def to_json(self) -> str:
        return _json.dumps(self.data, indent=1, default=_json_default)

    def to_markdown(self) -> str:
        return _report.render(self.data, markdown=True)

    def to_text(self) -> str:
        return _report.render(self.data, markdown=False)

    def plot(self, path) -> bool:
        """Time per iteration by problem and contender as an image (PNG; another format
        matplotlib writes where ``path`` ends in its extension, e.g. ``.svg``); False, and no
        file, without matplotlib."""
        return _write_whole(path, lambda tmp: _report.plot(self.data, tmp), _plot_suffix(path))

    def write(self, json=None, markdown=None, plot=None) -> list:
        """Write the requested outputs; returns the paths written. Each file is written whole
        or not at all (a temporary file beside it, renamed over it): an interrupted or failed
        write leaves the file that was there, if any."""
        # rendered before anything is written: a report that cannot be rendered leaves no
        # half-written set of files
        texts = []
        if json:
            texts.append((json, self.to_json() + "\n"))
        if markdown:
            texts.append((markdown, self.to_markdown()))
        written = []
        for path, text in texts:
            _write_whole(path, lambda tmp, text=text: _write_text(tmp, text))
            written.append(str(path))
        if plot and self.plot(plot):
            written.append(str(plot))
        return written


def _write_text(path, text) -> bool:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def _write_whole(path, write, suffix=".part") -> bool:
    """``write(tmp)`` into a temporary file beside ``path`` (named ``...suffix``), then renamed
    over ``path``: ``path`` holds either what it held before or the whole new file, whatever
    interrupts the write. ``write`` returning False (nothing to write) leaves ``path`` alone.
    A ``path`` that is not a regular file (``/dev/null``, a pipe) is written directly; a
    symbolic link is followed (its target is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        return write(str(path))
    target = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        if not write(tmp):
            os.unlink(tmp)
            return False
        try:  # the permissions a new file gets (mkstemp makes it private), or the old file's
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def _plot_suffix(path, option="plot") -> str:
    """The extension the plot of ``path`` is written in: its own where matplotlib writes that
    format, ``.png`` where it has none; ValueError naming ``option`` for one matplotlib does not
    write (checked only where matplotlib is installed: without it no plot is written)."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return ".png"
    formats = _plot_formats()
    if formats and suffix[1:] not in formats:
        raise ValueError(f"{option} {path}: matplotlib writes no {suffix!r} images; name the file "
                         f"{Path(path).with_suffix('.png').name} (or use one of "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    return suffix


def _plot_formats() -> dict:
    """The image formats matplotlib writes ({extension: description}); empty without it."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return {}
    return FigureCanvasBase.get_supported_filetypes()


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------

class _Progress:
    """tqdm on stderr where installed, else a one-line bar; silent when disabled."""

    def __init__(self, total, enabled, desc):
        self.total, self.n, self.enabled, self.desc = total, 0, enabled, desc
        self._bar = None
        self._lines = enabled and not sys.stderr.isatty()  # a log: one line per problem
        self._last = None
        if enabled and not self._lines:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="run",
                                 dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def step(self, label):
        self.n += 1
        if not self.enabled:
            return
        if self._lines:
            problem = label.split(":")[0]
            if problem != self._last:
                self._last = problem
                sys.stderr.write(f"{self.desc}: [{self.n}/{self.total}] {problem}\n")
                sys.stderr.flush()
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
            return
        width = 30
        done = int(width * self.n / max(1, self.total))
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] "
                         f"{self.n}/{self.total} {label[:40]:<40}")
        sys.stderr.flush()

    def close(self):
        if not self.enabled or self._lines:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# the harness
# ---------------------------------------------------------------------------------------------

def _select(items, patterns, name, what="contenders", among="the contenders"):
    """Items whose ``name`` matches one of the glob patterns (comma lists allowed); ValueError
    naming ``what`` (the parameter) for a pattern that matches nothing."""
    if patterns is None:
        return list(items)
    if isinstance(patterns, str):
        patterns = [patterns]
    pats = [q.strip() for p in patterns for q in str(p).split(",") if q.strip()]
    out = [it for it in items if any(fnmatch.fnmatch(name(it), p) for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatch(name(it), p) for it in items)]
    if unknown:
        raise ValueError(f"{what}={','.join(pats)!r}: no match for {', '.join(map(repr, unknown))} "
                         f"among {among}; choose from {', '.join(name(it) for it in items)} "
                         f"(names or globs, comma-separated)")
    return out


def _timed(c: Contender, state, n_iter):
    args = c.start(state)
    c.sync()
    t0 = time.perf_counter()
    out = c.solve(state, args, n_iter)
    t = time.perf_counter() - t0
    return out, t


def _refusal(c: Contender, p: Problem, unavailable: dict):
    """Why ``c`` does not run ``p``, None when it does: on a sparse problem a contender that
    cannot take scipy.sparse X first (true on any machine, so it says more than "not installed
    here"), then the contender's unavailability here, then its own ``unsupported``."""
    if p.sparse:
        why = getattr(c, "sparse_unsupported", lambda: None)()
        if why:
            return why
    return unavailable[c.name] or c.unsupported(p)


def _base_row(p: Problem, c: Contender) -> dict:
    return {"problem": p.name, "contender": c.name, "solver": c.solver, "device": c.device,
            "family": c.family, "precision": c.precision, "status": "ok", "reason": "",
            "n_iter": p.n_iter, "time_s": None, "time_min_s": None, "times_s": [],
            "time_per_iter_s": None,
            "rel_error": None, "error": None, "loss_rel_diff": None, "agree_rel_diff": None,
            "agrees": None, "speedup_vs_best_peer": None, "GBps": None, "bw_frac": None,
            "GFLOPs": None, "flop_frac": None, "notes": ""}


def _cap(suite, c) -> float:
    """The longest one solve of ``c`` may be estimated at before it is skipped."""
    return suite.cpu_row_cap_s if c.device == "cpu" and suite.cpu_row_cap_s else suite.row_cap_s


def _measure_mu(c, state, p, cap, oracle, row):
    """Agreement after one iteration from the shared start; returns the estimated time of a
    whole solve and its iteration count."""
    out, t1 = _timed(c, state, 1)
    W1, H1 = c.fetch(state, out)
    Wo, Ho = oracle
    if p.batch:
        W1, H1 = W1[:len(Wo)], H1[:len(Ho)]
    diff = max(relative_difference(W1, Wo), relative_difference(H1, Ho))
    row["agree_rel_diff"] = diff
    row["agrees"] = bool(np.isfinite(diff) and diff <= AGREE_TOL.get(c.precision, 1e-4))
    if not row["agrees"]:
        row["status"] = "flagged"
    if t1 * p.n_iter > 3 * cap:  # far above the cap even counting a cold first call
        return t1 * p.n_iter, p.n_iter
    if t1 * p.n_iter < 0.05:  # cheap even counting the call overhead n_iter times
        return t1 * p.n_iter, p.n_iter
    # a short warm run (a tenth of the solve) estimates the cost of one solve; above the cap,
    # a second one guards against a hiccup of a busy machine
    n_short = min(p.n_iter, max(2, p.n_iter // 10))
    est = _timed(c, state, n_short)[1] / n_short * p.n_iter
    if est > cap and n_short < p.n_iter:
        est = min(est, _timed(c, state, n_short)[1] / n_short * p.n_iter)
    return est, p.n_iter


def _measure_cd(c, state, p, suite, cap, target, meter, row):
    """Smallest iteration count at which the CD solver's error is <= target (doubling, then
    bisection; the error after i iterations from one start does not depend on the run)."""
    most = max(1, int(round(suite.cd_cap_factor * p.n_iter)))

    def err_at(i):
        out, t = _timed(c, state, i)
        return meter.relative(*c.fetch(state, out)), t

    i, lo, reached, t = 1, 0, False, 0.0
    while True:
        e, t = err_at(i)
        if e <= target:
            reached = True
            break
        if i >= most or t > cap:
            break
        lo, i = i, min(2 * i, most)
    if reached:
        hi = i
        while hi - lo > 1:
            mid = (lo + hi) // 2
            e_mid, t = err_at(mid)
            if e_mid <= target:
                hi = mid
            else:
                lo = mid
        i = hi
    row["reached"] = reached
    row["target_rel_error"] = target
    row["n_iter"] = i
    if t > cap:
        return t, i
    return _timed(c, state, i)[1], i


class _Entry:
    """A contender being measured on one problem."""

    def __init__(self, c, row):
        self.c, self.row, self.state = c, row, None
        self.n_iter, self.reps, self.times, self.t_wall = 0, 0, [], 0.0


def _run_problem(p, suite, contenders, unavailable, progress, rows, skipped, outside=()):
    """Prepare every contender (agreement check, cost estimate, warm-up solve that gives the
    final error), then time them round-robin, so that a busy machine slows all alike.

    ``outside``: MU rows of this problem measured elsewhere (the other processes of an isolated
    run), candidates for the reference error the CD solver is timed to, as if they ran here."""
    X, W0, H0 = p.make()
    offsets = p.group_offsets()
    lam, mu = p.penalties(X, W0, H0)
    nb = min(p.batch, _AGREE_BATCH) if p.batch else None
    oracle = oracle_step(X[:nb] if nb else X, W0[:nb] if nb else W0, H0[:nb] if nb else H0,
                         p.beta, offsets, lam, mu)
    meter = ErrorMeter(X, p.beta)
    setup = Setup(p, X, W0, H0, offsets, lam, mu)
    prow, active, entries = [], [], []
    ordered = [c for c in contenders if c.solver != "cd"] + [c for c in contenders if c.solver == "cd"]

    def fail(e, exc):
        e.row["status"] = "error"
        e.row["reason"] = f"{type(exc).__name__}: {exc}"
        release(e)

    def release(e):
        if e in active:
            active.remove(e)
        if e.state is not None:
            try:
                e.c.teardown(e.state)
            except Exception:  # noqa: BLE001 - freeing what failed must not fail the run
                pass
            e.state = None

    for c in ordered:
        progress.step(f"{p.name}: {c.name}")
        reason = _refusal(c, p, unavailable)
        if reason:
            skipped.append((c.name, p.name, reason))
            continue
        e = _Entry(c, _base_row(p, c))
        entries.append(e)
        t0 = time.perf_counter()
        try:
            e.state = c.setup(setup)
            if c.solver == "cd":
                ref = _reference(prow + list(outside))
                if ref is None:
                    skipped.append((c.name, p.name, "no MU result to take the target error from"))
                    release(e)
                    continue
                est, e.n_iter = _measure_cd(c, e.state, p, suite, _cap(suite, c),
                                            ref["rel_error"] * (1 + 1e-4), meter, e.row)
            else:
                est, e.n_iter = _measure_mu(c, e.state, p, _cap(suite, c), oracle, e.row)
            cap = _cap(suite, c)
            if est > cap:
                skipped.append((c.name, p.name, f"one solve estimated at {est:.3g} s, above this "
                                                f"suite's cap of {cap:g} s"))
                release(e)
                continue
            # warm-up: one whole solve, whose result gives the final error (runs from the same
            # start are deterministic)
            out, t = _timed(c, e.state, e.n_iter)
            W, H = c.fetch(e.state, out)
            del out
            e.row["error"] = meter.error(W, H)
            e.row["rel_error"] = e.row["error"] / meter.norm
            e.row["notes"] = c.notes(e.state)
            lo_r, hi_r = suite.repeats
            e.reps = int(min(hi_r, max(lo_r, suite.budget_s // max(min(est, t), 1e-9))))
            active.append(e)
            prow.append(e.row)
        except Exception as exc:  # noqa: BLE001 - one contender's failure is a row, not the end
            prow.append(e.row)
            fail(e, exc)
        finally:
            e.t_wall += time.perf_counter() - t0
    # timed solves in two passes over the contenders (forward, then backward), each contender's
    # share of a pass back to back: a load that comes and goes hits all alike, and the worker
    # threads one library leaves spinning (OpenBLAS, OpenMP) settle during a short pause before
    # the next CPU contender starts
    for pass_no, order in enumerate((list(active), list(reversed(active)))):
        for e in order:
            if e not in active:
                continue
            n = (e.reps + 1) // 2 if pass_no == 0 else e.reps - len(e.times)
            if n <= 0:
                continue
            if e.c.device == "cpu":
                time.sleep(_SETTLE_S)
            t0 = time.perf_counter()
            try:
                for _ in range(n):
                    e.times.append(_timed(e.c, e.state, e.n_iter)[1])
            except Exception as exc:  # noqa: BLE001
                fail(e, exc)
            e.t_wall += time.perf_counter() - t0
    for e in list(active):
        row = e.row
        row["times_s"] = e.times
        row["time_s"] = statistics.median(e.times)
        row["time_min_s"] = min(e.times)
        row["time_per_iter_s"] = row["time_s"] / e.n_iter
        row["n_iter"] = e.n_iter
        _efficiency(row, p, e.c)
        release(e)
    for e in entries:
        e.row["bench_wall_s"] = e.t_wall
    _compare(prow)
    rows.extend(prow)


def _reference(prow):
    """The reference MU row of a problem: scikit-learn MU, else dffkit CPU, else any."""
    ok = [r for r in prow if r["status"] == "ok" and r["solver"] == "mu"
                                  and r["rel_error"] is not None]
    for name in ("sklearn-mu", "dffkit-cpu"):
        for r in ok:
            if r["contender"] == name:
                return r
    return ok[0] if ok else None


def _compare(prow):
    ref = _reference(prow)
    peers = [r for r in prow if r["status"] == "ok" and r["family"] == "peer" and r["solver"] == "mu"]
    best = min((r["time_s"] for r in peers), default=None)
    for r in prow:
        if r["time_s"] is None:
            continue
        if ref is not None and r["rel_error"] is not None and r["solver"] == "mu":
            r["loss_rel_diff"] = abs(r["rel_error"] - ref["rel_error"]) / max(ref["rel_error"], 1e-300)
            r["reference"] = ref["contender"]
        if best is not None:
            r["speedup_vs_best_peer"] = best / r["time_s"]
            r["best_peer"] = min(peers, key=lambda q: q["time_s"])["contender"]


def _efficiency(row, p, c):
    if c.solver != "mu" or not row["time_per_iter_s"]:
        return
    t = row["time_per_iter_s"]
    row["GBps"] = bytes_per_iter(p) / t / 1e9
    row["GFLOPs"] = flops_per_iter(p) / t / 1e9


def _fractions(rows, ceilings):
    """Achieved bandwidth and FLOP rate as fractions of the ceilings of the row's device
    (TF32 GEMM for tf32/bf16x rows where measured)."""
    for row in rows:
        if row.get("GBps") is None:
            continue
        if row["device"] == "cuda":
            bw = ceilings.get("gpu_copy_GBps")
            peak = ceilings.get("gpu_tf32_GFLOPs") if row["precision"] in ("tf32", "bf16x") else None
            peak = peak or ceilings.get("gpu_sgemm_GFLOPs")
        else:
            bw, peak = ceilings.get("cpu_copy_GBps"), ceilings.get("cpu_sgemm_GFLOPs")
        row["bw_frac"] = row["GBps"] / bw if bw else None
        row["flop_frac"] = row["GFLOPs"] / peak if peak else None


def _measure_ceilings(quick, gpu):
    """The CPU (and GPU) ceilings; a measurement that fails is recorded as ``*_error`` and
    leaves its ceilings out, never the run's results."""
    out = {}
    for kind, measure in (("cpu", _report.cpu_ceilings), ("gpu", _report.gpu_ceilings)):
        if kind == "gpu" and not gpu:
            continue
        try:
            out.update(measure(quick))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the copy buffers
            out[f"{kind}_ceilings_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _evaluate_targets(targets, rows, problem_names):
    def find(problem, contender):
        for r in rows:
            if r["problem"] == problem and r["contender"] == contender and r["status"] == "ok":
                return r
        return None

    out = []
    for t in targets:
        d = dataclasses.asdict(t)
        if t.problem not in problem_names:
            continue
        a = find(t.problem, t.contender)
        b = find(t.other_problem or t.problem, t.other) if t.other else None
        measured, ok, text = None, None, "n/a"
        if a is None or (t.other and b is None):
            missing = t.contender if a is None else t.other
            text = f"n/a ({missing} has no result on {t.other_problem or t.problem})"
        elif t.kind == "speedup":
            measured = b["time_s"] / a["time_s"]
            ok = measured >= t.value
            text = f"{measured:.3g}x ({_report.fmt_time(a['time_s'])} vs {_report.fmt_time(b['time_s'])})"
        elif t.kind == "max_ratio":
            measured = a["time_per_iter_s"] / b["time_per_iter_s"]
            ok = measured <= t.value
            text = (f"{measured:.3g}x ({_report.fmt_time(a['time_per_iter_s'])} vs "
                    f"{_report.fmt_time(b['time_per_iter_s'])} per iteration)")
        elif t.kind == "max_time":
            measured = a["time_s"]
            ok = measured <= t.value
            text = f"{_report.fmt_time(measured)} (target {_report.fmt_time(t.value)})"
        elif t.kind == "loss_match":
            measured = abs(a["rel_error"] - b["rel_error"]) / b["rel_error"]
            ok = measured <= t.value
            text = f"{measured:.1e}"
        d.update(measured=measured, passed=ok, measured_text=text,
                 result="n/a" if ok is None else ("PASS" if ok else "FAIL"))
        out.append(d)
    return out


def run(suite="default", *, contenders=None, problems=None, repeats=None, seed=0,
        row_cap_s=None, progress=True, json=None, markdown=None, plot=None,
        measure_ceilings=True, isolate=False) -> Report:
    """Run a benchmark suite and return its :class:`Report`.

    Parameters
    ----------
    suite : str or Suite
        "quick", "default", "sparse", "issue3" or "gpu" (see ``suites()``), or a Suite of your own.
    contenders : str, Contender, or a list of them, optional
        Names or glob patterns ("dffkit-*", "sklearn-mu"; a string may list several,
        comma-separated) chosen from :func:`default_contenders`, and/or Contender instances.
        Default: all of them.
    problems : str, Problem, or a list of them, optional
        Names or glob patterns of the suite's problems (comma-separated in one string, as
        above), and/or Problem instances.
    repeats : int, optional
        Timed runs per row, >= 1 (overrides the suite's adaptive count).
    seed : int
        Seed of the problem data and of the shared start, >= 0.
    row_cap_s : float, optional
        Skip a contender whose single solve is estimated above this many seconds (> 0; inf:
        no cap).
    progress : bool
        Show a progress bar on stderr.
    json, markdown, plot : path, optional
        Write the JSON document, the Markdown table, the plot (PNG; the format of the path's
        extension where matplotlib writes it, e.g. ``.svg``). The paths are checked before any
        work (missing folders are created, and removed again if the run fails); each file is
        written whole or not at all.
    measure_ceilings : bool
        Measure the copy and GEMM ceilings (before and after the problems).
    isolate : bool
        Run each library's contenders (dffkit, scikit-learn, PyTorch, CuPy) in a process of
        its own, so that one library's worker threads (OpenBLAS, OpenMP) cannot slow another's;
        named suite problems and built-in contenders only.
    """
    plan = _plan(suite, contenders=contenders, problems=problems, repeats=repeats, seed=seed,
                 row_cap_s=row_cap_s, isolate=isolate)
    created = _new_folders((json, markdown, plot))
    try:
        _check_outputs({"json": json, "markdown": markdown, "plot": plot})
        report = _execute(plan, progress=progress, measure_ceilings=measure_ceilings)
        report.write(json=json, markdown=markdown, plot=plot)
    except BaseException:  # an error or Ctrl-C: no empty folders left behind
        _remove_new_folders(created)
        raise
    return report


def _new_folders(paths) -> list:
    """The folders on the way to the output files ``paths`` that do not exist yet, deepest
    first: made by :func:`_check_outputs`, removed again (when empty) if the run fails."""
    from dffkit.cli import _missing_folders

    out = []
    for path in paths:
        if path:
            out += [f for f in _missing_folders(Path(path).parent) if f not in out]
    return sorted(out, key=lambda f: len(f.parts), reverse=True)


def _remove_new_folders(folders) -> None:
    from dffkit.cli import _remove_empty

    _remove_empty(folders)


@dataclasses.dataclass
class _Plan:
    suite: Suite
    chosen: list
    probs: list
    seed: int
    repeats: object
    row_cap_s: object
    isolate: bool


def _as_list(value, kind, what):
    """A single name (str) or ``kind`` instance as a one-item list; a list as it is."""
    if value is None:
        return None
    if isinstance(value, (str, kind)):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{what} must be a name, a {kind.__name__}, or a list of them; "
                        f"got {type(value).__name__}") from None
    bad = [x for x in items if not isinstance(x, (str, kind))]
    if bad:
        raise TypeError(f"{what} must hold names (str) and {kind.__name__} instances; "
                        f"got {type(bad[0]).__name__} {bad[0]!r}")
    return items


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (it seeds the data and the shared "
                         f"start), got {seed!r}")
    return int(seed)


def _check_repeats(repeats):
    """None (the suite's adaptive count) or a positive int."""
    if repeats is None:
        return None
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer (timed solves per row), or None for "
                         f"the suite's adaptive count; got {repeats!r}")
    return int(repeats)


def _check_row_cap(row_cap_s):
    """None (the suite's caps) or a number of seconds > 0 (inf: no cap)."""
    if row_cap_s is None:
        return None
    if (isinstance(row_cap_s, bool) or not isinstance(row_cap_s, numbers.Real)
            or not float(row_cap_s) > 0):
        raise ValueError(f"row_cap_s must be a number of seconds > 0 (inf: no cap), or None for the "
                         f"suite's caps; got {row_cap_s!r}")
    return float(row_cap_s)


def _plan(suite, *, contenders=None, problems=None, repeats=None, seed=0, row_cap_s=None,
          isolate=False) -> _Plan:
    """Every argument checked and the problems and contenders chosen, before any work."""
    all_suites = suites()
    if isinstance(suite, str):
        if suite not in all_suites:
            raise ValueError(f"unknown suite {suite!r}; choose from {sorted(all_suites)}")
        suite = all_suites[suite]
    elif not isinstance(suite, Suite):
        raise TypeError(f"suite must be a suite name ({', '.join(sorted(all_suites))}) or a Suite; "
                        f"got {type(suite).__name__}")
    suite = dataclasses.replace(suite)
    seed = _check_seed(seed)
    repeats = _check_repeats(repeats)
    row_cap_s = _check_row_cap(row_cap_s)
    if repeats is not None:
        suite.repeats = (repeats, repeats)
    if row_cap_s is not None:
        suite.row_cap_s = row_cap_s
        suite.cpu_row_cap_s = 0.0

    pool = default_contenders()
    given_contenders, given_problems = contenders, problems
    contenders = _as_list(contenders, Contender, "contenders")
    problems = _as_list(problems, Problem, "problems")
    if contenders is None:
        chosen = pool
    else:
        names = [c for c in contenders if isinstance(c, str)]
        chosen = _select(pool, names, lambda c: c.name) if names else []
        chosen += [c for c in contenders if isinstance(c, Contender)]
        if not chosen:
            raise ValueError(f"contenders={given_contenders!r} names no contender: pass names or "
                             f"globs (e.g. 'dffkit-*,sklearn-mu'), or leave it out for all of them")
    if problems is None:
        probs = list(suite.problems)
    else:
        names = [p for p in problems if isinstance(p, str)]
        probs = (_select(suite.problems, names, lambda p: p.name, "problems",
                         f"the problems of suite {suite.name!r}") if names else [])
        probs += [p for p in problems if isinstance(p, Problem)]
        if not probs:
            raise ValueError(f"problems={given_problems!r} names no problem: pass names or globs "
                             f"of suite {suite.name!r} (e.g. 'dff-*'), or leave it out for all of them")
    probs = [dataclasses.replace(p, seed=seed) for p in probs]
    if isolate:
        known = {c.name for c in pool}
        custom = [c.name for c in chosen if c.name not in known] + \
            [p.name for p in probs if p.name not in {q.name for q in suite.problems}]
        if custom or suite.name not in all_suites:
            raise ValueError("isolate=True runs named suites, their problems and the built-in "
                             f"contenders only; not: {custom or suite.name}")
    return _Plan(suite, chosen, probs, seed, repeats, row_cap_s, bool(isolate))


_OUTPUT_EXAMPLES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}


def _check_outputs(paths: dict) -> None:
    """Each output path (``{option: path}``, None for not wanted) writable before any work:
    OSError naming the option and what to do otherwise (ValueError for a plot format
    matplotlib does not write). Missing folders are created."""
    from dffkit.cli import prepare_output_file

    seen = {}
    for option, path in paths.items():
        if not path:
            continue
        if Path(path).is_dir():
            example = _OUTPUT_EXAMPLES.get(option.lstrip("-"), "bench.out")
            raise OSError(f"{option} {path} is a folder: pass a file name for the output, "
                          f"e.g. {Path(path) / example}")
        if option.lstrip("-") == "plot":
            _plot_suffix(path, option)
        prepare_output_file(path, option)
        key = Path(path).resolve()
        if key in seen:
            raise OSError(f"{seen[key]} and {option} both name {path}: give each output a file "
                          f"of its own")
        seen[key] = option


def _execute(plan: _Plan, *, progress=True, measure_ceilings=True, outside=None) -> Report:
    """Measure what ``plan`` chose; ``outside``: {problem: MU rows measured elsewhere} that the
    CD solver may take its target error from (the scikit-learn process of an isolated run)."""
    suite, chosen, probs, seed = plan.suite, plan.chosen, plan.probs, plan.seed
    outside = outside or {}
    unavailable = {}
    for c in chosen:
        try:
            unavailable[c.name] = c.unavailable()
        except Exception as exc:  # noqa: BLE001 - a broken peer is a skipped peer
            unavailable[c.name] = f"{type(exc).__name__}: {exc}"
    # ceilings: measured before and after the problems; the higher of the two counts (a busy
    # moment lowers a ceiling, nothing raises it)
    ceilings, ceilings_runs = {}, []
    want_gpu = any(c.device == "cuda" and not unavailable[c.name] for c in chosen)
    quick = suite.name == "quick"
    if measure_ceilings:
        ceilings_runs.append(_measure_ceilings(quick, want_gpu))
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    machine = _report.describe_machine()

    rows, skipped_raw = [], []
    # sparse problems without scipy: one line in Skipped for every contender, nothing run
    no_scipy = sparse_unavailable() if any(p.sparse for p in probs) else None
    if no_scipy:
        skipped_raw.extend((ALL_CONTENDERS, p.name, no_scipy) for p in probs if p.sparse)
        probs = [p for p in probs if not p.sparse]
    t_start = time.perf_counter()
    if plan.isolate:
        _run_isolated(suite, chosen, probs, unavailable, seed, plan.repeats, plan.row_cap_s,
                      progress, rows, skipped_raw)
    else:
        bar = _Progress(len(probs) * len(chosen), progress, f"dffkit bench {suite.name}")
        try:
            for p in probs:
                _run_problem(p, suite, chosen, unavailable, bar, rows, skipped_raw,
                             outside=outside.get(p.name, ()))
        finally:
            bar.close()
    machine["load_average_end"] = _report._loadavg()
    machine["cpu_pressure_end"] = _report._cpu_pressure()
    if measure_ceilings:
        ceilings_runs.append(_measure_ceilings(quick, want_gpu))
        for run_ in ceilings_runs:
            for k, v in run_.items():
                if isinstance(v, float) and k.endswith(("GBps", "GFLOPs")):
                    ceilings[k] = max(ceilings.get(k, 0.0), v)
                else:
                    ceilings.setdefault(k, v)
        ceilings["runs"] = ceilings_runs
    _fractions(rows, ceilings)
    # skipped: one line per contender and reason
    skipped = []
    for name, prob, reason in skipped_raw:
        for s in skipped:
            if s["contender"] == name and s["reason"] == reason:
                s["problems"].append(prob)
                break
        else:
            skipped.append({"contender": name, "problems": [prob], "reason": reason})
    data = {
        "schema": SCHEMA,
        "suite": suite.name,
        "suite_description": suite.description,
        "created": created,
        "elapsed_s": time.perf_counter() - t_start,
        "seed": seed,
        "settings": {"isolate": plan.isolate,
                     "repeats": list(suite.repeats), "budget_s": suite.budget_s,
                     "row_cap_s": suite.row_cap_s, "cpu_row_cap_s": suite.cpu_row_cap_s,
                     "cd_cap_factor": suite.cd_cap_factor,
                     "agree_tol": AGREE_TOL, "agree_batch_problems": _AGREE_BATCH},
        "machine": machine,
        "ceilings": ceilings,
        "problems": [p.as_dict() for p in plan.probs],
        "contenders": [{"name": c.name, "solver": c.solver, "device": c.device,
                        "family": c.family, "precision": c.precision, "library": c.library,
                        "unavailable": unavailable[c.name]} for c in chosen],
        "rows": rows,
        "skipped": skipped,
        "targets": _evaluate_targets(suite.targets, rows, {p.name for p in probs}),
        "legend": _report.LEGEND + (_report.SPARSE_LEGEND if any(p.sparse for p in plan.probs) else ""),
    }
    _sanitize(data)
    return Report(data)


def _run_isolated(suite, chosen, probs, unavailable, seed, repeats, row_cap_s, progress, rows,
                  skipped_raw):
    """One ``dffkit bench`` process per library; their rows are merged and compared here.

    The libraries with a CD contender run last and get the MU rows measured so far, so that
    CD is timed to the same reference error as in one process (dffkit-cpu's when scikit-learn
    MU is not chosen). Each process runs with this process's dffkit thread setting."""
    import os
    import subprocess
    import tempfile

    import dffkit

    groups = {}
    for c in chosen:
        if unavailable[c.name]:
            skipped_raw.extend((c.name, p.name, _refusal(c, p, unavailable)) for p in probs)
        else:
            groups.setdefault(c.library, []).append(c)
    # stable: the libraries without a CD solver first
    order = sorted(groups.items(), key=lambda kv: any(c.solver == "cd" for c in kv[1]))
    env = dict(os.environ, DFFKIT_NUM_THREADS=str(dffkit.get_num_threads()))
    merged = {p.name: [] for p in probs}
    for i, (lib, members) in enumerate(order):
        names = [c.name for c in members]
        if progress:
            sys.stderr.write(f"dffkit bench {suite.name}: [{i + 1}/{len(order)}] {lib} "
                             f"({', '.join(names)}) in a process of its own\n")
            sys.stderr.flush()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "part.json")
            cmd = [sys.executable, "-m", "dffkit", "bench", "--suite", suite.name,
                   "--problems", ",".join(p.name for p in probs), "--contenders", ",".join(names),
                   "--seed", str(seed), "--json", out, "--no-progress", "--no-ceilings"]
            if repeats is not None:
                cmd += ["--repeats", str(repeats)]
            if row_cap_s is not None:
                cmd += ["--row-cap", str(row_cap_s)]
            if any(c.solver == "cd" for c in members):
                outside = {name: [{k: r[k] for k in ("contender", "solver", "status", "rel_error")}
                                  for r in prow if r["status"] == "ok" and r["solver"] == "mu"
                                  and r["rel_error"] is not None]
                           for name, prow in merged.items()}
                ref = os.path.join(tmp, "reference.json")
                with open(ref, "w") as f:
                    _json.dump(outside, f)
                cmd += ["--cd-reference", ref]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            part = None
            if res.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    part = _json.load(f)
        if part is None:
            why = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            for c in members:
                for p in probs:
                    row = _base_row(p, c)
                    row.update(status="error", reason=f"isolated run failed (exit {res.returncode}): {why[0]}")
                    merged[p.name].append(row)
            continue
        for r in part["rows"]:
            merged[r["problem"]].append(r)
        for sk in part["skipped"]:
            skipped_raw.extend((sk["contender"], prob, sk["reason"]) for prob in sk["problems"])
    order = {c.name: i for i, c in enumerate(chosen)}
    for p in probs:
        prow = sorted(merged[p.name], key=lambda r: order.get(r["contender"], len(order)))
        for r in prow:
            r["speedup_vs_best_peer"] = r["loss_rel_diff"] = None
            r.pop("best_peer", None)
            r.pop("reference", None)
        _compare(prow)
        rows.extend(prow)


def _sanitize(obj):
    """NaN / inf -> None so that the JSON is strict."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, float) and not math.isfinite(v):
                obj[k] = None
            else:
                _sanitize(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, float) and not math.isfinite(v):
                obj[i] = None
            else:
                _sanitize(v)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _seconds(text: str) -> float:
    """An argparse ``type`` for a number of seconds > 0 (``inf``: no cap)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 (inf: no cap), got {text!r}")
    return value


_seconds.__name__ = "number of seconds"


def _add_arguments(parser):
    names = sorted(suites())
    parser.add_argument("--suite", default=None, choices=names,
                        help="which problems: quick (< 1 min on 2 cores), default (a few minutes; "
                             "the default), sparse (TF-IDF X at k = 20, 200, 500; about 10 minutes), issue3 "
                             "(issue 3's CPU targets), gpu (sized for a large GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="same as --suite quick (not combined with another --suite)")
    parser.add_argument("--contenders", "--only", dest="contenders", default=None,
                        help="comma-separated names or globs, e.g. 'dffkit-*,sklearn-mu' (default: all)")
    parser.add_argument("--problems", default=None,
                        help="comma-separated problem names or globs of the suite (default: all)")
    from dffkit.cli import int_at_least

    parser.add_argument("--repeats", type=int_at_least(1, "timed solves per row"), default=None,
                        help="timed runs per row (default: adaptive, the suite's range)")
    parser.add_argument("--seed", type=int_at_least(0, "it seeds the data and the shared start"), default=0,
                        help="seed of the data and the shared start, >= 0 (default: 0)")
    parser.add_argument("--row-cap", type=_seconds, default=None, metavar="SECONDS",
                        help="skip a contender whose one solve is estimated above this many "
                             "seconds, > 0 (inf: no cap; default: the suite's caps)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write a Markdown report")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="write a PNG plot of time per iteration (needs matplotlib)")
    parser.add_argument("--isolate", action="store_true",
                        help="run each library's contenders in a process of its own (no thread-pool "
                             "interference between libraries)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-ceilings", action="store_true", help=argparse.SUPPRESS)
    # isolated runs: the MU rows of the other processes, for the CD solver's target error
    parser.add_argument("--cd-reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 when a contender is flagged (disagrees with the "
                             "float64 oracle), fails with an error, or a target fails")
    parser.add_argument("--list", action="store_true",
                        help="list the suites (the one of --suite / --quick only, where given), "
                             "their problems and the contenders (with availability) and exit")


def _list(args) -> int:
    """The suites (only the one asked for with --suite / --quick), their problems, and the
    contenders with whether they can run here."""
    chosen = "quick" if args.quick else args.suite
    shown = [s for s in suites().values() if chosen in (None, s.name)]
    contenders = default_contenders()
    width = max([len(p.name) for s in shown for p in s.problems] + [len(c.name) for c in contenders])
    for s in shown:
        print(f"suite {s.name}: {s.description}")
        for p in s.problems:
            print(f"  {p.name:<{width}}  {p.describe()}")
    print("contenders:")
    for c in contenders:
        try:
            why = c.unavailable()
        except Exception as exc:  # noqa: BLE001 - a broken peer is a skipped peer, as in a run
            why = f"{type(exc).__name__}: {exc}"
        print(f"  {c.name:<{width}}  {'available' if not why else 'skipped: ' + why}")
    return 0


SAVE_HINT = ("Not saved: add --json PATH (every number and the machine), --markdown PATH or "
             "--plot PATH (PNG) to keep the results.")


def _run_cli(args) -> int:
    from dffkit.cli import _message

    if args.quick and args.suite not in (None, "quick"):
        raise ValueError(f"--quick means --suite quick and cannot be combined with --suite "
                         f"{args.suite}: drop --quick to run {args.suite!r}, or drop --suite")
    if args.list:
        return _list(args)
    suite = "quick" if args.quick else (args.suite or "default")
    plan = _plan(suite, contenders=args.contenders, problems=args.problems,
                 repeats=args.repeats, seed=args.seed, row_cap_s=args.row_cap,
                 isolate=args.isolate)
    outputs = [("JSON", "--json", "json", args.json), ("Markdown", "--markdown", "markdown", args.markdown),
               ("plot", "--plot", "plot", args.plot)]
    created = _new_folders(path for *_, path in outputs)
    try:
        _check_outputs({option: path for _, option, _, path in outputs})
        outside = None
        if args.cd_reference:
            with open(args.cd_reference) as f:
                outside = _json.load(f)
        report = _execute(plan, progress=not args.no_progress, measure_ceilings=not args.no_ceilings,
                          outside=outside)
    except BaseException:  # an error or Ctrl-C before any file is written: no empty folders left
        _remove_new_folders(created)
        raise
    print(report.to_text())
    # the table is out; each file is written on its own, and only those written are named
    failed = False
    for label, option, key, path in outputs:
        if not path:
            continue
        try:
            written = report.write(**{key: path})
        except OSError as exc:
            print(f"dffkit bench: error: {option}: {_message(exc)}", file=sys.stderr)
            failed = True
            continue
        if written:
            print(f"{label}: {path}")
        elif key == "plot":
            why = ("matplotlib is not installed (pip install matplotlib)" if not _report_has_matplotlib()
                   else "no timed rows to plot")
            print(f"plot skipped: {why}", file=sys.stderr)
    if not any(path for *_, path in outputs):
        print(SAVE_HINT)
    if failed:
        return 1
    if args.strict and _strict_failures(report):
        print(f"dffkit bench: --strict: {'; '.join(_strict_failures(report))}", file=sys.stderr)
        return 3
    return 0


def _strict_failures(report) -> list:
    """What makes ``--strict`` fail: flagged rows, rows that ended in an error, failed targets."""
    out = [f"{r['contender']} on {r['problem']} disagrees with the float64 oracle"
           for r in report.flagged()]
    out += [f"{r['contender']} on {r['problem']} failed ({r['reason']})"
            for r in report.rows if r["status"] == "error"]
    out += [f"target #{t['issue']} on {t['problem']} failed: {t['text']} ({t['measured_text']})"
            for t in report.targets if t["passed"] is False]
    return out


def _report_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


CLI = {
    "bench": (
        _add_arguments,
        _run_cli,
        "benchmark NMF backends side by side (dffkit CPU/CUDA, scikit-learn, PyTorch, CuPy) "
        "on built-in problems",
    )
}
