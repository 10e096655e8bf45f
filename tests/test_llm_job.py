"""Causal-LM tasks through jobs: the schema's model options, what a worker receives and records, and a
job of the tiny Llama (``tests.llm_fixtures``) run by ``sharecl submit`` on a local Ray whose merged
tasks, pulled with ``sharecl pull --format peft``, load on ``AutoModelForCausalLM`` with share-cl's logits.
Real Redis, real MLflow (sqlite), real Ray, real transformers/peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import share
from jobs.errors import JobConfigError
from jobs.schema import load_job
from share.errors import ShareClError
from subspace_store import EvalSpec, SubmissionStream, SubspaceStore
from tests.llm_fixtures import make_string_tasks, make_tiny_llama
from workers.causal_lm import BUILDER_NAME, DEFAULT_TARGETS, ModelDtype, build_causal_lm, is_checkpointing
from workers.data import write_split
from workers.models import build_share_model, registered_builders
from workers.run_task import _load_data
from workers.task_job import TaskJob, TaskJobError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``model/`` (the tiny Llama) and ``tasks/{copy,reverse}/{train,eval}.parquet``."""
    root = tmp_path_factory.mktemp("tiny-llm")
    make_tiny_llama(root / "model")
    make_string_tasks(root / "tasks", ("copy", "reverse"))
    return root


def _job(tiny: Path, model_path: str = "model", **extra: dict) -> dict:
    tasks = [
        {"name": t, "train": f"tasks/{t}/train.parquet", "eval": f"tasks/{t}/eval.parquet"} for t in ("copy", "reverse")
    ]
    job = {"model": {"name_or_path": model_path, "builder": BUILDER_NAME, "max_length": 32}, "tasks": tasks}
    for section, values in extra.items():
        job.setdefault(section, {}).update(values)
    return job


def _write(folder: Path, job: dict) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _task_job(tiny: Path, **fields) -> TaskJob:
    base = {
        "job_id": "j",
        "task": "copy",
        "train_path": str(tiny / "tasks/copy/train.parquet"),
        "eval_path": str(tiny / "tasks/copy/eval.parquet"),
        "redis_url": "redis://localhost:1/0",
        "namespace": "ns",
        "tracking_uri": "sqlite:///x.db",
        "experiment_id": "0",
        "target_modules": DEFAULT_TARGETS,
        "builder": BUILDER_NAME,
        "model_name_or_path": str(tiny / "model"),
    }
    return TaskJob(**{**base, **fields})


# ---------------------------------------------------------------- schema and what a worker receives


def test_model_dtype_and_checkpointing_reach_the_task_and_its_eval_spec(tiny: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny)
    job = load_job(_write(tiny, _job(tiny, model={"dtype": "bf16", "gradient_checkpointing": True})))
    assert job.model.dtype == "bf16" and job.model.gradient_checkpointing is True

    from jobs.runner import task_jobs

    (copy, reverse) = task_jobs(job, "job1", "redis://localhost:1/0", "sqlite:///m.db", "0", None)
    assert copy.dtype is ModelDtype.BFLOAT16 and copy.gradient_checkpointing is True
    spec = copy.eval_spec()
    assert spec is not None and spec.dtype == "bfloat16" and spec.gradient_checkpointing is True
    assert EvalSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # A spec stored before these fields existed still reads, with the float32 defaults.
    old = {k: v for k, v in spec.to_dict().items() if k not in ("dtype", "gradient_checkpointing")}
    assert EvalSpec.from_dict(old).dtype == "float32" and EvalSpec.from_dict(old).gradient_checkpointing is False
    with pytest.raises(ShareClError, match="gradient_checkpointing must be true or false"):
        EvalSpec.from_dict({**spec.to_dict(), "gradient_checkpointing": "yes"})
    with pytest.raises(ShareClError, match="model dtype 'int4' is not one of"):
        _task_job(tiny, dtype="int4")


def test_the_schema_names_bad_model_options_and_every_builder(tiny: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny)
    with pytest.raises(JobConfigError, match=r"model.dtype: model dtype 'int8' is not one of float32, bfloat16"):
        load_job(_write(tiny, _job(tiny, model={"dtype": "int8"})))
    with pytest.raises(JobConfigError) as err:
        load_job(_write(tiny, _job(tiny, model={"builder": "hf-causal"})))
    assert "model.builder: 'hf-causal' is not a registered builder" in str(err.value)
    assert all(name in str(err.value) for name in registered_builders())
    assert {"hf-text-classifier", BUILDER_NAME} <= set(registered_builders())
    with pytest.raises(JobConfigError, match="model.gradient_checkpointing"):
        load_job(_write(tiny, _job(tiny, model={"gradient_checkpointing": "sometimes"})))


def test_a_relative_local_model_path_becomes_absolute_a_hub_id_stays(tiny: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny)
    assert load_job(_write(tiny, _job(tiny))).model.name_or_path == str(tiny / "model")
    # Not a local folder: left as written (the builder says it cannot be loaded offline).
    assert load_job(_write(tiny, _job(tiny, "Qwen/Qwen2.5-0.5B"))).model.name_or_path == "Qwen/Qwen2.5-0.5B"


def test_a_worker_reads_instruction_splits_and_refuses_mixed_formats(tiny: Path, tmp_path: Path) -> None:
    train, evaluation = _load_data(_task_job(tiny))
    assert len(train) == 176 and len(evaluation) == 40 and train.prompts[0].startswith("copy ")
    with pytest.raises(TaskJobError, match="is an instruction split .* no classes; remove num_labels"):
        _load_data(_task_job(tiny, num_labels=2))
    classification = write_split(tmp_path / "eval.parquet", ["a", "b"], [0, 1], ["x", "y"], task="copy")
    with pytest.raises(TaskJobError, match="is a classification split .* write both splits in one format"):
        _load_data(_task_job(tiny, eval_path=str(classification)))


# ---------------------------------------------------------------- builders receive the model options


def test_builders_receive_dtype_and_checkpointing_and_old_builders_still_build(tiny: Path) -> None:
    model, _ = build_share_model(
        BUILDER_NAME, str(tiny / "model"), DEFAULT_TARGETS, 0, 0, "cpu", dtype="bf16", gradient_checkpointing=True
    )
    assert {p.dtype for n, p in model.model.named_parameters() if "lora" not in n} == {torch.bfloat16}
    assert is_checkpointing(model.model)

    classifier, tokenizer = build_share_model(
        "hf-text-classifier", None, ["query", "value"], 3, 0, "cpu", dtype="bfloat16", gradient_checkpointing=True
    )
    encoder = classifier.model.encoder
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16} and is_checkpointing(encoder)
    assert {p.dtype for p in classifier.model.head.parameters()} == {torch.float32}  # the trained head
    batch = tokenizer(["a cat", "two dogs"], return_tensors="pt", padding=True)
    classifier.start_lora("t", r=2)
    logits = classifier(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert logits.shape == (2, 3) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    def three_arguments(model_name_or_path, num_labels, seed):  # a custom builder written before the options
        return build_causal_lm(model_name_or_path)

    from workers.models import _BUILDERS, register_builder

    register_builder("test-three-arguments", three_arguments)
    try:
        built, _ = build_share_model("test-three-arguments", str(tiny / "model"), DEFAULT_TARGETS, 0, 0, "cpu")
        assert built.model.dtype == torch.float32
        with pytest.raises(ShareClError, match="takes no keyword dtype .* add keyword parameters dtype"):
            build_share_model(
                "test-three-arguments", str(tiny / "model"), DEFAULT_TARGETS, 0, 0, "cpu", dtype="bfloat16"
            )
    finally:
        _BUILDERS.pop("test-three-arguments")


def test_a_bf16_base_trains_against_float32_bases_and_factors(tiny: Path) -> None:
    """The adapter side stays float32 over a bf16 base: bases, coefficients, trainables and the trained
    factors (computed in float32 also under autocast), so nothing the store keeps is rounded to bf16."""
    half, _ = build_causal_lm(str(tiny / "model"), dtype="bfloat16")
    model = share.ShareModel(half, list(DEFAULT_TARGETS))
    model.start_lora("copy", r=4)
    g = torch.Generator().manual_seed(0)
    for param in (p for p in model.parameters() if p.requires_grad):
        assert param.dtype == torch.float32
        param.data = torch.randn(param.shape, generator=g) / 10
    subspace, _ = share.merge(None, {"copy": model.trained_adapter()})
    model.load_subspace(subspace)
    model.start_coefficients("reverse", p=4, phi=1)
    layer = model.layers["model.layers.0.self_attn.q_proj"]
    assert layer.U_A.dtype == layer.U_B.dtype == torch.float32
    for param in (p for p in model.parameters() if p.requires_grad):
        param.data = torch.randn(param.shape, generator=g) / 10
    t = {k: v.detach().double() for k, v in layer.trainable.items()}
    exact_B = layer.U_B.double() @ t["E_B"] + t["V_B"] @ t["F_B"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        B, A, _ = layer.trained_factors()
    assert B.dtype == A.dtype == torch.float32
    assert (B.double() - exact_B).norm() / exact_B.norm() < 1e-6  # bf16 would leave ~1e-3
    # Called outside autocast, the bf16 model still runs (the adapter's part in float32).
    ids = torch.randint(4, 12, (2, 6), generator=g)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_an_llm_job_trains_merges_and_pulls_adapters_for_automodelforcausallm(
    tiny: Path,
    tmp_path: Path,
    redis_server: str,
    redis_client,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.cli import main

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = _job(
        tiny,
        model={"gradient_checkpointing": True},  # reaches the worker's builder (checked in the metadata below)
        adapter={"target_modules": list(DEFAULT_TARGETS), "r": 4, "phi": 1, "k_max": 8},
        training={"steps": 12, "batch_size": 16, "lr": 1e-2, "log_every": 4, "eval_batch_size": 40},
        cluster={"num_cpus_per_task": 1, "max_retries": 0},
        store={"redis_url": redis_server, "namespace": namespace},
        tracking={"mlflow_uri": mlflow_uri},
    )
    # The job file names the model and the tasks relative to the current directory, as llm.yaml does.
    monkeypatch.chdir(tiny)
    # Two jobs, so the second task trains coefficients against the first one's merged subspace.
    for i, mode in ((0, "auto"), (1, "coefficients")):
        one = {**job, "tasks": job["tasks"][i : i + 1]}
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        assert main(["submit", str(_write(folder, one)), f"training.mode={mode}"]) == 0
        out = capsys.readouterr().out
        assert f"{one['tasks'][0]['name']}: merged into v" in out, out

    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    assert stream.rejections() == {}
    head = store.head()
    tasks = store.manifest(head)["tasks"]
    assert set(tasks) == {"copy", "reverse"}
    model_dir = str(tiny / "model")
    for task, mode in (("copy", "lora"), ("reverse", "coefficients")):
        submitted = tasks[task]["metadata"]["submission"]["metadata"]
        assert submitted["builder"] == BUILDER_NAME and submitted["base_model"] == model_dir  # absolute
        assert submitted["mode"] == mode and {"exact_match", "rougeL", "loss"} <= set(submitted["eval_metrics"])
        assert EvalSpec.of(submitted).gradient_checkpointing is True

    status_args = ["status", "--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", mlflow_uri]
    assert main([*status_args, "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)["jobs"]
    scores = [t["accuracy_after_merge"] for j in jobs for t in j["tasks"]]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)  # each task's ROUGE-L after its merge

    served, _ = build_share_model(BUILDER_NAME, model_dir, DEFAULT_TARGETS, 0, 0, "cpu")
    served.load_subspace(store.get(head))
    served.eval()
    ids = torch.randint(4, 12, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids, attention_mask=mask).logits
    for task in ("copy", "reverse"):
        folder = tmp_path / f"{task}-peft"
        pull = ["pull", head, "--task", task, "-o", str(folder), "--format", "peft"]
        assert main([*pull, "--redis-url", redis_server, "--namespace", namespace]) == 0
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == model_dir
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(folder)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
            expected = served(input_ids=ids, attention_mask=mask, tasks=task).logits
        assert float((got - expected).norm() / expected.norm()) <= 1e-5, task
        assert float((base - expected).norm() / expected.norm()) > 1e-4, task  # the adapter changes the model
