"""PEFT LoRA interop: read adapter folders into ``LoraAdapter`` and write any task back as one.

A PEFT LoRA folder (``save_pretrained``) holds ``adapter_config.json`` and ``adapter_model.safetensors``.
Tensor keys are ``base_model.model.<module>.lora_A.weight`` (``r x d``) and ``...lora_B.weight``
(``n x r``), where ``<module>`` is the name in the wrapped model's ``named_modules()``, the same name
``ShareModel`` uses. ``modules_to_save`` copies are stored under their plain parameter names,
``base_model.model.<module>.<param>``. This module reads and writes that format with safetensors and
json only (never ``peft``, never pickle); the rules for ``rank_pattern``/``alpha_pattern`` and
``target_modules`` follow PEFT's own (``peft.utils.other.get_pattern_key``,
``peft.tuners.tuners_utils.check_target_module_exists``, ``peft.utils.other._set_trainable``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapter import LoraAdapter
from .errors import ShareClError
from .folders import MalformedFileError, MissingFileError, describe, read_json, recover_folder, write_folder
from .model_card import (
    CARD_FILE,
    HEAD_CONFIG_FILE,
    HEAD_WEIGHTS_FILE,
    IDENTITY_FILE,
    AdapterCard,
    identity_json,
    render_card,
)
from .subspace import Subspace
from .targets import is_target

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {".lora_A.weight": 1, ".lora_B.weight": 0}  # suffix -> index in (B, A)

# LoraConfig fields that switch on a LoRA variant whose update is not ``s * B @ A`` on the base weight.
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales the weight by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) applies only after invocation tokens",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
    "velora_config": "VeLoRA (velora_config) changes the forward pass",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples the factors",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "kasa_config": "KaSA (kasa_config) adds a singular-value term",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "target_parameters": "target_parameters adapts raw parameters rather than nn.Linear modules",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
}
# init_lora_weights values after which the adapter only works with a modified base weight (or is a variant).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


# -- import --------------------------------------------------------------------------------------


def load_peft_adapter(folder: str | os.PathLike[str]) -> LoraAdapter:
    """Read a PEFT LoRA folder into a ``LoraAdapter`` (float32 factors, PEFT's scaling per module).

    Module names and head keys are relative to the wrapped model (PEFT's ``base_model.model.``
    stripped), e.g. ``encoder.layer.0.attention.self.query`` and ``head.weight``. Raises
    ``MissingFileError`` or ``ShareClError`` naming the folder, the module and the fix for anything
    that is not a plain LoRA on ``nn.Linear`` layers.
    """
    path = Path(folder)
    recover_folder(path)  # an export killed mid-swap (where the swap takes two renames) left it as a backup
    config = _read_config(path)
    _refuse_unsupported(path, config)  # first: another PEFT method's config lacks LoRA's keys
    _check_config(path / CONFIG_FILE, config)
    tensors = _read_weights(path)
    factors, head = _split_tensors(path, config, tensors)
    scaling = {}
    for module, (B, A) in factors.items():
        r, alpha = _module_rank_alpha(config, module)
        _check_rank(path, module, B, A, r)
        scaling[module] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapter = LoraAdapter(
        factors=factors,
        scaling=scaling,
        head=head,
        metadata={
            "imported_from": "peft",
            "adapter_dir": path.name,
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "task_type": config.get("task_type"),
        },
    )
    adapter.validate(str(path))  # NaN/Inf in factors, scalings or heads, named by folder and module
    return adapter


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise MissingFileError(f"adapter folder {path} does not exist; pass a folder written by save_pretrained()")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}"))
        hint = (
            f"; it has adapters in sub-folders {nested} (PEFT saves non-default adapters there): pass one of those"
            if nested
            else "; pass a folder written by PeftModel.save_pretrained()"
        )
        raise MissingFileError(f"adapter folder {path} has no {CONFIG_FILE}{hint}")
    config = read_json(config_path, _CONFIG_FIX)
    if not isinstance(config, dict):
        raise MalformedFileError(
            f"{config_path}: the top level must be a JSON object, got {type(config).__name__}; {_CONFIG_FIX}"
        )
    return config


_CONFIG_FIX = "correct it or re-save the adapter with save_pretrained()"


def _check_config(config_path: Path, config: dict[str, Any]) -> None:
    """Refuse, naming the file and the key, every field this importer uses that is not of PEFT's type.

    Nothing is coerced: a float rank, a string ``modules_to_save`` or ``use_rslora`` are errors, since
    PEFT writes none of them and a guess could import a different adapter than the one trained.
    """

    def fail(key: str, problem: str) -> NoReturn:
        raise MalformedFileError(f"{config_path}: key {key!r} {problem}; {_CONFIG_FIX}")

    def rank(value: Any) -> bool:
        return type(value) is int and value >= 1

    def alpha(value: Any) -> bool:
        return type(value) in (int, float) and _finite(value) and value > 0

    if not rank(config.get("r")):
        fail("r", f"is {describe(config.get('r'))}; the LoRA rank must be an integer >= 1")
    if not alpha(config.get("lora_alpha")):
        fail("lora_alpha", f"is {describe(config.get('lora_alpha'))}; it must be a finite number > 0")
    for key, valid, wanted in (
        ("rank_pattern", rank, "an integer >= 1"),
        ("alpha_pattern", alpha, "a finite number > 0"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            fail(key, f"is {describe(patterns)}; it must be an object mapping module patterns to values")
        for pattern, value in patterns.items():
            try:
                _pattern(pattern)
            except re.error as err:
                fail(key, f"has entry {pattern!r}, which is not a valid regular expression ({err})")
            if not valid(value):
                fail(key, f"gives {describe(value)} for {pattern!r}; each value must be {wanted}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            fail("target_modules", f"is {targets!r}, which is not a valid regular expression ({err})")
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        fail("target_modules", f"is {describe(targets)}; it must be a regular expression or a list of module names")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        hint = f" (write {json.dumps([saved])} for that one module)" if isinstance(saved, str) else ""
        fail("modules_to_save", f"is {describe(saved)}; it must be a list of module names{hint}")
    if config.get("use_rslora") is not None and not isinstance(config.get("use_rslora"), bool):
        fail("use_rslora", f"is {describe(config.get('use_rslora'))}; it must be true or false")
    for key in ("base_model_name_or_path", "task_type"):
        if config.get(key) is not None and not isinstance(config.get(key), str):
            fail(key, f"is {describe(config.get(key))}; it must be a string")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _refuse_unsupported(path: Path, config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise MalformedFileError(
            f"{path / CONFIG_FILE}: key 'peft_type' is {describe(peft_type)}, not 'LORA'; Share imports LoRA "
            "adapters only"
        )
    for key, why in _VARIANT_FIELDS.items():
        if config.get(key):
            raise ShareClError(
                f"adapter {path}: {why}, which a shared low-rank subspace cannot hold; "
                f"retrain as plain LoRA ({key} unset) to import it"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ShareClError(
            f"adapter {path}: init_lora_weights={init!r} changes the base weights, so its factors alone do not "
            "describe the update; re-save it as plain LoRA (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and import that"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ShareClError(
            f"adapter {path}: it trains biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}), "
            "which Share does not store; retrain with bias='none' and lora_bias=False"
        )
    if config.get("fan_in_fan_out"):
        raise ShareClError(
            f"adapter {path}: fan_in_fan_out=True means Conv1D (GPT-2 style) layers; Share attaches to "
            "nn.Linear modules only"
        )


def _read_weights(path: Path) -> dict[str, Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise ShareClError(
                f"adapter {path} stores its weights as {PICKLE_FILE} (pickle), which Share never unpickles; "
                "load it in PEFT and re-save with save_pretrained(..., safe_serialization=True)"
            )
        raise MissingFileError(
            f"adapter folder {path} has no {WEIGHTS_FILE}; the adapter was not saved completely, save it again"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ShareClError(f"{weights} cannot be read ({err}); the file is damaged, save the adapter again") from err


def _split_tensors(
    path: Path, config: dict[str, Any], tensors: dict[str, Tensor]
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """Sort the file's tensors into LoRA factor pairs per module and head tensors; refuse the rest."""
    modules_to_save = list(config.get("modules_to_save") or [])
    halves: dict[str, list[Tensor | None]] = {}
    head: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise ShareClError(
                f"adapter {path}: tensor {key!r} lacks PEFT's {KEY_PREFIX!r} prefix; "
                "this is not a LoRA file written by save_pretrained()"
            )
        name = key[len(KEY_PREFIX) :]
        if ".lora_embedding_" in f".{name}" or ".lora_magnitude_vector" in f".{name}":
            kind = "an embedding LoRA" if "lora_embedding_" in name else "a DoRA magnitude"
            raise ShareClError(
                f"adapter {path}, module {name.split('.lora_')[0]!r}: {kind} ({key}); Share adapts nn.Linear "
                "modules with plain LoRA only; retrain with target_modules naming linear layers"
            )
        suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            if not module or any(not part for part in module.split(".")):
                raise ShareClError(
                    f"adapter {path}: tensor {key!r} names no module (an empty name or part); the file is damaged, "
                    "save the adapter again"
                )
            if value.ndim != 2:
                raise ShareClError(
                    f"adapter {path}, module {module!r}: {suffix[1:]} has shape {tuple(value.shape)}, not a matrix "
                    "(a convolution LoRA?); Share adapts nn.Linear modules only, retrain targeting linear layers"
                )
            halves.setdefault(module, [None, None])[_FACTOR_SUFFIXES[suffix]] = value.to(torch.float32)
        elif _is_saved_module(name, modules_to_save):
            head[name] = value.to(torch.float32)
        else:
            raise ShareClError(
                f"adapter {path}: tensor {key!r} is neither a LoRA factor nor part of modules_to_save "
                f"{modules_to_save}; Share imports plain LoRA (bias='none') plus modules_to_save heads only"
            )
    factors = {}
    for module, (B, A) in halves.items():
        if A is None or B is None:
            missing = "lora_A" if A is None else "lora_B"
            raise ShareClError(
                f"adapter {path}, module {module!r}: {missing}.weight is missing from {WEIGHTS_FILE}; "
                "the file is incomplete, save the adapter again"
            )
        if not _targets(config.get("target_modules"), module):
            raise ShareClError(
                f"adapter {path}, module {module!r}: not selected by target_modules {config.get('target_modules')!r} "
                f"in {CONFIG_FILE}; config and weights come from different runs, save the adapter again"
            )
        factors[module] = (B, A)
    if not factors:
        raise ShareClError(f"adapter {path}: {WEIGHTS_FILE} holds no lora_A/lora_B weights; check its target_modules")
    return factors, head


def _check_rank(path: Path, module: str, B: Tensor, A: Tensor, r: int) -> None:
    if A.shape[1] == 0 or B.shape[0] == 0:
        raise ShareClError(
            f"adapter {path}, module {module!r}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}, a layer "
            "without inputs or outputs; the file is damaged, save the adapter again"
        )
    if B.shape[1] != A.shape[0]:
        raise ShareClError(
            f"adapter {path}, module {module!r}: rank mismatch, lora_A is {tuple(A.shape)} (r x in) but lora_B is "
            f"{tuple(B.shape)} (out x r); the file is inconsistent, save the adapter again"
        )
    if A.shape[0] != r:
        raise ShareClError(
            f"adapter {path}, module {module!r}: {CONFIG_FILE} gives rank {r} (r / rank_pattern) but the weights "
            f"have rank {A.shape[0]}; config and weights come from different runs, save the adapter again"
        )


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of ``rank_pattern``/``alpha_pattern`` for ``module``, as PEFT looks it up.

    PEFT (``get_pattern_key``) takes the first key, in the config's order, that matches
    ``(.*\\.)?(<key>)$`` from the start of the module name (the key is a regular expression), and
    otherwise falls back to an entry keyed by the exact module name, else the default.
    """
    for key in patterns:
        try:
            selects = _pattern(key).match(module) is not None
        except re.error as err:
            raise ShareClError(f"pattern {key!r} is not a valid regular expression ({err})") from None
        if selects:
            return patterns[key]
    return patterns.get(module, default)


def _pattern(key: str) -> re.Pattern[str]:
    """PEFT's regular expression for a ``rank_pattern``/``alpha_pattern`` key (``get_pattern_key``)."""
    return re.compile(rf"(.*\.)?({key})$")


def _module_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return int(r), float(alpha)


def _targets(target_modules: str | list[str] | None, module: str) -> bool:
    """Whether the config's ``target_modules`` selects ``module`` (``None``/``"all-linear"``: any module)."""
    if target_modules is None or target_modules == "all-linear":
        return True  # which layers these select depends on the model; the weights file is authoritative
    return is_target(target_modules, module)


def _is_saved_module(name: str, modules_to_save: Iterable[str]) -> bool:
    """Whether parameter ``name`` lies in a module that PEFT's ``modules_to_save`` (suffix rule) selects."""
    parts = name.split(".")
    owners = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(owner.endswith(entry) for owner in owners for entry in modules_to_save)


# -- export --------------------------------------------------------------------------------------


class ExportLayout(Enum):
    """Which model an exported adapter's module names are for.

    ``SHARECL``: the names of the model the task was trained on, heads as ``modules_to_save`` (what
    ``load_peft_adapter`` reads back). ``ENCODER_CLASSIFIER``: share-cl's ``TextClassifier``
    (``encoder`` + mean pooling + ``head``) as the standard ``AutoModel`` names it (``encoder.``
    removed), the head written beside the adapter. ``CAUSAL_LM``: an ``AutoModelForCausalLM``, names
    unchanged, no head.
    """

    SHARECL = "sharecl"
    ENCODER_CLASSIFIER = "encoder-classifier"
    CAUSAL_LM = "causal-lm"

    @property
    def auto_class(self) -> str | None:
        """The ``transformers`` class the adapter loads on (None: the model it was trained on)."""
        return {"encoder-classifier": "AutoModel", "causal-lm": "AutoModelForCausalLM"}.get(self.value)

    @property
    def module_prefix(self) -> str:
        """What share-cl's module names have in front of the standard class's names."""
        return "encoder." if self is ExportLayout.ENCODER_CLASSIFIER else ""

    @property
    def peft_task_type(self) -> str | None:
        return {"encoder-classifier": "FEATURE_EXTRACTION", "causal-lm": "CAUSAL_LM"}.get(self.value)

    @property
    def has_head_beside(self) -> bool:
        """Whether the task's head goes to ``head.safetensors`` (the standard class has no such module)."""
        return self is ExportLayout.ENCODER_CLASSIFIER

    def standard_name(self, module: str) -> str:
        """``module`` as the standard class names it; raises if it does not start with the layout's prefix."""
        prefix = self.module_prefix
        if not module.startswith(prefix) or module == prefix:
            raise ShareClError(
                f"module {module!r} does not start with {prefix!r}, so it is not a module of share-cl's "
                f"{self.value} model; export it with layout {ExportLayout.SHARECL.value!r} (names as trained)"
            )
        return module[len(prefix) :]


ENCODER_HEAD = "head"  # TextClassifier's head module (workers.models.HEAD_MODULE), mean-pooled last hidden state


def export_peft(
    subspace: Subspace,
    task: str,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    *,
    layout: ExportLayout = ExportLayout.SHARECL,
    card: AdapterCard | None = None,
) -> Path:
    """Write ``task`` as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads, with a README.md
    model card and ``sharecl.json`` (identity: namespace, task, subspace version; see ``share.model_card``).

    Factors come from ``Subspace.factors`` with scaling 1, so each module gets ``r = lora_alpha = p``
    (``rank_pattern``/``alpha_pattern`` by exact module name where ``p`` differs); ``target_modules``
    lists the exact module names, as ``layout`` names them. With ``ExportLayout.SHARECL`` the task's
    head tensors become ``modules_to_save``; with ``ENCODER_CLASSIFIER`` the head goes to
    ``head.safetensors`` + ``head_config.json`` (with ``id2label``) beside the adapter. A standard
    layout needs the base model (``base_model_name_or_path``, else ``card.base_model``, else what the
    task's source adapter recorded). Written to a temporary sibling, then renamed; a non-empty
    ``out_dir`` is replaced only with ``overwrite=True``.
    """
    coefficients = subspace.task(task)
    base = base_model_name_or_path or (card.base_model if card else None) or _recorded_base(coefficients.metadata)
    if layout is not ExportLayout.SHARECL and not base:
        raise ShareClError(
            f"task {task!r}: no base model is recorded for it; pass the base model's path or hub name "
            f"(--base-model) so that {CONFIG_FILE} names what {layout.auto_class}.from_pretrained loads"
        )
    card = replace(card or AdapterCard(task=task), task=task, base_model=base)
    names = {module: layout.standard_name(module) for module in subspace.modules}
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module, name in names.items():
        B, A = subspace.factors(task, module)
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.to(torch.float32).contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = B.to(torch.float32).contiguous()
        ranks[name] = A.shape[0]
    head_files: dict[str, Any] = {}
    saved_head: list[str] = []
    if layout.has_head_beside:
        head_files = _head_beside(task, coefficients.head, card)
    elif coefficients.head and layout is not ExportLayout.SHARECL:
        raise ShareClError(
            f"task {task!r} has head tensors {sorted(coefficients.head)}, which {layout.auto_class} has no module "
            f"for; export it with layout {ExportLayout.SHARECL.value!r}"
        )
    else:
        for key, value in coefficients.head.items():
            tensors[f"{KEY_PREFIX}{key}"] = value.to(torch.float32).contiguous()
        saved_head = list(coefficients.head)
    task_type = layout.peft_task_type or coefficients.metadata.get("task_type")
    config = _export_config(ranks, saved_head, task_type, base)
    target = Path(out_dir)
    files = [WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, IDENTITY_FILE, *head_files]
    readme = render_card(card, layout, str(target.absolute()), head_beside=bool(head_files))
    identity = identity_json(card, layout, files)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", **card.header()})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if head_files:
            save_file(head_files[HEAD_WEIGHTS_FILE], str(folder / HEAD_WEIGHTS_FILE), metadata=card.header())
            (folder / HEAD_CONFIG_FILE).write_text(json.dumps(head_files[HEAD_CONFIG_FILE], indent=2))
        (folder / CARD_FILE).write_text(readme)
        (folder / IDENTITY_FILE).write_text(identity)

    return write_folder(target, write, overwrite)


def _recorded_base(metadata: dict[str, Any]) -> str | None:
    """The base model a task's source PEFT adapter recorded (``load_peft_adapter``'s metadata), if a string."""
    value = metadata.get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def _head_beside(task: str, head: dict[str, Tensor], card: AdapterCard) -> dict[str, Any]:
    """``head.safetensors`` tensors and ``head_config.json`` of a mean-pooled linear classifier."""
    if not head:
        return {}  # e.g. an adapter trained on AutoModel itself: the body alone
    weight, bias = head.get(f"{ENCODER_HEAD}.weight"), head.get(f"{ENCODER_HEAD}.bias")
    if weight is None or bias is None or set(head) != {f"{ENCODER_HEAD}.weight", f"{ENCODER_HEAD}.bias"}:
        raise ShareClError(
            f"task {task!r}: head tensors {sorted(head)} are not one linear classifier "
            f"'{ENCODER_HEAD}.weight' + '{ENCODER_HEAD}.bias' (share-cl's TextClassifier); export it with layout "
            f"{ExportLayout.SHARECL.value!r}"
        )
    labels = card.label_names
    if labels is not None and len(labels) != weight.shape[0]:
        raise ShareClError(
            f"task {task!r}: {len(labels)} label names {list(labels)} for a head of {weight.shape[0]} outputs; "
            "the recorded label names belong to another head"
        )
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(weight.shape[0])]
    config = {
        "module": ENCODER_HEAD,
        "input": "last_hidden_state",
        "pooling": "mean over tokens where attention_mask is 1",
        "in_features": int(weight.shape[1]),
        "out_features": int(weight.shape[0]),
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }
    tensors = {"weight": weight.to(torch.float32).contiguous(), "bias": bias.to(torch.float32).contiguous()}
    return {HEAD_WEIGHTS_FILE: tensors, HEAD_CONFIG_FILE: config}


def _export_config(
    ranks: dict[str, int], head_keys: list[str], task_type: str | None, base_model_name_or_path: str | None
) -> dict[str, Any]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: p for module, p in ranks.items() if p != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,  # scaling alpha / r = 1: Subspace.factors already carries the scale
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(ranks),
        "modules_to_save": _saved_modules(head_keys) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    # Exact names used as patterns must select exactly their own module under PEFT's rules.
    for module, p in ranks.items():
        if pattern_value(pattern, module, r) != p:
            raise ShareClError(
                f"module {module!r}: its rank_pattern entry is shadowed by another module's name under PEFT's "
                "pattern rules; this model's module names cannot be exported with per-module ranks"
            )
    return config


def _saved_modules(head_keys: list[str]) -> list[str]:
    """The outermost modules owning the head parameters (``head.weight`` -> ``head``)."""
    owners = set()
    for key in head_keys:
        owner, _, _ = key.rpartition(".")
        if not owner:
            raise ShareClError(
                f"head tensor {key!r} is a parameter of the model's root, which PEFT's modules_to_save cannot hold"
            )
        owners.add(owner)
    return sorted(o for o in owners if not any(o.startswith(f"{other}.") for other in owners))


# -- module names of another model of the same base ----------------------------------------------


class ModuleMismatchError(ShareClError):
    """An adapter's module names are not a subspace's, and no single prefix change makes them so."""


@dataclass(frozen=True)
class ModulePrefix:
    """Rename modules starting with ``old`` to start with ``new`` (``"" -> "encoder."`` adds a prefix)."""

    old: str
    new: str

    @classmethod
    def parse(cls, text: str) -> ModulePrefix:
        """``FROM=TO`` (either side may be empty, e.g. ``=encoder.`` adds ``encoder.`` in front)."""
        old, sep, new = text.partition("=")
        if not sep or old == new:
            raise ShareClError(
                f"module prefix {text!r}: write FROM=TO with two different prefixes, e.g. '=encoder.' to add "
                "'encoder.' in front of every module name, or 'model.=' to remove 'model.'"
            )
        return cls(old, new)

    def apply(self, name: str) -> str:
        return self.new + name[len(self.old) :]

    def __str__(self) -> str:
        return f"{self.old}={self.new}"


def find_module_prefix(names: Iterable[str], known: Iterable[str]) -> ModulePrefix | None:
    """The one prefix change that makes every name in ``names`` one of ``known``; None if none is needed.

    None also when some names already are known ones (same naming: whatever differs is a different set
    of layers, not a prefix). Raises ``ModuleMismatchError`` listing both name sets when no prefix
    change fits, or the candidates when several do (pass one with ``ModulePrefix.parse``).
    """
    names, known = sorted(set(names)), set(known)
    if not names or set(names) & known:
        return None
    candidates: dict[tuple[tuple[str, str], ...], ModulePrefix] = {}
    first = names[0]
    cuts = [0] + [i + 1 for i, char in enumerate(first) if char == "."]
    for target in known:
        for cut in cuts:
            rest = first[cut:]
            if not target.endswith(rest) or (len(target) > len(rest) and target[-len(rest) - 1] != "."):
                continue
            prefix = _shortest(ModulePrefix(first[:cut], target[: len(target) - len(rest)]))
            if all(n.startswith(prefix.old) and prefix.apply(n) in known for n in names):
                mapping = tuple((n, prefix.apply(n)) for n in names)
                best = candidates.get(mapping)
                if best is None or len(str(prefix)) < len(str(best)):
                    candidates[mapping] = prefix
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise ModuleMismatchError(
            f"no module name of the adapter is a module of the subspace, and no single prefix change makes them "
            f"so: adapter modules {_sample(names)}; subspace modules {_sample(sorted(known))}. It must adapt the "
            "same layers of the same base model; if the names differ by more than one prefix, rename them"
        )
    options = sorted(str(p) for p in candidates.values())
    raise ModuleMismatchError(
        f"several prefix changes make the adapter's modules {_sample(names)} modules of the subspace: {options}; "
        "choose one with --module-prefix FROM=TO"
    )


def _shortest(prefix: ModulePrefix) -> ModulePrefix:
    """The same renaming without the dotted parts both prefixes end with (``encoder.`` -> ``encoder.encoder.``
    is ``""`` -> ``encoder.``). Prefixes end with a dot or are empty."""
    old, new = prefix.old.split(".")[:-1], prefix.new.split(".")[:-1]
    while old and new and old[-1] == new[-1]:
        old, new = old[:-1], new[:-1]
    return ModulePrefix("".join(f"{part}." for part in old), "".join(f"{part}." for part in new))


def _sample(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else f" ({len(names)})"
    return f"[{shown}{more}]"


def rename_modules(adapter: LoraAdapter, prefix: ModulePrefix, source: str) -> LoraAdapter:
    """``adapter`` with every module renamed by ``prefix`` (head tensors keep their names); raises naming
    the modules that do not start with ``prefix.old``."""
    outside = sorted(m for m in adapter.factors if not m.startswith(prefix.old))
    if outside:
        raise ModuleMismatchError(
            f"adapter {source}: module prefix {str(prefix)!r} does not apply to modules {_sample(outside)}, which do "
            f"not start with {prefix.old!r}; adapter modules are {_sample(sorted(adapter.factors))}"
        )
    renamed = {prefix.apply(m): pair for m, pair in adapter.factors.items()}
    scaling = {prefix.apply(m): s for m, s in adapter.scaling.items()}
    metadata = {**adapter.metadata, "module_prefix": {"from": prefix.old, "to": prefix.new}}
    return LoraAdapter(factors=renamed, scaling=scaling, head=dict(adapter.head), metadata=metadata)


def match_subspace_modules(
    adapter: LoraAdapter, modules: Iterable[str], source: str, prefix: ModulePrefix | None = None
) -> tuple[LoraAdapter, ModulePrefix | None]:
    """``adapter`` with its modules named as the subspace's ``modules`` (by ``prefix``, else the one prefix change
    that fits, else unchanged), and the prefix change used. Raises ``ModuleMismatchError`` naming both name sets
    when the renamed modules are not exactly ``modules``."""
    known = set(modules)
    if prefix is None:
        prefix = find_module_prefix(adapter.factors, known)
    if prefix is not None:
        adapter = rename_modules(adapter, prefix, source)
    if set(adapter.factors) != known:
        unknown = sorted(set(adapter.factors) - known)
        missing = sorted(known - set(adapter.factors))
        via = f" after the prefix change {str(prefix)!r}" if prefix is not None else ""
        raise ModuleMismatchError(
            f"adapter {source}: its modules differ from the subspace's{via} (unknown: {_sample(unknown)}, missing: "
            f"{_sample(missing)}); it must adapt the same layers of the same base model (same target_modules)"
        )
    return adapter, prefix
