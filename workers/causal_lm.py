"""The ``hf-causal-lm`` model builder: any local Hugging Face causal LM, adapted for instruction tasks.

``AutoModelForCausalLM`` and ``AutoTokenizer`` from a local folder (nothing is downloaded), no
per-task head: every task is its adapter alone. Adapters go on ``q_proj, k_proj, v_proj, o_proj`` by
default (Llama, Mistral, Qwen, Gemma name their attention projections so); any ``target_modules``
works. Data: ``workers.instruction_data``; evaluation: ``workers.generation``.

Precision. ``dtype`` loads the base weights in float32 (default), bfloat16 or float16; the trainable
parameters are kept in float32 by the training loop, which trains under bf16 autocast on CUDA
(``workers.train.precision``). ``gradient_checkpointing=True`` trades compute for activation memory
(only while the model is in training mode).
"""

from __future__ import annotations

import os
from enum import StrEnum
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time

import torch  # noqa: E402
from torch import nn  # noqa: E402

from share.errors import ShareClError  # noqa: E402

BUILDER_NAME = "hf-causal-lm"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class ModelDtype(StrEnum):
    """The dtype the base weights are loaded in (``model.dtype`` of a job)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.value]

    @classmethod
    def parse(cls, value: str | torch.dtype | ModelDtype) -> ModelDtype:
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
        try:
            return cls(aliases.get(str(value), str(value)))
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ShareClError(f"model dtype {value!r} is not one of {choices} (or fp32, bf16, fp16)") from None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a ``ShareModel`` wraps) is a Hugging Face model that generates."""
    inner = getattr(model, "model", model) if not hasattr(model, "generate") else model
    can_generate = getattr(inner, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Padding for training and generation: a pad token (EOS when the tokenizer has none), padding on the left."""
    if tokenizer.eos_token_id is None:
        raise ShareClError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token; a causal LM task needs one to end responses. "
            "Set tokenizer.eos_token and save_pretrained it into the model folder"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    return tokenizer


def build_causal_lm(
    model_name_or_path: str | None,
    num_labels: int = 0,
    seed: int = 0,
    *,
    dtype: str | torch.dtype | ModelDtype = ModelDtype.FLOAT32,
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local folder. ``num_labels`` and ``seed`` are unused
    (no head); they keep the builder signature of ``workers.models``."""
    del num_labels, seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name_or_path is None:
        raise ShareClError(
            f"model.builder {BUILDER_NAME} needs model.name_or_path: a local folder with config.json, the weights "
            "and the tokenizer files (e.g. from `huggingface-cli download <repo> --local-dir <folder>`)"
        )
    torch_dtype = ModelDtype.parse(dtype).torch
    source = str(model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
    except OSError as err:
        raise FileNotFoundError(
            f"causal LM {source!r} could not be loaded offline ({err}); pass a local folder holding config.json, "
            "the weights and the tokenizer files"
        ) from err
    except ValueError as err:  # a folder whose config names no causal-LM architecture
        raise ShareClError(
            f"{source!r} is not a causal language model AutoModelForCausalLM can load ({err}); "
            f"use model.builder hf-text-classifier for encoders"
        ) from err
    prepare_tokenizer(tokenizer)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass instead of keeping them (training mode only).

    Non-reentrant, so adapters get gradients although the model's inputs need none. Transformers 5
    names it activation checkpointing; 4.x gradient checkpointing.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``enable_checkpointing`` is on for ``model`` (a Hugging Face model)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
