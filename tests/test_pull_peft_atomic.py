"""A multi-task ``sharecl pull --format peft`` writes every task or none: when a later task fails to export, the
output folder is left as it was (absent, or with its previous contents), not holding the tasks before it.
Real redis-server, the CLI in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from share import merge
from subspace_store import SubspaceStore, connect

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("encoder.layer.0.query", "encoder.layer.0.value")  # share-cl's TextClassifier names
CLASSIFIER = {"head.weight": (3, 16), "head.bias": (3,)}  # what the encoder-classifier layout exports


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def version(redis_server, namespace, make_adapter) -> str:
    """Task ``a`` exports under the encoder-classifier layout; ``b``, exported after it, does not (its head is no
    ``head.weight`` + ``head.bias`` classifier)."""
    adapters = {
        "a": make_adapter(0, modules=MODULES, head=CLASSIFIER),
        "b": make_adapter(1, modules=MODULES, head={"classifier.weight": (3, 16)}),
    }
    subspace, _ = merge(None, adapters)
    assert list(subspace.tasks) == ["a", "b"]
    return SubspaceStore(connect(redis_server), namespace).publish(subspace, None)


def pull(cli, version: str, out: Path, *more: str) -> tuple[int, str, str]:
    layout = ["--layout", "encoder-classifier", "--base-model", "sentence-transformers/all-MiniLM-L6-v2"]
    return cli("pull", version, "-o", str(out), "--format", "peft", *layout, *more)


def test_a_task_failing_to_export_leaves_no_output_folder(cli, version, tmp_path: Path) -> None:
    code, _, _ = pull(cli, version, tmp_path / "alone", "--task", "a")
    assert code == 0  # task a alone exports: what fails below is task b

    out = tmp_path / "out"
    code, stdout, err = pull(cli, version, out)

    assert code == 2 and "task 'b': head tensors ['classifier.weight'] are not one linear classifier" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["alone"]  # no temporary left
    assert "task a ->" not in stdout  # nothing is reported as written


def test_a_task_failing_to_export_leaves_the_previous_contents(cli, version, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "adapter_config.json").write_text("{}")
    (out / "keep.txt").write_text("precious")
    before = _tree(out)

    code, _, err = pull(cli, version, out, "--overwrite")

    assert code == 2 and "task 'b'" in err, err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_pull_that_succeeds_writes_every_task(cli, version, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = pull(cli, version, out, "--layout", "sharecl")  # the last --layout wins: names as trained
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert all((out / task / "adapter_config.json").is_file() for task in ("a", "b"))
    assert f"task a -> {out / 'a'}" in stdout and f"task b -> {out / 'b'}" in stdout
