"""The continual benchmark's data: any task folder, read through its ``tasks.json`` manifest.

A manifest lists the tasks in order: ``{"tasks": [{"name": ..., "train": "x/train.parquet",
"eval": "x/eval.parquet", "label_names": [...]}, ...]}`` with split paths relative to the folder (the
format ``jobs.datasets`` and ``benchmarks.data_wordnet`` write; other keys are ignored). Tasks may have
different label counts. A fingerprint of the chosen tasks' files, in order, keys the stored results,
so a result is only ever reused for the same data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from share.errors import ShareClError
from workers.data import TaskSplit, load_split

MANIFEST = "tasks.json"


class TaskSequence(StrEnum):
    """The default data sets the benchmark can build itself (``--sequence``)."""

    RELATIONS = "relations"  # WordNet relation pairs: where adapters matter
    GLOSSES = "glosses"  # WordNet gloss categories: a linear probe matches every method here


@dataclass(frozen=True)
class TaskEntry:
    name: str
    train: Path
    eval: Path
    label_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskData:
    name: str
    train: TaskSplit
    eval: TaskSplit

    @property
    def num_labels(self) -> int:
        return self.train.num_labels


def read_manifest(folder: str | Path) -> list[TaskEntry]:
    """The tasks of ``folder/tasks.json``, in manifest order; split paths resolved against ``folder``."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ShareClError(
            f"--data {folder}: no {MANIFEST} there; point --data at a task folder written by jobs.datasets "
            f"(one sub-folder per task plus {MANIFEST}), or drop --data to build the default --sequence"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShareClError(f"{path} is not valid JSON ({err}); rebuild the task folder") from err
    tasks = manifest.get("tasks") if isinstance(manifest, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ShareClError(f"{path}: needs a non-empty list 'tasks' of {{name, train, eval}} entries")
    entries, seen = [], set()
    for i, task in enumerate(tasks):
        missing = [key for key in ("name", "train", "eval") if not isinstance(task, dict) or not task.get(key)]
        if missing:
            raise ShareClError(f"{path}: tasks[{i}] lacks {missing}; every task names its train and eval split")
        if task["name"] in seen:
            raise ShareClError(f"{path}: task {task['name']!r} is listed twice; task names must be unique")
        seen.add(task["name"])
        labels = task.get("label_names")
        entries.append(
            TaskEntry(
                name=task["name"],
                train=folder / task["train"],
                eval=folder / task["eval"],
                label_names=tuple(labels) if labels else None,
            )
        )
    return entries


def select(entries: Sequence[TaskEntry], num_tasks: int | None, reverse: bool) -> list[TaskEntry]:
    """The first ``num_tasks`` tasks (all when None), then reversed if asked (the reversed sequence)."""
    if num_tasks is not None and not 1 <= num_tasks <= len(entries):
        raise ShareClError(f"--num-tasks {num_tasks}: the manifest holds {len(entries)} tasks; pick 1..{len(entries)}")
    chosen = list(entries[:num_tasks] if num_tasks is not None else entries)
    return chosen[::-1] if reverse else chosen


def load_tasks(entries: Sequence[TaskEntry]) -> list[TaskData]:
    """Every chosen task's splits, checked against the manifest's label names."""
    tasks = []
    for entry in entries:
        train, eval_ = load_split(entry.train), load_split(entry.eval)
        for split in (train, eval_):
            if entry.label_names is not None and tuple(split.label_names) != entry.label_names:
                raise ShareClError(
                    f"task {entry.name!r}: the manifest names labels {list(entry.label_names)} but its split "
                    f"holds {split.label_names}; rebuild the task folder"
                )
        if train.label_names != eval_.label_names:
            raise ShareClError(
                f"task {entry.name!r}: train labels {train.label_names} differ from eval labels "
                f"{eval_.label_names}; both splits must use one label list"
            )
        tasks.append(TaskData(entry.name, train, eval_))
    return tasks


def fingerprint(entries: Sequence[TaskEntry]) -> str:
    """A digest of the chosen tasks' names and split files, in order."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(entry.name.encode() + b"\0")
        for path in (entry.train, entry.eval):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


DEFAULT_FOLDERS = {
    TaskSequence.RELATIONS: Path("benchmarks/data/wordnet-relations"),
    TaskSequence.GLOSSES: Path("benchmarks/data/wordnet-glosses"),
}


def build_default(sequence: TaskSequence, folder: Path | None = None, rebuild: bool = False) -> Path:
    """The default task folder of ``sequence``, built with ``jobs.datasets`` (its default sizes) on first
    use or when ``rebuild``; otherwise the folder already there is used as it is."""
    folder = folder or DEFAULT_FOLDERS[sequence]
    if (folder / MANIFEST).is_file() and not rebuild:
        return folder
    if sequence is TaskSequence.RELATIONS:
        from jobs.datasets.relations import prepare_relation_tasks

        prepare_relation_tasks(folder)
    else:
        from jobs.datasets.glosses import prepare_wordnet_tasks

        prepare_wordnet_tasks(folder)
    return folder
