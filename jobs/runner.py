"""The job driver: run every task of a job on Ray and follow it until the coordinator merged them.

run_job(cfg) connects (or starts) Ray, makes sure Redis and the coordinator actor are up, opens the
job's MLflow run, launches one Ray task per task job (all at once: Ray runs as many as the cluster's
CPUs/GPUs allow), reports each as it finishes, waits until every submission is merged or rejected,
and prints the accuracy of every task after the last merge plus the `mlflow ui` command.
A task whose worker died more often than ``cluster.max_retries`` allows, or whose code raised, is
recorded as failed; the other tasks go on.

A job whose tasks ask for resources no node of the cluster has (or can get from its autoscaler), or
whose task files a worker would refuse (``check_task_files``), is refused before anything is launched.
A driver that started its own Ray stops the coordinator (which ends its MLflow runs) before shutting
Ray down; runs still open after a bounded wait are marked FAILED. At the end the driver releases its
tasks' pins, except those of submissions not merged yet (the merge wait timed out, Ctrl-C): their base
versions stay pinned until the pins expire, so the coordinator can still merge them. The report is
printed before the job's MLflow run is ended, and tracking failures there are printed, never raised.

While it waits, the driver says at a steady interval (``HEARTBEAT_S``) where each task is (step/total,
loss and ETA from the progress records its worker writes, ``subspace_store.progress``) and, once every
task is trained, which submissions the coordinator has yet to merge and for how long it has waited.
A driver that runs as a Ray Jobs API submission (``sharecl submit --address http://...``) names that
submission (``ray_submission_id(job_id)``) in its output and on its MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from coordinator.matrix import AccuracyMatrix
from jobs.errors import JobConfigError
from jobs.schema import JobConfig, to_dict, validate
from share.errors import ShareClError
from subspace_store import SubmissionStatus, resolve_url
from subspace_store.keys import version_number
from subspace_store.progress import ProgressBoard, TaskPhase, TaskProgress, duration
from subspace_store.tracking import (
    TAG_ERROR,
    TAG_HEAD,
    TAG_JOB,
    TAG_KIND,
    TAG_NAMESPACE,
    TAG_RAY_ADDRESS,
    TAG_RAY_SUBMISSION,
    TAG_STATUS,
    TAG_TASK_OUTCOME,
    TAG_TASKS,
    RunKind,
    resolve_mlflow_uri,
)
from workers import tracking
from workers.capacity import unplaceable
from workers.causal_lm import ModelDtype
from workers.evaluator import EVALUATOR, launch_evaluation
from workers.ray_task import launch
from workers.run_task import QUIET_ENV, read_task_splits
from workers.task_job import DEFAULT_PIN_TTL_S, SPEC_FIELDS, TaskJob, TaskSummary
from workers.task_tracking import record_task_failure_on_job

Say = Callable[[str], None]


def say_line(line: str) -> None:
    """Progress to stdout, flushed: the job's lines interleave with the workers' (Ray, on stderr)
    in order, also when the output goes to a file or a pipe."""
    print(line, flush=True)


POLL_S = 0.5
FLUSH_GRACE_S = 10.0  # how long a job whose merges are all noted lets the coordinator's flush call return
HEARTBEAT_S = 30.0  # how often a driver with nothing new to say says what it waits for
KEEPALIVE_S = 60.0  # the coordinator exits after idle_timeout_s without a call (default 1800 s)
DEFAULT_MERGE_TIMEOUT_S = 1800.0
TRACKING_WAIT_S = 120.0  # how long a driver that owns Ray waits for the coordinator's last MLflow run


class MergeWaitError(ShareClError):
    """The job's submissions were not all merged or rejected in time; the message says which and where to look."""


class TaskState(StrEnum):
    """Where a task of the job is."""

    QUEUED = "queued"  # launched, not finished training
    SUBMITTED = "submitted"  # in the stream, not merged yet
    MERGED = "merged"
    REJECTED = "rejected"  # by the coordinator (``error`` says why)
    FAILED = "failed"  # its code raised, or its worker died more often than retries allow


@dataclass
class TaskOutcome:
    task: str
    status: TaskState = TaskState.QUEUED
    submission_id: str | None = None
    version: str | None = None  # the version that first contained it
    error: str | None = None
    result: TaskSummary | None = None  # the worker's summary


@dataclass
class JobResult:
    job_id: str
    namespace: str
    tasks: dict[str, TaskOutcome]
    head: str | None
    accuracy: dict[str, float]  # every job task's eval accuracy served from ``head``
    matrix: AccuracyMatrix  # accuracy of the job's tasks after each merge
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    seconds: float

    @property
    def ok(self) -> bool:
        return all(t.status is TaskState.MERGED for t in self.tasks.values())

    @property
    def failed(self) -> list[str]:
        return [t.task for t in self.tasks.values() if t.status in (TaskState.FAILED, TaskState.REJECTED)]


def new_job_id() -> str:
    return f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def ray_submission_id(job_id: str) -> str:
    """The Ray Jobs API submission id of sharecl job ``job_id`` (``sharecl-<job_id>``): either id finds the other."""
    return f"sharecl-{job_id}"


# Set by Ray's job supervisor in a submitted driver's env: its JobConfig, with the metadata
# (``job_submission_id``) the submission was given.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def mlflow_ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


# ---------------------------------------------------------------- services


@dataclass(frozen=True)
class RayConnection:
    """The Ray this driver runs its tasks on."""

    owns: bool  # this driver started it, and stops it when the job ends
    local: bool  # a Ray started on this machine for this job
    address: str  # the GCS address (``host:port``), or what the driver was told to connect to
    submission_id: str | None = None  # the Ray Jobs API submission this driver runs in

    def describe(self) -> str:
        """``Ray (local)`` only for a Ray of this job on this machine; else the cluster and the submission."""
        if self.local:
            return "Ray (local)"
        where = f"the Ray cluster at {self.address}"
        return where + (f" (Ray job {self.submission_id})" if self.submission_id else "")


def _will_start_local_ray(cfg: JobConfig, address: str | None) -> bool:
    import ray

    return not ray.is_initialized() and (address or cfg.cluster.address) is None and not os.environ.get("RAY_ADDRESS")


def _connect_ray(cfg: JobConfig, address: str | None, *, dashboard: bool = False) -> RayConnection:
    """Connect to Ray (or start a local one). Every process of the job runs without Hugging Face progress
    bars: a local Ray's workers inherit this env, a cluster's tasks and the coordinator get it as the job's
    ``runtime_env`` (a Jobs API submission carries it already)."""
    import ray

    if ray.is_initialized():
        return RayConnection(owns=False, local=False, address=_gcs_address(str(address or cfg.cluster.address)))
    target = address or cfg.cluster.address
    # Our own env for the local instance's workers: no downloads, ever (docs/architecture.md).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if target is None and os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # a Ray Jobs API entrypoint: the cluster it was submitted to
        return RayConnection(True, False, _gcs_address(os.environ["RAY_ADDRESS"]), _ray_submission_of_driver())
    if target is None:
        # "local": a new Ray for this job, never whatever cluster last ran on this machine (that is
        # what plain ray.init() would join); `--address auto` joins the machine's cluster.
        ray.init(address="local", include_dashboard=dashboard, log_to_driver=True)
        return RayConnection(owns=True, local=True, address=_gcs_address("local"))
    ray.init(address=target, log_to_driver=True, runtime_env={"env_vars": dict(QUIET_ENV)})
    return RayConnection(owns=True, local=False, address=_gcs_address(str(target)))


def _gcs_address(fallback: str) -> str:
    import ray

    try:
        return str(ray.get_runtime_context().gcs_address or fallback)
    except Exception:  # a Ray Client connection has no GCS address to show
        return fallback


def _ray_submission_of_driver() -> str | None:
    """The Ray Jobs API submission id this driver runs in (None outside one)."""
    try:
        metadata = json.loads(os.environ.get(_RAY_JOB_CONFIG_ENV, "{}")).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    found = metadata.get("job_submission_id")
    return str(found) if found else None


def _start_coordinator(cfg: JobConfig, redis_url: str, tracking_uri: str) -> Any:
    """The namespace's coordinator actor (reused if it runs), merging with the job's k policy and
    evaluating tasks with the workers' evaluator (named by import path: the two never import each other)."""
    from coordinator.actor import get_or_start_coordinator

    a = cfg.adapter
    return get_or_start_coordinator(
        cfg.store.namespace,
        redis_url,
        tracking_uri,
        experiment=cfg.experiment_name,
        policy=a.policy,
        evaluator=EVALUATOR,
    )


def check_capacity(cfg: JobConfig) -> None:
    """Refuse a job whose tasks ask for resources that no node of the connected cluster has (nor any
    node type its autoscaler can add): Ray would keep such tasks queued forever without a word."""
    c = cfg.cluster
    problem = unplaceable({"CPU": c.num_cpus_per_task, "GPU": c.num_gpus_per_task})
    if problem is not None:
        raise JobConfigError(
            f"cluster.num_cpus_per_task={c.num_cpus_per_task:g}, cluster.num_gpus_per_task={c.num_gpus_per_task:g}: "
            f"{problem}. Lower them (cluster.num_gpus_per_task=0 trains on the CPU), or run the job on a cluster "
            "whose nodes have them (cluster.address / --address)"
        )


def check_task_files(cfg: JobConfig, *, missing_ok: bool = False) -> None:
    """Read every task's splits as its worker will (``workers.run_task.read_task_splits``: the columns,
    the Parquet metadata such as ``label_names``, labels in range, both splits alike) and refuse the job
    with one message naming every bad file and what it lacks. ``missing_ok``: a task whose files are not
    on this machine is left to its worker (a cluster's paths need not exist where the driver runs);
    remote URIs always are."""
    problems = []
    for i, task in enumerate(cfg.tasks):
        paths = [p for p in (task.train, task.eval) if p is not None]
        if any("://" in p for p in paths) or (missing_ok and not all(Path(p).expanduser().exists() for p in paths)):
            continue
        _, _, found = read_task_splits(task.name, task.train, task.eval, task.num_labels)
        problems += [f"tasks.{i} ({task.name}): {problem}" for problem in found]
    if problems:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise JobConfigError(
            f"{len(problems)} problem(s) in the job's task files; nothing was launched. Fix them (workers.data."
            f"write_split / workers.instruction_data.write_instruction_split write valid splits) and submit again:\n"
            f"{lines}"
        )


def _check_new_tasks(store: Any, cfg: JobConfig) -> None:
    if store.head() is None:
        return
    manifest = store.manifest("head")
    taken = [t.name for t in cfg.tasks if t.name in manifest["tasks"]]
    if taken:
        raise JobConfigError(
            f"task(s) {', '.join(taken)} already in version {manifest['version']} of namespace "
            f"{cfg.store.namespace!r}; rename them in the job (tasks.N.name=...) or use another "
            "store.namespace (e.g. store.namespace=run2)"
        )


def task_jobs(
    cfg: JobConfig,
    job_id: str,
    redis_url: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str | None,
) -> list[TaskJob]:
    """One ``TaskJob`` per task of ``cfg`` (what each worker receives)."""
    t, a = cfg.training, cfg.adapter
    spec = {
        "steps": t.steps,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "max_length": cfg.model.max_length,
        "weight_decay": t.weight_decay,
        "seed": t.seed,
        "r": a.r,
        "lora_alpha": a.lora_alpha,
        "p": a.pseudo_rank,
        "phi": a.phi,
        "log_every": t.log_every,
        "eval_batch_size": t.eval_batch_size,
        "lr_scheduler": t.lr_scheduler,
        "warmup_ratio": t.warmup_ratio,
        "max_grad_norm": t.max_grad_norm,
        "lora_lr": t.lora_lr,
    }
    assert set(spec) == set(SPEC_FIELDS), sorted(set(SPEC_FIELDS) ^ set(spec))
    params = {k: v for k, v in to_dict(cfg).items() if not k.startswith("tasks.")}
    return [
        TaskJob(
            job_id=job_id,
            task=task.name,
            train_path=task.train,
            eval_path=task.eval,
            redis_url=redis_url,
            namespace=cfg.store.namespace,
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            target_modules=tuple(a.target_modules),
            model_name_or_path=cfg.model.name_or_path,
            builder=cfg.model.builder,
            dtype=ModelDtype.parse(cfg.model.dtype),
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            num_labels=task.num_labels,
            mode=t.mode,
            training=spec,
            parent_run_id=parent_run_id,
            job_params=params,
            allow_over_bound=a.allow_over_bound,
        )
        for task in cfg.tasks
    ]


# ---------------------------------------------------------------- the job


class RunningJob:
    """A launched job. ``wait()`` follows it to the end (all merged or failed) and returns the result."""

    def __init__(
        self,
        cfg: JobConfig,
        job_id: str,
        refs: dict[Any, str],
        *,
        store: Any,
        stream: Any,
        coordinator: Any,
        run: tracking.TrackedRun,
        experiment_id: str,
        redis_url: str,
        owns_ray: bool,
        say: Say,
        started: float,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.cfg = cfg
        self.job_id = job_id
        self.refs = refs
        self.store = store
        self.stream = stream
        self.progress = ProgressBoard(store.client, cfg.store.namespace)
        self.coordinator = coordinator
        self.run = run
        self.experiment_id = experiment_id
        self.redis_url = redis_url
        self.owns_ray = owns_ray
        self.say = say
        self.started = started
        self.heartbeat_s = heartbeat_s
        self.outcomes = {task.name: TaskOutcome(task.name) for task in cfg.tasks}

    # -- following ------------------------------------------------------------------------------
    def wait(self, merge_timeout_s: float = DEFAULT_MERGE_TIMEOUT_S) -> JobResult:
        import ray

        try:
            self._follow_tasks()
            self._follow_merges(merge_timeout_s)
            head = self.store.head()
            accuracy, matrix = self._accuracy(head)
            result = JobResult(
                job_id=self.job_id,
                namespace=self.cfg.store.namespace,
                tasks=self.outcomes,
                head=head,
                accuracy=accuracy,
                matrix=matrix,
                tracking_uri=self.run.uri,
                experiment_id=self.experiment_id,
                parent_run_id=self.run.run_id,
                seconds=time.time() - self.started,
            )
            self._report(result)  # first: the job's outcome stands whatever MLflow does next
            self._finish_run(result)
            return result
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt) and not self.owns_ray:
                # On a cluster that outlives this driver: stop the tasks it launched.
                for ref in self.refs:
                    _quietly(lambda ref=ref: ray.cancel(ref, force=True))
            _abort_run(self.run, err)
            raise
        finally:
            _quietly(self._release_pins)
            if self.owns_ray:
                # Ray goes down with this driver: let the coordinator finish its step and its MLflow
                # runs first (bounded), and end whatever it could not.
                _quietly(self._stop_coordinator)
                ray.shutdown()

    def _release_pins(self) -> None:
        """Unpin the base versions of the job's tasks (``<job_id>/<task>``), except those of submissions not
        merged or rejected yet (a merge wait that timed out, Ctrl-C): the coordinator needs their base
        version to merge them, so those pins stay until they expire (their TTL)."""
        unmerged = [o.task for o in self.outcomes.values() if o.status is TaskState.SUBMITTED]
        self.store.release_pins(self.job_id, keep={f"{self.job_id}/{t}" for t in unmerged})
        if unmerged:
            self.say(
                f"[job] the base versions of {', '.join(unmerged)} (submitted, not merged yet) stay pinned until "
                f"their pins expire ({duration(DEFAULT_PIN_TTL_S)}), so the coordinator can still merge them"
            )

    def _stop_coordinator(self) -> None:
        from coordinator.actor import stop_coordinator

        status = stop_coordinator(self.cfg.store.namespace, timeout_s=TRACKING_WAIT_S)
        if status is not None and not status.get("loop_alive") and not status.get("open_runs"):
            return
        left = list(status.get("open_runs") or []) if status is not None and not status.get("loop_alive") else None
        closed = _fail_open_merge_runs(
            self.run.uri,
            self.cfg.experiment_name,
            self.cfg.store.namespace,
            left,
            f"the job driver shut down Ray before the coordinator finished tracking this merge "
            f"(waited up to {TRACKING_WAIT_S:.0f}s); the store holds the version and its numbers",
        )
        if closed:
            self.say(f"[job] marked {len(closed)} merge run(s) the coordinator could not finish as FAILED: {closed}")

    def _follow_tasks(self) -> None:
        import ray

        pending = list(self.refs)
        total, done = len(pending), 0
        last_news = last_touch = time.time()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            self._note_merges()
            if time.time() - last_touch > KEEPALIVE_S:
                touch = getattr(self.coordinator, "touch", None)
                if touch is not None:
                    _quietly(lambda touch=touch: touch.remote())  # no answer awaited
                last_touch = time.time()
            if not ready:
                if time.time() - last_news > self.heartbeat_s:
                    running = [self.refs[ref] for ref in pending]
                    self.say(f"[job] {done}/{total} task(s) finished; {self._where_tasks_are(running)}")
                    last_news = time.time()
                continue
            for ref in ready:
                done += 1
                last_news = time.time()
                outcome = self.outcomes[self.refs[ref]]
                try:
                    summary: TaskSummary = ray.get(ref)
                except Exception as err:
                    outcome.status, outcome.error = TaskState.FAILED, _describe_failure(err)
                    self._close_task_runs(outcome.task)
                    self._record_failure(outcome)
                    self.say(f"[job] {done}/{total} {outcome.task}: FAILED: {outcome.error}")
                    continue
                outcome.status, outcome.result = TaskState.SUBMITTED, summary
                outcome.submission_id = summary.submission_id
                acc = summary.eval_metrics.get("accuracy")
                gpus = ",".join(summary.gpu_ids) or "none"
                self.say(
                    f"[job] {done}/{total} {outcome.task}: submitted {outcome.submission_id} "
                    f"({summary.mode}, base {summary.base_version or '-'}, eval accuracy "
                    f"{'n/a' if acc is None else f'{acc:.3f}'}, node {summary.node_ip}, gpu {gpus}, "
                    f"attempt {summary.attempt})"
                )

    def _where_tasks_are(self, tasks: list[str]) -> str:
        """``fruit training 40/250, loss 0.5310, ETA 1m20s; colors queued (no worker has started it)``."""
        try:
            records = self.progress.read(self.job_id)
        except Exception as err:  # progress is a view; the job goes on without it
            return f"{len(tasks)} training or queued (progress records unreadable: {err})"
        now = time.time()
        parts = []
        for task in tasks:
            record = records.get(task)
            parts.append(f"{task} {record.line(now) if record else 'queued (no worker has started it)'}")
        return "; ".join(parts)

    def _record_failure(self, outcome: TaskOutcome) -> None:
        """Why the task failed, on the job's MLflow run and in its progress record (``sharecl status``
        shows it also when the task failed before its worker could write either)."""
        reason = outcome.error or "failed (no reason given)"
        record_task_failure_on_job(self.run, outcome.task, reason)

        def note() -> None:
            record = self.progress.read(self.job_id).get(outcome.task)
            if record is not None and record.phase is TaskPhase.FAILED and record.error:
                return  # the worker's own account stands
            now = time.time()
            started = record.started if record is not None else now
            failed = TaskProgress(outcome.task, TaskPhase.FAILED, started, now, error=reason)
            self.progress.report(self.job_id, failed)

        _quietly(note)

    def _close_task_runs(self, task: str) -> None:
        """A worker killed for the last time leaves its MLflow run RUNNING; end it as FAILED."""
        _quietly(
            lambda: tracking.close_stale_attempts(self.run.uri, self.experiment_id, self.job_id, task, status="FAILED")
        )

    def _note_merges(self) -> bool:
        """Update submitted tasks whose submission was merged or rejected; True when none is left open."""
        open_left = False
        for outcome in self.outcomes.values():
            if outcome.status is not TaskState.SUBMITTED:
                continue
            state = self.stream.status(outcome.submission_id)
            if state.state is SubmissionStatus.MERGED:
                outcome.status, outcome.version = TaskState.MERGED, state.version
                self.say(f"[job] {outcome.task}: merged into {outcome.version}")
            elif state.state is SubmissionStatus.REJECTED:
                outcome.status, outcome.error = TaskState.REJECTED, state.reason
                self.say(f"[job] {outcome.task}: REJECTED by the coordinator: {outcome.error}")
            else:
                open_left = True
        return not open_left

    def _follow_merges(self, timeout_s: float) -> None:
        import ray

        if self._note_merges():
            return
        self.say(f"[job] every task finished training; waiting for the coordinator to merge {self._open_submissions()}")
        flush = getattr(self.coordinator, "flush", None)
        flushing = flush.remote() if flush is not None else None
        waiting_since = last_news = time.time()
        deadline = waiting_since + timeout_s
        while not self._note_merges():
            if time.time() - last_news > self.heartbeat_s:
                self.say(
                    f"[job] still waiting for the coordinator to merge {self._open_submissions()}: "
                    f"{duration(time.time() - waiting_since)} so far{self._stream_state()}"
                )
                last_news = time.time()
            if time.time() > deadline:
                open_tasks = {
                    o.task: o.submission_id for o in self.outcomes.values() if o.status is TaskState.SUBMITTED
                }
                raise MergeWaitError(
                    f"task(s) {open_tasks} (task: submission) were neither merged nor rejected within "
                    f"{timeout_s:.0f}s{self._coordinator_error()}; check the coordinator with `sharecl status "
                    f"--namespace {self.cfg.store.namespace}` and its log in the Ray dashboard (their base versions "
                    "stay pinned, so the coordinator can still merge them)"
                )
            if flushing is not None:
                ready, _ = ray.wait([flushing], timeout=POLL_S)
                if ready:
                    try:
                        ray.get(ready[0])
                    except ray.exceptions.RayActorError:
                        # The coordinator is gone (stopped, or exited when idle): start it again.
                        self.say("[job] the coordinator is gone; starting it again")
                        self.coordinator = _start_coordinator(self.cfg, self.redis_url, self.run.uri)
                    except Exception as err:
                        self.say(f"[job] still waiting for the coordinator ({type(err).__name__}: {err})")
                    flushing = None
            else:
                time.sleep(POLL_S)
        if flushing is not None:
            # Every merge is noted; the coordinator's flush ends at its next idle step. Let it, briefly: a flush
            # still running when the job stops the coordinator dies with it (and Ray logs the killed call).
            ray.wait([flushing], timeout=FLUSH_GRACE_S)

    def _open_submissions(self) -> str:
        """``fruit (1718-0), colors (1719-0)``: the job's submissions neither merged nor rejected yet."""
        open_ones = [o for o in self.outcomes.values() if o.status is TaskState.SUBMITTED]
        return ", ".join(f"{o.task} ({o.submission_id})" for o in open_ones) or "nothing"

    def _stream_state(self) -> str:
        """``; namespace 'x' has 3 submission(s) queued, 1 being merged``, read from Redis (the coordinator
        may be busy merging and slow to answer)."""
        try:
            summary = self.stream.summary(last=1)
        except Exception:
            return ""
        return (
            f"; namespace {self.cfg.store.namespace!r} has {summary.queued} submission(s) queued and "
            f"{summary.pending} being merged"
        )

    def _coordinator_error(self) -> str:
        """``; the coordinator's last error: ...`` when it reports one (empty otherwise)."""
        import ray

        try:
            status = ray.get(self.coordinator.status.remote(), timeout=30)
        except Exception:
            return ""
        error = status.get("last_error") if isinstance(status, dict) else None
        return f"; the coordinator's last error: {error}" if error else ""

    # -- results --------------------------------------------------------------------------------
    def _accuracy(self, head: str | None) -> tuple[dict[str, float], AccuracyMatrix]:
        """Accuracy of every merged task of this job served from ``head``, and the matrix over versions.

        The rows come from the coordinator's merge runs in MLflow (it evaluates every task after every
        merge). If the head's row is missing there (tracking down, evaluation failed), the final row
        is measured here, in one Ray task (its failure is said, not raised: the scores are left out).
        """
        import ray

        merged = [t for t in self.cfg.tasks if self.outcomes[t.name].status is TaskState.MERGED and t.eval is not None]
        if head is None or not merged:
            return {}, AccuracyMatrix()
        names = [t.name for t in merged]
        matrix = _matrix_from_merge_runs(self.run.uri, self.experiment_id, self.cfg.store.namespace).only(names)
        last = matrix.row(head) or {}
        missing = [t for t in names if t not in last]
        if missing:
            results = [self.outcomes[t].result for t in missing]
            specs = {r.task: r.eval_spec for r in results if r is not None and r.eval_spec is not None}
            if specs:
                try:
                    ref = launch_evaluation(
                        self.redis_url,
                        self.cfg.store.namespace,
                        head,
                        specs,
                        num_cpus=self.cfg.cluster.num_cpus_per_task,
                        num_gpus=self.cfg.cluster.num_gpus_per_task,
                    )
                    last.update(ray.get(ref))
                except Exception as err:  # the job's outcome stands; only its scores are missing
                    self.say(f"[job] could not evaluate {head} for {', '.join(specs)}: {_describe_failure(err)}")
            matrix.add(head, [], last)
        return {t: last[t] for t in names if t in last}, matrix

    def _finish_run(self, result: JobResult) -> None:
        """The job's results on its MLflow run, which ends FINISHED (all merged) or FAILED. Best effort: a
        step that fails is printed and the next one tried."""
        metrics: dict[str, float] = {f"accuracy/{t}": v for t, v in result.accuracy.items()}
        if result.accuracy:
            metrics["accuracy_mean"] = sum(result.accuracy.values()) / len(result.accuracy)
        metrics["tasks_merged"] = sum(o.status is TaskState.MERGED for o in result.tasks.values())
        metrics["tasks_failed"] = len(result.failed)
        metrics["job_seconds"] = result.seconds
        # step = the version the job ended on, as the coordinator's per-version series (no stray point at 0).
        _quietly(lambda: self.run.log_metrics(metrics, step=version_number(result.head) or 0))
        if result.matrix:
            columns = [t.name for t in self.cfg.tasks]
            csv = result.matrix.csv_text(columns, new_tasks=False)
            _quietly(lambda: self.run.log_text(csv, "accuracy_matrix.csv"))
        tags = {
            TAG_TASK_OUTCOME + o.task: o.status.value + (f" {o.version}" if o.version else "")
            for o in self.outcomes.values()
        }
        tags[TAG_STATUS] = "merged" if result.ok else f"{len(result.failed)} failed"
        tags[TAG_HEAD] = result.head or "none"
        _quietly(lambda: self.run.set_tags(tags))
        _quietly(lambda: self.run.finish("FINISHED" if result.ok else "FAILED"))

    def _report(self, result: JobResult) -> None:
        say = self.say
        say("")
        say(f"job {result.job_id}: {len(result.tasks)} task(s) in {result.seconds:.0f}s, head {result.head or '-'}")
        for o in result.tasks.values():
            extra = f" into {o.version}" if o.version else ""
            err = f": {o.error}" if o.error else ""
            say(f"  {o.task}: {o.status}{extra}{err}")
        if result.matrix:
            say("")
            say(result.matrix.text([t.name for t in self.cfg.tasks]))
        if result.accuracy:
            mean = sum(result.accuracy.values()) / len(result.accuracy)
            say(f"mean accuracy after the last merge ({result.head}): {mean:.3f}")
        say("")
        say(f"MLflow: experiment {self.cfg.experiment_name!r}, job run {result.parent_run_id}. Watch it with:")
        say(f"  {mlflow_ui_command(result.tracking_uri)}")


def _describe_failure(err: BaseException) -> str:
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = getattr(err, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
        return str(err).strip().splitlines()[-1]
    if isinstance(err, rex.WorkerCrashedError | rex.NodeDiedError | rex.OutOfMemoryError):
        return f"the worker died and retries ran out ({type(err).__name__}); see the worker log in the Ray dashboard"
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def _matrix_from_merge_runs(uri: str, experiment_id: str, namespace: str) -> AccuracyMatrix:
    """The namespace's accuracy matrix from the coordinator's finished merge runs (empty if MLflow
    cannot be read: the job's own result is still reported)."""
    from coordinator.tracking import load_matrix

    try:
        return load_matrix(tracking.client(uri), experiment_id, namespace)
    except Exception as err:
        print(f"[job] could not read the merge runs from MLflow: {err!r}", file=sys.stderr)
        return AccuracyMatrix()


def _fail_open_merge_runs(
    uri: str, experiment: str, namespace: str, run_ids: list[str] | None, reason: str
) -> list[str]:
    """End as FAILED (with ``reason``) the namespace's merge runs still RUNNING: ``run_ids`` if given,
    else every one. Returns the ids it ended."""
    from coordinator.tracking import MergeTracker, merge_runs

    tracker = MergeTracker(uri, experiment, namespace)
    running = [r.info.run_id for r in merge_runs(tracker.client, tracker.experiment_id, namespace, "RUNNING")]
    chosen = [r for r in running if run_ids is None or r in run_ids]
    return [run_id for run_id in chosen if tracker.fail(run_id, reason)]


def _abort_run(run: tracking.TrackedRun, err: BaseException) -> None:
    """End the job's run as aborted by ``err`` (KILLED for Ctrl-C, else FAILED). Best effort."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    _quietly(lambda: run.set_tags({TAG_STATUS: "aborted", TAG_ERROR: repr(err)}))
    _quietly(lambda: run.finish(status))


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as err:
        print(f"[job] cleanup step failed: {err!r}", file=sys.stderr)


# ---------------------------------------------------------------- entry point


def start_job(
    cfg: JobConfig,
    *,
    address: str | None = None,
    say: Say = say_line,
    job_id: str | None = None,
    dashboard: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
) -> RunningJob:
    """Connect everything and launch every task; returns at once (``.wait()`` follows the job).

    ``job_id``: the id to run under (a Jobs API submission passes the one its submission id names);
    ``dashboard``: a local Ray starts its dashboard; ``heartbeat_s``: how often the driver says what it
    waits for when nothing else happened.
    """
    from subspace_store import SubmissionStream, SubspaceStore, connect
    from subspace_store.connection import outlast_restarts

    validate(cfg, check_files=False)
    # Before anything heavy: every task file a worker would refuse. Files missing here are the workers'
    # to find when the tasks run on a cluster (its paths need not exist where the driver runs).
    check_task_files(cfg, missing_ok=not _will_start_local_ray(cfg, address))
    started = time.time()
    job_id = job_id or new_job_id()
    redis_url = resolve_url(cfg.store.redis_url)
    client = outlast_restarts(connect(redis_url))  # the driver follows the job through a Redis restart
    store = SubspaceStore(client, cfg.store.namespace)
    stream = SubmissionStream(client, cfg.store.namespace)
    _check_new_tasks(store, cfg)

    tracking_uri = resolve_mlflow_uri(cfg.tracking.mlflow_uri)
    experiment_id = tracking.ensure_experiment(tracking_uri, cfg.experiment_name)
    ray_at = _connect_ray(cfg, address, dashboard=dashboard)
    run: tracking.TrackedRun | None = None
    try:
        check_capacity(cfg)
        coordinator = _start_coordinator(cfg, redis_url, tracking_uri)
        tags = {
            TAG_KIND: RunKind.JOB,
            TAG_JOB: job_id,
            TAG_NAMESPACE: cfg.store.namespace,
            TAG_STATUS: "running",
            TAG_TASKS: ",".join(t.name for t in cfg.tasks),
            TAG_RAY_ADDRESS: "local" if ray_at.local else ray_at.address,
        }
        if ray_at.submission_id:
            tags[TAG_RAY_SUBMISSION] = ray_at.submission_id
        run = tracking.TrackedRun.start(tracking_uri, experiment_id, name=job_id, tags=tags)
        run.log_params(to_dict(cfg))
        jobs = task_jobs(cfg, job_id, redis_url, tracking_uri, experiment_id, run.run_id)
        c = cfg.cluster
        refs = {
            launch(
                job,
                num_cpus=c.num_cpus_per_task,
                num_gpus=c.num_gpus_per_task,
                max_retries=c.max_retries,
                runtime_env=dict(c.runtime_env) or None,
            ): job.task
            for job in jobs
        }
    except BaseException as err:
        if run is not None:  # e.g. Ray refused a task's options: no job run is left RUNNING
            _abort_run(run, err)
        if ray_at.owns:
            import ray

            ray.shutdown()
        raise
    say(
        f"[job] {job_id}: {len(refs)} task(s) launched on {ray_at.describe()}, namespace "
        f"{cfg.store.namespace!r}, head {store.head() or '- (cold start)'}"
    )
    say(f"[job] watch it: {mlflow_ui_command(tracking_uri)}   (or `sharecl status --namespace {cfg.store.namespace}`)")
    return RunningJob(
        cfg,
        job_id,
        refs,
        store=store,
        stream=stream,
        coordinator=coordinator,
        run=run,
        experiment_id=experiment_id,
        redis_url=redis_url,
        owns_ray=ray_at.owns,
        say=say,
        started=started,
        heartbeat_s=heartbeat_s,
    )


def run_job(
    cfg: JobConfig,
    *,
    address: str | None = None,
    say: Say = say_line,
    merge_timeout_s: float = DEFAULT_MERGE_TIMEOUT_S,
    job_id: str | None = None,
) -> JobResult:
    """Run ``cfg`` on Ray (local unless ``address`` or ``cluster.address``) and follow it to the end."""
    return start_job(cfg, address=address, say=say, job_id=job_id).wait(merge_timeout_s)


__all__ = [
    "JobResult",
    "MergeWaitError",
    "RayConnection",
    "RunningJob",
    "TaskOutcome",
    "TaskState",
    "check_capacity",
    "check_task_files",
    "mlflow_ui_command",
    "new_job_id",
    "ray_submission_id",
    "run_job",
    "start_job",
    "task_jobs",
]
