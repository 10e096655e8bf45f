"""Where each task of a running job is: one Redis hash per job, one field per task.

The worker writes its task's record when it starts, at every training log step (step, total, loss)
and when it ends (submitted, or failed with the reason); the job driver writes ``failed`` for a task
whose worker died before it could. ``sharecl status`` and the driver's heartbeat read them back to
show step/total, loss and an ETA per task. The hash is ``sharecl:{<namespace>}:progress:<job_id>``
and expires ``PROGRESS_TTL_S`` after its last write: it is a view of running jobs, not a record
(MLflow keeps that).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import redis

from .errors import StoreError
from .keys import Keys

PROGRESS_TTL_S = 7 * 24 * 3600  # a finished job's records go a week after its last report


class TaskPhase(StrEnum):
    """What a task's worker is doing."""

    STARTING = "starting"  # picked up by a worker: reading its data, building the model
    TRAINING = "training"  # ``step`` of ``total`` done
    EVALUATING = "evaluating"  # trained; evaluating on its eval split and submitting
    SUBMITTED = "submitted"  # in the stream; the coordinator merges it
    FAILED = "failed"  # ``error`` says why

    @property
    def finished(self) -> bool:
        return self in (TaskPhase.SUBMITTED, TaskPhase.FAILED)


@dataclass(frozen=True)
class TaskProgress:
    """One task's latest report. Times are unix seconds of the reporting machine."""

    task: str
    phase: TaskPhase
    started: float  # when this attempt's worker started
    updated: float  # when this record was written
    step: int = 0
    total: int = 0
    loss: float | None = None  # mean training loss since the previous report
    train_seconds: float = 0.0  # training time up to ``step`` (data and model loading not counted)
    attempt: int | None = None
    node: str | None = None
    error: str | None = None

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds of training left at the pace so far (None before the first step or after training)."""
        if self.phase is not TaskPhase.TRAINING or self.step <= 0 or self.total <= self.step:
            return None
        left = self.train_seconds / self.step * (self.total - self.step)
        since = max(0.0, (time.time() if now is None else now) - self.updated)
        return max(0.0, left - since)

    def line(self, now: float | None = None) -> str:
        """``training 40/250, loss 0.5310, ETA 1m20s`` (what status and the job's heartbeat print)."""
        now = time.time() if now is None else now
        parts = [self.phase.value]
        if self.phase in (TaskPhase.TRAINING, TaskPhase.EVALUATING) and self.total:
            parts[0] += f" {self.step}/{self.total}"
        if self.loss is not None and not self.phase.finished:
            parts.append(f"loss {self.loss:.4f}")
        eta = self.eta_s(now)
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        if not self.phase.finished and now - self.updated > STALE_S:
            parts.append(f"last report {duration(now - self.updated)} ago")
        if self.error:
            parts.append(self.error)
        return ", ".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> TaskProgress:
        try:
            data = json.loads(text)
            fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            fields["phase"] = TaskPhase(fields["phase"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise StoreError(
                f"{where} is not a progress record share-cl wrote ({type(err).__name__}: {err}); delete that key"
            ) from None


STALE_S = 300.0  # a running task silent this long gets "last report ... ago" in its line


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h10m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBoard:
    """The progress records of a namespace's jobs."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._prefix = Keys(namespace).prefix + "progress:"

    def key(self, job_id: str) -> str:
        if not job_id or any(c in job_id for c in "{}*?[] \n"):
            raise StoreError(f"job id {job_id!r} cannot name a progress key; use the id `sharecl submit` printed")
        return self._prefix + job_id

    def report(self, job_id: str, progress: TaskProgress) -> None:
        """Write ``progress`` as its task's record of ``job_id`` (replacing the previous one)."""
        key = self.key(job_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, progress.task, progress.to_json())
        pipe.expire(key, PROGRESS_TTL_S)
        pipe.execute()

    def read(self, job_id: str) -> dict[str, TaskProgress]:
        """Task -> its latest record (tasks that never reported are absent)."""
        key = self.key(job_id)
        raw: dict[Any, Any] = self.client.hgetall(key)
        out = {}
        for field, value in raw.items():
            task = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            out[task] = TaskProgress.from_json(value, f"{key} field {task!r}")
        return out


__all__ = ["PROGRESS_TTL_S", "ProgressBoard", "TaskPhase", "TaskProgress", "duration"]
