"""Failure paths of task jobs and of the job driver, against real Redis, a real MLflow sqlite store and, in
the slow tests, a local Ray that declares one GPU (no GPU is needed: Ray hands out the declared id).

An MLflow outage is a tracking URI whose port nothing listens on, with MLflow's own HTTP retries off
(``dead_mlflow``); the driver's tests build a ``RunningJob`` directly (no tasks to follow) so that only
its ending runs.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from test_workers_task import tiny_job, write_tiny_task

from jobs.errors import JobConfigError
from jobs.runner import MergeWaitError, RunningJob, TaskState, start_job
from jobs.schema import ClusterConfig, JobConfig, StoreConfig, TaskConfig, TrackingConfig, load_job
from share import TrainingMode, merge
from subspace_store import EvalSpec, Submission, SubmissionStream, SubspaceStore
from subspace_store.tracking import TAG_STATUS
from workers import tracking
from workers.task_tracking import record_submission
from workers.train import TrainResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def dead_mlflow(monkeypatch: pytest.MonkeyPatch) -> str:
    """An MLflow tracking URI that refuses every connection, each MLflow call failing at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return f"http://127.0.0.1:{port}"


def _count_calls(client: Any, method: str) -> list[int]:
    """Count the calls of ``client.method`` (the real method still runs); returns the one-item counter."""
    calls = [0]
    real = getattr(client, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(client, method, counted)
    return calls


# ---------------------------------------------------------------- workers


def test_best_effort_metrics_during_an_outage_cost_one_failed_call_then_one_try_per_cool_down(
    dead_mlflow: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment_id = tracking.ensure_experiment(mlflow_uri, "outage")
    run = tracking.TrackedRun.start(mlflow_uri, experiment_id, name="t", tags={})
    run._client = tracking.client(dead_mlflow)  # MLflow goes away mid-training
    calls = _count_calls(run._client, "log_batch")

    run.log_metrics({"train_loss": 1.0}, step=1, best_effort=True)
    one_call = calls[0]  # the usual retries, once
    for step in range(2, 8):
        run.log_metrics({"train_loss": 1.0}, step=step, best_effort=True)
    assert calls[0] == one_call  # within the cool-down: skipped (each was another retried failure before)

    monkeypatch.setattr(tracking.TrackedRun, "BEST_EFFORT_COOLDOWN_S", 0.0)  # the cool-down is over
    run.log_metrics({"train_loss": 1.0}, step=8, best_effort=True)
    assert calls[0] == one_call + 1  # tried once, without the retries
    assert capsys.readouterr().err.count("MLflow metrics not logged") == 1

    run._client = tracking.client(mlflow_uri)  # MLflow is back: the next try lands, and so does the one after
    run.log_metrics({"train_loss": 0.5}, step=9, best_effort=True)
    run.log_metrics({"train_loss": 0.25}, step=10, best_effort=True)
    history = tracking.client(mlflow_uri).get_metric_history(run.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(9, 0.5), (10, 0.25)]


@pytest.mark.slow  # one retried MLflow failure (~6 s of backoff) plus a tiny training
def test_a_task_trains_and_submits_untracked_when_mlflow_is_unreachable(
    tmp_path: Path,
    redis_server: str,
    redis_client: redis.Redis,
    namespace: str,
    dead_mlflow: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from workers.run_task import run_task_job

    summary = run_task_job(tiny_job(tmp_path, "untracked", redis_server, namespace, dead_mlflow, "1"))
    assert summary.submission_id and summary.mlflow_run_id == "" and summary.attempt == 1
    [entry] = SubmissionStream(redis_client, namespace).read("test", count=10)
    assert entry.id == summary.submission_id and entry.metadata["mlflow_run_id"] == ""
    err = capsys.readouterr().err
    assert err.count("trains untracked") == 1 and dead_mlflow in err


def test_a_submitted_task_run_ends_finished_when_recording_it_fails(mlflow_uri: str) -> None:
    from mlflow.exceptions import MlflowException

    experiment_id = tracking.ensure_experiment(mlflow_uri, "record")
    run = tracking.TrackedRun.start(mlflow_uri, experiment_id, name="t", tags={})
    result = TrainResult(steps=2, trainable_params=10, loss_curve=[(1, 0.9), (2, 0.8)])
    # A metric name MLflow refuses: the last recording step fails, after the tags and curves.
    with pytest.raises(MlflowException):
        record_submission(run, "1-0", result, {"acc@1": 0.5})
    got = tracking.client(mlflow_uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags[TAG_STATUS] == "submitted"


# ---------------------------------------------------------------- the job driver


@pytest.fixture
def make_job(
    tmp_path: Path, namespace: str, redis_client: redis.Redis, redis_server: str, mlflow_uri: str
) -> Callable[[dict[str, TaskState], list[str]], RunningJob]:
    """Makes a launched job whose tasks are already where ``tasks`` says (nothing left to follow on Ray), saying
    its lines into ``lines``."""

    def make(tasks: dict[str, TaskState], lines: list[str]) -> RunningJob:
        cfg = JobConfig(
            tasks=[TaskConfig(name=t, train=str(tmp_path / f"{t}.parquet")) for t in tasks],
            store=StoreConfig(redis_url=redis_server, namespace=namespace),
            tracking=TrackingConfig(mlflow_uri=mlflow_uri),
        )
        experiment_id = tracking.ensure_experiment(mlflow_uri, namespace)
        run = tracking.TrackedRun.start(mlflow_uri, experiment_id, name="job1", tags={TAG_STATUS: "running"})
        job = RunningJob(
            cfg,
            "job1",
            {},
            store=SubspaceStore(redis_client, namespace),
            stream=SubmissionStream(redis_client, namespace),
            coordinator=None,
            run=run,
            experiment_id=experiment_id,
            redis_url=redis_server,
            owns_ray=False,
            say=lines.append,
            started=time.time(),
        )
        for task, state in tasks.items():
            job.outcomes[task].status = state
        return job

    return make


def test_a_merged_job_whose_mlflow_fails_at_the_end_is_reported_not_aborted(make_job, mlflow_uri: str) -> None:
    lines: list[str] = []
    job = make_job({"a": TaskState.MERGED}, lines)
    # Every MLflow call on the job run fails from now on (at once: an outage would first be retried).
    tracking.client(mlflow_uri).delete_run(job.run.run_id)

    result = job.wait(merge_timeout_s=0)
    assert result.ok and result.tasks["a"].status is TaskState.MERGED
    assert any(line.startswith("job job1: 1 task(s)") for line in lines)  # the report
    assert any("mlflow ui --backend-store-uri" in line for line in lines)


def test_pins_of_unmerged_submissions_outlive_a_merge_wait_that_timed_out(
    make_job, namespace: str, redis_client: redis.Redis, mlflow_uri: str, make_adapter: Callable[..., Any]
) -> None:
    store = SubspaceStore(redis_client, namespace)
    v1 = store.publish(merge(None, {"t0": make_adapter(0)})[0], None)
    for holder in ("job1/open", "job1/merged", "job1/failed", "job1/queued", "job2/other"):
        store.pin(v1, holder, ttl_s=600)
    submission_id = SubmissionStream(redis_client, namespace).submit(
        Submission("open", make_adapter(1), base_version=v1, attempt_key="job1/open")
    )
    states = {
        "open": TaskState.SUBMITTED,
        "merged": TaskState.MERGED,
        "failed": TaskState.FAILED,
        "queued": TaskState.QUEUED,
    }
    lines: list[str] = []
    job = make_job(states, lines)
    job.outcomes["open"].submission_id = submission_id

    with pytest.raises(MergeWaitError, match="stay pinned"):
        job.wait(merge_timeout_s=0)
    assert store.pins() == {v1: ["job1/open", "job2/other"]}
    assert any("open (submitted, not merged yet) stay pinned" in line for line in lines)
    status = tracking.client(mlflow_uri).get_run(job.run.run_id)
    assert status.info.status == "FAILED" and status.data.tags[TAG_STATUS] == "aborted"


# ---------------------------------------------------------------- the job schema


@pytest.mark.parametrize(
    "key",
    ["training.lr", "training.lora_lr", "training.max_grad_norm", "training.weight_decay", "adapter.lora_alpha"],
)
def test_the_schema_refuses_infinite_values(tmp_path: Path, key: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("tasks: [{name: a, train: a.parquet}]\n")
    with pytest.raises(JobConfigError, match=rf"^{re.escape(key)}: inf must be .* finite"):
        load_job(path, [f"{key}=.inf"], check_files=False)


def test_the_schema_names_runtime_env_vars_that_are_no_strings(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "tasks: [{name: a, train: a.parquet}]\n"
        "cluster: {runtime_env: {env_vars: {OMP_NUM_THREADS: 1, DEBUG: true, HF_HOME: /data/hf}}}\n"
    )
    with pytest.raises(JobConfigError) as raised:
        load_job(path, check_files=False)
    problems = str(raised.value).splitlines()[1:]
    assert len(problems) == 2
    assert problems[0].endswith(
        "cluster.runtime_env.env_vars.OMP_NUM_THREADS: 1 is not a string: Ray takes "
        "environment variable names and values as strings only (YAML reads 1 and true as a "
        'number and a boolean); quote them: "OMP_NUM_THREADS": "1"'
    )
    assert problems[1].endswith('quote them: "DEBUG": "true"')
    with pytest.raises(JobConfigError, match="cluster.runtime_env.env_vars: got 'x'; set it to a mapping"):
        load_job(path, ["cluster.runtime_env.env_vars=x"], check_files=False)
    assert ClusterConfig(runtime_env={"env_vars": {"A": "1"}, "pip": ["x"]}).problems() == []


# ---------------------------------------------------------------- on Ray (slow)


def _eval_spec(eval_path: Path) -> EvalSpec:
    return EvalSpec(eval_path=str(eval_path), builder="x:y", target_modules=("query",), max_length=8, batch_size=4)


@pytest.fixture(scope="module")
def gpu_ray() -> Iterator[None]:
    """A local Ray with one CPU (one idle worker process, which Ray would reuse) and one declared GPU."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def _failed_in_process(ref: Any) -> int:
    """The pid of the worker process whose task raised (Ray names it in the error)."""
    import ray

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(ref)
    found = re.search(r"\(pid=(\d+)", str(raised.value))
    assert found, str(raised.value)
    return int(found.group(1))


@pytest.mark.slow
def test_gpu_tasks_each_run_in_a_fresh_worker_process(
    gpu_ray: None, tmp_path: Path, redis_server: str, namespace: str, mlflow_uri: str
) -> None:
    """A process that ran one GPU task would keep that task's CUDA context for the next one."""
    from workers.evaluator import launch_evaluation
    from workers.ray_task import launch

    pids = []
    for name in ("first", "second"):
        job = tiny_job(tmp_path, name, redis_server, namespace, mlflow_uri, "1")
        job = dataclasses.replace(job, train_path=str(tmp_path / "missing.parquet"))  # fails at once
        pids.append(_failed_in_process(launch(job, num_cpus=1, num_gpus=1, max_retries=0)))
    spec = _eval_spec(tmp_path / "missing.parquet")
    for _ in range(2):
        pids.append(_failed_in_process(launch_evaluation(redis_server, namespace, "v9", {"t": spec}, num_gpus=1)))
    assert len(set(pids)) == 4, pids


@pytest.mark.slow
def test_a_failing_final_evaluation_leaves_the_scores_out_of_a_merged_job(
    gpu_ray: None,
    make_job,
    tmp_path: Path,
    namespace: str,
    redis_client: redis.Redis,
    mlflow_uri: str,
    make_adapter: Callable[..., Any],
) -> None:
    from workers.task_job import TaskSummary

    store = SubspaceStore(redis_client, namespace)
    store.publish(merge(None, {"a": make_adapter(0)})[0], None)
    lines: list[str] = []
    job = make_job({"a": TaskState.MERGED}, lines)
    job.cfg.tasks[0].eval = str(tmp_path / "gone.parquet")
    job.outcomes["a"].result = TaskSummary(
        task="a",
        submission_id="1-0",
        mode=TrainingMode.LORA,
        base_version=None,
        pin=None,
        eval_metrics={},
        trainable_params=1,
        gpu_ids=(),
        node=None,
        node_ip=None,
        mlflow_run_id="",
        attempt=1,
        eval_spec=_eval_spec(tmp_path / "gone.parquet"),
        seconds=0.0,
    )

    result = job.wait(merge_timeout_s=0)
    assert result.ok and result.accuracy == {}
    assert any(line.startswith("[job] could not evaluate v1 for a: FileNotFoundError") for line in lines), lines
    assert tracking.client(mlflow_uri).get_run(job.run.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_launch_that_ray_refuses_ends_the_job_run(
    gpu_ray: None, tmp_path: Path, namespace: str, redis_server: str, mlflow_uri: str
) -> None:
    from coordinator.actor import stop_coordinator

    train, evaluation = write_tiny_task(tmp_path, "a")
    cfg = JobConfig(
        tasks=[TaskConfig(name="a", train=train, eval=evaluation)],
        cluster=ClusterConfig(runtime_env={"pip": 5}),  # Ray refuses it when the task is launched
        store=StoreConfig(redis_url=redis_server, namespace=namespace),
        tracking=TrackingConfig(mlflow_uri=mlflow_uri),
    )
    try:
        with pytest.raises(TypeError, match="pip"):
            start_job(cfg, say=lambda line: None)
    finally:
        stop_coordinator(namespace, timeout_s=30)
    [run] = tracking.find_runs(
        mlflow_uri, tracking.ensure_experiment(mlflow_uri, namespace), "tags.`sharecl.kind` = 'job'"
    )
    assert run.info.status == "FAILED" and run.data.tags[TAG_STATUS] == "aborted"
