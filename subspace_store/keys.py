"""Redis key layout of one store namespace.

Two kinds of keys:

- Commit keys (head, versions, tags, pins, writing, the submission stream and its payloads, merged,
  rejected, attempts, manifests, progress) carry the hash tag ``{namespace}``: on a Redis Cluster
  they all live in one slot, so WATCH/MULTI/EXEC and the submit script over them stay valid.
- Version payload keys (bases, task payloads, rotations, task entries and numbers) carry no hash tag
  (``sharecl:<namespace>:v:<version>:...``): a cluster spreads them over its masters by the whole
  key. They are written before the commit that makes them visible and never change, so no
  transaction needs them. Stores written before this layout keep their payloads at
  ``sharecl:{<namespace>}:v:<version>:...`` (the legacy form, in the namespace's slot); a manifest
  records each payload's key, readers follow it, and both forms are accepted (``basis_keys``,
  ``task_keys``).
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

    # -- version payloads: no hash tag, spread over a cluster's slots --------------------------------
    def payload_prefix(self, version: str) -> str:
        """Prefix of every payload key ``version`` writes (its bases, task payloads and rotations)."""
        return f"sharecl:{self.namespace}:v:{version}:"

    def legacy_payload_prefix(self, version: str) -> str:
        """Prefix of ``version``'s payload keys in stores written before payloads left the namespace's slot."""
        return f"{self.prefix}v:{version}:"

    def basis(self, version: str, module: str) -> str:
        return f"{self.payload_prefix(version)}basis:{module}"

    def task(self, version: str, task: str) -> str:
        return f"{self.payload_prefix(version)}task:{task}"

    def rotation(self, version: str, module: str) -> str:
        return f"{self.payload_prefix(version)}rotation:{module}"

    def entries(self, version: str, part: int) -> str:
        """Format 4: part ``part`` of the entries (JSON) of the tasks whose payloads ``version`` wrote."""
        return f"{self.payload_prefix(version)}entries:{part}"

    def numbers(self, version: str) -> str:
        """Format 4: every task's per-version numbers in ``version`` (float64 rows, ``codec.NUMBER_FIELDS``)."""
        return f"{self.payload_prefix(version)}numbers"

    def basis_keys(self, version: str, module: str) -> tuple[str, str]:
        """Where ``version`` may keep ``module``'s basis: (current form, legacy form)."""
        return self.basis(version, module), f"{self.legacy_payload_prefix(version)}basis:{module}"

    def task_keys(self, version: str, task: str) -> tuple[str, str]:
        """Where ``version`` may keep ``task``'s payload: (current form, legacy form)."""
        return self.task(version, task), f"{self.legacy_payload_prefix(version)}task:{task}"

    def owned_by(self, version: str, key: str) -> bool:
        """Whether ``key`` is one of ``version``'s own keys (payloads in either form, or its manifest)."""
        return key.startswith((self.payload_prefix(version), self.legacy_payload_prefix(version)))

    def payload_version(self, key: str) -> str | None:
        """The version whose payload ``key`` is (either form), or None if it is no payload key of this namespace."""
        for prefix in (f"sharecl:{self.namespace}:v:", f"{self.prefix}v:"):
            if key.startswith(prefix):
                version = key[len(prefix) :].split(":", 1)[0]
                return version if version_number(version) is not None else None
        return None

    def in_namespace_slot(self, key: str) -> bool:
        """Whether ``key`` carries the namespace's hash tag (may join a transaction over the commit keys)."""
        return key.startswith(self.prefix)

    def submission_payload(self, uid: str) -> str:
        return f"{self.prefix}sub:{uid}"
