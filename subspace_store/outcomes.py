"""What the stream says about submissions: typed, so no caller parses a status string.

``SubmissionStream.status(id)`` returns a ``SubmissionState``; ``SubmissionStream.summary()`` a
``StreamSummary`` (counts by state and the newest entries), which is what ``sharecl status`` shows.
``str()`` of either gives the line a person reads; code reads the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SubmissionStatus(StrEnum):
    """Where a submission is on its way into a version."""

    QUEUED = "queued"  # in the stream, not handed to a coordinator yet
    PENDING = "pending"  # handed to a coordinator, neither merged nor rejected yet
    MERGED = "merged"  # in a published version (``SubmissionState.version``)
    REJECTED = "rejected"  # acknowledged without merging (``SubmissionState.reason``)
    UNKNOWN = "unknown"  # no such entry in the stream


@dataclass(frozen=True)
class SubmissionState:
    """The state of one submission: ``version`` is set when merged, ``reason`` when rejected."""

    state: SubmissionStatus
    version: str | None = None
    reason: str | None = None

    @property
    def settled(self) -> bool:
        """Merged or rejected: nothing will happen to it any more."""
        return self.state in (SubmissionStatus.MERGED, SubmissionStatus.REJECTED)

    def __str__(self) -> str:
        if self.state is SubmissionStatus.MERGED:
            return f"merged into {self.version}"
        if self.state is SubmissionStatus.REJECTED:
            return f"rejected: {self.reason}"
        return self.state.value


class SubmissionKind(StrEnum):
    """What a submission's payload holds."""

    ADAPTER = "adapter"  # full LoRA factors (a cold start, an external adapter)
    UPDATE = "update"  # coefficients and temporary directions relative to its base version
    REMOVAL = "removal"  # no payload: a request to take tasks out of the head (``stream.RemovalRequest``)


@dataclass(frozen=True)
class SubmissionRow:
    """One stream entry as ``sharecl status`` lists it."""

    id: str
    task: str
    base_version: str | None
    kind: SubmissionKind
    status: SubmissionState

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, the status as the line a person reads."""
        return {
            "id": self.id,
            "task": self.task,
            "base_version": self.base_version,
            "kind": self.kind.value,
            "status": str(self.status),
        }


@dataclass(frozen=True)
class StreamSummary:
    """Counts of a namespace's submissions by state, and its newest entries (newest first)."""

    total: int
    merged: int
    rejected: int
    pending: int
    newest: list[SubmissionRow] = field(default_factory=list)

    @property
    def queued(self) -> int:
        return max(self.total - self.merged - self.rejected - self.pending, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "merged": self.merged,
            "rejected": self.rejected,
            "pending": self.pending,
            "queued": self.queued,
            "newest": [row.to_dict() for row in self.newest],
        }
