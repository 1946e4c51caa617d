"""``dffkit bench`` (issue 4): the quick suite end to end, its outputs, skipped peers, and the
agreement check that flags a contender which ignores the shared start."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from dffkit import bench
from dffkit._bench_problems import ErrorMeter, Problem, oracle_step, reconstruction_error
from dffkit.cli import main as cli_main

sklearn = pytest.importorskip("sklearn")


def _seconds(text):
    value, unit = text.split()
    return float(value) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def _markdown_rows(md):
    """The results table of a Markdown report as a list of dicts (header -> cell)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| problem | contender |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite through the command line, all contenders, with every output."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"quick.{k}") for k in ("json", "md", "png")}
    rc = cli_main(["bench", "--quick", "--no-progress", "--row-cap", "60", "--repeats", "2",
                   "--json", paths["json"], "--markdown", paths["md"], "--plot", paths["png"]])
    assert rc == 0
    with open(paths["json"]) as f:
        data = json.load(f)
    with open(paths["md"]) as f:
        md = f.read()
    return data, md, paths


def test_quick_every_row_finite_and_close_to_reference(quick):
    data, _, _ = quick
    assert data["schema"] == bench.SCHEMA and data["suite"] == "quick"
    rows = data["rows"]
    assert not [r for r in rows if r["status"] == "error"], [r["reason"] for r in rows]
    problems = {p["name"] for p in data["problems"]}
    assert {p["name"] for p in data["problems"] if p["sparse"]} == {"tfidf-5k", "tfidf-5k-kl"}
    sparse_kl = {p["name"] for p in data["problems"] if p["sparse"] and p["beta"] == 1}
    # dffkit's CPU engine and scikit-learn's MU ran every problem they support
    assert {r["problem"] for r in rows if r["contender"] == "dffkit-cpu"} == problems
    assert {r["problem"] for r in rows if r["contender"] == "sklearn-mu"} == {
        p for p in problems if not p.endswith("gsnmf")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] is not None and math.isfinite(r["time_s"]) and r["time_s"] > 0
        assert len(r["times_s"]) == 2 and r["time_per_iter_s"] > 0
        # sqrt(2 KL) / ||X||_F has no bound of 1: on the sparse TF-IDF problem, 20 KL
        # iterations from a random start leave W H far below X at the stored entries
        assert math.isfinite(r["rel_error"]) and 0 < r["rel_error"] < (
            math.inf if r["problem"] in sparse_kl else 1)
        if r["solver"] == "mu":
            assert r["agrees"] is True, r
            if not r["problem"].endswith("gsnmf"):
                assert r["loss_rel_diff"] <= 1e-4, r  # float32, same start, same iterations
        else:  # CD: timed to the reference MU error
            assert r["reached"] and r["rel_error"] <= r["target_rel_error"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu_model"]
    assert data["ceilings"]["cpu_copy_GBps"] > 0 and data["ceilings"]["cpu_sgemm_GFLOPs"] > 0
    # the GSNMF vs plain target of issue 8 is evaluated
    assert any(t["issue"] == 8 and t["result"] in ("PASS", "FAIL") for t in data["targets"])


def test_quick_json_and_markdown_agree(quick):
    data, md, paths = quick
    table = _markdown_rows(md)
    ran = [r for r in data["rows"] if r["status"] in ("ok", "flagged")]
    assert len(table) == len(ran)
    for cells in table:
        r = next(x for x in ran if x["problem"] == cells["problem"]
                 and x["contender"] == cells["contender"])
        assert int(cells["iters"].split()[0]) == r["n_iter"]
        assert _seconds(cells["time"]) == pytest.approx(r["time_s"], rel=2e-3)
        assert _seconds(cells["best"]) == pytest.approx(r["time_min_s"], rel=2e-3)
        assert r["time_min_s"] <= r["time_s"]
        assert _seconds(cells["per iter"]) == pytest.approx(r["time_per_iter_s"], rel=2e-3)
        assert float(cells["rel. error"]) == pytest.approx(r["rel_error"], rel=1e-5)
        assert cells["agrees"].startswith("yes" if r["agrees"] else ("n/a" if r["agrees"] is None else "**NO**"))
    for s in data["skipped"]:
        assert s["contender"] in md and s["reason"].replace("|", "\\|") in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the plot is optional: no matplotlib, no PNG, no failure
        return
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_peers_are_skipped_with_a_reason(quick):
    data, _, _ = quick
    # the dense problems' reasons (on the sparse ones the reason is the sparse refusal)
    sparse = {p["name"] for p in data["problems"] if p["sparse"]}
    skipped = {s["contender"]: s for s in data["skipped"] if not set(s["problems"]) <= sparse}
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert "not installed" in skipped["cupy-cuda"]["reason"]
        assert not [r for r in data["rows"] if r["contender"] == "cupy-cuda"]
    import dffkit

    if "cuda" not in dffkit.available_backends():
        assert skipped["dffkit-cuda"]["reason"] == dffkit.unavailable_reasons()["cuda"]
        assert skipped["dffkit-cuda-sweep"]["reason"] == dffkit.unavailable_reasons()["cuda"]


def test_sweep_rows_only_where_auto_takes_the_gemm_engine():
    """The sweep contenders (DFFKIT_CUDA_GEMM=0 around their solves) take the large single
    Frobenius problems with k <= 64, where engine auto runs the gemm engine, and say why they skip
    the rest; an engine they do not know is refused."""
    from dffkit._bench_contenders import DffkitContender
    from dffkit._bench_problems import Problem

    c = DffkitContender("cuda", "fp32", engine="sweep")
    assert c.name == "dffkit-cuda-sweep"
    assert DffkitContender("cuda", "bf16x", engine="sweep").name == "dffkit-cuda-bf16x-sweep"
    assert c.unsupported(Problem("tall", 200000, 512, 20, 100)) is None
    assert DffkitContender("cuda").unsupported(Problem("small", 196, 512, 5, 200)) is None
    for p in (Problem("batch", 196, 512, 5, 100, batch=64), Problem("kl", 200000, 512, 20, 10, beta=1),
              Problem("small", 196, 512, 5, 200), Problem("k65", 100000, 512, 65, 10),
              Problem("gsnmf", 20000, 512, 20, 10, groups=100)):
        assert "gemm engine" in c.unsupported(p)
    with pytest.raises(ValueError, match="engine"):
        DffkitContender("cuda", engine="gemm")
    assert DffkitContender("cuda", "fp32").unsupported(Problem("batch", 196, 512, 5, 100, batch=64)) is None


class _Absent(bench.Contender):
    name = "absent-peer"

    def unavailable(self):
        return "absentlib is not installed (pip install absentlib)"


class _OwnStart(bench.Contender):
    """Plain numpy MU that ignores the shared start and draws its own."""

    name = "own-start"

    def solve(self, s, args, n_iter):
        rng = np.random.default_rng(12345)
        W = rng.random(s.W0.shape, dtype=np.float32)
        H = rng.random(s.H0.shape, dtype=np.float32)
        X = s.X
        for _ in range(n_iter):
            W *= (X @ H.T) / np.maximum(W @ (H @ H.T), 1e-7)
            H *= (W.T @ X) / np.maximum((W.T @ W) @ H, 1e-7)
        return W, H


class _SharedStart(_OwnStart):
    """The same loop from the shared start: must not be flagged."""

    name = "shared-start"

    def start(self, s):
        return s.W0.copy(), s.H0.copy()

    def solve(self, s, args, n_iter):
        W, H = args
        X = s.X
        for _ in range(n_iter):
            W *= (X @ H.T) / np.maximum(W @ (H @ H.T), np.float32(np.finfo(np.float32).eps))
            H *= (W.T @ X) / np.maximum((W.T @ W) @ H, np.float32(np.finfo(np.float32).eps))
        return W, H


def test_torch_tf32_switch_holds_for_each_contenders_own_solves(monkeypatch):
    """PyTorch's TF32 switch is process-wide and the bench times its contenders round-robin after
    all setups: each torch contender's solves run under its own setting (fp32 off, tf32 on),
    whatever the last setup or solve left, and the caller's setting comes back after. (A stand-in
    for torch: the switch and no_grad are all the solve touches besides the MU loop.)"""
    import contextlib
    from types import SimpleNamespace

    from dffkit import _bench_contenders as bc

    matmul = SimpleNamespace(allow_tf32=True)  # as a tf32 contender's run leaves it
    fake = SimpleNamespace(backends=SimpleNamespace(cuda=SimpleNamespace(matmul=matmul)),
                           no_grad=contextlib.nullcontext, clamp_min=None, sqrt=None)
    seen = []
    monkeypatch.setattr(bc, "mu_iterations", lambda *a, **kw: seen.append(matmul.allow_tf32))
    fp32, tf32 = bc.TorchContender("cuda", "fp32"), bc.TorchContender("cuda", "tf32")
    for c in (fp32, tf32):
        c._torch = fake
        monkeypatch.setattr(c, "sync", lambda: None)
    state = {"s": SimpleNamespace(problem=SimpleNamespace(beta=2.0), lam=0.0, mu=0.0), "X": None}
    fp32.solve(state, (None, None), 1)
    tf32.solve(state, (None, None), 1)
    assert matmul.allow_tf32 is True  # the caller's setting is back
    matmul.allow_tf32 = False
    tf32.solve(state, (None, None), 1)
    fp32.solve(state, (None, None), 1)
    assert seen == [False, True, True, False]
    assert matmul.allow_tf32 is False


def test_contender_ignoring_the_shared_start_is_flagged_and_absent_one_skipped():
    tiny = Problem("tiny", 120, 64, 4, 30)
    report = bench.run("quick", problems=[tiny], progress=False, measure_ceilings=False,
                       contenders=["dffkit-cpu", "sklearn-mu", _OwnStart(), _SharedStart(), _Absent()])
    own = report.row("tiny", "own-start")
    assert own["agrees"] is False and own["status"] == "flagged" and own["agree_rel_diff"] > 0.1
    assert report.flagged() == [own]
    for name in ("dffkit-cpu", "sklearn-mu", "shared-start"):
        assert report.row("tiny", name)["agrees"] is True, name
    # a flagged contender is timed but never counted as the best peer
    assert report.row("tiny", "dffkit-cpu")["best_peer"] in ("sklearn-mu", "shared-start")
    assert report.row("tiny", "absent-peer") is None
    assert report.skipped[-1] == {"contender": "absent-peer", "problems": ["tiny"],
                                  "reason": "absentlib is not installed (pip install absentlib)"}
    assert "FLAGGED" in report.to_text() and "own-start" in report.to_markdown()


def test_oracle_matches_scikit_learn_one_iteration():
    from sklearn.decomposition import non_negative_factorization as sk_nnf

    rng = np.random.default_rng(0)
    X = rng.random((30, 20))
    W0, H0 = rng.random((30, 4)), rng.random((4, 20))
    for beta, loss in ((2, "frobenius"), (1, "kullback-leibler")):
        Ws, Hs, _ = sk_nnf(X, W0.copy(), H0.copy(), n_components=4, init="custom", solver="mu",
                           beta_loss=loss, tol=0, max_iter=1)
        Wo, Ho = oracle_step(X, W0, H0, beta)
        np.testing.assert_allclose(Wo, Ws, rtol=1e-10)
        np.testing.assert_allclose(Ho, Hs, rtol=1e-10)
        err = reconstruction_error(X, Wo, Ho, beta)
        est = sklearn.decomposition.NMF(n_components=4, init="custom", solver="mu",
                                        beta_loss=loss, max_iter=1, tol=0)
        est.fit_transform(X, W=W0.copy(), H=H0.copy())
        assert err == pytest.approx(est.reconstruction_err_, rel=1e-9)


def test_group_oracle_reduces_to_plain_and_batches_broadcast():
    rng = np.random.default_rng(1)
    X = rng.random((3, 12, 10))
    W0, H0 = rng.random((3, 12, 2)), rng.random((3, 2, 10))
    Wb, Hb = oracle_step(X, W0, H0, 2)
    for b in range(3):
        Wp, Hp = oracle_step(X[b], W0[b], H0[b], 2, offsets=[0, 4, 12], lam=0.0, mu=0.0)
        np.testing.assert_allclose(Wb[b], Wp)
        np.testing.assert_allclose(Hb[b], Hp)
    Wg, _ = oracle_step(X[0], W0[0], H0[0], 2, offsets=[0, 4, 12], lam=0.5, mu=0.1)
    assert (Wg <= Wb[0] + 1e-12).all()  # the group term only shrinks W


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run("nope")
    with pytest.raises(ValueError, match="no match"):
        bench.run("quick", contenders=["no-such-contender"])
    assert re.search(r"dff-1img", "\n".join(p.name for p in bench.suites()["issue3"].problems))


@pytest.mark.parametrize("shape", [(50, 30), (3, 50, 30)])
def test_error_meter_trace_identity_matches_the_direct_error(shape):
    rng = np.random.default_rng(2)
    X = rng.random(shape).astype(np.float32)
    W = rng.random(shape[:-1] + (4,)).astype(np.float32)
    H = rng.random(shape[:-2] + (4, shape[-1])).astype(np.float32)
    direct = reconstruction_error(X, W, H, 2)
    assert ErrorMeter(X, 2).error(W, H) == pytest.approx(direct, rel=1e-10)
    assert ErrorMeter(X, 2, max_copy_bytes=0).error(W, H) == pytest.approx(direct, rel=1e-12)
    assert ErrorMeter(X, 1).relative(W, H) == pytest.approx(
        reconstruction_error(X, W, H, 1) / np.linalg.norm(X.astype(np.float64)), rel=1e-12)


def test_isolated_runs_merge_into_one_report():
    """--isolate: each library in a process of its own, rows merged and compared here."""
    report = bench.run("quick", problems=["dff-1img"], contenders=["dffkit-cpu", "sklearn-*", "cupy-cuda"],
                       isolate=True, progress=False, measure_ceilings=False)
    assert report.data["settings"]["isolate"] is True
    dk, sk = report.row("dff-1img", "dffkit-cpu"), report.row("dff-1img", "sklearn-mu")
    assert dk["status"] == sk["status"] == "ok" and dk["agrees"] and sk["agrees"]
    assert dk["reference"] == "sklearn-mu" and dk["loss_rel_diff"] <= 1e-4
    assert dk["speedup_vs_best_peer"] == pytest.approx(sk["time_s"] / dk["time_s"])
    assert report.row("dff-1img", "sklearn-cd")["reached"]
    with pytest.raises(ValueError, match="isolate"):
        bench.run("quick", problems=[Problem("tiny", 30, 20, 2, 5)], isolate=True, progress=False)


# ---------------------------------------------------------------------------------------------
# audit of `dffkit bench` / `dffkit info` (regressions)
# ---------------------------------------------------------------------------------------------

# one small problem, one contender, one timed run, no ceilings: about a second
_LIGHT = ["--quick", "--problems", "dff-1img", "--contenders", "dffkit-cpu", "--repeats", "1",
          "--no-ceilings", "--no-progress"]


class _NaNResult(bench.Contender):
    name = "nan-result"

    def solve(self, s, args, n_iter):
        return np.full_like(s.W0, np.nan), np.full_like(s.H0, np.nan)


def test_nan_agreement_is_flagged_and_rendered(tmp_path):
    """A contender whose one-iteration result is NaN: the report renders (text and Markdown),
    the row shows NO (nan) and is listed as FLAGGED; run() writes both files and returns."""
    tiny = Problem("tiny", 60, 40, 3, 10)
    paths = {"json": tmp_path / "r.json", "markdown": tmp_path / "r.md"}
    report = bench.run("quick", problems=[tiny], contenders=[_NaNResult()], progress=False,
                       measure_ceilings=False, repeats=1, **paths)
    row = report.row("tiny", "nan-result")
    assert row["agrees"] is False and row["status"] == "flagged" and row["agree_rel_diff"] is None
    assert report.flagged() == [row]
    text = report.to_text()
    assert "NO** (nan)" in text and re.search(r"FLAGGED.*nan-result on tiny \(rel\. diff nan\)", text)
    cells = _markdown_rows(paths["markdown"].read_text())
    assert cells[0]["contender"] == "nan-result" and cells[0]["agrees"] == "**NO** (nan)"
    assert json.loads(paths["json"].read_text())["rows"][0]["agree_rel_diff"] is None


def test_dffkit_rows_solve_from_the_shared_start(monkeypatch):
    """dffkit's rows (batched, single, GSNMF) start from the W0, H0 the harness hands every
    contender, and no initialisation runs inside the timed call: from a start no seed gives,
    W, H after one iteration are the float64 oracle's."""
    import dffkit.nmf
    from dffkit._bench_contenders import DffkitContender, Setup
    from dffkit._bench_problems import relative_difference

    inits = []
    real = dffkit.nmf.initialize
    for problem in (Problem("batch", 40, 30, 3, 5, batch=3), Problem("single", 40, 30, 3, 5),
                    Problem("gsnmf", 40, 30, 3, 5, groups=4, lam_rel=0.1, mu_rel=0.01)):
        X, W0, H0 = problem.make()
        W0 = (W0 * np.float32(1.7) + np.float32(0.05)).astype(np.float32)  # not any seed's init
        H0 = (H0[..., ::-1, :] + np.float32(0.01)).copy()
        offsets = problem.group_offsets()
        lam, mu = problem.penalties(X, W0, H0)
        c = DffkitContender("cpu")
        state = c.setup(Setup(problem, X, W0, H0, offsets, lam, mu))
        with monkeypatch.context() as mp:
            mp.setattr(dffkit.nmf, "initialize", lambda *a, **kw: inits.append(a) or real(*a, **kw))
            W1, H1 = c.fetch(state, c.solve(state, c.start(state), 1))
        assert inits == [], problem.name
        Wo, Ho = oracle_step(X, W0, H0, problem.beta, offsets, lam, mu)
        diff = max(relative_difference(W1, Wo), relative_difference(H1, Ho))
        assert diff <= bench.AGREE_TOL["fp32"], (problem.name, diff)


def test_machine_description_reports_the_threads_dffkit_uses(monkeypatch):
    """dffkit's thread setting (set_num_threads / DFFKIT_NUM_THREADS), not OpenMP's maximum, in
    the bench's machine description and in `dffkit info`; DFFKIT_NUM_THREADS is listed."""
    import dffkit
    from dffkit import _backends, _bench_report, info

    n = int(_backends.cpu().max_threads()) + 1  # differs from OpenMP's maximum
    monkeypatch.setenv("DFFKIT_NUM_THREADS", str(n))
    old = dffkit.get_num_threads()
    dffkit.set_num_threads(n)
    try:
        m = _bench_report.describe_machine()
        assert m["dffkit_cpu_threads"] == n and m["environment"]["DFFKIT_NUM_THREADS"] == str(n)
        assert info.describe()["cpu_threads"] == n
        dffkit.set_num_threads(0)  # OpenMP's default
        assert info.describe()["cpu_threads"] == _backends.cpu().max_threads()
    finally:
        dffkit.set_num_threads(old)


def _no_work(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("the bench started work")

    monkeypatch.setattr(bench, "_run_problem", fail)
    monkeypatch.setattr(bench, "_measure_ceilings", fail)


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    (tmp_path / "afile").write_text("")
    (tmp_path / "folder").mkdir()
    for option, path, what in (("--json", tmp_path / "afile" / "x.json", "afile"),
                               ("--markdown", tmp_path / "folder", "is a folder"),
                               ("--plot", tmp_path / "afile" / "p.png", "afile")):
        assert cli_main(["bench", *_LIGHT, option, str(path)]) == 1
        err = capsys.readouterr().err
        assert f"{option} {path}" in err and what in err, err
    with pytest.raises(OSError, match="json"):
        bench.run("quick", problems="dff-1img", json=tmp_path / "afile" / "x.json")


def test_table_printed_and_written_paths_named_when_a_later_write_fails(tmp_path, monkeypatch, capsys):
    from dffkit import _bench_report

    def broken_plot(data, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(_bench_report, "plot", broken_plot)
    ok, png = tmp_path / "ok.json", tmp_path / "p.png"
    assert cli_main(["bench", *_LIGHT, "--json", str(ok), "--plot", str(png)]) == 1
    out, err = capsys.readouterr()
    assert "Results" in out and "dffkit-cpu" in out and f"JSON: {ok}" in out
    assert "plot:" not in out and "--plot" in err and "No space left" in err
    assert json.loads(ok.read_text())["rows"][0]["contender"] == "dffkit-cpu"


def test_only_the_files_written_are_named(tmp_path, monkeypatch, capsys):
    """No plot written (no matplotlib, or no rows): no `plot: PATH` line, a `plot skipped`."""
    from dffkit import _bench_report

    monkeypatch.setattr(_bench_report, "plot", lambda data, path: False)
    png = tmp_path / "p.png"
    assert cli_main(["bench", *_LIGHT, "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "plot:" not in out and "plot skipped" in err and not png.exists()


def test_isolated_cd_row_takes_its_target_from_the_other_process():
    """--isolate without sklearn-mu: CD is timed to dffkit-cpu's error, as in one process."""
    report = bench.run("quick", problems=["dff-1img"], contenders=["dffkit-cpu", "sklearn-cd"], isolate=True,
                       progress=False, measure_ceilings=False, repeats=1)
    dk, cd = report.row("dff-1img", "dffkit-cpu"), report.row("dff-1img", "sklearn-cd")
    assert cd is not None, report.skipped
    assert cd["reached"] and cd["target_rel_error"] == pytest.approx(dk["rel_error"] * (1 + 1e-4), rel=1e-12)


def test_quick_and_another_suite_are_refused(monkeypatch, capsys):
    _no_work(monkeypatch)
    assert cli_main(["bench", "--quick", "--suite", "issue3", "--problems", "tall-50k"]) == 1
    err = capsys.readouterr().err
    assert "--quick" in err and "--suite issue3" in err


def test_negative_seed_is_refused_before_any_work(monkeypatch, capsys):
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *_LIGHT, "--seed", "-1"])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        bench.run("quick", problems=["dff-1img"], seed=-1, measure_ceilings=False, progress=False)


def test_single_string_names_and_the_save_hint(capsys):
    """A string is one name (or a comma-separated list), as on the command line; with no output
    asked for, the CLI says how to keep the results."""
    report = bench.run("quick", problems="dff-1img", contenders="dffkit-cpu,sklearn-mu", repeats=1,
                       progress=False, measure_ceilings=False)
    assert sorted((r["problem"], r["contender"]) for r in report.rows) == [
        ("dff-1img", "dffkit-cpu"), ("dff-1img", "sklearn-mu")]
    assert cli_main(["bench", *_LIGHT]) == 0
    out = capsys.readouterr().out
    tail = out.rstrip().splitlines()[-1]
    assert "--json" in tail and "--markdown" in tail and "--plot" in tail


# ---------------------------------------------------------------------------------------------
# sparse X (scipy.sparse CSR, the topic-modelling shape)
# ---------------------------------------------------------------------------------------------


def test_sparse_problem_is_deterministic_with_the_requested_shape_density_dtype():
    """The suites' TF-IDF problems: CSR float32, canonical, exactly round(density m n) entries,
    all > 0, rows of unit L2 norm, Zipf-like column popularity; the same X from the same seed,
    another from another seed; the Frobenius and KL problems of one shape share X."""
    sp = pytest.importorskip("scipy.sparse")
    from dffkit._bench_problems import sparse_tfidf

    default = {p.name: p for p in bench.suites()["default"].problems}
    quick = {p.name: p for p in bench.suites()["quick"].problems}
    for p in (default["tfidf-20k"], quick["tfidf-5k"]):
        assert p.sparse and p.density == 0.005 and p.k == 20 and not p.batch and not p.groups
        X, W0, H0 = p.make()
        X2, W2, H2 = p.make()
        assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float32
        assert X.shape == (p.m, p.n) and X.nnz == p.nnz == round(0.005 * p.m * p.n)
        assert (X.indptr == X2.indptr).all() and (X.indices == X2.indices).all()
        assert (X.data == X2.data).all() and (W0 == W2).all() and (H0 == H2).all()
        assert W0.dtype == H0.dtype == np.float32 and W0.shape == (p.m, p.k) and H0.shape == (p.k, p.n)
        copy = X.copy()
        copy.sum_duplicates()
        assert copy.nnz == X.nnz and X.has_sorted_indices  # canonical: no duplicate entries
        assert np.isfinite(X.data).all() and X.data.min() > 0
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())
        np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)
        df = np.sort(np.bincount(X.indices, minlength=p.n))[::-1]
        assert df[0] > 0.3 * p.m and df[0] > 50 * np.median(df)  # a few frequent terms, a long tail
    small = Problem("s", 400, 300, 5, 10, density=0.02)
    Xs = small.make()[0]
    assert Xs.nnz == 2400 and (small.make()[0] != Xs).nnz == 0
    Xo = dataclasses.replace(small, seed=1).make()[0]
    assert Xo.nnz == 2400 and (Xo != Xs).nnz > 0
    assert (dataclasses.replace(small, beta=1).make()[0] != Xs).nnz == 0  # KL: the same corpus
    # the generator alone: any nnz it is asked for, exactly
    for nnz in (1, 37, 6000):
        assert sparse_tfidf(np.random.default_rng(3), 100, 300, nnz, topics=3).nnz == nnz
    with pytest.raises(ValueError, match="density"):
        Problem("dense-enough", 10, 10, 2, 5, density=0.5)


def test_sparse_oracle_and_error_match_scikit_learn():
    """The oracle's one MU step on sparse X, dense (X.toarray()) and by scipy sparse products,
    agree with each other and with scikit-learn's MU on the CSR matrix; the sparse error is
    scikit-learn's reconstruction error; the error meter and ||X|| take sparse X."""
    from sklearn.decomposition import NMF
    from sklearn.decomposition import non_negative_factorization as sk_nnf

    from dffkit._bench_problems import data_norm, sparse_error

    X32, W0, H0 = Problem("s", 120, 90, 4, 1, density=0.05).make()
    X = X32.astype(np.float64)
    W0, H0 = W0.astype(np.float64), H0.astype(np.float64)
    for beta, loss in ((2, "frobenius"), (1, "kullback-leibler")):
        Ws, Hs, _ = sk_nnf(X, W0.copy(), H0.copy(), n_components=4, init="custom", solver="mu",
                           beta_loss=loss, tol=0, max_iter=1)
        Wd, Hd = oracle_step(X, W0, H0, beta)                  # dense: 120 x 90 is small
        Wp, Hp = oracle_step(X, W0, H0, beta, dense_elems=0)   # scipy sparse products
        for Wo, Ho in ((Wd, Hd), (Wp, Hp)):
            np.testing.assert_allclose(Wo, Ws, rtol=1e-10)
            np.testing.assert_allclose(Ho, Hs, rtol=1e-10)
        est = NMF(n_components=4, init="custom", solver="mu", beta_loss=loss, max_iter=1, tol=0)
        est.fit_transform(X, W=W0.copy(), H=H0.copy())
        assert sparse_error(X, Wp, Hp, beta) == pytest.approx(est.reconstruction_err_, rel=1e-9)
        assert reconstruction_error(X32, Wp, Hp, beta) == pytest.approx(est.reconstruction_err_, rel=1e-6)
        assert ErrorMeter(X32, beta).error(Wp, Hp) == pytest.approx(est.reconstruction_err_, rel=1e-6)
        if beta == 2:
            assert sparse_error(X, Wp, Hp, 2) == pytest.approx(
                reconstruction_error(X.toarray(), Wp, Hp, 2), rel=1e-9)
    assert data_norm(X32) == pytest.approx(np.linalg.norm(X.toarray()), rel=1e-12)


def test_sparse_traffic_and_flop_counts_and_dense_ones_unchanged():
    """The sparse rows' cost model (stated in bytes_per_iter / flops_per_iter and the legend);
    the dense problems' counts are the formulas they always had."""
    from dffkit._bench_problems import bytes_per_iter, flops_per_iter

    m, n, k = 20000, 10000, 20
    fro = Problem("f", m, n, k, 100, density=0.005)
    kl = Problem("k", m, n, k, 30, beta=1, density=0.005)
    z = 1_000_000
    assert fro.nnz == kl.nnz == z
    assert bytes_per_iter(fro) == bytes_per_iter(kl) == 2 * z * (4 + 4) + 8 * (m + n + 2) + 4 * 2 * (m + n) * k
    assert flops_per_iter(fro) == 4 * z * k + 4 * (m + n) * k * k + 3 * (m + n) * k
    assert flops_per_iter(kl) == 8 * z * k + 2 * z + 4 * (m + n) * k
    dense, dkl = Problem("d", 2048, 2048, 64, 30), Problem("d", 50000, 512, 20, 20, beta=1)
    assert bytes_per_iter(dense) == 4 * (2048 * 2048 + 2 * 4096 * 64)
    assert flops_per_iter(dense) == 4 * 2048 ** 2 * 64 + 4 * 4096 * 64 ** 2 + 3 * 4096 * 64
    assert flops_per_iter(dkl) == 8 * 50000 * 512 * 20 + 2 * 50000 * 512 + 4 * 50512 * 20
    b = Problem("b", 196, 512, 5, 100, batch=64)
    assert bytes_per_iter(b) == 64 * 4 * (196 * 512 + 2 * 708 * 5) and b.nnz == 196 * 512


def test_tiny_sparse_suite_rows_and_skips():
    """A small sparse problem through the harness with every contender: dffkit CPU and
    scikit-learn MU solve it from the shared start and agree with the oracle, CD is timed to the
    MU error (Frobenius), the GPU and array-library contenders are skipped for sparse X (before
    "not installed": the refusal holds on any machine); GB/s and GFLOP/s follow the sparse
    counts; the legend says how."""
    from dffkit._bench_problems import bytes_per_iter, flops_per_iter

    fro = Problem("tiny-tfidf", 600, 400, 5, 20, density=0.02)
    kl = Problem("tiny-tfidf-kl", 600, 400, 5, 10, beta=1, density=0.02)
    report = bench.run("quick", problems=[fro, kl], progress=False, measure_ceilings=False,
                       repeats=1)
    for p in (fro, kl):
        for name in ("dffkit-cpu", "sklearn-mu"):
            r = report.row(p.name, name)
            assert r is not None and r["status"] == "ok" and r["agrees"] is True, r
            assert r["agree_rel_diff"] <= 1e-5 and r["loss_rel_diff"] <= 1e-4, r
            assert r["GBps"] == pytest.approx(bytes_per_iter(p) / r["time_per_iter_s"] / 1e9)
            assert r["GFLOPs"] == pytest.approx(flops_per_iter(p) / r["time_per_iter_s"] / 1e9)
        assert "cpu-sparse" in report.row(p.name, "dffkit-cpu")["notes"]
    cd = report.row("tiny-tfidf", "sklearn-cd")
    assert cd["reached"] and cd["rel_error"] <= cd["target_rel_error"]
    assert report.row("tiny-tfidf-kl", "sklearn-cd") is None
    assert not [r for r in report.rows if r["status"] != "ok"]
    skipped = {}
    for s in report.skipped:
        skipped.setdefault(s["contender"], []).append(s)
    for name in ("dffkit-cuda", "dffkit-cuda-tf32", "dffkit-cuda-bf16x", "dffkit-cuda-sweep",
                 "dffkit-cuda-bf16x-sweep", "torch-cpu", "torch-cuda", "torch-cuda-tf32", "cupy-cuda"):
        [s] = skipped[name]
        assert s["problems"] == ["tiny-tfidf", "tiny-tfidf-kl"] and "sparse X" in s["reason"], s
        if name.startswith("dffkit-cuda"):
            assert "sparse X runs on the CPU backend" in s["reason"]
    problems = {p["name"]: p for p in report.data["problems"]}
    assert problems["tiny-tfidf"]["sparse"] and problems["tiny-tfidf"]["nnz"] == 4800
    assert "Sparse problems" in report.data["legend"] and "2 nnz (4 + 4)" in report.data["legend"]
    assert "sparse CSR (4800 entries, 2.00%)" in report.to_text()


def test_dffkit_cuda_refuses_sparse_x_as_the_skip_reason_says():
    """The reason the bench gives is dffkit's own: backend='cuda' refuses sparse X (on any machine,
    before looking for a GPU)."""
    import dffkit
    from dffkit._bench_contenders import DffkitContender

    X = Problem("s", 50, 40, 3, 1, density=0.1).make()[0]
    with pytest.raises(ValueError, match="sparse X runs on the CPU backend"):
        dffkit.non_negative_factorization(X, n_components=3, backend="cuda", max_iter=1)
    assert "sparse X runs on the CPU backend" in DffkitContender("cuda").sparse_unsupported()
    assert DffkitContender("cpu").sparse_unsupported() is None
    tiny_sparse, tiny = Problem("s", 50, 40, 3, 1, density=0.1), Problem("d", 50, 40, 3, 1)
    c = DffkitContender("cuda")
    assert bench._refusal(c, tiny_sparse, {c.name: "not built"}) == c.sparse_unsupported()
    assert bench._refusal(c, tiny, {c.name: "not built"}) == "not built"
    assert "accepts_sparse" in bench._refusal(_SharedStart(), tiny_sparse, {"shared-start": None})


def test_sparse_problems_skipped_with_the_reason_when_scipy_is_missing(monkeypatch):
    """Without scipy (an optional dependency) the sparse problems are listed, not run: one
    Skipped line for every contender, saying why; the dense problems run as before."""
    import sys

    from dffkit._bench_problems import sparse_unavailable

    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import scipy.sparse fails
    why = sparse_unavailable()
    assert why and "pip install scipy" in why
    sparse_p, dense_p = Problem("tiny-tfidf", 60, 40, 3, 5, density=0.05), Problem("tiny", 60, 40, 3, 5)
    with pytest.raises(ImportError, match="scipy"):
        sparse_p.make()
    report = bench.run("quick", problems=[sparse_p, dense_p], contenders="dffkit-cpu",
                       progress=False, measure_ceilings=False, repeats=1)
    assert [r["problem"] for r in report.rows] == ["tiny"]
    assert report.skipped == [{"contender": bench.ALL_CONTENDERS, "problems": ["tiny-tfidf"],
                               "reason": why}]
    assert [p["name"] for p in report.data["problems"]] == ["tiny-tfidf", "tiny"]
    assert "pip install scipy" in report.to_markdown()


# ---------------------------------------------------------------------------------------------
# audit 2: options, broken peers, whole files, Ctrl-C, --strict, ceilings, --list
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["--repeats", "0"], "--repeats"), (["--row-cap", "-1"], "--row-cap"),
    (["--row-cap", "0"], "--row-cap"), (["--row-cap", "nan"], "--row-cap"),
])
def test_bad_numbers_are_refused_by_the_parser(args, flag, monkeypatch, capsys):
    """--repeats 0 used to fail after the parser without naming the flag; --row-cap -1 or 0
    skipped every contender, nan skipped none: all are usage errors naming the option."""
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *_LIGHT, *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err, err


def test_empty_or_unknown_selections_name_the_option(monkeypatch, capsys):
    """`--contenders ''` or `--problems ,` used to run a bench of nothing; an unknown name's
    message now names the option and the choices."""
    _no_work(monkeypatch)
    base = ["bench", "--quick", "--no-progress", "--no-ceilings"]
    assert cli_main([*base, "--contenders", ""]) == 1
    assert "--contenders '' names no contender" in capsys.readouterr().err
    assert cli_main([*base, "--problems", ","]) == 1
    assert "--problems , names no problem" in capsys.readouterr().err
    assert cli_main([*base, "--problems", "dff-1img,nope"]) == 1
    err = capsys.readouterr().err
    assert "--problems dff-1img,nope: no match for 'nope'" in err and "tall-10k" in err, err
    assert cli_main([*base, "--contenders", "sklearn-xx"]) == 1
    err = capsys.readouterr().err
    assert "--contenders sklearn-xx" in err and "sklearn-mu" in err, err


@pytest.mark.parametrize("kw, match", [
    (dict(repeats=2.5), "repeats must be a positive integer"),
    (dict(repeats=True), "repeats must be a positive integer"),
    (dict(repeats="3"), "repeats must be a positive integer"),
    (dict(row_cap_s=float("nan")), "row_cap_s must be a number of seconds > 0"),
    (dict(row_cap_s=-1), "row_cap_s must be a number of seconds > 0"),
    (dict(row_cap_s="10"), "row_cap_s must be a number of seconds > 0"),
    (dict(problems=[]), "names no problem"),
    (dict(contenders=""), "names no contender"),
    (dict(contenders=[]), "names no contender"),
])
def test_run_checks_its_arguments_before_any_work(kw, match, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=match):
        bench.run("quick", progress=False, **kw)


def test_run_refuses_a_suite_that_is_neither_name_nor_suite(monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(TypeError, match="suite must be a suite name"):
        bench.run(3, progress=False)


def test_peer_whose_import_fails_is_skipped_with_the_reason(monkeypatch):
    """scikit-learn installed but broken (its import fails): listed under Skipped with the
    import error and what to do, like a missing peer, not as two Errors rows."""
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)  # import fails, spec found
    tiny = Problem("tiny", 60, 40, 3, 5)
    report = bench.run("quick", problems=[tiny], contenders="dffkit-cpu,sklearn-*", repeats=1,
                       progress=False, measure_ceilings=False)
    assert [r["contender"] for r in report.rows] == ["dffkit-cpu"]
    assert report.rows[0]["status"] == "ok"
    reasons = {s["contender"]: s["reason"] for s in report.skipped}
    for name in ("sklearn-mu", "sklearn-cd"):
        assert "scikit-learn is installed but does not import" in reasons[name], reasons
        assert "pip install scikit-learn" in reasons[name]
    assert "Errors" not in report.to_text()


def test_missing_peers_in_a_fresh_process_give_no_traceback(tmp_path):
    """scikit-learn, PyTorch, CuPy and matplotlib whose imports fail (a sitecustomize blocks
    them): the bench runs dffkit, lists the peers as skipped with the reason, says why there is
    no plot, and exits 0 without a traceback."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import builtins\n"
        "_real = builtins.__import__\n"
        "_blocked = ('sklearn', 'torch', 'cupy', 'matplotlib')\n"
        "def _imp(name, *a, **kw):\n"
        "    if name.split('.')[0] in _blocked:\n"
        "        raise ImportError(f'{name} blocked by the test')\n"
        "    return _real(name, *a, **kw)\n"
        "builtins.__import__ = _imp\n")
    here = os.path.dirname(os.path.dirname(os.path.abspath(bench.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), here]))
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "dffkit", "bench", *_LIGHT, "--contenders",
                          "dffkit-cpu,sklearn-*,torch-cpu,cupy-cuda", "--json", str(out),
                          "--plot", str(tmp_path / "p.png")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "plot skipped" in res.stderr, res.stderr
    data = json.loads(out.read_text())
    assert [r["contender"] for r in data["rows"]] == ["dffkit-cpu"]
    reasons = {s["contender"]: s["reason"] for s in data["skipped"]}
    assert set(reasons) == {"sklearn-mu", "sklearn-cd", "torch-cpu", "cupy-cuda"}, reasons
    assert all("pip install" in why for why in reasons.values()), reasons
    assert not (tmp_path / "p.png").exists()


class _HalfWrite:
    """A file whose write stores half the text and then is interrupted (Ctrl-C)."""

    def __init__(self, path, mode="r", *a, **kw):
        self.f = open(path, mode, *a, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        raise KeyboardInterrupt


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """Ctrl-C while a result file is written used to leave it truncated (the previous results
    gone, the new ones half there); now it is the old file, whole, and no temporary file."""
    tiny = Problem("tiny", 60, 40, 3, 5)
    report = bench.run("quick", problems=[tiny], contenders="dffkit-cpu", repeats=1,
                       progress=False, measure_ceilings=False)
    old = tmp_path / "r.json"
    old.write_text('{"previous": true}\n')
    old.chmod(0o640)
    monkeypatch.setattr(bench, "open", _HalfWrite, raising=False)
    with pytest.raises(KeyboardInterrupt):
        report.write(json=old)
    assert old.read_text() == '{"previous": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()
    # a complete write replaces it, keeping its permissions; through a symbolic link, the target
    link = tmp_path / "link.json"
    link.symlink_to(old.name)
    assert report.write(json=link) == [str(link)]
    assert link.is_symlink() and json.loads(old.read_text())["rows"][0]["problem"] == "tiny"
    assert old.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "r.json"]


def test_interrupted_or_failed_run_leaves_no_new_folders(tmp_path, monkeypatch, capsys):
    """The folders made for --json/--markdown/--plot before the run are removed again (when
    empty) after Ctrl-C or an error; an existing folder stays."""
    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_run_problem", interrupt)
    out = tmp_path / "new" / "deeper"
    assert cli_main(["bench", *_LIGHT, "--json", str(out / "r.json"),
                     "--markdown", str(tmp_path / "new" / "r.md")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(bench, "_run_problem", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        bench.run("quick", problems="dff-1img", progress=False, measure_ceilings=False,
                  json=out / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_plot_format_checked_first_and_the_named_file_written(tmp_path, monkeypatch, capsys):
    """--plot out.txt used to fail after the whole run; --plot out (no extension) wrote
    out.png but named `out`."""
    pytest.importorskip("matplotlib")
    with monkeypatch.context() as mp:
        _no_work(mp)
        assert cli_main(["bench", *_LIGHT, "--plot", str(tmp_path / "new" / "out.txt")]) == 1
        err = capsys.readouterr().err
        assert "--plot" in err and "'.txt'" in err and "out.png" in err, err
        assert list(tmp_path.iterdir()) == []
    plain = tmp_path / "out"
    assert cli_main(["bench", *_LIGHT, "--plot", str(plain)]) == 0
    assert f"plot: {plain}" in capsys.readouterr().out
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Broken(bench.Contender):
    name = "broken"

    def solve(self, s, args, n_iter):
        raise RuntimeError("kernel exploded")


def test_strict_fails_on_a_contender_that_errored(monkeypatch, capsys):
    """--strict (for CI) used to exit 0 when a contender failed with an error (its targets
    only became n/a); now 3, saying why."""
    real = bench.default_contenders
    monkeypatch.setattr(bench, "default_contenders", lambda: real() + [_Broken()])
    args = ["bench", "--quick", "--problems", "dff-1img", "--contenders", "dffkit-cpu,broken",
            "--repeats", "1", "--no-ceilings", "--no-progress"]
    assert cli_main(args) == 0
    assert "kernel exploded" in capsys.readouterr().out  # the Errors section
    assert cli_main([*args, "--strict"]) == 3
    err = capsys.readouterr().err
    assert "--strict" in err and "broken on dff-1img failed" in err and "kernel exploded" in err


def test_ceilings_are_labelled_with_what_was_measured():
    from dffkit import _bench_report

    c = {"cpu_copy_GBps": 17.24, "cpu_copy_bytes": 64 << 20, "cpu_copy_threads": 2,
         "cpu_sgemm_GFLOPs": 35.4, "cpu_sgemm_n": 1024,
         "gpu_copy_GBps": 3900.0, "gpu_copy_bytes": 256 << 20, "gpu_sgemm_GFLOPs": 51000.0,
         "gpu_tf32_GFLOPs": 380000.0, "gpu_gemm_n": 4096, "gpu_lib": "torch"}
    assert _bench_report.ceilings_text(c) == [
        "CPU copy 17.2 GB/s (numpy copyto of 64 MiB on 2 threads, read + write bytes counted)",
        "CPU SGEMM 35.4 GFLOP/s (numpy's BLAS, float32 1024 x 1024 matmul, 2 n^3 flops)",
        "GPU copy 3900 GB/s (device-to-device copy of 256 MiB, read + write bytes counted)",
        "GPU SGEMM 51.0 TFLOP/s (torch fp32 4096 x 4096 matmul)",
        "GPU TF32 380.0 TFLOP/s (torch TF32 4096 x 4096 matmul)",
    ]
    ceilings = _bench_report.cpu_ceilings(quick=True)
    assert ceilings["cpu_copy_threads"] >= 1 and ceilings["cpu_copy_bytes"] == 64 << 20


def test_a_failing_ceiling_measurement_keeps_the_results(monkeypatch):
    """The ceilings are measured again after the problems: a failure there (out of memory for
    the copy buffers) used to lose the whole run; now it is noted and the rows stand."""
    from dffkit import _bench_report

    def no_memory(quick):
        raise MemoryError("cannot allocate 128 MiB")

    monkeypatch.setattr(_bench_report, "cpu_ceilings", no_memory)
    report = bench.run("quick", problems=[Problem("tiny", 60, 40, 3, 5)], contenders="dffkit-cpu",
                       repeats=1, progress=False)
    row = report.rows[0]
    assert row["status"] == "ok" and row["GFLOPs"] > 0 and row["flop_frac"] is None
    assert "MemoryError" in report.data["ceilings"]["cpu_ceilings_error"]
    assert "CPU ceilings not measured (MemoryError: cannot allocate 128 MiB)" in report.to_text()


def test_list_shows_the_suite_asked_for_and_survives_a_broken_peer(monkeypatch, capsys):
    class _Raises(bench.Contender):
        name = "raises-on-probe"

        def unavailable(self):
            raise RuntimeError("driver crashed")

    real = bench.default_contenders
    monkeypatch.setattr(bench, "default_contenders", lambda: real() + [_Raises()])
    assert cli_main(["bench", "--list", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "suite quick:" in out and "suite default:" not in out and "tfidf-5k" in out
    assert re.search(r"raises-on-probe +skipped: RuntimeError: driver crashed", out), out
    assert cli_main(["bench", "--list"]) == 0
    assert "suite gpu:" in capsys.readouterr().out
