"""The ``dffkit`` command line: one subcommand per job.

Each subcommand lives in the module that implements it; the module exposes
``CLI = {"name": (add_arguments, run, help)}`` and is imported only to build the parser.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import shlex
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
            p.set_defaults(_run=run, _parser=p)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    created = _missing_folders(getattr(args, "out", None))
    try:
        _check_options(args)
        result = args._run(args)
    except KeyboardInterrupt:
        _remove_empty(created)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout has gone (``dffkit bench --list | head``): nothing to say to it,
        # and the interpreter's last flush must not fail again; the files are written
        _quiet_stdout()
        return 141  # as a command ended by SIGPIPE
    except (ValueError, OSError, TypeError, RuntimeError, ImportError) as exc:
        _remove_empty(created)
        print(f"dffkit {args.command}: error: {_as_flags(_message(exc), args._parser)}", file=sys.stderr)
        return 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    return int(result or 0)


def _quiet_stdout() -> None:
    """Point stdout at the null device (Python's advice for a closed pipe: the interpreter
    flushes stdout again at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout)
        pass


# Options several subcommands share, by their argparse dest: the flag, the test and what the
# value must be. Checked by ``_check_options`` before a subcommand runs (so before it creates
# its output folder or reads an image); a subcommand without the option is not concerned.
_OPTION_CHECKS = {
    "k": ("-k/--concepts", lambda v: v >= 1, "at least 1 (the number of concepts)"),
    "max_iter": ("--max-iter", lambda v: v >= 0, "a non-negative int (0: no NMF iteration)"),
    "tol": ("--tol", lambda v: math.isfinite(v) and v >= 0,
            "a finite number >= 0 (0: run all --max-iter iterations)"),
    "seed": ("--seed", lambda v: v >= 0, "a non-negative int"),
    "threshold": ("--threshold", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1] (relative heat)"),
}


def _check_options(args) -> None:
    """ValueError naming the flag, the value and the range for a shared option (``-k``,
    ``--max-iter``, ``--tol``, ``--seed``, ``--threshold``) whose value is out of range."""
    for dest, (flag, valid, requirement) in _OPTION_CHECKS.items():
        value = getattr(args, dest, None)
        if value is not None and not valid(value):
            raise ValueError(f"{flag} must be {requirement}, got {value}")


def _as_flags(text: str, parser) -> str:
    """``text`` with a subcommand option's Python spelling (``negatives='clip'``, as the
    library's messages put it) in the command line's (``--negatives clip``)."""
    flags = {a.dest: max(a.option_strings, key=len) for a in getattr(parser, "_actions", ())
             if a.option_strings and a.nargs != 0}
    if not flags:
        return text
    names = "|".join(re.escape(d) for d in sorted(flags, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({names})=(?:'([^']*)'|\"([^\"]*)\"|([\w.+-]+))")

    def flag(m) -> str:
        value = next(g for g in m.groups()[1:] if g is not None)
        return f"{flags[m.group(1)]} {shlex.quote(value)}"

    return pattern.sub(flag, text)


def _missing_folders(out) -> list:
    """The folders on the way to ``out`` (``out`` included) that do not exist yet, deepest
    first: the ones a failing command may have created and should not leave behind."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        return []
    path = Path(out).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(folders) -> None:
    """Remove those of ``folders`` (deepest first) that a failed command left empty."""
    for folder in folders:
        try:
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:  # in use, or no longer ours to remove: leave it
            pass


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
