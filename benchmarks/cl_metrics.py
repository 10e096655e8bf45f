"""Continual-learning metrics on an accuracy matrix.

``R[i][j]`` is the accuracy on task ``j`` after the system finished task ``i`` (NaN for ``j > i``);
``just_trained[j]`` is the accuracy on task ``j`` right after it was trained, before anything else
happened to the model (for Share: before the merge, so a merge's loss counts as forgetting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from share.errors import ShareClError


def final_accuracy(R: Sequence[Sequence[float]]) -> float:
    """ACC: mean accuracy over all tasks after the last task."""
    last = R[-1]
    return sum(last) / len(last)


def _reference(R: Sequence[Sequence[float]], just_trained: Sequence[float] | None) -> Sequence[float]:
    T = len(R)
    reference = just_trained if just_trained is not None else [R[j][j] for j in range(T)]
    if len(reference) != T or any(len(row) != T for row in R):
        raise ShareClError(
            f"R must be T x T with one just-trained accuracy per task; got {T} rows of lengths "
            f"{sorted({len(row) for row in R})} and {len(reference)} just-trained values"
        )
    return reference


def backward_transfer(R: Sequence[Sequence[float]], just_trained: Sequence[float] | None = None) -> float:
    """BWT: mean over tasks but the last of (final accuracy - accuracy right after training it).

    Negative values are forgetting. ``just_trained`` defaults to the diagonal ``R[j][j]``.
    """
    T = len(R)
    if T < 2:
        return 0.0
    reference = _reference(R, just_trained)
    return sum(R[-1][j] - reference[j] for j in range(T - 1)) / (T - 1)


def merge_loss(R: Sequence[Sequence[float]], just_trained: Sequence[float] | None = None) -> float:
    """Mean over ALL tasks, the last included, of (final accuracy - accuracy right after training it).

    Unlike BWT this counts the last task, so a final merge that truncates the newest task's adapter
    shows. 0 when nothing changed any task after it was trained; negative values are losses.
    """
    reference = _reference(R, just_trained)
    T = len(R)
    return sum(R[-1][j] - reference[j] for j in range(T)) / T


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
