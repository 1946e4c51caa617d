"""The ``dffkit`` command line: one subcommand per job.

Each subcommand lives in the module that implements it; the module exposes
``CLI = {"name": (add_arguments, run, help)}`` and is imported only to build the parser.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

# subcommand modules, in the order they are listed by --help
_MODULES = ("dffkit.bench", "dffkit.deep_feature_factorization", "dffkit.evaluation", "dffkit.clustering", "dffkit.info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dffkit",
        description="Fast NMF (CPU and CUDA) and concept discovery in CNN activations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a module that failed to import is named, not hidden
            if getattr(exc, "name", None) == name:
                continue
            raise
        for cmd, (add_arguments, run, help_text) in getattr(module, "CLI", {}).items():
            p = sub.add_parser(cmd, help=help_text, description=help_text)
            add_arguments(p)
            p.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError, RuntimeError) as exc:
        print(f"dffkit {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 1
    return int(result or 0)


def _message(exc: BaseException) -> str:
    """The text of an error: an OSError raised by the operating system (errno, strerror and
    the file name) as "cannot use PATH: reason"; anything else as it is."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        where = _name(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {_name(exc.filename2)}"
        return f"cannot use {where}: {exc.strerror}"
    return str(exc)


def _name(filename) -> str:
    return os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)


# ---------------------------------------------------------------------------------------------
# argument types and output locations, shared by the subcommands
# ---------------------------------------------------------------------------------------------

def int_at_least(low: int, what: str):
    """An argparse ``type`` for an int >= ``low`` (1: "a positive int", 0: "a non-negative
    int"); ``what`` says what the number is (``"pixels"``) in the message for anything else."""
    kind = {0: "non-negative int", 1: "positive int"}.get(low, f"int >= {low}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a {kind} ({what}), got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {kind} ({what}), got {value}")
        return value

    parse.__name__ = kind  # argparse names the type in its own messages
    return parse


def positive_int(what: str):
    """An argparse ``type`` for a positive int (``int_at_least(1, what)``)."""
    return int_at_least(1, what)


def _probe_writable(folder: Path, option: str, path) -> None:
    """Create and remove a scratch file in ``folder``: the one check that says whether files
    can be written there (permissions, read-only or immutable file systems, root or not)."""
    try:
        fd, scratch = tempfile.mkstemp(prefix=".dffkit-write-test-", dir=folder)
    except OSError as exc:
        raise OSError(f"{option} {path}: cannot write into the folder {folder} ({exc.strerror or exc}); "
                      f"choose a folder you can write to") from exc
    os.close(fd)
    try:
        os.unlink(scratch)
    except OSError:  # pragma: no cover - a file we just made
        pass


def _make_folder(folder: Path, option: str, path) -> None:
    """``folder`` and its missing parents created; OSError naming ``option`` and ``path``
    when something on the way is a file or the folder cannot be made."""
    for above in (folder, *folder.parents):
        if above.exists():
            if not above.is_dir():
                what = "is a file" if above == Path(path) else f"lies under {above}, which is a file"
                raise OSError(f"{option} {path} {what}, not a folder: choose another path "
                              f"(missing folders are created)")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{option} {path}: cannot create the folder {folder} ({exc.strerror or exc}); "
                      f"choose a folder you can write to") from exc


def prepare_output_dir(path, option: str = "--out", *, probe: bool = True) -> Path:
    """Make sure ``path`` is a folder the command can write its files into, before the work:
    created (with its parents) when missing; OSError naming ``option`` and the path when it is
    a file, lies under a file, or (``probe``: a scratch file is made and removed there) cannot
    be written to."""
    out = Path(path)
    _make_folder(out, option, path)
    if probe:
        _probe_writable(out, option, path)
    return out


def prepare_output_file(path, option: str = "--out") -> Path:
    """Make sure the file ``path`` can be written, before the work: its folder created when
    missing (nothing is written to ``path`` itself); OSError naming ``option`` and the path
    when it is a folder, its folder is a file, or it cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise OSError(f"{option} {path} is a folder: pass a file name for the output, "
                      f"e.g. {out / 'dff_eval.json'}")
    _make_folder(out.parent, option, path)
    if out.exists():
        try:
            with open(out, "r+b"):  # opened for writing, left as it is
                pass
        except OSError as exc:
            raise OSError(f"{option} {path}: cannot write the file ({exc.strerror or exc}); "
                          f"choose another file name") from exc
    else:
        _probe_writable(out.parent, option, path)
    return out
