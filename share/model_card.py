"""What an exported adapter says about itself: its identity (namespace, task, subspace version), the
README.md model card, and the ``sharecl.json`` beside the PEFT files.

The subspace version is part of the identity: every merge rotates the shared bases, so the same task
has different factors in v3 and v4. ``adapter_id`` (``<namespace>/<task>@<version>``) is written to
``sharecl.json``, to the safetensors header of ``adapter_model.safetensors`` and to the card, so a
cache keyed on it (or on the files' bytes) never serves one version's task as another's.
``adapter_config.json`` carries no extra keys: PEFT warns on keys it does not know, and its
``revision`` names the *base model's* revision (``AutoPeftModel`` loads the base at it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .peft_io import ExportLayout
    from .subspace import Subspace

CARD_FILE = "README.md"
IDENTITY_FILE = "sharecl.json"
HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"
HEADER_PREFIX = "sharecl."  # keys of the identity in the safetensors header


@dataclass(frozen=True)
class CardMetric:
    """One recorded number about the task, and when it was measured."""

    name: str
    value: float
    measured: str  # e.g. "at this version (data-free)", "by the training worker, before the merge"


@dataclass(frozen=True)
class AdapterCard:
    """Everything the card and the identity say about one exported task."""

    task: str
    namespace: str | None = None
    version: str | None = None  # the subspace version the task was read from
    base_model: str | None = None  # base_model_name_or_path
    label_names: tuple[str, ...] | None = None
    metrics: tuple[CardMetric, ...] = ()
    base_model_note: str | None = None  # e.g. where an offline copy of the base model lives
    extra: dict[str, Any] = field(default_factory=dict)  # more provenance for sharecl.json (JSON-able)

    @property
    def adapter_id(self) -> str:
        """``<namespace>/<task>@<version>``; the parts that are unknown are left out."""
        name = f"{self.namespace}/{self.task}" if self.namespace else self.task
        return f"{name}@{self.version}" if self.version else name

    def identity(self) -> dict[str, str]:
        """The identity as strings (for the safetensors header and ``sharecl.json``)."""
        items = {"adapter_id": self.adapter_id, "namespace": self.namespace, "version": self.version, "task": self.task}
        return {key: value for key, value in items.items() if value is not None}

    def header(self) -> dict[str, str]:
        """The identity as safetensors metadata (``sharecl.adapter_id``, ``sharecl.version``, ...)."""
        return {f"{HEADER_PREFIX}{key}": value for key, value in self.identity().items()}

    def id2label(self) -> dict[str, str] | None:
        if self.label_names is None:
            return None
        return {str(i): name for i, name in enumerate(self.label_names)}


def task_fingerprint(subspace: Subspace, task: str) -> str:
    """sha256 of what ``task``'s exported adapter is made of: every module's bases, the task's coefficients
    and head. A folder pulled from a store records it per task, so an export can tell whether the task is
    still the version it was pulled as (a later ``sharecl add`` rotates the bases)."""
    digest = hashlib.sha256()
    coefficients = subspace.task(task)
    for name, basis in subspace.modules.items():
        E_A, E_B = coefficients.E[name]
        digest.update(name.encode())
        for tensor in (basis.U_A, basis.U_B, E_A, E_B):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    for key in sorted(coefficients.head):
        digest.update(key.encode())
        digest.update(coefficients.head[key].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def identity_json(card: AdapterCard, layout: ExportLayout, files: list[str]) -> str:
    """The content of ``sharecl.json``: identity, base model, layout, labels, metrics and provenance."""
    data = {
        **card.identity(),
        "base_model_name_or_path": card.base_model,
        "layout": layout.value,
        "standard_class": layout.auto_class,
        "module_prefix_removed": layout.module_prefix,
        "id2label": card.id2label(),
        "metrics": [{"name": m.name, "value": m.value, "measured": m.measured} for m in card.metrics],
        "files": sorted(files),
        **({"provenance": card.extra} if card.extra else {}),
    }
    return json.dumps(data, indent=2, default=str) + "\n"


def render_card(card: AdapterCard, layout: ExportLayout, folder: str, head_beside: bool) -> str:
    """The README.md model card of an adapter written to ``folder`` (used in the loading snippet);
    ``head_beside``: the task's head is in ``head.safetensors``."""
    lines = ["---"]
    if card.base_model and not card.base_model.startswith(("/", ".", "~")):  # the hub wants a repo id here
        lines.append(f"base_model: {json.dumps(card.base_model)}")
    lines += ["library_name: peft", "tags:", "  - lora", "  - share-cl", "---", ""]
    lines += [f"# {card.task} ({_cell(card.adapter_id)})", ""]
    lines += [
        "A LoRA adapter exported by share-cl from one version of a shared Share subspace "
        "(arXiv 2602.06043): the task's coefficients expanded into plain LoRA factors.",
        "",
        "| | |",
        "|---|---|",
        f"| adapter id | `{_cell(card.adapter_id)}` |",
        f"| namespace | {_cell(card.namespace or 'n/a (not read from a store)')} |",
        f"| subspace version | {_cell(card.version or 'n/a (not read from a store)')} |",
        f"| task | {_cell(card.task)} |",
        f"| base model | {_cell(card.base_model or 'unknown')} |",
        f"| loads on | {_loads_on(layout, head_beside)} |",
    ]
    if card.label_names is not None:
        lines.append(f"| labels | {_cell(', '.join(f'{i}: {n}' for i, n in enumerate(card.label_names)))} |")
    if card.base_model_note:
        lines += ["", card.base_model_note]
    lines += ["", "## Metrics", ""]
    if card.metrics:
        lines += ["| metric | value | measured |", "|---|---|---|"]
        lines += [f"| {_cell(m.name)} | {m.value:.6g} | {_cell(m.measured)} |" for m in card.metrics]
    else:
        lines.append("No metrics were recorded for this task at this version.")
    lines += ["", "## How to load", "", *_how_to_load(card, layout, folder, head_beside)]
    lines += [
        "",
        "## Identity",
        "",
        f"`{_cell(card.adapter_id)}` names this adapter. The subspace version is part of it: every merge "
        "rotates the shared bases, so another version of the same task has other weights. The id is in "
        "`sharecl.json` and in the safetensors header of `adapter_model.safetensors` (`sharecl.adapter_id`); "
        "key any cache on it, never on the task name alone.",
        "",
    ]
    return "\n".join(lines)


def _loads_on(layout: ExportLayout, head_beside: bool) -> str:
    if layout.auto_class is None:
        return "the model the task was trained on (module names as share-cl's model names them)"
    extra = " plus the classification head in `head.safetensors`" if head_beside else ""
    return f"`{layout.auto_class}`{extra}"


def _how_to_load(card: AdapterCard, layout: ExportLayout, folder: str, head_beside: bool) -> list[str]:
    base = card.base_model or "BASE_MODEL"
    if layout.auto_class is None:
        return [
            "Module names are those of the model the task was trained on (share-cl's builder or your own "
            "torch model), not of a standard Hugging Face class. Load it on that model:",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            f"model = PeftModel.from_pretrained(my_model, {folder!r})  # my_model: the model it was trained on",
            "```",
            "",
            "or add it to another subspace with `sharecl add SUBSPACE_DIR` / `sharecl adapters add`.",
        ]
    if head_beside:
        return [
            "The body is a PEFT adapter for `AutoModel`; the task's classifier reads the mean of the last "
            "hidden state over real tokens and is stored beside it (`head.safetensors`, `head_config.json` "
            "with `id2label`):",
            "",
            "```python",
            "import json",
            "from pathlib import Path",
            "",
            "import torch",
            "from peft import PeftModel",
            "from safetensors.torch import load_file",
            "from transformers import AutoModel, AutoTokenizer",
            "",
            f"adapter = Path({folder!r})",
            f"base = {base!r}",
            "tokenizer = AutoTokenizer.from_pretrained(base)",
            "model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()",
            'head_config = json.loads((adapter / "head_config.json").read_text())',
            'head = torch.nn.Linear(head_config["in_features"], head_config["out_features"])',
            'head.load_state_dict(load_file(adapter / "head.safetensors"))',
            "",
            'batch = tokenizer(["an example sentence"], padding=True, truncation=True, return_tensors="pt")',
            "with torch.no_grad():",
            '    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])',
            "    hidden = output.last_hidden_state",
            '    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
            "    logits = head((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))",
            'labels = [head_config["id2label"][str(i)] for i in logits.argmax(dim=-1).tolist()]',
            "```",
        ]
    return [
        "```python",
        "import torch",
        "from peft import PeftModel",
        f"from transformers import {layout.auto_class}, AutoTokenizer",
        "",
        f"adapter = {folder!r}",
        f"base = {base!r}",
        "tokenizer = AutoTokenizer.from_pretrained(base)",
        f"model = PeftModel.from_pretrained({layout.auto_class}.from_pretrained(base), adapter).eval()",
        "",
        *(
            [
                'batch = tokenizer(["an example prompt"], return_tensors="pt")  # format prompts as in training',
                "with torch.no_grad():",
                "    output = model.generate(**batch, max_new_tokens=32, do_sample=False)",
                "text = tokenizer.decode(output[0], skip_special_tokens=True)",
            ]
            if layout.peft_task_type == "CAUSAL_LM"
            else [
                'batch = tokenizer(["an example sentence"], padding=True, truncation=True, return_tensors="pt")',
                "with torch.no_grad():",
                "    hidden = model(**batch).last_hidden_state",
            ]
        ),
        "```",
    ]


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (one line, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", "\\|")
