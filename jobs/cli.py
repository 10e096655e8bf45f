# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: `activate-global-python-argcomplete` completes sharecl too)
"""The ``sharecl`` command line.

Each command group lives in its own module under ``jobs/commands`` and exposes
``register(subparsers)``. Modules import their heavy dependencies (ray, redis,
mlflow) inside the command functions so that ``sharecl compress`` stays light.

Errors: a ``ShareClError`` (bad input or state; its message names the input and the fix) and a
missing or existing file are printed as one line, exit status 2. A reader that went away
(``sharecl versions | head -1``) ends the command quietly with status 141, as SIGPIPE would.
Anything else is a bug and keeps its traceback.

Shell completion: ``eval "$(register-python-argcomplete sharecl)"`` in bash (argcomplete answers from
the parser that :func:`build_parser` builds).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import argcomplete

from jobs.errors import CLIError
from share.errors import ShareClError

_COMMAND_MODULES = ("offline", "store", "cluster", "retire", "serve")

__all__ = ["CLIError", "build_parser", "main"]


def package_version() -> str:
    """The installed share-cl version (package metadata), or a note that it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("share-cl")
    except PackageNotFoundError:
        return "unknown (share-cl is not installed; run `pip install -e .` in the checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharecl",
        description="Share continual learning: one shared LoRA subspace, many tasks. Jobs write to their own "
        "store namespace (`sharecl namespaces` lists them; pass one with --namespace NAME).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"jobs.commands.{name}")
        module.register(sub)
    _describe_every_command(parser)
    return parser


def _describe_every_command(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command without a description its one-line help as one, so `sharecl CMD --help`
    always says what CMD does."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        for name, child in action.choices.items():
            if child.description is None and helps.get(name):
                text = helps[name]
                child.description = text[0].upper() + text[1:] + "."
            _describe_every_command(child)


_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # answers and exits when the shell asks for completions, else nothing
    args = parser.parse_args(argv)
    try:
        try:
            code = int(args.func(args) or 0)
        except (ShareClError, FileNotFoundError, FileExistsError) as err:
            # Written to be shown as they are. An error that is also a KeyError (a task missing from a
            # version) would print its message quoted, so its message is taken as given.
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"sharecl {args.command}: error: {message}", file=sys.stderr)
            code = 2
        sys.stdout.flush()  # a closed pipe shows up here at the latest, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return _BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush cannot fail again (the Python docs'
    recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
