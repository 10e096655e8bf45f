"""``joint``: ONE LoRA adapter trained on all tasks at once, a head per task (the paper's jointly
trained reference, the upper bound of what one shared adapter can hold).

It trains for as many steps as the whole sequence does (tasks x steps), on batches drawn from all
tasks' training data shuffled together, through the workers' loop (``workers.train.train``). Each
row of a batch goes to its own task's head; the loop only passes ``input_ids`` and
``attention_mask``, so the batch iterator tells the heads each row's task just before it hands the
batch over (the loop runs the forward pass on the batch it was just given).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from benchmarks.continual_config import TARGETS, Budget, Method
from benchmarks.continual_data import TaskData
from benchmarks.continual_methods import adapter_parameters, fmt_row, log
from benchmarks.continual_store import MethodResult
from share import ShareModel
from workers.models import build_text_classifier
from workers.train import LrScheduler, OptimConfig, evaluate, train


class JointHeads(nn.Module):
    """A linear head per task. ``rows`` is one task index for every row, or a task index per row."""

    def __init__(self, hidden: int, label_counts: list[int], seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in label_counts)
        self.rows: int | Tensor = 0

    def forward(self, pooled: Tensor) -> Tensor:
        if isinstance(self.rows, int):
            return self.heads[self.rows](pooled)
        width = max(self.heads[int(t)].out_features for t in self.rows.unique())
        # Rows of tasks with fewer labels get -inf for the labels they lack: they never win, add no loss.
        out = pooled.new_full((pooled.shape[0], width), float("-inf"))
        for t in self.rows.unique().tolist():
            mask = self.rows == t
            logits = self.heads[t](pooled[mask])
            out[mask, : logits.shape[1]] = logits
        return out


def _mixed_batches(tasks: list[TaskData], heads: JointHeads, tokenizer, budget: Budget, seed: int):
    texts = [text for t in tasks for text in t.train.texts]
    labels = torch.cat([t.train.labels for t in tasks])
    task_of = torch.cat([torch.full((len(t.train),), i, dtype=torch.long) for i, t in enumerate(tasks)])

    def one_pass(epoch: int) -> Iterator[dict[str, Tensor]]:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), budget.batch_size):
            idx = order[start : start + budget.batch_size]
            enc = tokenizer(
                [texts[i] for i in idx.tolist()],
                padding=True,
                truncation=True,
                max_length=budget.max_length,
                return_tensors="pt",
            )
            heads.rows = task_of[idx]
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels[idx]}

    return one_pass


def joint(tasks: list[TaskData], seed: int, budget: Budget, method: Method) -> MethodResult:
    start = time.perf_counter()
    names = [t.name for t in tasks]
    result = MethodResult(method.name, seed, names, [], [], hyper=budget.hyper(method, len(tasks)))
    base, tokenizer = build_text_classifier(None, 2, seed=seed)
    model = ShareModel(base, list(TARGETS), heads=())  # freezes the encoder; no per-task head routing
    heads = JointHeads(base.head.in_features, [t.num_labels for t in tasks], seed)
    base.head = heads  # trainable, added after the freeze
    model.start_lora("joint", r=budget.r, lora_alpha=budget.lora_alpha, seed=seed * 1000)
    steps = budget.steps * len(tasks)
    optim = OptimConfig(
        lr=budget.lr_lora,
        lr_scheduler=LrScheduler(budget.lr_scheduler),
        warmup_ratio=budget.warmup_ratio,
        max_grad_norm=budget.max_grad_norm,
        weight_decay=budget.weight_decay,
    )

    def progress(step: int, metrics: dict[str, float]) -> None:
        log(f"{method.name} seed {seed} step {step}/{steps} loss {metrics['loss']:.3f} lr {metrics.get('lr', 0):.2g}")

    trained = train(
        model,
        _mixed_batches(tasks, heads, tokenizer, budget, seed * 1000),
        steps=steps,
        optim=optim,
        log_every=max(steps // 8, 1),
        on_metrics=progress,
        seed=seed * 1000,
    )
    final = []
    for i, task in enumerate(tasks):
        heads.rows = i
        final.append(
            evaluate(model, task.eval, tokenizer, budget.eval_batch_size, max_length=budget.max_length)["accuracy"]
        )
    T = len(tasks)
    # Trained once, on everything: only the final row exists, and it is also each task's just-trained accuracy.
    result.R = [[math.nan] * T for _ in range(T - 1)] + [final]
    result.just_trained = list(final)
    lora = adapter_parameters(model.trained_adapter())
    head_sizes = [sum(p.numel() for p in h.parameters()) for h in heads.heads]
    result.trained_params_per_task = [lora + h for h in head_sizes]
    result.stored_params = lora + sum(head_sizes)
    result.stored_params_without_heads = lora
    result.stored_bytes = 4 * result.stored_params
    result.extra = {"trainable_params_total": trained.trainable_params, "total_steps": steps}
    log(f"{method.name} seed {seed}: final {fmt_row(final)}")
    result.wall_time_s = time.perf_counter() - start
    return result.finish()
