"""``EvalSpec``: how to evaluate one task, written by the worker that trained it, read by the coordinator.

A submission that can be evaluated carries one in its metadata (``metadata["eval"]``, a JSON dict).
It enters the task's metadata in every version, so after any later merge and any restart the
coordinator still knows how to evaluate that task. The coordinator reads only ``evaluator``
(which code evaluates it, by import path); the other fields are for that evaluator (the workers'
one builds the task's model and reads its eval split).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .errors import StoreError
from .plugins import is_import_path

EVAL_KEY = "eval"  # in a submission's metadata


class EvalSpecError(StoreError):
    """An eval spec is malformed (missing or mistyped field, unknown key)."""


@dataclass(frozen=True)
class EvalSpec:
    """Everything an evaluator needs for one task; every field comes from the job that trained it."""

    eval_path: str  # the task's eval split (Parquet path or pyarrow URI)
    builder: str  # model builder name or "package.module:function" (workers.models)
    target_modules: tuple[str, ...]  # the adapted modules of the base model
    max_length: int  # tokens per example
    batch_size: int  # examples per evaluation batch
    model_name_or_path: str | None = None  # None: the builder's default model
    evaluator: str | None = None  # "package.module:function"; None: the coordinator's default
    # The base weights' dtype (model.dtype of the job: float32, bfloat16, float16; the builder checks the
    # name) and gradient checkpointing (model.gradient_checkpointing), so the task is evaluated on the
    # model it was trained on.
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        problems = _problems(asdict(self))
        if problems:
            raise EvalSpecError("invalid eval spec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``target_modules`` as a list)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> EvalSpec:
        """The inverse of ``to_dict``; ``EvalSpecError`` naming every missing, mistyped or unknown field."""
        if not isinstance(data, dict):
            raise EvalSpecError(f"invalid eval spec: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        problems = [f"unknown key {k!r} (known: {', '.join(sorted(known))})" for k in sorted(set(data) - known)]
        required = {f.name for f in fields(cls) if f.default is MISSING}
        problems += [f"{k} is missing" for k in sorted(required - set(data))]
        if not problems:
            problems = _problems(data)
        if problems:
            raise EvalSpecError("invalid eval spec: " + "; ".join(problems))
        return cls(**{**data, "target_modules": tuple(data["target_modules"])})

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> EvalSpec | None:
        """The spec in a submission's ``metadata`` (None when it carries none)."""
        raw = metadata.get(EVAL_KEY)
        return None if raw is None else cls.from_dict(raw)


def _problems(data: dict[str, Any]) -> list[str]:
    out = []
    for name in ("eval_path", "builder"):
        if not isinstance(data[name], str) or not data[name]:
            out.append(f"{name} must be a non-empty string, got {data[name]!r}")
    modules = data["target_modules"]
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) and m for m in modules):
        out.append(f"target_modules must be a list of module names, got {modules!r}")
    for name in ("max_length", "batch_size"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            out.append(f"{name} must be an integer >= 1, got {value!r}")
    if data.get("model_name_or_path") is not None and not isinstance(data["model_name_or_path"], str):
        out.append(f"model_name_or_path must be a string or null, got {data['model_name_or_path']!r}")
    if not isinstance(data.get("dtype", "float32"), str) or not data.get("dtype", "float32"):
        out.append(f"dtype must be a non-empty string such as 'float32' or 'bfloat16', got {data['dtype']!r}")
    if not isinstance(data.get("gradient_checkpointing", False), bool):
        out.append(f"gradient_checkpointing must be true or false, got {data['gradient_checkpointing']!r}")
    evaluator = data.get("evaluator")
    if evaluator is not None and (not isinstance(evaluator, str) or not is_import_path(evaluator)):
        out.append(f"evaluator must be 'package.module:function' or null, got {evaluator!r}")
    return out
