"""Train one task on a ``ShareModel``: the step that Ray workers and the benchmarks share.

``mode="lora"`` trains a plain LoRA adapter (cold start, or a baseline); ``mode="coefficients"``
trains only coefficients, ``phi`` temporary directions per side and the head against the frozen
bases of the loaded subspace. Either way the result is a ``LoraAdapter`` ready to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from share import LoraAdapter, ShareModel
from workers.data import TaskSplit, iter_batches
from workers.train import MetricsFn, TrainResult, evaluate, train

Mode = Literal["lora", "coefficients"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything that decides how one task is trained (logged as MLflow params by the workers)."""

    name: str
    mode: Mode
    steps: int
    lr: float
    batch_size: int = 16
    max_length: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    r: int = 8
    lora_alpha: float = 16.0
    p: int = 8
    phi: int = 2
    log_every: int = 25
    eval_batch_size: int = 64


@dataclass
class TrainedTask:
    adapter: LoraAdapter
    result: TrainResult
    eval_metrics: dict[str, float]


def train_task(
    model: ShareModel,
    spec: TaskSpec,
    train_split: TaskSplit,
    tokenizer: Any,
    eval_split: TaskSplit | None = None,
    on_metrics: MetricsFn | None = None,
    init: LoraAdapter | None = None,
) -> TrainedTask:
    """Train ``spec.name`` from its data; returns the adapter (head included) and its eval metrics.

    ``init`` continues LoRA factors from an earlier adapter (the sequential-LoRA baseline).
    The model is left with the task still attached in training mode; callers merge the adapter
    and ``load_subspace`` the result (which ends training).
    """
    if spec.mode == "lora":
        model.start_lora(spec.name, r=spec.r, lora_alpha=spec.lora_alpha, seed=spec.seed, init=init)
    elif spec.mode == "coefficients":
        if init is not None:
            raise ValueError("init applies to mode 'lora' only; coefficient training starts from dW = 0")
        model.start_coefficients(spec.name, p=spec.p, phi=spec.phi, seed=spec.seed)
    else:
        raise ValueError(f"unknown mode {spec.mode!r}; use 'lora' or 'coefficients'")

    def batches(epoch: int):
        return iter_batches(
            train_split, tokenizer, spec.batch_size, shuffle=True, seed=spec.seed + epoch, max_length=spec.max_length
        )

    result = train(
        model,
        batches,
        steps=spec.steps,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        log_every=spec.log_every,
        on_metrics=on_metrics,
        seed=spec.seed,
    )
    metrics: dict[str, float] = {}
    if eval_split is not None:
        metrics = evaluate(model, eval_split, tokenizer, spec.eval_batch_size, max_length=spec.max_length)
    adapter = model.trained_adapter()
    adapter.metadata.update(
        {"task": spec.name, "mode": spec.mode, "label_names": train_split.label_names, "steps": spec.steps}
    )
    return TrainedTask(adapter=adapter, result=result, eval_metrics=metrics)


def evaluate_tasks(
    model: ShareModel,
    splits: dict[str, TaskSplit],
    tokenizer: Any,
    batch_size: int = 64,
    max_length: int = 64,
) -> dict[str, float]:
    """Accuracy of every stored task named in ``splits`` (the model's loaded subspace must hold them)."""
    accuracy = {}
    for task, split in splits.items():
        model.set_task(task)
        accuracy[task] = evaluate(model, split, tokenizer, batch_size, max_length=max_length)["accuracy"]
    model.set_task(None)
    return accuracy
