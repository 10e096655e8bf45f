"""Train one task on a ``ShareModel``: the step that Ray workers and the benchmarks share.

``mode="lora"`` trains a plain LoRA adapter (cold start, or a baseline); ``mode="coefficients"``
trains only coefficients, ``phi`` temporary directions per side and the head against the frozen
bases of the loaded subspace. Either way the result is a ``LoraAdapter`` ready to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from share import LoraAdapter, ShareModel
from share.config import TrainingMode
from share.errors import ShareClError
from workers.causal_lm import is_causal_lm
from workers.data import TaskSplit, iter_batches
from workers.generation import causal_lm_loss, evaluate_generation
from workers.instruction_data import InstructionSplit, iter_instruction_batches
from workers.train import LrScheduler, MetricsFn, OptimConfig, TrainResult, evaluate, precision, train


@dataclass(frozen=True)
class TaskSpec:
    """Everything that decides how one task is trained (logged as MLflow params by the workers).

    The job schema (``jobs/schema.py``) owns the defaults: every default here is the schema's value
    (``model.max_length``, ``training.*``, ``adapter.*``; ``p`` is the schema's ``r`` when ``adapter.p``
    is unset), and a test keeps them equal. ``lora_lr`` None trains LoRA at ``lr`` too.
    """

    name: str
    mode: TrainingMode
    steps: int
    lr: float
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    r: int = 8
    lora_alpha: float = 16.0
    p: int = 8
    phi: int = 2
    log_every: int = 10
    eval_batch_size: int = 128
    lr_scheduler: LrScheduler = LrScheduler.COSINE
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    lora_lr: float | None = 2e-3

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", TrainingMode(self.mode))
        except ValueError:
            choices = ", ".join(m.value for m in TrainingMode)
            raise ShareClError(f"TaskSpec.mode {self.mode!r} is not one of {choices}") from None
        if self.steps < 1:
            raise ShareClError(f"TaskSpec.steps must be >= 1 (got {self.steps}); set training.steps")
        if self.lora_lr is not None and not self.lora_lr > 0:
            raise ShareClError(f"TaskSpec.lora_lr must be > 0 or None (got {self.lora_lr}); None trains LoRA at lr")
        object.__setattr__(self, "lr_scheduler", self.optim.lr_scheduler)  # checks the optimizer fields

    @property
    def optim(self) -> OptimConfig:
        """The optimizer settings this task trains with (``lora_lr`` in mode lora when set, else ``lr``)."""
        lr = self.lora_lr if self.mode is TrainingMode.LORA and self.lora_lr is not None else self.lr
        return OptimConfig(
            lr=lr,
            lr_scheduler=self.lr_scheduler,
            warmup_ratio=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm,
            weight_decay=self.weight_decay,
        )


@dataclass
class TrainedTask:
    adapter: LoraAdapter
    result: TrainResult
    eval_metrics: dict[str, float]


def train_task(
    model: ShareModel,
    spec: TaskSpec,
    train_split: TaskSplit | InstructionSplit,
    tokenizer: Any,
    eval_split: TaskSplit | InstructionSplit | None = None,
    on_metrics: MetricsFn | None = None,
    init: LoraAdapter | None = None,
) -> TrainedTask:
    """Train ``spec.name`` from its data; returns the adapter (head included) and its eval metrics.

    ``init`` continues LoRA factors from an earlier adapter (the sequential-LoRA baseline).
    An ``InstructionSplit`` (causal-LM task) trains on its response tokens and is evaluated by
    greedy generation (``workers.generation``: exact_match, rougeL, loss).
    The model is left with the task still attached in training mode; callers merge the adapter
    and ``load_subspace`` the result (which ends training).
    """
    generative = isinstance(train_split, InstructionSplit)
    if generative != is_causal_lm(model):
        raise ShareClError(
            f"task {spec.name!r}: {'instruction (prompt, response)' if generative else 'classification (text, label)'} "
            f"data needs model.builder {'hf-causal-lm' if generative else 'hf-text-classifier'}; the model is "
            f"{'not ' if generative else ''}a causal LM. Match the builder to the data"
        )
    if spec.mode is TrainingMode.LORA:
        model.start_lora(spec.name, r=spec.r, lora_alpha=spec.lora_alpha, seed=spec.seed, init=init)
    else:
        if init is not None:
            raise ShareClError("init applies to mode 'lora' only; coefficient training starts from dW = 0")
        model.start_coefficients(spec.name, p=spec.p, phi=spec.phi, seed=spec.seed)

    iter_fn = iter_instruction_batches if generative else iter_batches

    def batches(epoch: int):
        return iter_fn(
            train_split,  # type: ignore[arg-type]
            tokenizer,
            spec.batch_size,
            shuffle=True,
            seed=spec.seed + epoch,
            max_length=spec.max_length,
        )

    extra = {"loss_fn": causal_lm_loss} if generative else {}
    result = train(
        model,
        batches,
        steps=spec.steps,
        optim=spec.optim,
        log_every=spec.log_every,
        on_metrics=on_metrics,
        seed=spec.seed,
        **extra,
    )
    metrics: dict[str, float] = {}
    if eval_split is not None:
        metrics = _evaluate_split(model, eval_split, tokenizer, spec.eval_batch_size, spec.max_length)
    with precision(model, cuda_bf16=False):  # half-precision bases meet float32 coefficients; else exact
        adapter = model.trained_adapter()
    adapter.metadata.update(
        {"task": spec.name, "mode": spec.mode.value, "label_names": train_split.label_names, "steps": spec.steps}
    )
    return TrainedTask(adapter=adapter, result=result, eval_metrics=metrics)


def _evaluate_split(
    model: ShareModel, split: TaskSplit | InstructionSplit, tokenizer: Any, batch_size: int, max_length: int
) -> dict[str, float]:
    """``evaluate`` (accuracy, loss) for a classification split; greedy generation for an instruction split."""
    if isinstance(split, InstructionSplit):
        return evaluate_generation(model, split, tokenizer, batch_size, max_length=max_length)
    return evaluate(model, split, tokenizer, batch_size, max_length=max_length)


def evaluate_tasks(
    model: ShareModel,
    splits: dict[str, TaskSplit | InstructionSplit],
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
) -> dict[str, float]:
    """Accuracy of every stored task named in ``splits`` (the model's loaded subspace must hold them);
    for an instruction split the score is its ROUGE-L."""
    accuracy = {}
    for task, split in splits.items():
        model.set_task(task)
        metrics = _evaluate_split(model, split, tokenizer, batch_size, max_length)
        accuracy[task] = metrics["rougeL" if isinstance(split, InstructionSplit) else "accuracy"]
    model.set_task(None)
    return accuracy
