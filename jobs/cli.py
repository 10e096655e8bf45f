"""The ``sharecl`` command line.

Each command group lives in its own module under ``jobs/commands`` and exposes
``register(subparsers)``. Modules import their heavy dependencies (ray, redis,
mlflow) inside the command functions so that ``sharecl compress`` stays light.

Errors: a ``ShareClError`` (bad input or state; its message names the input and the fix) and a
missing or existing file are printed as one line, exit status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jobs.errors import CLIError
from share.errors import ShareClError

_COMMAND_MODULES = ("offline", "store", "cluster")

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharecl",
        description="Share continual learning: one shared LoRA subspace, many tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"jobs.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ShareClError, FileNotFoundError, FileExistsError) as err:
        # Written to be shown as they are. An error that is also a KeyError (a task missing from a
        # version) would print its message quoted, so its message is taken as given.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sharecl {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
