"""The column-split kernel's W update split over the cluster (DFFKIT_CUDA_SMALL_COLS_GATHER=1,
cuda/nmf_small_cols_kernel.cuh), on the CPU emulator: the same bits as every block updating all
of W, with skewed blocks and under ThreadSanitizer (an owner's slice of W overwritten while a
peer still copies it would be a race, or wrong numbers with skew)."""
import numpy as np
import pytest

from test_cuda_emu import COLS_CASES, _cpu_fit_full, _rel, _run_small, _sanitized, _small_problem
from test_cuda_emu import small_emu  # noqa: F401 - the fixture

GATHER_CASES = [c for c in COLS_CASES if c["C"] > 1] + [
    dict(B=1, m=60, n=40, k=4, C=2, max_iter=40, tol=5e-2),  # the stopping rule: no W update at the stop
]


def _bits(exe, tmp_path, case, gather, skew_us=0):
    case = dict(case)
    B, m, n, k, C, max_iter = (case.pop(key) for key in ("B", "m", "n", "k", "C", "max_iter"))
    X, W, H = _small_problem(B, m, n, k, seed=m + n + k)
    sub = tmp_path / ("gather" if gather else "all")
    sub.mkdir(exist_ok=True)
    return _run_small(exe, sub, X, W, H, C=C, cols=True, max_iter=max_iter, gather=gather, skew_us=skew_us,
                      **case)


@pytest.mark.parametrize("case", GATHER_CASES, ids=[f"k{c['k']}-C{c['C']}-m{c['m']}-n{c['n']}" for c in GATHER_CASES])
def test_gathered_w_update_gives_the_same_bits(small_emu, tmp_path, case):  # noqa: F811
    Wa, Ha, oa = _bits(small_emu, tmp_path, case, gather=False)
    Wg, Hg, og = _bits(small_emu, tmp_path, case, gather=True)
    assert np.array_equal(Wg, Wa) and np.array_equal(Hg, Ha) and og == oa


@pytest.mark.parametrize("C", [4, 8])
def test_gathered_w_update_with_skewed_blocks(small_emu, tmp_path, C):  # noqa: F811
    """Rank r held back r x 50 ms after every cluster barrier; rows of W not a multiple of C."""
    X, W, H = _small_problem(1, 27, 40, 5, seed=3)
    Wc, Hc, ic = _cpu_fit_full(X[0], W[0], H[0], max_iter=6)
    Wa, Ha, oa = _run_small(small_emu, tmp_path, X, W, H, C=C, cols=True, max_iter=6)
    Wg, Hg, og = _run_small(small_emu, tmp_path, X, W, H, C=C, cols=True, max_iter=6, skew_us=50000,
                            gather=True)
    assert np.array_equal(Wg, Wa) and np.array_equal(Hg, Ha) and og == oa
    assert _rel(Wg[0], Wc) <= 3e-6 and _rel(Hg[0], Hc) <= 3e-6


def test_gathered_w_update_under_thread_sanitizer(tmp_path_factory, tmp_path):
    exe = _sanitized(tmp_path_factory, "thread", "small_emu.cpp")
    X, W, H = _small_problem(1, 30, 37, 5, seed=1)
    Wc, Hc, ic = _cpu_fit_full(X[0], W[0], H[0], max_iter=3)
    for C in (2, 4):
        Wg, Hg, outs = _run_small(exe, tmp_path, X, W, H, C=C, cols=True, max_iter=3, gather=True)
        assert _rel(Wg[0], Wc) <= 3e-6 and _rel(Hg[0], Hc) <= 3e-6
