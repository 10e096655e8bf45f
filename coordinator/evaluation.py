"""Accuracy of every task after a merge, without the coordinator knowing any model or data format.

The coordinator never imports ``workers/`` (docs/architecture.md). Evaluating a task needs the
task's model builder and data reader, which live with the training code, so evaluation is a plug-in:

- A submission that can be evaluated carries a ``subspace_store.EvalSpec`` in its metadata
  (``metadata["eval"]``): the eval split, the model builder, target modules, max length, batch size,
  and optionally ``evaluator``: ``"package.module:function"``.
- The spec enters the task's metadata in the subspace (see ``validation.SUBMISSION_KEY``), so after
  every later merge, and after any restart, the coordinator still knows how to evaluate that task.
- An evaluator is ``fn(subspace, specs) -> {task: accuracy}``: ``subspace`` is the merged version
  (all tasks), ``specs`` maps the tasks to evaluate to their ``EvalSpec``. It is resolved by import
  path, like a job's custom model builder: the code is whatever is installed where the coordinator
  runs; nothing but the name travels through the stream. The composition root (``jobs/``) wires the
  training side's evaluator in, either per submission or as the coordinator's default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from share import Subspace
from subspace_store import EvalSpec, load_callable
from subspace_store.evalspec import EvalSpecError

from .validation import SUBMISSION_KEY

log = logging.getLogger(__name__)

Evaluator = Callable[[Subspace, dict[str, EvalSpec]], dict[str, float]]


def load_evaluator(path: str) -> Evaluator:
    """``"package.module:function"`` -> the function; ``PluginImportError`` naming the path and the fix."""
    return load_callable(
        path,
        "evaluator",
        "install the package that defines it where the coordinator runs, or drop 'evaluator' from the "
        "submission's eval spec",
    )


def eval_spec(task_metadata: dict[str, Any]) -> EvalSpec | None:
    """The eval spec recorded with a task (None when its submission carried none); ``EvalSpecError``
    if it is malformed."""
    return EvalSpec.of(task_metadata.get(SUBMISSION_KEY, {}).get("metadata", {}))


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
        groups: dict[Any, dict[str, EvalSpec]] = {}
        errors: dict[str, str] = {}
        for task, coeffs in subspace.tasks.items():
            try:
                spec = eval_spec(coeffs.metadata)
            except EvalSpecError as err:
                errors[task] = str(err)
                continue
            if spec is None:
                continue
            which = spec.evaluator or self.default
            if which is None:
                continue
            groups.setdefault(which, {})[task] = spec
        accuracy: dict[str, float] = {}
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
