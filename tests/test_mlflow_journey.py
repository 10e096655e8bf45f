"""What an MLflow user sees of share-cl, against a real sqlite MLflow store and a real Redis:

- runs read as a tree: job -> its task runs and the merge runs that took its tasks in (a merge of
  several jobs' tasks nests under the first job's run and names the others), merges of no job at the top;
- forgetting curves: every task's accuracy and reconstruction error at step = version number, on its
  job's run and on each merge run;
- the model registry: one model version per published version (its manifest and pointer as source;
  store version, tasks and parent as tags), the store's tags as aliases, so that
  ``models:/sharecl-<namespace>@prod`` is what ``sharecl pull prod`` pulls;
- a task that failed before its own run started leaves its reason on the job run.

The last test runs the same journey through ``sharecl submit`` on a local Ray (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_coordinator_tracking import probe_accuracy, probe_spec, task_adapter, write_eval_split

from coordinator import Coordinator, Evaluation, MergeTracker
from coordinator.record import MergeRecord
from coordinator.tracking import MANIFEST_JSON, POINTER_JSON
from share import KPolicy
from subspace_store import Submission, SubmissionStream, SubspaceStore
from subspace_store.keys import version_number
from subspace_store.tracking import (
    PARENT_TAG,
    TAG_JOB,
    TAG_KIND,
    TAG_NAMESPACE,
    TAG_STATUS,
    TAG_TASKS,
    VERSION_ARTIFACTS,
    AliasOutcome,
    RunKind,
    ensure_experiment,
    failed_tasks,
    mirror_tag,
    registered_model_name,
)
from workers.placement import Placement
from workers.task import TrainingMode
from workers.task_job import TaskJob
from workers.task_tracking import record_task_failure_on_job, start_task_run
from workers.tracking import TrackedRun

# job -> its tasks; a0 and b0 arrive in one batch (two jobs, one merge)
JOBS = {"job-a": ["a0", "a1"], "job-b": ["b0"], "job-c": ["c0"]}
BATCHES = [["a0", "b0"], ["a1"], ["c0"], ["external"]]  # "external": `sharecl add`, no job


def _job_run(uri: str, experiment_id: str, job_id: str, namespace: str) -> TrackedRun:
    """The job's run, opened as the job driver opens it."""
    tags = {TAG_KIND: RunKind.JOB, TAG_JOB: job_id, TAG_NAMESPACE: namespace, TAG_STATUS: "running"}
    return TrackedRun.start(uri, experiment_id, name=job_id, tags={**tags, TAG_TASKS: ",".join(JOBS[job_id])})


def _task_run(uri: str, experiment_id: str, job_id: str, task: str, job_run: str, redis_url: str, ns: str) -> str:
    """The task's run, opened by the workers' own code (a child of the job's run)."""
    job = TaskJob(
        job_id=job_id,
        task=task,
        train_path="unused.parquet",
        eval_path=None,
        redis_url=redis_url,
        namespace=ns,
        tracking_uri=uri,
        experiment_id=experiment_id,
        target_modules=("layer.0.query",),
        builder="probe",
        training={"steps": 1, "lr": 0.1},
        parent_run_id=job_run,
    )
    run = start_task_run(job, job.spec(TrainingMode.LORA), None, 1, Placement("test-host"), 3, 10)
    run.finish("FINISHED")
    return run.run_id


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow  # sqlite store creation and ~40 MLflow calls per merge: ~30 s here
def test_runs_tree_curves_registry_and_aliases(
    redis_client, redis_server: str, namespace: str, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(mlflow_uri)
    experiment_id = ensure_experiment(client, mlflow_uri, namespace)  # the namespace's experiment
    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    tracker = MergeTracker(mlflow_uri, namespace, namespace, store_tags=store.tags)
    coordinator = Coordinator(store, stream, KPolicy(k=8), tracker, Evaluation(default=probe_accuracy))

    job_runs = {job: _job_run(mlflow_uri, experiment_id, job, namespace).run_id for job in JOBS}
    job_of = {task: job for job, tasks in JOBS.items() for task in tasks}
    task_runs = {
        t: _task_run(mlflow_uri, experiment_id, job_of[t], t, job_runs[job_of[t]], redis_server, namespace)
        for t in job_of
    }
    seeds = {name: i for i, name in enumerate([*job_of, "external"])}
    for batch in BATCHES:
        for task in batch:
            adapter = task_adapter(seeds[task])
            metadata = probe_spec(write_eval_split(tmp_path, task, adapter))
            if task in job_of:  # what a worker puts in its submission's metadata
                metadata |= {"job_id": job_of[task], "mlflow_run_id": task_runs[task]}
            stream.submit(Submission(task, adapter, store.head(), metadata))
        result = coordinator.step(max_batch=8, block_ms=None)
        assert result.version == f"v{BATCHES.index(batch) + 1}" and not result.rejected
        if result.version == "v2":
            store.tag("v2", "canary")  # a tag set without mirroring it: the next version's registration syncs it
    versions = ["v1", "v2", "v3", "v4"]
    merge = {
        run.data.tags["sharecl.version"]: run
        for run in client.search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{RunKind.MERGE}'")
    }
    assert sorted(merge) == versions and all(run.info.status == "FINISHED" for run in merge.values())

    # 1. The tree: one experiment; task runs under their job's run; merge runs under the job of their
    #    first new task (the other jobs named); a merge of no job's task at the top.
    for task, run_id in task_runs.items():
        run = client.get_run(run_id)
        assert run.info.experiment_id == experiment_id and run.data.tags[PARENT_TAG] == job_runs[job_of[task]]
    assert merge["v1"].data.tags[PARENT_TAG] == job_runs["job-a"]
    assert merge["v1"].data.tags["sharecl.jobs"] == "job-a job-b"
    assert merge["v1"].data.tags["sharecl.job_runs"] == f"{job_runs['job-a']} {job_runs['job-b']}"
    assert merge["v2"].data.tags[PARENT_TAG] == job_runs["job-a"]
    assert merge["v3"].data.tags[PARENT_TAG] == job_runs["job-c"]
    assert PARENT_TAG not in merge["v4"].data.tags and "sharecl.jobs" not in merge["v4"].data.tags

    # 2. Forgetting curves at step = version number, on the job runs, equal to the merge runs' values.
    manifests = {v: store.manifest(v) for v in versions}
    for task, job in job_of.items():
        entered = next(v for v in versions if task in manifests[v]["tasks"])
        steps = [version_number(v) for v in versions if version_number(v) >= version_number(entered)]
        accuracy = _history(client, job_runs[job], f"accuracy/{task}")
        error = _history(client, job_runs[job], f"reconstruction_error/{task}")
        assert sorted(accuracy) == steps and sorted(error) == steps, (task, accuracy, error)
        for v in versions[steps[0] - 1 :]:
            on_merge = _history(client, merge[v].info.run_id, f"accuracy/{task}")
            assert on_merge == {version_number(v): accuracy[version_number(v)]}
            assert error[version_number(v)] == pytest.approx(manifests[v]["tasks"][task]["reconstruction_error"])
    assert {k for k in client.get_run(job_runs["job-c"]).data.metrics if "/" in k} == {
        "accuracy/c0",
        "reconstruction_error/c0",
    }
    # k=8 for five rank-4 tasks: a0's curve shows forgetting.
    a0 = _history(client, job_runs["job-a"], "reconstruction_error/a0")
    assert a0[1] == pytest.approx(0.0, abs=1e-5) and a0[4] > 1e-3

    # 3. The registry: one model version per version, its source the merge run's artifacts.
    model = registered_model_name(namespace)
    assert model == f"sharecl-{namespace}"
    registered = {mv.tags["sharecl.version"]: mv for mv in client.search_model_versions(f"name='{model}'")}
    assert sorted(registered) == versions
    for v, mv in registered.items():
        assert mv.run_id == merge[v].info.run_id and mv.source == f"runs:/{mv.run_id}/{VERSION_ARTIFACTS}"
        assert mv.tags["sharecl.tasks"] == ",".join(manifests[v]["tasks"])
        assert mv.tags["sharecl.parent"] == (manifests[v]["parent"] or "none")
        assert mv.tags["sharecl.namespace"] == namespace
    # The tag set on v2 before v3 was registered: mirrored when v3 was.
    assert client.get_model_version_by_alias(model, "canary").tags["sharecl.version"] == "v2"

    # Finishing a run again (a restart after a crash) registers nothing twice.
    record = MergeRecord.from_manifest(manifests["v3"])
    assert tracker.finish(merge["v3"].info.run_id, record, coordinator.matrix, {}, {})
    assert len(client.search_model_versions(f"name='{model}'")) == 4

    # 4. `sharecl tag`: the store's tag, then its alias; models:/...@prod is what `sharecl pull prod` pulls.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry is the tracking store's
    import mlflow.artifacts

    for version in ("v3", "v4"):
        store.tag(version, "prod")
        mirrored = mirror_tag(namespace, "prod", version)
        assert mirrored.outcome is AliasOutcome.SET and mirrored.model_version == str(registered[version].version)
        assert f"models:/{model}@prod" in mirrored.message
        folder = Path(
            mlflow.artifacts.download_artifacts(f"models:/{model}@prod", dst_path=str(tmp_path / f"pulled-{version}"))
        )
        pointer = json.loads((folder / POINTER_JSON).read_text())
        assert pointer["version"] == store.resolve("prod") == version and pointer["namespace"] == namespace
        assert json.loads((folder / MANIFEST_JSON).read_text()) == json.loads(json.dumps(store.manifest("prod")))
    assert mirror_tag(namespace, "prod", "v4").outcome is AliasOutcome.UNCHANGED

    # `sharecl untag` deletes the alias; a tag MLflow cannot hold as an alias, a namespace with nothing
    # registered, a store that does not exist (not created) and one that cannot be reached are reported.
    store.untag("canary")
    assert mirror_tag(namespace, "canary", None).outcome is AliasOutcome.DELETED
    assert "canary" not in client.get_registered_model(model).aliases
    assert mirror_tag(namespace, "canary", None).outcome is AliasOutcome.UNCHANGED
    store.tag("v1", "eu.prod")
    dotted = mirror_tag(namespace, "eu.prod", "v1")
    assert dotted.outcome is AliasOutcome.INVALID and "'.'" in dotted.message and "eu-prod" in dotted.message
    assert mirror_tag(f"{namespace}-other", "prod", "v1").outcome is AliasOutcome.NOT_REGISTERED
    missing = tmp_path / "none" / "mlflow.db"
    assert mirror_tag(namespace, "prod", "v1", f"sqlite:///{missing}").outcome is AliasOutcome.NOT_REGISTERED
    assert not missing.exists()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = mirror_tag(namespace, "prod", "v1", "http://127.0.0.1:9")
    assert down.outcome is AliasOutcome.FAILED and not down.ok and "http://127.0.0.1:9" in down.message

    # 5. A task that failed before its run started: the reason on the job run.
    job_run = TrackedRun(mlflow_uri, job_runs["job-a"])
    record_task_failure_on_job(job_run, "a2", "TaskJobError: tasks.2.train: no such file a2/train.parquet")
    tags = client.get_run(job_runs["job-a"]).data.tags
    assert failed_tasks(tags) == {"a2": "TaskJobError: tasks.2.train: no such file a2/train.parquet"}


@pytest.mark.slow  # a local Ray, two tiny tasks trained and merged: ~1-2 min here
def test_a_submitted_job_reads_as_a_tree_with_curves_and_registered_versions(
    tmp_path: Path, redis_server: str, redis_client, namespace: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import yaml
    from test_workers_task import TINY_BUILDER, write_tiny_task

    from jobs.cli import main

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the workers import the tiny builder
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tasks = []
    for name, classes in (("fruit", (0, 1)), ("colors", (2, 1))):
        train, evaluation = write_tiny_task(tmp_path, name, classes)
        tasks.append({"name": name, "train": train, "eval": evaluation})
    job = {
        "model": {"builder": TINY_BUILDER, "max_length": 8},
        "adapter": {"r": 2, "p": 2, "phi": 1, "k_max": 8},
        "training": {"steps": 6, "batch_size": 8, "lr": 0.05, "log_every": 2},
        "tasks": tasks,
        "cluster": {"num_cpus_per_task": 1, "max_retries": 0},
        "store": {"redis_url": redis_server, "namespace": namespace},
        "tracking": {"mlflow_uri": uri},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["submit", str(tmp_path / "job.yaml")]) == 0, capsys.readouterr().err
    capsys.readouterr()

    store = SubspaceStore(redis_client, namespace)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(namespace)  # the namespace's experiment holds every run
    runs = client.search_runs([experiment.experiment_id], "")
    by_kind: dict[str, list] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get(TAG_KIND, "?"), []).append(run)
    (job_run,) = by_kind[RunKind.JOB]
    job_id = job_run.info.run_id
    assert {r.data.tags["sharecl.task"] for r in by_kind[RunKind.TASK]} == {"fruit", "colors"}
    assert all(r.data.tags[PARENT_TAG] == job_id for r in by_kind[RunKind.TASK])
    versions = [info.version for info in store.list_versions()]
    assert sorted(r.data.tags["sharecl.version"] for r in by_kind[RunKind.MERGE]) == sorted(versions)
    assert all(r.data.tags[PARENT_TAG] == job_id for r in by_kind[RunKind.MERGE])

    # The job run's curves: a point per version that holds the task, at step = version number.
    for task in ("fruit", "colors"):
        held = {version_number(v) for v in versions if task in store.manifest(v)["tasks"]}
        assert held <= set(_history(client, job_id, f"accuracy/{task}")), task
        assert held == set(_history(client, job_id, f"reconstruction_error/{task}")), task

    # Every version registered; `sharecl tag` then its alias: models:/...@prod is what pull prod pulls.
    model = registered_model_name(namespace)
    registered = {mv.tags["sharecl.version"] for mv in client.search_model_versions(f"name='{model}'")}
    assert registered == set(versions)
    assert main(["tag", "head", "prod", "--redis-url", redis_server, "--namespace", namespace]) == 0
    mirrored = mirror_tag(namespace, "prod", store.resolve("prod"), uri)
    assert mirrored.outcome in (AliasOutcome.SET, AliasOutcome.UNCHANGED), mirrored.message
    assert client.get_model_version_by_alias(model, "prod").tags["sharecl.version"] == store.resolve("prod")
