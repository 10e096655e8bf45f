"""Instruction-task data for causal LMs: one Parquet file per split, read and written with pyarrow only.

Format. A split file has two string columns, ``prompt`` and ``response``, and the file-level metadata
key ``task`` (the task name), as ``workers.data`` writes classification splits. The model sees
``prompt`` then ``response`` then the tokenizer's EOS; the loss is on the response tokens and EOS
only. The prompt is used verbatim: put any instruction template or chat formatting into it when
writing the file, and make the response start as it should follow the prompt (e.g. with a space).
Evaluation generates greedily from ``prompt`` and compares with ``response`` (``workers.generation``).

Make a split::

    from workers.instruction_data import write_instruction_split
    write_instruction_split("data/sum/train.parquet", prompts, responses, task="sum")

or with pandas/pyarrow: columns ``prompt`` and ``response`` (strings, no nulls) and
``table.replace_schema_metadata({b"task": b"sum"})``.

Tokenization (``encode_example``): the prompt with the tokenizer's special tokens (BOS for Llama),
the response without them, plus EOS; prompt and response are tokenized apart, so the boundary never
merges tokens. Past ``max_length`` the prompt loses tokens at its start (its end, next to the
response, is kept) down to half of ``max_length``, then the response loses its end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from share.errors import ShareClError
from workers.data import TaskSplit, load_split

IGNORE_INDEX = -100  # labels of tokens that carry no loss (prompt, padding), as in Hugging Face
_META_TASK = b"task"
_COLUMNS = ("prompt", "response")
_FIX = "write splits with workers.instruction_data.write_instruction_split(path, prompts, responses, task)"


class InstructionDataError(ShareClError):
    """An instruction split is missing, unreadable or malformed; the message names the file and the fix."""


class SplitFormat(StrEnum):
    """What a split file holds, told apart by its columns."""

    CLASSIFICATION = "classification"  # text, label (workers.data)
    INSTRUCTION = "instruction"  # prompt, response (this module)


@dataclass(frozen=True)
class InstructionSplit:
    """One split of one instruction task, fully in memory."""

    prompts: list[str]
    responses: list[str]
    task: str

    def __len__(self) -> int:
        return len(self.prompts)

    # A generation task has no classes. These two let code written for ``TaskSplit`` (MLflow params,
    # the eval split's label check) run unchanged; the causal-LM builder ignores num_labels.
    @property
    def label_names(self) -> list[str]:
        return []

    @property
    def num_labels(self) -> int:
        return 0


def _check_contents(prompts: Sequence[str], responses: Sequence[str], where: str) -> None:
    if len(prompts) != len(responses):
        raise InstructionDataError(
            f"{where}: {len(prompts)} prompts but {len(responses)} responses; give one response per prompt"
        )
    for name, values in (("prompt", prompts), ("response", responses)):
        if any(not isinstance(v, str) for v in values):
            raise InstructionDataError(f"{where}: every {name} must be a str")
    empty = [i for i, r in enumerate(responses) if not r.strip()]
    if empty:
        raise InstructionDataError(
            f"{where}: rows {empty[:5]} have an empty response; nothing would be learned or scored there, drop them"
        )


def write_instruction_split(
    path: str | os.PathLike[str], prompts: Sequence[str], responses: Sequence[str], task: str
) -> Path:
    """Write one split as Parquet; atomic (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    if not task:
        raise InstructionDataError(f"{path}: task name must be a non-empty string")
    _check_contents(prompts, responses, str(path))
    table = pa.table(
        {
            name: pa.array(list(values), type=pa.string())
            for name, values in zip(_COLUMNS, (prompts, responses), strict=True)
        }
    )
    table = table.replace_schema_metadata({_META_TASK: task.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _read_table(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"instruction split {path} does not exist; check the path, or {_FIX}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InstructionDataError(f"{path} is not a readable Parquet file ({err}); {_FIX}") from err


def split_format(path: str | os.PathLike[str]) -> SplitFormat:
    """Whether ``path`` holds a classification split (``text``, ``label``) or an instruction split
    (``prompt``, ``response``); reads the schema only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task split {path} does not exist; check the path")
    try:
        names = set(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError) as err:
        raise InstructionDataError(f"{path} is not a readable Parquet file ({err})") from err
    if set(_COLUMNS) <= names:
        return SplitFormat.INSTRUCTION
    if {"text", "label"} <= names:
        return SplitFormat.CLASSIFICATION
    raise InstructionDataError(
        f"{path}: columns {sorted(names)} are neither a classification split (text, label) nor an instruction "
        f"split (prompt, response); write it with workers.data.write_split or {_FIX}"
    )


def load_instruction_split(path: str | os.PathLike[str]) -> InstructionSplit:
    """Read a split written by :func:`write_instruction_split`, validating columns, nulls and metadata."""
    path = Path(path)
    table = _read_table(path)
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise InstructionDataError(
            f"{path}: missing column(s) {missing} (found {table.column_names}); an instruction split needs "
            f"string columns 'prompt' and 'response'; {_FIX}"
        )
    for name in _COLUMNS:
        column = table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise InstructionDataError(f"{path}: column {name!r} must be string, is {column.type}; {_FIX}")
        if column.null_count:
            raise InstructionDataError(
                f"{path}: column {name!r} holds {column.null_count} nulls; drop or fill those rows"
            )
    meta = table.schema.metadata or {}
    if _META_TASK not in meta:
        raise InstructionDataError(
            f"{path}: file metadata must hold 'task' (the task name), found keys "
            f"{sorted(k.decode(errors='replace') for k in meta)}; {_FIX}"
        )
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    _check_contents(prompts, responses, str(path))
    return InstructionSplit(prompts=prompts, responses=responses, task=meta[_META_TASK].decode())


def load_task_split(path: str | os.PathLike[str]) -> TaskSplit | InstructionSplit:
    """A classification or an instruction split, whichever ``path`` holds (``split_format``)."""
    if split_format(path) is SplitFormat.INSTRUCTION:
        return load_instruction_split(path)
    return load_split(path)


# ---------------------------------------------------------------- tokenization


def _token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ShareClError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token; set one (tokenizer.eos_token = ...) and save it, "
            "so a response has an end the model can learn"
        )
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """The prompt's token ids as training sees them (special tokens included), its end kept."""
    ids = _token_ids(tokenizer, prompt, True)
    return ids[-max_length:]


def encode_example(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example; labels are ``IGNORE_INDEX`` on the prompt (see the module doc)."""
    if max_length < 2:
        raise ShareClError(f"max_length must be >= 2 (a prompt token and a response token), got {max_length}")
    prompt_ids = _token_ids(tokenizer, prompt, True)
    response_ids = [*_token_ids(tokenizer, response, False), eos_id(tokenizer)]
    if len(prompt_ids) + len(response_ids) > max_length:
        keep = max(max_length - len(response_ids), max_length // 2, 1)
        prompt_ids = prompt_ids[-keep:]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos_id(tokenizer)  # padding is masked out; any id will do


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` on padding)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def iter_instruction_batches(
    split: InstructionSplit,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    max_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``split`` as ``collate`` batches (CPU tensors), in the manner of ``workers.data.iter_batches``."""
    if batch_size < 1 or max_length < 2:
        raise ShareClError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    if shuffle:
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(len(split)))
    pad = pad_id(tokenizer)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield collate([encode_example(tokenizer, split.prompts[i], split.responses[i], max_length) for i in idx], pad)
