"""`sharecl submit`, `status` and `adapters add` through the CLI, in process: the default path of a
job (a local Ray that the command starts and stops itself), with real Redis and a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_workers_task import TINY_BUILDER, tiny_builder, write_tiny_task

from jobs.cli import main
from subspace_store import SubmissionStream, SubspaceStore
from workers import tracking

TESTS_DIR = str(Path(__file__).parent)


def _job_file(folder: Path, redis_url: str, namespace: str, mlflow_uri: str) -> Path:
    tasks = []
    for name, classes in (("fruit", (0, 1)), ("colors", (2, 1))):
        train, evaluation = write_tiny_task(folder, name, classes)
        # Relative to ``folder``, as task paths are relative to the checkout on a cluster.
        tasks.append({"name": name, "train": f"{name}/train.parquet", "eval": f"{name}/eval.parquet"})
        assert Path(train) == folder / name / "train.parquet" and Path(evaluation) == folder / name / "eval.parquet"
    job = {
        "model": {"builder": TINY_BUILDER, "max_length": 8},
        "adapter": {"r": 2, "p": 2, "phi": 1, "k_max": 8},
        "training": {"steps": 20, "batch_size": 8, "lr": 0.05, "log_every": 2},
        "tasks": tasks,
        "cluster": {"num_cpus_per_task": 1, "max_retries": 0},
        "store": {"redis_url": redis_url, "namespace": namespace},
        "tracking": {"mlflow_uri": mlflow_uri},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _peft_folder(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_builder(None, 2, seed=7)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["head"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a trained-looking adapter (PEFT starts lora_B at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


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
