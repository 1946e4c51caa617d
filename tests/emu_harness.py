"""Building the CUDA emulator's harnesses (tests/emu/*.cpp against cuda/emu/cuda_emu.hpp) for the
emulator tests: the compiler, the flags, and a skip where no compiler (or no working sanitizer)
is there."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compiler():
    """The C++ compiler ($CXX, else c++, g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(tmp_path_factory, source, flags=("-O2",), defines=()):
    """tests/emu/<source> compiled against the kernels with ``flags`` and the kernels' build
    switches ``defines`` (NAME=VALUE); the path of the program. Skips where there is no C++
    compiler, or where a sanitizer in ``flags`` does not work with this compiler or kernel."""
    cxx = compiler()
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulator harness")
    d = tmp_path_factory.mktemp("emu")
    if any(f.startswith("-fsanitize") for f in flags):
        probe = d / "probe.cpp"
        probe.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
        ok = subprocess.run([cxx, "-std=c++20", *flags, "-pthread", str(probe), "-o", str(d / "probe")],
                            capture_output=True)
        if ok.returncode != 0 or subprocess.run([str(d / "probe")], capture_output=True).returncode != 0:
            pytest.skip(f"{' '.join(flags)} is not usable with this compiler or kernel")
    exe = d / Path(source).stem
    cmd = [cxx, "-std=c++20", *flags, "-pthread", f"-I{ROOT / 'cpp'}", f"-I{ROOT / 'cuda'}",
           *(f"-D{x}" for x in defines), str(ROOT / "tests" / "emu" / source), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"emulator harness {source} did not compile:\n{done.stderr[-4000:]}"
    return exe
