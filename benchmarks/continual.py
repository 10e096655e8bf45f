"""Does Share keep the tasks, or do the per-task heads? A continual-learning benchmark on real data
through the real all-MiniLM-L6-v2, every method on the same data, seeds and steps.

Methods (``--methods``):

- ``head-only``: the frozen encoder and a linear head per task (its lr chosen per task on a small grid
  against a validation split carved from the task's TRAIN data).
- ``share``: task 1 trains LoRA and initializes the subspace; each later task trains coefficients +
  ``phi`` temporary directions + its head, merged before the next starts (KPolicy max_error, the default).
- ``share-variance``: the same with the paper's rule, 60% explained variance.
- ``lora-seq``: one LoRA adapter finetuned task after task (each task keeps its own head).
- ``lora-per-task``: a separate LoRA adapter per task (no forgetting by construction; the storage baseline).
- ``share-full``: the per-task adapters compressed into one subspace with the default policy, no retraining.
- ``joint``: one LoRA trained on all tasks at once (tasks x steps, mixed batches), a head per task.

Data: ``--data DIR`` reads any task folder through its ``tasks.json`` (tasks in order; label counts may
differ); without it the default ``--sequence`` is built with ``jobs.datasets`` into ``benchmarks/data/``.
Each (method, seed) is saved under ``<out>/continual-<label>/`` as it finishes and a rerun resumes
from there, so two processes can share a run (``--methods`` splits it; overlapping runs never
train the same pair twice) and a run can span sessions. The last process to finish writes the
complete tables, JSON, CSV, heatmaps and the Pareto figure.

    python -m benchmarks.continual --quick                 # 1 seed, the first 4 tasks, 150 steps
    python -m benchmarks.continual                         # every method, 3 seeds
    python -m benchmarks.continual --sweep                 # share's k policies against stored bytes, 1 seed
    python -m benchmarks.continual --reverse --seeds 0     # the sequence reversed

On 2 cores, start the same command twice with ``--threads 1`` (each takes the next unclaimed pair),
or split it with ``--methods``; then run it once more with ``--write``: everything is loaded, nothing
retrained, and the complete tables go to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.continual_config import METHODS, Budget, Method, MethodKind, resolve_methods, sweep_methods
from benchmarks.continual_data import (
    TaskData,
    TaskSequence,
    build_default,
    fingerprint,
    load_tasks,
    read_manifest,
    select,
)
from benchmarks.continual_joint import joint
from benchmarks.continual_methods import SeedRun, log
from benchmarks.continual_probe import EmbeddingCache, head_only
from benchmarks.continual_report import (
    hyper_table,
    per_task_table,
    plot_heatmap,
    plot_pareto,
    subspace_table,
    summary_table,
    targets,
    write_data,
)
from benchmarks.continual_store import MethodResult, ResultStore, result_key
from benchmarks.results_md import command_line, write_section
from share.errors import ShareClError

QUICK_TASKS = 4
QUICK_STEPS = 150


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.continual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, default=None, help="a task folder with tasks.json (default: --sequence)")
    data.add_argument(
        "--sequence",
        choices=[s.value for s in TaskSequence],
        default=TaskSequence.RELATIONS.value,
        help="the default data, built on first use (default: relations)",
    )
    data.add_argument(
        "--rebuild-data",
        action="store_true",
        help="rebuild the --sequence folder even if it exists (after a builder change)",
    )
    data.add_argument("--num-tasks", type=int, default=None, help=f"the first N tasks (quick: {QUICK_TASKS})")
    data.add_argument("--reverse", action="store_true", help="train the (chosen) tasks in reverse order")
    budget = p.add_argument_group("budget (every method gets the same)")
    budget.add_argument(
        "--steps", type=int, default=None, help=f"per task (default {Budget.steps}; quick {QUICK_STEPS})"
    )
    budget.add_argument("--batch-size", type=int, default=Budget.batch_size)
    budget.add_argument("--max-length", type=int, default=Budget.max_length, help="tokens per example")
    budget.add_argument(
        "--lr-lora", type=float, default=Budget.lr_lora, help="LoRA tasks (every LoRA method, share's task 1)"
    )
    budget.add_argument(
        "--lr-coefficients",
        type=float,
        default=Budget.lr_coefficients,
        help="share's coefficient tasks (chosen on the grid 2e-3, 5e-3, 1e-2, 2e-2: RESULTS.md)",
    )
    budget.add_argument(
        "--head-lr-grid", type=float, nargs="+", default=list(Budget.head_lr_grid), help="head-only's lr candidates"
    )
    run = p.add_argument_group("run")
    run.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick, sweep: 0)")
    run.add_argument("--quick", action="store_true", help=f"1 seed, first {QUICK_TASKS} tasks, {QUICK_STEPS} steps")
    run.add_argument(
        "--sweep",
        action="store_true",
        help="share with max_error {0.02,0.05,0.1,0.2}, variance {0.6,0.9}, k {4,8,16,32} + references, 1 seed",
    )
    run.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: all allowed)")
    run.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run.add_argument(
        "--cache",
        type=Path,
        default=Path("benchmarks/data/continual-cache"),
        help="where head-only's frozen embeddings are cached (default under the git-ignored benchmarks/data)",
    )
    run.add_argument("--label", default=None, help="run name (default: from data, quick/sweep/reversed)")
    run.add_argument("--write", action="store_true", help="replace this run's section of benchmarks/RESULTS.md")
    run.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report (and --write) the stored results, naming the pairs not finished yet",
    )
    return p


def _label(args: argparse.Namespace, data_name: str) -> str:
    if args.label:
        return args.label
    parts = [data_name, "sweep" if args.sweep else "quick" if args.quick else "full"]
    if args.num_tasks is not None:
        parts.append(f"{args.num_tasks}tasks")
    if args.reverse:
        parts.append("reversed")
    return "-".join(parts)


def _budget(args: argparse.Namespace) -> Budget:
    steps = args.steps or (QUICK_STEPS if args.quick else Budget.steps)
    return Budget(
        steps=steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr_lora=args.lr_lora,
        lr_coefficients=args.lr_coefficients,
        head_lr_grid=tuple(args.head_lr_grid),
    )


def _jobs(methods: list[Method]) -> dict[str, list[Method]]:
    """Unit of work -> the methods it produces (lora-per-task's job also yields share-full)."""
    jobs: dict[str, list[Method]] = {}
    for m in methods:
        jobs.setdefault(m.job, []).append(m)
    if MethodKind.LORA_PER_TASK.value in jobs:
        have = {m.name for m in jobs["lora-per-task"]}
        jobs["lora-per-task"] += [METHODS[n] for n in ("lora-per-task", "share-full") if n not in have]
    return jobs


class Runner:
    def __init__(self, tasks: list[TaskData], budget: Budget, store: ResultStore, data_key: str, cache: Path) -> None:
        self.tasks, self.budget, self.store, self.data_key = tasks, budget, store, data_key
        self.embeddings = EmbeddingCache(cache, budget.max_length, budget.eval_batch_size)

    def key(self, method: Method) -> str:
        return result_key(self.data_key, method.describe(), self.budget.hyper(method, len(self.tasks)))

    def run(self, job: str, methods: list[Method], wanted: set[str], seed: int) -> None:
        def missing() -> list[Method]:
            return [m for m in methods if m.name in wanted and self.store.load(m.name, seed, self.key(m)) is None]

        if not missing():
            log(f"{job} seed {seed}: stored, skipped ({self.store.run_dir})")
            return
        with self.store.claim(job, seed) as mine:
            if not mine:
                log(f"{job} seed {seed}: another process is running it, skipped")
                return
            if not missing():  # finished by another process meanwhile
                return
            for result in self._train(job, methods, seed):
                method = next(m for m in methods if m.name == result.method)
                result.key = self.key(method)
                path = self.store.save(result)
                log(f"{result.method} seed {seed}: ACC {100 * result.acc:.1f} BWT {100 * result.bwt:+.1f} "
                    f"merge loss {100 * result.merge_loss:+.1f} in {result.wall_time_s:.0f} s -> {path}")  # fmt: skip

    def _train(self, job: str, methods: list[Method], seed: int) -> list[MethodResult]:
        run = SeedRun(self.tasks, seed, self.budget)
        first = methods[0]
        if first.kind is MethodKind.HEAD_ONLY:
            return [head_only(self.tasks, seed, self.budget, first, self.embeddings)]
        if first.kind is MethodKind.SHARE:
            return [run.share(first)]
        if first.kind is MethodKind.LORA_SEQ:
            return [run.lora_seq(first)]
        if first.kind is MethodKind.JOINT:
            return [joint(self.tasks, seed, self.budget, first)]
        per_task = next(m for m in methods if m.kind is MethodKind.LORA_PER_TASK)
        full = next(m for m in methods if m.kind is MethodKind.SHARE_FULL)
        return list(run.lora_per_task(per_task, full))


def main(argv: list[str] | None = None) -> int:
    if "--model" in (sys.argv[1:] if argv is None else argv):  # any local causal LM: benchmarks/continual_llm.py
        from benchmarks.continual_llm import main as llm_main

        return llm_main(argv)
    args = _parser().parse_args(argv)
    try:
        return _main(args, argv)
    except ShareClError as err:
        print(f"continual: error: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.perf_counter()
    if args.threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # workers.train.configure_threads then keeps it
        torch.set_num_threads(args.threads)
    if args.quick and args.sweep:
        raise ShareClError("--quick and --sweep are separate runs; give one of them")
    folder = (
        args.data if args.data is not None else build_default(TaskSequence(args.sequence), rebuild=args.rebuild_data)
    )
    num_tasks = args.num_tasks
    entries = read_manifest(folder)
    if num_tasks is None and args.quick:
        num_tasks = min(QUICK_TASKS, len(entries))
    entries = select(entries, num_tasks, args.reverse)
    budget = _budget(args)
    methods = resolve_methods(args.methods, args.sweep) if args.methods else (
        sweep_methods() if args.sweep else list(METHODS.values())
    )  # fmt: skip
    seeds = args.seeds or ([0] if args.quick or args.sweep else [0, 1, 2])
    label = _label(args, folder.name if args.data is not None else args.sequence)
    store = ResultStore(args.out / f"continual-{label}")
    data_key = fingerprint(entries)

    log(f"{label}: {len(entries)} tasks from {folder} ({', '.join(e.name for e in entries)}), seeds {seeds}")
    print(f"continual {label}: {len(entries)} tasks, seeds {seeds}, results in {store.run_dir}")
    print("hyperparameters per method:")
    for m in methods:
        print(f"  {m.name}: {budget.hyper(m, len(entries))}")
    sys.stdout.flush()

    tasks = load_tasks(entries)
    runner = Runner(tasks, budget, store, data_key, args.cache / "embeddings")
    wanted = {m.name for m in methods}
    for seed in [] if args.report_only else seeds:
        for job, produced in _jobs(methods).items():
            runner.run(job, produced, wanted, seed)

    results = store.all()
    missing = sorted(f"{m.name}/seed{s}" for m in methods for s in seeds if not store.path(m.name, s).is_file())
    _report(results, store, args, argv, label, budget, len(entries), missing, time.perf_counter() - started)
    return 0


def _report(
    results: list[MethodResult],
    store: ResultStore,
    args: argparse.Namespace,
    argv: list[str] | None,
    label: str,
    budget: Budget,
    num_tasks: int,
    missing: list[str],
    elapsed: float,
) -> None:
    if not results:
        print("no finished results yet")
        return
    written = write_data(results, args.out, label)
    written += [plot_heatmap(r, store.run_dir / f"heatmap-{r.method}-seed{r.seed}.png") for r in results]
    pareto = plot_pareto(results, args.out / f"continual-{label}-pareto.png", f"continual {label}: ACC vs stored bytes")
    written += [pareto] if pareto else []
    seeds = sorted({r.seed for r in results})
    compute = sum(r.wall_time_s for r in results)
    setup = (
        f"{num_tasks} tasks ({', '.join(results[0].tasks)}), seeds {seeds}; every method {budget.steps} steps "
        f"per task, "
        f"batch {budget.batch_size}, max length {budget.max_length}; all-MiniLM-L6-v2, LoRA r={budget.r} on "
        f"query/value. Wall time summed over the stored (method, seed) results: {compute:,.0f} s; this process "
        f"ran {elapsed:,.0f} s"
    )
    tables = [
        "Results (points; mean ± std over seeds):\n\n" + summary_table(results),
        "Hyperparameters:\n\n" + hyper_table(results),
    ]
    share = subspace_table(results)
    if share:
        tables.append("Share after the last merge:\n\n" + share)
    per_task = per_task_table(results)
    if per_task:
        tables.append("Final accuracy per task (points):\n\n" + per_task)
    checks = targets(results)
    command = command_line("continual", argv)
    print(f"\n{setup}\n")
    print("\n\n".join(tables))
    if checks:
        print("\ntargets:\n" + "\n".join(checks))
    if missing:
        print(f"\nincomplete: not finished yet: {', '.join(missing)} (rerun the same command to resume)")
    print(f"\ncommand: {command}")
    print("written: " + ", ".join(str(p) for p in written[:4]) + f" and {len(written) - 4} more")
    if args.write:
        body = "\n\n".join([setup + ".", *tables])
        if checks:
            body += "\n\nTargets:\n\n```\n" + "\n".join(checks) + "\n```"
        body += (
            f"\n\nFiles: `{args.out}/continual-{label}*` (JSON, CSV, matrices CSV, Pareto), "
            f"heatmaps in `{store.run_dir}/`."
        )
        write_section(f"## Continual learning: {label}", command, body, f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    sys.exit(main())
