"""``head-only``: the frozen encoder with a linear head per task (a linear probe).

The frozen model's mean-pooled embeddings are computed once per task (and cached on disk, keyed by
the texts and ``max_length``), so the probe trains in seconds. Its learning rate is chosen per task
on a small grid against a validation split carved from that task's TRAIN data (never eval); the
probe is then retrained on all of the train split at the chosen rate. Training goes through the
workers' loop (``workers.train.train``: same optimizer, schedule and clipping as every method).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.continual_config import Budget, Method
from benchmarks.continual_data import TaskData
from benchmarks.continual_methods import log
from benchmarks.continual_store import MethodResult
from workers.data import TaskSplit, iter_batches
from workers.models import build_text_classifier, default_model_path
from workers.train import LrScheduler, OptimConfig, configure_threads, train


class Probe(nn.Module):
    """A linear head over precomputed embeddings.

    The training loop calls ``model(input_ids=..., attention_mask=...)``; for the probe the batch's
    ``input_ids`` entry carries the embeddings (``n x hidden``) and the mask is unused.
    """

    def __init__(self, hidden: int, num_labels: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.linear(input_ids)


class EmbeddingCache:
    """Pooled embeddings of the frozen encoder per split, in memory and under ``folder``."""

    def __init__(self, folder: Path, max_length: int, batch_size: int) -> None:
        self.folder = folder
        self.max_length = max_length
        self.batch_size = batch_size
        self._memory: dict[str, Tensor] = {}
        self._model = None
        self._tokenizer = None

    def _key(self, split: TaskSplit) -> str:
        digest = hashlib.sha256(f"{default_model_path().name}\0{self.max_length}\0".encode())
        for text in split.texts:
            digest.update(text.encode() + b"\0")
        return digest.hexdigest()[:24]

    def get(self, split: TaskSplit) -> Tensor:
        key = self._key(split)
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{key}.pt"
        if path.is_file():
            embeddings = torch.load(path)
        else:
            embeddings = self._embed(split)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes may fill the cache together
            torch.save(embeddings, tmp)
            tmp.replace(path)
        self._memory[key] = embeddings
        return embeddings

    def _embed(self, split: TaskSplit) -> Tensor:
        if self._model is None:
            model, self._tokenizer = build_text_classifier(None, 2, seed=0)
            model.head = nn.Identity()  # the classifier's forward then returns the mean-pooled embedding
            self._model = model.eval()
        configure_threads()
        chunks = []
        with torch.no_grad():
            for batch in iter_batches(split, self._tokenizer, self.batch_size, False, 0, self.max_length):
                chunks.append(self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        return torch.cat(chunks)


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int):
    def one_pass(epoch: int) -> Iterator[dict[str, Tensor]]:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield {"input_ids": x[idx], "attention_mask": torch.ones(len(idx), 1), "labels": y[idx]}

    return one_pass


def _fit(x: Tensor, y: Tensor, num_labels: int, lr: float, budget: Budget, seed: int) -> Probe:
    probe = Probe(x.shape[1], num_labels, seed)
    optim = OptimConfig(
        lr=lr,
        lr_scheduler=LrScheduler(budget.lr_scheduler),
        warmup_ratio=budget.warmup_ratio,
        max_grad_norm=budget.max_grad_norm,
        weight_decay=budget.weight_decay,
    )
    train(
        probe,
        _batches(x, y, budget.batch_size, seed),
        steps=budget.steps,
        optim=optim,
        log_every=0,
        on_metrics=lambda step, metrics: None,
        seed=seed,
    )
    return probe.eval()


def _accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((probe(x, x.new_ones(len(y), 1)).argmax(dim=-1) == y).float().mean())


def head_only(tasks: list[TaskData], seed: int, budget: Budget, method: Method, cache: EmbeddingCache) -> MethodResult:
    start = time.perf_counter()
    names = [t.name for t in tasks]
    result = MethodResult(method.name, seed, names, [], [], hyper=budget.hyper(method, len(tasks)))
    chosen: dict[str, float] = {}
    validation: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        x_train, y_train = cache.get(task.train), task.train.labels
        x_eval, y_eval = cache.get(task.eval), task.eval.labels
        task_seed = seed * 1000 + i
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(task_seed))
        n_val = max(1, round(budget.validation_fraction * len(order)))
        val, fit = order[:n_val], order[n_val:]
        scores = {}
        for lr in budget.head_lr_grid:
            probe = _fit(x_train[fit], y_train[fit], task.num_labels, lr, budget, task_seed)
            scores[lr] = _accuracy(probe, x_train[val], y_train[val])
        best = max(budget.head_lr_grid, key=lambda lr: scores[lr])  # the first (smallest) lr among ties
        probe = _fit(x_train, y_train, task.num_labels, best, budget, task_seed)
        accuracy = _accuracy(probe, x_eval, y_eval)
        chosen[task.name] = best
        validation[task.name] = {f"{lr:g}": scores[lr] for lr in budget.head_lr_grid}
        result.just_trained.append(accuracy)
        result.trained_params_per_task.append(sum(p.numel() for p in probe.parameters()))
        log(
            f"{method.name} seed {seed}: {task.name} lr {best:g} (validation "
            f"{', '.join(f'{lr:g}: {s:.3f}' for lr, s in scores.items())}) -> eval {accuracy:.3f}"
        )
    # The encoder never changes and each head is its task's own: after task i, tasks 0..i keep their accuracy.
    T = len(tasks)
    result.R = [result.just_trained[: i + 1] + [math.nan] * (T - i - 1) for i in range(T)]
    result.stored_params = sum(result.trained_params_per_task)
    result.stored_params_without_heads = 0
    result.stored_bytes = 4 * result.stored_params
    result.extra = {"chosen_lr": chosen, "validation_accuracy": validation}
    result.wall_time_s = time.perf_counter() - start
    return result.finish()
