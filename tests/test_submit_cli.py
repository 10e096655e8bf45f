"""`sharecl submit`, `status` and `adapters add` through the CLI, in process: the default path of a
job (a local Ray that the command starts and stops itself), with real Redis and a real MLflow store.

Also what a submit checks before it contacts anything (task files, ``--cluster-dir`` for a Jobs API
head on this machine), the progress records a worker writes and ``status`` shows, the driver's merge-wait
heartbeat, and a worker's silence about Hugging Face's "Loading weights" bars. ``loading_builder`` (the
tiny model after loading a real Hugging Face checkpoint) is importable by Ray workers as
``test_submit_cli:loading_builder``.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import peft_folder, write_tiny_job
from test_workers_task import TINY_BUILDER, tiny_builder, tiny_job, write_tiny_task

from jobs.cli import main
from jobs.runner import HEARTBEAT_S, MergeWaitError, RunningJob, TaskOutcome, TaskState, new_job_id
from jobs.schema import load_job
from subspace_store import Submission, SubmissionStream, SubspaceStore
from subspace_store.embedded import free_port
from subspace_store.progress import ProgressBoard, TaskPhase
from subspace_store.tracking import TAG_FAILED, TAG_JOB, TAG_KIND, TAG_NAMESPACE, TAG_STATUS, TAG_TASKS, RunKind
from workers import tracking
from workers.run_task import ProgressReporter, run_task_job

TESTS_DIR = str(Path(__file__).parent)
LOADING_BUILDER = "test_submit_cli:loading_builder"


def loading_builder(model_name_or_path: str | None, num_labels: int, seed: int) -> tuple[torch.nn.Module, object]:
    """The tiny model, after loading the Hugging Face checkpoint ``model_name_or_path`` as a real builder
    does (which draws transformers' "Loading weights" bar unless progress bars are off)."""
    from transformers import BertModel

    BertModel.from_pretrained(model_name_or_path)
    return tiny_builder(None, num_labels, seed)


def save_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def _job_file(folder: Path, redis_url: str, namespace: str, mlflow_uri: str) -> Path:
    tasks = []
    for name, classes in (("fruit", (0, 1)), ("colors", (2, 1))):
        train, evaluation = write_tiny_task(folder, name, classes)
        # Relative to ``folder``, as task paths are relative to the checkout on a cluster.
        tasks.append({"name": name, "train": f"{name}/train.parquet", "eval": f"{name}/eval.parquet"})
        assert Path(train) == folder / name / "train.parquet" and Path(evaluation) == folder / name / "eval.parquet"
    return write_tiny_job(folder, tasks, redis_url, namespace, mlflow_uri, steps=20)


def _peft_folder(folder: Path) -> Path:
    """A PEFT folder for the tiny model that also saves its classifier head (``modules_to_save``)."""
    return peft_folder(folder, modules_to_save=["head"])


def test_submit_errors_exit_2_and_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _job_file(tmp_path, "redis://localhost:1/0", "ns", f"sqlite:///{tmp_path / 'm.db'}")
    assert main(["submit", str(job), "training.stpes=3"]) == 2
    assert "Did you mean 'steps'?" in capsys.readouterr().err
    assert main(["submit", str(tmp_path / "missing.yaml")]) == 2
    assert "job file not found" in capsys.readouterr().err
    assert main(["submit", str(job), "--no-wait"]) == 2
    assert "--no-wait needs a Ray Jobs API address" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_runs_the_job_and_status_shows_it(
    tmp_path: Path,
    redis_server: str,
    redis_client,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The local Ray that `submit` starts passes this environment on to its workers and the coordinator.
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = _job_file(tmp_path, redis_server, namespace, mlflow_uri)
    store_args = ["--redis-url", redis_server, "--namespace", namespace]

    # An external PEFT adapter waits in the stream; the job's coordinator merges it with the tasks.
    peft_dir = _peft_folder(tmp_path / "peft_fruit")
    assert main(["adapters", "add", str(peft_dir), "--task", "external", *store_args]) == 0
    assert "submitted" in capsys.readouterr().out

    # What a Ray Jobs API entrypoint runs: relative task paths are read from --base-dir, not the cwd.
    monkeypatch.chdir(tmp_path / "peft_fruit")
    assert main(["submit", str(job), "training.steps=6", "--base-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy after each merge" in out and f"mlflow ui --backend-store-uri {mlflow_uri}" in out
    assert "fruit: merged into v" in out and "colors: merged into v" in out

    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    assert set(store.manifest("head")["tasks"]) == {"fruit", "colors", "external"}
    assert stream.rejections() == {}

    assert main(["status", *store_args, "--mlflow-uri", mlflow_uri]) == 0
    shown = capsys.readouterr().out
    assert "submissions: 3 total, 3 merged, 0 rejected" in shown and "external" in shown
    assert "job " in shown and "fruit" in shown and "merged v" in shown

    assert main(["status", *store_args, "--mlflow-uri", mlflow_uri, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    (latest,) = status["jobs"]
    assert latest["status"] == "merged" and {t["task"] for t in latest["tasks"]} == {"fruit", "colors"}
    assert all(t["accuracy_after_merge"] is not None for t in latest["tasks"])
    job_run = tracking.client(mlflow_uri)
    assert [a.path for a in job_run.list_artifacts(latest["run_id"])] == ["accuracy_matrix.csv"]
    csv = job_run.download_artifacts(latest["run_id"], "accuracy_matrix.csv", str(tmp_path))
    assert Path(csv).read_text().splitlines()[0] == "version,fruit,colors"

    # A task name the head already holds is refused before anything is trained or submitted.
    assert main(["submit", str(job), "--base-dir", str(tmp_path)]) == 2
    assert "already in version" in capsys.readouterr().err
    assert main(["adapters", "add", str(peft_dir), "--task", "external", *store_args]) == 2
    assert "already in" in capsys.readouterr().err

    # --wait starts the namespace's coordinator (a new local Ray) and returns once it is merged.
    more = ["--mlflow-uri", mlflow_uri, "--wait"]
    assert main(["adapters", "add", str(peft_dir), "--task", "external2", *store_args, *more]) == 0
    assert "task 'external2' (" in (out := capsys.readouterr().out) and "merged into v" in out
    assert "external2" in store.manifest("head")["tasks"]


def test_demo_job_is_the_wordnet_example_with_the_data_folders_tasks(tmp_path: Path) -> None:
    from jobs.demo import demo_job

    entries = []
    for name in ("wn_a", "wn_b", "wn_c"):
        write_tiny_task(tmp_path, name)
        entries.append({"name": name, "train": f"{name}/train.parquet", "eval": f"{name}/eval.parquet"})
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": entries}))

    cfg = demo_job(tmp_path, num_tasks=2, overrides=["training.steps=7"], say=lambda _: None)
    assert [t.name for t in cfg.tasks] == ["wn_a", "wn_b"]
    assert cfg.tasks[0].train == str(tmp_path / "wn_a" / "train.parquet")
    assert cfg.training.steps == 7 and cfg.training.batch_size == 16  # the override wins over the demo budget
    assert cfg.model.name_or_path is None and cfg.adapter.target_modules == ["query", "value"]
    assert cfg.store.namespace.startswith("demo-") and cfg.store.redis_url is None
    with pytest.raises(ValueError, match="--tasks must be between 1 and 3"):
        demo_job(tmp_path, num_tasks=4, say=lambda _: None)
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        demo_job(tmp_path, overrides=["training.stepz=1"], say=lambda _: None)


# ---------------------------------------------------------------- checked before anything is contacted


def test_submit_help_names_the_cluster_dir_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["submit", "--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "With --address http://HEAD:8265 (the Ray Jobs API)" in shown
    assert "relative task paths from --cluster-dir there (default ~/share-cl" in shown
    assert "--cluster-dir $PWD" in shown and "sharecl-<job id>" in shown


def test_a_head_on_this_machine_gets_its_cluster_dir_checked_before_it_is_contacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = _job_file(tmp_path, "redis://localhost:1/0", "ns", f"sqlite:///{tmp_path / 'm.db'}")
    nobody = f"http://127.0.0.1:{free_port()}"  # no Jobs API there: contacting it would fail otherwise
    absent = tmp_path / "absent"
    assert main(["submit", str(job), "--address", nobody, "--cluster-dir", str(absent)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--cluster-dir {absent}: no such directory here" in err
    assert "(default ~/share-cl, where ray_cluster.yaml syncs the checkout)" in err and "could not submit" not in err
    if not Path("~/share-cl").expanduser().exists():  # the default, as a user on a fresh machine meets it
        assert main(["submit", str(job), "--address", nobody]) == 2
        assert "--cluster-dir ~/share-cl: no such directory here" in capsys.readouterr().err
    # A remote head's checkout is a path on the cluster: a relative one would be read from the upload folder.
    assert main(["submit", str(job), "--address", "http://head.invalid:8265", "--cluster-dir", "share-cl"]) == 2
    assert "--cluster-dir share-cl: give the checkout's path on the cluster, absolute or ~/" in capsys.readouterr().err
    # A remote head's driver (the Jobs API entrypoint) checks it first thing, on the cluster.
    assert main(["submit", str(job), "--base-dir", str(absent)]) == 2
    assert f"--cluster-dir {absent}: no such directory on the cluster node running the job's driver (" in (
        capsys.readouterr().err
    )
    # With the checkout there, the next step is the head itself (and nothing answers at that port).
    assert main(["submit", str(job), "--address", nobody, "--cluster-dir", str(tmp_path)]) == 2
    assert f"could not submit to the Ray Jobs API at {nobody}" in capsys.readouterr().err


def _write_table(path: Path, columns: dict[str, list], metadata: dict[bytes, bytes] | None) -> None:
    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, path)


def test_submit_lists_every_bad_task_file_before_launching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # --base-dir changes the directory, as the Jobs API entrypoint's driver does
    write_tiny_task(tmp_path, "good")
    write_tiny_task(tmp_path, "no_meta")
    _write_table(tmp_path / "no_meta" / "train.parquet", {"text": ["a b", "c d"], "label": [0, 1]}, None)
    write_tiny_task(tmp_path, "no_label")
    meta = {b"label_names": b'["c0", "c1"]', b"task": b"no_label"}
    _write_table(tmp_path / "no_label" / "train.parquet", {"text": ["a b", "c d"], "labels": [0, 1]}, meta)
    write_tiny_task(tmp_path, "mismatch", (0, 1))
    (tmp_path / "other").mkdir()
    write_tiny_task(tmp_path / "other", "mismatch", (2, 1))
    names = ["good", "no_meta", "no_label", "mismatch"]
    tasks = [{"name": n, "train": f"{n}/train.parquet", "eval": f"{n}/eval.parquet"} for n in names]
    tasks[3]["eval"] = "other/mismatch/eval.parquet"
    job = {
        "model": {"builder": TINY_BUILDER, "max_length": 8},
        "tasks": tasks,
        # Nothing listens at either: the files are checked before Redis, MLflow or Ray are contacted.
        "store": {"redis_url": "redis://localhost:1/0", "namespace": "ns"},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'never' / 'm.db'}"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))

    def problems(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "3 problem(s) in the job's task files; nothing was launched" in err
        return [line.strip() for line in err.splitlines() if line.strip().startswith("- tasks.")]

    found = problems(["submit", str(path), "--base-dir", str(tmp_path)], capsys)
    assert len(found) == 3 and not any("(good)" in line for line in found)
    assert re.search(r"tasks\.1 \(no_meta\): training split: .*no_meta/train\.parquet.*'label_names'", found[0])
    no_label = (
        r"tasks\.2 \(no_label\): training split: .*no_label/train\.parquet: columns \['labels', 'text'\] are neither"
    )
    assert re.search(no_label + r" a classification split \(text, label\)", found[1])
    assert re.search(r"tasks\.3 \(mismatch\): eval split .*other/mismatch/eval\.parquet has classes", found[2])
    assert not (tmp_path / "never").exists()  # MLflow was never opened

    # The same through the Ray Jobs API to a head on this machine: checked under --cluster-dir, not submitted.
    nobody = f"http://127.0.0.1:{free_port()}"
    assert problems(["submit", str(path), "--address", nobody, "--cluster-dir", str(tmp_path)], capsys) == found


# ---------------------------------------------------------------- progress, status, heartbeats


def _job_run(uri: str, experiment_id: str, job_id: str, namespace: str, tasks: list[str]) -> tracking.TrackedRun:
    """A job's MLflow run as the driver opens it."""
    tags = {
        TAG_KIND: RunKind.JOB,
        TAG_JOB: job_id,
        TAG_NAMESPACE: namespace,
        TAG_STATUS: "running",
        TAG_TASKS: ",".join(tasks),
    }
    return tracking.TrackedRun.start(uri, experiment_id, name=job_id, tags=tags)


def test_status_shows_step_loss_and_eta_of_running_tasks_and_why_one_failed(
    tmp_path: Path,
    redis_server: str,
    redis_client,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # run_task_job sets it in its process
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.ensure_experiment(uri, namespace)
    job_id = new_job_id()
    run = _job_run(uri, experiment_id, job_id, namespace, ["fruit", "colors", "broken", "later"])
    board = ProgressBoard(redis_client, namespace)

    # Reports as run_task_job makes them: step 0, then every log step (the last one: evaluating).
    def reporter(task: str, node: str | None) -> ProgressReporter:
        return ProgressReporter(
            tiny_job(tmp_path, task, redis_server, namespace, uri, experiment_id, job_id=job_id), node
        )

    fruit = reporter("fruit", "node-1")
    fruit.total = 250
    fruit.report(TaskPhase.TRAINING, step=0, total=250)
    assert board.read(job_id)["fruit"].eta_s() is None  # no pace before the first step
    fruit.on_metrics(40, {"loss": 0.53, "elapsed_s": 20.0, "examples_per_s": 32.0})
    record = board.read(job_id)["fruit"]
    assert (record.phase, record.step, record.total, record.loss, record.train_seconds, record.node) == (
        TaskPhase.TRAINING,
        40,
        250,
        0.53,
        20.0,
        "node-1",
    )
    assert record.eta_s(now=record.updated) == pytest.approx(20.0 / 40 * 210)  # 105 s at this pace
    assert record.eta_s(now=record.updated + 5.0) == pytest.approx(100.0)
    colors = reporter("colors", None)
    colors.total = 6
    colors.on_metrics(6, {"loss": 0.1, "elapsed_s": 3.0})
    # A worker that fails before its MLflow run starts (its data): the reason is in its record.
    bad = tiny_job(tmp_path, "broken", redis_server, namespace, uri, experiment_id, job_id=job_id)
    _write_table(Path(bad.train_path), {"text": ["a b"], "label": [0]}, None)
    with pytest.raises(ValueError, match="label_names"):
        run_task_job(bad)

    assert main(["status", "--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", uri]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    expected = {
        "fruit": r"  fruit\s+training 40/250, loss 0\.5300, ETA (\d+m\d\ds|\d+s)",
        "colors": r"  colors\s+evaluating 6/6, loss 0\.1000",
        "broken": r"  broken\s+failed\s+TaskJobError: task 'broken': training split: .*label_names.*",
    }
    for task, pattern in expected.items():
        assert re.fullmatch(pattern, lines[task]), lines[task]
    assert re.fullmatch(r"  later\s+queued", lines["later"])

    assert main(["status", "--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", uri, "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)["jobs"]
    tasks = {t["task"]: t for t in shown["tasks"]}
    assert tasks["fruit"]["progress"]["step"] == 40 and tasks["fruit"]["progress"]["phase"] == "training"
    assert tasks["later"]["progress"] is None and "label_names" in tasks["broken"]["error"]
    run.finish("FINISHED")


def test_a_waiting_driver_says_what_it_waits_for_and_records_why_a_task_failed(
    tmp_path: Path,
    redis_server: str,
    redis_client,
    namespace: str,
    make_adapter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_job(_job_file(tmp_path, redis_server, namespace, uri), check_files=False)
    experiment_id = tracking.ensure_experiment(uri, cfg.experiment_name)
    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    # A submission that no coordinator merges (none runs): the driver waits for it and says so.
    sid = stream.submit(Submission("fruit", adapter=make_adapter(1), base_version=None, metadata={}))
    job_id = new_job_id()
    run = _job_run(uri, experiment_id, job_id, namespace, ["fruit", "colors"])
    said: list[str] = []
    job = RunningJob(
        cfg,
        job_id,
        {},
        store=store,
        stream=stream,
        coordinator=None,
        run=run,
        experiment_id=experiment_id,
        redis_url=redis_server,
        owns_ray=False,
        say=said.append,
        started=time.time(),
        heartbeat_s=0.2,
    )
    assert HEARTBEAT_S <= 60  # the default interval: never minutes of silence
    job.outcomes["fruit"] = TaskOutcome("fruit", TaskState.SUBMITTED, submission_id=sid)
    reason = "the worker died and retries ran out (WorkerCrashedError); see the worker log in the Ray dashboard"
    job.outcomes["colors"] = TaskOutcome("colors", TaskState.FAILED, error=reason)
    job._record_failure(job.outcomes["colors"])

    # What the driver's heartbeat says while tasks train: each task's record, or that no worker has it yet.
    assert (
        job._where_tasks_are(["fruit", "colors"]) == f"fruit queued (no worker has started it); colors failed, {reason}"
    )

    # 5 s at heartbeats of 0.2 s: two heartbeat lines even when the loaded machine stalls for seconds.
    with pytest.raises(MergeWaitError, match=rf"\{{'fruit': '{sid}'\}} .* neither merged nor rejected within 5s"):
        job._follow_merges(timeout_s=5.0)
    assert said[0] == f"[job] every task finished training; waiting for the coordinator to merge fruit ({sid})"
    waits = said[1:]
    assert len(waits) >= 2, said
    for line in waits:
        assert re.fullmatch(
            rf"\[job\] still waiting for the coordinator to merge fruit \({sid}\): \d+s so far; namespace "
            rf"'{namespace}' has 1 submission\(s\) queued and 0 being merged",
            line,
        ), line

    # The failure of a task whose worker never wrote anything: on the job run and in `sharecl status`.
    assert tracking.client(uri).get_run(run.run_id).data.tags[TAG_FAILED + "colors"] == reason
    record = ProgressBoard(redis_client, namespace).read(job_id)["colors"]
    assert record.phase is TaskPhase.FAILED and record.error == reason
    assert main(["status", "--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"  colors\s+failed\s+{re.escape(reason)}", out), out
    run.finish("FAILED")


def test_a_worker_draws_no_loading_bars_and_leaves_its_progress(
    tmp_path: Path,
    redis_server: str,
    redis_client,
    namespace: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os

    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_enabled = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():  # huggingface_hub's own bars stay off if an earlier test imported it under the env
        warnings.simplefilter("ignore")
        hf_logging.enable_progress_bar()
    try:
        bert = save_tiny_bert(tmp_path / "bert")
        capfd.readouterr()
        loading_builder(str(bert), 2, 0)
        assert "Loading weights" in capfd.readouterr().err  # what every job log was full of

        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        experiment_id = tracking.ensure_experiment(uri, namespace)
        job_id = new_job_id()
        job = tiny_job(tmp_path, "fruit", redis_server, namespace, uri, experiment_id, job_id=job_id)
        import dataclasses

        summary = run_task_job(dataclasses.replace(job, builder=LOADING_BUILDER, model_name_or_path=str(bert)))
        err = capfd.readouterr().err
    finally:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        if was_enabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf_logging.enable_progress_bar()
    assert "[fruit] step 3/6 loss" in err and "[fruit] submitted" in err
    assert "Loading weights" not in err and "it/s]" not in err

    record = ProgressBoard(redis_client, namespace).read(job_id)["fruit"]
    assert (record.phase, record.step, record.total, record.attempt) == (TaskPhase.SUBMITTED, 6, 6, 1)
    assert record.error is None and record.started <= record.updated and summary.submission_id
