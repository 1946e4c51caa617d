"""The CUDA engine's fixed-order sums (cuda/nmf_sums.cuh: init="random"'s mean of X, float64's
||X||^2, ``_cuda.fixed_order_sum``) on the CPU emulator (cuda/emu/cuda_emu.hpp), against the
order the CPU engine defines (cpp/nmf_mu_cpu.cpp, chunked_sum): 4096 consecutive values added
one after another in float64, then the chunk sums one after another. Bit for bit, on values
whose sum depends on the order. That the GPU's random init equals the CPU engine's, bits
included, is tests/test_cuda.py's."""
import subprocess

import numpy as np
import pytest
from emu_harness import build

CHUNK = 4096


@pytest.fixture(scope="module", params=[("-O2",), ("-O1", "-g", "-fsanitize=thread")], ids=["O2", "tsan"])
def sums_emu(request, tmp_path_factory):
    """tests/emu/sums_emu.cpp compiled (products not contracted into FMAs: the reference rounds
    each square); under ThreadSanitizer too, where it works here."""
    return build(tmp_path_factory, "sums_emu.cpp", flags=(*request.param, "-ffp-contract=off"))


def _run(exe, tmp_path, X, step="chunks", square=False):
    X = np.ascontiguousarray(X)
    B, count = X.shape
    meta = {"dtype": "f32" if X.dtype == np.float32 else "f64", "B": B, "count": count,
            "square": int(square), "step": step}
    (tmp_path / "meta.txt").write_text("".join(f"{k} {v}\n" for k, v in meta.items()))
    X.tofile(tmp_path / "X.bin")
    done = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    totals = np.fromfile(tmp_path / "totals.bin", np.float64)
    parts = np.fromfile(tmp_path / "parts.bin", np.float64) if step == "chunks" else None
    return totals, parts


def _in_order(values) -> float:
    """sum(values) added one after another in float64 (np.cumsum is a left-to-right scan)."""
    values = np.asarray(values, np.float64)
    return float(np.cumsum(values)[-1]) if values.size else 0.0


def _reference(x, square):
    v = x.astype(np.float64)
    if square:
        v = v * v
    parts = [_in_order(v[c:c + CHUNK]) for c in range(0, v.size, CHUNK)]
    return _in_order(parts), parts


def _order_sensitive(rng, shape, dtype):
    """Values over 16 orders of magnitude, both signs' worth of cancellation: a sum whose bits
    change when the order of the additions does."""
    mag = 10.0 ** rng.uniform(-8, 8, shape)
    return (mag * rng.choice([1.0, 1.0, 1.0, -0.999], shape)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("B,count", [(1, 1), (1, 31), (1, 3 * CHUNK + 17), (3, 1000), (2, CHUNK)])
def test_ordered_sums_are_the_cpu_engines_order(sums_emu, tmp_path, dtype, square, B, count):
    rng = np.random.default_rng(count + B)
    X = _order_sensitive(rng, (B, count), dtype)
    totals, parts = _run(sums_emu, tmp_path, X, square=square)
    nc = -(-count // CHUNK)
    for b in range(B):
        want, want_parts = _reference(X[b], square)
        np.testing.assert_array_equal(parts[b * nc:(b + 1) * nc], want_parts)
        assert totals[b] == want, (b, totals[b], want)
    if count >= 64:  # the same values in another order give other bits: the test can tell
        orders = [X[0][::-1], np.sort(X[0]), rng.permutation(X[0])]
        assert any(_reference(o.copy(), square)[0] != _reference(X[0], square)[0] for o in orders)


def test_ordered_total_over_many_chunk_sums(sums_emu, tmp_path):
    """ordered_total_kernel alone over more than a warp's width of chunk sums (several tiles of
    32, and a partial one), per problem."""
    rng = np.random.default_rng(7)
    parts = _order_sensitive(rng, (2, 70), np.float64)
    totals, _ = _run(sums_emu, tmp_path, parts, step="total")
    assert [float(t) for t in totals] == [_in_order(p) for p in parts]
    assert _in_order(parts[0][::-1]) != _in_order(parts[0])


def test_cpu_engine_mean_is_this_order():
    """The order the references above assume is the CPU engine's: its init="random" W is
    sqrt(mean / k) |N| with the mean summed in ``_reference``'s order, bit for bit. |N| comes
    from X = 4 everywhere (64 x 256 values: an exact sum, a scale of exactly 1 at k = 4)."""
    from dffkit import _backends

    cpu = _backends.cpu()
    m, n, k, seed = 64, 256, 4, 11
    X = np.abs(_order_sensitive(np.random.default_rng(3), (m, n), np.float64))
    W, H = np.empty((m, k)), np.empty((k, n))
    cpu.random_init(X, W, H, seed, 1)
    N_W, N_H = np.empty((m, k)), np.empty((k, n))
    cpu.random_init(np.full((m, n), 4.0), N_W, N_H, seed, 1)
    total = _reference(X.reshape(-1), False)[0]
    scale = np.sqrt(total / X.size / k)
    np.testing.assert_array_equal(W, scale * N_W)
    np.testing.assert_array_equal(H, scale * N_H)
    other = np.sqrt(_in_order(np.sort(X.reshape(-1))) / X.size / k)  # another order: other bits
    assert other != scale and not np.array_equal(W, other * N_W)
