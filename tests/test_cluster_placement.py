"""Jobs on a real 3-node local Ray cluster (head + 2 nodes that declare one GPU each), with the real
coordinator actor, real Redis and a real MLflow sqlite store. The model is the tiny builder of
test_workers_task.py, so the time goes to Ray and the services, not to training.

No GPU is needed: Ray hands out the declared GPU ids and the workers train on the CPU.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import redis
from ray.cluster_utils import Cluster
from test_workers_task import TINY_BUILDER, write_tiny_task

from jobs.runner import JobResult, run_job
from jobs.schema import (
    AdapterConfig,
    ClusterConfig,
    JobConfig,
    ModelConfig,
    StoreConfig,
    TaskConfig,
    TrackingConfig,
    TrainingConfig,
)
from subspace_store import SubmissionState, SubmissionStatus, SubmissionStream, SubspaceStore
from workers import tracking

pytestmark = pytest.mark.slow
TESTS_DIR = str(Path(__file__).parent)


def _forget_current_cluster(address: str) -> None:
    """Cluster() records itself as this machine's current Ray, which any plain ``ray.init()`` (other
    people's tests on this machine) would join. Only this module, by explicit address, should."""
    from ray._private.utils import get_ray_address_file, read_ray_address

    if read_ray_address() == address:
        Path(get_ray_address_file(None)).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Workers (and the coordinator, which evaluates with the tiny builder) import test_workers_task.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, *([old] if old else [])])
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        _forget_current_cluster(c.address)
        gpu_nodes = [c.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address)
        c.gpu_node_ids = {n.node_id for n in gpu_nodes}  # type: ignore[attr-defined]
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "warmup")  # create the schema once, before workers race for it
    return uri


def tiny_config(
    folder: Path, names: list[str], redis_url: str, namespace: str, mlflow_uri: str, **cluster: Any
) -> JobConfig:
    tasks = []
    for i, name in enumerate(names):
        classes = [(0, 1), (1, 2), (2, 0)][i % 3]
        train, evaluation = write_tiny_task(folder, name, classes)
        tasks.append(TaskConfig(name=name, train=train, eval=evaluation))
    return JobConfig(
        model=ModelConfig(builder=TINY_BUILDER, max_length=8),
        adapter=AdapterConfig(r=2, p=2, phi=1, k_max=8),
        training=TrainingConfig(steps=6, batch_size=8, lr=0.05, log_every=3, eval_batch_size=32),
        tasks=tasks,
        cluster=ClusterConfig(**{"num_gpus_per_task": 1.0, "num_cpus_per_task": 1.0, "max_retries": 1, **cluster}),
        store=StoreConfig(redis_url=redis_url, namespace=namespace),
        tracking=TrackingConfig(mlflow_uri=mlflow_uri),
    )


def _run(cfg: JobConfig) -> JobResult:
    result = run_job(cfg, merge_timeout_s=300)
    assert isinstance(result, JobResult)
    return result


def _task_runs(uri: str, experiment_id: str, job_id: str) -> list[Any]:
    query = f"tags.`sharecl.job_id` = '{job_id}' and tags.`sharecl.kind` = 'task'"
    return tracking.find_runs(uri, experiment_id, query)


def test_concurrent_workers_get_distinct_gpus(
    cluster: Cluster, tmp_path: Path, redis_server: str, namespace: str, mlflow_uri: str
) -> None:
    barrier = f"{redis_server}|barrier-{uuid.uuid4().hex}|2"  # both tasks must be in flight at once
    cfg = tiny_config(
        tmp_path,
        ["fruit", "vehicles"],
        redis_server,
        namespace,
        mlflow_uri,
        runtime_env={"env_vars": {"SHARECL_TEST_BARRIER": barrier}},
    )
    result = _run(cfg)
    assert result.ok, result.tasks
    placed = {(o.result.node, tuple(o.result.gpu_ids)) for o in result.tasks.values()}
    assert len(placed) == 2 and all(len(gpus) == 1 for _, gpus in placed)
    assert {node for node, _ in placed} == cluster.gpu_node_ids  # type: ignore[attr-defined]

    runs = _task_runs(mlflow_uri, result.experiment_id, result.job_id)
    assert sorted((r.data.params["node"], r.data.params["gpu_ids"]) for r in runs) == sorted(
        (node, gpus[0]) for node, gpus in placed
    )
    assert all(r.data.tags["mlflow.parentRunId"] == result.parent_run_id for r in runs)


def test_eight_concurrent_tasks_are_merged_exactly_once(
    cluster: Cluster, tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    # A cold start first, so the eight train coefficients against v1 while merges move the head.
    first = _run(tiny_config(tmp_path, ["seed_task"], redis_server, namespace, mlflow_uri))
    assert first.ok and first.head == "v1" and first.tasks["seed_task"].result.mode == "lora"

    names = [f"task{i}" for i in range(8)]
    cfg = tiny_config(
        tmp_path, names, redis_server, namespace, mlflow_uri, num_gpus_per_task=0.25, num_cpus_per_task=0.5
    )
    result = _run(cfg)
    assert result.ok, {t: (o.status, o.error) for t, o in result.tasks.items()}
    # Each started from whatever was head then (v1, or a version a sibling's merge published).
    assert all(o.result.mode == "coefficients" and o.result.base_version for o in result.tasks.values())

    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    ids = {o.submission_id for o in result.tasks.values()}
    merged_ids = [sid for info in store.list_versions() for sid in info.submissions]
    assert len(merged_ids) == len(set(merged_ids)) == 9  # each submission in exactly one version
    assert ids <= set(merged_ids) and stream.rejections() == {} and stream.pending() == []
    head = store.manifest("head")
    assert set(head["tasks"]) == {"seed_task", *names} and result.head == head["version"]
    for o in result.tasks.values():
        assert stream.status(o.submission_id) == SubmissionState(SubmissionStatus.MERGED, version=o.version)

    # The coordinator evaluated every task after the last merge; the job reports it.
    assert set(result.accuracy) == set(names) and result.matrix.rows[-1].version == result.head
    assert all(0.0 <= a <= 1.0 for a in result.accuracy.values())
    runs = _task_runs(mlflow_uri, result.experiment_id, result.job_id)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["base_version"] for r in runs} == {o.result.base_version for o in result.tasks.values()}
    assert store.pins() == {}  # the job released the versions its tasks started from


def test_killed_worker_is_retried_or_recorded_failed_while_the_others_go_on(
    cluster: Cluster, tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    env = {"SHARECL_TEST_CRASH": "flaky=once,doomed=always", "SHARECL_TEST_CRASH_DIR": str(tmp_path / "crashes")}
    cfg = tiny_config(
        tmp_path,
        ["steady", "flaky", "doomed"],
        redis_server,
        namespace,
        mlflow_uri,
        num_gpus_per_task=0.5,
        max_retries=1,
        runtime_env={"env_vars": env},
    )
    result = _run(cfg)
    steady, flaky, doomed = (result.tasks[t] for t in ("steady", "flaky", "doomed"))
    assert steady.status == "merged" and steady.result.attempt == 1
    assert flaky.status == "merged" and flaky.result.attempt == 2
    assert doomed.status == "failed" and "worker died" in (doomed.error or "")
    assert result.failed == ["doomed"] and set(result.accuracy) == {"steady", "flaky"}
    assert set(SubspaceStore(redis_client, namespace).manifest("head")["tasks"]) == {"steady", "flaky"}

    runs = _task_runs(mlflow_uri, result.experiment_id, result.job_id)
    status = sorted((r.data.tags["sharecl.task"], r.info.status) for r in runs)
    # flaky: the dead first attempt was closed by the second; doomed: both attempts died.
    assert ("flaky", "KILLED") in status and ("flaky", "FINISHED") in status
    assert all(s != "RUNNING" for _, s in status)
    parent = tracking.client(mlflow_uri).get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["sharecl.task.doomed"] == "failed"
    assert parent.data.metrics["tasks_failed"] == 1.0 and parent.data.metrics["tasks_merged"] == 2.0
