"""Command-line options shared by several command groups: where the store lives.

``--redis-url`` and ``--namespace`` mean the same in every command that reads or writes a store
(``sharecl versions``, ``sharecl status``, ``sharecl adapters add``, ...), so they are registered here.
"""

from __future__ import annotations

import argparse
import os

NAMESPACE_ENV = "SHARECL_NAMESPACE"
DEFAULT_NAMESPACE = "default"


def add_store_options(parser: argparse.ArgumentParser, *, with_namespace: bool = True) -> None:
    """Register ``--redis-url URL`` and (unless ``with_namespace`` is False) ``--namespace NAME``; both
    default to None."""
    parser.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="redis://[:password@]host:port/db or rediss://..., redis+cluster://host:port for a Redis Cluster "
        "(default: $SHARECL_REDIS_URL, else embedded Redis)",
    )
    if with_namespace:
        parser.add_argument(
            "--namespace",
            default=None,
            metavar="NAME",
            help="store namespace, so several subspaces share one Redis; `sharecl namespaces` lists them "
            f"(default: ${NAMESPACE_ENV}, else '{DEFAULT_NAMESPACE}')",
        )


def namespace(args: argparse.Namespace) -> str:
    """The namespace a command works in: ``--namespace``, else ``$SHARECL_NAMESPACE``, else "default"."""
    return args.namespace or os.environ.get(NAMESPACE_ENV, "").strip() or DEFAULT_NAMESPACE


def namespace_given(args: argparse.Namespace) -> bool:
    """Whether the user named a namespace (``--namespace`` or ``$SHARECL_NAMESPACE``), rather than the default."""
    return bool(args.namespace or os.environ.get(NAMESPACE_ENV, "").strip())
