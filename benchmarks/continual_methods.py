"""The adapter methods of the continual benchmark, trained through the workers' own loop.

Every method trains with ``workers.task.train_task`` (the step Ray workers run) on a fresh copy of
the pretrained model, task after task, and evaluates every task seen so far after each one (a row of
``R``). Tasks may have different label counts: the head template is resized before each task, and
each task's own head is stored with it (``share.head.TaskHead`` serves heads of any width).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from benchmarks.continual_config import TARGETS, Budget, Method, MethodKind
from benchmarks.continual_data import TaskData
from benchmarks.continual_store import MethodResult
from share import KPolicy, LoraAdapter, MergeReport, ShareModel, Subspace, merge
from share.config import TrainingMode
from workers.models import DEFAULT_BUILDER, HEAD_MODULE, build_share_model
from workers.task import TaskSpec, evaluate_tasks, train_task

if TYPE_CHECKING:
    from benchmarks.continual_llm import LlmBudget

# Large enough that a merge keeps every direction: where a method stores adapters exactly.
EXACT = KPolicy(k=100_000)


def log(message: str) -> None:
    print(f"[continual] {message}", file=sys.stderr, flush=True)


def fmt_row(row: list[float]) -> str:
    return "[" + " ".join("  -  " if math.isnan(v) else f"{v:.3f}" for v in row) + "]"


def task_spec(budget: Budget | LlmBudget, name: str, mode: TrainingMode, seed: int, index: int) -> TaskSpec:
    """What ``train_task`` gets for task ``index`` of seed ``seed`` in ``mode``: the budget's settings, the
    LoRA or the coefficients learning rate, and a seed of its own (``seed * 1000 + index``)."""
    b = budget
    return TaskSpec(
        name=name,
        mode=mode,
        steps=b.steps,
        lr=b.lr_lora if mode is TrainingMode.LORA else b.lr_coefficients,
        lora_lr=None,  # ``lr`` above is already the one for this mode
        batch_size=b.batch_size,
        max_length=b.max_length,
        weight_decay=b.weight_decay,
        seed=seed * 1000 + index,
        r=b.r,
        lora_alpha=b.lora_alpha,
        p=b.p,
        phi=b.phi,
        log_every=max(b.steps // 4, 1),
        eval_batch_size=b.eval_batch_size,
        lr_scheduler=b.lr_scheduler,  # type: ignore[arg-type]  # a name; TaskSpec checks it
        warmup_ratio=b.warmup_ratio,
        max_grad_norm=b.max_grad_norm,
    )


def resize_head(model: ShareModel, num_labels: int) -> None:
    """Make the head template output ``num_labels`` classes, so the next task's fresh head fits its labels."""
    head = model.heads[HEAD_MODULE]
    template = head.template
    if isinstance(template, nn.Linear) and template.out_features == num_labels:
        return
    new = nn.Linear(template.in_features, num_labels)
    new.requires_grad_(False)
    head.template = new


def adapter_parameters(adapter: LoraAdapter) -> int:
    return sum(B.numel() + A.numel() for B, A in adapter.factors.values())


def head_parameters(head: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in head.values())


class SeedRun:
    """One seed over the task sequence: each method gets the same data, steps and seeds."""

    def __init__(self, tasks: list[TaskData], seed: int, budget: Budget) -> None:
        self.tasks = tasks
        self.names = [t.name for t in tasks]
        self.seed = seed
        self.budget = budget

    # -- shared pieces -------------------------------------------------------------------------
    def model(self) -> tuple[ShareModel, Any]:
        # The workers' own model builder: the bundled all-MiniLM-L6-v2 with its per-task head, on CPU.
        return build_share_model(DEFAULT_BUILDER, None, TARGETS, self.tasks[0].num_labels, self.seed, "cpu")

    def train(
        self, model: ShareModel, tok: Any, method: str, index: int, mode: TrainingMode, init: LoraAdapter | None = None
    ):
        task = self.tasks[index]
        resize_head(model, task.num_labels)
        spec = task_spec(self.budget, task.name, mode, self.seed, index)
        where = f"{method} seed {self.seed} task {index + 1}/{len(self.tasks)} {task.name} ({mode.value})"

        def progress(step: int, metrics: dict[str, float]) -> None:
            log(
                f"{where} step {step}/{spec.steps} loss {metrics['loss']:.3f} lr {metrics.get('lr', spec.lr):.2g} "
                f"{metrics['elapsed_s']:.0f} s"
            )

        return train_task(model, spec, task.train, tok, task.eval, on_metrics=progress, init=init)

    def evaluate(self, model: ShareModel, tok: Any, upto: int) -> list[float]:
        """Row ``upto`` of R: every stored task so far, NaN for the tasks still to come."""
        splits = {t.name: t.eval for t in self.tasks[: upto + 1]}
        acc = evaluate_tasks(
            model, splits, tok, batch_size=self.budget.eval_batch_size, max_length=self.budget.max_length
        )
        return [acc[name] for name in self.names[: upto + 1]] + [math.nan] * (len(self.names) - upto - 1)

    def result(self, method: Method) -> MethodResult:
        return MethodResult(
            method.name, self.seed, list(self.names), [], [], hyper=self.budget.hyper(method, len(self.tasks))
        )

    @staticmethod
    def store_subspace(result: MethodResult, subspace: Subspace) -> None:
        counts = subspace.num_parameters()
        result.stored_params = counts["total"]
        result.stored_params_without_heads = counts["bases"] + counts["coefficients"]
        result.stored_bytes = 4 * counts["total"]

    # -- methods -------------------------------------------------------------------------------
    def share(self, method: Method) -> MethodResult:
        """Continual Share: LoRA cold start, then coefficients against the frozen bases; merge after each task."""
        assert method.kind is MethodKind.SHARE and method.policy is not None
        start = time.perf_counter()
        model, tok = self.model()
        result = self.result(method)
        subspace: Subspace | None = None
        merges = []
        for i, name in enumerate(self.names):
            mode = TrainingMode.LORA if subspace is None else TrainingMode.COEFFICIENTS
            trained = self.train(model, tok, method.name, i, mode)
            result.just_trained.append(trained.eval_metrics["accuracy"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            subspace, report = merge(subspace, {name: trained.adapter}, method.policy)
            merges.append(merge_summary(report, name))
            model.load_subspace(subspace)
            result.R.append(self.evaluate(model, tok, i))
            log(
                f"{method.name} seed {self.seed}: {name} just trained {result.just_trained[-1]:.3f}, after merge "
                f"{fmt_row(result.R[-1])} k {merges[-1]['k_min']}-{merges[-1]['k_max']}, "
                f"worst error bound {merges[-1]['max_error_bound']:.3f}"
            )
        assert subspace is not None
        self.store_subspace(result, subspace)
        result.extra = subspace_summary(subspace, report) | {"merges": merges}
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_seq(self, method: Method) -> MethodResult:
        """One LoRA adapter finetuned task after task; each task keeps its own head."""
        start = time.perf_counter()
        model, tok = self.model()
        result = self.result(method)
        current: LoraAdapter | None = None
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self.names):
            trained = self.train(model, tok, method.name, i, TrainingMode.LORA, init=current)
            current = trained.adapter
            heads[name] = current.head
            result.just_trained.append(trained.eval_metrics["accuracy"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            # Every task so far: the one shared adapter with that task's head, stored exactly.
            shared = {n: LoraAdapter(current.factors, current.scaling, heads[n]) for n in self.names[: i + 1]}
            model.load_subspace(merge(None, shared, EXACT)[0])
            result.R.append(self.evaluate(model, tok, i))
            log(
                f"{method.name} seed {self.seed}: {name} just trained {result.just_trained[-1]:.3f}, "
                f"row {fmt_row(result.R[-1])}"
            )
        assert current is not None
        adapter = adapter_parameters(current)
        result.stored_params = adapter + sum(head_parameters(h) for h in heads.values())
        result.stored_params_without_heads = adapter
        result.stored_bytes = 4 * result.stored_params
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_per_task(self, per_task_method: Method, full_method: Method) -> tuple[MethodResult, MethodResult]:
        """A separate adapter per task; ``share-full`` compresses the same adapters (no retraining).

        Separate adapters never change after training, so ``lora-per-task``'s rows are one evaluation
        of the final stored adapters (row ``i`` holds tasks ``0..i``); ``share-full`` evaluates the
        compression of the first ``i + 1`` adapters after each task.
        """
        start = time.perf_counter()
        model, tok = self.model()
        per_task, full = self.result(per_task_method), self.result(full_method)
        adapters: dict[str, LoraAdapter] = {}
        compress_s = 0.0
        report: MergeReport | None = None
        compressed: Subspace | None = None
        for i, name in enumerate(self.names):
            trained = self.train(model, tok, per_task_method.name, i, TrainingMode.LORA)
            adapters[name] = trained.adapter
            for r in (per_task, full):
                r.just_trained.append(trained.eval_metrics["accuracy"])
                r.trained_params_per_task.append(trained.result.trainable_params)
            t0 = time.perf_counter()
            compressed, report = merge(None, dict(adapters), full_method.policy)
            compress_s += time.perf_counter() - t0
            model.load_subspace(compressed)
            full.R.append(self.evaluate(model, tok, i))
            log(
                f"{per_task_method.name} seed {self.seed}: {name} just trained {per_task.just_trained[-1]:.3f}; "
                f"{full_method.name} row {fmt_row(full.R[-1])}"
            )
        assert compressed is not None and report is not None
        stored = merge(None, adapters, EXACT)[0]
        model.load_subspace(stored)
        final = self.evaluate(model, tok, len(self.names) - 1)
        per_task.R = [final[: i + 1] + [math.nan] * (len(final) - i - 1) for i in range(len(final))]
        adapter = sum(adapter_parameters(a) for a in adapters.values())
        per_task.stored_params = adapter + sum(head_parameters(a.head) for a in adapters.values())
        per_task.stored_params_without_heads = adapter
        per_task.stored_bytes = 4 * per_task.stored_params
        self.store_subspace(full, compressed)
        full.extra = subspace_summary(compressed, report)
        elapsed = time.perf_counter() - start
        per_task.wall_time_s = elapsed - compress_s
        full.wall_time_s = elapsed  # its adapters had to be trained first
        return per_task.finish(), full.finish()


def merge_summary(report: MergeReport, task: str) -> dict[str, Any]:
    """One merge in numbers: k range, the new task's own error, the worst cumulative bound, tasks over eps."""
    ks = [v for pair in report.k.values() for v in pair]
    return {
        "task": task,
        "k_min": min(ks),
        "k_max": max(ks),
        "new_task_error": report.reconstruction_error.get(task, 0.0),
        "max_error_bound": max(report.error_bound.values(), default=0.0),
        "over_bound": dict(report.over_bound),
        "capped_modules": list(report.capped_modules),
    }


def subspace_summary(subspace: Subspace, report: MergeReport) -> dict[str, Any]:
    """After the last merge: k per module, and every task's error bound, drift bound and energy kept."""
    return {
        "k": {m: list(k) for m, k in subspace.k().items()},
        "max_error_bound": max(report.error_bound.values(), default=0.0),
        "max_drift_bound": max(report.drift_bound.values(), default=0.0),
        "min_energy_kept": min(report.energy_kept.values(), default=1.0),
        "error_bound": dict(report.error_bound),
        "drift_bound": dict(report.drift_bound),
        "energy_kept": dict(report.energy_kept),
        "over_bound": dict(report.over_bound),
        "capped_modules": list(report.capped_modules),
    }
