"""A task folder: one Parquet file per split and task (``workers.data``), a ``tasks.json`` manifest.

Layout: ``<out>/<task>/train.parquet``, ``<out>/<task>/eval.parquet``, ``<out>/tasks.json`` (the
source, the build settings and the tasks in order, each with its label names, sizes and split paths
relative to ``<out>``), and ``<out>/WORDNET_LICENSE`` for data derived from WordNet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.data import write_split

MANIFEST = "tasks.json"


@dataclass(frozen=True)
class TaskPaths:
    name: str
    train: Path
    eval: Path
    label_names: tuple[str, ...]
    n_train: int
    n_eval: int


def write_task(
    out: Path,
    name: str,
    label_names: Sequence[str],
    train_rows: Sequence[tuple[str, int]],
    eval_rows: Sequence[tuple[str, int]],
) -> TaskPaths:
    """Write ``<out>/<name>/{train,eval}.parquet`` from ``(text, label)`` rows."""
    paths = {
        split: write_split(
            out / name / f"{split}.parquet", [t for t, _ in rows], [y for _, y in rows], label_names, name
        )
        for split, rows in (("train", train_rows), ("eval", eval_rows))
    }
    return TaskPaths(name, paths["train"], paths["eval"], tuple(label_names), len(train_rows), len(eval_rows))


def write_manifest(
    out: Path,
    source: str,
    settings: Mapping[str, Any],
    tasks: Sequence[TaskPaths],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """``<out>/tasks.json``: the tasks in order (the order a benchmark or job trains them in).

    ``extra`` adds fields to a task's entry, by task name (e.g. a description of its labels).
    """
    entries = []
    for t in tasks:
        entry: dict[str, Any] = {
            "name": t.name,
            "label_names": list(t.label_names),
            "n_train": t.n_train,
            "n_eval": t.n_eval,
            "train": str(t.train.relative_to(out)),
            "eval": str(t.eval.relative_to(out)),
        }
        entry.update((extra or {}).get(t.name, {}))
        entries.append(entry)
    manifest = {"source": source, "settings": dict(settings), "tasks": entries}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
