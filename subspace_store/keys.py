"""Redis key layout of one store namespace.

Every key of a namespace carries the hash tag ``{namespace}``, so on a Redis Cluster they all live
in one slot and WATCH/MULTI/EXEC over them stays valid.
"""

from __future__ import annotations

import re

from .errors import StoreError

_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise StoreError(
            f"invalid namespace {namespace!r}: use 1-64 letters, digits, '_', '.', '-' starting with a letter or digit"
        )
    return namespace


def version_number(version: str) -> int | None:
    """``"v12"`` -> 12; anything that is not a version id -> None."""
    match = _VERSION.match(version)
    return int(match.group(1)) if match else None


class Keys:
    """Names of every key of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self.prefix = f"sharecl:{{{namespace}}}:"
        self.seq = self.prefix + "seq"  # INCR source of version numbers
        self.head = self.prefix + "head"  # version id of the head
        self.versions = self.prefix + "versions"  # zset: committed version id -> number
        self.tags = self.prefix + "tags"  # hash: tag -> version id
        self.pins = self.prefix + "pins"  # zset: "version|job" -> expiry (unix seconds, server clock)
        self.writing = self.prefix + "writing"  # hash: version id -> {started, keys} of unfinished publishes
        self.stream = self.prefix + "submissions"  # stream of submissions
        self.merged = self.prefix + "merged"  # hash: submission id -> version id that contains it
        self.rejected = self.prefix + "rejected"  # hash: submission id -> JSON {reason, ...}

    def manifest(self, version: str) -> str:
        return f"{self.prefix}v:{version}:manifest"

    def basis(self, version: str, module: str) -> str:
        return f"{self.prefix}v:{version}:basis:{module}"

    def task(self, version: str, task: str) -> str:
        return f"{self.prefix}v:{version}:task:{task}"

    def submission_payload(self, uid: str) -> str:
        return f"{self.prefix}sub:{uid}"
