"""share.peft_io against real peft: what PEFT saves is what we read, what we write is what PEFT loads.

A tiny torch model keeps these fast; tests/test_cli_offline.py runs the same paths on all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from share import KPolicy, LoraAdapter, ShareModel, match_modules, merge
from share.errors import ShareClError
from share.folders import FolderExistsError, MissingFileError
from share.model_card import AdapterCard
from share.peft_io import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    ExportLayout,
    ModuleMismatchError,
    ModulePrefix,
    export_peft,
    find_module_prefix,
    load_peft_adapter,
    match_subspace_modules,
    pattern_value,
)

DIM = 16


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.query(x) + self.key(x) + self.value(x))


class Tiny(nn.Module):
    """Twelve blocks so that names like ``blocks.1.query`` and ``blocks.11.query`` both exist."""

    def __init__(self, dim: int = DIM, labels: int = 3, layers: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny(seed: int = 0, **kwargs) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kwargs).eval()


def save_peft(folder: Path, seed: int = 1, model: nn.Module | None = None, **config) -> PeftModel:
    """A real PEFT LoRA adapter with nonzero B (init_lora_weights=False), saved with save_pretrained."""
    config = {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model if model is not None else tiny(), LoraConfig(**config))
    # modules_to_save starts as a copy of the base head; make it differ so the test sees it was read.
    for name, param in peft_model.named_parameters():
        if "modules_to_save" in name:
            param.data.normal_()
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    return peft_model


def peft_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(KEY_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


PATTERNS = {
    "rank_pattern": {"blocks.1.query": 2, "value": 6, r"blocks\.1[01]\.query": 3},
    "alpha_pattern": {"value": 3, "blocks.0.query": 5},
}


@pytest.mark.parametrize("extra", [PATTERNS, {"use_rslora": True, "r": 8, "lora_alpha": 4}], ids=["patterns", "rslora"])
def test_ranks_scalings_and_updates_match_peft(tmp_path: Path, extra: dict) -> None:
    peft_model = save_peft(tmp_path / "a", modules_to_save=["head"], **extra)
    adapter = load_peft_adapter(tmp_path / "a")
    layers = peft_layers(peft_model)
    assert set(adapter.factors) == set(layers) and len(layers) == 24
    for name, layer in layers.items():
        B, A = adapter.factors[name]
        assert A.shape[0] == B.shape[1] == layer.r["default"], name
        assert adapter.scale(name) == pytest.approx(layer.scaling["default"], rel=1e-12), name
        expected = layer.get_delta_weight("default")
        torch.testing.assert_close(adapter.delta_weight(name), expected, rtol=1e-6, atol=1e-7)
    if extra is PATTERNS:  # the patterns really produced several ranks and scalings
        assert {a.shape[0] for _, a in adapter.factors.values()} == {2, 3, 4, 6}
    head = peft_model.base_model.model.head.modules_to_save["default"]
    assert set(adapter.head) == {"head.weight", "head.bias"}
    torch.testing.assert_close(adapter.head["head.weight"], head.weight.detach())
    assert adapter.metadata["task_type"] is None and "base_model_name_or_path" in adapter.metadata


def test_pattern_lookup_follows_peft_order_and_regex() -> None:
    patterns = {"value": 1, r"blocks\.1\..*": 2, "blocks.1.query": 3}
    assert pattern_value(patterns, "blocks.1.value", 9) == 1  # first matching key wins
    assert pattern_value(patterns, "blocks.1.query", 9) == 2
    assert pattern_value(patterns, "blocks.11.query", 9) == 9  # keys match whole dotted suffixes only
    assert pattern_value({"1.query": 4}, "blocks.11.query", 9) == 9
    assert pattern_value({"1.query": 4}, "blocks.1.query", 9) == 4


def test_share_model_serves_an_imported_adapter_like_peft(tmp_path: Path) -> None:
    """Module and head names from load_peft_adapter are the ones ShareModel attaches to."""
    peft_model = save_peft(tmp_path / "a", modules_to_save=["head"], **PATTERNS)
    subspace, report = merge(None, {"a": load_peft_adapter(tmp_path / "a")}, KPolicy(k=DIM))
    assert report.worst_error < 1e-5
    model = ShareModel(tiny(), target_modules=["query", "value"], heads=["head"])
    model.load_subspace(subspace)
    x = torch.randn(4, DIM)
    with torch.no_grad():
        expected = peft_model(x)
        got = model(x, tasks="a")
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_export_loads_in_peft_and_round_trips(tmp_path: Path) -> None:
    peft_model = save_peft(tmp_path / "a", modules_to_save=["head"], **PATTERNS)
    subspace, _ = merge(None, {"a": load_peft_adapter(tmp_path / "a")}, KPolicy(k=DIM))
    out = export_peft(subspace, "a", tmp_path / "out", base_model_name_or_path="tiny-model")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny-model"
    assert config["modules_to_save"] == ["head"]
    assert sorted(config["target_modules"]) == sorted(subspace.modules)
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]

    loaded = PeftModel.from_pretrained(tiny(seed=0), str(out)).eval()
    for name, layer in peft_layers(loaded).items():
        assert layer.scaling["default"] == 1.0
        torch.testing.assert_close(layer.get_delta_weight("default"), subspace.delta_weight("a", name))
    x = torch.randn(4, DIM)
    with torch.no_grad():
        expected, got = peft_model(x), loaded(x)
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5

    again = load_peft_adapter(out)  # our own export reads back with the same ranks and updates
    for name in subspace.modules:
        torch.testing.assert_close(again.delta_weight(name), subspace.delta_weight("a", name))
    assert again.metadata["base_model_name_or_path"] == "tiny-model"


def test_export_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    save_peft(tmp_path / "a", modules_to_save=["head"])
    subspace, _ = merge(None, {"a": load_peft_adapter(tmp_path / "a")})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft(subspace, "a", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_peft(subspace, "a", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md", "sharecl.json"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    with pytest.raises(KeyError, match="unknown task"):
        export_peft(subspace, "nope", tmp_path / "other")


TARGETS = [["query"], ["1.query"], ["blocks.1.value", "key"], r"blocks\.1\d?\.(query|value)", r".*query"]


@pytest.mark.parametrize("target", TARGETS, ids=["suffix", "dotted-suffix", "name-and-suffix", "regex", "regex-all"])
def test_attach_and_import_select_the_modules_peft_wraps(tmp_path: Path, target) -> None:
    """``ShareModel`` attaches to, and the importer accepts, exactly the modules PEFT itself wraps."""
    wrapped = set(peft_layers(save_peft(tmp_path / "a", target_modules=target)))
    assert set(match_modules(tiny(), target)) == wrapped
    assert set(load_peft_adapter(tmp_path / "a").factors) == wrapped
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    config["target_modules"] = ["blocks.0.query"]  # the weights now hold modules the config does not select
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ShareClError, match="not selected by target_modules"):
        load_peft_adapter(tmp_path / "a")


def test_file_errors_are_project_errors(tmp_path: Path) -> None:
    """Missing folders and occupied outputs raise ShareClError (the CLI's one error) and the OS error type."""
    with pytest.raises(MissingFileError, match="does not exist") as missing:
        load_peft_adapter(tmp_path / "nope")
    assert isinstance(missing.value, ShareClError) and isinstance(missing.value, FileNotFoundError)
    save_peft(tmp_path / "a")
    subspace, _ = merge(None, {"a": load_peft_adapter(tmp_path / "a")})
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderExistsError, match="not a folder") as occupied:
        export_peft(subspace, "a", tmp_path / "file", overwrite=True)
    assert isinstance(occupied.value, ShareClError) and isinstance(occupied.value, FileExistsError)
    assert (tmp_path / "file").read_text() == "x"


# -- refusals ------------------------------------------------------------------------------------


def _tamper(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_refuses_non_finite_factors_and_heads(tmp_path: Path) -> None:
    save_peft(tmp_path / "a", modules_to_save=["head"])
    _tamper(tmp_path / "a", lambda t: t[_first(t, "lora_B.weight")].__setitem__((0, 0), float("nan")))
    with pytest.raises(ValueError, match=r"module 'blocks\.\d+\.(query|value)': lora_B holds NaN or Inf"):
        load_peft_adapter(tmp_path / "a")
    save_peft(tmp_path / "b", modules_to_save=["head"])
    _tamper(tmp_path / "b", lambda t: t[KEY_PREFIX + "head.weight"].__setitem__((0, 0), float("inf")))
    with pytest.raises(ValueError, match="head tensor 'head.weight' holds NaN or Inf"):
        load_peft_adapter(tmp_path / "b")


def test_refuses_rank_mismatch_and_shapes_that_contradict_the_config(tmp_path: Path) -> None:
    save_peft(tmp_path / "a")
    _tamper(tmp_path / "a", lambda t: t.__setitem__(_first(t, "lora_B.weight"), torch.ones(DIM, 3)))
    with pytest.raises(ValueError, match=r"adapter .*a, module 'blocks\.0\.query': rank mismatch"):
        load_peft_adapter(tmp_path / "a")

    save_peft(tmp_path / "b")
    config = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    (tmp_path / "b" / CONFIG_FILE).write_text(json.dumps({**config, "r": 5}))
    with pytest.raises(ValueError, match="gives rank 5 .* weights have rank 4"):
        load_peft_adapter(tmp_path / "b")

    save_peft(tmp_path / "c")
    _tamper(tmp_path / "c", lambda t: t.pop(_first(t, "lora_A.weight")))
    with pytest.raises(ValueError, match=r"module 'blocks\.0\.query': lora_A\.weight is missing"):
        load_peft_adapter(tmp_path / "c")


def test_refuses_missing_files_and_pickles(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path / "empty")

    save_peft(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_peft_adapter(tmp_path / "a")

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny(), LoraConfig(target_modules=["query"], r=2))
    peft_model.save_pretrained(str(tmp_path / "b"), safe_serialization=False)
    with pytest.raises(ValueError, match="pickle.*safe_serialization=True"):
        load_peft_adapter(tmp_path / "b")

    peft_model.save_pretrained(str(tmp_path / "c"), selected_adapters=["default"])
    peft_model.add_adapter("second", LoraConfig(target_modules=["query"], r=2))
    peft_model.save_pretrained(str(tmp_path / "c"), selected_adapters=["second"])
    (tmp_path / "c" / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"sub-folders \['second'\]"):
        load_peft_adapter(tmp_path / "c")


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, DIM)
        self.query = nn.Linear(DIM, DIM)


class WithConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.query = nn.Linear(DIM, DIM)


@pytest.mark.parametrize(
    ("model", "config", "words"),
    [
        (None, {"use_dora": True}, "DoRA"),
        (None, {"bias": "all"}, "bias='none'"),
        (None, {"lora_bias": True}, "lora_bias=False"),
        (WithEmbedding, {"target_modules": ["embed", "query"]}, "module 'embed': an embedding LoRA"),
        (WithConv, {"target_modules": ["conv", "query"]}, "module 'conv': lora_A.weight has shape"),
    ],
    ids=["dora", "bias", "lora_bias", "embedding", "conv"],
)
@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT's own note on lora_B.bias when saving lora_bias
def test_refuses_what_a_subspace_cannot_hold(tmp_path: Path, model, config: dict, words: str) -> None:
    save_peft(tmp_path / "a", model=model() if model else None, **config)
    with pytest.raises(ValueError, match=words) as info:
        load_peft_adapter(tmp_path / "a")
    assert str(tmp_path / "a") in str(info.value)


# -- module prefixes (an adapter of the same base model, trained on another wrapper) ---------------

ENCODER = [f"encoder.layer.{i}.attention.self.{m}" for i in range(12) for m in ("query", "value")]


@pytest.mark.parametrize(
    ("names", "known", "expected"),
    [
        (ENCODER, [f"encoder.{n}" for n in ENCODER], ModulePrefix("", "encoder.")),  # AutoModel -> TextClassifier
        ([f"encoder.{n}" for n in ENCODER], ENCODER, ModulePrefix("encoder.", "")),  # and back
        ([f"model.{n}" for n in ENCODER], [f"base.{n}" for n in ENCODER], ModulePrefix("model.", "base.")),
        (ENCODER, ENCODER, None),  # already the subspace's names
        (ENCODER[:4], ENCODER, None),  # some names match: not a prefix problem (the set check reports it)
    ],
    ids=["add", "strip", "replace", "same", "overlap"],
)
def test_find_module_prefix(names: list[str], known: list[str], expected: ModulePrefix | None) -> None:
    prefix = find_module_prefix(names, known)
    assert prefix == expected
    if prefix is not None:
        assert {prefix.apply(n) for n in names} == set(known)


def test_find_module_prefix_refuses_no_fit_and_several_fits() -> None:
    with pytest.raises(
        ModuleMismatchError,
        match=r"no single prefix change.*adapter modules \[blocks\.0\.query.*"
        r"subspace modules \[encoder\.layer\.0\.attention\.self\.query",
    ):
        find_module_prefix([f"blocks.{i}.query" for i in range(12)], ENCODER)
    with pytest.raises(ModuleMismatchError, match=r"several prefix changes.*\['=a\.', '=b\.'\].*--module-prefix"):
        find_module_prefix(["layer.0.q"], ["a.layer.0.q", "b.layer.0.q"])


def test_match_subspace_modules_renames_factors_and_scalings_only(tmp_path: Path) -> None:
    save_peft(tmp_path / "a", modules_to_save=["head"], **PATTERNS)
    adapter = load_peft_adapter(tmp_path / "a")
    known = [f"model.{m}" for m in adapter.factors]
    renamed, prefix = match_subspace_modules(adapter, known, "a")
    assert prefix == ModulePrefix("", "model.") and set(renamed.factors) == set(known)
    assert renamed.head.keys() == adapter.head.keys() and renamed.metadata["module_prefix"] == {
        "from": "",
        "to": "model.",
    }
    for name in adapter.factors:
        torch.testing.assert_close(renamed.delta_weight(f"model.{name}"), adapter.delta_weight(name))
    with pytest.raises(ModuleMismatchError, match=r"does not apply to modules \[blocks\.0\.query"):
        match_subspace_modules(adapter, known, "a", ModulePrefix("x.", "model."))
    with pytest.raises(
        ModuleMismatchError, match=r"after the prefix change 'blocks\.=model\.blocks\.' .*missing: \[model"
    ):
        match_subspace_modules(adapter, [*known, "model.extra"], "a", ModulePrefix("blocks.", "model.blocks."))
    with pytest.raises(ShareClError, match="FROM=TO"):
        ModulePrefix.parse("encoder.")


def test_export_layouts_rename_modules_and_put_the_head_beside(tmp_path: Path) -> None:
    """ENCODER_CLASSIFIER strips ``encoder.`` and writes the head beside; a module outside the prefix is refused."""
    torch.manual_seed(0)
    factors = {f"encoder.blocks.{i}.query": (torch.randn(DIM, 2), torch.randn(2, DIM)) for i in range(2)}
    head = {"head.weight": torch.randn(3, DIM), "head.bias": torch.randn(3)}
    subspace, _ = merge(None, {"t": LoraAdapter(factors=factors, head=head)}, KPolicy(k=DIM))
    card = AdapterCard(task="t", namespace="ns", version="v7", label_names=("a", "b", "c"))
    out = export_peft(subspace, "t", tmp_path / "out", "base", layout=ExportLayout.ENCODER_CLASSIFIER, card=card)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert sorted(config["target_modules"]) == ["blocks.0.query", "blocks.1.query"]
    assert config["modules_to_save"] is None and config["base_model_name_or_path"] == "base"
    assert set(load_file(str(out / WEIGHTS_FILE))) == {
        f"{KEY_PREFIX}blocks.{i}.query.lora_{s}.weight" for i in range(2) for s in "AB"
    }
    torch.testing.assert_close(load_file(str(out / "head.safetensors"))["weight"], head["head.weight"])
    assert json.loads((out / "head_config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert json.loads((out / "sharecl.json").read_text())["adapter_id"] == "ns/t@v7"

    with pytest.raises(ShareClError, match="2 label names"):
        export_peft(
            subspace,
            "t",
            tmp_path / "x",
            "base",
            layout=ExportLayout.ENCODER_CLASSIFIER,
            card=AdapterCard(task="t", label_names=("a", "b")),
        )
    with pytest.raises(ShareClError, match="no base model is recorded"):
        export_peft(subspace, "t", tmp_path / "x", layout=ExportLayout.CAUSAL_LM)
    with pytest.raises(ShareClError, match="AutoModelForCausalLM has no module"):
        export_peft(subspace, "t", tmp_path / "x", "base", layout=ExportLayout.CAUSAL_LM)
    plain, _ = merge(None, {"t": LoraAdapter(factors={"blocks.0.query": factors["encoder.blocks.0.query"]})})
    with pytest.raises(ShareClError, match="does not start with 'encoder.'"):
        export_peft(plain, "t", tmp_path / "x", "base", layout=ExportLayout.ENCODER_CLASSIFIER)
    assert not (tmp_path / "x").exists()
