"""A user's journeys through the `sharecl` CLI, as the README's "Using it" section writes them.

Every line of that section's command blocks is run here, in a temporary folder laid out as a checkout
(the README's relative paths are those of the folder): the offline block exactly as written, the job
block exactly as written except that `submit` gets extra overrides that train a tiny model in seconds
(its data is tiny Parquet at the example job's paths). Also: the demo's follow-up commands, the Ray
dashboard it names, `--version`, every command's documentation and shell completion.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing is downloaded

import argparse  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from test_cli_offline import Tiny  # noqa: E402
from test_submit_cli import _peft_folder  # noqa: E402
from test_workers_task import TINY_BUILDER, write_tiny_task  # noqa: E402

from jobs.cli import build_parser, main, package_version  # noqa: E402
from share import load_peft_adapter, merge  # noqa: E402
from subspace_store import SubspaceStore, connect  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = str(Path(__file__).parent)
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent

# What `submit` gets on top of the README's line, so that the job trains a tiny model in seconds.
TINY_JOB = [
    f"model.builder={TINY_BUILDER}",
    "model.max_length=8",
    "adapter.r=2",
    "adapter.p=2",
    "adapter.phi=1",
    "adapter.k_max=8",
    "training.steps=4",
    "training.batch_size=8",
    "training.lr=0.05",
    "training.log_every=2",
    "cluster.max_retries=0",
]


def readme_blocks() -> list[list[str]]:
    """The lines of each ```bash block of the README's "Using it" section."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Using it\n")
    section = text[start : text.index("\n## ", start + 1)]
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def readme_block(first_command: str) -> list[list[str]]:
    """The block whose lines include ``first_command``, each line as argv (comments dropped)."""
    (block,) = [b for b in readme_blocks() if any(line.startswith(first_command) for line in b)]
    return [shlex.split(line, comments=True) for line in block]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert argv[0] == "sharecl", argv
    code = main(argv[1:])
    out, err = capsys.readouterr()
    assert code == 0, (argv, out, err)
    return out


def save_adapter(folder: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (with its head) on the tiny model of test_cli_offline, distinct per seed."""
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=["query", "value"], r=4, init_lora_weights=False, modules_to_save=["head"])
    get_peft_model(Tiny(16), config).save_pretrained(str(folder))
    return folder


# -- the offline block, exactly as written ------------------------------------------------------------


def test_readme_offline_commands_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("adapterA", "adapterB", "adapterC"), start=1):
        save_adapter(tmp_path / name, seed)
    lines = readme_block("sharecl compress")
    assert [argv[1] for argv in lines] == ["compress", "add", "export", "info"]
    outputs = [run(capsys, argv) for argv in lines]

    # compress and add list every task with its error; the export loads with PEFT as the comment says.
    assert re.search(r"^\s+adapterA\s", outputs[0], re.M) and re.search(r"^\s+adapterB\s", outputs[0], re.M)
    assert all(re.search(rf"^\s+{task}\s", outputs[1], re.M) for task in ("adapterA", "adapterB", "C"))
    original = load_peft_adapter(tmp_path / "adapterC")
    loaded = PeftModel.from_pretrained(Tiny(16), str(tmp_path / "C_peft")).eval()
    for module, (B, A) in original.factors.items():
        lora = loaded.base_model.model.get_submodule(module)
        got = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
        expected = B @ A * original.scale(module)
        assert ((got - expected).norm() / expected.norm()).item() <= 0.05, module  # the default max_error
    assert "3 tasks" in outputs[3]


# -- the job block: submit, namespaces, status, versions, show, tag, pull, adapters add, store -------------


def _checkout(folder: Path) -> None:
    """The example job file and tiny task splits at the paths it names, as in a checkout after the demo."""
    (folder / "jobs" / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "jobs" / "examples" / "wordnet.yaml", folder / "jobs" / "examples" / "wordnet.yaml")
    job = yaml.safe_load((ROOT / "jobs" / "examples" / "wordnet.yaml").read_text(encoding="utf-8"))
    classes = [(0, 1), (1, 2), (0, 2), (2, 0), (1, 0)]
    for i, task in enumerate(job["tasks"]):
        data = folder / "benchmarks" / "data" / "wordnet"
        train, evaluation = write_tiny_task(data, task["name"], classes[i % len(classes)])
        assert (train, evaluation) == (str(folder / task["train"]), str(folder / task["eval"]))


@pytest.mark.slow
def test_readme_job_journey_runs_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHARECL_HOME", str(tmp_path / "home"))  # a fresh user's state: embedded Redis, MLflow
    for name in ("SHARECL_REDIS_URL", "SHARECL_NAMESPACE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)  # the local Ray's workers import the tiny model builder
    _checkout(tmp_path)
    _peft_folder(tmp_path / "path" / "to" / "peft_adapter")
    out: dict[str, str] = {}
    try:
        for argv in readme_block("sharecl submit"):
            if argv == [".", ".venv/bin/activate"]:
                continue  # this test runs inside that environment
            if argv[0] == "eval":
                assert argv[1] == "$(register-python-argcomplete sharecl)"
                script = subprocess.run(
                    [str(VENV_BIN / "register-python-argcomplete"), "sharecl"], capture_output=True, text=True
                )
                assert script.returncode == 0 and "complete" in script.stdout and "sharecl" in script.stdout
                continue
            if argv[0] == "export":
                key, _, value = argv[1].partition("=")
                # Before it: a command in the default namespace names the one the job wrote to.
                assert "namespaces with versions: wordnet" in run(capsys, ["sharecl", "versions"])
                monkeypatch.setenv(key, value)
                continue
            extra = TINY_JOB if argv[1] == "submit" else []
            out[" ".join(argv[1:3])] = run(capsys, [*argv, *extra])
    finally:
        main(["store", "stop"])
    validated = out["validate jobs/examples/wordnet.yaml"]
    assert "# valid: namespace 'wordnet'" in validated and "steps: 100" in validated
    assert "merged into v" in out["submit jobs/examples/wordnet.yaml"]
    (row,) = [line for line in out["namespaces"].splitlines() if line.startswith("wordnet ")]
    assert row.split()[1].startswith("v") and row.split()[3] == "5", row  # head, versions, 5 tasks
    assert "namespace 'wordnet'" in out["status"] and "job " in out["status"]
    assert "HEAD" in out["versions"] and out["show head"].startswith("version:")
    assert out["tag head"].startswith("prod -> v")
    peft_dir = tmp_path / "wn_things_peft"
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()
    assert "wn_things" in (peft_dir / "README.md").read_text(encoding="utf-8")
    assert "submitted" in out["adapters add"]


# -- the demo's follow-up commands and its Ray dashboard -------------------------------------------------


def test_demo_follow_up_commands_name_the_namespace_and_run(
    private_redis, make_adapter, tmp_path: Path, monkeypatch, capsys
) -> None:
    from jobs.demo import follow_up_commands

    namespace = "demo-20260101-120000"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHARECL_REDIS_URL", private_redis.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SHARECL_NAMESPACE", raising=False)
    subspace, _ = merge(None, {"wn_things": make_adapter(0), "wn_abstract": make_adapter(1)})
    SubspaceStore(connect(private_redis.url), namespace).publish(subspace, parent=None)

    lines = follow_up_commands(namespace, "wn_things")
    assert all(f"--namespace {namespace}" in line for line in lines)
    assert "sharecl versions --namespace demo-20260101-120000" in lines
    for line in lines:
        run(capsys, shlex.split(line))
    assert (tmp_path / "wn_things_peft" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_demo_prints_the_dashboard_and_the_follow_up_commands(tmp_path: Path, redis_server: str, monkeypatch) -> None:
    """`run_demo_job` on a Ray that runs its dashboard (as the demo's should): the URL answers, and the job
    ends with the commands for its namespace."""
    import urllib.error
    import urllib.request

    import ray

    from coordinator.actor import stop_coordinator
    from jobs.demo import dashboard_url, follow_up_commands, run_demo_job
    from jobs.schema import load_job

    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    train, evaluation = write_tiny_task(tmp_path, "fruit")
    namespace = "demo-test-" + tmp_path.name[-8:].replace("_", "-")
    job = {
        "model": {"builder": TINY_BUILDER, "max_length": 8},
        "adapter": {"r": 2, "p": 2, "phi": 1, "k_max": 8},
        "training": {"steps": 4, "batch_size": 8, "lr": 0.05, "log_every": 2},
        "tasks": [{"name": "fruit", "train": train, "eval": evaluation}],
        "cluster": {"num_cpus_per_task": 1, "max_retries": 0},
        "store": {"redis_url": redis_server, "namespace": namespace},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    cfg = load_job(tmp_path / "job.yaml")
    assert dashboard_url() is None  # no Ray yet
    ray.init(address="local", include_dashboard=True, log_to_driver=False)
    said: list[str] = []
    try:
        url = dashboard_url()
        assert url is not None and url.startswith("http://")
        try:
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.status == 200
        except urllib.error.HTTPError as err:  # Ray's token authentication answers 401: still the dashboard
            assert err.code == 401, err
        result = run_demo_job(cfg, say=said.append)
        stop_coordinator(namespace)
    finally:
        ray.shutdown()
    assert result.ok
    assert f"[demo] Ray dashboard (workers, tasks, logs) while the job runs: {url}" in said
    assert [line.strip() for line in said[-len(follow_up_commands(namespace, "fruit")) - 1 : -1]] == (
        follow_up_commands(namespace, "fruit")
    )


# -- --version, documentation of every command, shell completion -------------------------------------------


def test_version_comes_from_the_package_metadata(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"sharecl {version('share-cl')}" == f"sharecl {package_version()}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append((f"{prefix}{name}", child))
                found += _commands(child, f"{prefix}{name} ")
    return found


def test_every_command_has_a_description_and_documented_positionals() -> None:
    commands = _commands(build_parser())
    names = [name for name, _ in commands]
    for wanted in ("add", "export", "info", "tag", "pull", "namespaces", "validate", "show", "adapters add"):
        assert wanted in names
    for name, parser in commands:
        assert parser.description, f"sharecl {name} has no description"
        for action in parser._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"sharecl {name}: positional {action.metavar or action.dest} has no help"
                assert action.metavar or action.choices, f"sharecl {name}: positional {action.dest} has no metavar"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("sharecl names", {"namespaces"}),
        ("sharecl show --js", {"--json"}),
        ("sharecl store s", {"start", "stop", "status"}),
    ],
)
def test_shell_completion_answers_from_the_parser(tmp_path: Path, line: str, expected: set[str]) -> None:
    """What bash gets after `eval "$(register-python-argcomplete sharecl)"`: argcomplete runs the console
    script with the line being completed in the environment."""
    answer = tmp_path / "completions"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_SHELL": "bash",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(answer),
        "_ARGCOMPLETE_IFS": "\n",
    }
    done = subprocess.run([str(VENV_BIN / "sharecl")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {word.strip() for word in answer.read_text().split("\n") if word.strip()} == expected
