"""How the CUDA backend reads a device array's pointer, shape, dtype and stream (no GPU needed:
a stand-in CuPy module)."""
import sys
import types

import numpy as np
import pytest

from dffkit import _cuda_backend


def _fake_cupy(current_device=0, stream_ptrs=None):
    """A module with CuPy's ndarray attributes the backend reads; its __cuda_array_interface__
    fails the test (building the dict and querying the pointer's device cost a call each)."""
    stream_ptrs = stream_ptrs or {0: 0x5000, 1: 0x5001}
    state = {"device": current_device}

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            self.prev, state["device"] = state["device"], self.id

        def __exit__(self, *exc):
            state["device"] = self.prev

    class ndarray:  # noqa: N801 - CuPy's name
        def __init__(self, shape, dtype, ptr, device=0, contiguous=True):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self.data = types.SimpleNamespace(ptr=ptr)
            self.device = types.SimpleNamespace(id=device)
            self.flags = types.SimpleNamespace(c_contiguous=contiguous)

        @property
        def __cuda_array_interface__(self):
            raise AssertionError("the interface dict was built")

    cuda = types.SimpleNamespace(Device=Device,
                                 get_current_stream=lambda: types.SimpleNamespace(ptr=stream_ptrs[state["device"]]))
    return types.SimpleNamespace(ndarray=ndarray, cuda=cuda)


def test_cupy_arrays_are_read_from_their_attributes(monkeypatch):
    cupy = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    x = cupy.ndarray((3, 4), np.float32, ptr=0x1000, device=1)
    v = _cuda_backend._view(x)
    assert (v.ptr, v.shape, v.dtype, v.device, v.stream, v.lib, v.contiguous) == (
        0x1000, (3, 4), np.dtype(np.float32), 1, 0x5001, "cupy", True)
    assert not _cuda_backend._view(cupy.ndarray((3, 4), np.float64, 0x2000, contiguous=False)).contiguous
    assert _cuda_backend._raw_device_array(x, "heat", np.float32, (3, 4)) == 0x1000
    with pytest.raises(ValueError, match="labels must be int16, got float32"):
        _cuda_backend._raw_device_array(x, "labels", np.int16)
    with pytest.raises(ValueError, match=r"heat must be C-contiguous"):
        _cuda_backend._raw_device_array(cupy.ndarray((3, 4), np.float32, 0x3000, contiguous=False), "heat",
                                        np.float32)
