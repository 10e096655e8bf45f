"""Data-free initialization and exact incremental merging of adapters into a Share subspace.

Per module and side, the subspace spans the columns of ``[U E_1 ... U E_T, X_new]`` (old tasks'
reconstructions and the new tasks' canonical factors). Its top-k SVD is computed without forming
that ``n x (T p)`` matrix or any ``n x n`` covariance: project ``a = U.T X``, orthonormalize the
residual ``Q R = X - U a`` (through its smaller Gram matrix, checked, with a thin SVD as the exact
fallback), eigendecompose the Gram matrix of the small coordinate matrix ``C = [[E, a], [0, R]]``,
whose old block ``E E.T`` is kept from the previous merge (``ModuleBasis.gram_cache``), and rotate:
``U' = [U Q] W``, ``E_i' = W.T [E_i; 0]`` (one batched product for all old tasks; ``W[:k].T`` is
reported as ``MergeReport.rotations``). Initialization is the same merge into an empty subspace.

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

import array
import math
import operator
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import cyclic_gc
from .adapter import LoraAdapter
from .config import KPolicy
from .errors import ShareClError
from .gauge import canonicalize, canonicalize_batch
from .subspace import ModuleBasis, StackedCoefficients, Subspace, TaskCoefficients, TaskStacks, check_task_name

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
# A basis built from a Gram-based frame (the fast path) must be orthonormal to this (float64), or the
# module is merged again on the exact path (a thin SVD of the residual).
_ORTHONORMAL_TOL = 1e-9
# Up to this many new columns per side, the thin SVD of the residual is as cheap as any Gram matrix (and
# needs no check): the Gram path pays off for batches of many adapters (compress, large merges).
_SVD_COLUMNS = 64
# Elements (float64) of one side's rotated coordinates worked on at once in ``_truncate_module`` (1 MB): small enough
# to stay in cache between the product, the energies and the float32 copy.
_ROTATE_CHUNK = 1 << 17
# Past this many old columns per side (sum of the old tasks' widths), C C.T is assembled from the running
# Gram of the old tasks (ModuleBasis.gram_cache) instead of multiplied out.
_GRAM_FROM_CACHE = 512

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
class _DriftArrays:
    """Every task's cumulative bound in one module before this merge, as arrays in the merge's task order."""

    entry: Tensor  # float64; NaN: the task enters now
    prior: Tensor  # float64; the cumulative bound before this merge


@dataclass(frozen=True)
class _GramCache:
    """``sum_i E_i E_i.T`` per side (float64) of exactly these tasks, kept on a ``ModuleBasis`` by ``merge``."""

    tasks: tuple[str, ...]
    A: Tensor
    B: Tensor


# Tasks of one width, stacked: (positions in the merge's task order, tasks x rows x p per side). The rows are
# the leading rows of the frame's coordinates; the rest are zero (an old task's coordinates are [E_i; 0]).
# Float64, or float32 where they are the stored stacks (``_old_groups``): what reads them converts what it reads.
_Group = tuple[Tensor, Tensor, Tensor]


@dataclass
class _Side:
    """One side of one module, before truncation: the frame, ``C`` and the eigenpairs of ``C C.T``.

    Without ``to_basis`` the frame is ``extended`` itself (orthonormal). With it, the frame's directions are
    ``extended @ to_basis`` (the merge's fast path never forms them; see ``_side_coordinates``).
    """

    extended: Tensor  # dim x K (or dim x (k + m) with to_basis)
    C: Tensor  # K x sum p, old tasks' columns first (merge: only the new tasks' when the old Gram is given)
    eigvals: Tensor  # descending, clamped at 0
    eigvecs: Tensor  # K x K (or fewer columns), columns in the same order
    to_basis: Tensor | None = None  # (k + m) x K: frame directions as combinations of extended's columns
    gram: Tensor | None = None  # C C.T (K x K), float64, when the caller has it
    # The frame comes from a Gram matrix: check the new basis. ``U.T U - I`` of the old basis (stored in
    # float32, so ~1e-7), which the check discounts: only the new directions' defect counts.
    old_defect: Tensor | None = None


@dataclass
class _ModuleCut:
    """One module after truncation: its bases, k, kept variance, and every task's coefficients and errors."""

    names: list[str]
    basis: ModuleBasis
    k: tuple[int, int]
    variance: tuple[float, float]
    met: bool  # False: k_max stopped the max_error rule before every task was within its bound
    W: tuple[Tensor, Tensor]  # (W_A, W_B): K x k' each, the kept eigenvectors; U' = frame @ W
    # Every task's (E_A, E_B), float32: stacked in names order (tasks x k' x p per side) when all have one
    # width, else one pair per task in names order.
    stacks: tuple[Tensor, Tensor] | None
    pairs: list[tuple[Tensor, Tensor]] | None
    sq_diff: Tensor  # per task: |dW - dW'|^2 in this module (float64)
    sq_norm: Tensor  # per task: |dW|^2 in this module before the truncation
    orthonormal: bool  # False: a Gram-based frame lost orthonormality; redo the module on the exact path
    gram: tuple[Tensor, Tensor] | None  # W.T (C C.T) W per side: the kept tasks' Gram in the new bases

    @cached_property
    def E(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.stacks is not None:
            return dict(zip(self.names, zip(*(S.unbind(0) for S in self.stacks), strict=True), strict=True))
        assert self.pairs is not None
        return dict(zip(self.names, self.pairs, strict=True))


def _truncate_module(
    names: list[str],
    widths: list[int],
    A: _Side,
    B: _Side,
    drift: _DriftArrays,
    policy: KPolicy,
    totals: Tensor | None = None,
    groups: list[_Group] | None = None,
) -> _ModuleCut:
    """Choose k per side by ``policy``, rotate the extended bases, and project every task (``names``, whose
    coordinates are the columns of ``A.C``/``B.C`` in order, ``widths`` each, unless ``groups`` gives them
    stacked). Used by merge and removal.

    Work over tasks is batched (one product per side for a chunk of tasks of equal width, small enough to stay
    in cache). When nothing is dropped (every direction of both frames kept), every task keeps its update
    exactly: its error is 0.

    Errors: with ``totals`` (every task's ``|M|^2``, given at initialization, where ``C`` may hold only some
    rows) or for the ``max_error`` rule (which needs them to choose k), ``|P M P - M|^2 = |M|^2 - |P M P|^2``.
    Otherwise, when the eigenvectors span the whole frame (``V`` square and orthogonal: a merge, or a removal
    whose frame is all kept directions), from each task's kept and dropped coordinates ``W.T c`` and
    ``V_drop.T c`` (``_split_energies``): no cancellation, and no second pass over the old coordinates.
    """
    if groups is None:
        groups = _groups_by_width(widths, A.C, B.C)
    split = totals is None and policy.max_error is None and _square(A.eigvecs) and _square(B.eigvecs)
    if totals is None and not split:  # every task's |M|^2 over all directions, for the choice of k and the errors
        # The coordinates are read more than once on this path: stored float32 stacks are converted once.
        groups = [(index, group_A.double(), group_B.double()) for index, group_A, group_B in groups]
        totals = _energies(groups, len(names))
    met = True
    if policy.max_error is not None:
        assert totals is not None
        k_A, k_B, met = _choose_k_bounded(groups, A, B, drift, policy.max_error, policy.k_max, totals)
    else:
        k_A, k_B = _choose_k(A.eigvals, policy), _choose_k(B.eigvals, policy)
    W_A, W_B = A.eigvecs[:, :k_A], B.eigvecs[:, :k_B]
    U_A, U_B = _basis(A, W_A), _basis(B, W_B)
    # A direction's sign is the solver's choice: fix it (largest-magnitude entry positive), so the subspace
    # depends only on what was merged, as the canonical gauge does for adapters. W carries the signs into
    # every task's coefficients and the rotations.
    signs_A, signs_B = _column_signs(U_A), _column_signs(U_B)
    W_A, W_B, U_A, U_B = W_A * signs_A, W_B * signs_B, U_A * signs_A, U_B * signs_B
    orthonormal = _orthonormal(U_A, A, W_A) and _orthonormal(U_B, B, W_B)
    basis = ModuleBasis(U_A=U_A.to(torch.float32), U_B=U_B.to(torch.float32))
    # The frame has max(rows of C, eigenvalues) directions (C may hold only the rows the policy can keep).
    dropped = k_A < max(A.eigvecs.shape[0], A.eigvals.shape[0]) or k_B < max(B.eigvecs.shape[0], B.eigvals.shape[0])
    # With the split errors, one product per side gives every task's kept and dropped coordinates at once.
    V_A = torch.cat([W_A, A.eigvecs[:, k_A:]], dim=1) if split and dropped else W_A
    V_B = torch.cat([W_B, B.eigvecs[:, k_B:]], dim=1) if split and dropped else W_B
    count = len(names)
    sq_diff = torch.zeros(count, dtype=torch.float64)
    sq_norm = torch.zeros(count, dtype=torch.float64)
    # One width, groups in task order (the usual case): every task's E is a row of one fresh stack per side.
    stacks = _empty_stacks(groups, count, k_A, k_B)
    outputs: list[_Group] = []
    # c_*: g x rows x p, a chunk of tasks' coordinates in the frame (rows past these are 0), before truncation
    # (float32 when they are the stored stacks), worked on one side at a time.
    width = max(V_A.shape[1], V_B.shape[1], 1)
    for at, c_A, c_B in _chunks(groups, _ROTATE_CHUNK, lambda p: width * p):
        rows = _rows(at) if stacks is not None else None
        out_A, out_B = (None, None) if rows is None else (stacks[0][rows], stacks[1][rows])
        E_A, G_A = _project(V_A, k_A, c_A, out_A, grams=split or dropped)
        E_B, G_B = _project(V_B, k_B, c_B, out_B, grams=split or dropped)
        if split:
            assert G_A is not None and G_B is not None
            sq_norm[at], sq_diff[at] = _split_energies(G_A, G_B)
        else:
            # |P M P - M|^2 = |M|^2 - |P M P|^2 for orthogonal projections; M = C_B C_A^T.
            assert totals is not None
            total = totals[at]
            sq_norm[at] = total.clamp_min(0.0)
            if dropped:
                assert G_A is not None and G_B is not None
                sq_diff[at] = (total - _inner(G_B[0], G_A[0])).clamp_min(0.0)
        if rows is None:
            outputs.append((at, E_A, E_B))
    pairs = None if stacks is not None else _pairs_in_order(outputs, count)
    gram = None
    if A.gram is not None and B.gram is not None:
        gram = (W_A.T @ A.gram @ W_A, W_B.T @ B.gram @ W_B)
    variance = (_kept_fraction(A.eigvals, k_A), _kept_fraction(B.eigvals, k_B))
    return _ModuleCut(
        names,
        basis,
        (k_A, k_B),
        variance,
        met,
        (W_A, W_B),
        stacks,
        pairs,
        sq_diff,
        sq_norm,
        orthonormal,
        gram,
    )


def _square(V: Tensor) -> bool:
    return V.shape[0] == V.shape[1]


def _project(
    V: Tensor, k: int, group: Tensor, out: Tensor | None, grams: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """One side of a chunk of tasks: ``P = V[:rows].T c`` for each task's coordinates ``c`` (``group``,
    ``g x rows x p``, float32 or float64), its first ``k`` rows (the kept coordinates ``E``) written as float32
    into ``out`` (or a fresh tensor when None), and with ``grams`` the Gram matrices ``E.T E`` and ``D.T D`` of
    the kept and the dropped coordinates (``D``: the rows of ``P`` past ``k``; none when ``V`` has ``k`` columns)."""
    P = V[: group.shape[1]].T @ group.to(torch.float64)
    E, D = P[:, :k], P[:, k:]
    E32 = E.to(torch.float32) if out is None else out.copy_(E)
    return E32, ((E.mT @ E, D.mT @ D) if grams else None)


def _split_energies(G_A: tuple[Tensor, Tensor], G_B: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per task, ``|M|^2`` and ``|M - P M P|^2`` from the Gram matrices of its kept (``E = W.T c``) and dropped
    (``D = V_drop.T c``) coordinates per side (``G_side = (E.T E, D.T D)``), ``V = [W V_drop]`` orthogonal: with
    ``<.,.>`` the Frobenius product, ``|M|^2 = <G_EB + G_DB, G_EA + G_DA>`` and the error is every term but
    ``<G_EB, G_EA>``. Each term is non-negative (``<x.T x, y.T y> = |y x.T|^2``), so the error loses nothing to
    cancellation."""
    (G_EA, G_DA), (G_EB, G_DB) = G_A, G_B
    kept = _inner(G_EB, G_EA)
    lost = (_inner(G_EB, G_DA) + _inner(G_DB, G_EA + G_DA)).clamp_min(0.0)
    return (kept + lost).clamp_min(0.0), lost


def _inner(G: Tensor, H: Tensor) -> Tensor:
    """``<G_i, H_i>`` (Frobenius) for each ``i`` of two ``g x p x p`` stacks."""
    return (G * H).sum(dim=(1, 2))


def _empty_stacks(groups: list[_Group], count: int, k_A: int, k_B: int) -> tuple[Tensor, Tensor] | None:
    """Fresh float32 ``count x k x p`` stacks per side when every group has one width ``p`` and the groups hold
    the tasks in order (each a run of consecutive positions, runs in order); else None (one pair per task)."""
    if not groups or len({(a.shape[2], b.shape[2]) for _, a, b in groups}) != 1:
        return None
    start = 0
    for index, _, _ in groups:
        if not torch.equal(index, torch.arange(start, start + index.shape[0])):
            return None
        start += index.shape[0]
    if start != count:
        return None
    p = groups[0][1].shape[2]
    return torch.empty(count, k_A, p), torch.empty(count, k_B, p)


def _rows(index: Tensor) -> slice:
    """The slice of consecutive positions ``index`` holds (``_empty_stacks`` checked it)."""
    return slice(int(index[0]), int(index[0]) + index.shape[0]) if index.shape[0] else slice(0, 0)


def _pairs_in_order(groups: list[_Group], count: int) -> list[tuple[Tensor, Tensor]]:
    """Each of ``count`` tasks' ``(E_A, E_B)`` from stacked groups, in task order (views into the stacks)."""
    pairs: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * count
    for index, stack_A, stack_B in groups:
        for i, a, b in zip(index.tolist(), stack_A.unbind(0), stack_B.unbind(0), strict=True):
            pairs[i] = (a, b)
    return pairs


def _column_signs(U: Tensor) -> Tensor:
    """Per column, the sign that makes its largest-magnitude entry positive (1 for a zero column)."""
    if U.shape[1] == 0:
        return U.new_ones(0)
    top = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    return torch.where(top < 0, -torch.ones_like(top), torch.ones_like(top))


def _basis(side: _Side, W: Tensor) -> Tensor:
    return side.extended @ (W if side.to_basis is None else side.to_basis @ W)


def _orthonormal(U: Tensor, side: _Side, W: Tensor) -> bool:
    """Whether the new directions of a basis built from a Gram-based frame are orthonormal to working precision.

    ``U = [U_old, Q] W``; the old basis's own defect ``D`` (float32 storage) reaches ``U.T U - I`` as
    ``W_top.T D W_top`` on every path, so it is subtracted: what remains is the fast frame's.
    """
    if side.old_defect is None or U.shape[1] == 0:
        return True
    k = side.old_defect.shape[0]
    defect = U.T @ U - torch.eye(U.shape[1], dtype=U.dtype) - W[:k].T @ side.old_defect @ W[:k]
    return bool(defect.abs().max() <= _ORTHONORMAL_TOL)


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
    with cyclic_gc.paused():
        merged, report = _merge_checked(subspace, adapters, policy, modules)
    report.seconds = time.perf_counter() - start
    return merged, report


def _merge_checked(
    subspace: Subspace | None, adapters: dict[str, LoraAdapter], policy: KPolicy, modules: list[str]
) -> tuple[Subspace, MergeReport]:
    """``merge`` after its checks."""

    new_names = list(adapters)
    old_names = list(subspace.tasks) if subspace is not None else []
    names = old_names + new_names
    old_entry, old_prior = _old_drift(subspace, old_names, modules)
    new_entry = torch.full((len(new_names),), math.nan, dtype=torch.float64)
    new_prior = torch.zeros(len(new_names), dtype=torch.float64)

    new_bases: dict[str, ModuleBasis] = {}
    cuts: dict[str, _ModuleCut] = {}
    capped: list[str] = []
    rotations: dict[str, tuple[Tensor, Tensor]] = {}
    shared = _shared_stacks(subspace, old_names)
    for j, m in enumerate(modules):
        old_basis = subspace.modules[m] if subspace is not None else None
        X_A, X_B, new_widths = _canonical_columns(adapters, new_names, m)
        if old_basis is None:
            U_A = torch.zeros(X_A.shape[0], 0, dtype=torch.float64)
            U_B = torch.zeros(X_B.shape[0], 0, dtype=torch.float64)
            old_E_A, old_E_B = U_A.new_zeros(0, 0), U_B.new_zeros(0, 0)
            gram_A = gram_B = U_A.new_zeros(0, 0)
            old_widths: list[int] = []
            old_groups: list[_Group] = []
        else:
            U_A, U_B = old_basis.U_A.to(torch.float64), old_basis.U_B.to(torch.float64)
            old_groups, old_widths = _old_groups(subspace, old_basis, old_names, m, shared)
            gram_A, gram_B = _old_gram(old_basis, old_names, old_groups, old_widths)
            if gram_A is None or gram_B is None:  # few old columns: C is formed with them
                old_E_A, old_E_B = _old_columns(old_groups, old_widths, old_basis.k_A, old_basis.k_B)
            else:  # the old tasks' columns of C ([E_i; 0]) are never formed: their groups carry them
                old_E_A = old_E_B = None
        widths = old_widths + new_widths
        drift = _DriftArrays(torch.cat([old_entry[:, j], new_entry]), torch.cat([old_prior[:, j], new_prior]))
        cut = None
        new_columns = sum(new_widths)
        for fast in (True, False):  # the exact path only when a Gram-based frame failed its check
            A = _side_coordinates(U_A, old_E_A, gram_A, X_A, fast, policy)
            B = _side_coordinates(U_B, old_E_B, gram_B, X_B, fast, policy)
            # At initialization C may hold only the rows the policy can keep: energies from the tasks' own columns.
            totals = _energies(_groups_by_width(widths, X_A, X_B), len(names)) if old_basis is None else None
            new_groups = _groups_by_width(
                new_widths, A.C[:, A.C.shape[1] - new_columns :], B.C[:, B.C.shape[1] - new_columns :], len(old_names)
            )
            cut = _truncate_module(names, widths, A, B, drift, policy, totals, old_groups + new_groups)
            if cut.orthonormal:
                break
        assert cut is not None
        if cut.gram is not None:
            cut.basis.gram_cache = _GramCache(tuple(names), *cut.gram)
        new_bases[m], cuts[m] = cut.basis, cut
        if not cut.met:
            capped.append(m)
        if old_basis is not None:
            # Old tasks' coordinates in the frame are [E_i; 0], so E_i' = W.T [E_i; 0] = W[:k].T E_i.
            W_A, W_B = cut.W
            rotations[m] = (W_A[: old_basis.k_A].T.contiguous(), W_B[: old_basis.k_B].T.contiguous())

    report = MergeReport(
        new_tasks=new_names,
        k={m: cut.k for m, cut in cuts.items()},
        explained_variance={m: cut.variance for m, cut in cuts.items()},
        reconstruction_error={},
        seconds=0.0,
        max_error=policy.max_error,
        capped_modules=capped,
        rotations=rotations,
    )
    tasks = _updated_tasks(subspace, adapters, names, modules, cuts, old_entry, old_prior, policy, report)
    merged = Subspace(
        modules=new_bases,
        tasks=tasks,
        policy=policy,
        metadata=dict(subspace.metadata) if subspace is not None else {},
    )
    return merged, report


def _updated_tasks(
    subspace: Subspace | None,
    adapters: dict[str, LoraAdapter],
    names: list[str],
    modules: list[str],
    cuts: dict[str, _ModuleCut],
    old_entry: Tensor,
    old_prior: Tensor,
    policy: KPolicy,
    report: MergeReport,
) -> dict[str, TaskCoefficients]:
    """Every task's new coefficients and metadata, and the report's per-task numbers.

    The arithmetic is done on (modules x tasks) arrays at once; what remains per task is building its
    dictionaries.
    """
    count = len(names)
    sq_diff = torch.stack([cuts[m].sq_diff for m in modules])  # modules x tasks
    sq_norm = torch.stack([cuts[m].sq_norm for m in modules])
    entering = torch.full((len(modules), count - old_entry.shape[0]), math.nan, dtype=torch.float64)
    before = torch.cat([old_entry.T, entering], dim=1)
    prior = torch.cat([old_prior.T, torch.zeros_like(entering)], dim=1)
    entry = torch.where(torch.isnan(before), sq_norm.sqrt(), before)
    safe = torch.where(entry > 0, entry, torch.ones_like(entry))
    drift = prior + torch.where(entry > 0, sq_diff.sqrt() / safe, torch.zeros_like(entry))
    module_error = torch.where(sq_norm > 0, (sq_diff / torch.where(sq_norm > 0, sq_norm, 1.0)).sqrt(), 0.0)
    pushed = torch.zeros(count, dtype=torch.bool)
    if policy.max_error is not None:
        pushed = ((drift > policy.max_error) & (drift > prior + _BOUND_SLACK)).any(dim=0)
    diff_rows, norm_rows = sq_diff.sum(dim=0).tolist(), sq_norm.sum(dim=0).tolist()
    entry_rows, drift_rows, error_rows = entry.T.tolist(), drift.T.tolist(), module_error.T.tolist()
    pushed_rows = pushed.tolist()
    # One width everywhere: every task's coefficients are a row of the merge's stacks (nothing made per module).
    stacked = TaskStacks({m: cuts[m].stacks for m in modules if cuts[m].stacks is not None})
    shared = stacked if len(stacked) == len(modules) else None
    E_rows = None if shared is not None else [cuts[m].E for m in modules]
    old_tasks = subspace.tasks if subspace is not None else {}
    tasks: dict[str, TaskCoefficients] = {}
    rows = zip(names, diff_rows, norm_rows, entry_rows, drift_rows, error_rows, pushed_rows, strict=True)
    for i, (name, diff, norm, entry_row, drift_row, error_row, pushed_i) in enumerate(rows):
        adapter = adapters.get(name)
        source = adapter if adapter is not None else old_tasks[name]
        head, metadata = dict(source.head), dict(source.metadata)
        error = (diff / norm) ** 0.5 if norm > 0 else 0.0
        report.reconstruction_error[name] = metadata[RECONSTRUCTION_ERROR] = error
        report.module_error[name] = dict(zip(modules, error_row, strict=True))
        _track_drift(metadata, diff, norm, entering=adapter is not None)
        metadata[MODULE_ENTRY_NORM] = dict(zip(modules, entry_row, strict=True))
        module_drift = metadata[MODULE_DRIFT] = dict(zip(modules, drift_row, strict=True))
        bound = metadata[ERROR_BOUND] = max(drift_row, default=0.0)
        report.module_drift[name] = module_drift.copy()
        report.error_bound[name] = bound
        report.energy_kept[name] = metadata[ENERGY_KEPT]
        report.drift_bound[name] = metadata[DRIFT_BOUND]
        if pushed_i:
            report.over_bound[name] = bound
        if shared is not None:
            E: MutableMapping[str, tuple[Tensor, Tensor]] = StackedCoefficients(shared, i)
        else:
            assert E_rows is not None
            E = {m: E_rows[j][name] for j, m in enumerate(modules)}
        tasks[name] = TaskCoefficients(E=E, head=head, metadata=metadata)
    return tasks


def _old_drift(subspace: Subspace | None, old_names: list[str], modules: list[str]) -> tuple[Tensor, Tensor]:
    """Committed tasks' per-module entry norms and drifts as the last merge wrote them (``module_entry_norm``,
    ``module_drift``), as ``tasks x modules`` arrays. A module a task has no entry norm for (tasks committed
    before per-module tracking existed have none) reads NaN and drift 0: its tracking starts now, with its
    current update as the entry (its whole-task ``drift_bound`` still carries the past)."""
    # Filled row by row (flat float64 buffers: several times faster than torch.tensor of nested lists).
    entry, prior = array.array("d"), array.array("d")
    nan_row, zero_row = (math.nan,) * len(modules), (0.0,) * len(modules)
    # What a merge writes: every module (one lookup per task for all of them).
    in_order = operator.itemgetter(*modules) if len(modules) > 1 else lambda values: tuple(values[m] for m in modules)
    tasks = subspace.tasks if subspace is not None else {}
    for name in old_names:
        metadata = tasks[name].metadata
        norms, drifts = metadata.get(MODULE_ENTRY_NORM), metadata.get(MODULE_DRIFT)
        if not isinstance(norms, dict) or not isinstance(drifts, dict):
            entry_row, prior_row = nan_row, zero_row
        else:
            try:
                entry_row, prior_row = in_order(norms), in_order(drifts)
            except KeyError:  # some modules untracked
                entry_row = tuple(float(norms[m]) if m in norms else math.nan for m in modules)
                prior_row = tuple(float(drifts.get(m, 0.0)) if m in norms else 0.0 for m in modules)
        entry.extend(entry_row)
        prior.extend(prior_row)
    shape = (len(old_names), len(modules))
    if not entry:
        return torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    entry_tensor = torch.frombuffer(entry, dtype=torch.float64).reshape(shape)
    return entry_tensor, torch.frombuffer(prior, dtype=torch.float64).reshape(shape)


def _shared_stacks(subspace: Subspace | None, old_names: list[str]) -> TaskStacks | None:
    """The stacks the last merge left, when every old task is still its row ``i`` of them (``i``: its position)."""
    if subspace is None or not old_names:
        return None
    tasks = subspace.tasks
    first = tasks[old_names[0]].E
    stacks = first.stacks if isinstance(first, StackedCoefficients) else None
    if stacks is None:
        return None
    for i, name in enumerate(old_names):
        E = tasks[name].E
        if not isinstance(E, StackedCoefficients) or E.stacks is not stacks or E.row != i:
            return None
    return stacks  # their shapes are checked against the bases where they are read (``_old_groups``)


def _old_groups(
    subspace: Subspace,
    basis: ModuleBasis,
    old_names: list[str],
    module: str,
    shared: TaskStacks | None = None,
) -> tuple[list[_Group], list[int]]:
    """The old tasks' coefficients in one module stacked per width (``g x k x p`` per side), and each task's
    width. ``shared``: the stacks every old task is a row of (``_shared_stacks``), used whole as they are stored
    (float32: whatever reads them converts what it reads); else float64."""
    T = len(old_names)
    if shared is not None and module in shared:
        S_A, S_B = shared[module]
        if S_A.shape[:2] == (T, basis.k_A) and S_B.shape[:2] == (T, basis.k_B) and S_A.shape[2] == S_B.shape[2]:
            return [(torch.arange(T), S_A, S_B)], [int(S_A.shape[2])] * T
    pairs = [subspace.tasks[t].E[module] for t in old_names]
    widths = [E_A.shape[1] for E_A, _ in pairs]
    if not pairs:
        return [], widths
    E_A = torch.cat([E_A for E_A, _ in pairs], dim=1).to(torch.float64)
    E_B = torch.cat([E_B for _, E_B in pairs], dim=1).to(torch.float64)
    return _groups_by_width(widths, E_A, E_B), widths


def _old_columns(groups: list[_Group], widths: list[int], k_A: int, k_B: int) -> tuple[Tensor, Tensor]:
    """The old tasks' coefficients side by side in task order, ``k x sum p`` per side (float64)."""
    if len(groups) == 1:
        _, S_A, S_B = groups[0]
        return (
            S_A.permute(1, 0, 2).reshape(k_A, -1).to(torch.float64),
            S_B.permute(1, 0, 2).reshape(k_B, -1).to(torch.float64),
        )
    if not groups:
        return torch.zeros(k_A, 0, dtype=torch.float64), torch.zeros(k_B, 0, dtype=torch.float64)
    per_task = _pairs_in_order(groups, len(widths))
    E_A, E_B = torch.cat([a for a, _ in per_task], dim=1), torch.cat([b for _, b in per_task], dim=1)
    return E_A.to(torch.float64), E_B.to(torch.float64)


def _old_gram(
    basis: ModuleBasis, old_names: list[str], groups: list[_Group], widths: list[int]
) -> tuple[Tensor | None, Tensor | None]:
    """``sum_i E_i E_i.T`` per side: the basis's cache when it belongs to exactly these tasks, else computed;
    None when there are too few old columns for the merge to use it (``_GRAM_FROM_CACHE``)."""
    if sum(widths) <= _GRAM_FROM_CACHE:
        return None, None
    cache = basis.gram_cache
    if (
        isinstance(cache, _GramCache)
        and cache.tasks == tuple(old_names)
        and tuple(cache.A.shape) == (basis.k_A, basis.k_A)
        and tuple(cache.B.shape) == (basis.k_B, basis.k_B)
    ):
        return cache.A, cache.B
    gram_A = sum((_stacked_gram(S_A) for _, S_A, _ in groups), torch.zeros(basis.k_A, basis.k_A, dtype=torch.float64))
    gram_B = sum((_stacked_gram(S_B) for _, _, S_B in groups), torch.zeros(basis.k_B, basis.k_B, dtype=torch.float64))
    return gram_A, gram_B


def _stacked_gram(S: Tensor) -> Tensor:
    """``sum_i S_i S_i.T`` of a ``g x k x p`` stack: ``E E.T`` with ``E`` the stack's columns side by side."""
    E = S.permute(1, 0, 2).reshape(S.shape[1], -1).to(torch.float64)
    return E @ E.T


def _canonical_columns(
    adapters: dict[str, LoraAdapter], names: list[str], module: str
) -> tuple[Tensor, Tensor, list[int]]:
    """The new tasks' canonical columns of one module: ``A_c.T`` side by side (``d x m``), ``B_c`` (``n x m``),
    and each task's width. Adapters of equal rank are canonicalized in one batch."""
    factors = [adapters[t].factors[module] for t in names]
    widths = [B.shape[1] for B, _ in factors]
    if len(set(widths)) == 1 and len(names) > 1:
        scaling = torch.tensor([adapters[t].scale(module) for t in names], dtype=torch.float64)
        B_c, A_c = canonicalize_batch(
            torch.stack([B for B, _ in factors]), torch.stack([A for _, A in factors]), scaling
        )
        count, n, r = B_c.shape
        X_B = B_c.permute(1, 0, 2).reshape(n, count * r)
        X_A = A_c.permute(2, 0, 1).reshape(A_c.shape[2], count * r)
        return X_A, X_B, widths
    pairs = [canonicalize(B, A, scaling=adapters[t].scale(module)) for t, (B, A) in zip(names, factors, strict=True)]
    return torch.cat([A_c.T for _, A_c in pairs], dim=1), torch.cat([B_c for B_c, _ in pairs], dim=1), widths


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


def _side_coordinates(
    U: Tensor,
    old_E: Tensor | None,
    old_gram: Tensor | None,
    X: Tensor,
    fast: bool = True,
    policy: KPolicy | None = None,
) -> _Side:
    """One side of one module: a frame for ``[U Q]``, the coordinates ``C = [[E, a], [0, R]]`` in it and the
    eigenpairs of ``C C.T``.

    ``old_E`` holds every old task's coefficients side by side (``k x sum p``), ``old_gram`` their Gram
    ``old_E old_E.T`` (``k x k``, so the cost of ``C C.T`` does not grow with the old tasks; then ``old_E`` may
    be None and ``C`` holds only the new tasks' columns), ``X`` the new canonical columns (``dim x m``). The
    residual ``Z = X - U U.T X`` is decomposed through the smaller of its Gram matrices (``fast``) or a thin
    SVD (exact fallback): see ``_residual_frame``. The eigenvectors ``W`` of ``C C.T`` rotate the frame into
    the new basis; new coefficients are ``W[:, :k'].T @ C``.
    """
    dim, k = U.shape
    if k == 0:  # initialization: the residual is X itself
        a, residual = X.new_zeros(0, X.shape[1]), X
    else:
        a = U.T @ X
        residual = X - U @ a
        residual = residual - U @ (U.T @ residual)  # second pass: orthogonal to U to working precision
    frame = _residual_frame(residual, X, a, k, dim - k, fast, policy if k == 0 else None)
    R = frame.R
    q = R.shape[0]
    C = torch.cat([a, R], dim=0)  # the new tasks' columns
    if old_E is not None and old_E.shape[1]:  # and the old ones', [E_i; 0], first (when the caller formed them)
        C = torch.cat([torch.cat([old_E, old_E.new_zeros(q, old_E.shape[1])], dim=0), C], dim=1)
    if k == 0:
        # Initialization: the frame is the residual's own singular frame, so C C.T = diag(s^2) (up to
        # rounding) and its eigenpairs are the singular values and the identity.
        # C may hold only the top rows the policy can keep (then every task's energy comes from its columns).
        gram = torch.diag(frame.eigvals[:q])
        eigvals, eigvecs = frame.eigvals, torch.eye(q, dtype=torch.float64)
    else:
        if old_gram is not None:  # C C.T from the old tasks' running Gram: no O(T) work
            aR = a @ R.T
            top = torch.cat([old_gram + a @ a.T, aR], dim=1)
            gram = torch.cat([top, torch.cat([aR.T, R @ R.T], dim=1)], dim=0)
        else:  # few old columns: one product is cheaper than assembling the blocks
            gram = C @ C.T
        # Gram of C: its eigenvectors are the left singular vectors of the stacked reconstructions.
        eigvals, eigvecs = torch.linalg.eigh(gram)
        order = torch.argsort(eigvals, descending=True)
        eigvals, eigvecs = eigvals[order].clamp_min(0.0), eigvecs[:, order]
    if frame.Q is not None:
        extended, to_basis = torch.cat([U, frame.Q], dim=1), None
    else:  # frame directions Z V S^-1, formed only for the kept ones: [U Z] @ blockdiag(I, V S^-1) @ W
        extended = torch.cat([U, residual], dim=1)
        to_basis = torch.block_diag(torch.eye(k, dtype=torch.float64), frame.to_Q)
    defect = U.T @ U - torch.eye(k, dtype=U.dtype) if frame.verify else None
    return _Side(extended, C, eigvals, eigvecs, to_basis=to_basis, gram=gram, old_defect=defect)


@dataclass
class _ResidualFrame:
    """An orthonormal frame of the residual's significant directions: ``Q`` itself, or ``Z @ to_Q``."""

    R: Tensor  # q x m: the residual's coordinates in the frame
    eigvals: Tensor  # q: squared singular values of the residual, descending
    Q: Tensor | None = None  # dim x q
    to_Q: Tensor | None = None  # m x q
    verify: bool = False


def _residual_frame(
    Z: Tensor, X: Tensor, a: Tensor, k: int, limit: int, fast: bool, policy: KPolicy | None = None
) -> _ResidualFrame:
    """``Z = Q R`` with ``Q`` orthonormal, keeping the directions whose singular value exceeds ``_RANK_TOL``
    times the spectral norm of ``X`` (at most ``limit``).

    ``fast``: with ``m`` columns in ``R^dim``, eigendecompose the smaller Gram matrix in float64. Wide
    (``m > dim``): ``Z Z.T = V S^2 V.T`` and ``Q = V`` (orthonormal by construction). Tall: ``Z.T Z = V S^2 V.T``,
    ``R = S V.T`` and ``Q = Z V S^-1`` is never formed here: the caller forms only the kept combinations and
    checks them (``verify``), since that ``Q`` is orthonormal only up to ``eps * s_max^2 / s_i^2``. Squaring
    loses nothing the cut keeps: the Gram's eigenvalues are accurate to ``~eps * s_max^2``, far below
    ``(_RANK_TOL * s_max)^2``, and the residual outside the kept span stays below the cut plus that.
    With ``policy`` (initialization) the wide path computes only the rows of ``R`` the policy can keep
    (``eigvals`` still lists every direction). Not ``fast``, or at most ``_SVD_COLUMNS`` columns: a thin
    SVD of ``Z`` (exact; the fallback).
    The norm of ``X`` is ``s_max`` of ``Z`` when
    ``k = 0`` (``X = Z``), else the largest eigenvalue of its smaller Gram (``X.T X = a.T a + Z.T Z``).
    """
    dim, m = Z.shape
    if m == 0 or limit <= 0:
        return _ResidualFrame(Z.new_zeros(0, m), Z.new_zeros(0), Q=Z.new_zeros(dim, 0))
    if not fast or m <= _SVD_COLUMNS:
        Q, s, Vh = torch.linalg.svd(Z, full_matrices=False)
        scale_sq = float(s[0]) ** 2 if k == 0 else _spectral_sq(X)
        q = _significant(s.square(), scale_sq, limit)
        return _ResidualFrame(s[:q, None] * Vh[:q], s[:q].square(), Q=Q[:, :q])
    if m > dim:
        eigvals, V = _eigh_descending(_gram(Z.T))
        scale_sq = float(eigvals[0]) if k == 0 else _spectral_sq(X)
        q = _significant(eigvals, scale_sq, limit)
        eigvals = eigvals[:q].clamp_min(0.0)
        rows = q if policy is None else min(q, _rows_needed(eigvals, policy))
        Q = V[:, :rows]
        return _ResidualFrame(Q.T @ Z, eigvals, Q=Q, verify=k > 0)
    ZtZ = _gram(Z)
    eigvals, V = _eigh_descending(ZtZ)
    scale_sq = float(eigvals[0]) if k == 0 else float(torch.linalg.eigvalsh(ZtZ + a.T @ a)[-1])
    q = _significant(eigvals, scale_sq, limit)
    root = eigvals[:q].sqrt()
    return _ResidualFrame(root[:, None] * V[:, :q].T, eigvals[:q], to_Q=V[:, :q] / root, verify=True)


def _rows_needed(eigvals: Tensor, policy: KPolicy) -> int:
    """The most directions ``policy`` can keep of a frame with these eigenvalues (all, for ``max_error``
    without ``k_max``)."""
    if policy.max_error is not None:
        return eigvals.shape[0] if policy.k_max is None else policy.k_max
    return _choose_k(eigvals, policy)


def _energies(groups: list[_Group], count: int) -> Tensor:
    """``|c_B,i c_A,i.T|^2`` of each of ``count`` tasks from its stacked coordinates, batched per group."""
    totals = torch.zeros(count, dtype=torch.float64)
    for index, group_A, group_B in groups:
        totals[index] = _frobenius_sq_of_product(group_B, group_A)
    return totals


def _gram(M: Tensor) -> Tensor:
    """``M.T @ M`` (float64). Through torch, not NumPy's faster ``a.T @ a``: NumPy's BLAS keeps its own thread
    pool, which ``torch.set_num_threads`` does not limit (and on shared cores that stalls)."""
    return M.T @ M


def _eigh_descending(gram: Tensor) -> tuple[Tensor, Tensor]:
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvals.flip(0), eigvecs.flip(1)


def _significant(squares: Tensor, scale_sq: float, limit: int) -> int:
    """How many of the (descending) squared singular values exceed ``(_RANK_TOL * scale)^2``, at most ``limit``."""
    q = int((squares > _RANK_TOL**2 * max(scale_sq, 1e-300)).sum())
    return min(q, limit)


def _spectral_sq(X: Tensor) -> float:
    """``|X|_2^2`` from the smaller Gram matrix of ``X`` (values only)."""
    gram = X.T @ X if X.shape[1] <= X.shape[0] else X @ X.T
    return float(torch.linalg.eigvalsh(gram)[-1]) if gram.numel() else 0.0


def _kept_fraction(eigvals: Tensor, k: int) -> float:
    total = float(eigvals.sum())
    return float(eigvals[:k].sum()) / total if total > 0 else 1.0


def _choose_k_bounded(
    groups: list[_Group],
    A: _Side,
    B: _Side,
    drift: _DriftArrays,
    eps: float,
    k_max: int | None,
    totals: Tensor,
) -> tuple[int, int, bool]:
    """The ``(k_A, k_B)`` with the smallest ``k_A + k_B`` that keeps every task's bound at ``eps``.

    Task ``i``'s bound after keeping the first ``b`` directions of ``B`` and ``a`` of ``A`` is
    ``drift_i + sqrt(|M_i|^2 - sum_{r<b, s<a} M_i[r, s]^2) / entry_i`` with
    ``M_i = W_B.T c_B c_A.T W_A`` (every direction; ``totals[i] = |M_i|^2``): one 2-D cumulative sum of
    ``M_i^2`` gives it for all prefixes at once (``_worst_excess``). It falls as either ``k`` grows, so in
    each row ``b`` the feasible ``a`` form a suffix and the frontier is one count per row. A task already
    over ``eps`` may lose nothing more. Returns ``(k_A, k_B, met)``; when no pair within ``k_max``
    holds the bound, the largest allowed pair, which minimizes every task's error, and ``met=False``.
    """
    # Every direction is a candidate, not only those of positive eigenvalue: next to a huge adapter,
    # old tasks' eigenvalues sink below float64 round-off of the Gram, while their energy (measured
    # in c, not in the Gram) stays exact. Directions that hold nothing are never needed.
    cap_A = A.eigvecs.shape[1] if k_max is None else min(A.eigvecs.shape[1], k_max)
    cap_B = B.eigvecs.shape[1] if k_max is None else min(B.eigvecs.shape[1], k_max)
    if cap_A == 0 or cap_B == 0:  # nothing spans anything: every update is zero
        return 1, 1, True
    worst = _worst_excess(groups, A.eigvecs[:, :cap_A], B.eigvecs[:, :cap_B], drift, eps, totals)
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


def _worst_excess(
    groups: list[_Group], W_A: Tensor, W_B: Tensor, drift: _DriftArrays, eps: float, totals: Tensor
) -> Tensor:
    """Over every task, the largest ``bound after the merge - allowed bound`` for each pair of prefixes
    (``cap_B x cap_A``: keeping ``b + 1`` directions of ``W_B`` and ``a + 1`` of ``W_A``); tasks whose entry norm
    is 0 count as ``-inf``. Chunks of about 32 MB, each worked on in place (no temporaries)."""
    cap_A, cap_B = W_A.shape[1], W_B.shape[1]
    worst = torch.full((cap_B, cap_A), -math.inf, dtype=torch.float64)
    for at, c_A, c_B in _chunks(groups, _PREFIX_CHUNK, lambda p: cap_A * cap_B):
        # Rows of the frame past the chunk's are zero in its coordinates (an old task's [E_i; 0]).
        V_A, V_B, total = W_A[: c_A.shape[1]], W_B[: c_B.shape[1]], totals[at]
        M = (V_B.T @ c_B) @ (V_A.T @ c_A).transpose(1, 2)  # g x cap_B x cap_A
        entry, prior, limit = _bound_terms(at, total, drift, eps)
        # kept = 2-D prefix sums of M^2; excess = prior + sqrt(max(total - kept, 0)) / entry - limit.
        excess = M.square_().cumsum_(dim=1).cumsum_(dim=2).neg_().add_(total[:, None, None])
        excess.clamp_min_(0.0).sqrt_().div_(entry[:, None, None]).add_(prior[:, None, None])
        excess.sub_(limit[:, None, None])
        excess[entry == 0] = -math.inf
        worst = torch.maximum(worst, excess.amax(dim=0))
    return worst


def _chunks(groups: list[_Group], budget: int, per_task: Callable[[int], int]) -> Iterator[_Group]:
    """The groups' tasks a chunk at a time: (positions, c_A, c_B) of at most ``budget // per_task(p)`` tasks (the
    elements one task of width ``p`` takes), group by group; views, nothing copied."""
    for index, group_A, group_B in groups:
        size = max(1, budget // max(per_task(int(group_A.shape[2])), 1))
        for lo in range(0, index.shape[0], size):
            yield index[lo : lo + size], group_A[lo : lo + size], group_B[lo : lo + size]


def _bound_terms(index: Tensor, total: Tensor, drift: _DriftArrays, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per task: entry norm, drift before this merge, and the largest bound allowed after it."""
    before, prior = drift.entry[index], drift.prior[index]
    entry = torch.where(torch.isnan(before), total.clamp_min(0.0).sqrt(), before)
    limit = torch.where(prior <= eps, torch.full_like(prior, eps), prior + _BOUND_SLACK)
    return entry, prior, limit


def _groups_by_width(widths: list[int], C_A: Tensor, C_B: Tensor, offset: int = 0) -> list[_Group]:
    """Split the coordinate matrices per task (``widths`` columns each), stacked as ``g x K x p`` for tasks of
    equal ``p``, with the tasks' positions (``offset`` + their place in ``widths``).

    Usually every task has the same ``p`` and this is one reshape, so the work that follows is a
    few batched products instead of a loop over tasks.
    """
    if not widths:
        return []
    if len(set(widths)) == 1:
        p, T = widths[0], len(widths)
        return [(torch.arange(offset, offset + T), _stack(C_A, T, p), _stack(C_B, T, p))]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    groups = []
    for width in sorted(set(widths)):
        idx = [i for i, w in enumerate(widths) if w == width]
        cols = torch.tensor([c for i in idx for c in range(offsets[i], offsets[i] + width)], dtype=torch.long)
        groups.append(
            (
                torch.tensor(idx) + offset,
                _stack(C_A[:, cols], len(idx), width),
                _stack(C_B[:, cols], len(idx), width),
            )
        )
    return groups


def _stack(C: Tensor, T: int, p: int) -> Tensor:
    return C.reshape(C.shape[0], T, p).permute(1, 0, 2)


def _frobenius_sq_of_product(B: Tensor, A: Tensor) -> Tensor:
    """``|B_i A_i^T|_F^2`` for each ``i`` of batched ``B`` (``g x m x p``) and ``A`` (``g x n x p``)."""
    return _inner(B.mT @ B, A.mT @ A)


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
    _validate_adapters(adapters)
    expected = set(modules)
    for name, adapter in adapters.items():
        check_task_name(name)
        if subspace is not None and name in subspace.tasks:
            raise ShareClError(
                f"task {name!r} is already in the subspace; choose another task name "
                "(tasks are never overwritten, so old versions stay reproducible)"
            )
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
            if B.shape[1] == 0:
                raise ShareClError(
                    f"adapter {name!r}, module {m!r}: rank 0 (its factors hold no update); train it with r >= 1 "
                    "in every target module"
                )
            if B.shape[1] > min(shape):
                raise ShareClError(
                    f"adapter {name!r}, module {m!r}: rank {B.shape[1]} exceeds the layer's "
                    f"min(out, in) = {min(shape)} for update shape {shape}; retrain with r <= {min(shape)}"
                )


def _validate_adapters(adapters: dict[str, LoraAdapter]) -> None:
    """``LoraAdapter.validate`` of every adapter, with the NaN/Inf scans batched (one per factor shape
    instead of two per adapter and module); whatever fails is reported by the adapter's own ``validate``."""
    stacks: dict[tuple, list[tuple[str, Tensor]]] = {}
    for name, adapter in adapters.items():
        chained = all(B.ndim == 2 and A.ndim == 2 and B.shape[1] == A.shape[0] for B, A in adapter.factors.values())
        scales = all(math.isfinite(adapter.scale(m)) for m in adapter.factors)
        heads = all(bool(torch.isfinite(value).all()) for value in adapter.head.values())
        if not (adapter.factors and chained and scales and heads):
            adapter.validate(name)  # raises, naming the adapter, module and fault
        for B, A in adapter.factors.values():
            for factor in (B, A):
                stacks.setdefault((tuple(factor.shape), factor.dtype), []).append((name, factor))
    for entries in stacks.values():
        if not bool(torch.isfinite(torch.stack([factor for _, factor in entries])).all()):
            for name in dict.fromkeys(name for name, _ in entries):
                adapters[name].validate(name)
