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
    state = {"device": current_device, "switches": 0}

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            self.prev, state["device"] = state["device"], self.id
            state["switches"] += 1

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
                                 get_current_stream=lambda: types.SimpleNamespace(ptr=stream_ptrs[state["device"]]),
                                 runtime=types.SimpleNamespace(getDevice=lambda: state["device"]))
    return types.SimpleNamespace(ndarray=ndarray, cuda=cuda, state=state)


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
    with pytest.raises(ValueError, match=r"heat must have shape \(4, 3\), got \(3, 4\)"):
        _cuda_backend._raw_device_array(x, "heat", np.float32, (4, 3))
    with pytest.raises(ValueError, match=r"heat must be C-contiguous"):
        _cuda_backend._raw_device_array(cupy.ndarray((3, 4), np.float32, 0x3000, contiguous=False), "heat",
                                        np.float32)


def test_cupy_stream_is_the_arrays_devices_without_a_switch_where_it_is_current(monkeypatch):
    """The stream handed to the engine is the current stream of the array's device: read
    directly where that device is the current one (the usual case: no device switch, two CUDA
    calls fewer), through a switch to it otherwise; the current device is left as it was."""
    cupy = _fake_cupy(current_device=0)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    here = cupy.ndarray((2, 2), np.float32, ptr=0x1000, device=0)
    there = cupy.ndarray((2, 2), np.float32, ptr=0x2000, device=1)
    assert _cuda_backend._stream_of(here) == 0x5000 and cupy.state["switches"] == 0
    assert _cuda_backend._stream_of(there) == 0x5001 and cupy.state["switches"] == 1
    assert cupy.state["device"] == 0
