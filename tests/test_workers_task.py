"""One task job without Ray (``run_task_job`` called directly), against real Redis and a real MLflow
sqlite store; plus the tiny model builder that every Ray test uses.

The builder is importable by Ray workers as ``test_workers_task:tiny_builder`` (the Ray tests put
``tests/`` on their workers' PYTHONPATH). Two hooks, set through environment variables, only act
inside a task job's Ray task (named ``sharecl:<job>:<task>``):

- ``SHARECL_TEST_CRASH="task_a=once,task_b=always"``: the worker process ``os._exit``s while
  building the model, on its first attempt only (marker files in ``SHARECL_TEST_CRASH_DIR``) or on
  every attempt: a worker killed mid-job.
- ``SHARECL_TEST_BARRIER="<redis url>|<key>|<n>"``: every task waits until ``n`` tasks are inside the
  builder at once (fails after 120 s), which proves that ``n`` workers ran concurrently.
- ``SHARECL_TEST_SLOW_ACTOR_S="<seconds>"``: the builder sleeps that long when a Ray actor calls it (the
  coordinator's evaluator, after a merge): a coordinator still busy when the job's driver is done.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from torch import nn

from share import merge
from subspace_store import EvalSpec, SubmissionStream, SubspaceStore, load_callable
from workers import tracking
from workers.data import write_split
from workers.evaluator import EVALUATOR, evaluate_subspace, evaluate_version
from workers.placement import _ray_task_name
from workers.run_task import run_task_job
from workers.task_job import TaskJob

TINY_BUILDER = "test_workers_task:tiny_builder"
TINY_TARGETS = ("query", "value")
VOCAB = 97
WORDS = {
    0: ["apple", "pear", "plum", "fig", "grape", "melon"],
    1: ["car", "bus", "truck", "train", "bike", "boat"],
    2: ["red", "blue", "green", "pink", "black", "white"],
}


class TinyTokenizer:
    """Hashes words to ids (0 is padding); answers like a Hugging Face tokenizer call."""

    def __call__(
        self, texts: list[str], padding: bool = True, truncation: bool = True, max_length: int = 16, **_: Any
    ) -> dict[str, torch.Tensor]:
        rows = [[1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in t.lower().split()][:max_length] for t in texts]
        width = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class TinyClassifier(nn.Module):
    """Mean word embedding -> two target Linear layers -> ``head``."""

    def __init__(self, num_labels: int, dim: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        x = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.tanh(self.query(x)) + self.value(x))


def _hooks() -> None:
    slow = os.environ.get("SHARECL_TEST_SLOW_ACTOR_S")
    if slow and _in_ray_actor():
        time.sleep(float(slow))
    name = _ray_task_name() or ""
    parts = name.split(":")
    if len(parts) != 3 or parts[0] != "sharecl" or parts[1] == "evaluate":
        return
    job, task = parts[1], parts[2]
    crash = dict(item.split("=", 1) for item in os.environ.get("SHARECL_TEST_CRASH", "").split(",") if "=" in item)
    if crash.get(task) == "always":
        os._exit(3)
    if crash.get(task) == "once":
        marker = Path(os.environ["SHARECL_TEST_CRASH_DIR"]) / f"{job}-{task}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("crashed once\n")
            os._exit(3)
    barrier = os.environ.get("SHARECL_TEST_BARRIER")
    if barrier:
        url, key, n = barrier.split("|")
        client = redis.Redis.from_url(url)
        client.incr(key)
        deadline = time.time() + 120
        while int(client.get(key) or 0) < int(n):
            if time.time() > deadline:
                raise TimeoutError(f"barrier {key}: fewer than {n} tasks ran at the same time")
            time.sleep(0.05)


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


def tiny_builder(model_name_or_path: str | None, num_labels: int, seed: int) -> tuple[nn.Module, TinyTokenizer]:
    _hooks()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # the frozen "pretrained" base: the same on every worker
        model = TinyClassifier(num_labels)
        torch.manual_seed(seed)
        model.head.reset_parameters()
    return model, TinyTokenizer()


def write_tiny_task(folder: Path, name: str, classes: tuple[int, ...] = (0, 1), n: int = 24) -> tuple[str, str]:
    """Train and eval Parquet splits of a task whose class is given by its words."""
    paths = []
    for split, count in (("train", n), ("eval", n // 2)):
        texts, labels = [], []
        for i in range(count):
            label = i % len(classes)
            pool = WORDS[classes[label]]
            texts.append(f"{pool[i % len(pool)]} {pool[(i * 5 + 1) % len(pool)]}")
            labels.append(label)
        path = folder / name / f"{split}.parquet"
        write_split(path, texts, labels, [f"c{c}" for c in classes], name)
        paths.append(str(path))
    return paths[0], paths[1]


def tiny_job(
    folder: Path, task: str, redis_url: str, namespace: str, uri: str, experiment_id: str, **kw: Any
) -> TaskJob:
    train, evaluation = write_tiny_task(folder, task, kw.pop("classes", (0, 1)))
    training = {"steps": 6, "lr": 0.05, "batch_size": 8, "max_length": 8, "log_every": 3, "r": 2, "p": 2, "phi": 1}
    return TaskJob(
        job_id=kw.pop("job_id", "job1"),
        task=task,
        train_path=train,
        eval_path=evaluation,
        redis_url=redis_url,
        namespace=namespace,
        tracking_uri=uri,
        experiment_id=experiment_id,
        target_modules=TINY_TARGETS,
        builder=TINY_BUILDER,
        training={**training, **kw.pop("training", {})},
        job_params={"training.steps": 6},
        **kw,
    )


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_cold_start_trains_lora_then_coefficients_against_the_head(
    tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    experiment_id = tracking.ensure_experiment(mlflow_uri, namespace)
    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)

    first = run_task_job(tiny_job(tmp_path, "fruit_vs_cars", redis_server, namespace, mlflow_uri, experiment_id))
    assert first.mode == "lora" and first.base_version is None and first.pin is None
    assert 0.0 <= first.eval_metrics["accuracy"] <= 1.0 and first.trainable_params > 0

    sub = stream.read("test", count=10)[0]
    assert sub.id == first.submission_id and sub.task == "fruit_vs_cars" and sub.base_version is None
    meta = sub.metadata
    assert meta["builder"] == TINY_BUILDER and meta["max_length"] == 8 and meta["mode"] == "lora"
    assert meta["eval_path"].endswith("eval.parquet") and meta["mlflow_run_id"] == first.mlflow_run_id
    assert meta["base_model"] == "bundled:all-MiniLM-L6-v2" and meta["gpu_ids"] == [] and "node" in meta
    assert meta["eval"]["evaluator"] == "workers.evaluator:evaluate_subspace" == EVALUATOR
    assert load_callable(EVALUATOR, "evaluator", "") is evaluate_subspace
    assert EvalSpec.from_dict(meta["eval"]) == first.eval_spec and first.eval_spec.max_length == 8
    assert set(sub.adapter.factors) == {"query", "value"} and set(sub.adapter.head) == {"head.weight", "head.bias"}

    subspace, _ = merge(None, {sub.task: sub.adapter})
    v1 = stream.publish_with_ack(store, subspace, None, [sub])

    second = run_task_job(
        tiny_job(tmp_path, "colors_vs_cars", redis_server, namespace, mlflow_uri, experiment_id, classes=(2, 1))
    )
    assert second.mode == "coefficients" and second.base_version == v1
    assert second.pin == (v1, "job1/colors_vs_cars") and "job1/colors_vs_cars" in store.pins()[v1]
    assert second.trainable_params < first.trainable_params
    update = stream.read("test", count=10)[0]
    assert update.adapter is None and update.base_version == v1 and update.metadata["mode"] == "coefficients"
    assert set(update.update.parts) == {"query", "value"} and update.update.metadata["label_names"] == ["c2", "c1"]
    assert store.release_pins("job1") == [f"{v1}:job1/colors_vs_cars"] and store.pins() == {}

    # The coordinator's evaluator, through the store: the merged task is served from v1.
    spec = EvalSpec.from_dict(update.metadata["eval"])
    accuracy = evaluate_version(redis_server, namespace, v1, {"fruit_vs_cars": spec, "colors_vs_cars": spec})
    assert set(accuracy) == {"fruit_vs_cars"}  # v1 does not hold the second task yet

    runs = tracking.find_runs(mlflow_uri, experiment_id, "tags.`sharecl.kind` = 'task'")
    by_task = {r.data.tags["sharecl.task"]: r for r in runs}
    run = by_task["colors_vs_cars"]
    assert run.info.status == "FINISHED" and run.data.tags["sharecl.status"] == "submitted"
    assert run.data.params["base_version"] == v1 and run.data.params["task.mode"] == "coefficients"
    assert run.data.params["task.steps"] == "6" and run.data.params["job.training.steps"] == "6"
    assert run.data.params["gpu_ids"] == "none" and "node" in run.data.params
    for key in ("eval_accuracy", "eval_loss", "trainable_params", "loss", "train_loss"):
        assert key in run.data.metrics, key
    history = tracking.client(mlflow_uri).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 7))


def test_errors_fail_the_run_release_the_pin_and_name_the_fix(
    tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    experiment_id = tracking.ensure_experiment(mlflow_uri, namespace)
    job = tiny_job(tmp_path, "t1", redis_server, namespace, mlflow_uri, experiment_id, mode="coefficients")
    with pytest.raises(ValueError, match="holds no version yet; use training.mode=auto"):
        run_task_job(job)

    bad = tiny_job(tmp_path, "t2", redis_server, namespace, mlflow_uri, experiment_id, num_labels=5)
    with pytest.raises(ValueError, match="num_labels is 5 but .* names 2 classes"):
        run_task_job(bad)

    # Diverging training (absurd lr) is an application error: the run ends FAILED with the reason.
    diverge = tiny_job(
        tmp_path, "t3", redis_server, namespace, mlflow_uri, experiment_id, training={"lr": 1e30, "lora_lr": 1e30}
    )
    with pytest.raises(FloatingPointError):
        run_task_job(diverge)
    runs = tracking.find_runs(mlflow_uri, experiment_id, "tags.`sharecl.task` = 't3'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "FloatingPointError" in runs[0].data.tags["sharecl.error"]
    assert SubspaceStore(redis_client, namespace).pins() == {}


def test_a_retry_after_the_submission_returns_it_instead_of_submitting_twice(
    tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    experiment_id = tracking.ensure_experiment(mlflow_uri, namespace)
    job = tiny_job(tmp_path, "once_only", redis_server, namespace, mlflow_uri, experiment_id)
    first = run_task_job(job)
    stream = SubmissionStream(redis_client, namespace)
    assert [s.id for s in stream.read("test", count=10)] == [first.submission_id]

    # As if that worker had died right after submitting: its run is still RUNNING.
    tracking.client(mlflow_uri).update_run(first.mlflow_run_id, status="RUNNING")
    again = run_task_job(job)
    assert again.submission_id == first.submission_id and again.attempt == 2
    assert again.mode == "lora" and again.eval_metrics["accuracy"] == first.eval_metrics["accuracy"]
    assert stream.read("test", count=10) == []  # nothing new in the stream
    runs = tracking.find_runs(mlflow_uri, experiment_id, "tags.`sharecl.task` = 'once_only'")
    assert [(r.info.status, r.data.tags["sharecl.submission_id"]) for r in runs] == [("FINISHED", first.submission_id)]


def test_a_retry_finds_the_submission_in_redis_when_the_mlflow_tag_is_missing(
    tmp_path: Path, redis_server: str, redis_client: redis.Redis, namespace: str, mlflow_uri: str
) -> None:
    """Issue 10, defect 10: the stream, not a best-effort MLflow tag, says whether a task was submitted."""
    experiment_id = tracking.ensure_experiment(mlflow_uri, namespace)
    job = tiny_job(tmp_path, "tagless", redis_server, namespace, mlflow_uri, experiment_id)
    first = run_task_job(job)
    stream = SubmissionStream(redis_client, namespace)
    assert [s.id for s in stream.read("test", count=10)] == [first.submission_id]

    # The worker died right after the stream write, before MLflow heard of it: no tag, run RUNNING.
    client = tracking.client(mlflow_uri)
    client.delete_tag(first.mlflow_run_id, "sharecl.submission_id")
    client.update_run(first.mlflow_run_id, status="RUNNING")
    again = run_task_job(job)
    assert again.submission_id == first.submission_id and again.attempt == 2
    assert again.mlflow_run_id == first.mlflow_run_id and again.mode == "lora"
    assert again.eval_metrics == first.eval_metrics and again.trainable_params == first.trainable_params
    assert stream.read("test", count=10) == []  # not submitted twice
    runs = tracking.find_runs(mlflow_uri, experiment_id, "tags.`sharecl.task` = 'tagless'")
    # Not trained twice (no second run), and the first run is brought up to date.
    assert [(r.info.status, r.data.tags.get("sharecl.submission_id")) for r in runs] == [
        ("FINISHED", first.submission_id)
    ]
