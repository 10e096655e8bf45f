"""Data-free initialization and exact incremental merging of adapters into a Share subspace.

Per module and side, the subspace spans the columns of ``[U E_1 ... U E_T, X_new]`` (old tasks'
reconstructions and the new tasks' canonical factors). Its top-k SVD is computed without forming
that ``n x (T p)`` matrix or any ``n x n`` covariance: project ``a = U.T X``, orthonormalize the
residual ``Q R = X - U a``, eigendecompose the Gram matrix of the small coordinate matrix
``C = [[E, a], [0, R]]``, and rotate: ``U' = [U Q] W``, ``E_i' = W.T [E_i; 0]``. Initialization is
the same merge into an empty subspace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import LoraAdapter
from .config import KPolicy
from .gauge import canonicalize
from .subspace import ModuleBasis, Subspace, TaskCoefficients, check_task_name

# Residual directions weaker than this (relative to the largest singular value of the new factors)
# carry no information and would only add numerically arbitrary basis vectors. The stored state is
# float32, so an adapter already inside the span leaves a residual of ~1e-7: the cut sits above it.
_RANK_TOL = 1e-6


@dataclass
class MergeReport:
    """What a merge did; every number is JSON-able."""

    new_tasks: list[str]
    k: dict[str, tuple[int, int]]  # module -> (k_A, k_B) after the merge
    explained_variance: dict[str, tuple[float, float]]  # module -> kept fraction of energy (A, B)
    reconstruction_error: dict[str, float]  # task -> |dW' - dW| / |dW| over all modules
    seconds: float
    module_error: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> module -> rel. error

    @property
    def worst_error(self) -> float:
        return max(self.reconstruction_error.values(), default=0.0)


def merge(
    subspace: Subspace | None,
    adapters: dict[str, LoraAdapter],
    policy: KPolicy | None = None,
) -> tuple[Subspace, MergeReport]:
    """Fold ``adapters`` (task name -> adapter) into ``subspace`` and re-project every old task.

    ``subspace=None`` initializes a new subspace from the adapters (Phase 1). The input subspace is
    not modified; a new one is returned with the report. ``policy`` defaults to the subspace's own.
    """
    start = time.perf_counter()
    if not adapters:
        raise ValueError("nothing to merge: pass at least one adapter")
    if policy is None:
        policy = subspace.policy if subspace is not None else KPolicy()
    modules = list(subspace.modules) if subspace is not None else list(next(iter(adapters.values())).factors)
    _check_inputs(subspace, adapters, modules)

    new_names = list(adapters)
    old_names = list(subspace.tasks) if subspace is not None else []
    canon = {
        name: {m: canonicalize(*adapter.factors[m], scaling=adapter.scale(m)) for m in modules}
        for name, adapter in adapters.items()
    }

    new_bases: dict[str, ModuleBasis] = {}
    new_E: dict[str, dict[str, tuple[Tensor, Tensor]]] = {name: {} for name in old_names + new_names}
    sq_err: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in old_names + new_names}
    k_out: dict[str, tuple[int, int]] = {}
    variance: dict[str, tuple[float, float]] = {}
    for m in modules:
        old_basis = subspace.modules[m] if subspace is not None else None
        sides = {}
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
            sides[side] = _merge_side(U, old_E, new_X, policy)
        (U_A, C_A, kept_A, W_A), (U_B, C_B, kept_B, W_B) = sides["A"], sides["B"]
        new_bases[m] = ModuleBasis(U_A=U_A.to(torch.float32), U_B=U_B.to(torch.float32))
        k_out[m] = (U_A.shape[1], U_B.shape[1])
        variance[m] = (kept_A, kept_B)
        widths = [subspace.tasks[t].E[m][0].shape[1] for t in old_names] + [canon[t][m][0].shape[1] for t in new_names]
        for names, group_A, group_B in _groups_by_width(old_names + new_names, widths, C_A, C_B):
            # group_*: g x (k+q) x p, every task's full coordinates in [U Q], before truncation.
            E_A, E_B = W_A.T @ group_A, W_B.T @ group_B
            # |P M P - M|^2 = |M|^2 - |P M P|^2 for orthogonal projections; M = C_B C_A^T.
            total = _frobenius_sq_of_product(group_B, group_A)
            kept = _frobenius_sq_of_product(E_B, E_A)
            E_A32, E_B32 = E_A.to(torch.float32), E_B.to(torch.float32)
            for i, name in enumerate(names):
                new_E[name][m] = (E_A32[i], E_B32[i])
                sq_err[name][m] = (max(float(total[i] - kept[i]), 0.0), max(float(total[i]), 0.0))

    tasks: dict[str, TaskCoefficients] = {}
    errors: dict[str, float] = {}
    module_errors: dict[str, dict[str, float]] = {}
    for name in old_names + new_names:
        source = subspace.tasks[name] if name in old_names else None
        adapter = adapters.get(name)
        head = dict(adapter.head) if adapter is not None else dict(source.head)
        metadata = dict(adapter.metadata) if adapter is not None else dict(source.metadata)
        diff = sum(e for e, _ in sq_err[name].values())
        norm = sum(n for _, n in sq_err[name].values())
        errors[name] = (diff / norm) ** 0.5 if norm > 0 else 0.0
        module_errors[name] = {m: (e / n) ** 0.5 if n > 0 else 0.0 for m, (e, n) in sq_err[name].items()}
        metadata["reconstruction_error"] = errors[name]
        _track_drift(metadata, diff, norm, entering=adapter is not None)
        tasks[name] = TaskCoefficients(E=new_E[name], head=head, metadata=metadata)

    merged = Subspace(
        modules=new_bases,
        tasks=tasks,
        policy=policy,
        metadata=dict(subspace.metadata) if subspace is not None else {},
    )
    report = MergeReport(
        new_tasks=new_names,
        k=k_out,
        explained_variance=variance,
        reconstruction_error=errors,
        seconds=time.perf_counter() - start,
        module_error=module_errors,
    )
    return merged, report


def _track_drift(metadata: dict, sq_diff: float, sq_norm: float, entering: bool) -> None:
    """Cumulative forgetting since the task entered, without its original factors.

    Each merge orthogonally projects a task's update, so ``|dW_now|^2 = |dW_entry|^2 - sum |e_m|^2``
    exactly: ``energy_kept`` is that ratio. ``drift_bound`` sums the per-merge errors relative to
    the entry norm, an upper bound on ``|dW_now - dW_entry| / |dW_entry|`` (triangle inequality).
    """
    if entering:
        metadata["entry_norm"] = sq_norm**0.5
        metadata["energy_kept"] = 1.0
        metadata["drift_bound"] = 0.0
    entry = metadata.get("entry_norm", sq_norm**0.5)
    if entry > 0:
        metadata["energy_kept"] = metadata.get("energy_kept", 1.0) - sq_diff / entry**2
        metadata["drift_bound"] = metadata.get("drift_bound", 0.0) + sq_diff**0.5 / entry


def _merge_side(U: Tensor, old_E: Tensor, X: Tensor, policy: KPolicy) -> tuple[Tensor, Tensor, float, Tensor]:
    """Merge one side of one module.

    ``old_E`` holds every old task's coefficients side by side (``k x sum p``), ``X`` the new
    canonical factors (``dim x sum p_new``). Returns the new basis ``U'``, the full coordinate
    matrix ``C = [[E, a], [0, R]]`` in ``[U Q]`` (old tasks' columns first), the explained-variance
    fraction kept, and the rotation ``W`` (``(k+q) x k'``): new coefficients are ``W.T @ C``.
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
    eigvals, eigvecs = eigvals[order].clamp_min(0.0), eigvecs[:, order]
    k_new = _choose_k(eigvals, policy)
    W = eigvecs[:, :k_new]
    basis = torch.cat([U, Q], dim=1) @ W
    total = float(eigvals.sum())
    kept = float(eigvals[:k_new].sum()) / total if total > 0 else 1.0
    return basis, C, kept, W


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
    available = eigvals.shape[0]
    positive = int((eigvals > 0).sum())
    if policy.k is not None:
        k = policy.k
    else:
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
            raise ValueError(
                f"task {name!r} is already in the subspace; choose another task name "
                "(tasks are never overwritten, so old versions stay reproducible)"
            )
        adapter.validate(name)
        got = set(adapter.factors)
        if got != expected:
            raise ValueError(
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
                raise ValueError(
                    f"adapter {name!r}, module {m!r}: update shape {(B.shape[0], A.shape[1])} does not "
                    f"match {shape} (out x in); was it trained on a different base model?"
                )
