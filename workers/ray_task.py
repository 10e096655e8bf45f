"""A task job as a Ray task: pull the head, train one task, evaluate it, submit it to the stream.

``launch(job, ...)`` schedules :func:`run_task_job` on the cluster with the job's resources
(``num_gpus`` from ``cluster.num_gpus_per_task``). Ray reruns it if its worker process or node dies
(``max_retries``); an error raised by the task itself (bad data, divergence) is not retried: the
driver records the task as failed. Everything the worker needs travels in :class:`TaskJob`, so the
same function runs on a laptop, on a GPU node of a cluster, or directly in a test without Ray.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from subspace_store import tracking as names
from workers.task import TaskSpec

# TaskSpec fields a job sets; name and mode are decided per task.
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec) if f.name not in ("name", "mode"))
HEAD_MODULE = "head"
DEFAULT_PIN_TTL_S = 24 * 3600.0
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TaskJob:
    """One task of a job, with the resolved service addresses (a worker resolves nothing itself:
    a default such as the sqlite file under ``./.sharecl`` would mean another file on another node)."""

    job_id: str
    task: str
    train_path: str
    eval_path: str | None
    redis_url: str
    namespace: str
    tracking_uri: str
    experiment_id: str
    target_modules: tuple[str, ...] = ("query", "value")
    model_name_or_path: str | None = None
    builder: str = "hf-text-classifier"
    max_length: int = 128
    num_labels: int | None = None
    mode: str = "auto"  # auto: lora when the store has no version yet, else coefficients
    training: dict[str, Any] = field(default_factory=dict)  # TaskSpec fields (SPEC_FIELDS)
    parent_run_id: str | None = None
    job_params: dict[str, Any] = field(default_factory=dict)  # logged with the task's run
    pin_ttl_s: float = DEFAULT_PIN_TTL_S

    def __post_init__(self) -> None:
        unknown = sorted(set(self.training) - set(SPEC_FIELDS))
        if unknown:
            raise ValueError(f"TaskJob.training has unknown keys {unknown}; allowed: {', '.join(SPEC_FIELDS)}")
        if self.mode not in ("auto", "lora", "coefficients"):
            raise ValueError(f"TaskJob.mode {self.mode!r} must be auto, lora or coefficients")

    @property
    def pin_id(self) -> str:
        """The id this task's pin on its base version carries (one per task: a job's tasks may start
        from different versions, and one task unpinning must not release another's)."""
        return f"{self.job_id}/{self.task}"

    @property
    def base_model(self) -> str:
        return self.model_name_or_path or BUNDLED_MODEL

    def spec(self, mode: str) -> TaskSpec:
        return TaskSpec(name=self.task, mode=mode, **self.training)  # type: ignore[arg-type]


def _placement() -> dict[str, Any]:
    """Where this attempt runs: node, node IP, host, and the GPU ids Ray assigned."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "node": None, "node_ip": None, "gpu_ids": []}
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            info["node"] = context.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
    except Exception as err:  # placement is reported, never needed to train
        print(f"[sharecl] could not read Ray placement: {err}", file=sys.stderr)
    return info


def _device(gpu_ids: list[str]) -> str:
    import torch

    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so "cuda" is this task's GPU. Declared GPUs
    # on a machine without CUDA (tests, CPU clusters that label nodes) train on the CPU.
    return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"


def _load_data(job: TaskJob) -> tuple[Any, Any]:
    from workers.data import load_split

    train = load_split(job.train_path)
    if len(train) == 0:
        raise ValueError(f"task {job.task!r}: training split {job.train_path} is empty; add rows")
    if job.num_labels is not None and job.num_labels != train.num_labels:
        raise ValueError(
            f"task {job.task!r}: num_labels is {job.num_labels} but {job.train_path} names {train.num_labels} "
            f"classes {train.label_names}; remove num_labels from the job or fix the data"
        )
    evaluation = None
    if job.eval_path is not None:
        evaluation = load_split(job.eval_path)
        if evaluation.label_names != train.label_names:
            raise ValueError(
                f"task {job.task!r}: eval split {job.eval_path} has classes {evaluation.label_names}, the training "
                f"split {train.label_names}; write both splits with the same label_names"
            )
    return train, evaluation


def _build_model(job: TaskJob, num_labels: int, seed: int, device: str) -> tuple[Any, Any]:
    from share import ShareModel
    from workers.models import get_builder

    model, tokenizer = get_builder(job.builder)(job.model_name_or_path, num_labels, seed)
    model = model.to(device)
    names = {name for name, _ in model.named_modules()}
    heads = [HEAD_MODULE] if HEAD_MODULE in names else []
    return ShareModel(model, list(job.target_modules), heads=heads), tokenizer


def _start_base(job: TaskJob, store: Any) -> tuple[str | None, list[str]]:
    """Pin the head (atomically: the version pinned is the head at that moment) and return it with
    its task names; ``(None, [])`` on a cold start."""
    from subspace_store import VersionNotFoundError

    if store.head() is None:
        return None, []
    try:
        version = store.pin("head", job.pin_id, ttl_s=job.pin_ttl_s)
    except VersionNotFoundError:
        return None, []
    return version, list(store.manifest(version)["tasks"])


def run_task_job(job: TaskJob) -> dict[str, Any]:
    """Train, evaluate and submit one task; returns a small JSON-able summary.

    On an error the task's MLflow run ends FAILED with the error as a tag, its pin is released, and
    the error propagates (Ray hands it to the driver).
    """
    from subspace_store import Submission, SubmissionStream, SubspaceStore, connect
    from workers import tracking
    from workers.task import train_task

    started = time.time()
    placement = _placement()
    client = connect(job.redis_url)
    store = SubspaceStore(client, job.namespace)
    stream = SubmissionStream(client, job.namespace)
    base, pinned, run = None, False, None
    try:
        train_split, eval_split = _load_data(job)
        earlier = tracking.find_runs(
            job.tracking_uri,
            job.experiment_id,
            f"tags.`{names.TAG_JOB}` = '{job.job_id}' and tags.`{names.TAG_TASK}` = '{job.task}'",
        )
        submitted = next((r for r in earlier if r.data.tags.get(names.TAG_SUBMISSION)), None)
        if submitted is not None:
            # An earlier attempt submitted, then its worker died: never train and submit twice.
            return _earlier_result(job, submitted, placement, len(earlier), started)
        # A RUNNING earlier attempt is one whose worker died: Ray is retrying it as this attempt.
        tracking.close_stale_attempts(job.tracking_uri, job.experiment_id, job.job_id, job.task)

        base, base_tasks = _start_base(job, store)
        pinned = base is not None
        if job.task in base_tasks:
            raise ValueError(
                f"task {job.task!r} is already in version {base} of namespace {job.namespace!r}; "
                "give the task a new name, or use another store.namespace"
            )
        mode = ("lora" if base is None else "coefficients") if job.mode == "auto" else job.mode
        if mode == "coefficients" and base is None:
            raise ValueError(
                f"task {job.task!r}: training.mode=coefficients needs a subspace, but namespace {job.namespace!r} "
                "holds no version yet; use training.mode=auto (LoRA for the first tasks) or lora"
            )
        spec = job.spec(mode)
        attempt = len(earlier) + 1
        device = _device(placement["gpu_ids"])
        run = tracking.TrackedRun.start(
            job.tracking_uri,
            job.experiment_id,
            name=job.task if attempt == 1 else f"{job.task} (attempt {attempt})",
            parent_run_id=job.parent_run_id,
            tags={
                names.TAG_KIND: "task",
                names.TAG_JOB: job.job_id,
                names.TAG_TASK: job.task,
                names.TAG_NAMESPACE: job.namespace,
                names.TAG_STATUS: "training",
                "sharecl.attempt": attempt,
                "sharecl.base_version": base or "none",
                "sharecl.node": placement["node"] or placement["hostname"],
                "sharecl.gpu_ids": ",".join(placement["gpu_ids"]) or "none",
            },
        )
        run.log_params(
            {
                **{f"job.{k}": v for k, v in job.job_params.items()},
                **{f"task.{k}": v for k, v in dataclasses.asdict(spec).items()},
                "task.train_path": job.train_path,
                "task.eval_path": job.eval_path,
                "task.num_labels": train_split.num_labels,
                "task.train_examples": len(train_split),
                "base_version": base or "none",
                "base_model": job.base_model,
                "builder": job.builder,
                "target_modules": ",".join(job.target_modules),
                "node": placement["node"],
                "node_ip": placement["node_ip"],
                "hostname": placement["hostname"],
                "gpu_ids": ",".join(placement["gpu_ids"]) or "none",
                "device": device,
            }
        )
        print(
            f"[{job.task}] start: mode {mode}, base {base or '- (cold start)'}, {len(train_split)} examples, "
            f"{spec.steps} steps, node {placement['node_ip'] or placement['hostname']}, "
            f"gpu {','.join(placement['gpu_ids']) or 'none'} ({device}), attempt {attempt}",
            file=sys.stderr,
            flush=True,
        )

        model, tokenizer = _build_model(job, train_split.num_labels, spec.seed, device)
        if base is not None and mode == "coefficients":
            # Bases only: the new task's coefficients are relative to them; old tasks are not needed.
            model.load_subspace(store.get(base, tasks=[]))
        trained = train_task(
            model,
            spec,
            train_split,
            tokenizer,
            eval_split,
            on_metrics=tracking.progress_logger(run, job.task, spec.steps),
        )
        trainable = trained.result.trainable_params
        eval_metrics = {k: float(v) for k, v in trained.eval_metrics.items()}

        metadata = {
            "job_id": job.job_id,
            "mode": mode,
            "base_model": job.base_model,
            "model_name_or_path": job.model_name_or_path,
            "builder": job.builder,
            "max_length": spec.max_length,
            "target_modules": list(job.target_modules),
            "train_path": job.train_path,
            "eval_path": job.eval_path,
            "num_labels": train_split.num_labels,
            "label_names": train_split.label_names,
            "eval_metrics": eval_metrics,
            "trainable_params": trainable,
            "mlflow_run_id": run.run_id,
            "node": placement["node"],
            "node_ip": placement["node_ip"],
            "hostname": placement["hostname"],
            "gpu_ids": placement["gpu_ids"],
            "attempt": attempt,
        }
        spec_for_eval = eval_spec(job)
        if spec_for_eval is not None:
            metadata["eval"] = spec_for_eval  # the coordinator evaluates the task after every merge
        if mode == "coefficients":
            # Compact: coefficients and temporary directions relative to the base version's bases,
            # which the coordinator rebuilds exactly (also when the head has moved on meanwhile).
            update = model.trained_update()
            update.metadata.update(trained.adapter.metadata)
            submission = Submission(job.task, adapter=None, update=update, base_version=base, metadata=metadata)
        else:
            submission = Submission(job.task, adapter=trained.adapter, base_version=base, metadata=metadata)
        submission_id = stream.submit(submission)
        # Submitted: from here on nothing may fail the task (tracking is recorded best effort).
        _quietly(lambda: _record_submission(run, submission_id, trained.result, eval_metrics))
        accuracy = eval_metrics.get("accuracy")
        print(
            f"[{job.task}] submitted {submission_id} (base {base or '-'}, "
            f"eval accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'}, {trainable} trainable params)",
            file=sys.stderr,
            flush=True,
        )
        return {
            "task": job.task,
            "submission_id": submission_id,
            "mode": mode,
            "base_version": base,
            "pin": [base, job.pin_id] if pinned else None,
            "eval_metrics": eval_metrics,
            "trainable_params": trainable,
            "gpu_ids": placement["gpu_ids"],
            "node": placement["node"],
            "node_ip": placement["node_ip"],
            "mlflow_run_id": run.run_id,
            "attempt": attempt,
            "eval_spec": spec_for_eval,
            "seconds": time.time() - started,
        }
    except BaseException as err:
        if pinned and base is not None:
            _quietly(lambda: store.unpin(base, job.pin_id))
        if run is not None:
            status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
            error = repr(err)
            _quietly(lambda: run.set_tags({names.TAG_STATUS: "failed", names.TAG_ERROR: error}))
            _quietly(lambda: run.finish(status))
        raise
    finally:
        client.close()


def _record_submission(run: Any, submission_id: str, result: Any, eval_metrics: dict[str, float]) -> None:

    # First: a retry of this task (its worker died after this point) finds it and does not submit again.
    run.set_tags({names.TAG_STATUS: "submitted", names.TAG_SUBMISSION: submission_id})
    # Every step's loss (the live train_loss is a mean over log_every steps).
    run.log_series("loss", result.loss_curve)
    run.log_metrics(
        {
            **{f"eval_{k}": v for k, v in eval_metrics.items()},
            "trainable_params": result.trainable_params,
            "train_final_loss": result.final_loss,
            "train_wall_time_s": result.wall_time_s,
            "train_examples_seen": result.examples_seen,
        }
    )
    run.finish("FINISHED")


def _earlier_result(job: TaskJob, run: Any, placement: dict[str, Any], attempts: int, started: float) -> dict[str, Any]:
    """The summary of an attempt that submitted before its worker died, from its MLflow run."""
    from workers import tracking

    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if run.info.status == "RUNNING":
        mlflow_run = tracking.TrackedRun(job.tracking_uri, run.info.run_id)
        mlflow_run.set_tags({names.TAG_STATUS: "submitted (its worker died afterwards)"})
        mlflow_run.finish("FINISHED")
    base = tags.get("sharecl.base_version")
    base = None if base in (None, "none") else base
    print(f"[{job.task}] already submitted by attempt {tags.get('sharecl.attempt')}", file=sys.stderr, flush=True)
    return {
        "task": job.task,
        "submission_id": tags[names.TAG_SUBMISSION],
        "mode": params.get("task.mode"),
        "base_version": base,
        "pin": [base, job.pin_id] if base else None,
        "eval_metrics": {k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_")},
        "trainable_params": int(metrics.get("trainable_params", 0)),
        "gpu_ids": [g for g in params.get("gpu_ids", "none").split(",") if g != "none"],
        "node": params.get("node"),
        "node_ip": params.get("node_ip"),
        "mlflow_run_id": run.info.run_id,
        "attempt": attempts + 1,
        "eval_spec": eval_spec(job),
        "seconds": time.time() - started,
    }


def _quietly(fn: Any) -> None:
    try:
        fn()
    except Exception as err:
        print(f"[sharecl] cleanup step failed: {err!r}", file=sys.stderr)


def release_pins(store: Any, job_id: str) -> list[str]:
    """Unpin every version that a task of ``job_id`` pinned (including tasks whose worker died)."""
    released = []
    for version, holders in store.pins().items():
        for holder in holders:
            if holder.startswith(job_id + "/"):
                store.unpin(version, holder)
                released.append(f"{version}:{holder}")
    return released


EVALUATOR = "workers.ray_task:evaluate_subspace"
_MODELS: dict[tuple[Any, ...], tuple[Any, Any]] = {}  # evaluation models by (builder, model, targets)


def eval_spec(job: TaskJob) -> dict[str, Any] | None:
    """What the coordinator needs to evaluate this task after every merge (``metadata["eval"]``)."""
    if job.eval_path is None:
        return None
    return {
        "evaluator": EVALUATOR,
        "eval_path": job.eval_path,
        "builder": job.builder,
        "model_name_or_path": job.model_name_or_path,
        "target_modules": list(job.target_modules),
        "max_length": job.max_length,
        "batch_size": int(job.training.get("eval_batch_size", 64)),
    }


def _eval_model(spec: dict[str, Any], num_labels: int) -> tuple[Any, Any]:
    """A ShareModel for ``spec``'s base model, kept between calls (the coordinator evaluates after
    every merge; building the model each time would cost more than the evaluation)."""
    key = (spec["builder"], spec.get("model_name_or_path"), tuple(spec["target_modules"]))
    if key not in _MODELS:
        if len(_MODELS) >= 2:
            _MODELS.pop(next(iter(_MODELS)))
        job = TaskJob(
            job_id="eval",
            task="eval",
            train_path="",
            eval_path=None,
            redis_url="",
            namespace="eval",
            tracking_uri="",
            experiment_id="",
            target_modules=key[2],
            model_name_or_path=key[1],
            builder=key[0],
        )
        # The template head's width does not matter: every stored task brings its own head.
        _MODELS[key] = _build_model(job, max(num_labels, 2), 0, _device(_placement()["gpu_ids"]))
    return _MODELS[key]


def evaluate_subspace(subspace: Any, specs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The coordinator's evaluator: accuracy of each task in ``specs`` served from ``subspace``.

    ``specs`` are :func:`eval_spec` dicts; tasks sharing a base model are evaluated on one model.
    """
    from workers.data import load_split
    from workers.task import evaluate_tasks

    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for task, spec in specs.items():
        key = (spec["builder"], spec.get("model_name_or_path"), tuple(spec["target_modules"]), spec["max_length"])
        groups.setdefault(key, {})[task] = spec
    accuracy: dict[str, float] = {}
    for key, group in groups.items():
        splits = {task: load_split(spec["eval_path"]) for task, spec in group.items()}
        first = next(iter(group.values()))
        model, tokenizer = _eval_model(first, max(s.num_labels for s in splits.values()))
        model.load_subspace(subspace)
        accuracy.update(
            evaluate_tasks(model, splits, tokenizer, batch_size=int(first.get("batch_size", 64)), max_length=key[3])
        )
    return accuracy


def evaluate_version(
    redis_url: str, namespace: str, version: str, specs: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Accuracy of each task in ``specs`` (that ``version`` holds) served from ``version``."""
    from subspace_store import SubspaceStore, connect

    client = connect(redis_url)
    try:
        store = SubspaceStore(client, namespace)
        tasks = [t for t in specs if t in store.manifest(version)["tasks"]]
        if not tasks:
            return {}
        subspace = store.get(version, tasks=tasks)
    finally:
        client.close()
    return evaluate_subspace(subspace, {t: specs[t] for t in tasks})


def launch(
    job: TaskJob,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_retries: int = 1,
    runtime_env: dict[str, Any] | None = None,
) -> Any:
    """Schedule ``run_task_job(job)`` on the connected Ray cluster; returns its ObjectRef.

    ``max_retries`` counts reruns after the worker process or its node died (-1: unlimited);
    exceptions raised by the task are final (``retry_exceptions=False``).
    """
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_retries": max_retries,
        "retry_exceptions": False,
        # The Ray dashboard (and a fault-injection hook in tests) see which task this is.
        "name": f"sharecl:{job.job_id}:{job.task}",
    }
    if runtime_env:
        options["runtime_env"] = runtime_env
    return _remote_run().options(**options).remote(job)


def launch_evaluation(*, num_cpus: float = 1.0, num_gpus: float = 0.0, **kwargs: Any) -> Any:
    """``evaluate_version(**kwargs)`` as a Ray task (on a GPU node where the job's tasks use GPUs)."""
    import ray

    remote = ray.remote(evaluate_version)
    return remote.options(num_cpus=num_cpus, num_gpus=num_gpus, name="sharecl:evaluate").remote(**kwargs)


_REMOTE: Any = None


def _remote_run() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(run_task_job)
    return _REMOTE


def current_task_name() -> str | None:
    """The Ray task name of the running task (``sharecl:<job>:<task>``), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_task_name() if ray.is_initialized() else None
    except Exception:
        return None


__all__ = [
    "TaskJob",
    "current_task_name",
    "eval_spec",
    "evaluate_subspace",
    "evaluate_version",
    "launch",
    "launch_evaluation",
    "release_pins",
    "run_task_job",
]
