"""Retry recovery: what a task attempt finds of the attempts before it (Ray reruns a task whose
worker process or node died).

An earlier attempt that submitted the task then died must not lead to a second training and a
second submission: its run carries ``sharecl.submission_id``, and the summary is rebuilt from that
run. An earlier attempt still RUNNING died before submitting: its run is closed as KILLED.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from share import TrainingMode
from subspace_store.tracking import (
    NO_VALUE,
    TAG_ATTEMPT,
    TAG_BASE_VERSION,
    TAG_JOB,
    TAG_STATUS,
    TAG_SUBMISSION,
    TAG_TASK,
)
from workers import tracking
from workers.task_job import TaskJob, TaskSummary
from workers.task_tracking import EVAL_METRIC, METRIC_TRAINABLE, PARAM_GPU_IDS, PARAM_MODE, PARAM_NODE, PARAM_NODE_IP


def earlier_attempts(job: TaskJob) -> list[Any]:
    """The MLflow runs of earlier attempts at ``job`` (same job id and task)."""
    return tracking.find_runs(
        job.tracking_uri,
        job.experiment_id,
        f"tags.`{TAG_JOB}` = '{job.job_id}' and tags.`{TAG_TASK}` = '{job.task}'",
    )


def submitted_attempt(runs: list[Any]) -> Any | None:
    """The earlier attempt that got the task into the stream, if one did."""
    return next((r for r in runs if r.data.tags.get(TAG_SUBMISSION)), None)


def close_dead_attempts(job: TaskJob) -> int:
    """End the runs of earlier attempts still RUNNING (their worker died: this attempt is Ray's retry)."""
    return tracking.close_stale_attempts(job.tracking_uri, job.experiment_id, job.job_id, job.task)


def summary_of_submitted(job: TaskJob, run: Any, attempts: int, started: float) -> TaskSummary:
    """The summary of an attempt that submitted before its worker died, from its MLflow run (which is
    ended FINISHED if it was left RUNNING)."""
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if run.info.status == "RUNNING":
        mlflow_run = tracking.TrackedRun(job.tracking_uri, run.info.run_id)
        mlflow_run.set_tags({TAG_STATUS: "submitted (its worker died afterwards)"})
        mlflow_run.finish("FINISHED")
    base = tags.get(TAG_BASE_VERSION)
    base = None if base in (None, NO_VALUE) else base
    print(f"[{job.task}] already submitted by attempt {tags.get(TAG_ATTEMPT)}", file=sys.stderr, flush=True)
    return TaskSummary(
        task=job.task,
        submission_id=tags[TAG_SUBMISSION],
        mode=TrainingMode(params[PARAM_MODE]),
        base_version=base,
        pin=(base, job.pin_id) if base else None,
        eval_metrics={k[len(EVAL_METRIC) :]: v for k, v in metrics.items() if k.startswith(EVAL_METRIC)},
        trainable_params=int(metrics.get(METRIC_TRAINABLE, 0)),
        gpu_ids=tuple(g for g in params.get(PARAM_GPU_IDS, NO_VALUE).split(",") if g != NO_VALUE),
        node=params.get(PARAM_NODE),
        node_ip=params.get(PARAM_NODE_IP),
        mlflow_run_id=run.info.run_id,
        attempt=attempts + 1,
        eval_spec=job.eval_spec(),
        seconds=time.time() - started,
    )
