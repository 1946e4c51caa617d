"""The ``dffkit`` command line: one subcommand per job.

Each subcommand lives in the module that implements it; the module exposes
``CLI = {"name": (add_arguments, run, help)}`` and is imported only to build the parser.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"dffkit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
