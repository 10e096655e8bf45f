"""Accuracy of every task after a merge, without the coordinator knowing any model or data format.

The coordinator never imports ``workers/`` (ARCHITECTURE.md section 2). Evaluating a task needs the
task's model builder and data reader, which live with the training code, so evaluation is a plug-in:

- A submission that can be evaluated carries an eval spec in its metadata, ``metadata["eval"]``: a
  JSON dict with whatever its evaluator needs (typically the eval Parquet path, the model builder,
  target modules, max length) and optionally ``"evaluator": "package.module:function"``.
- The spec enters the task's metadata in the subspace (see ``validation.SUBMISSION_KEY``), so after
  every later merge, and after any restart, the coordinator still knows how to evaluate that task.
- An evaluator is ``fn(subspace, specs) -> {task: accuracy}``: ``subspace`` is the merged version
  (all tasks), ``specs`` maps the tasks to evaluate to their eval specs. It is resolved by import
  path, like a job's custom model builder: the code is whatever is installed where the coordinator
  runs; nothing but the name travels through the stream. The composition root (``jobs/``) wires the
  training side's evaluator in, either per submission or as the coordinator's default.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from share import Subspace

from .validation import SUBMISSION_KEY

log = logging.getLogger(__name__)

EVAL_KEY = "eval"
EVALUATOR_KEY = "evaluator"
Evaluator = Callable[[Subspace, dict[str, dict[str, Any]]], dict[str, float]]


def load_evaluator(spec: str) -> Evaluator:
    """``"package.module:function"`` -> the function; ValueError naming the spec and the fix."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"evaluator {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"evaluator {spec!r} could not be imported ({err}); install the package that defines it where the "
            "coordinator runs, or drop 'evaluator' from the submission's eval spec"
        ) from err
    if not callable(fn):
        raise ValueError(f"evaluator {spec!r} is not callable")
    return fn


def eval_spec(task_metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The eval spec recorded with a task (None when its submission carried none)."""
    spec = task_metadata.get(SUBMISSION_KEY, {}).get("metadata", {}).get(EVAL_KEY)
    return spec if isinstance(spec, dict) else None


class Evaluation:
    """Evaluates every task of a subspace that has an eval spec, grouped by evaluator.

    ``default`` (an import path or a callable) serves specs that name no evaluator; tasks with
    neither are skipped. Failures never propagate: a merge is published whatever its evaluation
    does, so they come back as per-task error messages for the tracking run.
    """

    def __init__(self, default: str | Evaluator | None = None) -> None:
        self.default = default
        self._loaded: dict[str, Evaluator] = {}

    def _resolve(self, name: str | Evaluator) -> Evaluator:
        if callable(name):
            return name
        if name not in self._loaded:
            self._loaded[name] = load_evaluator(name)
        return self._loaded[name]

    def __call__(self, subspace: Subspace) -> tuple[dict[str, float], dict[str, str]]:
        groups: dict[Any, dict[str, dict[str, Any]]] = {}
        for task, coeffs in subspace.tasks.items():
            spec = eval_spec(coeffs.metadata)
            if spec is None:
                continue
            which = spec.get(EVALUATOR_KEY) or self.default
            if which is None:
                continue
            groups.setdefault(which, {})[task] = spec
        accuracy: dict[str, float] = {}
        errors: dict[str, str] = {}
        for which, specs in groups.items():
            label = which if isinstance(which, str) else getattr(which, "__qualname__", repr(which))
            try:
                result = self._resolve(which)(subspace, specs)
            except Exception as err:  # an evaluator's bug or missing data must not stop merging
                log.warning("evaluator %s failed on %d task(s): %s", label, len(specs), err)
                errors.update({task: f"{label}: {type(err).__name__}: {err}" for task in specs})
                continue
            for task in specs:
                value = result.get(task) if isinstance(result, dict) else None
                if isinstance(value, int | float) and math.isfinite(float(value)):
                    accuracy[task] = float(value)
                else:
                    errors[task] = f"{label} returned no finite accuracy for {task!r} (got {value!r})"
        return accuracy, errors
