"""``dffkit bench`` output: the machine, the measured ceilings, and the terminal table,
Markdown, JSON and plot of a result."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------

_LIBS = ("dffkit", "numpy", "scipy", "sklearn", "torch", "cupy", "matplotlib", "threadpoolctl")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    from dffkit._backends import _cpu_flags as all_flags

    flags = all_flags() or set()
    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(name):
    try:
        if name in sys.modules or name in ("dffkit", "numpy"):
            mod = __import__(name)
            return getattr(mod, "__version__", "?")
        from importlib.metadata import version

        dist = {"sklearn": "scikit-learn"}.get(name, name)
        if name == "cupy":
            import importlib.util

            if importlib.util.find_spec("cupy") is None:
                return None
            mod = __import__("cupy")
            return mod.__version__
        return version(dist)
    except Exception:  # noqa: BLE001 - absent or broken: not installed as far as we care
        return None


def _gpus() -> list:
    out = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                out.append({"name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                            "compute_capability": f"{prop.major}.{prop.minor}",
                            "multiprocessors": prop.multi_processor_count})
            return out
    except Exception:  # noqa: BLE001
        pass
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        for line in res.stdout.strip().splitlines():
            name, mem = (x.strip() for x in line.split(",", 1))
            out.append({"name": name, "memory": mem})
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _blas() -> list:
    try:
        from threadpoolctl import threadpool_info

        return [{k: v for k, v in d.items() if k in ("user_api", "internal_api", "version",
                                                      "num_threads", "architecture", "filepath")}
                for d in threadpool_info()]
    except Exception:  # noqa: BLE001 - threadpoolctl missing
        return []


def describe_machine() -> dict:
    """CPU model, cores, memory, GPUs, library versions, BLAS kernels and relevant settings."""
    from dffkit.info import engine_threads

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu_threads, threads_from = engine_threads()
    env = {k: os.environ[k] for k in ("DFFKIT_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                      "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return {
        "dffkit_commit": _commit(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cores,
        "memory_gib": _mem_total_gib(),
        "dffkit_cpu_threads": cpu_threads,
        "dffkit_cpu_threads_from": threads_from,
        "gpus": _gpus(),
        "libraries": {name: v for name in _LIBS if (v := _version(name)) is not None},
        "blas": _blas(),
        "environment": env,
        "load_average": _loadavg(),
        "cpu_pressure": _cpu_pressure(),
    }


def _commit():
    """The git commit dffkit was built from: $DFFKIT_COMMIT, else the checkout it runs from."""
    if os.environ.get("DFFKIT_COMMIT"):
        return os.environ["DFFKIT_COMMIT"]
    import dffkit

    try:
        res = subprocess.run(["git", "-C", os.path.dirname(dffkit.__file__), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", os.path.dirname(dffkit.__file__), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            return res.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _cpu_pressure():
    """Linux PSI: the share of time some runnable task waited for a CPU (avg10, avg60), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            fields = dict(kv.split("=") for kv in f.readline().split()[1:])
        return [float(fields["avg10"]), float(fields["avg60"])]
    except (OSError, KeyError, ValueError):
        return None


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# ceilings measured in the same run
# ---------------------------------------------------------------------------------------------

def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_ceilings(quick: bool = False) -> dict:
    """Copy bandwidth (a large multi-threaded memcpy, read + write counted) and float32 GEMM
    rate (numpy's BLAS) on this CPU."""
    nbytes = (64 if quick else 256) << 20
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    try:
        workers = len(os.sched_getaffinity(0))
    except AttributeError:
        workers = os.cpu_count() or 1
    parts = np.array_split(np.arange(src.size), workers)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def copy_part(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        def copy_all():
            list(pool.map(copy_part, bounds))

        copy_all()
        t = _best(copy_all, 5)
    n = 1024 if quick else 2048
    A = np.random.default_rng(0).random((n, n), dtype=np.float32)
    A @ A
    tg = _best(lambda: A @ A, 5)
    return {"cpu_copy_GBps": 2 * nbytes / t / 1e9, "cpu_copy_bytes": nbytes,
            "cpu_copy_threads": len(bounds),
            "cpu_sgemm_GFLOPs": 2.0 * n ** 3 / tg / 1e9, "cpu_sgemm_n": n,
            "how": "copy: numpy copyto on one thread per core, read + write bytes; "
                   "sgemm: numpy matmul float32 n x n"}


def gpu_ceilings(quick: bool = False) -> dict:
    """Device-to-device copy bandwidth and fp32 / TF32 GEMM rates (PyTorch, else CuPy);
    empty when neither sees a GPU."""
    out = {}
    nbytes = (256 if quick else 2048) << 20
    n = 4096 if quick else 8192
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError
        dev = torch.device("cuda")
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
        dst = torch.empty_like(src)

        def timed(fn, reps):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            best = math.inf
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            return best

        t = timed(lambda: dst.copy_(src), 10)
        out.update(gpu_copy_GBps=2 * nbytes / t / 1e9, gpu_copy_bytes=nbytes)
        del src, dst
        A = torch.rand((n, n), device=dev)
        old = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            out["gpu_sgemm_GFLOPs"] = 2.0 * n ** 3 / timed(lambda: A @ A, 5) / 1e9
            torch.backends.cuda.matmul.allow_tf32 = True
            out["gpu_tf32_GFLOPs"] = 2.0 * n ** 3 / timed(lambda: A @ A, 5) / 1e9
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out["gpu_gemm_n"] = n
        out["gpu_lib"] = "torch"
        out["how_gpu"] = "torch: copy_ of a large buffer (read + write), matmul n x n fp32 and TF32, CUDA events"
        del A
        torch.cuda.empty_cache()
        return out
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - out of memory, a busy device: the rest unmeasured
        out["gpu_ceilings_error"] = f"{type(exc).__name__}: {exc}"
        return out
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return out
        src = cupy.ones(nbytes // 4, dtype=cupy.float32)
        dst = cupy.empty_like(src)

        def timed(fn, reps):
            fn()
            cupy.cuda.Device().synchronize()
            best = math.inf
            for _ in range(reps):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
            return best

        t = timed(lambda: cupy.copyto(dst, src), 10)
        out.update(gpu_copy_GBps=2 * nbytes / t / 1e9, gpu_copy_bytes=nbytes)
        A = cupy.random.random((n, n), dtype=cupy.float32)
        out["gpu_sgemm_GFLOPs"] = 2.0 * n ** 3 / timed(lambda: A @ A, 5) / 1e9
        out["gpu_gemm_n"] = n
        out["gpu_lib"] = "cupy"
        out["how_gpu"] = "cupy: copyto of a large buffer (read + write), matmul n x n fp32, CUDA events"
    except Exception:  # noqa: BLE001 - no usable device
        pass
    return out


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------

def fmt_time(t) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.2f} us"


def fmt_num(x, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def fmt_pct(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


COLUMNS = ["problem", "contender", "iters", "time", "best", "per iter", "rel. error", "Δ loss vs ref",
           "agrees", "vs best peer", "GB/s", "% copy BW", "GFLOP/s", "% GEMM"]


def fmt_diff(x, spec=".1e") -> str:
    """A relative difference; None is one that was not finite (the JSON holds NaN and inf as
    null), shown as nan."""
    if x is None:
        return "nan"
    return format(x, spec)


def row_cells(r: dict) -> list:
    agree = r.get("agrees")
    if agree is None:
        agree_s = "n/a"
    else:
        agree_s = ("yes" if agree else "**NO**") + f" ({fmt_diff(r.get('agree_rel_diff'))})"
    iters = str(r["n_iter"]) + ("" if r.get("reached", True) else " (not reached)")
    return [
        r["problem"], r["contender"], iters, fmt_time(r["time_s"]), fmt_time(r.get("time_min_s")),
        fmt_time(r["time_per_iter_s"]),
        fmt_num(r["rel_error"], ".6g"), fmt_num(r.get("loss_rel_diff"), ".1e"), agree_s,
        ("-" if r.get("speedup_vs_best_peer") is None else f"{r['speedup_vs_best_peer']:.3g}x"),
        fmt_num(r.get("GBps"), ".4g"), fmt_pct(r.get("bw_frac")),
        fmt_num(r.get("GFLOPs"), ".4g"), fmt_pct(r.get("flop_frac")),
    ]


def _table(header, rows, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes else "a large buffer"


def ceilings_text(c: dict) -> list:
    """The measured ceilings, each with what was measured (the reference the % columns are
    against)."""
    out = []
    if c.get("cpu_copy_GBps") is not None:
        threads = c.get("cpu_copy_threads")
        out.append(f"CPU copy {c['cpu_copy_GBps']:.1f} GB/s (numpy copyto of {_mib(c.get('cpu_copy_bytes'))}"
                   + (f" on {threads} threads" if threads else "") + ", read + write bytes counted)")
    if c.get("cpu_sgemm_GFLOPs") is not None:
        n = c.get("cpu_sgemm_n")
        out.append(f"CPU SGEMM {c['cpu_sgemm_GFLOPs']:.1f} GFLOP/s (numpy's BLAS, float32 "
                   + (f"{n} x {n} " if n else "") + "matmul, 2 n^3 flops)")
    lib = c.get("gpu_lib") or "torch or cupy"
    n = c.get("gpu_gemm_n")
    size = f"{n} x {n} " if n else ""
    if c.get("gpu_copy_GBps") is not None:
        out.append(f"GPU copy {c['gpu_copy_GBps']:.0f} GB/s (device-to-device copy of "
                   f"{_mib(c.get('gpu_copy_bytes'))}, read + write bytes counted)")
    if c.get("gpu_sgemm_GFLOPs") is not None:
        out.append(f"GPU SGEMM {c['gpu_sgemm_GFLOPs'] / 1e3:.1f} TFLOP/s ({lib} fp32 {size}matmul)")
    if c.get("gpu_tf32_GFLOPs") is not None:
        out.append(f"GPU TF32 {c['gpu_tf32_GFLOPs'] / 1e3:.1f} TFLOP/s ({lib} TF32 {size}matmul)")
    for kind in ("cpu", "gpu"):
        if c.get(f"{kind}_ceilings_error") and c.get(f"{kind}_copy_GBps") is None:
            out.append(f"{kind.upper()} ceilings not measured ({c[kind + '_ceilings_error']})")
    return out


def render(report: dict, markdown: bool) -> str:
    """The whole result as text: machine, ceilings, results, skipped, targets."""
    m = report["machine"]
    c = report["ceilings"]
    out = []
    h = "## " if markdown else ""
    title = f"dffkit bench, suite {report['suite']!r}, {report['created']}"
    out.append(("# " if markdown else "") + title)
    out.append("")
    gpu = ", ".join(g["name"] for g in m.get("gpus", [])) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())
    blas = "; ".join(f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture')}, "
                     f"{b.get('num_threads')} threads)" for b in m.get("blas", [])
                     if b.get("user_api") == "blas") or "unknown"
    bullet = "- " if markdown else "  "
    out.append(f"{h}Machine" if markdown else "Machine")
    out.append(f"{bullet}CPU: {m['cpu_model']}, {m['cores']} cores ({' '.join(m.get('cpu_flags', []))}), "
               f"{m.get('memory_gib')} GiB; dffkit CPU threads: {m.get('dffkit_cpu_threads')}"
               + (f" ({m['dffkit_cpu_threads_from']})" if m.get("dffkit_cpu_threads_from") else ""))
    out.append(f"{bullet}GPU: {gpu}")
    out.append(f"{bullet}Libraries: {libs}; Python {m['python']}"
               + (f"; dffkit commit {m['dffkit_commit']}" if m.get("dffkit_commit") else ""))
    out.append(f"{bullet}BLAS: {blas}")
    if m.get("load_average") is not None:
        end = m.get("load_average_end")
        out.append(f"{bullet}Load average (1, 5, 15 min): at the start "
                   + ", ".join(str(x) for x in m["load_average"])
                   + ("; at the end " + ", ".join(str(x) for x in end) if end else ""))
    if m.get("cpu_pressure") is not None:
        end = m.get("cpu_pressure_end")
        out.append(f"{bullet}CPU pressure (share of time a task waited for a CPU, avg10/avg60 %): "
                   f"at the start {m['cpu_pressure'][0]}/{m['cpu_pressure'][1]}"
                   + (f"; at the end {end[0]}/{end[1]}" if end else ""))
    if m.get("environment"):
        out.append(f"{bullet}Environment: " + ", ".join(f"{k}={v}" for k, v in m["environment"].items()))
    ceil = ceilings_text(c)
    if report.get("settings", {}).get("isolate"):
        out.append(f"{bullet}Isolated: each library's contenders ran in a process of their own")
    out.append(f"{bullet}Ceilings measured in this run (the higher of before and after): "
               + (", ".join(ceil) or "not measured"))
    out.append("")
    out.append(f"{h}Problems" if markdown else "Problems")
    for p in report["problems"]:
        out.append(f"{bullet}{p['name']}: {p['description']}" + (f" ({p['note']})" if p.get("note") else ""))
    out.append("")
    out.append(f"{h}Results" if markdown else "Results")
    if markdown:
        out.append("")
    rows = [r for r in report["rows"] if r["status"] in ("ok", "flagged")]
    out.append(_table(COLUMNS, [row_cells(r) for r in rows], markdown))
    out.append("")
    out.append(("" if markdown else "") + report["legend"])
    flagged = [r for r in report["rows"] if r.get("agrees") is False]
    if flagged:
        out.append("")
        out.append("FLAGGED (disagrees with the float64 oracle after one iteration from the shared "
                   "start): " + ", ".join(f"{r['contender']} on {r['problem']} "
                                          f"(rel. diff {fmt_diff(r.get('agree_rel_diff'), '.2e')})" for r in flagged))
    def section(title, header, cells):
        out.extend(["", f"{h}{title}"] + ([""] if markdown else []))
        out.append(_table(header, cells, markdown))

    if report.get("skipped"):
        section("Skipped", ["contender", "problems", "why"],
                [[s["contender"], ", ".join(s["problems"]), s["reason"]] for s in report["skipped"]])
    errors = [r for r in report["rows"] if r["status"] == "error"]
    if errors:
        section("Errors", ["problem", "contender", "error"],
                [[r["problem"], r["contender"], r["reason"]] for r in errors])
    if report.get("targets"):
        section("Targets", ["issue", "problem", "claim", "measured", "result"],
                [[f"#{t['issue']}", t["problem"], t["text"], t["measured_text"], t["result"]]
                 for t in report["targets"]])
    return "\n".join(out) + "\n"


LEGEND = ("time: median wall time of one solve (after warm-up; GPU work synchronised; "
          "best: the fastest of the timed solves), "
          "iterations as listed (CD: iterations needed to reach the reference MU error); "
          "rel. error: reconstruction error (Frobenius norm, or sqrt(2 KL)) / ||X||_F; "
          "Δ loss vs ref: relative difference of the final error from the reference MU "
          "contender's (scikit-learn MU where present); agrees: W, H after one iteration from "
          "the shared start within tolerance of a float64 oracle (relative difference shown); "
          "vs best peer: time of the fastest MU peer / this time; GB/s: the one-pass-over-X "
          "traffic floor / time per iteration, % of the copy bandwidth measured in this run; "
          "GFLOP/s: the MU flop count / time per iteration, % of the measured GEMM rate.")

# appended to LEGEND when the report has sparse problems: their GB/s and GFLOP/s count only
# the stored entries (see bytes_per_iter and flops_per_iter in _bench_problems)
SPARSE_LEGEND = (
    " Sparse problems (scipy.sparse CSR X, nnz stored entries): the traffic floor is the stored "
    "entries read twice per iteration (by rows for the W step, by columns for the H step), "
    "each a 4-byte value and a 4-byte int32 index, plus both int64 row-pointer arrays and W, H "
    "read and written once: 2 nnz (4 + 4) + 8 (m + n + 2) + 4 * 2 (m + n) k bytes (the gathers "
    "of W's and H's rows at each entry are not counted); the flop count is the dense one with "
    "m n -> nnz: Frobenius 4 nnz k + 4 (m + n) k^2 + 3 (m + n) k, KL 8 nnz k + 2 nnz + "
    "4 (m + n) k. Sparse products run far below GEMM rates, so % GEMM is small there by "
    "nature (GB/s against the copy bandwidth says more). Their KL rel. error is scikit-learn's "
    "for sparse X (W H floored at eps at the stored entries only, the sum of W H not floored) "
    "and may exceed 1.")


def plot(report: dict, path: str) -> bool:
    """Time per iteration by problem and contender (log scale), as a PNG; False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if r["status"] in ("ok", "flagged") and r.get("time_per_iter_s")]
    problems = [p["name"] for p in report["problems"] if any(r["problem"] == p["name"] for r in rows)]
    contenders = []
    for r in rows:
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
    if not rows:
        return False
    width = 0.8 / max(1, len(contenders))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(problems) + 3), 5.5))
    cmap = plt.get_cmap("tab10")
    for j, c in enumerate(contenders):
        xs, ys = [], []
        for i, p in enumerate(problems):
            for r in rows:
                if r["problem"] == p and r["contender"] == c:
                    xs.append(i + (j - (len(contenders) - 1) / 2) * width)
                    ys.append(r["time_per_iter_s"] * 1e3)
        ax.bar(xs, ys, width=width, label=c, color=cmap(j % 10))
    ax.set_yscale("log")
    ax.set_xticks(range(len(problems)))
    ax.set_xticklabels(problems, rotation=30, ha="right")
    ax.set_ylabel("time per iteration (ms, log scale)")
    m = report["machine"]
    gpu = ", ".join(g["name"] for g in m.get("gpus", []))
    ax.set_title(f"dffkit bench '{report['suite']}': {m['cpu_model']} ({m['cores']} cores)"
                 + (f", {gpu}" if gpu else ""), fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
