"""The continual benchmark's outputs: tables, targets, JSON/CSV, heatmaps and the Pareto figure.

Everything here reads finished ``MethodResult``s only (any process's), so whichever process finishes
last writes the complete picture. Numbers in tables are means ± sample std over seeds, in points.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.cl_metrics import mean_std
from benchmarks.continual_config import METHODS
from benchmarks.continual_store import MethodResult, write_json_atomic
from benchmarks.results_md import markdown_table

REFERENCE_STYLE = {  # method -> (marker, colour) in the Pareto figure
    "lora-per-task": ("s", "#1b5e20"),
    "lora-seq": ("v", "#b71c1c"),
    "head-only": ("D", "#4a148c"),
    "joint": ("*", "#0d47a1"),
    "share-full": ("P", "#e65100"),
}
TOO_EASY_BWT = -1.0  # points: a lora-seq that forgets less than this says the sequence cannot tell methods apart


def method_order(results: Sequence[MethodResult]) -> list[str]:
    present = {r.method for r in results}
    main = [m for m in METHODS if m in present]
    return main + sorted(present - set(main))


def by_method(results: Sequence[MethodResult]) -> dict[str, list[MethodResult]]:
    groups: dict[str, list[MethodResult]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        groups.setdefault(r.method, []).append(r)
    return {m: groups[m] for m in method_order(results)}


def _stat(
    rows: list[MethodResult], value: Callable[[MethodResult], float], scale: float = 100.0
) -> tuple[float, float]:
    return mean_std([scale * value(r) for r in rows])


def _pm(rows: list[MethodResult], value: Callable[[MethodResult], float], signed: bool = False) -> str:
    mean, std = _stat(rows, value)
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def _mean(rows: list[MethodResult], value: Callable[[MethodResult], float]) -> float:
    return sum(value(r) for r in rows) / len(rows)


# -- tables ----------------------------------------------------------------------------------------
def summary_table(results: Sequence[MethodResult]) -> str:
    columns = [("method", "l"), ("seeds", "l"), ("ACC", "l"), ("BWT", "l"), ("merge loss", "l")]
    columns += [("just trained", "l"), ("params trained / task", "l"), ("params stored (no heads)", "l")]
    columns += [("bytes stored", "l"), ("wall time (s)", "l")]
    lines = []
    for method, rows in by_method(results).items():
        trained = _mean(rows, lambda r: sum(r.trained_params_per_task) / len(r.trained_params_per_task))
        lines.append(
            [method, len(rows), _pm(rows, lambda r: r.acc), _pm(rows, lambda r: r.bwt, True)]
            + [_pm(rows, lambda r: r.merge_loss, True), _pm(rows, lambda r: sum(r.just_trained) / len(r.just_trained))]
            + [f"{trained:,.0f}", f"{_mean(rows, lambda r: r.stored_params_without_heads):,.0f}"]
            + [f"{_mean(rows, lambda r: r.stored_bytes):,.0f}", f"{_mean(rows, lambda r: r.wall_time_s):,.0f}"]
        )
    return markdown_table(columns, lines)


def hyper_table(results: Sequence[MethodResult]) -> str:
    """Every method's learning rates, steps, batch size, max length, schedule and method settings."""
    columns = [("method", "l"), ("learning rate(s)", "l"), ("steps / task", "l"), ("batch", "l")]
    columns += [("max length", "l"), ("schedule", "l"), ("other", "l")]
    lines = []
    for method, rows in by_method(results).items():
        h = dict(rows[0].hyper)
        if "lr_grid" in h:
            chosen = sorted({f"{lr:g}" for r in rows for lr in r.extra.get("chosen_lr", {}).values()}, key=float)
            grid = ", ".join(f"{v:g}" for v in h["lr_grid"])
            lr = f"grid {{{grid}}} on {h['validation_fraction']:g} of train; chosen {', '.join(chosen)}"
        elif "lr_coefficients" in h:
            lr = f"LoRA (task 1) {h['lr_lora']:g}, coefficients {h['lr_coefficients']:g}"
        else:
            lr = f"LoRA {h['lr_lora']:g}"
        steps = f"{h['steps']} ({h['total_steps']} in all)" if "total_steps" in h else str(h["steps"])
        schedule = (
            f"{h['lr_scheduler']}, warmup {h['warmup_ratio']:g}, clip {h['max_grad_norm']}, wd {h['weight_decay']:g}"
        )
        other = ", ".join(f"{k}={h[k]}" for k in ("r", "lora_alpha", "p", "phi", "policy") if k in h)
        lines.append([method, lr, steps, h["batch_size"], h["max_length"], schedule, other or "-"])
    return markdown_table(columns, lines)


def subspace_table(results: Sequence[MethodResult]) -> str:
    """Share methods after the last merge: k per module, worst error/drift bound, energy kept, tasks over eps."""
    columns = [("method", "l"), ("k per module (min-max)", "l"), ("max error bound", "l")]
    columns += [("max drift bound", "l"), ("min energy kept", "l"), ("tasks over eps", "l")]
    lines = []
    for method, rows in by_method(results).items():
        if "k" not in rows[0].extra:
            continue
        ks = [v for r in rows for pair in r.extra["k"].values() for v in pair]
        over = sorted({t for r in rows for t in r.extra.get("over_bound", {})})
        lines.append(
            [method, f"{min(ks)}-{max(ks)}", f"{_mean(rows, lambda r: r.extra['max_error_bound']):.3f}"]
            + [f"{_mean(rows, lambda r: r.extra['max_drift_bound']):.3f}"]
            + [f"{_mean(rows, lambda r: r.extra['min_energy_kept']):.3f}", ", ".join(over) or "none"]
        )
    return markdown_table(columns, lines) if lines else ""


def per_task_table(
    results: Sequence[MethodResult], methods: Sequence[str] = ("head-only", "lora-per-task", "share")
) -> str:
    groups = by_method(results)
    present = [m for m in methods if m in groups]
    if not present:
        return ""
    tasks = groups[present[0]][0].tasks
    return markdown_table(
        [("task", "l")] + [(m, "l") for m in present],
        ([task] + [_pm(groups[m], lambda r, j=j: r.R[-1][j]) for m in present] for j, task in enumerate(tasks)),
    )


# -- targets ---------------------------------------------------------------------------------------
def targets(results: Sequence[MethodResult]) -> list[str]:
    """The issue's targets, each as PASS/MISS with its numbers (means over seeds, points)."""
    groups = by_method(results)

    def acc(m: str) -> float:
        return _stat(groups[m], lambda r: r.acc)[0]

    def bwt(m: str) -> float:
        return _stat(groups[m], lambda r: r.bwt)[0]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    lines = []
    has = set(groups).__contains__
    if has("share") and has("lora-per-task"):
        gap = acc("share") - acc("lora-per-task")
        lines.append(
            f"{verdict(gap >= -3)} share ACC {acc('share'):.1f} >= lora-per-task ACC {acc('lora-per-task'):.1f} - 3 "
            f"(difference {gap:+.1f})"
        )
    if has("share"):
        lines.append(f"{verdict(bwt('share') >= -3)} share BWT {bwt('share'):+.1f} >= -3")
        loss = _stat(groups["share"], lambda r: r.merge_loss)[0]
        lines.append(f"info share merge loss {loss:+.1f} (mean over all tasks, the last included)")
    if has("share") and has("head-only"):
        gap = acc("share") - acc("head-only")
        lines.append(
            f"{verdict(gap >= 8)} share ACC {acc('share'):.1f} >= head-only ACC {acc('head-only'):.1f} + 8 "
            f"(difference {gap:+.1f})"
        )
    if has("share") and has("lora-per-task"):
        share = _mean(groups["share"], lambda r: r.stored_params_without_heads)
        lora = _mean(groups["lora-per-task"], lambda r: r.stored_params_without_heads)
        ratio = lora / share if share else math.inf
        lines.append(
            f"{verdict(ratio >= 10)} stored params without heads: lora-per-task {lora:,.0f} / share {share:,.0f} "
            f"= {ratio:.1f}x >= 10x"
        )
    if has("lora-seq"):
        forgets = bwt("lora-seq") < TOO_EASY_BWT
        lines.append(
            f"info lora-seq BWT {bwt('lora-seq'):+.1f}"
            + ("" if forgets else f" (>= {TOO_EASY_BWT:g}: lora-seq does not forget, so this sequence is too easy "
                                  "to tell a working subspace from a broken one)")
        )  # fmt: skip
    if has("lora-per-task") and has("head-only"):
        gap = acc("lora-per-task") - acc("head-only")
        lines.append(
            f"{verdict(gap >= 10)} qualification: lora-per-task ACC {acc('lora-per-task'):.1f} >= head-only ACC "
            f"{acc('head-only'):.1f} + 10 on average (difference {gap:+.1f}); per task:"
        )
        tasks = groups["lora-per-task"][0].tasks
        for j, task in enumerate(tasks):
            lora_j = _stat(groups["lora-per-task"], lambda r, j=j: r.R[-1][j])[0]
            head_j = _stat(groups["head-only"], lambda r, j=j: r.R[-1][j])[0]
            lines.append(
                f"    {task}: lora-per-task {lora_j:.1f}, head-only {head_j:.1f}, difference {lora_j - head_j:+.1f}"
            )
    return lines


# -- files -----------------------------------------------------------------------------------------
def write_data(results: Sequence[MethodResult], out: Path, label: str) -> list[Path]:
    """``continual-<label>.json`` (every result), ``.csv`` (one row per method and seed), ``-matrices.csv`` (R)."""
    ordered = [r for rows in by_method(results).values() for r in rows]
    paths = [out / f"continual-{label}.json", out / f"continual-{label}.csv", out / f"continual-{label}-matrices.csv"]
    write_json_atomic(paths[0], [r.to_json() for r in ordered])
    _write_csv(
        paths[1],
        ["method", "seed", "acc", "bwt", "merge_loss", "stored_params", "stored_params_without_heads", "stored_bytes",
         "mean_trained_params_per_task", "wall_time_s"],
        [[r.method, r.seed, f"{r.acc:.4f}", f"{r.bwt:.4f}", f"{r.merge_loss:.4f}", r.stored_params,
          r.stored_params_without_heads, r.stored_bytes, round(sum(r.trained_params_per_task) / len(r.tasks)),
          f"{r.wall_time_s:.1f}"] for r in ordered],
    )  # fmt: skip
    rows = []
    for r in ordered:
        for i, row in enumerate(r.R):
            rows.append([r.method, r.seed, r.tasks[i], f"{r.just_trained[i]:.4f}"] + [
                "" if math.isnan(v) else f"{v:.4f}" for v in row
            ])  # fmt: skip
    tasks = ordered[0].tasks if ordered else []
    _write_csv(paths[2], ["method", "seed", "after_task", "just_trained", *tasks], rows)
    return paths


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(result: MethodResult, path: Path) -> Path:
    """R as a heatmap, legible from 2 to 60 tasks: cells and fonts shrink with T, dark text on light cells."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _pyplot()
    T = len(result.tasks)
    cell = min(0.9, max(0.26, 8.0 / T))  # inches per cell
    font = min(9.0, max(4.5, 11.0 * cell))
    percent = T > 12  # "87" instead of "0.87" where cells are small
    cmap = LinearSegmentedColormap.from_list("light", ["#f4c7c3", "#fce8b2", "#b7e1cd"]).with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(T * cell + 2.8, T * cell + 1.8))
    image = ax.imshow(result.R, vmin=0.0, vmax=1.0, cmap=cmap)
    for i, row in enumerate(result.R):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}" if percent else f"{v:.2f}", ha="center", va="center",
                        color="#111111", fontsize=font)  # fmt: skip
    ax.set_xticks(range(T), result.tasks, rotation=60, ha="right", fontsize=font)
    ax.set_yticks(range(T), [f"after {t}" for t in result.tasks], fontsize=font)
    ax.set_xlabel("evaluated task", fontsize=max(font, 7))
    title = (
        f"{result.method} (seed {result.seed}): ACC {100 * result.acc:.1f}, BWT {100 * result.bwt:+.1f}, "
        f"merge loss {100 * result.merge_loss:+.1f}" + (" (values in %)" if percent else "")
    )
    ax.set_title(title, fontsize=max(font, 8))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120 if T <= 24 else 160)
    plt.close(fig)
    return path


def plot_pareto(results: Sequence[MethodResult], path: Path, title: str) -> Path | None:
    """ACC (mean over seeds) against stored bytes (log x): share variants as labelled points, baselines as markers."""
    groups = by_method(results)
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, rows in groups.items():
        x = _mean(rows, lambda r: r.stored_bytes)
        y = _stat(rows, lambda r: r.acc)[0]
        if method in REFERENCE_STYLE:
            marker, colour = REFERENCE_STYLE[method]
            ax.scatter([x], [y], marker=marker, s=90, color=colour, label=method, zorder=3)
        else:
            policy = rows[0].hyper.get("policy", "")
            colour = {"max_error": "#1565c0", "variance": "#c62828", "k": "#6d4c41"}.get(
                policy.split("=")[0], "#333333"
            )
            ax.scatter([x], [y], marker="o", s=45, color=colour, zorder=3)
            ax.annotate(f"{method} ({policy.split(',')[0]})", (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=7, color=colour)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes (float32; adapters, bases, coefficients and heads)")
    ax.set_ylabel("ACC after the last task (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
