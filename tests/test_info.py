"""``dffkit info``: what a user (or a bug report) needs to know about this installation."""
import json
import os

import dffkit
from dffkit import _backends, info
from dffkit.cli import main as cli_main


def test_threads_say_where_openmps_default_comes_from(monkeypatch):
    """OpenMP's default is OMP_NUM_THREADS when set (named with its value), else the cores."""
    old = dffkit.get_num_threads()
    dffkit.set_num_threads(0)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        n, why = info.engine_threads()
        assert n == _backends.cpu().max_threads() and why == "OpenMP's default: OMP_NUM_THREADS=1"
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert info.engine_threads()[1] == "OpenMP's default: the cores this process may use"
    finally:
        dffkit.set_num_threads(old)


def test_describe_names_the_cpu_the_engine_file_and_the_optional_packages(monkeypatch):
    """Besides backends and threads: the CPU (model, cores this process may use, SIMD flags),
    the compiled engine that was loaded, and the optional packages (version or None)."""
    d = info.describe()
    assert d["cpu"]["cores"] == len(os.sched_getaffinity(0)) and d["cpu"]["model"]
    assert isinstance(d["cpu"]["flags"], list)
    assert d["cpu_engine"] == _backends.cpu().__file__ and os.path.exists(d["cpu_engine"])
    assert set(d["optional"]) >= {"scipy", "scikit-learn", "torch", "cupy", "matplotlib"}
    try:
        import scipy
    except ImportError:
        assert d["optional"]["scipy"] is None
    else:
        assert d["optional"]["scipy"] == scipy.__version__
    monkeypatch.setattr(info, "OPTIONAL", {"no_such_module_xyz": ("no-such-dist-xyz", "nothing")})
    assert info.describe()["optional"] == {"no-such-dist-xyz": None}


def test_cli_info_text_and_json_agree(capsys):
    assert cli_main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines()}
    assert lines["cpu"].startswith(f"{d['cpu']['model']}, {d['cpu']['cores']} cores")
    assert lines["cpu_threads"] == f"{d['cpu_threads']} ({d['cpu_threads_from']})"
    for dist, version in d["optional"].items():
        assert f"{dist} {version or 'not installed'}" in lines["optional"]
    if "cuda" not in d["backends"]:
        assert lines["backend cuda"] == f"unavailable: {d['unavailable']['cuda']}"


def test_engine_build_names_what_the_kernels_were_compiled_for(capsys):
    """The compiled engine says how it was built: the instruction sets its kernels use (a
    -march=native build: those of the building machine, here this one), vector width, OpenMP."""
    b = info.engine_build()
    assert set(b) >= {"compiler", "instruction_sets", "vector_bytes", "vector_registers",
                      "random_init", "openmp", "sanitizers"}
    isa = b["instruction_sets"].split()
    # the vector width follows the instruction sets: AVX-512 64 bytes, AVX 32, else 16
    assert int(b["vector_bytes"]) == (64 if "avx512f" in isa else 32 if "avx" in isa else 16)
    # the init's vector path needs vector FMA
    assert (b["random_init"] == "vector") == ("avx512f" in isa or ("avx" in isa and "fma" in isa))
    flags = _backends._cpu_flags() or set()
    if flags and isa[0] == "x86-64":  # the engine runs here: its instruction sets are this CPU's
        assert set(isa[1:]) <= flags, set(isa[1:]) - flags
    assert cli_main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu build:"))
    assert b["compiler"] in line and b["instruction_sets"] in line


def test_an_engine_built_for_instructions_this_cpu_lacks_is_refused_with_the_fix(monkeypatch):
    # a -march=native build carried to an older CPU: an ImportError saying why and what to do,
    # not "Illegal instruction" ending the interpreter at the first fit
    import types

    build = "compiler=gcc\ninstruction_sets=x86-64 avx2 fma avx512f\nvector_bytes=64\n"
    fake = types.SimpleNamespace(build_info=build, __file__="_cpu.so")
    monkeypatch.setattr(_backends, "_modules", {})
    monkeypatch.setattr(_backends, "_reasons", {})
    def import_module(name):
        if name != "dffkit._cpu":
            raise ImportError(f"no {name} here")
        return fake

    monkeypatch.setattr(_backends, "importlib", types.SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(_backends, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    try:
        _backends.cpu()
    except ImportError as exc:
        message = str(exc)
    else:
        raise AssertionError("the engine was accepted")
    assert "avx512f" in message and "avx2" not in message.split("lacks")[1].split(")")[0]
    assert "DFFKIT_ARCH=x86-64-v3" in message and "Illegal instruction" in message
    assert "cpu" not in _backends.available_backends()
    # the same engine on a CPU that has them all, and where the flags are unknown: accepted
    for flags in ({"avx2", "fma", "avx512f"}, None):
        monkeypatch.setattr(_backends, "_modules", {})
        monkeypatch.setattr(_backends, "_cpu_flags", lambda flags=flags: flags)
        assert _backends.cpu() is fake


def test_the_installed_engine_runs_here():
    # this machine built it: nothing it was compiled for is missing
    assert _backends._missing_instructions(_backends.cpu().build_info) == []
    assert "cpu" in _backends.available_backends()
