"""The body of a task job: pull the head, train one task, evaluate it, submit it to the stream.

On an error the attempt's MLflow run ends FAILED with the error as a tag, its pin is released, and
the error propagates (Ray hands it to the driver, which records the task as failed). MLflow is not
needed to train: an attempt that cannot reach it when it starts trains and submits untracked (one warning).

Along the way the worker writes its task's progress record (``subspace_store.progress``: started,
each training log step with step/total/loss, submitted or failed), which ``sharecl status`` and the
job driver show with an ETA. Hugging Face progress bars ("Loading weights") are off in workers: a job's
log has one line per log step and task instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from share import TrainingMode
from subspace_store import (
    StoreConnectionError,
    Submission,
    SubmissionStream,
    SubspaceStore,
    VersionNotFoundError,
    connect,
)
from subspace_store.connection import outlast_restarts, redact
from subspace_store.evalspec import EVAL_KEY
from subspace_store.progress import ProgressBoard, TaskPhase, TaskProgress
from workers import recovery
from workers.data import TaskSplit
from workers.instruction_data import InstructionSplit, load_task_split
from workers.models import build_share_model
from workers.placement import Placement, current_placement
from workers.task import train_task
from workers.task_job import TaskJob, TaskJobError, TaskSummary
from workers.task_tracking import quietly, record_failure, record_submission, start_task_run
from workers.tracking import progress_logger

Split = TaskSplit | InstructionSplit  # a classification or an instruction task's split
T = TypeVar("T")


HF_PROGRESS_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
QUIET_ENV = {HF_PROGRESS_BARS_ENV: "1"}  # the env every sharecl Ray task and job runs with (jobs.runner)


def quiet_hugging_face() -> None:
    """No Hugging Face progress bars ("Loading weights", downloads) in this process: in a worker they
    only clutter the job's log. The env var covers the libraries imported later (both read it on import),
    the calls those already imported (importing them here would cost a task that never uses them a second)."""
    os.environ.update(QUIET_ENV)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' bars, and huggingface_hub's through it
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


class ProgressReporter:
    """Writes this attempt's progress record, best effort: a record that cannot be written (Redis away)
    never fails or slows the task; the first such failure is printed."""

    RECONNECT_S = 30.0

    def __init__(self, job: TaskJob, node: str | None) -> None:
        self.job, self.node = job, node
        self.started = time.time()
        self.attempt: int | None = None
        self.total = 0
        self._board: ProgressBoard | None = None
        self._tried: float | None = None  # time.monotonic() of the last connection attempt
        self._failed = False

    def _connected(self) -> ProgressBoard | None:
        """The board, on its own client without outlast_restarts' retries (a write during an outage is
        skipped, not waited for); connecting is tried again at most every ``RECONNECT_S``."""
        if self._board is None and (self._tried is None or time.monotonic() - self._tried >= self.RECONNECT_S):
            self._tried = time.monotonic()
            try:
                self._board = ProgressBoard(connect(self.job.redis_url, timeout_s=2.0), self.job.namespace)
            except Exception as err:
                self._warn(err)
        return self._board

    def report(self, phase: TaskPhase, **fields: Any) -> None:
        board = self._connected()
        if board is None:
            return
        progress = TaskProgress(
            task=self.job.task,
            phase=phase,
            started=self.started,
            updated=time.time(),
            attempt=self.attempt,
            node=self.node,
            **fields,
        )
        try:
            board.report(self.job.job_id, progress)
        except Exception as err:
            self._warn(err)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """``on_metrics`` of training: one record per log step (the last one: evaluating)."""
        phase = TaskPhase.EVALUATING if step >= self.total else TaskPhase.TRAINING
        loss = metrics.get("loss")
        self.report(
            phase,
            step=step,
            total=self.total,
            loss=None if loss is None else float(loss),
            train_seconds=float(metrics.get("elapsed_s", 0.0)),
        )

    def close(self) -> None:
        if self._board is not None:
            self._board.client.close()

    def _warn(self, err: BaseException) -> None:
        if not self._failed:
            self._failed = True
            print(f"[{self.job.task}] progress record not written ({err!r}); the task goes on", file=sys.stderr)


def run_task_job(job: TaskJob) -> TaskSummary:
    """Train, evaluate and submit one task; returns what it did."""
    started = time.time()
    quiet_hugging_face()
    placement = current_placement()
    progress = ProgressReporter(job, placement.where)
    progress.report(TaskPhase.STARTING)
    client = _connect(job.redis_url)
    store = SubspaceStore(client, job.namespace)
    stream = SubmissionStream(client, job.namespace)
    base, pinned, run = None, False, None
    try:
        submitted = recovery.find_submitted(job, stream)
        if submitted is not None:
            # An earlier attempt submitted, then its worker died: never train and submit twice.
            summary = recovery.summary_of_submitted(job, submitted, recovery.count_earlier_attempts(job), started)
            progress.report(TaskPhase.SUBMITTED)
            return summary
        train_split, eval_split = _load_data(job)
        earlier = _tracked(job, lambda: _close_earlier_attempts(job))  # None: MLflow failed, train untracked
        attempt = (earlier or 0) + 1
        progress.attempt = attempt

        base, base_tasks = _start_base(job, store)
        pinned = base is not None
        if job.task in base_tasks:
            raise TaskJobError(
                f"task {job.task!r} is already in version {base} of namespace {job.namespace!r}; "
                "give the task a new name, or use another store.namespace"
            )
        if job.mode == TrainingMode.COEFFICIENTS and base is None:
            raise TaskJobError(
                f"task {job.task!r}: training.mode=coefficients needs a subspace, but namespace {job.namespace!r} "
                "holds no version yet; use training.mode=auto (LoRA for the first tasks) or lora"
            )
        mode = TrainingMode.resolve(job.mode, has_base=base is not None)
        spec = job.spec(mode)
        progress.total = spec.steps
        progress.report(TaskPhase.TRAINING, step=0, total=spec.steps)
        if earlier is not None:
            run = _tracked(
                job,
                lambda: start_task_run(job, spec, base, attempt, placement, train_split.num_labels, len(train_split)),
            )
        print(
            f"[{job.task}] start: mode {mode}, base {base or '- (cold start)'}, {len(train_split)} examples, "
            f"{spec.steps} steps, node {placement.where}, gpu {placement.gpus_label} ({placement.device}), "
            f"attempt {attempt}",
            file=sys.stderr,
            flush=True,
        )

        model, tokenizer = build_share_model(
            job.builder,
            job.model_name_or_path,
            job.target_modules,
            train_split.num_labels,
            spec.seed,
            placement.device,
            dtype=job.dtype,
            gradient_checkpointing=job.gradient_checkpointing,
        )
        if mode is TrainingMode.COEFFICIENTS:
            # Bases only: the new task's coefficients are relative to them; old tasks are not needed.
            model.load_subspace(store.get(base, tasks=[]))
        log_step = progress_logger(run, job.task, spec.steps)

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            log_step(step, metrics)
            progress.on_metrics(step, metrics)

        trained = train_task(model, spec, train_split, tokenizer, eval_split, on_metrics=on_metrics)
        eval_metrics = {k: float(v) for k, v in trained.eval_metrics.items()}
        summary = TaskSummary(
            task=job.task,
            submission_id="",  # set once submitted
            mode=mode,
            base_version=base,
            pin=(base, job.pin_id) if pinned else None,
            eval_metrics=eval_metrics,
            trainable_params=trained.result.trainable_params,
            gpu_ids=placement.gpu_ids,
            node=placement.node,
            node_ip=placement.node_ip,
            mlflow_run_id="" if run is None else run.run_id,
            attempt=attempt,
            eval_spec=job.eval_spec(),
            seconds=0.0,
        )
        submission = _submission(job, summary, model, trained, train_split, placement)
        # Recorded under the task's attempt key with the entry: a retry finds it (and cannot submit twice).
        submission_id = stream.submit(submission)
        # Submitted: from here on nothing may fail the task (tracking is recorded best effort).
        progress.report(TaskPhase.SUBMITTED, step=spec.steps, total=spec.steps)
        if run is not None:
            quietly(lambda: record_submission(run, submission_id, trained.result, eval_metrics))
        print(
            f"[{job.task}] submitted {submission_id} (base {base or '-'}, {_eval_line(eval_metrics)}, "
            f"{summary.trainable_params} trainable params)",
            file=sys.stderr,
            flush=True,
        )
        return dataclasses.replace(summary, submission_id=submission_id, seconds=time.time() - started)
    except BaseException as err:
        progress.report(TaskPhase.FAILED, error=f"{type(err).__name__}: {err}")
        if pinned and base is not None:
            quietly(lambda: store.unpin(base, job.pin_id))
        if run is not None:
            record_failure(run, err)
        raise
    finally:
        client.close()
        progress.close()


def _close_earlier_attempts(job: TaskJob) -> int:
    """How many attempts ran before this one (as MLflow knows them); those left RUNNING (their worker died:
    this attempt is Ray's retry) are ended KILLED."""
    earlier = len(recovery.earlier_attempts(job))
    recovery.close_dead_attempts(job)
    return earlier


def _tracked(job: TaskJob, call: Callable[[], T]) -> T | None:
    """``call()`` (an MLflow step before training), or None with a warning if MLflow fails: the attempt
    then trains and submits untracked (the store, not MLflow, holds what a task did)."""
    try:
        return call()
    except Exception as err:
        print(
            f"[{job.task}] warning: MLflow at {redact(job.tracking_uri)} failed ({err!r}); "
            "this attempt trains untracked (no MLflow run)",
            file=sys.stderr,
            flush=True,
        )
        return None


def _eval_line(metrics: dict[str, float]) -> str:
    """The task's score as the log shows it: accuracy (classification), ROUGE-L and exact match (generation)."""
    if "accuracy" in metrics:
        return f"eval accuracy {metrics['accuracy']:.3f}"
    if "rougeL" in metrics:
        exact = f", exact match {metrics['exact_match']:.3f}" if "exact_match" in metrics else ""
        return f"eval rougeL {metrics['rougeL']:.3f}{exact}"
    return "no eval split"


CONNECT_WAIT_S = 60.0  # a task that starts while Redis restarts waits this long for it


def _connect(url: str) -> Any:
    """A client that waits out a Redis restart: at connect (up to ``CONNECT_WAIT_S``) and on every
    command afterwards (``outlast_restarts``). The driver reached this URL before launching the task,
    so a refusal here is an outage, not a wrong address or password."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            return outlast_restarts(connect(url))
        except StoreConnectionError as err:
            if time.monotonic() >= deadline:
                raise
            print(f"[sharecl] waiting for Redis: {err}", file=sys.stderr, flush=True)
            time.sleep(1.0)


def _submission(
    job: TaskJob, summary: TaskSummary, model: Any, trained: Any, train_split: Split, placement: Placement
) -> Submission:
    """The stream entry: the trained task (compact for coefficients) and what the coordinator and
    later readers need to know about it (``metadata``, with its eval spec under ``"eval"``)."""
    spec = job.spec(summary.mode)
    metadata = {
        "job_id": job.job_id,
        "mode": summary.mode,
        "base_model": job.base_model,
        "model_name_or_path": job.model_name_or_path,
        "builder": job.builder,
        "dtype": job.dtype.value,
        "max_length": spec.max_length,
        "target_modules": list(job.target_modules),
        "train_path": job.train_path,
        "eval_path": job.eval_path,
        "num_labels": train_split.num_labels,
        "label_names": train_split.label_names,
        "eval_metrics": summary.eval_metrics,
        "trainable_params": summary.trainable_params,
        "mlflow_run_id": summary.mlflow_run_id,
        "node": placement.node,
        "node_ip": placement.node_ip,
        "hostname": placement.hostname,
        "gpu_ids": list(placement.gpu_ids),
        "attempt": summary.attempt,
    }
    if summary.eval_spec is not None:
        metadata[EVAL_KEY] = summary.eval_spec.to_dict()  # the coordinator evaluates the task after every merge
    if summary.mode is TrainingMode.COEFFICIENTS:
        # Compact: coefficients and temporary directions relative to the base version's bases,
        # which the coordinator rebuilds exactly (also when the head has moved on meanwhile).
        update = model.trained_update()
        update.metadata.update(trained.adapter.metadata)
        return Submission(
            job.task,
            adapter=None,
            update=update,
            base_version=summary.base_version,
            metadata=metadata,
            allow_over_bound=job.allow_over_bound,
            attempt_key=job.attempt_key,
        )
    return Submission(
        job.task,
        adapter=trained.adapter,
        base_version=summary.base_version,
        metadata=metadata,
        allow_over_bound=job.allow_over_bound,
        attempt_key=job.attempt_key,
    )


def _load_data(job: TaskJob) -> tuple[Split, Split | None]:
    """The task's splits, classification (``text``, ``label``) or instruction (``prompt``, ``response``)
    as their columns say (``load_task_split``); a ``TaskJobError`` naming every problem otherwise."""
    train, evaluation, problems = read_task_splits(job.task, job.train_path, job.eval_path, job.num_labels)
    if problems or train is None:
        raise TaskJobError(f"task {job.task!r}: " + "; ".join(problems))
    return train, evaluation


def read_task_splits(
    task: str, train_path: str, eval_path: str | None, num_labels: int | None = None
) -> tuple[Split | None, Split | None, list[str]]:
    """Both splits of ``task`` read as its worker reads them, and every problem found (empty: the worker
    will accept them). Each problem names its file and the fix. ``sharecl submit`` runs this on every
    task before launching anything (``jobs.runner.check_task_files``)."""
    problems: list[str] = []
    splits: dict[str, Split] = {}
    for split, path in (("training split", train_path), ("eval split", eval_path)):
        if path is None:
            continue
        try:
            splits[split] = load_task_split(path)
        except (ValueError, OSError) as err:  # FileNotFoundError, a ShareClError, or the reader's ValueError
            problems.append(f"{split}: {err}")
    train, evaluation = splits.get("training split"), splits.get("eval split")
    if train is not None and len(train) == 0:
        problems.append(f"training split {train_path} is empty; add rows")
    if train is not None and num_labels is not None and isinstance(train, InstructionSplit):
        problems.append(
            f"num_labels is {num_labels} but {train_path} is an instruction split (prompt, response), which has "
            "no classes; remove num_labels from the task"
        )
    elif train is not None and num_labels is not None and num_labels != train.num_labels:
        problems.append(
            f"num_labels is {num_labels} but {train_path} names {train.num_labels} classes {train.label_names}; "
            "remove num_labels from the job or fix the data"
        )
    if train is not None and evaluation is not None:
        if type(evaluation) is not type(train):
            kinds = {TaskSplit: "a classification split (text, label)", InstructionSplit: "an instruction split"}
            problems.append(
                f"eval split {eval_path} is {kinds[type(evaluation)]} but the training split {train_path} is "
                f"{kinds[type(train)]}; write both splits in one format"
            )
        elif evaluation.label_names != train.label_names:
            problems.append(
                f"eval split {eval_path} has classes {evaluation.label_names}, the training split "
                f"{train.label_names}; write both splits with the same label_names"
            )
    return train, evaluation, problems


def _start_base(job: TaskJob, store: SubspaceStore) -> tuple[str | None, list[str]]:
    """Pin the head (atomically: the version pinned is the head at that moment) and return it with
    its task names; ``(None, [])`` on a cold start."""
    if store.head() is None:
        return None, []
    try:
        version = store.pin("head", job.pin_id, ttl_s=job.pin_ttl_s)
    except VersionNotFoundError:
        return None, []
    return version, list(store.manifest(version)["tasks"])
