"""Retiring tasks: a new subspace without them, its bases refitted exactly to the tasks that remain.

Per module and side the remaining tasks' coordinates ``E`` (``k x sum p``, side by side) are known,
and ``U E`` is each task's factor, so the best basis for exactly these tasks is ``U W`` with ``W`` the
left singular vectors of ``E`` (the eigenvectors of its ``k x k`` Gram): no ``n``-sized work, no
original adapter needed. Each remaining task's coefficients rotate to ``W.T E_i``. Directions that hold
no remaining task's energy (within the float32 precision the state is stored at) are dropped; the
policy may drop more (fixed ``k``, explained variance, or the fewest directions that keep every
task within ``max_error``), and every remaining task's error is measured as a merge measures it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import KPolicy
from .errors import ShareClError
from .merge import (
    _RANK_TOL,
    MergeReport,
    _DriftArrays,
    _ModuleCut,
    _old_drift,
    _Side,
    _truncate_module,
    _updated_tasks,
)
from .subspace import Subspace, UnknownTaskError, check_task_name

# Metadata key of the returned subspace: which tasks were removed from it, oldest removal first.
REMOVED_TASKS = "removed_tasks"


@dataclass
class RemoveReport(MergeReport):
    """What a removal did, in ``MergeReport``'s terms for the tasks that remain (``new_tasks`` is empty).

    ``reconstruction_error`` is each remaining task's error of this step (zero unless the policy
    truncated below the rank the remaining tasks need); ``error_bound`` their cumulative bound.
    """

    removed_tasks: list[str] = field(default_factory=list)
    k_before: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (k_A, k_B) before the removal


def remove_tasks(
    subspace: Subspace, tasks: Sequence[str], policy: KPolicy | None = None
) -> tuple[Subspace, RemoveReport]:
    """A new subspace without ``tasks``, each module's bases refitted to the remaining tasks.

    The input is not modified. ``policy`` defaults to the subspace's own. Nothing of a removed task
    (coefficients, head, metadata) is in the result; its name is listed in the result's
    ``metadata["removed_tasks"]``. Raises ``ShareClError`` for an empty list, a repeated or unknown
    task, or removing every task.
    """
    start = time.perf_counter()
    removed = _check_removal(subspace, tasks)
    if policy is None:
        policy = subspace.policy
    names = [t for t in subspace.tasks if t not in removed]
    modules = list(subspace.modules)
    entry, prior = _old_drift(subspace, names, modules)

    cuts: dict[str, _ModuleCut] = {}
    for j, (m, basis) in enumerate(subspace.modules.items()):
        pairs = [subspace.tasks[t].E[m] for t in names]  # read once: a stacks row counts its reads
        widths = [E_A.shape[1] for E_A, _ in pairs]
        A = _refit_side(basis.U_A, [E_A for E_A, _ in pairs], widths)
        B = _refit_side(basis.U_B, [E_B for _, E_B in pairs], widths)
        cuts[m] = _truncate_module(names, widths, A, B, _DriftArrays(entry[:, j], prior[:, j]), policy)

    report = RemoveReport(
        new_tasks=[],
        k={m: cut.k for m, cut in cuts.items()},
        explained_variance={m: cut.variance for m, cut in cuts.items()},
        reconstruction_error={},
        seconds=0.0,
        max_error=policy.max_error,
        capped_modules=[m for m, cut in cuts.items() if not cut.met],
        removed_tasks=removed,
        k_before=subspace.k(),
    )
    # Every remaining task's coefficients, errors and bounds, as a merge with no new task updates them.
    kept_tasks = _updated_tasks(subspace, {}, names, modules, cuts, entry, prior, policy, report)
    new_bases = {m: cut.basis for m, cut in cuts.items()}

    metadata = dict(subspace.metadata)
    previous = metadata.get(REMOVED_TASKS)
    metadata[REMOVED_TASKS] = [*(previous if isinstance(previous, list) else []), *removed]
    result = Subspace(modules=new_bases, tasks=kept_tasks, policy=policy, metadata=metadata)
    report.seconds = time.perf_counter() - start
    return result, report


def _check_removal(subspace: Subspace, tasks: Sequence[str]) -> list[str]:
    """The tasks to remove, as a list, after every check (nothing is computed before)."""
    if isinstance(tasks, str):
        raise ShareClError(f"tasks must be a list of task names, got the string {tasks!r}; pass [{tasks!r}]")
    removed = list(tasks)
    if not removed:
        raise ShareClError("nothing to remove: name at least one task of the subspace")
    for name in removed:
        check_task_name(name)
    repeated = sorted({t for t in removed if removed.count(t) > 1})
    if repeated:
        raise ShareClError(f"task(s) {', '.join(map(repr, repeated))} named more than once; name each task once")
    unknown = [t for t in removed if t not in subspace.tasks]
    if unknown:
        raise UnknownTaskError(
            f"cannot remove unknown task(s) {', '.join(map(repr, unknown))}; the subspace holds: "
            f"{', '.join(subspace.tasks) or 'none'}"
        )
    if len(removed) == len(subspace.tasks):
        raise ShareClError(
            f"removing {', '.join(map(repr, removed))} would remove every task of the subspace and leave its bases "
            "spanning nothing; keep at least one task (to start over, use a new store namespace or folder)"
        )
    return removed


def _refit_side(U: Tensor, coefficients: list[Tensor], widths: list[int]) -> _Side:
    """One side of one module: the remaining tasks' coordinates ``C`` in ``U`` and the directions of ``U``
    that hold their energy, strongest first (``eigvecs``, ``k x r``), with the Gram's eigenvalues.

    The left singular vectors of ``C`` (not an eigendecomposition of its Gram) keep a weak task's
    directions apart from round-off. A direction counts if some task holds more than ``_RANK_TOL`` of
    its own norm there: the stored float32 coefficients put ~1e-7 of every task into the directions
    only the removed tasks used, which are dropped.
    """
    U64 = U.to(torch.float64)
    C = torch.cat(coefficients, dim=1).to(torch.float64)
    k = C.shape[0]
    W, s, _ = torch.linalg.svd(C, full_matrices=True)
    eigvals = torch.zeros(k, dtype=torch.float64)
    eigvals[: s.shape[0]] = s.square()
    projected = W.T @ C  # k x sum p: each task's coordinates along each direction
    significant = torch.zeros(k, dtype=torch.bool)
    offset = 0
    for width in widths:
        block = projected[:, offset : offset + width]
        offset += width
        norm = float(torch.linalg.matrix_norm(block))
        if norm > 0:
            significant |= torch.linalg.vector_norm(block, dim=1) > _RANK_TOL * norm
    found = torch.nonzero(significant).flatten()
    rank = int(found[-1]) + 1 if found.numel() else 1  # at least one direction, so shapes stay valid
    return _Side(extended=U64, C=C, eigvals=eigvals[:rank], eigvecs=W[:, :rank])
