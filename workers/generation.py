"""Causal-LM tasks: the training loss, greedy generation (one task or a different task per row) and
evaluation by exact match, ROUGE-L and loss.

- ``causal_lm_loss``: next-token cross-entropy on the response tokens (labels ``IGNORE_INDEX``
  elsewhere), the ``loss_fn`` the training loop takes for instruction tasks.
- ``generate``: greedy decoding with Hugging Face's ``generate`` (KV cache, EOS stopping) on a
  ``ShareModel`` or a plain causal LM. ``tasks`` selects one stored task for every row, or one per row:
  one batch then serves several tasks at once, and every row equals generating its task alone.
- ``evaluate_generation``: ``exact_match`` (after collapsing whitespace, case-sensitive), ``rougeL``
  (F-measure of Google's ``rouge-score``, its default tokenizer: lowercased ASCII letters and digits,
  as the instruction-tuning benchmarks score), and ``loss`` (per response token) over a split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from share.errors import ShareClError
from workers.instruction_data import (
    IGNORE_INDEX,
    InstructionSplit,
    eos_id,
    iter_instruction_batches,
    pad_id,
)
from workers.train import configure_threads, precision

Tasks = str | Sequence[str | None] | None


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor], reduction: str = "mean") -> Tensor:
    """Cross-entropy of each next token where ``labels`` is not ``IGNORE_INDEX`` (computed in float32)."""
    logits = _logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    shifted = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )


def _generator_of(model: nn.Module) -> nn.Module:
    """The module with ``generate``: the model itself, or the causal LM a ``ShareModel`` wraps."""
    if hasattr(model, "generate"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "generate"):
        return inner
    raise ShareClError(
        f"{type(model).__name__} cannot generate; build it with model.builder hf-causal-lm "
        "(a Hugging Face causal LM, or a ShareModel around one)"
    )


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _stop_ids(tokenizer: Any, generator: nn.Module) -> list[int]:
    ids = {eos_id(tokenizer)}
    configured = getattr(getattr(generator, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return sorted(ids)


def _row_tasks(tasks: Tasks, n: int) -> list[str | None] | str | None:
    if tasks is None or isinstance(tasks, str):
        return tasks
    names = list(tasks)
    if len(names) != n:
        raise ShareClError(f"tasks names {len(names)} rows but there are {n} prompts; give one task per prompt")
    return names


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    tasks: Tasks = None,
    max_new_tokens: int,
    max_length: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy completions of ``prompts`` (the new text only, special tokens dropped).

    ``tasks``: None leaves the model as it is (the task in training, or the selection made before);
    a name serves every row with that stored task; a list names a task (or None, the base model) per
    prompt (the last batch's selection stays, as ``ShareModel.set_task`` keeps it). A prompt keeps its
    last ``max(max_length - max_new_tokens, max_length // 2)`` tokens.
    """
    if max_new_tokens < 1:
        raise ShareClError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ShareClError(f"batch_size must be >= 1, got {batch_size}")
    from transformers import GenerationConfig

    configure_threads()
    generator = _generator_of(model)
    row_tasks = _row_tasks(tasks, len(prompts))
    if isinstance(row_tasks, str):
        model.set_task(row_tasks)  # type: ignore[operator]
    keep = max(max_length - max_new_tokens, max_length // 2, 1)
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"])[-keep:] for p in prompts]
    pad = pad_id(tokenizer)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=_stop_ids(tokenizer, generator),
    )
    device = _device_of(model)
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
        with torch.no_grad(), precision(model):
            for start in range(0, len(encoded), batch_size):
                rows = encoded[start : start + batch_size]
                if isinstance(row_tasks, list):
                    model.set_task(row_tasks[start : start + batch_size])  # type: ignore[operator]
                ids, mask = _left_padded(rows, pad)
                out = generator.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
                )
                new = out[:, ids.shape[1] :].cpu()
                completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return completions


def normalize(text: str) -> str:
    """Whitespace collapsed and stripped: what exact match compares."""
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after ``normalize``."""
    _same_length(predictions, references)
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge-score``, no stemming)."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if not references or len(predictions) != len(references):
        raise ShareClError(
            f"need one prediction per reference and at least one reference, got {len(predictions)} and "
            f"{len(references)}"
        )


def default_max_new_tokens(split: InstructionSplit, tokenizer: Any, max_length: int) -> int:
    """The longest reference response in tokens, plus EOS, at most ``max_length``."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in split.responses)
    return max(1, min(longest + 1, max_length))


def response_loss(model: nn.Module, split: InstructionSplit, tokenizer: Any, batch_size: int, max_length: int) -> float:
    """Mean cross-entropy per response token over the whole split (the model's current task selection)."""
    total, tokens = 0.0, 0
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision(model):
            for batch in iter_instruction_batches(split, tokenizer, batch_size, False, 0, max_length):
                batch = {k: v.to(device) for k, v in batch.items()}
                total += float(causal_lm_loss(model, batch, reduction="sum"))
                tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def evaluate_generation(
    model: nn.Module,
    split: InstructionSplit,
    tokenizer: Any,
    batch_size: int,
    *,
    max_length: int,
    max_new_tokens: int | None = None,
    task: str | None = None,
) -> dict[str, float]:
    """``exact_match``, ``rougeL``, ``loss`` and ``examples`` of ``split``, generated greedily.

    ``max_new_tokens`` None: ``default_max_new_tokens``. ``task`` selects a stored task of a
    ``ShareModel``; None evaluates the model as it is (e.g. the task in training).
    """
    if len(split) == 0:
        raise ShareClError(f"eval split of task {split.task!r} is empty; nothing to evaluate")
    if task is not None:
        model.set_task(task)  # type: ignore[operator]
    new_tokens = max_new_tokens or default_max_new_tokens(split, tokenizer, max_length)
    predictions = generate(
        model,
        tokenizer,
        split.prompts,
        max_new_tokens=new_tokens,
        max_length=max_length,
        batch_size=batch_size,
    )
    return {
        "exact_match": exact_match(predictions, split.responses),
        "rougeL": rouge_l(predictions, split.responses),
        "loss": response_loss(model, split, tokenizer, batch_size, max_length),
        "examples": float(len(split)),
    }
