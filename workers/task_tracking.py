"""The MLflow run of one task attempt: opened with its tags and params, then recorded as submitted or failed.

A child of the job's run. The tag ``sharecl.submission_id`` is written first once the task is in
the stream, for people and ``sharecl status``; a retried attempt finds the submission in Redis
(``recovery``), never through this tag.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from subspace_store.tracking import (
    NO_VALUE,
    TAG_ATTEMPT,
    TAG_BASE_VERSION,
    TAG_ERROR,
    TAG_FAILED,
    TAG_GPU_IDS,
    TAG_JOB,
    TAG_KIND,
    TAG_NAMESPACE,
    TAG_NODE,
    TAG_STATUS,
    TAG_SUBMISSION,
    TAG_TASK,
    RunKind,
)
from workers.placement import Placement
from workers.task import TaskSpec
from workers.task_job import TaskJob
from workers.tracking import TrackedRun
from workers.train import TrainResult

# Params that recovery reads back (the rest are for people).
PARAM_MODE = "task.mode"
PARAM_GPU_IDS = "gpu_ids"
PARAM_NODE = "node"
PARAM_NODE_IP = "node_ip"
EVAL_METRIC = "eval_"  # + metric name: measured on the eval split right after training
METRIC_TRAINABLE = "trainable_params"


def start_task_run(
    job: TaskJob,
    spec: TaskSpec,
    base: str | None,
    attempt: int,
    placement: Placement,
    num_labels: int,
    train_examples: int,
) -> TrackedRun:
    """Open the attempt's run (a child of the job's run) with its tags and params. If the params cannot be
    logged, the run is ended FAILED and the error raised (no run is left RUNNING)."""
    run = TrackedRun.start(
        job.tracking_uri,
        job.experiment_id,
        name=job.task if attempt == 1 else f"{job.task} (attempt {attempt})",
        parent_run_id=job.parent_run_id,
        tags={
            TAG_KIND: RunKind.TASK,
            TAG_JOB: job.job_id,
            TAG_TASK: job.task,
            TAG_NAMESPACE: job.namespace,
            TAG_STATUS: "training",
            TAG_ATTEMPT: attempt,
            TAG_BASE_VERSION: base or NO_VALUE,
            TAG_NODE: placement.node or placement.hostname,
            TAG_GPU_IDS: placement.gpus_label,
        },
    )
    params = {
        **{f"job.{k}": v for k, v in job.job_params.items()},
        **{f"task.{k}": v for k, v in dataclasses.asdict(spec).items()},
        "task.train_path": job.train_path,
        "task.eval_path": job.eval_path,
        "task.num_labels": num_labels,
        "task.train_examples": train_examples,
        "base_version": base or NO_VALUE,
        "base_model": job.base_model,
        "builder": job.builder,
        "target_modules": ",".join(job.target_modules),
        PARAM_NODE: placement.node,
        PARAM_NODE_IP: placement.node_ip,
        "hostname": placement.hostname,
        PARAM_GPU_IDS: placement.gpus_label,
        "device": placement.device,
    }
    try:
        run.log_params(params)
    except BaseException as err:
        record_failure(run, err)
        raise
    return run


def record_submission(run: TrackedRun, submission_id: str, result: TrainResult, eval_metrics: dict[str, float]) -> None:
    """The task is in the stream: tag it (first), log its curves and metrics, and end the run FINISHED
    (also when one of those steps fails: the task is submitted either way; the failure is raised)."""
    try:
        run.set_tags({TAG_STATUS: "submitted", TAG_SUBMISSION: submission_id})
        # Every step's loss (the live train_loss is a mean over log_every steps).
        run.log_series("loss", result.loss_curve)
        run.log_metrics(
            {
                **{EVAL_METRIC + k: v for k, v in eval_metrics.items()},
                METRIC_TRAINABLE: result.trainable_params,
                "train_final_loss": result.final_loss,
                "train_wall_time_s": result.wall_time_s,
                "train_examples_seen": result.examples_seen,
            }
        )
    finally:
        run.finish("FINISHED")


def record_failure(run: TrackedRun, err: BaseException) -> None:
    """End the run FAILED (KILLED when interrupted) with the error as a tag. Best effort."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
    quietly(lambda: run.set_tags({TAG_STATUS: "failed", TAG_ERROR: repr(err)}))
    quietly(lambda: run.finish(status))


def record_task_failure_on_job(job_run: TrackedRun, task: str, reason: str) -> None:
    """Tag the job's run with why ``task`` failed (``failed/<task>``: the reason), also when the task
    failed before its own MLflow run started (bad data, an import error, a worker that never came up);
    ``subspace_store.tracking.failed_tasks`` reads them back. Best effort: the job goes on."""
    quietly(lambda: job_run.set_tags({TAG_FAILED + task: reason or "failed (no reason given)"}))


def quietly(fn: Callable[[], Any]) -> None:
    """Run a cleanup step; report, never raise, if it fails (the task's own outcome stands)."""
    try:
        fn()
    except Exception as err:
        print(f"[sharecl] cleanup step failed: {err!r}", file=sys.stderr)
