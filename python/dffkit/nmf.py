"""Non-negative matrix factorization with multiplicative updates: the public API.

``non_negative_factorization`` and ``NMF`` mirror scikit-learn's (solver="mu") so that a user
switches by changing an import; ``backend`` chooses the engine. X (m x n) ~ W (m x k) H (k x n):
rows of X are samples, ``W`` is what ``transform`` returns, ``H`` is ``components_``.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import numbers
import os
import math
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, field

import numpy as np

from dffkit import _backends

__all__ = [
    "non_negative_factorization",
    "NMF",
    "NMFResult",
    "nmf_batched",
    "ConvergenceWarning",
    "initialize",
    "set_num_threads",
    "get_num_threads",
]

try:  # scikit-learn's warning class when it is installed, so filters written for it apply
    from sklearn.exceptions import ConvergenceWarning
except ImportError:  # pragma: no cover - exercised only without scikit-learn

    class ConvergenceWarning(UserWarning):
        """The solver stopped at max_iter before meeting tol."""


_INITS = ("random", "nndsvd", "nndsvda", "nndsvdar", "custom")
_BACKENDS = ("auto", "cpu", "cuda")
_PRECISIONS = ("fp32", "tf32", "bf16x")
# Above this many elements of X, "auto" sends host data to a GPU: the copy is paid back.
_AUTO_CUDA_MIN_ELEMENTS = 2_000_000
# The engines take max_iter and the thread count as C ints.
_C_INT_MAX = 2**31 - 1
# More threads than any one machine runs: a larger request is a mistake (each OpenMP thread is
# an OS thread; libgomp aborts the process when it cannot create them).
_MAX_THREADS = 4096


_quiet = threading.local()


class _no_convergence_warnings:
    """Within it, this thread's NMF calls give no ConvergenceWarning (the caller reports
    convergence itself: DFF, the clustering). A thread-local switch: warnings.catch_warnings
    changes the process's filters, so another thread's warnings would be lost or caught."""

    def __enter__(self):
        self._before = getattr(_quiet, "on", False)
        _quiet.on = True
        return self

    def __exit__(self, *exc):
        _quiet.on = self._before
        return False


def _warn_convergence(message, stacklevel):
    """A ConvergenceWarning ``stacklevel`` frames above the caller, unless this thread is in
    _no_convergence_warnings."""
    if not getattr(_quiet, "on", False):
        warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


def _threads_from_env() -> int:
    """DFFKIT_NUM_THREADS as a thread count; an unusable value warns and gives the default (0)
    instead of breaking ``import dffkit``."""
    raw = os.environ.get("DFFKIT_NUM_THREADS", "")
    text = raw.strip()
    if not text:
        return 0
    try:
        n = int(text)
    except ValueError:
        n = -1
    if 0 <= n <= _MAX_THREADS:
        return n
    warnings.warn(
        f"DFFKIT_NUM_THREADS={raw!r} is not a thread count: set it to an integer from 0 to "
        f"{_MAX_THREADS} (0 or unset: OpenMP's default, OMP_NUM_THREADS or all cores); "
        "using OpenMP's default",
        RuntimeWarning,
        stacklevel=2,
    )
    return 0


# CPU threads for the engine: 0 = OpenMP's default (OMP_NUM_THREADS or all cores).
_NUM_THREADS = _threads_from_env()


def set_num_threads(n: int) -> None:
    """CPU threads the engine may use (0: OpenMP's default), an integer from 0 to 4096.
    Results do not depend on it.

    On a machine whose cores are shared with other busy processes, fewer threads can be much
    faster: each iteration ends at a barrier that waits for the slowest thread. More threads
    than cores only slow it down, and each Python thread that calls the engine keeps an OpenMP
    pool of its own of that many threads (a service with 8 worker threads and n = 64 holds 512).
    The environment variable DFFKIT_NUM_THREADS sets the starting value.
    """
    global _NUM_THREADS
    _check_real("n", n, low=-math.inf, integer=True)
    if not 0 <= n <= _MAX_THREADS:
        raise InvalidParameterError(
            f"set_num_threads: n must be an integer from 0 to {_MAX_THREADS} (0: OpenMP's "
            f"default, OMP_NUM_THREADS or all cores), got {n!r}"
        )
    _NUM_THREADS = int(n)


def get_num_threads() -> int:
    """The engine's CPU thread setting (0: OpenMP's default)."""
    return _NUM_THREADS


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _beta_from(beta_loss) -> int:
    names = {"frobenius": 2, "kullback-leibler": 1}
    if isinstance(beta_loss, str):
        if beta_loss in names:
            return names[beta_loss]
        if beta_loss == "itakura-saito":
            raise ValueError(
                "beta_loss='itakura-saito' is not supported by dffkit; use 'frobenius' or "
                "'kullback-leibler' (or scikit-learn's NMF for other beta divergences)"
            )
    elif isinstance(beta_loss, numbers.Real) and not isinstance(beta_loss, bool):
        if float(beta_loss) in (1.0, 2.0):
            return int(beta_loss)
    raise InvalidParameterError(
        f"beta_loss must be 'frobenius' (2) or 'kullback-leibler' (1), got {beta_loss!r}"
    )


class InvalidParameterError(ValueError, TypeError):
    """A parameter of the wrong type or value. Both a ValueError and a TypeError, like
    scikit-learn's InvalidParameterError: code that catches either around scikit-learn's NMF
    catches dffkit's errors too."""


def _check_real(name, value, low=0.0, low_inclusive=True, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a real number"
        raise InvalidParameterError(
            f"{name} must be {what}, got {value!r} of type {type(value).__name__}")
    # ints are finite (np.isfinite cannot take one past int64, e.g. max_iter=10**30)
    if not isinstance(value, numbers.Integral) and not np.isfinite(value):
        raise InvalidParameterError(f"{name} must be finite, got {value!r}")
    if value < low or (value == low and not low_inclusive):
        op = ">=" if low_inclusive else ">"
        bound = int(low) if integer else low
        raise InvalidParameterError(f"{name} must be {op} {bound}, got {value!r}")
    return value


def _check_flag(name, value):
    """A bool (or numpy bool): scikit-learn refuses update_H='False' and the like, which Python
    would read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidParameterError(
            f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def _check_verbose(verbose):
    """verbose as scikit-learn takes it: a bool or an int >= 0."""
    if isinstance(verbose, (bool, np.bool_)):
        return int(verbose)
    return int(_check_real("verbose", verbose, integer=True))


def _check_max_iter(max_iter) -> int:
    """max_iter as the engines take it: an int >= 0; values past the C int range are clipped to
    its largest value (2**31 - 1). scikit-learn accepts any int, and such a max_iter means
    'until tol stops it' either way: the engine cannot run 2**31 iterations in practice."""
    _check_real("max_iter", max_iter, integer=True)
    return min(int(max_iter), _C_INT_MAX)


def _check_option(name, value, options, allow_none=False):
    """value if it is one of the strings options (or None when allow_none), else a ValueError
    that lists exactly the accepted values (never numpy's 'truth value of an array')."""
    if value is None and allow_none:
        return value
    if isinstance(value, str) and value in options:
        return value
    accepted = ", ".join(repr(o) for o in options) + (" or None" if allow_none else "")
    raise InvalidParameterError(f"{name} must be one of {accepted}; got {value!r}")


def _is_auto(n_components) -> bool:
    return n_components is None or (isinstance(n_components, str) and n_components == "auto")


def _check_n_components(n_components, allow_auto=False):
    """n_components as an int >= 1 (or None / 'auto' where allow_auto); a clear error naming
    n_components otherwise (a float such as 2.7 is refused, not truncated)."""
    if allow_auto and _is_auto(n_components):
        return n_components
    what = "a positive integer" + (" (or 'auto' / None)" if allow_auto else "")
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral):
        raise InvalidParameterError(
            f"n_components must be {what}, got {n_components!r} of type "
            f"{type(n_components).__name__}"
        )
    if n_components < 1:
        raise InvalidParameterError(f"n_components must be {what} (>= 1), got {n_components!r}")
    return int(n_components)


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise InvalidParameterError(
            f"backend must be one of {_BACKENDS}, got {backend!r}; available here: "
            f"{_backends.available_backends()}"
        )
    return backend


def _is_sparse(X) -> bool:
    """Whether X is a scipy.sparse matrix or array (scipy is not imported for the question: a
    scipy sparse object means scipy is loaded already)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and bool(sparse.issparse(X))


def _check_sparse_ndim(X, name="X"):
    """A ValueError naming the fix for a scipy.sparse array that is not 2-D (scipy's coo_array
    may be 1-D or n-D)."""
    shape = tuple(int(d) for d in X.shape)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be 2-D (samples x features), got a {len(shape)}-D scipy.sparse "
            f"array of shape {shape}; reshape it, e.g. {name}.reshape(1, -1) for one sample"
        )


def _check_sparse_structure(X, name="X"):
    """A ValueError for a compressed (CSR/CSC/BSR), COO or LIL matrix whose index arrays do not
    describe its shape (an edited indptr, an index out of range, a LIL row with more indices
    than values), before scipy's own C++ routines read them: given such arrays, those write out
    of bounds and end the process, or read past a row's values. A ValueError too for a
    scipy.sparse array that is not 2-D."""
    fmt = getattr(X, "format", None)
    _check_sparse_ndim(X, name)
    m, n = (int(d) for d in X.shape)

    def bad(why):
        more = (f" (scipy's {name}.check_format(full_check=True) says more)"
                if hasattr(X, "check_format") else "")
        return ValueError(
            f"{name} is a malformed scipy.sparse {fmt} matrix: {why}. Rebuild it with the "
            f"scipy.sparse constructor{more}"
        )

    if fmt in ("csr", "csc", "bsr"):
        R, C = X.blocksize if fmt == "bsr" else (1, 1)
        major, minor = (m // R, n // C) if fmt != "csc" else (n, m)
        indptr, indices, data = np.asarray(X.indptr), np.asarray(X.indices), np.asarray(X.data)
        if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
            raise bad(f"its indptr and indices must be integers, got {indptr.dtype} and "
                      f"{indices.dtype}")
        if indptr.ndim != 1 or indptr.size != major + 1:
            raise bad(f"indptr has {indptr.size} entries, not {major + 1}")
        if indptr.size and (indptr[0] != 0 or np.any(np.diff(indptr) < 0)):
            raise bad("indptr does not start at 0 and rise")
        nnz = int(indptr[-1]) if indptr.size else 0
        stored = data.shape[0] if data.ndim else 0
        if nnz > min(indices.size, stored):
            raise bad(f"indptr ends at {nnz}, past the {indices.size} stored indices and "
                      f"{stored} stored values")
        if nnz and (indices[:nnz].min() < 0 or indices[:nnz].max() >= minor):
            raise bad(f"an index is outside [0, {minor})")
    elif fmt == "lil":
        # scipy's tocsr trusts these lists: an index past the width ends the process later (in
        # the transpose), a row with fewer values than indices is read past its end (garbage)
        rows, vals = X.rows, X.data
        if len(rows) != m or len(vals) != m:
            raise bad(f"it has {len(rows)} index lists and {len(vals)} value lists for {m} rows")
        counts = np.fromiter(map(len, rows), dtype=np.int64, count=m)
        differ = np.flatnonzero(counts != np.fromiter(map(len, vals), dtype=np.int64, count=m))
        if differ.size:
            row = int(differ[0])
            raise bad(f"row {row} has {len(rows[row])} indices but {len(vals[row])} values")
        if counts.sum():
            cols = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                               count=int(counts.sum()))
            if cols.min() < 0 or cols.max() >= n:
                raise bad(f"an index is outside [0, {n})")
    elif fmt == "coo":
        coords = getattr(X, "coords", None) or (X.row, X.col)
        if len(coords) != 2 or any(np.asarray(c).shape != (X.data.size,) for c in coords):
            raise bad("its coordinate arrays do not match its data")
        for c, size in zip(coords, (m, n)):
            c = np.asarray(c)
            if c.size and (c.min() < 0 or c.max() >= size):
                raise bad(f"a coordinate is outside [0, {size})")


def _is_canonical_csr(X, dtype) -> bool:
    """Whether X is a CSR matrix of dtype whose arrays dffkit can read in place: consistent
    indptr, column indices increasing within each row, no stored zeros. Checked on the arrays
    (not X.has_canonical_format: reading that caches flags on the caller's object, and a cached
    flag can be stale after the caller edits the arrays)."""
    if getattr(X, "format", None) != "csr" or X.dtype != dtype:
        return False
    indptr, indices, data = X.indptr, X.indices, X.data
    m = X.shape[0]
    if indptr.shape != (m + 1,) or indptr[0] != 0 or indptr[-1] != indices.size or indices.size != data.size:
        return False
    if np.any(np.diff(indptr) < 0) or np.any(data == 0):
        return False
    if indices.size > 1:
        rising = np.diff(indices) > 0
        starts = indptr[1:-1]
        rising[starts[(starts > 0) & (starts < indices.size)] - 1] = True  # a new row may drop
        if not rising.all():
            return False
    return True


class _CheckedX(np.ndarray):
    """A dense X that _as_float_matrix has checked (C-contiguous float32/float64, finite, >= 0):
    the estimators' _validate hands it to _solve, which does not pass over it again. A view
    of the caller's array (never written), or the checked copy."""


def _checked(X) -> "_CheckedX":
    return X.view(_CheckedX)


class _SparseX:
    """Sparse X as the CPU engine takes it: canonical CSR (sorted column indices, duplicates
    summed, stored zeros dropped), float32/float64 data (integers become
    float64), int32 indices, int64 indptr, and the same matrix by columns for the H step.

    The caller's object is never modified: a CSR matrix of float32/float64 already in
    canonical form (sorted, no duplicates, no stored zeros) is read in place; anything else is
    copied first (scipy's sum_duplicates and sort_indices work in place, so they run on our
    copy only). The transpose is a second copy of the entries, made for the H step.
    """

    def __init__(self, X, name="X", whom="NMF"):
        _check_sparse_ndim(X, name)
        m, n = (int(d) for d in X.shape)
        if m == 0 or n == 0:
            raise ValueError(f"{name} is empty (shape {(m, n)}); it needs at least one row and one column")
        if n > 2**31 - 1 or m > 2**31 - 1:
            raise ValueError(
                f"sparse {name} has shape {(m, n)}, but the sparse engine indexes rows and "
                f"columns with 32-bit integers (at most 2**31 - 1 each): keep only the columns "
                f"(or rows) that hold entries, e.g. {name}[:, {name}.getnnz(axis=0) > 0], or "
                f"use fewer features"
            )
        dtype = np.dtype(X.dtype)
        if dtype.kind == "c":
            raise TypeError(
                f"{name} must be real, got complex dtype {dtype}: pass {name}.real (or "
                f"abs({name})) if that is what is meant"
            )
        if dtype.kind not in "fiub":
            raise TypeError(f"{name} must be numeric, got dtype {dtype}")
        if dtype not in (np.float32, np.float64):
            dtype = np.dtype(np.float64)
        _check_sparse_structure(X, name)
        if _is_canonical_csr(X, dtype):
            csr = X  # canonical already: read in place (never written), no copy of the entries
        else:
            # the dtype first, then the sums: integer duplicates are summed in float64 (as
            # scipy's X.astype(np.float64) sums them, and NMF's validation), never wrapped
            csr = X.tocsr(copy=True) if X.dtype == dtype else X.astype(dtype).tocsr(copy=False)
            csr.sum_duplicates()  # sorts the indices too
            csr.eliminate_zeros()  # stored zeros change no iterate; dropped, they cost nothing
        data = _check_values(np.ascontiguousarray(csr.data), name, whom, sparse=True)
        self.shape, self.dtype = (m, n), dtype
        self.matrix = csr  # scipy CSR, for the NNDSVD start and the mean
        self._rows = (np.ascontiguousarray(csr.indptr, dtype=np.int64),
                      np.ascontiguousarray(csr.indices, dtype=np.int32), data, m, n)
        self._cols = None

    def rows(self):
        """(indptr, indices, data, m, n) of X."""
        return self._rows

    def cols(self):
        """(indptr, indices, data, n, m) of X^T (built on first use)."""
        if self._cols is None:
            t = self.matrix.T.tocsr()
            t.sort_indices()
            m, n = self.shape
            self._cols = (np.ascontiguousarray(t.indptr, dtype=np.int64),
                          np.ascontiguousarray(t.indices, dtype=np.int32),
                          np.ascontiguousarray(t.data, dtype=self.dtype), n, m)
        return self._cols

    def mean(self) -> float:
        return float(self.matrix.mean())


def _as_float_matrix(X, name="X", whom="NMF"):
    """X as a C-contiguous float32/float64 2-D numpy array (int -> float64, like scikit-learn).

    The caller's array is never written: a copy is made when the dtype or layout must change;
    otherwise the result may share the caller's memory (read only by dffkit).
    """
    if _is_sparse(X):
        raise TypeError(
            f"{name} is a sparse matrix; {whom} needs dense data: pass {name}.toarray() "
            "(non_negative_factorization and NMF take scipy.sparse X on the CPU backend)"
        )
    if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
        raise TypeError(
            f"{name} is a {type(X).__module__}.{type(X).__name__}, which dffkit does not read: "
            f"pass {name}.toarray() (or a scipy.sparse matrix)"
        )
    arr = _numeric_array(X, name)
    if arr.ndim == 0:
        raise ValueError(
            f"{name} must be a 2-D array (samples x features), got {type(X).__name__} "
            f"{X!r:.60}"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (samples x features), got {arr.ndim}-D with shape {arr.shape}; "
            "reshape it, e.g. X.reshape(-1, n_features)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); it needs at least one row and one column")
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return _check_values(np.ascontiguousarray(arr), name, whom)


def _numeric_array(X, name):
    """np.asarray(X), with numbers held as Python objects (pandas' nullable Int64/Float64/boolean
    columns, mixed-dtype frames, object arrays of numbers) converted to float64 as scikit-learn's
    check_array converts them; missing values (pd.NA, None) become NaN and are refused later as
    NaN. Anything else in an object array is a TypeError."""
    if not isinstance(X, np.ndarray) and hasattr(X, "to_numpy") and hasattr(X, "dtypes"):
        dtypes = getattr(X, "dtypes")
        kinds = {np.dtype(d).kind if isinstance(d, np.dtype) else "O" for d in
                 (dtypes if hasattr(dtypes, "__iter__") else [dtypes])}
        if "O" in kinds or len(kinds) > 1:  # extension dtypes, or mixed columns
            try:
                return X.to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name} must be numeric; converting it to float64 failed: {exc}") from None
    arr = np.asarray(X)
    if arr.dtype == object:
        try:
            is_missing = np.frompyfunc(lambda v: v is None or _is_missing(v), 1, 1)
            # np.asarray: on a 0-d array (X=None, say) frompyfunc returns a Python bool
            missing = np.asarray(is_missing(arr)).astype(bool)
            return np.where(missing, np.nan, arr).astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be numeric, got an object array whose values are not all numbers "
                f"({exc})") from None
    return arr


def _is_missing(v) -> bool:
    """pandas' NA (or NaT) without importing pandas."""
    return type(v).__name__ in ("NAType", "NaTType")


def _check_values(values, name, whom, sparse=False):
    """values (X, or a sparse X's stored entries) if finite and >= 0; else the error."""
    if not np.isfinite(values).all():
        raise ValueError(f"Input {name} contains NaN or infinity; remove or impute those entries")
    if values.size and values.min() < 0:
        fix = ("shift or clip the data first" if not sparse else
               f"clip the stored values (a copy with {name}.data clipped at 0; shifting would "
               f"fill every zero), or make them >= 0 where they are made (e.g. "
               f"HashingVectorizer(alternate_sign=False))")
        raise ValueError(
            f"Negative values in data passed to {whom} ({name}): NMF needs {name} >= 0; {fix}"
        )
    return values


def _check_factor(A, shape, dtype, name, why="with init='custom'"):
    if A is None:
        raise ValueError(f"{name} is required {why}: pass an array of shape {tuple(shape)}")
    if _is_sparse(A):  # numpy would read it as a 0-d object array ("got shape ()")
        raise TypeError(
            f"{name} is a scipy.sparse matrix; the factors W and H are dense (the updates fill "
            f"them): pass {name}.toarray()"
        )
    if _is_device_array(A):  # a GPU factor: checked on the device, copied by the CUDA backend
        from dffkit import _cuda_backend

        if tuple(_cuda_backend.shape_of(A)) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(_cuda_backend.shape_of(A))}")
        if np.dtype(_cuda_backend.dtype_of(A)) != dtype:
            raise TypeError(f"{name} must have the same dtype as X ({dtype}), got {_cuda_backend.dtype_of(A)}")
        lo, nonfinite = _cuda_backend.check_values(A)
        if nonfinite:
            raise ValueError(f"{name} contains NaN or infinity")
        if lo < 0:
            raise ValueError(f"Negative values in data passed to NMF ({name}): {name} must be >= 0")
        return A
    arr = np.asarray(A)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    if arr.dtype != dtype:
        raise TypeError(
            f"{name} must have the same dtype as X ({dtype}), got {arr.dtype}; "
            f"convert it with {name}.astype(X.dtype)"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity")
    if arr.min() < 0:
        raise ValueError(f"Negative values in data passed to NMF ({name}): {name} must be >= 0")
    if not arr.any():
        raise ValueError(
            f"{name} is all zeros: multiplicative updates cannot move away from zero; "
            "use another initialisation"
        )
    return np.array(arr, dtype=dtype, order="C", copy=True)  # ours to update in place


def _seed_from(random_state) -> int:
    """A 64-bit Philox key from None / int / numpy RandomState or Generator. None draws it from
    numpy's global RandomState, as scikit-learn's check_random_state(None) does: np.random.seed
    makes the start reproducible."""
    _check_random_state(random_state)
    if random_state is None or random_state is np.random:
        random_state = np.random.mtrand._rand
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1)) * 2**32 + int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    return int(random_state) & 0xFFFFFFFFFFFFFFFF


def _legacy_random_state(random_state):
    """numpy's legacy RandomState for the NNDSVD inits, as scikit-learn's check_random_state
    gives it: None (or the np.random module) -> np.random's global RandomState, an int ->
    a new RandomState(int), a RandomState -> itself (its stream goes on).

    Beyond scikit-learn (which refuses them): an int >= 2**32 (dffkit's seeds are 64-bit) ->
    RandomState(MT19937(int)), a numpy Generator -> a RandomState seeded from it."""
    if random_state is None or random_state is np.random:
        return np.random.mtrand._rand
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise InvalidParameterError(f"random_state must be >= 0, got {random_state}")
        if random_state < 2**32:
            return np.random.RandomState(int(random_state))
        return np.random.RandomState(np.random.MT19937(int(random_state)))
    if isinstance(random_state, np.random.RandomState):
        return random_state
    if isinstance(random_state, np.random.Generator):
        return np.random.RandomState(np.random.MT19937(int(random_state.integers(0, 2**63 - 1))))
    raise InvalidParameterError(
        f"random_state must be None, an int, a numpy RandomState or Generator; got {random_state!r}"
    )


def _check_random_state(random_state):
    """random_state's errors (those of _seed_from) without drawing from it: for calls that may
    not need a random number (init='custom', update_H=False), as scikit-learn checks it there
    too."""
    if random_state is None or random_state is np.random or isinstance(
            random_state, (np.random.RandomState, np.random.Generator)):
        return random_state
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise InvalidParameterError(f"random_state must be >= 0, got {random_state}")
        return random_state
    raise InvalidParameterError(
        f"random_state must be None, an int, a numpy RandomState or Generator; got {random_state!r}"
    )


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------

def _finite(result) -> bool:
    """Whether a solve's errors are finite (not: its numbers left their dtype's range)."""
    return math.isfinite(result.error) and math.isfinite(result.error_init)


def _overflow_error(whom, name, dtype, X=None, others=()):
    """The error for a factorization whose numbers left the range of dtype (X too large);
    others: further problems of a batch that overflowed."""
    top = ""
    if isinstance(X, np.ndarray) and X.size:
        top = f" (its largest value is {float(np.max(X)):.3g})"
    if others:
        top += f"; so did {', '.join(others[:5])}{', ...' if len(others) > 5 else ''} ({len(others)} more)"
    wider = f" or pass {name} as float64" if np.dtype(dtype) != np.float64 else ""
    return ValueError(
        f"{whom}: the factorization of {name} overflowed {np.dtype(dtype).name}{top}: the updates "
        f"multiply {name} by the factors and their products, which leave the range of "
        f"{np.dtype(dtype).name}. Scale {name} down (e.g. {name} / {name}.max(); W H scales "
        f"with it){wider}"
    )


# NNDSVD's SVD: scikit-learn's randomized SVD, step for step ---------------------------------
#
# scikit-learn's _initialize_nmf takes the SVD of X from
# sklearn.utils.extmath._randomized_svd(X, n_components, random_state=random_state) with its
# defaults; the functions below mirror that code as scikit-learn 1.9 has it (checked against
# 1.9.1). Earlier releases (>= 1.2) run the same algorithm with the same random draws; what
# differs there is the order of some products (B = (M^T Q)^T), a rounding-level difference,
# and svd_flip's sign choice, which NNDSVD does not see (it takes a singular pair's positive
# or negative part, whichever is larger). They use scipy.linalg where scipy is installed, as
# scikit-learn does (so the results agree to the last bits), and numpy's QR/SVD otherwise
# (the same subspace; rounding-level differences).

def _scipy_linalg():
    try:
        from scipy import linalg
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return None
    return linalg


def _range_finder(A, size, n_iter, random_state, linalg):
    """scikit-learn's _randomized_range_finder with power_iteration_normalizer='auto' (LU for
    n_iter > 2, none otherwise): an orthonormal basis Q of A's dominant range."""
    Q = random_state.normal(size=(A.shape[1], size))
    if A.dtype == np.float32:  # float32 computation for float32 A, as scikit-learn does
        Q = Q.astype(np.float32, copy=False)
    if linalg is not None:
        def qr(M):
            return linalg.qr(M, mode="economic", check_finite=False)[0]

        def lu(M):
            return linalg.lu(M, permute_l=True, check_finite=False)[0]
    else:  # numpy only: QR spans what LU spans
        def qr(M):
            return np.linalg.qr(M, mode="reduced")[0]

        lu = qr
    normalize = lu if n_iter > 2 else (lambda M: M)
    for _ in range(n_iter):
        Q = normalize(A @ Q)
        Q = normalize(A.T @ Q)
    return qr(A @ Q)


def _svd_flip(u, v, u_based_decision=True):
    """scikit-learn's svd_flip (>= 1.5): the largest-magnitude entry of each column of u (or
    each row of v) made positive. Works in place, like the original."""
    if u_based_decision:
        signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    else:
        signs = np.sign(v[np.arange(v.shape[0]), np.argmax(np.abs(v), axis=1)])
    u *= signs[np.newaxis, :]
    v *= signs[:, np.newaxis]
    return u, v


def _randomized_svd(M, n_components, random_state, linalg="scipy"):
    """scikit-learn's _randomized_svd(M, n_components, random_state=random_state) with its
    defaults: n_oversamples=10, n_iter='auto' (7 if n_components < 0.1 min(M.shape), else 4),
    power_iteration_normalizer='auto' (LU), transpose='auto' (when M is wider than tall),
    flip_sign=True, lapack_driver='gesdd'. random_state: None, int or RandomState (Generator:
    see _legacy_random_state). float32 M is decomposed in float32, as scikit-learn does."""
    if isinstance(linalg, str):
        linalg = _scipy_linalg()
    random_state = _legacy_random_state(random_state)
    n_random = n_components + 10
    n_samples, n_features = M.shape
    n_iter = 7 if n_components < 0.1 * min(M.shape) else 4
    transpose = n_samples < n_features
    if transpose:
        M = M.T
    Q = _range_finder(M, n_random, n_iter, random_state, linalg)
    B = Q.T @ M
    if linalg is not None:
        Uhat, s, Vt = linalg.svd(B, full_matrices=False, lapack_driver="gesdd")
    else:
        Uhat, s, Vt = np.linalg.svd(B, full_matrices=False)
    del B
    U = Q @ Uhat
    U, Vt = _svd_flip(U, Vt, u_based_decision=not transpose)
    if transpose:
        return Vt[:n_components, :].T, s[:n_components], U[:, :n_components].T
    return U[:, :n_components], s[:n_components], Vt[:n_components, :]


def _norm(x):
    """scikit-learn's NMF norm: sqrt(x . x) as a Python float."""
    x = np.ravel(x, order="K")
    return math.sqrt(np.dot(x, x))


def _resolve_init(init, k, m, n):
    """scikit-learn's rule for init=None: 'nndsvda' if k <= min(m, n), else 'random'."""
    if init is None:
        return "nndsvda" if k <= min(m, n) else "random"
    return init


def initialize(X, n_components, init="random", random_state=None, eps=1e-6):
    """Initial (W, H) for X (numpy or scipy.sparse, float32/float64) following
    scikit-learn's definitions.

    ``random`` draws sqrt(mean(X)/k) |N(0,1)| from dffkit's Philox stream (the same bits on
    every backend for one seed); the NNDSVD variants follow scikit-learn's formulas: from the
    same random_state (None, an int or a numpy RandomState, used as scikit-learn's
    check_random_state uses it) ``nndsvd``, ``nndsvda`` and ``nndsvdar`` give scikit-learn's
    ``_initialize_nmf`` start to rounding, float32 X in float32 as there. None: scikit-learn's
    rule, 'nndsvda' if n_components <= min(X.shape), else 'random'.
    """
    n_components = _check_n_components(n_components)
    if isinstance(init, str) and init == "custom":
        raise ValueError(
            "init='custom' is not an initialization method: initialize computes a start with "
            "'random', 'nndsvd', 'nndsvda' or 'nndsvdar' (None: scikit-learn's choice). To "
            "start from your own factors, pass them to non_negative_factorization(X, W, H, "
            "init='custom')"
        )
    _check_option("init", init, _INITS[:-1], allow_none=True)
    _check_real("eps", eps)
    sparse = X if isinstance(X, _SparseX) else _SparseX(X) if _is_sparse(X) else None
    X = sparse.matrix if sparse is not None else _as_float_matrix(X)
    return _initial_factors(X, sparse, n_components, init, random_state, eps)


def _initial_factors(X, sparse, k, init, random_state, eps=1e-6):
    """initialize's work for a checked X: a C-contiguous float32/float64 array (sparse None),
    or sparse.matrix for a _SparseX; k, init and eps checked already."""
    m, n = X.shape
    init = _resolve_init(init, k, m, n)
    if init == "random":
        W = np.empty((m, k), dtype=X.dtype)
        H = np.empty((k, n), dtype=X.dtype)
        if sparse is not None:
            _backends.cpu().random_init_sparse(sparse.rows(), W, H, _seed_from(random_state))
        else:
            _backends.cpu().random_init(X, W, H, _seed_from(random_state))
        return W, H
    if k > min(m, n):
        raise ValueError(
            f"init={init!r} needs n_components <= min(n_samples, n_features) = {min(m, n)}, "
            f"got {k}; use init='random'"
        )
    if isinstance(random_state, np.random.Generator):
        # one RandomState for the SVD and nndsvdar's fill, as for a RandomState instance
        random_state = _legacy_random_state(random_state)
    elif random_state is not None:
        _legacy_random_state(random_state)  # its errors here, not as a failed SVD below
    # from here on scikit-learn's _initialize_nmf, line for line, in X's dtype
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            U, S, V = _randomized_svd(X, k, random_state)
            ok = bool(np.isfinite(S).all() and np.isfinite(U).all() and np.isfinite(V).all())
        except (np.linalg.LinAlgError, ValueError, ArithmeticError):
            ok = False
    if not ok:
        raise ValueError(
            f"init={init!r}: the SVD of X overflowed {X.dtype.name} (X's largest value is "
            f"{float(X.max()):.3g}). Scale X down (e.g. X / X.max()), "
            + ("pass X as float64, " if X.dtype != np.float64 else "")
            + "or use init='random'"
        )
    W = np.zeros_like(U)
    H = np.zeros_like(V)
    W[:, 0] = np.sqrt(S[0]) * np.abs(U[:, 0])
    H[0, :] = np.sqrt(S[0]) * np.abs(V[0, :])
    for j in range(1, k):
        x, y = U[:, j], V[j, :]
        x_p, y_p = np.maximum(x, 0), np.maximum(y, 0)
        x_n, y_n = np.abs(np.minimum(x, 0)), np.abs(np.minimum(y, 0))
        x_p_nrm, y_p_nrm = _norm(x_p), _norm(y_p)
        x_n_nrm, y_n_nrm = _norm(x_n), _norm(y_n)
        m_p, m_n = x_p_nrm * y_p_nrm, x_n_nrm * y_n_nrm
        if m_p > m_n:
            u, v, sigma = x_p / x_p_nrm, y_p / y_p_nrm, m_p
        else:
            # scikit-learn divides 0 by 0 here when a part vanishes (NaN in its W, H, from which
            # its solver cannot recover); dffkit keeps the zeros (filled below by nndsvda/nndsvdar)
            u = x_n / x_n_nrm if x_n_nrm > 0 else x_n
            v = y_n / y_n_nrm if y_n_nrm > 0 else y_n
            sigma = m_n
        lbd = np.sqrt(S[j] * sigma)
        W[:, j] = lbd * u
        H[j, :] = lbd * v
    W[W < eps] = 0
    H[H < eps] = 0
    if init == "nndsvda":
        avg = X.mean()
        W[W == 0] = avg
        H[H == 0] = avg
    elif init == "nndsvdar":
        rng = _legacy_random_state(random_state)
        avg = X.mean()
        W[W == 0] = abs(avg * rng.standard_normal(size=len(W[W == 0])) / 100)
        H[H == 0] = abs(avg * rng.standard_normal(size=len(H[H == 0])) / 100)
    return (np.ascontiguousarray(W, dtype=X.dtype), np.ascontiguousarray(H, dtype=X.dtype))


# ---------------------------------------------------------------------------------------------
# the solver entry point
# ---------------------------------------------------------------------------------------------

@dataclass
class NMFResult:
    """What a solve returns besides W and H."""

    n_iter: int
    error_init: float
    error: float
    backend: str
    precision: str = "fp32"
    objective: list = field(default_factory=list)
    #: the kernels that ran: "cpu", "cpu-sparse" (scipy.sparse X); on CUDA "resident",
    #: "resident-fast-cols" (the fast path's column-split kernel, the default for the problems it
    #: fits), "resident-fast" (its row-split kernel: larger problems, or DFFKIT_CUDA_SMALL_COLS=0),
    #: "sweep", "gemm" (two passes over X per iteration) or
    #: "gemm-fused" (one pass)
    kernel: str = ""


def _penalties(alpha_W, alpha_H, l1_ratio, m, n):
    """scikit-learn >= 1.2 scaling: the W terms scale with n_features, the H terms with n_samples."""
    _check_real("alpha_W", alpha_W)
    if isinstance(alpha_H, str):
        if alpha_H != "same":
            raise InvalidParameterError(f"alpha_H must be a real number >= 0 or 'same', got {alpha_H!r}")
        alpha_H = alpha_W
    else:
        _check_real("alpha_H", alpha_H)
    _check_real("l1_ratio", l1_ratio)
    if l1_ratio > 1:
        raise InvalidParameterError(f"l1_ratio must be in [0, 1], got {l1_ratio}")
    return (
        n * alpha_W * l1_ratio,
        n * alpha_W * (1.0 - l1_ratio),
        m * alpha_H * l1_ratio,
        m * alpha_H * (1.0 - l1_ratio),
    )


def _resolve_backend(backend, on_device, n_elements, k=None, problems=(), beta=2,
                     precision="fp32", batched=False):
    """The engine of a solve, "cpu" or "cuda". backend="auto" takes CUDA for X in GPU memory,
    and for host X of at least _AUTO_CUDA_MIN_ELEMENTS elements (all problems together) when the
    CUDA engine serves n_components k for every problem ((n_features, dtype) pairs, with the
    loss beta; batched: as nmf_batched solves them): its per-block statistics live in shared
    memory, which holds k up to _cuda_backend.max_components (the engine's own answer). Else the
    CPU, which the result's backend field then names. X in GPU memory stays there: beyond that
    limit the engine's ValueError says what to do."""
    backend = _check_backend(backend)
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        _backends.cuda()  # raises with the reason when unusable
        return "cuda"
    if "cuda" not in _backends.available_backends():
        return "cpu"
    if on_device:
        return "cuda"
    if n_elements < _AUTO_CUDA_MIN_ELEMENTS:
        return "cpu"
    if k is not None:
        from dffkit import _cuda_backend

        for n, dtype in {(int(n), np.dtype(dt)) for n, dt in problems}:
            most = _cuda_backend.max_components(n, dtype, beta=beta, precision=precision,
                                                batched=batched)
            if k > most:
                return "cpu"
    return "cuda"


# the device array whose values the caller has just checked (finite, >= 0; ``_checked_input``):
# the solvers take it without a second pass over it (one kernel and one wait for a DFF call)
_CHECKED_INPUT: "contextvars.ContextVar[object]" = contextvars.ContextVar("dffkit_checked_input", default=None)


@contextlib.contextmanager
def _checked_input(X):
    """Inside this block, ``_solve`` and ``nmf_batched`` take the device array X (this very
    object, not a copy or a view of it) as checked: its values finite and non-negative, as the
    caller (``dff``) has just found in its own pass over them. Per thread and task
    (a context variable); any other X is checked as usual."""
    token = _CHECKED_INPUT.set(X)
    try:
        yield
    finally:
        _CHECKED_INPUT.reset(token)


def _is_checked_input(X) -> bool:
    return X is not None and _CHECKED_INPUT.get() is X


def _check_device_input(X, whom: str) -> None:
    """ValueError where the device array X holds NaN, infinity or negative values (one pass on
    the device), unless the caller has just checked this very X (``_checked_input``)."""
    if _is_checked_input(X):
        return
    from dffkit import _cuda_backend

    lo, nonfinite = _cuda_backend.check_values(X)
    if nonfinite:
        raise ValueError("Input X contains NaN or infinity; remove or impute those entries")
    if lo < 0:
        raise ValueError(f"Negative values in data passed to {whom} (X): NMF needs X >= 0")


def _is_device_array(X) -> bool:
    if isinstance(X, np.ndarray):
        return False
    if not (hasattr(X, "__cuda_array_interface__") or hasattr(X, "__dlpack_device__")):
        return False
    if "cuda" not in _backends.available_backends():
        if hasattr(X, "__cuda_array_interface__"):
            raise RuntimeError(
                "X lives in GPU memory but the CUDA backend is not usable here: "
                + _backends.unavailable_reasons().get("cuda", "")
            )
        return False
    from dffkit import _cuda_backend

    return _cuda_backend.is_device_array(X)


def _solve(X, W, H, *, n_components, init, update_H, beta, tol, max_iter, penalties,
           random_state, verbose, backend, precision="fp32", groups=None, lam=0.0, mu=0.0,
           record_objective=False, whom="NMF"):
    """Validate, initialise and run one engine. Returns (W, H, NMFResult)."""
    update_H = _check_flag("update_H", update_H)
    verbose = _check_verbose(verbose)
    _check_real("tol", tol)
    max_iter = _check_max_iter(max_iter)
    _check_option("precision", precision, _PRECISIONS)
    _check_option("init", init, _INITS, allow_none=True)
    _check_backend(backend)
    _check_n_components(n_components, allow_auto=True)
    if not update_H and H is None:
        raise ValueError(
            f"{whom}: H is required when update_H=False: pass the fixed components H "
            "(n_components x n_features) to fit W against"
        )
    sparse = None
    on_device = not _is_sparse(X) and not isinstance(X, _SparseX) and _is_device_array(X)
    if isinstance(X, _SparseX) or _is_sparse(X):
        if groups is not None:
            raise TypeError(
                f"{whom}: X is a sparse matrix; group-sparse NMF needs dense data: pass "
                "X.toarray()"
            )
        if backend == "cuda":
            raise ValueError(
                f"{whom}: sparse X runs on the CPU backend; pass backend='cpu' (or 'auto'), or "
                "X.toarray() to factorize it densely on the GPU"
            )
        sparse = X if isinstance(X, _SparseX) else _SparseX(X, whom=whom)
        Xh = None
        shape, dtype = sparse.shape, sparse.dtype
    elif on_device:
        from dffkit import _cuda_backend

        if backend == "cpu":
            raise ValueError(
                "X is in GPU memory; use backend='cuda' (or 'auto'), or copy it to the host first"
            )
        shape = tuple(_cuda_backend.shape_of(X))
        dtype = np.dtype(_cuda_backend.dtype_of(X))
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"X must be a non-empty 2-D array, got shape {shape}")
        _check_device_input(X, whom)
        Xh = None
    elif type(X) is _CheckedX:  # checked by an estimator's _validate: no second pass
        Xh = X.view(np.ndarray)
        shape, dtype = Xh.shape, Xh.dtype
    else:
        Xh = _as_float_matrix(X, whom=whom)
        shape, dtype = Xh.shape, Xh.dtype
    m, n = shape
    if _is_auto(n_components):
        if init == "custom" or not update_H:
            src = H if H is not None else W
            if src is None:
                raise ValueError(
                    "init='custom' needs the initial W and H (n_components='auto' takes k "
                    "from them)"
                )
            n_components = int(np.shape(src)[0] if src is H else np.shape(src)[1])
        else:
            n_components = n
    k = _check_n_components(n_components)
    init = _resolve_init(init, k, m, n)
    if init == "nndsvd":
        warnings.warn(
            "The multiplicative update solver cannot update zeros present in the "
            "initialization; init='nndsvd' leads to poorer results. Try 'nndsvda' or 'nndsvdar'.",
            UserWarning,
            stacklevel=3,
        )
    l1_W, l2_W, l1_H, l2_H = penalties(m, n)
    engine = "cpu" if sparse is not None else _resolve_backend(
        backend, on_device, m * n, k=k, problems=[(n, dtype)], beta=beta, precision=precision)

    # initial factors: our own arrays, never the caller's
    own_factors = False
    if not update_H:
        if W is not None:
            warnings.warn("When update_H=False, the provided initial W is not used.", RuntimeWarning, stacklevel=3)
        H0 = _check_factor(H, (k, n), dtype, "H")
        if sparse is not None:
            mean = sparse.mean()
        else:
            mean = float(Xh.mean()) if Xh is not None else float(_cuda_backend.mean(X))
        W0 = np.full((m, k), np.sqrt(mean / k), dtype=dtype)
    elif init == "custom":
        W0 = _check_factor(W, (m, k), dtype, "W")
        H0 = _check_factor(H, (k, n), dtype, "H")
    else:
        if W is not None or H is not None:
            warnings.warn(
                "When init!='custom', provided W or H are ignored. Set init='custom' to use them "
                "as initialization.",
                RuntimeWarning,
                stacklevel=3,
            )
        if on_device and init == "random":
            W0, H0 = _cuda_backend.random_init(X, k, _seed_from(random_state))
            own_factors = True  # made here for this fit: updated in place, not copied
        else:
            if Xh is None and sparse is None:
                Xh = _cuda_backend.to_host(X)
                W0, H0 = initialize(Xh, k, init=init, random_state=random_state)
            else:  # X checked above: not a second pass over it (14 ms at 50000 x 512)
                W0, H0 = _initial_factors(sparse.matrix if sparse is not None else Xh, sparse, k,
                                          init, random_state)

    group_offsets = [] if groups is None else [int(g) for g in groups]
    started = time.perf_counter()
    if engine == "cpu":
        if not (isinstance(W0, np.ndarray) and isinstance(H0, np.ndarray)):
            from dffkit import _cuda_backend  # GPU factors for host data: one copy down

            W0 = W0 if isinstance(W0, np.ndarray) else _cuda_backend.to_host(W0)
            H0 = H0 if isinstance(H0, np.ndarray) else _cuda_backend.to_host(H0)
        cpu = _backends.cpu()
        params = cpu.Params()
        _fill_params(params, beta, l1_W, l2_W, l1_H, l2_H, lam, mu, max_iter, tol, update_H,
                     record_objective)
        params.verbose = 1 if verbose else 0  # scikit-learn's line at each tol test
        if sparse is not None:
            if max_iter == 0:
                err = float(cpu.beta_error_sparse(sparse.rows(), W0, H0, beta))
                info = {"n_iter": 0, "error_init": err, "error": err}
            else:
                info = cpu.fit_sparse(sparse.rows(), sparse.cols() if update_H else None, W0,
                                      H0, params)
            info["kernel"] = "cpu-sparse"
        elif max_iter == 0:
            err = float(cpu.beta_error(Xh, W0, H0, beta))
            info = {"n_iter": 0, "error_init": err, "error": err}
        else:
            info = cpu.fit(Xh, W0, H0, params, group_offsets)
        Wout, Hout = W0, H0
    else:
        from dffkit import _cuda_backend

        cuda = _backends.cuda()
        params = cuda.Params()
        _fill_params(params, beta, l1_W, l2_W, l1_H, l2_H, lam, mu, max_iter, tol, update_H,
                     record_objective)
        Wout, Hout, info = _cuda_backend.fit(X if on_device else Xh, W0, H0, params,
                                             group_offsets=group_offsets or None,
                                             precision=precision, factors_are_ours=own_factors)
    result = NMFResult(
        n_iter=int(info["n_iter"]),
        error_init=float(info["error_init"]),
        error=float(info["error"]),
        backend=engine,
        precision=precision if engine == "cuda" else "fp32" if dtype == np.float32 else "fp64",
        objective=list(info.get("objective", [])),
        kernel=str(info.get("kernel", engine)),
    )
    if not _finite(result):
        raise _overflow_error(whom, "X", dtype, Xh)
    if verbose:
        # scikit-learn's last line (the CPU engine printed one at each tol test), then ours
        if tol == 0 or result.n_iter % 10 != 0 or engine != "cpu":
            print("Epoch %02d reached after %.3f seconds." % (result.n_iter,
                                                              time.perf_counter() - started))
        print(
            f"dffkit {whom}: {engine} backend, {result.n_iter} iterations, "
            f"error {result.error_init:.6g} -> {result.error:.6g}"
        )
    if tol > 0 and result.n_iter == max_iter and max_iter > 0:
        _warn_convergence(
            f"Maximum number of iterations {max_iter} reached. Increase it to improve convergence.",
            stacklevel=3,
        )
    return Wout, Hout, result


def _fill_params(params, beta, l1_W, l2_W, l1_H, l2_H, lam, mu, max_iter, tol, update_H,
                 record_objective):
    params.beta = int(beta)
    params.l1_W, params.l2_W, params.l1_H, params.l2_H = float(l1_W), float(l2_W), float(l1_H), float(l2_H)
    params.lam, params.mu = float(lam), float(mu)
    params.max_iter = min(int(max_iter), _C_INT_MAX)
    params.tol = float(tol)
    params.update_H = bool(update_H)
    params.record_objective = bool(record_objective)
    params.num_threads = min(int(_NUM_THREADS), _C_INT_MAX)


def non_negative_factorization(
    X,
    W=None,
    H=None,
    n_components="auto",
    *,
    init=None,
    update_H=True,
    solver="mu",
    beta_loss="frobenius",
    tol=1e-4,
    max_iter=200,
    alpha_W=0.0,
    alpha_H="same",
    l1_ratio=0.0,
    random_state=None,
    verbose=0,
    shuffle=False,
    backend="auto",
    precision="fp32",
    return_info=False,
):
    """Compute W (m x k) and H (k x n) with X ~ W H by multiplicative updates.

    Same parameters and results as ``sklearn.decomposition.non_negative_factorization`` with
    ``solver="mu"``; from the same initial W and H the iterates agree to rounding.

    Parameters
    ----------
    X : array-like (m, n), non-negative
        numpy (float32 stays float32, integers become float64) on any backend, a GPU array
        (PyTorch, CuPy, anything with ``__cuda_array_interface__`` / ``__dlpack__``) for
        ``backend="cuda"``/``"auto"``, read in place, or a scipy.sparse matrix or array of
        any format (the CPU backend's sparse engine: X is read only at its stored entries;
        the caller's matrix is copied, never modified).
    W, H : arrays (m, k) and (k, n), optional
        Initial factors with ``init="custom"``; H alone (fixed) with ``update_H=False``.
        Never modified.
    n_components : int, "auto" or None
        k. "auto"/None: from W/H with init="custom", else n.
    init : {"random", "nndsvd", "nndsvda", "nndsvdar", "custom"} or None
    beta_loss : "frobenius" (2) or "kullback-leibler" (1)
    tol, max_iter : stop when the error decreased by less than tol (relative to the initial
        error) over 10 iterations, or after max_iter iterations; tol=0 runs max_iter.
    alpha_W, alpha_H, l1_ratio : scikit-learn >= 1.2 regularisation.
    backend : "auto", "cpu" or "cuda"
        "auto" uses CUDA for data already on the GPU or large enough to pay for the copy.
    precision : "fp32", "tf32" or "bf16x" (CUDA only; see the README for each mode's error).
    return_info : bool
        Also return an :class:`NMFResult` (backend used, errors, iterations).

    Returns
    -------
    W, H, n_iter  (plus the NMFResult when ``return_info``)
        numpy for numpy input; GPU arrays of the input's library for GPU input.
    """
    if not (isinstance(solver, str) and solver == "mu"):
        # 'cd' is a solver scikit-learn has and dffkit does not; anything else is no solver
        raise (ValueError if solver == "cd" else InvalidParameterError)(
            f"solver={solver!r} is not offered: dffkit implements solver='mu' (multiplicative "
            "updates); use scikit-learn for the coordinate-descent solver"
        )
    _check_flag("shuffle", shuffle)  # coordinate descent's option: MU ignores it, as scikit-learn's
    return_info = _check_flag("return_info", return_info)
    _check_random_state(random_state)  # checked even where no start is drawn, as scikit-learn does
    beta = _beta_from(beta_loss)
    Wout, Hout, info = _solve(
        X, W, H,
        n_components=n_components, init=init, update_H=update_H, beta=beta, tol=tol,
        max_iter=max_iter, penalties=lambda m, n: _penalties(alpha_W, alpha_H, l1_ratio, m, n),
        random_state=random_state, verbose=verbose, backend=backend, precision=precision,
        whom="non_negative_factorization",
    )
    if return_info:
        return Wout, Hout, info.n_iter, info
    return Wout, Hout, info.n_iter


# ---------------------------------------------------------------------------------------------
# batched problems
# ---------------------------------------------------------------------------------------------

def nmf_batched(X, n_components, *, init="random", W=None, H=None, beta_loss="frobenius",
                tol=1e-4, max_iter=200, alpha_W=0.0, alpha_H="same", l1_ratio=0.0,
                random_state=None, backend="auto", precision="fp32"):
    """Solve many independent problems at once (one per image, say).

    Parameters
    ----------
    X : array (B, m, n), or a list of 2-D arrays (shapes and dtypes may differ; a tuple, a
        generator or a 1-D object array of them too), non-negative. Each problem keeps its
        dtype (float32 stays float32; integers become float64). At least one problem, each
        with at least one row and one column; errors name the problem (``X[b]``).
    n_components : int, the same k for every problem.
    init : "random", "nndsvd", "nndsvda", "nndsvdar", "custom" or None (scikit-learn's rule,
        per problem: "nndsvda" where k <= min(m_b, n_b), else "random").
    W, H : with init="custom", the initial factors: one per problem (lists of (m_b, k) and
        (k, n_b) arrays, or (B, m, k) and (B, k, n) arrays), each of its problem's dtype.
        Never modified; random_state is then not drawn from.
    random_state : problem b is solved as if alone with random_state = seed + b (seed: the
        int given, or one drawn from None / a RandomState / a Generator), whatever the init,
        so a problem's result does not depend on the others in the batch.

    beta_loss, tol, max_iter, alpha_W, alpha_H, l1_ratio, backend, precision : as in
        :func:`non_negative_factorization` (the penalties scale with each problem's own shape).
        There is no update_H: for W against fixed components, call
        non_negative_factorization(X_b, H=H_b, update_H=False) per problem. One
        ConvergenceWarning names the problems that stopped at max_iter (with tol > 0).

    Returns
    -------
    list of B tuples (W_b, H_b, NMFResult_b), in the order of X; each equals the same problem
    solved alone (for the CPU backend bit for bit, n_iter and errors included).
    """
    beta = _beta_from(beta_loss)
    k = _check_n_components(n_components)
    _check_real("tol", tol)
    max_iter = _check_max_iter(max_iter)
    _check_option("precision", precision, _PRECISIONS)
    _check_option("init", init, _INITS, allow_none=True)
    _check_backend(backend)
    _penalties(alpha_W, alpha_H, l1_ratio, 1, 1)  # their errors before any work
    custom = init == "custom"
    if custom and (W is None or H is None):
        raise ValueError(
            "nmf_batched: init='custom' needs W= and H=: one initial factor per problem (lists "
            "of (m_b, k) and (k, n_b) arrays, or (B, m, k) and (B, k, n) arrays)"
        )
    if not custom and (W is not None or H is not None):
        warnings.warn(
            "When init!='custom', provided W or H are ignored. Set init='custom' to use them "
            "as initialization.",
            RuntimeWarning,
            stacklevel=2,
        )
    _check_random_state(random_state)
    # drawn only where a start is drawn: init='custom' leaves numpy's global RandomState alone
    seed = None if custom else _seed_from(random_state)
    on_device = False
    if _is_problem_sequence(X):
        items = list(X)
    elif _is_device_array(X):
        from dffkit import _cuda_backend

        shape = tuple(_cuda_backend.shape_of(X))
        if len(shape) == 3 and not custom and _resolve_init(init, k, *shape[1:]) == "random":
            results = _cuda_backend.nmf_batched_device(
                X, k, beta=beta, tol=tol, max_iter=max_iter,
                penalties=lambda m, n: _penalties(alpha_W, alpha_H, l1_ratio, m, n),
                seed=seed, precision=precision)
            _warn_batch_max_iter(results, tol, max_iter)
            return results
        if len(shape) != 3 or 0 in shape:
            raise ValueError(f"X must be a non-empty (B, m, n) array, got shape {shape}")
        if backend == "cpu":
            raise ValueError(
                "X is in GPU memory; use backend='cuda' (or 'auto'), or copy it to the host first"
            )
        _check_device_input(X, "nmf_batched")
        on_device = True
        items = [X[b] for b in range(shape[0])]  # views of the stack, in X's library
    else:
        _check_batch_type(X, "X")
        arr = _numeric_array(X, "X")
        if arr.ndim != 3:
            raise ValueError(
                f"X must be a 3-D array (B, m, n) or a list of 2-D arrays, got shape {arr.shape}"
            )
        items = list(arr)
    if not items:
        raise ValueError("X holds no problems (empty batch)")
    if on_device:
        Xs = items
        shapes = [tuple(_cuda_backend.shape_of(x)) for x in Xs]
        dtypes = [np.dtype(_cuda_backend.dtype_of(x)) for x in Xs]
    else:  # each problem keeps its dtype: float32 ones are not promoted by float64 neighbours
        Xs = [_as_float_matrix(x, name=f"X[{b}]", whom="nmf_batched") for b, x in enumerate(items)]
        shapes = [x.shape for x in Xs]
        dtypes = [x.dtype for x in Xs]
    B = len(Xs)
    if custom:
        W_in, H_in = _per_problem(W, "W", B), _per_problem(H, "H", B)
    resolved = [_resolve_init(init, k, m, n) for m, n in shapes]
    if "nndsvd" in resolved:
        warnings.warn(
            "The multiplicative update solver cannot update zeros present in the "
            "initialization; init='nndsvd' leads to poorer results. Try 'nndsvda' or 'nndsvdar'.",
            UserWarning,
            stacklevel=2,
        )
    Ws, Hs = [], []
    for b, x in enumerate(Xs):
        m, n = shapes[b]
        if custom:
            W0 = _check_factor(W_in[b], (m, k), dtypes[b], f"W[{b}]")
            H0 = _check_factor(H_in[b], (k, n), dtypes[b], f"H[{b}]")
        else:
            seed_b = (seed + b) & 0xFFFFFFFFFFFFFFFF
            try:
                if on_device:
                    W0, H0 = initialize(_cuda_backend.to_host(x), k, init=resolved[b],
                                        random_state=seed_b)
                else:  # x checked already
                    W0, H0 = _initial_factors(x, None, k, resolved[b], seed_b)
            except ValueError as exc:  # name the problem
                raise ValueError(f"nmf_batched: X[{b}] (shape {m} x {n}): {exc}") from None
        Ws.append(W0)
        Hs.append(H0)
    engine = _resolve_backend(backend, on_device, sum(m * n for m, n in shapes), k=k,
                              problems=[(n, dt) for (_, n), dt in zip(shapes, dtypes)],
                              beta=beta, precision=precision, batched=True)
    module = _backends.cpu() if engine == "cpu" else _backends.cuda()
    if engine == "cpu":
        def solve(xs, ws, hs, params):  # updates ws, hs in place
            return list(zip(ws, hs, module.fit_batched(xs, ws, hs, params)))
    else:
        from dffkit import _cuda_backend

        def solve(xs, ws, hs, params):
            return _cuda_backend.fit_batched(xs, ws, hs, params, precision=precision)
    # the engines take one dtype per call, and the penalties scale with the shape: problems
    # that share both are solved together (grouped in one pass: many shapes stay linear in B)
    penalties, groups = {}, {}
    for b in range(B):
        if shapes[b] not in penalties:
            penalties[shapes[b]] = _penalties(alpha_W, alpha_H, l1_ratio, *shapes[b])
        groups.setdefault((dtypes[b], penalties[shapes[b]]), []).append(b)
    results = [None] * B
    for key, idx in groups.items():
        params = module.Params()
        _fill_params(params, beta, *key[1], 0.0, 0.0, max_iter, tol, True, False)
        solved = solve([Xs[b] for b in idx], [Ws[b] for b in idx], [Hs[b] for b in idx], params)
        for b, (Wb, Hb, info) in zip(idx, solved):
            label = precision if engine == "cuda" else ("fp32" if dtypes[b] == np.float32 else "fp64")
            results[b] = (Wb, Hb, NMFResult(info["n_iter"], info["error_init"], info["error"],
                                            engine, label, kernel=str(info.get("kernel", engine))))
    if on_device:
        results = _check_batch_finite(results, dtype=dtypes[0])
    else:
        results = _check_batch_finite(results, Xs)
    _warn_batch_max_iter(results, tol, max_iter)
    return results


def _is_problem_sequence(A) -> bool:
    """Whether A holds one 2-D array per problem as a Python sequence: a list, a tuple, an
    iterator (a generator, map(...)), or a 1-D numpy object array of arrays (a pandas Series'
    .values)."""
    if isinstance(A, (list, tuple)) or (isinstance(A, Iterator) and not hasattr(A, "__array__")):
        return True
    return isinstance(A, np.ndarray) and A.dtype == object and A.ndim == 1


def _check_batch_type(A, name):
    """A TypeError for what cannot hold a batch at all (None, a string, a mapping, a number, a
    sparse matrix), instead of numpy's reading of it as a 0-d array."""
    if _is_sparse(A):
        raise TypeError(
            f"nmf_batched: {name} is a sparse matrix; nmf_batched takes dense problems: pass a "
            f"list of dense 2-D arrays (e.g. [{name}.toarray()]), or factorize a sparse matrix "
            "with non_negative_factorization"
        )
    if A is None or isinstance(A, (str, bytes, Mapping, Set, numbers.Number)):
        raise TypeError(
            f"nmf_batched: {name} must be a 3-D array (B, m, n) or a list (or other iterable) of "
            f"2-D arrays, one per problem; got {type(A).__name__}"
        )


def _per_problem(A, name, B):
    """The initial factors of init='custom' as a list of B per-problem arrays."""
    if _is_problem_sequence(A):
        parts = list(A)
    elif isinstance(A, np.ndarray) or _is_device_array(A):
        if len(np.shape(A)) != 3:
            raise ValueError(
                f"nmf_batched: {name} must hold one initial {name} per problem: a list of 2-D "
                f"arrays or a 3-D array, got shape {tuple(np.shape(A))}"
            )
        parts = [A[b] for b in range(np.shape(A)[0])]
    else:
        raise TypeError(
            f"nmf_batched: {name} must be a list of 2-D arrays (one per problem) or a 3-D "
            f"array, got {type(A).__name__}"
        )
    if len(parts) != B:
        raise ValueError(
            f"nmf_batched: {name} must hold one initial {name} per problem ({B}), got {len(parts)}"
        )
    return parts


def _warn_batch_max_iter(results, tol, max_iter):
    """One ConvergenceWarning for the problems of a batch that stopped at max_iter."""
    if not (tol > 0 and max_iter > 0):
        return
    hit = [b for b, r in enumerate(results) if r[2].n_iter == max_iter]
    if not hit:
        return
    shown = ", ".join(map(str, hit[:20])) + (", ..." if len(hit) > 20 else "")
    _warn_convergence(
        f"Maximum number of iterations {max_iter} reached in {len(hit)} of {len(results)} "
        f"problems of the batch (indices {shown}). Increase it to improve convergence.",
        stacklevel=3,
    )


def _check_batch_finite(results, Xs=None, dtype=None):
    """results, or the overflow error naming the problems whose numbers left their dtype's range
    (Xs: the host problems, for their dtype and largest values; else dtype)."""
    bad = [b for b, r in enumerate(results) if not _finite(r[2])]
    if not bad:
        return results
    b = bad[0]
    raise _overflow_error("nmf_batched", f"X[{b}]", dtype if Xs is None else Xs[b].dtype,
                          None if Xs is None else Xs[b], others=[f"X[{o}]" for o in bad[1:]])


# ---------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------

try:
    from sklearn.base import BaseEstimator as _BaseEstimator
    from sklearn.base import ClassNamePrefixFeaturesOutMixin as _FeaturesOutMixin
    from sklearn.base import TransformerMixin as _TransformerMixin

    try:
        from sklearn.utils.validation import validate_data as _sk_validate_data
    except ImportError:  # scikit-learn < 1.6
        _sk_validate_data = None
    _HAVE_SKLEARN = True
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    _HAVE_SKLEARN = False
    _sk_validate_data = None
    from dffkit._estimator_base import BaseEstimator as _BaseEstimator  # noqa: F401
    from dffkit._estimator_base import FeaturesOutMixin as _FeaturesOutMixin
    from dffkit._estimator_base import TransformerMixin as _TransformerMixin


class NMF(_FeaturesOutMixin, _TransformerMixin, _BaseEstimator):
    """Non-negative matrix factorization by multiplicative updates, scikit-learn compatible.

    Same parameters as ``sklearn.decomposition.NMF`` (``solver`` is "mu", the only solver
    offered; ``shuffle``, coordinate descent's option, is accepted and ignored, as scikit-learn's
    MU ignores it), plus ``backend`` ("auto", "cpu", "cuda") and ``precision`` (CUDA only). X may be
    numpy, a GPU array, or scipy.sparse (fit and transform on the CPU backend).

    Attributes
    ----------
    components_ : (n_components, n_features) array, H
    n_components_ : int
    reconstruction_err_ : float, ||X - W H||_F (Frobenius) or sqrt(2 KL) at the end of fit
    n_iter_ : int
    n_features_in_ : int
    backend_ : str, the engine that ran the last fit
    kernel_ : str, the kernels that ran it (``NMFResult.kernel``: "cpu", "cpu-sparse" for
        scipy.sparse X, or on CUDA "resident",
        "resident-fast", "resident-fast-cols", "sweep", "gemm", "gemm-fused")
    """

    def __init__(
        self,
        n_components="auto",
        *,
        init=None,
        solver="mu",
        beta_loss="frobenius",
        tol=1e-4,
        max_iter=200,
        random_state=None,
        alpha_W=0.0,
        alpha_H="same",
        l1_ratio=0.0,
        verbose=0,
        shuffle=False,
        backend="auto",
        precision="fp32",
    ):
        self.n_components = n_components
        self.init = init
        self.solver = solver
        self.beta_loss = beta_loss
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.verbose = verbose
        self.shuffle = shuffle
        self.backend = backend
        self.precision = precision

    #: scipy.sparse X is taken (the CPU backend's sparse engine)
    _accepts_sparse = True

    # scikit-learn >= 1.6 tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = self._accepts_sparse
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"requires_positive_X": True, "preserves_dtype": [np.float64, np.float32]}

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def _validate(self, X, reset):
        if _is_device_array(X):
            if not reset and X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            if reset:
                self.n_features_in_ = int(X.shape[1])
            return X
        if (type(X) is np.ndarray and X.ndim == 2 and X.size and X.dtype in (np.float32, np.float64)
                and (reset or not hasattr(self, "feature_names_in_"))):
            # a float numpy matrix, the common case (a service's transform of a few rows):
            # scikit-learn's validate_data asks a dataframe library about it first, 85 of the
            # 270 us of a one-row transform; its rules for such an X are these (a transform of
            # an array after a fit on a DataFrame goes to it, for its warning)
            X = _as_float_matrix(X, whom=type(self).__name__)
            if reset:
                self.n_features_in_ = X.shape[1]
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            return _checked(X)
        if isinstance(X, _SparseX):
            X = X.matrix
        elif _is_sparse(X) and self._accepts_sparse:
            _check_sparse_structure(X)  # before scikit-learn's validation hands it to scipy
        if _sk_validate_data is not None:
            X = _sk_validate_data(self, X, dtype=[np.float64, np.float32], reset=reset,
                                  accept_sparse=self._accepts_sparse)
        else:
            if self._accepts_sparse and _is_sparse(X):
                X = _SparseX(X, whom=type(self).__name__)
            else:
                X = _as_float_matrix(X, whom=type(self).__name__)
            if reset:
                self.n_features_in_ = X.shape[1]
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
        if isinstance(X, _SparseX):
            return X
        if self._accepts_sparse and _is_sparse(X):
            return _SparseX(X, whom=type(self).__name__)
        return _checked(_as_float_matrix(X, whom=type(self).__name__))

    def _check_solver(self):
        if not (isinstance(self.solver, str) and self.solver == "mu"):
            raise (ValueError if self.solver == "cd" else InvalidParameterError)(
                f"solver={self.solver!r} is not offered: dffkit implements solver='mu' "
                "(multiplicative updates); use scikit-learn's NMF for 'cd'"
            )

    def _run(self, X, W=None, H=None, update_H=True):
        self._check_solver()
        _check_flag("shuffle", self.shuffle)  # coordinate descent's option: MU ignores it
        beta = _beta_from(self.beta_loss)
        n_components = _check_n_components(self.n_components, allow_auto=True)
        return _solve(
            X, W, H, n_components=n_components, init=self.init if update_H else "custom",
            update_H=update_H, beta=beta, tol=self.tol, max_iter=self.max_iter,
            penalties=lambda m, n: _penalties(self.alpha_W, self.alpha_H, self.l1_ratio, m, n),
            random_state=self.random_state, verbose=self.verbose, backend=self.backend,
            precision=self.precision, whom=type(self).__name__,
        )

    def fit_transform(self, X, y=None, W=None, H=None):
        """Learn the factorization of X and return W (n_samples, n_components)."""
        X = self._validate(X, reset=True)
        W, H, info = self._run(X, W, H)
        self.reconstruction_err_ = info.error
        self.n_components_ = H.shape[0]
        self.components_ = H
        self.n_iter_ = info.n_iter
        self.backend_ = info.backend
        self.kernel_ = info.kernel
        return W

    def fit(self, X, y=None, **params):
        """Learn the factorization of X; returns self."""
        self.fit_transform(X, **params)
        return self

    def transform(self, X):
        """W for new data with the learned components fixed (W-only updates)."""
        if not hasattr(self, "components_"):
            raise _not_fitted(self)
        X = self._validate(X, reset=False)
        self._check_transform_dtype(X)
        if isinstance(self.components_, np.ndarray) and not self.components_.any():
            raise ValueError(
                f"{type(self).__name__}: the fitted components_ are all zero (the fit collapsed: "
                "X all zero, or alpha_W/alpha_H too strong), so no W can be fitted against them; "
                "refit with weaker regularisation"
            )
        W, _, _ = self._run(X, None, self.components_, update_H=False)
        return W

    def _check_transform_dtype(self, X):
        """X must have the dtype of the fitted components_ (scikit-learn's NMF refuses the
        mismatch too, but blames an H the caller never passed)."""
        fitted, given = _dtype_of(self.components_), _dtype_of(X)
        if fitted != given:
            raise TypeError(
                f"{type(self).__name__} was fitted on {fitted.name} data, but X is "
                f"{given.name}: transform X in the dtype of the fit (X.astype(np.{fitted.name})), "
                f"or fit the model on {given.name} data"
            )

    def inverse_transform(self, X):
        """W H: data back in the original space."""
        if not hasattr(self, "components_"):
            raise _not_fitted(self)
        k = self.components_.shape[0]
        sparse, frame = _is_sparse(X), hasattr(X, "to_numpy") and hasattr(X, "columns")
        W = X if sparse or frame else np.asarray(X)
        if len(W.shape) != 2 or W.shape[1] != k:
            raise ValueError(
                f"X must be 2-D with n_components_ = {k} columns (the output of transform), "
                f"got shape {W.shape}")
        # scikit-learn's X @ components_: sparse W gives a dense ndarray, a DataFrame stays one
        return np.asarray(W @ self.components_) if sparse else W @ self.components_


def _dtype_of(A):
    """The numpy dtype of a numpy or GPU array."""
    if isinstance(A, np.ndarray):
        return A.dtype
    if isinstance(A, _SparseX):
        return A.dtype
    if _is_sparse(A):
        return np.dtype(A.dtype)
    if _is_device_array(A):
        from dffkit import _cuda_backend

        return np.dtype(_cuda_backend.dtype_of(A))
    return np.asarray(A).dtype


def _not_fitted(est):
    msg = (
        f"This {type(est).__name__} instance is not fitted yet. Call 'fit' with appropriate "
        "arguments before using this estimator."
    )
    try:
        from sklearn.exceptions import NotFittedError

        return NotFittedError(msg)
    except ImportError:  # pragma: no cover
        return AttributeError(msg)
