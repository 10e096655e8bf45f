"""The one training loop and the one evaluation, shared by Ray workers and the benchmarks.

The loop knows nothing about Share, LoRA or PEFT: it optimizes whatever parameters have
``requires_grad`` (whoever attached adapters froze the rest) and calls
``model(input_ids=..., attention_mask=...) -> logits``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from workers.data import TaskSplit, iter_batches

Batch = dict[str, torch.Tensor]
# Called with the epoch number (0, 1, ...) and returns one pass over the data; the loop calls it again
# when a pass runs out, so a caller can reshuffle per epoch, e.g.
# ``lambda epoch: iter_batches(split, tok, 16, shuffle=True, seed=seed + epoch, max_length=64)``.
BatchesFn = Callable[[int], Iterable[Batch]]
MetricsFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    steps: int
    trainable_params: int
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss of that step's batch)
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


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(
    model: nn.Module,
    batches_fn: BatchesFn,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    log_every: int,
    on_metrics: MetricsFn | None = None,
    seed: int,
) -> TrainResult:
    """Run ``steps`` AdamW steps of cross-entropy on the model's trainable parameters.

    Every ``log_every`` steps (and at the last step) the mean loss since the previous report goes to
    ``on_metrics(step, metrics)`` if given, else as one line to stderr. ``log_every=0`` reports only
    the last step. ``seed`` fixes dropout; data order is up to ``batches_fn``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError(
            "the model has no parameter with requires_grad=True; attach adapters or unfreeze the head before training"
        )
    configure_threads()
    torch.manual_seed(seed)
    device = _device_of(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    result = TrainResult(steps=steps, trainable_params=sum(p.numel() for p in params))

    model.train()
    start = time.perf_counter()
    window: list[float] = []
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
                raise ValueError("batches_fn returned no batches; the training split is empty")
        batch = _to(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; lower lr (now {lr})")
        n = int(batch["labels"].shape[0])
        result.loss_curve.append((step, value))
        result.examples_seen += n
        window.append(value)
        window_examples += n

        if step == steps or (log_every > 0 and step % log_every == 0):
            now = time.perf_counter()
            metrics = {
                "loss": sum(window) / len(window),
                "examples_per_s": window_examples / max(now - window_start, 1e-9),
                "elapsed_s": now - start,
                "epoch": float(epoch),
            }
            if on_metrics is not None:
                on_metrics(step, metrics)
            else:
                print(
                    f"[train] step {step}/{steps} loss {metrics['loss']:.4f} "
                    f"{metrics['examples_per_s']:.1f} ex/s {metrics['elapsed_s']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            window, window_examples, window_start = [], 0, now

    result.wall_time_s = time.perf_counter() - start
    return result


def evaluate(
    model: nn.Module,
    split: TaskSplit,
    tokenizer: Any,
    batch_size: int,
    max_length: int = 128,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the whole split, in eval mode (the mode is restored after)."""
    if len(split) == 0:
        raise ValueError(f"eval split of task {split.task!r} is empty; nothing to evaluate")
    configure_threads()
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with torch.no_grad():
            for batch in iter_batches(split, tokenizer, batch_size, shuffle=False, seed=0, max_length=max_length):
                batch = _to(batch, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if logits.shape[-1] != split.num_labels:
                    raise ValueError(
                        f"model outputs {logits.shape[-1]} classes but task {split.task!r} has "
                        f"{split.num_labels} ({split.label_names}); build the model with num_labels={split.num_labels}"
                    )
                loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    n = len(split)
    return {"accuracy": correct / n, "loss": loss_sum / n, "examples": float(n)}
