"""Shared fixtures: every NMF test body runs against every backend; absent ones skip."""
import numpy as np
import pytest

import dffkit


def _cuda_usable():
    return "cuda" in dffkit.available_backends()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "cuda" and not _cuda_usable():
        pytest.skip(f"CUDA backend not usable: {dffkit.unavailable_reasons().get('cuda')}")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def readonly(a):
    """A read-only view: an accidental write by the library fails loudly."""
    a = np.asarray(a)
    a.setflags(write=False)
    return a
