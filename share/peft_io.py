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
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapter import LoraAdapter
from .errors import ShareClError
from .folders import MalformedFileError, MissingFileError, describe, read_json, recover_folder, write_folder
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


def export_peft(
    subspace: Subspace,
    task: str,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``task`` as a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Factors come from ``Subspace.factors`` with scaling 1, so each module gets ``r = lora_alpha = p``
    (``rank_pattern``/``alpha_pattern`` by exact module name where ``p`` differs); ``target_modules``
    lists the exact module names; the task's head tensors become ``modules_to_save``. Written to a
    temporary sibling, then renamed; a non-empty ``out_dir`` is replaced only with ``overwrite=True``.
    """
    coefficients = subspace.task(task)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module in subspace.modules:
        B, A = subspace.factors(task, module)
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = A.to(torch.float32).contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = B.to(torch.float32).contiguous()
        ranks[module] = A.shape[0]
    for key, value in coefficients.head.items():
        tensors[f"{KEY_PREFIX}{key}"] = value.to(torch.float32).contiguous()
    config = _export_config(ranks, list(coefficients.head), coefficients.metadata, base_model_name_or_path)

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    return write_folder(Path(out_dir), write, overwrite)


def _export_config(
    ranks: dict[str, int], head_keys: list[str], metadata: dict[str, Any], base_model_name_or_path: str | None
) -> dict[str, Any]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: p for module, p in ranks.items() if p != r}
    config = {
        "peft_type": "LORA",
        "task_type": metadata.get("task_type"),
        "base_model_name_or_path": base_model_name_or_path or metadata.get("base_model_name_or_path"),
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
