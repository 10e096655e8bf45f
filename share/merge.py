"""Data-free initialization and exact incremental merging of adapters into a Share subspace.

Per module and side, the subspace spans the columns of ``[U E_1 ... U E_T, X_new]`` (old tasks'
reconstructions and the new tasks' canonical factors). Its top-k SVD is computed without forming
that ``n x (T p)`` matrix or any ``n x n`` covariance: project ``a = U.T X``, orthonormalize the
residual ``Q R = X - U a``, eigendecompose the Gram matrix of the small coordinate matrix
``C = [[E, a], [0, R]]``, and rotate: ``U' = [U Q] W``, ``E_i' = W.T [E_i; 0]``. Initialization is
the same merge into an empty subspace.

Forgetting. With ``c_i`` a task's coordinates in ``[U Q]`` (per side), its update after the merge is
the two-sided orthogonal projection ``dW' = P_B dW P_A``, so this merge's error is exact and cheap:
``|dW - dW'|^2 = |dW|^2 - |W_kB.T c_B c_A.T W_kA|^2``. Successive truncations do not compose into
one projection, so the error against the update a task had when it was first committed cannot be
computed without its original factors; the sum of the per-merge errors bounds it (triangle
inequality). Per task and module, ``metadata["module_drift"]`` holds that sum relative to the
task's entry norm in the module (``metadata["module_entry_norm"]``). ``KPolicy(max_error=eps)``
keeps, per module, the fewest directions (``k_A + k_B``) that hold every task's bound at ``eps``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapter import LoraAdapter
from .config import KPolicy
from .errors import ShareClError
from .gauge import canonicalize
from .subspace import ModuleBasis, Subspace, TaskCoefficients, check_task_name

# Residual directions weaker than this (relative to the largest singular value of the new factors)
# carry no information and would only add numerically arbitrary basis vectors. The stored state is
# float32, so an adapter already inside the span leaves a residual of ~1e-7: the cut sits above it.
_RANK_TOL = 1e-6
# A task already over the bound may lose no more than this (relative to its entry norm) per merge:
# the merge's own resolution (float64 round-off of kept energy is ~1e-8 after the square root, and
# the stored state is float32), far below anything a model would notice.
_BOUND_SLACK = 1e-6
# Elements of the per-task prefix-energy tensor (tasks x k_B x k_A, float64) built at once: 32 MB.
_PREFIX_CHUNK = 4_000_000

# Metadata keys a merge writes into each task (JSON numbers, or module -> number maps).
ENTRY_NORM = "entry_norm"  # |dW| over all modules when the task entered
ENERGY_KEPT = "energy_kept"  # |dW_now|^2 / |dW_entry|^2 over all modules (exact)
DRIFT_BOUND = "drift_bound"  # sum over merges of the per-merge error over all modules / entry_norm
MODULE_ENTRY_NORM = "module_entry_norm"  # module -> |dW| in that module when the task entered
MODULE_DRIFT = "module_drift"  # module -> sum over merges of the per-merge error there / module entry norm
ERROR_BOUND = "error_bound"  # max over modules of module_drift: what max_error bounds
RECONSTRUCTION_ERROR = "reconstruction_error"  # this merge's error over all modules, relative


@dataclass
class MergeReport:
    """What a merge did; every number is JSON-able.

    Per-merge errors are exact; cumulative ones (``module_drift``, ``error_bound``, ``drift_bound``)
    are upper bounds on the error against the update each task had when it was first committed.
    """

    new_tasks: list[str]
    k: dict[str, tuple[int, int]]  # module -> (k_A, k_B) after the merge
    explained_variance: dict[str, tuple[float, float]]  # module -> kept fraction of energy (A, B)
    reconstruction_error: dict[str, float]  # task -> this merge's |dW' - dW| / |dW| over all modules
    seconds: float
    module_error: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> module -> this merge's error
    module_drift: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> module -> cumulative bound
    error_bound: dict[str, float] = field(default_factory=dict)  # task -> max over modules of module_drift
    energy_kept: dict[str, float] = field(default_factory=dict)  # task -> |dW_now|^2 / |dW_entry|^2
    drift_bound: dict[str, float] = field(default_factory=dict)  # task -> cumulative bound over all modules
    max_error: float | None = None  # the policy's eps; None for the k and variance rules
    over_bound: dict[str, float] = field(default_factory=dict)  # task -> error_bound, tasks this merge left over eps
    capped_modules: list[str] = field(default_factory=list)  # modules where k_max kept the bound from holding
    # module -> (R_A, R_B), float64, k_after x k_before per side: every task that was in the subspace before
    # the merge has ``E_side_after = R_side @ E_side_before`` (up to float32 storage). Empty at initialization.
    rotations: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def worst_error(self) -> float:
        return max(self.reconstruction_error.values(), default=0.0)

    @property
    def within_bound(self) -> bool:
        """False when this merge pushed some task over ``max_error`` (or further over it)."""
        return not self.over_bound


@dataclass(frozen=True)
class _Drift:
    """One task's cumulative bound in one module before this merge."""

    entry_norm: float | None  # None: the task enters now (its current norm is its entry norm)
    drift: float


@dataclass
class _Side:
    """One side of one module, before truncation: ``[U Q]``, ``C`` and the eigenpairs of ``C C.T``."""

    extended: Tensor  # dim x (k + q)
    C: Tensor  # (k + q) x sum p, old tasks' columns first
    eigvals: Tensor  # descending, clamped at 0
    eigvecs: Tensor  # (k + q) x (k + q), columns in the same order


@dataclass
class _ModuleCut:
    """One module after truncation: its bases, k, kept variance, and every task's coefficients and errors."""

    basis: ModuleBasis
    k: tuple[int, int]
    variance: tuple[float, float]
    met: bool  # False: k_max stopped the max_error rule before every task was within its bound
    W: tuple[Tensor, Tensor]  # (W_A, W_B): (k + q) x k' each, the kept eigenvectors; U' = [U Q] W
    E: dict[str, tuple[Tensor, Tensor]]  # task -> (E_A, E_B), float32
    sq_err: dict[str, tuple[float, float]]  # task -> (|dW - dW'|^2, |dW|^2) in this module


def _truncate_module(
    names: list[str], widths: list[int], A: _Side, B: _Side, drift: dict[str, _Drift], policy: KPolicy
) -> _ModuleCut:
    """Choose k per side by ``policy``, rotate the extended bases, and project every task (``names``, whose
    coordinates are the columns of ``A.C``/``B.C`` in order, ``widths`` each). Used by merge and removal."""
    groups = _groups_by_width(names, widths, A.C, B.C)
    met = True
    if policy.max_error is not None:
        k_A, k_B, met = _choose_k_bounded(groups, A, B, drift, policy.max_error, policy.k_max)
    else:
        k_A, k_B = _choose_k(A.eigvals, policy), _choose_k(B.eigvals, policy)
    W_A, W_B = A.eigvecs[:, :k_A], B.eigvecs[:, :k_B]
    basis = ModuleBasis(U_A=(A.extended @ W_A).to(torch.float32), U_B=(B.extended @ W_B).to(torch.float32))
    E: dict[str, tuple[Tensor, Tensor]] = {}
    sq_err: dict[str, tuple[float, float]] = {}
    for group_names, group_A, group_B in groups:
        # group_*: g x (k+q) x p, every task's full coordinates in [U Q], before truncation.
        E_A, E_B = W_A.T @ group_A, W_B.T @ group_B
        # |P M P - M|^2 = |M|^2 - |P M P|^2 for orthogonal projections; M = C_B C_A^T.
        total = _frobenius_sq_of_product(group_B, group_A)
        kept = _frobenius_sq_of_product(E_B, E_A)
        E_A32, E_B32 = E_A.to(torch.float32), E_B.to(torch.float32)
        for i, name in enumerate(group_names):
            E[name] = (E_A32[i], E_B32[i])
            sq_err[name] = (max(float(total[i] - kept[i]), 0.0), max(float(total[i]), 0.0))
    variance = (_kept_fraction(A.eigvals, k_A), _kept_fraction(B.eigvals, k_B))
    return _ModuleCut(basis, (k_A, k_B), variance, met, (W_A, W_B), E, sq_err)


def merge(
    subspace: Subspace | None,
    adapters: dict[str, LoraAdapter],
    policy: KPolicy | None = None,
) -> tuple[Subspace, MergeReport]:
    """Fold ``adapters`` (task name -> adapter) into ``subspace`` and re-project every old task.

    ``subspace=None`` initializes a new subspace from the adapters (Phase 1). The input subspace is
    not modified; a new one is returned with the report. ``policy`` defaults to the subspace's own.
    A merge never raises because a task ends over ``max_error``: the report names such tasks
    (``over_bound``) and the caller decides.
    """
    start = time.perf_counter()
    if not adapters:
        raise ShareClError("nothing to merge: pass at least one adapter")
    if policy is None:
        policy = subspace.policy if subspace is not None else KPolicy()
    modules = list(subspace.modules) if subspace is not None else list(next(iter(adapters.values())).factors)
    _check_inputs(subspace, adapters, modules)

    new_names = list(adapters)
    old_names = list(subspace.tasks) if subspace is not None else []
    names = old_names + new_names
    canon = {
        name: {m: canonicalize(*adapter.factors[m], scaling=adapter.scale(m)) for m in modules}
        for name, adapter in adapters.items()
    }
    before = {name: _module_drift_before(subspace.tasks[name].metadata) for name in old_names}

    new_bases: dict[str, ModuleBasis] = {}
    new_E: dict[str, dict[str, tuple[Tensor, Tensor]]] = {name: {} for name in names}
    sq_err: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in names}
    k_out: dict[str, tuple[int, int]] = {}
    variance: dict[str, tuple[float, float]] = {}
    capped: list[str] = []
    rotations: dict[str, tuple[Tensor, Tensor]] = {}
    for m in modules:
        old_basis = subspace.modules[m] if subspace is not None else None
        sides: dict[str, _Side] = {}
        for side in ("A", "B"):
            if old_basis is None:
                dim = adapters[new_names[0]].factors[m][1 if side == "A" else 0].shape[1 if side == "A" else 0]
                U = torch.zeros(dim, 0, dtype=torch.float64)
            else:
                U = (old_basis.U_A if side == "A" else old_basis.U_B).to(torch.float64)
            old_E = (
                torch.cat([subspace.tasks[t].E[m][0 if side == "A" else 1] for t in old_names], dim=1)
                if old_names
                else U.new_zeros(U.shape[1], 0)
            ).to(torch.float64)
            # Canonical B is n x p; canonical A is p x d, so its column space lives in A.T.
            new_X = torch.cat([canon[t][m][1].T if side == "A" else canon[t][m][0] for t in new_names], dim=1)
            sides[side] = _side_coordinates(U, old_E, new_X)
        widths = [subspace.tasks[t].E[m][0].shape[1] for t in old_names] + [canon[t][m][0].shape[1] for t in new_names]
        drift = {t: before[t].get(m, _Drift(None, 0.0)) for t in old_names}
        cut = _truncate_module(names, widths, sides["A"], sides["B"], drift, policy)
        new_bases[m], k_out[m], variance[m] = cut.basis, cut.k, cut.variance
        if not cut.met:
            capped.append(m)
        if old_basis is not None:
            # Old tasks' coordinates in [U Q] are [E_i; 0], so E_i' = W.T [E_i; 0] = W[:k].T E_i.
            W_A, W_B = cut.W
            rotations[m] = (W_A[: old_basis.k_A].T.contiguous(), W_B[: old_basis.k_B].T.contiguous())
        for name in names:
            new_E[name][m], sq_err[name][m] = cut.E[name], cut.sq_err[name]

    tasks: dict[str, TaskCoefficients] = {}
    report = MergeReport(
        new_tasks=new_names,
        k=k_out,
        explained_variance=variance,
        reconstruction_error={},
        seconds=0.0,
        max_error=policy.max_error,
        capped_modules=capped,
        rotations=rotations,
    )
    for name in names:
        source = subspace.tasks[name] if name in old_names else None
        adapter = adapters.get(name)
        head = dict(adapter.head) if adapter is not None else dict(source.head)
        metadata = dict(adapter.metadata) if adapter is not None else dict(source.metadata)
        diff = sum(e for e, _ in sq_err[name].values())
        norm = sum(n for _, n in sq_err[name].values())
        report.reconstruction_error[name] = (diff / norm) ** 0.5 if norm > 0 else 0.0
        report.module_error[name] = {mod: (e / n) ** 0.5 if n > 0 else 0.0 for mod, (e, n) in sq_err[name].items()}
        metadata[RECONSTRUCTION_ERROR] = report.reconstruction_error[name]
        _track_drift(metadata, diff, norm, entering=adapter is not None)
        previous = before.get(name, {})
        _track_module_drift(metadata, sq_err[name], previous)
        report.module_drift[name] = dict(metadata[MODULE_DRIFT])
        report.error_bound[name] = metadata[ERROR_BOUND]
        report.energy_kept[name] = metadata[ENERGY_KEPT]
        report.drift_bound[name] = metadata[DRIFT_BOUND]
        if policy.max_error is not None and _pushed_over(report.module_drift[name], previous, policy.max_error):
            report.over_bound[name] = metadata[ERROR_BOUND]
        tasks[name] = TaskCoefficients(E=new_E[name], head=head, metadata=metadata)

    merged = Subspace(
        modules=new_bases,
        tasks=tasks,
        policy=policy,
        metadata=dict(subspace.metadata) if subspace is not None else {},
    )
    report.seconds = time.perf_counter() - start
    return merged, report


def _pushed_over(after: dict[str, float], before: dict[str, _Drift], eps: float) -> bool:
    """Whether this merge left some module of the task over ``eps`` with error it added there."""
    return any(
        drift > eps and drift > (before[m].drift if m in before else 0.0) + _BOUND_SLACK for m, drift in after.items()
    )


def _module_drift_before(metadata: dict[str, Any]) -> dict[str, _Drift]:
    """A committed task's per-module entry norms and drifts, as the last merge wrote them.

    Tasks committed before per-module tracking existed have none: their tracking starts now, with
    their current update as the entry (their whole-task ``drift_bound`` still carries the past).
    """
    norms, drifts = metadata.get(MODULE_ENTRY_NORM), metadata.get(MODULE_DRIFT)
    if not isinstance(norms, dict) or not isinstance(drifts, dict):
        return {}
    return {m: _Drift(float(norms[m]), float(drifts.get(m, 0.0))) for m in norms}


def _track_drift(metadata: dict, sq_diff: float, sq_norm: float, entering: bool) -> None:
    """Cumulative forgetting since the task entered, over all modules, without its original factors.

    Each merge orthogonally projects a task's update, so ``|dW_now|^2 = |dW_entry|^2 - sum |e_m|^2``
    exactly: ``energy_kept`` is that ratio. ``drift_bound`` sums the per-merge errors relative to
    the entry norm, an upper bound on ``|dW_now - dW_entry| / |dW_entry|`` (triangle inequality).
    """
    if entering:
        metadata[ENTRY_NORM] = sq_norm**0.5
        metadata[ENERGY_KEPT] = 1.0
        metadata[DRIFT_BOUND] = 0.0
    entry = metadata.get(ENTRY_NORM, sq_norm**0.5)
    if entry > 0:
        metadata[ENERGY_KEPT] = metadata.get(ENERGY_KEPT, 1.0) - sq_diff / entry**2
        metadata[DRIFT_BOUND] = metadata.get(DRIFT_BOUND, 0.0) + sq_diff**0.5 / entry


def _track_module_drift(metadata: dict, sq_err: dict[str, tuple[float, float]], before: dict[str, _Drift]) -> None:
    """The per-module version of ``drift_bound``, and its worst module (``error_bound``)."""
    norms: dict[str, float] = {}
    drifts: dict[str, float] = {}
    for m, (sq_diff, sq_norm) in sq_err.items():
        state = before.get(m, _Drift(None, 0.0))
        entry = state.entry_norm if state.entry_norm is not None else sq_norm**0.5
        norms[m] = entry
        drifts[m] = state.drift + (sq_diff**0.5 / entry if entry > 0 else 0.0)
    metadata[MODULE_ENTRY_NORM] = norms
    metadata[MODULE_DRIFT] = drifts
    metadata[ERROR_BOUND] = max(drifts.values(), default=0.0)


def _side_coordinates(U: Tensor, old_E: Tensor, X: Tensor) -> _Side:
    """One side of one module: ``[U Q]``, the coordinates ``C = [[E, a], [0, R]]`` and their Gram's eigenpairs.

    ``old_E`` holds every old task's coefficients side by side (``k x sum p``), ``X`` the new
    canonical factors (``dim x sum p_new``). The eigenvectors ``W`` of ``C C.T`` rotate ``[U Q]``
    into the new basis (``U' = [U Q] W[:, :k']``); new coefficients are ``W[:, :k'].T @ C``.
    """
    dim, k = U.shape
    a = U.T @ X
    residual = X - U @ a
    residual = residual - U @ (U.T @ residual)  # second pass: orthogonal to U to working precision
    Q, R = _orthonormal_part(residual, reference=X, limit=dim - k)
    q = Q.shape[1]
    C_old = torch.cat([old_E, old_E.new_zeros(q, old_E.shape[1])], dim=0)
    C_new = torch.cat([a, R], dim=0)
    C = torch.cat([C_old, C_new], dim=1)
    # Gram of C: its eigenvectors are the left singular vectors of the stacked reconstructions.
    eigvals, eigvecs = torch.linalg.eigh(C @ C.T)
    order = torch.argsort(eigvals, descending=True)
    return _Side(torch.cat([U, Q], dim=1), C, eigvals[order].clamp_min(0.0), eigvecs[:, order])


def _kept_fraction(eigvals: Tensor, k: int) -> float:
    total = float(eigvals.sum())
    return float(eigvals[:k].sum()) / total if total > 0 else 1.0


def _choose_k_bounded(
    groups: list[tuple[list[str], Tensor, Tensor]],
    A: _Side,
    B: _Side,
    drift: dict[str, _Drift],
    eps: float,
    k_max: int | None,
) -> tuple[int, int, bool]:
    """The ``(k_A, k_B)`` with the smallest ``k_A + k_B`` that keeps every task's bound at ``eps``.

    Task ``i``'s bound after keeping the first ``b`` directions of ``B`` and ``a`` of ``A`` is
    ``drift_i + sqrt(|M_i|^2 - sum_{r<b, s<a} M_i[r, s]^2) / entry_i`` with
    ``M_i = W_B.T c_B c_A.T W_A`` (every direction): one 2-D cumulative sum of ``M_i^2`` gives it for
    all prefixes at once. It falls as either ``k`` grows, so in each row ``b`` the feasible ``a``
    form a suffix and the frontier is one count per row. A task already over ``eps`` may lose
    nothing more. Returns ``(k_A, k_B, met)``; when no pair within ``k_max``
    holds the bound, the largest allowed pair, which minimizes every task's error, and ``met=False``.
    """
    # Every direction is a candidate, not only those of positive eigenvalue: next to a huge adapter,
    # old tasks' eigenvalues sink below float64 round-off of the Gram, while their energy (measured
    # in c, not in the Gram) stays exact. Directions that hold nothing are never needed.
    cap_A = A.eigvecs.shape[1] if k_max is None else min(A.eigvecs.shape[1], k_max)
    cap_B = B.eigvecs.shape[1] if k_max is None else min(B.eigvecs.shape[1], k_max)
    if cap_A == 0 or cap_B == 0:  # nothing spans anything: every update is zero
        return 1, 1, True
    W_A, W_B = A.eigvecs[:, :cap_A], B.eigvecs[:, :cap_B]
    worst = torch.full((cap_B, cap_A), -math.inf, dtype=torch.float64)
    for names, group_A, group_B in groups:
        chunk = max(1, _PREFIX_CHUNK // (cap_A * cap_B))
        for lo in range(0, len(names), chunk):
            c_A, c_B = group_A[lo : lo + chunk], group_B[lo : lo + chunk]
            total = _frobenius_sq_of_product(c_B, c_A)  # |M_i|^2 over every direction
            M = (W_B.T @ c_B) @ (W_A.T @ c_A).transpose(1, 2)  # g x cap_B x cap_A
            kept = M.square().cumsum(dim=1).cumsum(dim=2)
            entry, prior, limit = _bound_terms(names[lo : lo + chunk], total, drift, eps)
            lost = (total[:, None, None] - kept).clamp_min(0.0).sqrt()
            excess = prior[:, None, None] + lost / entry[:, None, None] - limit[:, None, None]
            excess[entry == 0] = -math.inf
            worst = torch.maximum(worst, excess.amax(dim=0))
    feasible = worst <= 0
    # Row b (k_B = b + 1): the smallest feasible k_A is one more than the count of infeasible entries.
    k_A_min = (~feasible).sum(dim=1) + 1
    rows = torch.nonzero(k_A_min <= cap_A).flatten()
    if rows.numel() == 0:
        return cap_A, cap_B, False
    d, n = A.extended.shape[0], B.extended.shape[0]
    candidates = [(int(k_A_min[b]), int(b) + 1) for b in rows]
    k_A, k_B = min(candidates, key=lambda ab: (ab[0] + ab[1], ab[0] * d + ab[1] * n, ab[1]))
    return k_A, k_B, True


def _bound_terms(
    names: list[str], total: Tensor, drift: dict[str, _Drift], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per task: entry norm, drift before this merge, and the largest bound allowed after it."""
    entry, prior, limit = [], [], []
    for i, name in enumerate(names):
        state = drift.get(name, _Drift(None, 0.0))
        entry.append(state.entry_norm if state.entry_norm is not None else float(total[i]) ** 0.5)
        prior.append(state.drift)
        limit.append(eps if state.drift <= eps else state.drift + _BOUND_SLACK)
    return tuple(torch.tensor(values, dtype=torch.float64) for values in (entry, prior, limit))


def _groups_by_width(
    names: list[str], widths: list[int], C_A: Tensor, C_B: Tensor
) -> list[tuple[list[str], Tensor, Tensor]]:
    """Split the coordinate matrices per task, stacked as ``g x (k+q) x p`` for tasks of equal ``p``.

    Usually every task has the same ``p`` and this is one reshape, so the work that follows is a
    few batched products instead of a loop over tasks.
    """
    if len(set(widths)) == 1:
        p, T = widths[0], len(names)
        return [(names, _stack(C_A, T, p), _stack(C_B, T, p))]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    groups = []
    for width in sorted(set(widths)):
        idx = [i for i, w in enumerate(widths) if w == width]
        cols = torch.tensor([c for i in idx for c in range(offsets[i], offsets[i] + width)])
        groups.append(
            ([names[i] for i in idx], _stack(C_A[:, cols], len(idx), width), _stack(C_B[:, cols], len(idx), width))
        )
    return groups


def _stack(C: Tensor, T: int, p: int) -> Tensor:
    return C.reshape(C.shape[0], T, p).permute(1, 0, 2)


def _frobenius_sq_of_product(B: Tensor, A: Tensor) -> Tensor:
    """``|B_i A_i^T|_F^2`` for each ``i`` of batched ``B`` (``g x m x p``) and ``A`` (``g x n x p``)."""
    return ((B.transpose(1, 2) @ B) * (A.transpose(1, 2) @ A)).sum(dim=(1, 2))


def _orthonormal_part(residual: Tensor, reference: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """``Q R = residual`` with ``Q`` orthonormal, keeping only numerically significant directions."""
    if residual.shape[1] == 0 or limit <= 0:
        return residual.new_zeros(residual.shape[0], 0), residual.new_zeros(0, residual.shape[1])
    Q, s, Vh = torch.linalg.svd(residual, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(reference, ord=2)) if reference.numel() else 0.0
    q = int((s > _RANK_TOL * max(scale, 1e-300)).sum())
    q = min(q, limit)
    return Q[:, :q], s[:q, None] * Vh[:q]


def _choose_k(eigvals: Tensor, policy: KPolicy) -> int:
    """The fixed-k and explained-variance rules, per side."""
    available = eigvals.shape[0]
    positive = int((eigvals > 0).sum())
    if policy.k is not None:
        k = policy.k
    else:
        assert policy.variance is not None
        total = float(eigvals.sum())
        if total <= 0:
            k = 1
        else:
            cumulative = torch.cumsum(eigvals, dim=0) / total
            k = int((cumulative < policy.variance - 1e-12).sum()) + 1
    if policy.k_max is not None:
        k = min(k, policy.k_max)
    # Never keep more directions than the data spans (at least one, so shapes stay valid).
    return max(1, min(k, available, max(positive, 1)))


def _check_inputs(subspace: Subspace | None, adapters: dict[str, LoraAdapter], modules: list[str]) -> None:
    """Validate everything before any computation, so a bad adapter changes nothing."""
    expected = set(modules)
    for name, adapter in adapters.items():
        check_task_name(name)
        if subspace is not None and name in subspace.tasks:
            raise ShareClError(
                f"task {name!r} is already in the subspace; choose another task name "
                "(tasks are never overwritten, so old versions stay reproducible)"
            )
        adapter.validate(name)
        got = set(adapter.factors)
        if got != expected:
            raise ShareClError(
                f"adapter {name!r}: modules do not match the subspace's; unknown: {sorted(got - expected)}, "
                f"missing: {sorted(expected - got)}. Train it with the same target_modules"
            )
        for m in modules:
            B, A = adapter.factors[m]
            if subspace is not None:
                basis = subspace.modules[m]
                shape = (basis.out_features, basis.in_features)
            else:
                B0, A0 = next(iter(adapters.values())).factors[m]
                shape = (B0.shape[0], A0.shape[1])
            if (B.shape[0], A.shape[1]) != shape:
                raise ShareClError(
                    f"adapter {name!r}, module {m!r}: update shape {(B.shape[0], A.shape[1])} does not "
                    f"match {shape} (out x in); was it trained on a different base model?"
                )
            if B.shape[1] > min(shape):
                raise ShareClError(
                    f"adapter {name!r}, module {m!r}: rank {B.shape[1]} exceeds the layer's "
                    f"min(out, in) = {min(shape)} for update shape {shape}; retrain with r <= {min(shape)}"
                )
