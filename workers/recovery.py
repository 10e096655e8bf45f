"""Retry recovery: what a task attempt finds of the attempts before it (Ray reruns a task whose
worker process or node died).

An earlier attempt that submitted the task then died must not lead to a second training and a
second submission. The store holds the truth: the stream records each submission under the task's
attempt key (``<job_id>/<task>``, the same for every attempt) in the same transaction as the entry,
so ``find_submitted`` reads it from Redis, and the summary is rebuilt from the entry's metadata
(what the worker recorded when it submitted). MLflow is only brought up to date: the earlier
attempt's run is tagged with the submission and ended if it was left RUNNING. An earlier attempt
whose run is still RUNNING and that submitted nothing died before submitting: its run is closed as KILLED.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from share import TrainingMode
from subspace_store import SubmissionStream
from subspace_store.stream import SubmissionEntry
from subspace_store.tracking import TAG_JOB, TAG_STATUS, TAG_SUBMISSION, TAG_TASK
from workers import tracking
from workers.task_job import TaskJob, TaskSummary


def earlier_attempts(job: TaskJob) -> list[Any]:
    """The MLflow runs of earlier attempts at ``job`` (same job id and task)."""
    return tracking.find_runs(
        job.tracking_uri,
        job.experiment_id,
        f"tags.`{TAG_JOB}` = '{job.job_id}' and tags.`{TAG_TASK}` = '{job.task}'",
    )


def count_earlier_attempts(job: TaskJob) -> int:
    """How many attempts ran before this one, as MLflow knows them (0 if it cannot be read)."""
    try:
        return len(earlier_attempts(job))
    except Exception as err:  # tracking is never needed to recover
        print(f"[{job.task}] could not count earlier attempts in MLflow: {err!r}", file=sys.stderr, flush=True)
        return 0


def find_submitted(job: TaskJob, stream: SubmissionStream) -> SubmissionEntry | None:
    """The submission an earlier attempt at ``job`` made, from Redis; None if none submitted."""
    return stream.submitted(job.attempt_key)


def close_dead_attempts(job: TaskJob) -> int:
    """End the runs of earlier attempts still RUNNING (their worker died: this attempt is Ray's retry)."""
    return tracking.close_stale_attempts(job.tracking_uri, job.experiment_id, job.job_id, job.task)


def summary_of_submitted(job: TaskJob, entry: SubmissionEntry, attempts: int, started: float) -> TaskSummary:
    """The summary of an attempt that submitted before its worker died, from its stream entry.

    ``attempts`` counts the attempts before this one. The earlier attempt's MLflow run (named in the
    entry) gets the submission tag and is ended FINISHED if it was left RUNNING (best effort).
    """
    meta = entry.metadata
    run_id = str(meta.get("mlflow_run_id") or "")
    if run_id:
        _complete_run(job, run_id, entry.id)
    base = entry.base_version
    mode = meta.get("mode")
    print(
        f"[{job.task}] already submitted as {entry.id} by attempt {meta.get('attempt', '?')}; not training again",
        file=sys.stderr,
        flush=True,
    )
    eval_metrics = meta.get("eval_metrics") if isinstance(meta.get("eval_metrics"), dict) else {}
    return TaskSummary(
        task=job.task,
        submission_id=entry.id,
        mode=TrainingMode(mode) if mode else TrainingMode.resolve(job.mode, has_base=base is not None),
        base_version=base,
        pin=(base, job.pin_id) if base else None,
        eval_metrics={k: float(v) for k, v in eval_metrics.items()},
        trainable_params=int(meta.get("trainable_params") or 0),
        gpu_ids=tuple(str(g) for g in meta.get("gpu_ids") or ()),
        node=meta.get("node"),
        node_ip=meta.get("node_ip"),
        mlflow_run_id=run_id,
        attempt=attempts + 1,
        eval_spec=job.eval_spec(),
        seconds=time.time() - started,
    )


def _complete_run(job: TaskJob, run_id: str, submission_id: str) -> None:
    try:
        run = tracking.client(job.tracking_uri).get_run(run_id)
        mlflow_run = tracking.TrackedRun(job.tracking_uri, run_id)
        if run.data.tags.get(TAG_SUBMISSION) != submission_id:
            mlflow_run.set_tags({TAG_SUBMISSION: submission_id})
        if run.info.status == "RUNNING":
            mlflow_run.set_tags({TAG_STATUS: "submitted (its worker died afterwards)"})
            mlflow_run.finish("FINISHED")
    except Exception as err:  # the submission stands whatever MLflow says
        print(f"[{job.task}] could not update MLflow run {run_id}: {err!r}", file=sys.stderr, flush=True)
