"""Does Share forget less? A continual-learning benchmark on real data through real all-MiniLM-L6-v2.

Methods, on the same tasks, seeds and budget (ARCHITECTURE.md section 1):

- ``share``: task 1 trains a LoRA adapter and initializes the subspace from it; each later task trains
  only coefficients + ``phi`` temporary directions + its head, and is merged before the next starts.
- ``lora-seq``: one LoRA adapter finetuned task after task (each task keeps its own head).
- ``lora-per-task``: a separate LoRA adapter per task (quality upper bound, storage baseline).
- ``share-full``: the per-task adapters compressed into one subspace (non-continual Share).

Training goes through ``workers.task.train_task``, the code path the Ray workers use; data is the
WordNet task sequence written to Parquet by ``benchmarks.data_wordnet``.

    python -m benchmarks.continual --quick          # 1 seed, fewer steps: < 10 min on 2 cores
    python -m benchmarks.continual                   # 3 seeds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.cl_metrics import backward_transfer, final_accuracy, mean_std
from benchmarks.data_wordnet import TaskPaths, prepare_wordnet_tasks
from benchmarks.results_md import command_line, write_section
from jobs.schema import AdapterConfig
from share import KPolicy, LoraAdapter, ShareModel, Subspace, merge
from workers.data import TaskSplit, load_split
from workers.models import build_text_classifier
from workers.task import TaskSpec, evaluate_tasks, train_task

HEADING = "## Continual learning"
METHODS = ("share", "lora-seq", "lora-per-task", "share-full")
TARGETS = ("query", "value")
# Large enough that a merge keeps every direction: used where a method stores adapters exactly.
_EXACT = KPolicy(k=100_000)
_JOB_ADAPTER = AdapterConfig()


@dataclass(frozen=True)
class Budget:
    steps: int = 150
    lr_lora: float = 1e-3
    lr_coefficients: float = 5e-3
    batch_size: int = 16
    max_length: int = 32
    # The adapter settings default to a job's (jobs/schema.py), so the benchmark measures what jobs run.
    r: int = _JOB_ADAPTER.r
    lora_alpha: float = _JOB_ADAPTER.lora_alpha
    phi: int = _JOB_ADAPTER.phi
    k: int | None = _JOB_ADAPTER.k
    variance: float = _JOB_ADAPTER.variance
    k_max: int | None = _JOB_ADAPTER.k_max

    @property
    def policy(self) -> KPolicy:
        return KPolicy(k=self.k, variance=self.variance, k_max=self.k_max)


@dataclass
class MethodResult:
    method: str
    seed: int
    tasks: list[str]
    R: list[list[float]]  # R[i][j]: accuracy on task j after task i (NaN for j > i)
    just_trained: list[float]  # accuracy on task j right after training it (before any merge)
    acc: float = 0.0
    bwt: float = 0.0
    trained_params_per_task: list[int] = field(default_factory=list)
    stored_params: int = 0
    stored_params_without_heads: int = 0
    stored_bytes: int = 0
    wall_time_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def finish(self) -> MethodResult:
        self.acc = final_accuracy(self.R)
        self.bwt = backward_transfer(self.R, self.just_trained)
        return self


def _log(message: str) -> None:
    print(f"[continual] {message}", file=sys.stderr, flush=True)


class Run:
    """One seed: loads the data once, trains each method on a fresh copy of the pretrained model."""

    def __init__(self, tasks: list[TaskPaths], seed: int, budget: Budget) -> None:
        self.tasks = tasks
        self.names = [t.name for t in tasks]
        self.seed = seed
        self.budget = budget
        self.train = {t.name: load_split(t.train) for t in tasks}
        self.eval = {t.name: load_split(t.eval) for t in tasks}

    def _model(self) -> tuple[ShareModel, object]:
        num_labels = {s.num_labels for s in self.train.values()}
        if len(num_labels) != 1:
            raise ValueError(f"tasks must share a label count for one model template, got {sorted(num_labels)}")
        model, tokenizer = build_text_classifier(None, num_labels.pop(), seed=self.seed)
        return ShareModel(model, list(TARGETS), heads=["head"]), tokenizer

    def _spec(self, task: str, mode: str, index: int) -> TaskSpec:
        b = self.budget
        return TaskSpec(
            name=task,
            mode=mode,  # type: ignore[arg-type]
            steps=b.steps,
            lr=b.lr_lora if mode == "lora" else b.lr_coefficients,
            batch_size=b.batch_size,
            max_length=b.max_length,
            seed=self.seed * 1000 + index,
            r=b.r,
            lora_alpha=b.lora_alpha,
            p=b.r,
            phi=b.phi,
            log_every=max(b.steps // 3, 1),
        )

    def _evaluate(self, model: ShareModel, tokenizer: object, upto: int) -> list[float]:
        splits: dict[str, TaskSplit] = {name: self.eval[name] for name in self.names[: upto + 1]}
        accuracy = evaluate_tasks(model, splits, tokenizer, batch_size=64, max_length=self.budget.max_length)
        return [accuracy[name] for name in self.names[: upto + 1]] + [math.nan] * (len(self.names) - upto - 1)

    # -- methods -------------------------------------------------------------------------------
    def share(self) -> MethodResult:
        start = time.perf_counter()
        model, tok = self._model()
        result = MethodResult("share", self.seed, self.names, [], [])
        subspace: Subspace | None = None
        errors = []
        for i, name in enumerate(self.names):
            mode = "lora" if subspace is None else "coefficients"
            trained = train_task(model, self._spec(name, mode, i), self.train[name], tok, self.eval[name])
            result.just_trained.append(trained.eval_metrics["accuracy"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            subspace, report = merge(subspace, {name: trained.adapter}, self.budget.policy)
            errors.append(report.reconstruction_error)
            model.load_subspace(subspace)
            result.R.append(self._evaluate(model, tok, i))
            _log(
                f"share seed {self.seed}: {name} ({mode}) acc {result.just_trained[-1]:.3f} -> merged "
                f"row {_fmt(result.R[-1])} k={_k_summary(report.k)}"
            )
        self._storage(result, subspace)
        result.extra = {"reconstruction_errors": errors, "k": {m: list(k) for m, k in subspace.k().items()}}
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_seq(self) -> MethodResult:
        start = time.perf_counter()
        model, tok = self._model()
        result = MethodResult("lora-seq", self.seed, self.names, [], [])
        current: LoraAdapter | None = None
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self.names):
            spec = self._spec(name, "lora", i)
            trained = train_task(model, spec, self.train[name], tok, self.eval[name], init=current)
            current = trained.adapter
            heads[name] = current.head
            result.just_trained.append(trained.eval_metrics["accuracy"])
            result.trained_params_per_task.append(trained.result.trainable_params)
            # Every task so far: the one shared adapter with that task's head, stored exactly.
            shared = {n: LoraAdapter(current.factors, current.scaling, heads[n]) for n in self.names[: i + 1]}
            model.load_subspace(merge(None, shared, _EXACT)[0])
            result.R.append(self._evaluate(model, tok, i))
            _log(f"lora-seq seed {self.seed}: {name} acc {result.just_trained[-1]:.3f} row {_fmt(result.R[-1])}")
        adapter_params = sum(B.numel() + A.numel() for B, A in current.factors.values())
        head_params = sum(v.numel() for h in heads.values() for v in h.values())
        result.stored_params = adapter_params + head_params
        result.stored_params_without_heads = adapter_params
        result.stored_bytes = 4 * result.stored_params
        result.wall_time_s = time.perf_counter() - start
        return result.finish()

    def lora_per_task(self) -> tuple[MethodResult, MethodResult]:
        """Trains one adapter per task; ``share-full`` compresses the same adapters (no retraining)."""
        start = time.perf_counter()
        model, tok = self._model()
        per_task = MethodResult("lora-per-task", self.seed, self.names, [], [])
        full = MethodResult("share-full", self.seed, self.names, [], [])
        adapters: dict[str, LoraAdapter] = {}
        compress_s = 0.0
        for i, name in enumerate(self.names):
            trained = train_task(model, self._spec(name, "lora", i), self.train[name], tok, self.eval[name])
            adapters[name] = trained.adapter
            for result in (per_task, full):
                result.just_trained.append(trained.eval_metrics["accuracy"])
                result.trained_params_per_task.append(trained.result.trainable_params)
            model.load_subspace(merge(None, adapters, _EXACT)[0])
            per_task.R.append(self._evaluate(model, tok, i))
            t0 = time.perf_counter()
            compressed, report = merge(None, adapters, self.budget.policy)
            compress_s += time.perf_counter() - t0
            model.load_subspace(compressed)
            full.R.append(self._evaluate(model, tok, i))
            _log(
                f"lora-per-task seed {self.seed}: {name} acc {per_task.just_trained[-1]:.3f}; "
                f"share-full row {_fmt(full.R[-1])} k={_k_summary(report.k)}"
            )
        adapter_params = sum(B.numel() + A.numel() for a in adapters.values() for B, A in a.factors.values())
        head_params = sum(v.numel() for a in adapters.values() for v in a.head.values())
        per_task.stored_params = adapter_params + head_params
        per_task.stored_params_without_heads = adapter_params
        per_task.stored_bytes = 4 * per_task.stored_params
        self._storage(full, compressed)
        full.extra = {
            "reconstruction_errors": report.reconstruction_error,
            "k": {m: list(k) for m, k in report.k.items()},
        }
        elapsed = time.perf_counter() - start
        per_task.wall_time_s = elapsed - compress_s
        full.wall_time_s = elapsed  # its adapters had to be trained first
        return per_task.finish(), full.finish()

    @staticmethod
    def _storage(result: MethodResult, subspace: Subspace) -> None:
        counts = subspace.num_parameters()
        result.stored_params = counts["total"]
        result.stored_params_without_heads = counts["bases"] + counts["coefficients"]
        result.stored_bytes = 4 * counts["total"]


def _fmt(row: list[float]) -> str:
    return "[" + " ".join("  -  " if math.isnan(v) else f"{v:.3f}" for v in row) + "]"


def _k_summary(k: dict[str, tuple[int, int]]) -> str:
    values = [v for pair in k.values() for v in pair]
    return f"{min(values)}-{max(values)}"


# -- outputs ---------------------------------------------------------------------------------------
def write_outputs(results: list[MethodResult], out_dir: Path, label: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / f"continual-{label}.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=2, allow_nan=True))
    written.append(path)
    path = out_dir / f"continual-{label}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "after_task", *results[0].tasks])
        for r in results:
            for i, row in enumerate(r.R):
                writer.writerow([r.method, r.seed, r.tasks[i], *("" if math.isnan(v) else f"{v:.4f}" for v in row)])
    written.append(path)
    for r in results:
        path = out_dir / f"continual-{label}-{r.method}-seed{r.seed}.png"
        plot_accuracy_matrix(r.R, r.tasks, f"{r.method} (seed {r.seed}): ACC {r.acc:.3f}, BWT {r.bwt:+.3f}", path)
        written.append(path)
    return written


def plot_accuracy_matrix(R: list[list[float]], tasks: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 1.5))
    image = ax.imshow([[math.nan if v is None else v for v in row] for row in R], vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(results: list[MethodResult]) -> str:
    lines = [
        "| method | ACC | BWT | params trained / task | params stored (no heads) | bytes stored | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results if r.method == method]
        if not rows:
            continue
        acc_m, acc_s = mean_std([100 * r.acc for r in rows])
        bwt_m, bwt_s = mean_std([100 * r.bwt for r in rows])
        trained = sum(sum(r.trained_params_per_task) / len(r.trained_params_per_task) for r in rows) / len(rows)
        stored = sum(r.stored_params_without_heads for r in rows) / len(rows)
        stored_bytes = sum(r.stored_bytes for r in rows) / len(rows)
        wall = sum(r.wall_time_s for r in rows) / len(rows)
        lines.append(
            f"| {method} | {acc_m:.1f} ± {acc_s:.1f} | {bwt_m:+.1f} ± {bwt_s:.1f} | {trained:,.0f} | {stored:,.0f} | "
            f"{stored_bytes:,.0f} | {wall:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 5 tasks, fewer steps and examples (< 10 min here)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--num-tasks", type=int, default=None, help="first N tasks (default: all 6; quick: 5)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--train-per-task", type=int, default=None)
    parser.add_argument("--eval-per-task", type=int, default=None)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--k", type=int, default=None, help="fixed k per module (default: by --variance)")
    parser.add_argument("--variance", type=float, default=Budget.variance)
    parser.add_argument("--k-max", type=int, default=Budget.k_max)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--write", action="store_true", help="replace the ## Continual learning section of RESULTS.md")
    args = parser.parse_args(argv)

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = args.steps or (40 if args.quick else 150)
    num_tasks = args.num_tasks or (5 if args.quick else None)
    train_n = args.train_per_task or (240 if args.quick else 400)
    eval_n = args.eval_per_task or (120 if args.quick else 200)
    budget = Budget(steps=steps, k=args.k, variance=args.variance, k_max=args.k_max)
    label = "quick" if args.quick else "full"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    data_dir = args.data / f"n{train_n}-{eval_n}"
    tasks = prepare_wordnet_tasks(data_dir, num_tasks=num_tasks, train_per_task=train_n, eval_per_task=eval_n)
    _log(f"{len(tasks)} tasks, seeds {seeds}, budget {budget}")

    results: list[MethodResult] = []
    for seed in seeds:
        run = Run(tasks, seed, budget)
        if "share" in args.methods:
            results.append(run.share())
        if "lora-seq" in args.methods:
            results.append(run.lora_seq())
        if {"lora-per-task", "share-full"} & set(args.methods):
            per_task, full = run.lora_per_task()
            results += [r for r in (per_task, full) if r.method in args.methods]
    total = time.perf_counter() - started
    written = write_outputs(results, args.out, label)
    table = summary_table(results)
    command = command_line("continual", argv)
    setup = (
        f"{len(tasks)} tasks x {len(seeds)} seed(s), {steps} steps/task, {train_n} train / {eval_n} eval examples "
        f"per task, r={budget.r}, phi={budget.phi}, k policy {budget.policy}; total wall time {total:.0f} s"
    )
    print(f"\n{setup}\n")
    print(table)
    print(f"\ncommand: {command}")
    print("written: " + ", ".join(str(p) for p in written))
    if args.write:
        write_section(
            HEADING,
            command,
            f"{setup}. Mean ± std over seeds; ACC and BWT in points; BWT against the accuracy right after training "
            "(before Share's merge). Per-seed matrices, JSON, CSV and heatmaps: "
            f"`{args.out}/continual-{label}*`.\n\n{table}",
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
