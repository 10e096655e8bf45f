"""Task data: one Parquet file per split, read and written with pyarrow only.

A split file has two columns, ``text`` (string) and ``label`` (int64, ``0 <= label < len(label_names)``),
and two file-level metadata keys: ``label_names`` (a JSON list of strings) and ``task`` (the task name).
Keeping the class names inside the file means a split can be evaluated or served without any side file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

_META_LABEL_NAMES = b"label_names"
_META_TASK = b"task"
_SCHEMA_FIX = "write splits with workers.data.write_split(path, texts, labels, label_names, task)"


@dataclass(frozen=True)
class TaskSplit:
    """One split of one task, fully in memory (task splits are small: thousands of rows)."""

    texts: list[str]
    labels: torch.Tensor  # LongTensor, shape (len(texts),)
    label_names: list[str]
    task: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _check_contents(texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str], where: str) -> None:
    if len(texts) != len(labels):
        raise ValueError(f"{where}: {len(texts)} texts but {len(labels)} labels; give one label per text")
    if not label_names or len(set(label_names)) != len(label_names):
        raise ValueError(f"{where}: label_names must be a non-empty list of distinct names, got {list(label_names)}")
    n = len(label_names)
    bad = [int(y) for y in labels if not 0 <= int(y) < n]
    if bad:
        raise ValueError(
            f"{where}: labels must be integers in [0, {n}) (one per entry of label_names), "
            f"found {sorted(set(bad))[:5]}; fix the labels or extend label_names"
        )


def write_split(
    path: str | os.PathLike[str],
    texts: Sequence[str],
    labels: Sequence[int] | torch.Tensor,
    label_names: Sequence[str],
    task: str,
) -> Path:
    """Write one split as Parquet; atomic (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    label_list = labels.tolist() if isinstance(labels, torch.Tensor) else [int(y) for y in labels]
    if not task:
        raise ValueError(f"{path}: task name must be a non-empty string")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: every text must be a str")
    _check_contents(texts, label_list, label_names, str(path))
    table = pa.table({"text": pa.array(list(texts), type=pa.string()), "label": pa.array(label_list, type=pa.int64())})
    table = table.replace_schema_metadata(
        {_META_LABEL_NAMES: json.dumps(list(label_names)).encode(), _META_TASK: task.encode()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def load_split(path: str | os.PathLike[str]) -> TaskSplit:
    """Read a split written by :func:`write_split`, validating columns, metadata and labels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"task split {path} does not exist; check the path, or build the WordNet tasks with "
            f"`python -m jobs.datasets.glosses --out benchmarks/data/wordnet`, or {_SCHEMA_FIX}"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file ({err}); {_SCHEMA_FIX}") from err

    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing} (found {table.column_names}); "
            f"a split needs columns 'text' (string) and 'label' (int64); {_SCHEMA_FIX}"
        )
    text_col, label_col = table.column("text"), table.column("label")
    if not (pa.types.is_string(text_col.type) or pa.types.is_large_string(text_col.type)):
        raise ValueError(f"{path}: column 'text' must be string, is {text_col.type}; {_SCHEMA_FIX}")
    if not pa.types.is_integer(label_col.type):
        raise ValueError(
            f"{path}: column 'label' must be an integer class index, is {label_col.type}; "
            f"map class names to 0..n-1 and store the names in label_names; {_SCHEMA_FIX}"
        )
    if text_col.null_count or label_col.null_count:
        raise ValueError(f"{path}: 'text' and 'label' may not contain nulls; drop or fill those rows")

    meta = table.schema.metadata or {}
    if _META_LABEL_NAMES not in meta or _META_TASK not in meta:
        raise ValueError(
            f"{path}: file metadata must hold 'label_names' (JSON list) and 'task' (name), found keys "
            f"{sorted(k.decode(errors='replace') for k in meta)}; {_SCHEMA_FIX}"
        )
    try:
        label_names = json.loads(meta[_META_LABEL_NAMES])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata 'label_names' is not valid JSON ({err}); {_SCHEMA_FIX}") from err
    if not isinstance(label_names, list) or not all(isinstance(n, str) for n in label_names):
        raise ValueError(f"{path}: metadata 'label_names' must be a JSON list of strings; {_SCHEMA_FIX}")

    texts = text_col.to_pylist()
    labels = torch.tensor(label_col.to_pylist(), dtype=torch.long)
    _check_contents(texts, labels.tolist(), label_names, str(path))
    return TaskSplit(texts=texts, labels=labels, label_names=label_names, task=meta[_META_TASK].decode())


def iter_batches(
    split: TaskSplit,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    max_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``split``: dicts with ``input_ids``, ``attention_mask`` and ``labels`` (CPU tensors).

    Padding is per batch (to the longest row, at most ``max_length``), which on CPU is much cheaper
    than padding every row to ``max_length``. The last batch may be smaller. Pass a different
    ``seed`` per epoch to get a different order each epoch.
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    if shuffle:
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(len(split)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [split.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": split.labels[idx],
        }
