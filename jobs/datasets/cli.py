"""The shared end of the dataset builders' ``python -m jobs.datasets.<name>`` commands: parse, prepare, print
one line per task written, and turn a ``ShareClError`` into a one-line error and exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable

from jobs.datasets.taskset import TaskPaths
from share.errors import ShareClError


def run_builder(
    parser: argparse.ArgumentParser,
    argv: Iterable[str] | None,
    prepare: Callable[[argparse.Namespace], list[TaskPaths]],
) -> int:
    """Parse ``argv`` with ``parser``, call ``prepare(args)`` and report its tasks; the exit status."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        tasks = prepare(args)
    except ShareClError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for t in tasks:
        print(f"{t.name}: {', '.join(t.label_names)}  train {t.n_train}  eval {t.n_eval}  -> {t.train.parent}")
    return 0
