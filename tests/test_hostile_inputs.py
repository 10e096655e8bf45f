"""Issue 10, share side: malformed adapter configs and subspace manifests, manifests that would escape the folder.

Every malformed file gives one ``ShareClError`` on one line that names the file and the key at fault
(defect 6); a manifest's task names are checked before a path is built and every payload file must
have a checksum (defect 2). Nothing is coerced: a float rank or a string ``modules_to_save`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from share import KPolicy, LoraAdapter, Subspace, load_peft_adapter, merge
from share.errors import ShareClError
from share.peft_io import CONFIG_FILE
from share.subspace import BASES_FILE, MANIFEST, TASKS_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = 8


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(DIM, DIM)}) for _ in range(2))
        self.head = nn.Linear(DIM, 3)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A real PEFT LoRA folder (save_pretrained) on a two-layer model, with a saved head."""
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["query"], r=2, lora_alpha=4, init_lora_weights=False, modules_to_save=["head"])
    get_peft_model(Two(), config).save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def assert_one_line_naming(err: ShareClError, path: Path, key: str) -> None:
    message = str(err)
    assert str(path) in message, message
    assert key in message, message
    assert "\n" not in message, message


# -- defect 6: adapter configs -------------------------------------------------------------------

# (key named in the error, edit of the parsed config or raw text replacing the file)
BAD_CONFIGS: dict[str, tuple[str, Any]] = {
    "r-infinity": ("'r'", lambda c: c | {"r": float("inf")}),  # json.dumps writes Infinity
    "r-nan": ("'r'", lambda c: c | {"r": float("nan")}),
    "r-float": ("'r'", lambda c: c | {"r": 8.7}),
    "r-float-integral": ("'r'", lambda c: c | {"r": 2.0}),
    "r-string": ("'r'", lambda c: c | {"r": "2"}),
    "r-bool": ("'r'", lambda c: c | {"r": True}),
    "alpha-nan": ("'lora_alpha'", lambda c: c | {"lora_alpha": float("nan")}),
    "alpha-huge-int": ("'lora_alpha'", lambda c: c | {"lora_alpha": 10**400}),
    "rank-pattern-zero": ("rank_pattern", lambda c: c | {"rank_pattern": {"query": 0}}),
    "rank-pattern-float": ("rank_pattern", lambda c: c | {"rank_pattern": {"query": 2.5}}),
    "rank-pattern-list": ("'rank_pattern'", lambda c: c | {"rank_pattern": ["query", 2]}),
    "rank-pattern-regex": ("rank_pattern", lambda c: c | {"rank_pattern": {"(query": 2}}),
    "alpha-pattern-regex": ("alpha_pattern", lambda c: c | {"alpha_pattern": {"[": 2}}),
    "alpha-pattern-zero": ("alpha_pattern", lambda c: c | {"alpha_pattern": {"query": 0}}),
    "target-modules-int": ("'target_modules'", lambda c: c | {"target_modules": 5}),
    "target-modules-regex": ("'target_modules'", lambda c: c | {"target_modules": "blocks.(query"}),
    "target-modules-list-of-int": ("'target_modules'", lambda c: c | {"target_modules": ["query", 5]}),
    "modules-to-save-string": ("'modules_to_save'", lambda c: c | {"modules_to_save": "head"}),
    "modules-to-save-int": ("'modules_to_save'", lambda c: c | {"modules_to_save": [1]}),
    "use-rslora-string": ("'use_rslora'", lambda c: c | {"use_rslora": "yes"}),
    "not-lora": ("'peft_type'", lambda c: {"peft_type": "IA3", "target_modules": ["query"]}),
    "peft-type-list": ("'peft_type'", lambda c: c | {"peft_type": ["LORA"]}),
    "not-an-object": ("top level", "[]"),
    "garbage-bytes": ("JSON", b"\xff\xfe\x00garbage\x80"),
    "truncated": ("JSON", '{"r": 2, "peft_type": "LO'),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_adapter_config_is_one_error_naming_file_and_key(adapter_dir: Path, case: str) -> None:
    key, edit = BAD_CONFIGS[case]
    path = adapter_dir / CONFIG_FILE
    if callable(edit):
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    elif isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(edit)
    with pytest.raises(ShareClError) as info:
        load_peft_adapter(adapter_dir)
    assert_one_line_naming(info.value, path, key)


def test_a_valid_config_still_loads(adapter_dir: Path) -> None:
    """The strict checks accept what PEFT writes, including integral float alphas and a regex target."""
    path = adapter_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    config |= {"lora_alpha": 3.5, "target_modules": r"blocks\.\d\.query", "rank_pattern": {"0.query": 2}}
    path.write_text(json.dumps(config))
    adapter = load_peft_adapter(adapter_dir)
    assert sorted(adapter.factors) == ["blocks.0.query", "blocks.1.query"]
    assert adapter.scale("blocks.0.query") == pytest.approx(3.5 / 2)
    assert set(adapter.head) == {"head.weight", "head.bias"}


# -- defect 6 and 2: subspace manifests ----------------------------------------------------------


def small_adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        factors={"enc.q": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))},
        head={"head.weight": torch.randn(3, 5, generator=g)},
    )


@pytest.fixture
def subspace_dir(tmp_path: Path) -> Path:
    subspace, _ = merge(None, {"t0": small_adapter(0), "t1": small_adapter(1)}, KPolicy(k=3))
    return subspace.save(tmp_path / "sub")


def edit_manifest(folder: Path, edit) -> Path:
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    result = edit(manifest)
    path.write_text(json.dumps(manifest if result is None else result))
    return path


BAD_MANIFESTS: dict[str, tuple[str, Any]] = {
    "list": ("top level", lambda m: []),
    "tasks-list": ("'tasks'", lambda m: m | {"tasks": ["t0", "t1"]}),
    "modules-null": ("'modules'", lambda m: m | {"modules": None}),
    "module-entry-list": ("'modules'", lambda m: m | {"modules": {"enc.q": [6, 5]}}),
    "module-k-string": ("'k_A'", lambda m: m["modules"]["enc.q"].update(k_A="3")),
    "module-shape-lies": ("'in_features'", lambda m: m["modules"]["enc.q"].update(in_features=7)),
    "task-without-head": ("'head'", lambda m: m["tasks"]["t0"].__delitem__("head")),
    "task-head-string": ("'head'", lambda m: m["tasks"]["t0"].update(head="head.weight")),
    "task-head-unknown": ("'head'", lambda m: m["tasks"]["t0"].update(head=["head.nope"])),
    "task-metadata-list": ("'metadata'", lambda m: m["tasks"]["t0"].update(metadata=[1])),
    "task-entry-null": ("'t1'", lambda m: m["tasks"].update(t1=None)),
    "policy-null": ("'policy'", lambda m: m | {"policy": None}),
    "policy-bad-k": ("'policy'", lambda m: m | {"policy": {"k": 2.5}}),
    "metadata-list": ("'metadata'", lambda m: m | {"metadata": []}),
    "checksums-list": ("'checksums'", lambda m: m | {"checksums": []}),
    "checksum-int": ("'checksums'", lambda m: m["checksums"].update({BASES_FILE: 5})),
    "format-version-bool": ("'format_version'", lambda m: m | {"format_version": True}),
    "format-version-float": ("'format_version'", lambda m: m | {"format_version": 1.0}),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifest_is_one_error_naming_file_and_key(subspace_dir: Path, case: str) -> None:
    key, edit = BAD_MANIFESTS[case]
    path = edit_manifest(subspace_dir, edit)
    with pytest.raises(ShareClError) as info:
        Subspace.load(subspace_dir)
    assert_one_line_naming(info.value, path, key)


@pytest.mark.parametrize(
    "content", [b"\x00\xff\xfegarbage", b"", b"{", b"[" * 100_000], ids=["bytes", "empty", "cut", "deep"]
)
def test_manifest_that_is_not_json_names_the_file(subspace_dir: Path, content: bytes) -> None:
    (subspace_dir / MANIFEST).write_bytes(content)
    with pytest.raises(ShareClError) as info:
        Subspace.load(subspace_dir)
    assert_one_line_naming(info.value, subspace_dir / MANIFEST, "JSON")


@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim", "t0\n", "..", ""])
def test_manifest_task_names_are_checked_before_any_path_is_built(subspace_dir: Path, name: str) -> None:
    """A task name from a manifest becomes ``tasks/<name>.safetensors``: a path-like one is refused,
    even when its file and checksum are planted where the path would lead."""
    victim = subspace_dir.parent / "victim.safetensors"
    victim.write_bytes((subspace_dir / TASKS_DIR / "t1.safetensors").read_bytes())

    def plant(m: dict) -> None:
        m["tasks"][name] = m["tasks"].pop("t1")
        m["checksums"][f"{TASKS_DIR}/{name}.safetensors"] = m["checksums"].pop(f"{TASKS_DIR}/t1.safetensors")

    path = edit_manifest(subspace_dir, plant)
    for tasks in (None, [name]):
        with pytest.raises(ShareClError, match="invalid task name") as info:
            Subspace.load(subspace_dir, tasks=tasks)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "drop",
    ["all", BASES_FILE, f"{TASKS_DIR}/t0.safetensors", f"{TASKS_DIR}/t1.safetensors"],
)
def test_manifest_without_checksums_is_refused(subspace_dir: Path, drop: str) -> None:
    """Every payload file needs its checksum: an absent entry is an error naming the file, not a skipped check,
    even for a task that a partial load does not read."""

    def remove(m: dict) -> None:
        if drop == "all":
            del m["checksums"]
        else:
            del m["checksums"][drop]

    path = edit_manifest(subspace_dir, remove)
    named = "'checksums'" if drop == "all" else drop
    for tasks in (None, ["t0"]):
        with pytest.raises(ShareClError) as info:
            Subspace.load(subspace_dir, tasks=tasks)
        assert_one_line_naming(info.value, path, named)


def test_checksum_for_a_file_that_is_no_payload_is_refused(subspace_dir: Path) -> None:
    path = edit_manifest(subspace_dir, lambda m: m["checksums"].update({"../elsewhere": "0" * 64}))
    with pytest.raises(ShareClError) as info:
        Subspace.load(subspace_dir)
    assert_one_line_naming(info.value, path, "'../elsewhere'")


def test_a_well_formed_manifest_still_loads(subspace_dir: Path) -> None:
    loaded = Subspace.load(subspace_dir)
    assert list(loaded.tasks) == ["t0", "t1"] and list(loaded.modules) == ["enc.q"]
    assert list(Subspace.load(subspace_dir, tasks=["t1"]).tasks) == ["t1"]
