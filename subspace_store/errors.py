"""Errors of the store. They derive from ``share.errors.ShareClError`` (a ValueError), so the ``sharecl``
CLI prints them as one line.

Every message names the input at fault (URL without its password, version, key, submission id) and
what to do about it.
"""

from __future__ import annotations

from share.errors import ShareClError


class StoreError(ShareClError):
    """A store operation failed for a reason the user or the caller can act on."""


class StoreConnectionError(StoreError):
    """Redis could not be reached, rejected the credentials, or the URL is malformed."""


class VersionNotFoundError(StoreError):
    """No such version or tag in the namespace (or it was pruned)."""


class HeadConflictError(StoreError):
    """Another publisher moved the head first; rebuild on the new head and retry."""

    def __init__(self, namespace: str, expected: str | None, actual: str | None, attempted: str | None = None):
        self.namespace = namespace
        self.expected = expected
        self.actual = actual
        self.attempted = attempted
        what = f"publishing {attempted}" if attempted else "publishing"
        super().__init__(
            f"head conflict in namespace {namespace!r}: {what} expected head {expected or '(empty store)'}, "
            f"but another publisher moved it to {actual or '(empty store)'}. Nothing was published; "
            f"merge into {actual or 'the empty store'} and retry (expected_head={actual!r})"
        )


class CorruptPayloadError(StoreError):
    """A payload's bytes do not match the checksum recorded in its version's manifest."""

    def __init__(self, version: str, key: str, detail: str):
        self.version = version
        self.key = key
        super().__init__(
            f"corrupted payload in version {version}: key {key!r} {detail}. The version cannot be read; "
            "pull another version (`sharecl versions`) or republish it from a saved subspace folder"
        )


class SubmissionError(StoreError):
    """A submission cannot be acknowledged or rejected (unknown, already merged, or already rejected)."""


class TaskNotFoundError(StoreError, KeyError):
    """The version does not hold the requested task."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
