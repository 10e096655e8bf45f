"""Redis key layout of one store namespace.

Every key of a namespace carries the hash tag ``{namespace}``, so on a Redis Cluster they all live
in one slot and WATCH/MULTI/EXEC over them stays valid.
"""

from __future__ import annotations

import re

from .errors import StoreError

# Used with fullmatch: ``re.match`` with ``$`` would let a trailing newline through.
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_VERSION = re.compile(r"v([1-9][0-9]*)")
# A module or head tensor name: dot-separated parts of letters, digits, '_' and '-' (what ``named_modules``
# gives for ordinary models). It becomes part of Redis keys and of PEFT tensor names, never a path.
_DOTTED = re.compile(r"[A-Za-z0-9_\-]{1,128}(?:\.[A-Za-z0-9_\-]{1,128}){0,31}")


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise StoreError(
            f"invalid namespace {namespace!r}: use 1-64 letters, digits, '_', '.', '-' starting with a letter or digit"
        )
    return namespace


def version_number(version: str) -> int | None:
    """``"v12"`` -> 12; anything that is not a version id -> None."""
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    return int(match.group(1)) if match else None


def check_version(version: str, where: str = "version") -> str:
    """``version`` if it is a version id (``v1``, ``v2``, ...); else a ``StoreError`` naming ``where`` it came from."""
    if version_number(version) is None:
        raise StoreError(
            f"{where} {version!r}, which is not a version id (v1, v2, ...); share-cl did not write it: "
            "repair or delete that key (a tag: `sharecl untag NAME`)"
        )
    return version


def check_module_name(name: str, what: str = "module") -> str:
    """``name`` if it is a valid module (or head tensor) name; else a ``StoreError`` saying what is allowed."""
    if not isinstance(name, str) or not _DOTTED.fullmatch(name):
        raise StoreError(
            f"invalid {what} name {name!r}: use dot-separated parts of 1-128 letters, digits, '_' or '-' "
            "(as torch's named_modules gives them)"
        )
    return name


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
