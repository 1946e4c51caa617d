"""Packaging: what pyproject.toml declares against what the code loads and the tests import, and
what the sdist holds. The data checks run on the installed package (the wheel's contents); the
others read the source tree's pyproject.toml and skip where the tests run without it."""
import ast
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import pytest

import dffkit

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _pyproject():
    if not PYPROJECT.is_file():
        pytest.skip("no pyproject.toml beside the tests (not run from a source tree)")
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _requirements(specs):
    from packaging.requirements import Requirement

    return [Requirement(s) for s in specs]


def test_installed_package_ships_its_data_files():
    # the files dffkit.models.imagenet_classes and dffkit.sample_images load, with the licence
    # note that must travel with the photographs
    data = resources.files("dffkit").joinpath("data")
    table = data.joinpath("imagenet_classes.tsv")
    assert table.is_file(), f"{table} missing from the installed package"
    assert len(table.read_text(encoding="utf-8").splitlines()) == 1001  # header + 1000 classes
    folder = data.joinpath("sample_images")
    images = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(_IMAGE_SUFFIXES))
    assert images, f"no sample images in {folder}"
    sources = folder.joinpath("SOURCES.md")
    assert sources.is_file(), "sample_images/SOURCES.md (credits and licences) missing"
    text = sources.read_text(encoding="utf-8")
    unlisted = [name for name in images if f"| {name} |" not in text]
    assert not unlisted, f"images without a credit and licence line in SOURCES.md: {unlisted}"
    from dffkit.deep_feature_factorization import sample_images

    assert [Path(p).name for p in sample_images()] == images
    assert len(dffkit.models.imagenet_classes()) == 1000


def test_version_is_declared_once():
    project = _pyproject()["project"]
    assert project["version"] == dffkit.__version__, (
        "pyproject.toml's version and dffkit.__version__ differ: bump both")


@pytest.mark.parametrize("system, machine, gpu", [
    ("Linux", "x86_64", True),
    ("Linux", "aarch64", False),
    ("Linux", "ppc64le", False),
    ("Darwin", "arm64", False),
    ("Darwin", "x86_64", False),
    ("Windows", "AMD64", True),
    ("Windows", "ARM64", False),  # onnxruntime-gpu has no win_arm64 wheel
])
def test_exactly_one_onnxruntime_per_platform(system, machine, gpu):
    # onnxruntime and onnxruntime-gpu install the same files: one of them, and the GPU one only
    # where it has wheels
    env = {"platform_system": system, "platform_machine": machine, "sys_platform": system.lower(),
           "python_version": "3.11", "python_full_version": "3.11.7"}
    picked = {r.name for r in _requirements(_pyproject()["project"]["dependencies"])
              if r.name in ("onnxruntime", "onnxruntime-gpu")
              and (r.marker is None or r.marker.evaluate(env))}
    assert picked == {"onnxruntime-gpu" if gpu else "onnxruntime"}, (system, machine, picked)


def test_declared_minimum_pillow_draws_the_legends():
    # dffkit.visualize measures legend text with ImageDraw.textbbox; before Pillow 10.1 the font
    # is the bitmap one (load_default takes no size), which textbbox measures from Pillow 9.2 on.
    # With 9.0.1 and 9.1.1, which "pillow>=9.0" allowed, `dffkit demo` stopped with "Only
    # supported for TrueType fonts" (9.2.0 draws them).
    pillow = next(r for r in _requirements(_pyproject()["project"]["dependencies"]) if r.name == "pillow")
    assert not pillow.specifier.contains("9.1.1"), pillow
    assert pillow.specifier.contains("9.2.0"), pillow


# module name -> distribution, where they differ
_DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn"}


def _stdlib():
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:
        pytest.skip("sys.stdlib_module_names needs Python 3.10")
    return names


def test_test_imports_are_declared():
    # what a test module imports at its top (not behind importorskip) must come with
    # pip install ".[test]": the runtime dependencies and the test extra
    meta = _pyproject()["project"]
    declared = {r.name.lower() for r in _requirements(meta["dependencies"] + meta["optional-dependencies"]["test"])}
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"dffkit"}
    missing = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")) + [ROOT / "tests" / "conftest.py"]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in _stdlib() or top in local or top == "__future__":
                    continue
                if _DISTRIBUTION.get(top, top).lower() not in declared:
                    missing.setdefault(top, []).append(path.name)
    assert not missing, f"imported by tests but not in dependencies or the 'test' extra: {missing}"


def test_sdist_has_the_sources_and_no_results(tmp_path):
    # what `python -m build --sdist` (and pip, from a source folder) packs, built by the backend
    # itself: every source CMake and the package need, without benchmark results, CI scripts,
    # build folders or compiled modules
    _pyproject()
    pytest.importorskip("scikit_build_core")
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys; from scikit_build_core.build import build_sdist; print(build_sdist(sys.argv[1]))",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    with tarfile.open(tmp_path / done.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = ["CMakeLists.txt", "pyproject.toml", "README.md", "LICENSE",
              "python/dffkit/data/imagenet_classes.tsv", "python/dffkit/data/sample_images/SOURCES.md"]
    for folder, patterns in (("cpp", ("*.cpp", "*.hpp")), ("cuda", ("*.cu", "*.cuh", "*.hpp", "*.cpp")),
                             ("python/dffkit", ("*.py", "*.jpg", "*.tsv"))):
        for pattern in patterns:
            needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern)
                       if "__pycache__" not in p.parts]
    absent = sorted(set(needed) - names)
    assert not absent, f"sources missing from the sdist: {absent}"
    junk = sorted(n for n in names if n.startswith(("benchmarks/results/", ".ci/", "build/", ".venv"))
                  or n.endswith((".so", ".pyd", ".pyc")))
    assert not junk, f"the sdist carries files no build needs: {junk[:10]} ({len(junk)} in all)"
