"""The incremental merge against an explicit full SVD, orthonormality of the bases, and reported errors.

The reference here never calls ``share``'s own linear algebra: canonical factors come from an SVD of the
explicit ``dW`` (``B_c = U S^1/2``, ``A_c.T = V S^1/2``), and the basis from an SVD of the explicitly
stacked ``[U E_1 ... U E_T, X_new]`` (what the spec says the merge must equal, without forming it).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor

from share import KPolicy, LoraAdapter, Subspace, merge
from share.errors import ShareClError

SHAPES = {"enc.0.query": (24, 20), "enc.0.value": (20, 24), "enc.1.query": (24, 20)}  # name -> (n, d)
R = 4
SIDES = ("A", "B")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_adapter(seed: int, r: int = R, scaling: float = 2.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)) for m, (n, d) in SHAPES.items()}
    return LoraAdapter(factors=factors, scaling={m: scaling for m in SHAPES})


def adapters(first: int, count: int) -> dict[str, LoraAdapter]:
    return {f"t{i}": random_adapter(i) for i in range(first, first + count)}


# -- the independent reference ----------------------------------------------------------------------
def reference_canonical(adapter: LoraAdapter, module: str) -> dict[str, Tensor]:
    """Balanced factors from an SVD of the explicit ``dW``: side "B" is ``n x r``, side "A" is ``d x r``."""
    B, A = adapter.factors[module]
    dW = adapter.scale(module) * (B.double() @ A.double())
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    r = B.shape[1]
    root = S[:r].sqrt()
    return {"B": U[:, :r] * root, "A": Vh[:r].T * root}


def stacked_columns(old: Subspace | None, new: dict[str, LoraAdapter], module: str, side: str) -> Tensor:
    """``[U E_1 ... U E_T, X_new]`` for one side of one module, formed explicitly (float64)."""
    parts = []
    if old is not None:
        basis = old.modules[module]
        U = (basis.U_A if side == "A" else basis.U_B).double()
        for t in old.tasks.values():
            parts.append(U @ t.E[module][0 if side == "A" else 1].double())
    parts += [reference_canonical(a, module)[side] for a in new.values()]
    return torch.cat(parts, dim=1)


def reference_basis(stack: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` left singular vectors of the full SVD, and all singular values."""
    U, S, _ = torch.linalg.svd(stack, full_matrices=False)
    # A tie at the cut would make "the" top-k subspace ambiguous; the seeds here must avoid one.
    if k < S.shape[0]:
        assert float(S[k - 1] - S[k]) > 1e-3 * float(S[0]), "singular-value tie at the cut; change the seed"
    return U[:, :k], S


def basis_of(subspace: Subspace, module: str, side: str) -> Tensor:
    basis = subspace.modules[module]
    return (basis.U_A if side == "A" else basis.U_B).double()


def projector_distance(U: Tensor, V: Tensor) -> float:
    return float(torch.linalg.matrix_norm(U @ U.T - V @ V.T, ord=2))


def max_orthonormality_error(subspace: Subspace) -> float:
    worst = 0.0
    for basis in subspace.modules.values():
        for U in (basis.U_A, basis.U_B):
            eye = torch.eye(U.shape[1], dtype=U.dtype)
            worst = max(worst, float((U.T @ U - eye).abs().max()))
    return worst


def assert_matches_full_svd(old: Subspace | None, new: dict[str, LoraAdapter], merged: Subspace, report) -> None:
    for m in SHAPES:
        for side in SIDES:
            U = basis_of(merged, m, side)
            ref, S = reference_basis(stacked_columns(old, new, m, side), U.shape[1])
            assert projector_distance(U, ref) <= 1e-4, (m, side)
            energy = S.square()
            kept = float(energy[: U.shape[1]].sum() / energy.sum())
            assert report.explained_variance[m][SIDES.index(side)] == pytest.approx(kept, abs=1e-6), (m, side)


# -- 2. incremental merge == full SVD of the stacked reconstructions ---------------------------------
@pytest.mark.parametrize("k", [6, 10])
def test_init_equals_full_svd(k: int) -> None:
    new = adapters(0, 3)
    merged, report = merge(None, new, KPolicy(k=k))
    assert merged.k() == {m: (k, k) for m in SHAPES}
    assert report.k == merged.k()
    assert_matches_full_svd(None, new, merged, report)


@pytest.mark.parametrize("k", [6, 9])
def test_rounds_of_one_and_several_adapters_equal_full_svd(k: int) -> None:
    """Round after round, each merge equals the full SVD of the stack it replaces, on both sides."""
    policy = KPolicy(k=k)
    subspace, _ = merge(None, adapters(0, 2), policy)
    next_seed = 2
    for count in (1, 3, 1, 2, 1):  # one adapter, several at once, one again ...
        new = adapters(next_seed, count)
        next_seed += count
        merged, report = merge(subspace, new, policy)
        assert_matches_full_svd(subspace, new, merged, report)
        assert list(merged.tasks) == list(subspace.tasks) + list(new)
        assert report.new_tasks == list(new)
        subspace = merged


def test_variance_policy_picks_the_smallest_k_reaching_the_threshold() -> None:
    policy = KPolicy(variance=0.6)
    new = adapters(0, 4)
    merged, report = merge(None, new, policy)
    for m in SHAPES:
        for side in SIDES:
            _, S = reference_basis(stacked_columns(None, new, m, side), 1)
            cumulative = torch.cumsum(S.square(), 0) / S.square().sum()
            expected = int((cumulative < 0.6).sum()) + 1
            assert basis_of(merged, m, side).shape[1] == expected, (m, side)
    assert_matches_full_svd(None, new, merged, report)
    capped, _ = merge(None, new, KPolicy(variance=0.99, k_max=3))
    assert set(capped.k().values()) == {(3, 3)}


def test_merge_leaves_its_input_subspace_untouched() -> None:
    subspace, _ = merge(None, adapters(0, 2), KPolicy(k=5))
    before = {m: (b.U_A.clone(), b.U_B.clone()) for m, b in subspace.modules.items()}
    coeffs = {t: {m: (a.clone(), b.clone()) for m, (a, b) in c.E.items()} for t, c in subspace.tasks.items()}
    merge(subspace, adapters(2, 2), KPolicy(k=7))
    for m, (U_A, U_B) in before.items():
        assert torch.equal(subspace.modules[m].U_A, U_A) and torch.equal(subspace.modules[m].U_B, U_B)
    for t, per_module in coeffs.items():
        for m, (E_A, E_B) in per_module.items():
            assert torch.equal(subspace.tasks[t].E[m][0], E_A) and torch.equal(subspace.tasks[t].E[m][1], E_B)
    assert list(subspace.tasks) == ["t0", "t1"]


# -- 3. orthonormal bases ----------------------------------------------------------------------------
def test_bases_orthonormal_when_k_exceeds_the_datas_rank() -> None:
    """One rank-3 adapter with k=10: k drops to the rank, the bases stay orthonormal, dW is exact."""
    one = {"t0": random_adapter(0, r=3)}
    merged, report = merge(None, one, KPolicy(k=10))
    assert merged.k() == {m: (3, 3) for m in SHAPES}
    assert max_orthonormality_error(merged) <= 1e-5
    assert report.worst_error <= 1e-6
    # A second adapter within budget grows k to the rank of the union, still orthonormal.
    merged2, report2 = merge(merged, {"t1": random_adapter(1, r=3)}, KPolicy(k=10))
    assert merged2.k() == {m: (6, 6) for m in SHAPES}
    assert max_orthonormality_error(merged2) <= 1e-5
    assert report2.worst_error <= 1e-6


def test_bases_orthonormal_when_k_reaches_the_full_dimension() -> None:
    """k larger than n and d: the basis fills the space (no room for new directions) and stays orthonormal."""
    subspace, _ = merge(None, adapters(0, 5), KPolicy(k=64))  # 5 x rank 4 = 20 columns
    for i in range(5, 9):
        subspace, report = merge(subspace, {f"t{i}": random_adapter(i)}, KPolicy(k=64))
        assert max_orthonormality_error(subspace) <= 1e-5
        assert report.worst_error <= 1e-5  # nothing is truncated while k covers the whole space
    for m, (n, d) in SHAPES.items():
        assert subspace.k()[m] == (d, n)


@pytest.mark.parametrize("k", [5, 30])
def test_bases_stay_orthonormal_over_50_merges(k: int) -> None:
    policy = KPolicy(k=k)
    subspace, _ = merge(None, adapters(0, 1), policy)
    for i in range(1, 51):
        subspace, _ = merge(subspace, {f"t{i}": random_adapter(i)}, policy)
        assert max_orthonormality_error(subspace) <= 1e-5, f"after merge {i}"
    assert len(subspace.tasks) == 51


def test_adapter_inside_the_span_adds_no_directions() -> None:
    subspace, _ = merge(None, adapters(0, 2), KPolicy(k=20))
    assert subspace.k() == {m: (8, 8) for m in SHAPES}
    inside = LoraAdapter(factors={m: subspace.factors("t0", m) for m in SHAPES})
    merged, _ = merge(subspace, {"copy": inside}, KPolicy(k=20))
    assert merged.k() == subspace.k()


# -- the reported reconstruction error -----------------------------------------------------------------
def truncation_error(old: Subspace | None, new: dict[str, LoraAdapter], merged: Subspace) -> dict[str, float]:
    """Each task's ``|P_B dW P_A - dW| / |dW|`` over all modules, with ``P`` from the explicit full SVD."""
    sq_diff: dict[str, float] = {}
    sq_norm: dict[str, float] = {}
    for m in SHAPES:
        P = {}
        for side in SIDES:
            ref, _ = reference_basis(stacked_columns(old, new, m, side), basis_of(merged, m, side).shape[1])
            P[side] = ref @ ref.T
        targets = {}
        if old is not None:
            for t in old.tasks:
                targets[t] = old.delta_weight(t, m).double()
        for t, a in new.items():
            targets[t] = a.delta_weight(m).double()
        for t, dW in targets.items():
            sq_diff[t] = sq_diff.get(t, 0.0) + float((P["B"] @ dW @ P["A"] - dW).square().sum())
            sq_norm[t] = sq_norm.get(t, 0.0) + float(dW.square().sum())
    return {t: math.sqrt(sq_diff[t] / sq_norm[t]) for t in sq_diff}


def measured_error(before: dict[str, dict[str, Tensor]], merged: Subspace) -> dict[str, float]:
    out = {}
    for t, per_module in before.items():
        diff = sum(float((merged.delta_weight(t, m).double() - dW).square().sum()) for m, dW in per_module.items())
        norm = sum(float(dW.square().sum()) for dW in per_module.values())
        out[t] = math.sqrt(diff / norm)
    return out


@pytest.mark.parametrize("k", [5, 8])
def test_reported_error_equals_the_truncation_error(k: int) -> None:
    old, _ = merge(None, adapters(0, 3), KPolicy(k=k))
    new = adapters(3, 2)
    merged, report = merge(old, new, KPolicy(k=k))
    expected = truncation_error(old, new, merged)
    before = {t: {m: old.delta_weight(t, m).double() for m in SHAPES} for t in old.tasks}
    before |= {t: {m: a.delta_weight(m).double() for m in SHAPES} for t, a in new.items()}
    measured = measured_error(before, merged)
    assert set(report.reconstruction_error) == set(expected) == {"t0", "t1", "t2", "t3", "t4"}
    for t, err in expected.items():
        assert err > 1e-2  # truncation really happens here, so the check is not vacuous
        assert report.reconstruction_error[t] == pytest.approx(err, rel=1e-4, abs=1e-6), t
        assert measured[t] == pytest.approx(err, rel=1e-4, abs=1e-5), t
        assert merged.tasks[t].metadata["reconstruction_error"] == report.reconstruction_error[t]
        per_module = report.module_error[t]
        assert set(per_module) == set(SHAPES)


def test_reported_error_is_zero_when_nothing_is_truncated() -> None:
    old, _ = merge(None, adapters(0, 2), KPolicy(k=64))
    new = adapters(2, 2)
    merged, report = merge(old, new, KPolicy(k=64))
    before = {t: {m: old.delta_weight(t, m).double() for m in SHAPES} for t in old.tasks}
    before |= {t: {m: a.delta_weight(m).double() for m in SHAPES} for t, a in new.items()}
    measured = measured_error(before, merged)
    for t in before:
        assert report.reconstruction_error[t] <= 1e-5, t
        assert measured[t] <= 1e-5, t


@pytest.mark.parametrize("with_old", [False, True], ids=["init", "merge"])
def test_a_rank_zero_adapter_is_refused_by_name_and_changes_nothing(with_old: bool) -> None:
    old = merge(None, adapters(0, 2))[0] if with_old else None
    empty = LoraAdapter(factors={m: (torch.zeros(n, 0), torch.zeros(0, d)) for m, (n, d) in SHAPES.items()})
    with pytest.raises(ShareClError, match="adapter 'empty', module 'enc.0.query': rank 0"):
        merge(old, {"good": random_adapter(7), "empty": empty})
    if old is not None:
        assert list(old.tasks) == ["t0", "t1"]


@pytest.mark.parametrize("chunk", [1 << 17, 8], ids=["one-chunk", "many-chunks"])
def test_a_merge_leaves_its_input_subspace_as_it_was(chunk: int, monkeypatch) -> None:
    """The merge writes every task's new coefficients into fresh stacks, chunk by chunk, and keeps running
    Grams on the bases: nothing of the input subspace (bases, coefficients, their stacks, metadata) may change,
    whichever path it takes (past ``_GRAM_FROM_CACHE`` old columns the old tasks are read as stacks)."""
    merge_module = importlib.import_module("share.merge")  # ``share.merge`` the attribute is the function
    monkeypatch.setattr(merge_module, "_ROTATE_CHUNK", chunk)
    monkeypatch.setattr(merge_module, "_GRAM_FROM_CACHE", 8)
    head = merge(None, adapters(0, 3), KPolicy(k=6))[0]
    for i in range(3, 6):  # rows of one merge's stacks, and the Gram cache, as a coordinator holds them
        head = merge(head, adapters(i, 1), KPolicy(k=6))[0]
    snapshot = {
        "bases": {m: (b.U_A.clone(), b.U_B.clone()) for m, b in head.modules.items()},
        "E": {t: {m: (a.clone(), b.clone()) for m, (a, b) in task.E.items()} for t, task in head.tasks.items()},
        "metadata": {t: repr(task.metadata) for t, task in head.tasks.items()},
    }
    merged, _ = merge(head, adapters(6, 2), KPolicy(k=6))
    assert set(merged.tasks) == set(head.tasks) | {"t6", "t7"}
    for m, (a, b) in snapshot["bases"].items():
        assert torch.equal(head.modules[m].U_A, a) and torch.equal(head.modules[m].U_B, b), m
    for t, modules in snapshot["E"].items():
        for m, (a, b) in modules.items():
            assert torch.equal(head.tasks[t].E[m][0], a) and torch.equal(head.tasks[t].E[m][1], b), (t, m)
        assert repr(head.tasks[t].metadata) == snapshot["metadata"][t], t
