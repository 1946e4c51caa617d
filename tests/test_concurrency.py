"""dffkit embedded in a service: calls from many threads at once, the thread setting, Ctrl-C
and other signals, shared and pickled models, leaks and warnings (CPU backend).

No timing assertions: the timeouts only turn a deadlock or a GIL held for a whole fit into a
failure instead of a hung run.
"""
import concurrent.futures as cf
import copy
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import dffkit
from dffkit import _backends
from dffkit.nmf import ConvergenceWarning

DEADLOCK = 120  # seconds: far beyond any of these calls, short of a hung test run


def _same(a, b):
    """Bit-for-bit equality of nested results (arrays, numbers, NMFResult-like tuples)."""
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def _problems():
    rng = np.random.default_rng(7)
    shapes = [(60, 40), (33, 70), (120, 25), (1100, 256)]  # the last runs OpenMP teams
    out = [rng.random(s).astype(d) for s in shapes for d in (np.float32, np.float64)]
    for X in out:
        X.setflags(write=False)  # shared by every thread: a write would fail loudly
    return out


def _job(i, Xs):
    """One call of a public entry point; which one, on which problem, follows from i."""
    X = Xs[i % len(Xs)]
    kind = i % 6
    big = X.shape[0] > 1000
    iters = 10 if big else 40
    if kind == 0:
        m = dffkit.NMF(4, init="random", random_state=i, max_iter=iters, backend="cpu").fit(X)
        return [m.components_, m.transform(X), m.n_iter_, m.reconstruction_err_]
    if kind == 1:
        W, H, n = dffkit.non_negative_factorization(
            X, n_components=3, init="nndsvda", random_state=i, max_iter=iters,
            beta_loss="kullback-leibler", backend="cpu")
        return [W, H, n]
    if kind == 2:  # mixed shapes and dtypes in one batch
        out = dffkit.nmf_batched([X, Xs[(i + 1) % len(Xs)], X[:20]], 3, random_state=i,
                                 max_iter=iters, backend="cpu")
        return [v for W, H, r in out for v in (W, H, r.n_iter, r.error_init, r.error)]
    if kind == 3:
        W, H, n = dffkit.non_negative_factorization(
            sp.csr_matrix(np.where(X > 0.6, X, 0)), n_components=5, init="random",
            random_state=i, max_iter=iters, alpha_W=0.01, backend="cpu")
        return [W, H, n]
    if kind == 4:
        m = X.shape[0]
        W, H, n = dffkit.group_sparse_nmf(X, {"offsets": [0, m // 3, m]}, 4, lam=0.05, mu=0.01,
                                          init="random", random_state=i, max_iter=iters,
                                          backend="cpu")
        return [W, H, n]
    return list(dffkit.initialize(X, 3, init="nndsvdar", random_state=i)) + list(
        dffkit.initialize(X, 3, init="random", random_state=i))


def _run_threaded(fn, n_jobs, n_threads=8):
    with cf.ThreadPoolExecutor(n_threads) as ex:
        futures = [ex.submit(fn, i) for i in range(n_jobs)]
        return [f.result(timeout=DEADLOCK) for f in futures]


# ---------------------------------------------------------------------------------------------
# many threads at once
# ---------------------------------------------------------------------------------------------

def test_calls_from_eight_threads_give_the_bits_of_the_same_calls_one_at_a_time():
    Xs = _problems()
    n = 48
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alone = [_job(i, Xs) for i in range(n)]
        together = _run_threaded(lambda i: _job(i, Xs), n)
    assert [i for i in range(n) if not _same(alone[i], together[i])] == []
    # the callers' arrays are read, never written
    assert all(_same(a, b) for a, b in zip(Xs, _problems()))


def test_the_thread_setting_changed_during_concurrent_fits_changes_no_bits():
    # set_num_threads is read once per call: a change from another thread mid-flight gives
    # the call one setting or the other, and the bits do not depend on it
    Xs = _problems()
    n = 24
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alone = [_job(i, Xs) for i in range(n)]
        before = dffkit.get_num_threads()
        stop = threading.Event()
        seen = set()

        def toggle():
            values = [0, 1, 2, 3]
            i = 0
            while not stop.is_set():
                dffkit.set_num_threads(values[i % 4])
                with pytest.raises(ValueError):  # bad values raise in their thread, change nothing
                    dffkit.set_num_threads(-1)
                seen.add(dffkit.get_num_threads())
                i += 1

        t = threading.Thread(target=toggle)
        t.start()
        try:
            together = _run_threaded(lambda i: _job(i, Xs), n)
        finally:
            stop.set()
            t.join(DEADLOCK)
            dffkit.set_num_threads(before)
    assert not t.is_alive()
    assert seen <= {0, 1, 2, 3}
    assert [i for i in range(n) if not _same(alone[i], together[i])] == []


def test_a_fitted_model_serves_transform_on_many_threads():
    rng = np.random.default_rng(3)
    for X in (rng.random((150, 40)).astype(np.float32), rng.random((150, 40)),
              sp.random(150, 40, density=0.3, format="csr", random_state=1)):
        model = dffkit.NMF(5, init="random", random_state=0, max_iter=60, tol=0,
                           backend="cpu").fit(X)
        H = model.components_.copy()
        params = model.get_params()
        batches = [X[i * 10:(i + 1) * 10 + 5] for i in range(12)]
        alone = [model.transform(b) for b in batches]
        together = _run_threaded(lambda i: model.transform(batches[i % 12]), 48)
        assert all(_same(alone[i % 12], w) for i, w in enumerate(together))
        assert _same(model.components_, H) and model.get_params() == params


# ---------------------------------------------------------------------------------------------
# the GIL, Ctrl-C and other signals (in a child process: a signal and a hung fit stay there)
# ---------------------------------------------------------------------------------------------

_SIGNAL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time, warnings
    import numpy as np, scipy.sparse as sp, dffkit
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    X = rng.random((400, 120)).astype(np.float32)
    X64 = rng.random((300, 90))
    S = sp.random(800, 300, density=0.05, format="csr", random_state=0, dtype=np.float32)
    W0, H0 = rng.random((400, 5)).astype(np.float32), rng.random((5, 120)).astype(np.float32)
    copies = [a.copy() for a in (X, X64, W0, H0)]
    model = dffkit.NMF(5, init="random", random_state=0, max_iter=20, backend="cpu").fit(X)
    model.set_params(max_iter=10**7, tol=0)
    forever = dict(max_iter=10**7, tol=0, backend="cpu")

    def probe():  # a short fit: the next call after an interrupt must give these bits
        return dffkit.non_negative_factorization(X, n_components=4, init="random",
                                                 random_state=1, max_iter=15, backend="cpu")
    reference = probe()
    calls = {
        "fit": lambda: dffkit.non_negative_factorization(
            X, W0, H0, n_components=5, init="custom", **forever),
        "kl float64": lambda: dffkit.non_negative_factorization(
            X64, n_components=5, init="random", beta_loss="kullback-leibler", **forever),
        "sparse": lambda: dffkit.non_negative_factorization(
            S, n_components=6, init="random", **forever),
        "batched": lambda: dffkit.nmf_batched([X, X[:100], X64], 4, random_state=0, **forever),
        "batched of one": lambda: dffkit.nmf_batched([X], 4, random_state=0, **forever),
        "transform": lambda: model.transform(X),
        "estimator fit": lambda: dffkit.NMF(5, init="random", **forever).fit(X),
        "group-sparse": lambda: dffkit.group_sparse_nmf(
            X, {"offsets": [0, 100, 400]}, 4, lam=0.1, init="random", **forever),
    }
    main = threading.main_thread().ident
    for name in (sys.argv[1:] or calls):
        started, sent = threading.Event(), []

        def interrupter():
            started.wait()
            for _ in range(100):   # pure Python, each step needs the GIL: about 0.2 s
                time.sleep(0.002)
            sent.append(time.perf_counter())
            signal.pthread_kill(main, signal.SIGINT)

        t = threading.Thread(target=interrupter)
        t.start()
        started.set()
        try:
            calls[name]()
            outcome = "returned"
        except KeyboardInterrupt:
            outcome = "interrupted"
        latency = time.perf_counter() - sent[0] if sent else None
        t.join()
        after = probe()
        print(json.dumps({
            "call": name, "outcome": outcome, "latency_s": latency,
            "next_call_same": all(np.array_equal(a, b) for a, b in zip(reference[:2], after[:2]))
                              and reference[2] == after[2],
            "inputs_unchanged": all(np.array_equal(a, b) for a, b in zip(copies, (X, X64, W0, H0))),
            "threads": threading.active_count(),
        }), flush=True)

    # a handler that raises its own exception (a deadline): that exception, not a wrong result
    class Deadline(Exception):
        pass
    def alarm(signum, frame):
        raise Deadline()
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        calls["fit"]()
        outcome = "returned"
    except Deadline:
        outcome = "deadline"
    # a handler that does not raise: the fit goes on to the bits it gives undisturbed
    hits = []
    signal.signal(signal.SIGUSR1, lambda s, f: hits.append(s))
    stop = threading.Event()
    def spam():
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.003)
    kw = dict(n_components=5, init="random", random_state=2, max_iter=3000, tol=0, backend="cpu")
    quiet = dffkit.non_negative_factorization(X64, **kw)
    t = threading.Thread(target=spam)
    t.start()
    noisy = dffkit.non_negative_factorization(X64, **kw)
    stop.set()
    t.join()
    print(json.dumps({"deadline": outcome, "usr1_hits": len(hits),
                      "usr1_same": all(np.array_equal(a, b) for a, b in zip(quiet[:2], noisy[:2]))
                                   and quiet[2] == noisy[2]}), flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs signal.pthread_kill")
def test_every_entry_point_releases_the_gil_and_stops_at_ctrl_c(tmp_path):
    # In the child, a pure-Python thread needs the GIL about 100 times before it sends SIGINT:
    # were the GIL held during the engine's work, it could not, and the fit of 10**7
    # iterations would run into the timeout. Each call must raise KeyboardInterrupt (latencies
    # measured: 0.4-56 ms; the engine polls every 50 ms) and leave the inputs as they were, and
    # the next call must give the bits it gave before any interrupt.
    script = tmp_path / "signals.py"
    script.write_text(_SIGNAL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             env=env, timeout=DEADLOCK + 60)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the failure this test guards
        pytest.fail(f"a fit held the GIL or ignored SIGINT; output so far: {exc.stdout!r}")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    *calls, last = lines
    assert len(calls) == 8
    for rec in calls:
        assert rec["outcome"] == "interrupted", rec
        assert rec["next_call_same"] and rec["inputs_unchanged"], rec
        assert rec["threads"] == 1, rec
    assert last["deadline"] == "deadline"
    assert last["usr1_same"]


# ---------------------------------------------------------------------------------------------
# copies of a fitted model
# ---------------------------------------------------------------------------------------------

def _transform_pickled(blob, X):
    return pickle.loads(blob).transform(X)


def test_a_pickled_model_transforms_the_same_in_a_spawned_process_and_as_a_deepcopy():
    rng = np.random.default_rng(4)
    models, data = [], []
    for X in (rng.random((80, 30)).astype(np.float32), rng.random((80, 30)),
              sp.random(80, 30, density=0.4, format="csr", random_state=2)):
        models.append(dffkit.NMF(4, init="nndsvda", random_state=0, max_iter=50, tol=0,
                                 backend="cpu").fit(X))
        data.append(X)
    here = [m.transform(X) for m, X in zip(models, data)]
    for m, X, W in zip(models, data, here):
        assert _same(copy.deepcopy(m).transform(X), W)
        assert _same(pickle.loads(pickle.dumps(m)).transform(X), W)
    with mp.get_context("spawn").Pool(1) as pool:  # the child gets this sys.path
        there = [pool.apply_async(_transform_pickled, (pickle.dumps(m), X)).get(DEADLOCK)
                 for m, X in zip(models, data)]
    assert all(_same(a, b) for a, b in zip(here, there))


# ---------------------------------------------------------------------------------------------
# leaks
# ---------------------------------------------------------------------------------------------

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tasks():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_two_thousand_small_fits_grow_neither_memory_nor_threads():
    rng = np.random.default_rng(5)
    X = rng.random((196, 512)).astype(np.float32)
    S = sp.csr_matrix(np.where(X > 0.9, X, 0))
    model = dffkit.NMF(5, init="random", random_state=0, max_iter=5, tol=0, backend="cpu").fit(X)

    def fits(n):
        for i in range(n):
            kind = i % 4
            if kind == 0:
                dffkit.non_negative_factorization(X, n_components=5, init="random",
                                                  random_state=i, max_iter=1, backend="cpu")
            elif kind == 1:
                model.transform(X)
            elif kind == 2:
                dffkit.non_negative_factorization(S, n_components=5, init="random",
                                                  random_state=i, max_iter=1, backend="cpu")
            else:
                dffkit.nmf_batched([X[:50], X[50:]], 3, random_state=i, max_iter=1,
                                   backend="cpu")
            if i % 100 == 0:  # failed calls too
                with pytest.raises(ValueError):
                    dffkit.non_negative_factorization(-X, n_components=5, backend="cpu")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fits(200)  # warm: allocator arenas, libgomp's pool
        rss, tasks, active = _rss_bytes(), _tasks(), threading.active_count()
        fits(2000)
        grown = _rss_bytes() - rss
        # W and H alone of 2000 fits would be 28 MB, X's copies 800 MB
        assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB"
        assert (_tasks(), threading.active_count()) == (tasks, active)
        # threads that used the engine and ended leave no OpenMP workers behind (libgomp ends
        # a finished thread's workers without waiting for them: they go within milliseconds)
        tasks = _tasks()
        for _ in range(10):
            _run_threaded(lambda i: fits(2), 8, n_threads=4)
        assert threading.active_count() == active
        deadline = time.monotonic() + DEADLOCK
        while _tasks() > tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _tasks() == tasks


# ---------------------------------------------------------------------------------------------
# warnings
# ---------------------------------------------------------------------------------------------

def test_one_convergence_warning_per_call_from_any_thread_and_the_warnings_state_kept():
    rng = np.random.default_rng(6)
    X = rng.random((60, 30)).astype(np.float32)
    calls = [
        lambda: dffkit.non_negative_factorization(X, n_components=3, init="random",
                                                  random_state=0, max_iter=5, backend="cpu"),
        lambda: dffkit.NMF(3, init="random", random_state=0, max_iter=5, backend="cpu").fit(X),
        lambda: dffkit.nmf_batched([X] * 5, 3, random_state=0, max_iter=5, backend="cpu"),
        lambda: dffkit.group_sparse_nmf(X, {"offsets": [0, 30, 60]}, 3, lam=0.1, init="random",
                                        max_iter=5, backend="cpu"),
    ]
    filters, show = list(warnings.filters), warnings.showwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_threaded(lambda i: calls[i % 4](), 32)
    # one per call (a batch of five problems: one naming them), nothing else
    assert len(caught) == 32
    assert all(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert sum("5 of 5 problems" in str(w.message) for w in caught) == 8
    # the calls change neither the filters nor the display of warnings
    for call in calls:
        with pytest.warns(ConvergenceWarning):
            call()
    assert warnings.filters == filters and warnings.showwarning is show


def test_cluster_activations_leaves_the_warnings_of_other_threads_alone():
    rng = np.random.default_rng(8)
    A = rng.random((6, 8, 4, 4)).astype(np.float32)
    X = rng.random((40, 20)).astype(np.float32)
    other = []

    def progress(done, total):
        if done == 1:  # inside cluster_activations' GSNMF restarts: another thread's fit
            t = threading.Thread(target=lambda: other.append(dffkit.non_negative_factorization(
                X, n_components=3, init="random", random_state=0, max_iter=5, backend="cpu")))
            t.start()
            t.join(DEADLOCK)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dffkit.cluster_activations(A, 2, n_init=1, max_iter=1000, tol=0.5, backend="cpu",
                                   progress=progress)
    assert len(other) == 1
    # the other thread's fit stopped at max_iter=5: its warning must reach this thread's record,
    # not be counted as one of cluster_activations' own unconverged runs
    messages = [str(w.message) for w in caught]
    assert any("Maximum number of iterations 5 reached" in m for m in messages), messages
    assert not any("GSNMF runs stopped" in m for m in messages), messages


def test_callers_quieting_convergence_warnings_quiet_their_own_thread_only():
    # DFF and the clustering report convergence themselves and quiet the NMF calls they make;
    # with warnings.catch_warnings (process-wide) that silenced other threads' warnings too
    from dffkit.nmf import _no_convergence_warnings

    X = np.random.default_rng(3).random((30, 12)).astype(np.float32)
    fit = lambda: dffkit.non_negative_factorization(X, n_components=2, init="random", random_state=0,
                                                    max_iter=3, tol=1e-12, backend="cpu")
    inside, go, finished = threading.Event(), threading.Event(), threading.Event()

    def quiet_thread():
        with _no_convergence_warnings():
            inside.set()
            go.wait(DEADLOCK)
            fit()  # stops at max_iter: no warning from this thread
        finished.set()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=quiet_thread)
        t.start()
        assert inside.wait(DEADLOCK)
        fit()  # this thread's warning, while the other is quiet
        go.set()
        t.join(DEADLOCK)
    assert finished.is_set()
    hits = [w for w in caught if "Maximum number of iterations 3" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:  # the switch is off again after it
        warnings.simplefilter("always")
        fit()
    assert len(caught) == 1


# ---------------------------------------------------------------------------------------------
# the engine's first load
# ---------------------------------------------------------------------------------------------

def test_first_loads_on_two_threads_keep_the_openmp_spin_setting(monkeypatch):
    # Each first load sets GOMP_SPINCOUNT for libgomp to read while the engine is imported, and
    # removes it after. Before the fix, thread B's load of the CPU engine found the setting
    # made by thread A's load of the CUDA module, left it to A, and A removed it before B's
    # import had loaded libgomp: the engine ran with libgomp's default spinning.
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(_backends, "_modules", {})
    monkeypatch.setattr(_backends, "_reasons", {})
    a_importing, b_importing = threading.Event(), threading.Event()
    seen = {}

    def import_module(name):
        if name == "dffkit._cuda":
            a_importing.set()
            b_importing.wait(1.0)  # before the fix, B's import began meanwhile
            raise ImportError("not built here")
        b_importing.set()
        a.join(DEADLOCK)  # A is done, and has put the environment back
        seen[name] = os.environ.get("GOMP_SPINCOUNT")
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=import_module))
    a = threading.Thread(target=_backends._load, args=("cuda",))
    b = threading.Thread(target=_backends._load, args=("cpu",))
    a.start()
    assert a_importing.wait(DEADLOCK)
    b.start()
    b.join(DEADLOCK)
    assert not a.is_alive() and not b.is_alive()
    assert seen == {"dffkit._cpu": _backends.GOMP_SPINCOUNT}
    assert _backends._modules["cuda"] is None and "not built here" in _backends._reasons["cuda"]
    assert os.environ.get("GOMP_SPINCOUNT") is None


def test_many_threads_loading_the_engine_at_once_load_it_once(monkeypatch):
    # before the fix, every thread that came while the first import ran imported (and, for
    # CUDA, probed the device) again
    monkeypatch.setattr(_backends, "_modules", {})
    monkeypatch.setattr(_backends, "_reasons", {})
    loads = []
    real = _backends.importlib.import_module

    def import_module(name):
        loads.append(name)
        time.sleep(0.05)  # a first import takes a while (the CUDA probe: seconds)
        return real(name)

    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=import_module))
    barrier = threading.Barrier(8)

    def first_use(i):
        barrier.wait(DEADLOCK)
        return _backends.cpu() if i % 2 else _backends.available_backends()

    out = _run_threaded(first_use, 8)
    assert loads.count("dffkit._cpu") == 1
    assert all(o is out[1] for o in out[1::2])
    assert all(o == out[0] for o in out[0::2])
