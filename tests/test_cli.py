"""The ``dffkit`` command line layer (``dffkit.cli``): errors as one line naming the flag,
cheap checks before any work, no empty output folder left behind (audit regressions)."""
import numpy as np
import pytest
from PIL import Image

from dffkit import cli, clustering
from dffkit import deep_feature_factorization as dff_module


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    return str(path)


def _never(what):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} ran although the arguments were refusable up front")
    return fail


_RANGES = [
    ("--max-iter", "-1", "--max-iter must be a non-negative int (0: no NMF iteration), got -1"),
    ("--tol", "-1", "--tol must be a finite number >= 0 (0: run all --max-iter iterations), got -1.0"),
    ("--tol", "nan", "--tol must be a finite number >= 0 (0: run all --max-iter iterations), got nan"),
    ("--seed", "-1", "--seed must be a non-negative int, got -1"),
    ("--threshold", "2", "--threshold must be a number in [0, 1] (relative heat), got 2.0"),
    ("-k", "0", "-k/--concepts must be at least 1 (the number of concepts), got 0"),
]


@pytest.mark.parametrize("command, option, value, message", [
    (command, *case) for command in ("dff", "demo", "eval") for case in _RANGES
    if not (command == "eval" and case[0] in ("--max-iter", "--tol"))  # eval has neither
])
def test_out_of_range_options_fail_first_naming_the_flag(tmp_path, image, capsys, monkeypatch, command, option,
                                                         value, message):
    monkeypatch.setattr(dff_module, "_build_extractor", _never("the feature extractor"))
    monkeypatch.setattr(dff_module, "dff", _never("DFF"))
    out = tmp_path / "new" / "out"
    argv = {"dff": ["dff", image], "demo": ["demo"], "eval": ["eval", str(tmp_path)]}[command]
    assert cli.main([*argv, option, value, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"dffkit {command}: error: {message}"
    assert not (tmp_path / "new").exists()


def test_cluster_seed_is_checked_first(tmp_path, image, capsys, monkeypatch):
    monkeypatch.setattr(clustering, "cluster_images", _never("clustering"))
    assert cli.main(["cluster", image, "-n", "1", "--seed", "-1", "--out", str(tmp_path / "c")]) == 1
    assert capsys.readouterr().err.strip() == "dffkit cluster: error: --seed must be a non-negative int, got -1"
    assert not (tmp_path / "c").exists()


def _missing_torch(*args, **kwargs):
    raise ImportError("exporting VGG-16 from torchvision needs torch and torchvision (pip install torch torchvision)")


@pytest.mark.parametrize("command", ["dff", "eval", "cluster"])
def test_an_import_error_is_one_line_not_a_traceback(tmp_path, image, capsys, monkeypatch, command):
    monkeypatch.setattr(dff_module, "_build_extractor", _missing_torch)        # dff, eval
    monkeypatch.setattr(clustering, "cluster_images", _missing_torch)          # cluster
    root = tmp_path / "ds"
    (root / "g" / "GroundTruth").mkdir(parents=True)
    Image.open(image).save(root / "g" / "0.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "g" / "GroundTruth" / "0.png")
    out = tmp_path / "out"
    argv = {"dff": ["dff", image, "-k", "2"], "eval": ["eval", str(root), "-k", "2"],
            "cluster": ["cluster", image, "-n", "1"]}[command]
    assert cli.main([*argv, "--model", "vgg16:torchvision", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"dffkit {command}: error: exporting VGG-16 from torchvision needs torch" in err
    assert "Traceback" not in err
    assert not out.exists()  # created for the work, left empty by the failure: removed


def test_library_spelling_of_options_becomes_the_flags(tmp_path, image, capsys, monkeypatch):
    """DFF's own message on negative activations says negatives='clip'; through the command
    line it says --negatives clip."""
    real = dff_module.dff

    def negative_activations(images, k, **kwargs):
        acts = -np.ones((1, 2, 2, 3), np.float32)
        return real([np.zeros((16, 16, 3), np.uint8)], 2, activations=acts)

    monkeypatch.setattr(dff_module, "dff", negative_activations)
    with pytest.raises(ValueError, match="negatives='clip'"):
        negative_activations(None, 2)
    out = tmp_path / "out"
    assert cli.main(["dff", image, "-k", "2", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--negatives clip" in err and "--negatives shift" in err and "negatives=" not in err
    assert not out.exists()


def test_as_flags_rewrites_only_the_commands_options():
    args = cli.build_parser().parse_args(["dff", "x"])
    text = "pass negatives='clip' or max_iter=5, layer='a b'; init='custom' and per_image=True stay"
    assert cli._as_flags(text, args._parser) == (
        "pass --negatives clip or --max-iter 5, --layer 'a b'; init='custom' and per_image=True stay")


def test_failed_commands_remove_only_the_empty_folders_they_made(tmp_path, image, monkeypatch):
    def fails(*args, **kwargs):
        raise ValueError("the work failed")

    monkeypatch.setattr(dff_module, "dff", fails)
    assert cli.main(["dff", image, "-k", "2", "--out", str(tmp_path / "a" / "b" / "c"), "--quiet"]) == 1
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()                                  # there before: kept, even empty
    assert cli.main(["dff", image, "-k", "2", "--out", str(tmp_path / "kept"), "--quiet"]) == 1
    assert (tmp_path / "kept").is_dir()

    def writes_then_fails(*args, **kwargs):
        (tmp_path / "new" / "partial.txt").write_text("x")
        raise ValueError("the work failed")

    monkeypatch.setattr(dff_module, "dff", writes_then_fails)    # not empty: kept
    assert cli.main(["dff", image, "-k", "2", "--out", str(tmp_path / "new"), "--quiet"]) == 1
    assert (tmp_path / "new" / "partial.txt").read_text() == "x"


def test_a_closed_stdout_ends_the_command_quietly():
    # `dffkit info | head -1`: the reader goes away before the command writes; the command
    # must end without "Broken pipe" errors or a traceback on stderr
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dffkit

    package_root = str(Path(dffkit.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from dffkit.cli import main; sys.exit(main(['info']))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
