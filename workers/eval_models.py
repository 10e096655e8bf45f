"""Evaluation models kept between the coordinator's evaluations.

The coordinator evaluates every task after every merge; building the base model each time would
cost more than the evaluation. A few models (by builder, model, target modules and dtype) stay loaded in
the process; loading a version into one replaces whatever subspace it held.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from subspace_store import EvalSpec
from workers.models import build_share_model
from workers.placement import current_placement

_KEEP = 2
_MODELS: OrderedDict[tuple[Any, ...], tuple[Any, Any]] = OrderedDict()


def eval_model(spec: EvalSpec, num_labels: int) -> tuple[Any, Any]:
    """A ``ShareModel`` and tokenizer for ``spec``'s base model (built once, then reused)."""
    key = (spec.builder, spec.model_name_or_path, tuple(spec.target_modules), spec.dtype, spec.gradient_checkpointing)
    if key not in _MODELS:
        while len(_MODELS) >= _KEEP:
            _MODELS.popitem(last=False)
        # The template head's width does not matter: every stored task brings its own head.
        _MODELS[key] = build_share_model(
            spec.builder,
            spec.model_name_or_path,
            spec.target_modules,
            max(num_labels, 2),
            seed=0,
            device=current_placement().device,
            dtype=spec.dtype,
            gradient_checkpointing=spec.gradient_checkpointing,
        )
    return _MODELS[key]
