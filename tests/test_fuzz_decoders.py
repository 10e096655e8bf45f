"""Fuzzing the two share/ decoders of untrusted files (issue 10): a subspace folder's ``manifest.json`` and a
PEFT adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``).

Arbitrary bytes, arbitrary JSON and random edits of a real file (a key deleted, added or given any JSON
value; a safetensors header rewritten; the file cut or bit-flipped) either load or raise a
``ShareClError``, never another exception, and write nothing (the folder and its parent are unchanged).
Bounded: 200 examples per test, no example database (that would be a write).
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FUZZ, json_strategy
from hypothesis import event, given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from share import KPolicy, LoraAdapter, Subspace, load_peft_adapter, merge
from share.errors import ShareClError
from share.peft_io import CONFIG_FILE, WEIGHTS_FILE
from share.subspace import MANIFEST

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Keys the decoders look for, so random edits often hit a field that matters.
WORDS = [
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save", "peft_type",
    "use_rslora", "bias", "format", "format_version", "policy", "metadata", "modules", "tasks", "head",
    "checksums", "k", "k_A", "k_B", "in_features", "out_features", "t0", "enc.q", "head.weight", "dtype",
    "shape", "data_offsets", "__metadata__", "bases.safetensors", "tasks/t0.safetensors", "query", "(", "",
]  # fmt: skip

json_values = json_strategy(WORDS, max_leaves=10)


def mutate(data: st.DataObject, document: Any) -> Any:
    """``document`` with one to three random edits, mostly deep inside: a value replaced by any JSON, a key
    deleted or added."""
    root = [copy.deepcopy(document)]
    for _ in range(data.draw(st.integers(1, 3))):
        parent: Any = root
        key: Any = 0
        while isinstance(parent[key], dict | list) and parent[key] and data.draw(st.integers(0, 3)) > 0:
            parent = parent[key]
            key = data.draw(st.sampled_from(list(parent) if isinstance(parent, dict) else range(len(parent))))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif action == "add" and isinstance(parent[key], dict):
            parent[key][data.draw(st.sampled_from(WORDS))] = data.draw(json_values)
        else:
            parent[key] = data.draw(json_values)
    return root[0]


def json_bytes(data: st.DataObject, valid: Any) -> bytes:
    """Raw bytes, any JSON document, or an edit of ``valid`` (most often: it reaches the deepest checks)."""
    mode = data.draw(st.sampled_from(["bytes", "json", "edit", "edit", "edit"]))
    if mode == "bytes":
        return data.draw(st.binary(max_size=64))
    return json.dumps(data.draw(json_values) if mode == "json" else mutate(data, valid)).encode()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under the folder's parent with the bytes of each file (None for folders)."""
    root = folder.parent
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def assert_loads_or_refuses(load: Callable[[], Any], folder: Path) -> None:
    before = snapshot(folder)
    try:
        load()
        event("loaded")
    except ShareClError as err:
        event(f"refused: {type(err).__name__}")  # --hypothesis-show-statistics shows how often each happens
    assert snapshot(folder) == before


# -- the subspace manifest -------------------------------------------------------------------------


def small_adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        factors={"enc.q": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))},
        head={"head.weight": torch.randn(3, 5, generator=g)},
    )


@pytest.fixture(scope="module")
def subspace_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A saved two-task subspace folder and its valid manifest."""
    subspace, _ = merge(None, {"t0": small_adapter(0), "t1": small_adapter(1)}, KPolicy(k=3))
    folder = subspace.save(tmp_path_factory.mktemp("fuzz-subspace") / "sub")
    return folder, json.loads((folder / MANIFEST).read_text())


@FUZZ
@given(data=st.data())
def test_fuzzed_manifest_loads_or_raises_a_project_error(
    subspace_case: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    subspace_dir, valid = subspace_case
    (subspace_dir / MANIFEST).write_bytes(json_bytes(data, valid))
    tasks = data.draw(st.none() | st.just(["t0"]) | st.lists(st.sampled_from(WORDS), max_size=2))
    assert_loads_or_refuses(lambda: Subspace.load(subspace_dir, tasks=tasks), subspace_dir)


# -- the PEFT adapter folder -------------------------------------------------------------------------

DIM = 6


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(DIM, DIM)}) for _ in range(2))
        self.head = nn.Linear(DIM, 2)


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], bytes]:
    """A real PEFT LoRA folder (save_pretrained), its valid config and its weights file's bytes."""
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["query"], r=2, lora_alpha=4, init_lora_weights=False, modules_to_save=["head"])
    folder = tmp_path_factory.mktemp("fuzz-peft") / "adapter"
    get_peft_model(Two(), config).save_pretrained(str(folder))
    load_peft_adapter(folder)  # the unedited folder loads
    return folder, json.loads((folder / CONFIG_FILE).read_text()), (folder / WEIGHTS_FILE).read_bytes()


def split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def fuzzed_weights(data: st.DataObject, raw: bytes) -> bytes:
    """The file cut short, bit-flipped, replaced by random bytes, or with an edited header (dtype, shape, offsets)."""
    mode = data.draw(st.sampled_from(["cut", "flip", "bytes", "header", "header", "header"]))
    if mode == "cut":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if mode == "flip":
        flipped = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            flipped[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(flipped)
    if mode == "bytes":
        return data.draw(st.binary(max_size=64))
    header, payload = split_safetensors(raw)
    edited = mutate(data, header)
    if data.draw(st.booleans()):  # a header that states a dtype or shape the bytes may not have
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = {**header[key]}
        entry["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3"]))
        entry["shape"] = data.draw(st.lists(st.integers(0, 8), max_size=3))
        edited = {**(edited if isinstance(edited, dict) else {}), key: entry}
    text = json.dumps(edited).encode()
    return struct.pack("<Q", len(text)) + text + payload


@FUZZ
@given(data=st.data())
def test_fuzzed_adapter_config_loads_or_raises_a_project_error(
    adapter_case: tuple[Path, dict[str, Any], bytes], data: st.DataObject
) -> None:
    adapter_dir, valid, _ = adapter_case
    path = adapter_dir / CONFIG_FILE
    path.write_bytes(json_bytes(data, valid))
    try:
        assert_loads_or_refuses(lambda: load_peft_adapter(adapter_dir), adapter_dir)
    finally:
        path.write_text(json.dumps(valid))


@FUZZ
@given(data=st.data())
def test_fuzzed_adapter_weights_load_or_raise_a_project_error(
    adapter_case: tuple[Path, dict[str, Any], bytes], data: st.DataObject
) -> None:
    adapter_dir, _, raw = adapter_case
    path = adapter_dir / WEIGHTS_FILE
    path.write_bytes(fuzzed_weights(data, raw))
    try:
        assert_loads_or_refuses(lambda: load_peft_adapter(adapter_dir), adapter_dir)
    finally:
        path.write_bytes(raw)
