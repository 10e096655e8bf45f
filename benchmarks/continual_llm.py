"""The continual benchmark on any local causal LM: instruction tasks one after another, scored by ROUGE-L.

Methods (``--methods``), as in ``benchmarks.continual`` and trained with the workers' ``train_task``:

- ``share``: task 1 trains LoRA and initializes the subspace; each later task trains coefficients +
  ``phi`` temporary directions, merged before the next starts (KPolicy max_error, the default).
- ``share-variance``: the same with the paper's rule, 60% explained variance.
- ``lora-seq``: one LoRA adapter finetuned task after task.
- ``lora-per-task``: a separate LoRA adapter per task (no forgetting by construction).
- ``share-full``: the per-task adapters compressed into one subspace, no retraining (comes with lora-per-task).

``R[i][j]`` is the ROUGE-L (F-measure, 0..1) of task ``j`` after task ``i``, by greedy generation on the
task's eval split; exact match goes beside it (``extra.exact_match``). ACC, BWT and merge loss are
computed on ROUGE-L as ``benchmarks.cl_metrics`` does on accuracy.

Data: ``--data DIR`` with ``tasks.json`` (``{"tasks": [{"name", "train", "eval"}, ...]}``, split paths
relative to DIR) and instruction splits (``workers.instruction_data``: prompt, response, task).

On CPU, end to end on a tiny random Llama and synthetic string tasks (about 2 minutes)::

    python -m tests.llm_fixtures --out benchmarks/data/tiny-llm
    python -m benchmarks.continual_llm --model benchmarks/data/tiny-llm/model --data benchmarks/data/tiny-llm/tasks \\
        --steps 200 --lr-lora 1e-2 --lr-coefficients 1e-2 --max-length 32 --threads 1

On a GPU machine, a real model (downloaded beforehand; nothing is fetched at run time)::

    python -m benchmarks.continual_llm --model models/qwen2.5-0.5b --data my-tasks --device cuda \\
        --dtype bfloat16 --steps 500 --batch-size 16 --max-length 512 --lr-lora 2e-4 --lr-coefficients 1e-3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.continual_config import METHODS, Method, MethodKind, policy_text
from benchmarks.continual_data import fingerprint, read_manifest, select
from benchmarks.continual_methods import (
    EXACT,
    adapter_parameters,
    fmt_row,
    merge_summary,
    subspace_summary,
    task_spec,
)
from benchmarks.continual_report import per_task_table, summary_table
from benchmarks.continual_store import MethodResult, write_json_atomic
from jobs.schema import AdapterConfig, TrainingConfig
from share import LoraAdapter, ShareModel, Subspace, merge
from share.config import TrainingMode
from share.errors import ShareClError
from workers.causal_lm import DEFAULT_TARGETS, ModelDtype, build_causal_lm
from workers.generation import evaluate_generation
from workers.instruction_data import InstructionSplit, load_instruction_split
from workers.task import train_task

LLM_METHODS = ("share", "share-variance", "lora-seq", "lora-per-task", "share-full")
_ADAPTER, _TRAINING = AdapterConfig(), TrainingConfig()


def log(message: str) -> None:
    print(f"[continual-llm] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LlmBudget:
    """What every method gets: steps, batch, tokens, learning rates; adapter settings from the job schema."""

    steps: int = 200
    batch_size: int = 16
    max_length: int = 128
    lr_lora: float = 2e-4
    lr_coefficients: float = 1e-3
    eval_batch_size: int = 32
    max_eval: int | None = None  # eval rows per task (None: all)
    r: int = _ADAPTER.r
    lora_alpha: float = _ADAPTER.lora_alpha
    phi: int = _ADAPTER.phi
    lr_scheduler: str = _TRAINING.lr_scheduler
    warmup_ratio: float = _TRAINING.warmup_ratio
    max_grad_norm: float | None = _TRAINING.max_grad_norm

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.max_length < 2:
            raise ShareClError("--steps, --batch-size, --eval-batch-size must be >= 1 and --max-length >= 2")
        if min(self.lr_lora, self.lr_coefficients) <= 0:
            raise ShareClError("--lr-lora and --lr-coefficients must be > 0")

    @property
    def p(self) -> int:
        return _ADAPTER.p if _ADAPTER.p is not None else self.r

    @property
    def weight_decay(self) -> float:
        """The job schema's default, not a setting here (a property: it stays out of ``hyper`` and results' keys)."""
        return _TRAINING.weight_decay

    def hyper(self, method: Method) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self).items() if k not in ("max_eval",)}
        if method.kind is not MethodKind.SHARE:
            settings.pop("lr_coefficients")
        if method.policy is not None:
            settings["policy"] = policy_text(method.policy)
        return settings


@dataclass(frozen=True)
class ModelChoice:
    path: str
    targets: tuple[str, ...] = DEFAULT_TARGETS
    device: str = "cpu"
    dtype: ModelDtype = ModelDtype.FLOAT32
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class LlmTask:
    name: str
    train: InstructionSplit
    eval: InstructionSplit


class LlmRun:
    """One seed over the task sequence; every method starts from a freshly loaded base model."""

    def __init__(self, tasks: list[LlmTask], seed: int, budget: LlmBudget, choice: ModelChoice) -> None:
        self.tasks, self.seed, self.budget, self.choice = tasks, seed, budget, choice
        self.names = [t.name for t in tasks]

    def model(self) -> tuple[ShareModel, Any]:
        c = self.choice
        base, tokenizer = build_causal_lm(c.path, dtype=c.dtype, gradient_checkpointing=c.gradient_checkpointing)
        return ShareModel(base.to(c.device), list(c.targets)), tokenizer

    def train(self, model: ShareModel, tok: Any, method: str, index: int, mode: TrainingMode, init=None):
        task = self.tasks[index]
        spec = task_spec(self.budget, task.name, mode, self.seed, index)
        where = f"{method} seed {self.seed} task {index + 1}/{len(self.tasks)} {task.name} ({mode.value})"

        def progress(step: int, metrics: dict[str, float]) -> None:
            log(f"{where} step {step}/{spec.steps} loss {metrics['loss']:.3f} {metrics['elapsed_s']:.0f} s")

        return train_task(model, spec, task.train, tok, task.eval, on_metrics=progress, init=init)

    def evaluate(self, model: ShareModel, tok: Any, upto: int, stored: bool = True) -> tuple[list[float], list[float]]:
        """Row ``upto`` of R (ROUGE-L) and of exact match; ``stored`` selects each task in the loaded
        subspace, else the model serves as it is (the adapter in training)."""
        rouge, exact = [], []
        for task in self.tasks[: upto + 1]:
            m = evaluate_generation(
                model,
                task.eval,
                tok,
                self.budget.eval_batch_size,
                max_length=self.budget.max_length,
                task=task.name if stored else None,
            )
            rouge.append(m["rougeL"])
            exact.append(m["exact_match"])
        pad = [math.nan] * (len(self.tasks) - upto - 1)
        return rouge + pad, exact + pad

    def result(self, method: Method) -> MethodResult:
        return MethodResult(method.name, self.seed, list(self.names), [], [], hyper=self.budget.hyper(method))

    # -- methods -------------------------------------------------------------------------------
    def share(self, method: Method) -> MethodResult:
        assert method.policy is not None
        start = time.perf_counter()
        model, tok = self.model()
        result, exact, merges = self.result(method), [], []
        subspace: Subspace | None = None
        report = None
        for i, name in enumerate(self.names):
            mode = TrainingMode.LORA if subspace is None else TrainingMode.COEFFICIENTS
            trained = self.train(model, tok, method.name, i, mode)
            result.just_trained.append(trained.eval_metrics["rougeL"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            subspace, report = merge(subspace, {name: trained.adapter}, method.policy)
            merges.append(merge_summary(report, name))
            model.load_subspace(subspace)
            row, em = self.evaluate(model, tok, i)
            result.R.append(row)
            exact.append(em)
            log(f"{method.name}: {name} just trained {result.just_trained[-1]:.3f}, after merge {fmt_row(row)}")
        assert subspace is not None and report is not None
        counts = subspace.num_parameters()
        result.stored_params = result.stored_params_without_heads = counts["total"]
        result.stored_bytes = 4 * counts["total"]
        result.extra = subspace_summary(subspace, report) | {"merges": merges, "exact_match": exact}
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_seq(self, method: Method) -> MethodResult:
        start = time.perf_counter()
        model, tok = self.model()
        result, exact = self.result(method), []
        current: LoraAdapter | None = None
        for i, _name in enumerate(self.names):
            trained = self.train(model, tok, method.name, i, TrainingMode.LORA, init=current)
            current = trained.adapter
            result.just_trained.append(trained.eval_metrics["rougeL"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            row, em = self.evaluate(model, tok, i, stored=False)  # the one adapter serves every task
            result.R.append(row)
            exact.append(em)
            log(f"{method.name}: {self.names[i]} row {fmt_row(row)}")
        assert current is not None
        result.stored_params = result.stored_params_without_heads = adapter_parameters(current)
        result.stored_bytes = 4 * result.stored_params
        result.extra = {"exact_match": exact}
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_per_task(self, per_task_method: Method, full_method: Method) -> tuple[MethodResult, MethodResult]:
        """Separate adapters (stored exactly) and ``share-full``: the same adapters compressed after each task."""
        start = time.perf_counter()
        model, tok = self.model()
        per_task, full = self.result(per_task_method), self.result(full_method)
        exact_full: list[list[float]] = []
        adapters: dict[str, LoraAdapter] = {}
        compressed, report = None, None
        for i, name in enumerate(self.names):
            trained = self.train(model, tok, per_task_method.name, i, TrainingMode.LORA)
            adapters[name] = trained.adapter
            for r in (per_task, full):
                r.just_trained.append(trained.eval_metrics["rougeL"])
                r.trained_params_per_task.append(trained.result.trainable_params)
            compressed, report = merge(None, dict(adapters), full_method.policy)
            model.load_subspace(compressed)
            row, em = self.evaluate(model, tok, i)
            full.R.append(row)
            exact_full.append(em)
            log(f"{full_method.name}: {name} row {fmt_row(row)}")
        assert compressed is not None and report is not None
        model.load_subspace(merge(None, adapters, EXACT)[0])
        final, final_em = self.evaluate(model, tok, len(self.names) - 1)
        n = len(final)
        per_task.R = [final[: i + 1] + [math.nan] * (n - i - 1) for i in range(n)]
        per_task.extra = {"exact_match": [final_em[: i + 1] + [math.nan] * (n - i - 1) for i in range(n)]}
        per_task.stored_params = per_task.stored_params_without_heads = sum(map(adapter_parameters, adapters.values()))
        per_task.stored_bytes = 4 * per_task.stored_params
        counts = compressed.num_parameters()
        full.stored_params = full.stored_params_without_heads = counts["total"]
        full.stored_bytes = 4 * counts["total"]
        full.extra = subspace_summary(compressed, report) | {"exact_match": exact_full}
        per_task.wall_time_s = full.wall_time_s = time.perf_counter() - start
        return per_task.finish(), full.finish()

    def run(self, methods: list[Method]) -> list[MethodResult]:
        results: list[MethodResult] = []
        names = {m.name for m in methods}
        for method in methods:
            if method.kind is MethodKind.SHARE:
                results.append(self.share(method))
            elif method.kind is MethodKind.LORA_SEQ:
                results.append(self.lora_seq(method))
        if names & {"lora-per-task", "share-full"}:
            per_task, full = self.lora_per_task(METHODS["lora-per-task"], METHODS["share-full"])
            results += [r for r in (per_task, full) if r.method in names]
        return results


def load_llm_tasks(folder: Path, num_tasks: int | None, max_eval: int | None) -> tuple[list[LlmTask], str]:
    """The manifest's tasks (the first ``num_tasks``), eval splits cut to ``max_eval`` rows; and the data key."""
    entries = select(read_manifest(folder), num_tasks, reverse=False)
    tasks = []
    for entry in entries:
        train, evaluation = load_instruction_split(entry.train), load_instruction_split(entry.eval)
        if max_eval is not None:
            evaluation = InstructionSplit(
                evaluation.prompts[:max_eval], evaluation.responses[:max_eval], evaluation.task
            )
        tasks.append(LlmTask(entry.name, train, evaluation))
    return tasks, fingerprint(entries)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.continual_llm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="a local causal-LM folder (config, weights, tokenizer)")
    p.add_argument("--data", type=Path, required=True, help="an instruction-task folder with tasks.json")
    p.add_argument("--methods", nargs="+", default=["share", "lora-seq", "lora-per-task", "share-full"])
    p.add_argument("--num-tasks", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=LlmBudget.steps)
    p.add_argument("--batch-size", type=int, default=LlmBudget.batch_size)
    p.add_argument("--max-length", type=int, default=LlmBudget.max_length, help="prompt + response tokens")
    p.add_argument("--lr-lora", type=float, default=LlmBudget.lr_lora)
    p.add_argument("--lr-coefficients", type=float, default=LlmBudget.lr_coefficients)
    p.add_argument("--eval-batch-size", type=int, default=LlmBudget.eval_batch_size)
    p.add_argument("--max-eval", type=int, default=None, help="eval rows per task (default: all)")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), help="adapted modules")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", help="base weights: float32, bfloat16 or float16")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all allowed)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--label", default=None, help="run name (default: the data folder's name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except ShareClError as err:
        print(f"continual_llm: error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    import torch

    started = time.perf_counter()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # workers.train.configure_threads keeps it
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods if m not in LLM_METHODS]
    if unknown:
        raise ShareClError(f"--methods: unknown {unknown}; choose from {', '.join(LLM_METHODS)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    choice = ModelChoice(
        str(args.model), tuple(args.targets), device, ModelDtype.parse(args.dtype), args.gradient_checkpointing
    )
    budget = LlmBudget(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr_lora=args.lr_lora,
        lr_coefficients=args.lr_coefficients,
        eval_batch_size=args.eval_batch_size,
        max_eval=args.max_eval,
    )
    tasks, data_key = load_llm_tasks(args.data, args.num_tasks, args.max_eval)
    methods = [METHODS[m] for m in args.methods]
    label = args.label or args.data.name
    log(f"{label}: {len(tasks)} tasks ({', '.join(t.name for t in tasks)}) on {args.model} ({device}, {choice.dtype})")
    results = []
    for seed in args.seeds:
        results += LlmRun(tasks, seed, budget, choice).run(methods)
    path = args.out / f"continual-llm-{label}.json"
    write_json_atomic(
        path,
        {
            "model": str(args.model),
            "data": str(args.data),
            "data_key": data_key,
            "device": device,
            "dtype": choice.dtype.value,
            "budget": asdict(budget),
            "results": [r.to_json() for r in results],
        },
    )
    print(f"continual-llm {label}: {len(tasks)} tasks, {args.model}, scores are ROUGE-L (points)\n")
    print(summary_table(results))
    table = per_task_table(results, methods=("lora-per-task", "share", "lora-seq"))
    if table:
        print("\nFinal ROUGE-L per task (points):\n\n" + table)
    print(f"\nwritten: {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
