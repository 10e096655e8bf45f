"""The one training loop and the one evaluation, shared by Ray workers and the benchmarks.

The loop knows nothing about Share, LoRA or PEFT: it optimizes whatever parameters have
``requires_grad`` (whoever attached adapters froze the rest) and calls
``model(input_ids=..., attention_mask=...) -> logits``.

Optimization follows Hugging Face's Trainer: AdamW, a learning rate that warms up linearly from 0
over ``ceil(warmup_ratio * steps)`` steps and then decays (cosine or linear) to 0 at ``steps``, and
the gradient norm clipped to ``max_grad_norm`` before every step (:class:`OptimConfig`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from share.errors import ShareClError
from workers.data import TaskSplit, iter_batches

Batch = dict[str, torch.Tensor]
# Called with the epoch number (0, 1, ...) and returns one pass over the data; the loop calls it again
# when a pass runs out, so a caller can reshuffle per epoch, e.g.
# ``lambda epoch: iter_batches(split, tok, 16, shuffle=True, seed=seed + epoch, max_length=64)``.
BatchesFn = Callable[[int], Iterable[Batch]]
MetricsFn = Callable[[int, dict[str, float]], None]
# The training objective of one batch; the default is classification cross-entropy on the logits
# (``classification_loss``); causal-LM tasks pass ``workers.generation.causal_lm_loss``.
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class LrScheduler(StrEnum):
    """How the learning rate moves after warmup (Hugging Face's ``lr_scheduler_type`` of the same names)."""

    COSINE = "cosine"  # half a cosine from 1 down to 0 at the last step
    LINEAR = "linear"  # a straight line from 1 down to 0 at the last step
    CONSTANT = "constant"  # stays at 1 after warmup


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup-then-decay learning rate and gradient-norm clipping.

    ``multiplier(step, steps)`` is the factor on ``lr`` after ``step`` optimizer steps, exactly as in
    Hugging Face's schedulers: optimizer step ``i`` (1-based) trains at ``lr * multiplier(i - 1, steps)``,
    so with warmup the first step trains at lr 0, and ``multiplier(steps, steps)`` is 0 for cosine and
    linear. ``max_grad_norm`` None or 0 disables clipping (the norm is still measured and reported).
    """

    lr: float
    lr_scheduler: LrScheduler
    warmup_ratio: float
    max_grad_norm: float | None
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ShareClError(f"OptimConfig.lr must be a finite number > 0 (got {self.lr}); e.g. 1e-3")
        try:
            object.__setattr__(self, "lr_scheduler", LrScheduler(self.lr_scheduler))
        except ValueError:
            choices = ", ".join(s.value for s in LrScheduler)
            raise ShareClError(f"OptimConfig.lr_scheduler {self.lr_scheduler!r} is not one of {choices}") from None
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ShareClError(
                f"OptimConfig.warmup_ratio must be in [0, 1) (got {self.warmup_ratio}): the fraction of the steps "
                "spent warming up; 0.06 is a common choice, 0 disables warmup"
            )
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ShareClError(
                f"OptimConfig.max_grad_norm must be a finite number >= 0 or None (got {self.max_grad_norm}); "
                "1.0 is the usual value, None or 0 disables clipping"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ShareClError(f"OptimConfig.weight_decay must be a finite number >= 0 (got {self.weight_decay})")

    @classmethod
    def constant(cls, lr: float, weight_decay: float = 0.0) -> OptimConfig:
        """A fixed learning rate without warmup or clipping (the loop as it was before schedules)."""
        return cls(lr, LrScheduler.CONSTANT, warmup_ratio=0.0, max_grad_norm=None, weight_decay=weight_decay)

    @property
    def clip_norm(self) -> float | None:
        """The clipping threshold, or None when clipping is off."""
        return self.max_grad_norm if self.max_grad_norm else None

    def warmup_steps(self, steps: int) -> int:
        """``ceil(warmup_ratio * steps)``, as Hugging Face's ``TrainingArguments.get_warmup_steps``."""
        return math.ceil(self.warmup_ratio * steps)

    def multiplier(self, step: int, steps: int) -> float:
        """The factor on ``lr`` after ``step`` of ``steps`` optimizer steps (0 <= step <= steps)."""
        if not 0 <= step <= steps:
            raise ShareClError(f"step {step} is outside 0..{steps}; the schedule covers the run's steps only")
        warmup = self.warmup_steps(steps)
        if step < warmup:
            return step / warmup
        if self.lr_scheduler is LrScheduler.CONSTANT:
            return 1.0
        decay = max(1, steps - warmup)
        if self.lr_scheduler is LrScheduler.LINEAR:
            return max(0.0, (steps - step) / decay)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay)))


@dataclass
class TrainResult:
    steps: int
    trainable_params: int
    # One entry per optimizer step, keyed by the step number (1-based), ready for ``log_series``:
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # loss of that step's batch
    lr_curve: list[tuple[int, float]] = field(default_factory=list)  # learning rate that step trained at
    grad_norm_curve: list[tuple[int, float]] = field(default_factory=list)  # gradient norm before clipping
    wall_time_s: float = 0.0
    examples_seen: int = 0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last (up to) 10 steps: less noisy than the very last batch."""
        tail = [loss for _, loss in self.loss_curve[-10:]]
        return sum(tail) / len(tail) if tail else math.nan


def configure_threads() -> int:
    """Use the CPUs this process may run on, unless the user (or Ray, via OMP_NUM_THREADS) chose.

    torch's default counts the machine's cores, which oversubscribes under taskset/cgroup limits.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if torch.get_num_threads() != available:
            torch.set_num_threads(max(1, available))
    return torch.get_num_threads()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Scale the gradients of ``params`` so their global L2 norm is at most ``max_norm`` (None: leave them);
    returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
    return float(norm)


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model(input_ids, attention_mask) -> logits`` against ``batch["labels"]``."""
    return F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"])


@contextlib.contextmanager
def precision(model: nn.Module, *, cuda_bf16: bool = True) -> Iterator[None]:
    """Mixed precision for ``model``'s forward: autocast to the dtype of half-precision base weights (so
    float32 adapters meet them), else bf16 autocast on CUDA (``cuda_bf16``); a float32 model on CPU
    runs as is."""
    device = _device_of(model)
    half = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    dtype = (torch.bfloat16 if torch.bfloat16 in half else torch.float16) if half else None
    if dtype is None and cuda_bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    if dtype is None or device.type not in ("cpu", "cuda"):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def keep_float32(params: list[nn.Parameter]) -> None:
    """Trainable parameters in float32 whatever the base weights' dtype (full-precision optimizer state and updates)."""
    for param in params:
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def train(
    model: nn.Module,
    batches_fn: BatchesFn,
    *,
    steps: int,
    optim: OptimConfig,
    log_every: int,
    on_metrics: MetricsFn | None = None,
    seed: int,
    loss_fn: LossFn = classification_loss,
) -> TrainResult:
    """Run ``steps`` AdamW steps of ``loss_fn`` (default: cross-entropy on the logits) on the model's
    trainable parameters, per ``optim``; trainable parameters are kept in float32, and the forward runs
    under ``precision(model)`` (bf16 autocast on CUDA).

    Every ``log_every`` steps (and at the last step) the mean loss and gradient norm since the previous
    report and the current learning rate go to ``on_metrics(step, metrics)`` if given, else as one line
    to stderr. ``log_every=0`` reports only the last step. ``seed`` fixes dropout; data order is up to
    ``batches_fn``. A non-finite loss or gradient norm stops the run with ``FloatingPointError`` before
    the step that would spoil the weights.
    """
    if steps < 1:
        raise ShareClError(f"steps must be >= 1, got {steps}")
    params = trainable_parameters(model)
    if not params:
        raise ShareClError(
            "the model has no parameter with requires_grad=True; attach adapters or unfreeze the head before training"
        )
    configure_threads()
    keep_float32(params)
    torch.manual_seed(seed)
    device = _device_of(model)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: optim.multiplier(step, steps))
    result = TrainResult(steps=steps, trainable_params=sum(p.numel() for p in params))

    model.train()
    start = time.perf_counter()
    window: list[float] = []
    window_norms: list[float] = []
    window_examples = 0
    window_start = start
    epoch, step = 0, 0
    batches = iter(batches_fn(epoch))
    while step < steps:
        batch = next(batches, None)
        if batch is None:
            epoch += 1
            batches = iter(batches_fn(epoch))
            batch = next(batches, None)
            if batch is None:
                raise ShareClError("batches_fn returned no batches; the training split is empty")
        batch = _to(batch, device)
        with precision(model):
            loss = loss_fn(model, batch)
        step += 1
        lr = optimizer.param_groups[0]["lr"]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss became {value} at step {step} (lr {lr:.3g}); lower lr (now {optim.lr}), "
                f"warm up longer (warmup_ratio {optim.warmup_ratio}) or clip gradients (max_grad_norm)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = clip_gradients(params, optim.clip_norm)
        if not math.isfinite(norm):
            raise FloatingPointError(
                f"gradient norm became {norm} at step {step} (loss {value:.4g}, lr {lr:.3g}); lower lr (now {optim.lr})"
            )
        optimizer.step()
        scheduler.step()

        n = int(batch["labels"].shape[0])
        result.loss_curve.append((step, value))
        result.lr_curve.append((step, lr))
        result.grad_norm_curve.append((step, norm))
        result.examples_seen += n
        window.append(value)
        window_norms.append(norm)
        window_examples += n

        if step == steps or (log_every > 0 and step % log_every == 0):
            now = time.perf_counter()
            metrics = {
                "loss": sum(window) / len(window),
                "lr": lr,
                "grad_norm": sum(window_norms) / len(window_norms),
                "examples_per_s": window_examples / max(now - window_start, 1e-9),
                "elapsed_s": now - start,
                "epoch": float(epoch),
            }
            if on_metrics is not None:
                on_metrics(step, metrics)
            else:
                print(
                    f"[train] step {step}/{steps} loss {metrics['loss']:.4f} lr {lr:.3g} "
                    f"grad norm {metrics['grad_norm']:.3g} "
                    f"{metrics['examples_per_s']:.1f} ex/s {metrics['elapsed_s']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            window, window_norms, window_examples, window_start = [], [], 0, now

    result.wall_time_s = time.perf_counter() - start
    return result


def evaluate(
    model: nn.Module,
    split: TaskSplit,
    tokenizer: Any,
    batch_size: int,
    *,
    max_length: int,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the whole split, in eval mode (the mode is restored after)."""
    if len(split) == 0:
        raise ShareClError(f"eval split of task {split.task!r} is empty; nothing to evaluate")
    configure_threads()
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with torch.no_grad(), precision(model):
            for batch in iter_batches(split, tokenizer, batch_size, shuffle=False, seed=0, max_length=max_length):
                batch = _to(batch, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if logits.shape[-1] != split.num_labels:
                    raise ShareClError(
                        f"model outputs {logits.shape[-1]} classes but task {split.task!r} has "
                        f"{split.num_labels} ({split.label_names}); build the model with num_labels={split.num_labels}"
                    )
                loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    n = len(split)
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": float(n)}
