"""Canonical gauge: ``(B M, M^-1 A)`` and ``(B, A)`` are the same adapter, so nothing downstream may differ.

Checked on the factors themselves, and through ``merge`` (init and merge into an existing subspace):
no basis projector and no task's ``dW`` may change when an adapter is given in another gauge.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from share import KPolicy, LoraAdapter, canonicalize, merge

SHAPES = {"blocks.0.query": (24, 20), "blocks.0.value": (24, 20), "blocks.1.query": (18, 24)}  # name -> (n, d)
R = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_adapter(seed: int, scaling: float = 2.0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, R, generator=g), torch.randn(R, d, generator=g)) for m, (n, d) in SHAPES.items()}
    return LoraAdapter(factors=factors, scaling={m: scaling for m in SHAPES})


def invertible(seed: int, r: int = R) -> Tensor:
    """A random, well-conditioned but far from orthogonal ``r x r`` matrix (singular values 0.3 .. 3)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.linspace(0.3, 3.0, r, dtype=torch.float64)) @ q2


def regauged(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The same adapter as ``(B M, M^-1 A)`` with a different ``M`` per module; ``dW`` is unchanged."""
    factors = {}
    for i, (m, (B, A)) in enumerate(adapter.factors.items()):
        M = invertible(seed + i)
        factors[m] = ((B.double() @ M).float(), (torch.linalg.solve(M, A.double())).float())
    return LoraAdapter(factors=factors, scaling=dict(adapter.scaling))


def projector(U: Tensor) -> Tensor:
    U = U.double()
    return U @ U.T


def test_canonical_form_reproduces_dw_and_is_balanced() -> None:
    B, A = random_adapter(0).factors["blocks.0.query"]
    B_c, A_c = canonicalize(B, A, scaling=2.0)
    assert B_c.dtype == A_c.dtype == torch.float64
    dW = 2.0 * B.double() @ A.double()
    torch.testing.assert_close(B_c @ A_c, dW, rtol=0, atol=1e-12 * float(dW.abs().max()))
    gram_B, gram_A = B_c.T @ B_c, A_c @ A_c.T
    torch.testing.assert_close(gram_B, gram_A, rtol=0, atol=1e-10 * float(gram_B.abs().max()))
    off_diagonal = gram_B - torch.diag(torch.diag(gram_B))
    assert float(off_diagonal.abs().max()) <= 1e-10 * float(gram_B.abs().max())
    # Sorted largest first: the column order is canonical.
    norms = torch.diag(gram_B)
    assert bool((norms[:-1] >= norms[1:]).all())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_canonical_factors_do_not_depend_on_the_gauge(seed: int) -> None:
    B, A = random_adapter(seed).factors["blocks.1.query"]
    M = invertible(100 + seed)
    B_c, A_c = canonicalize(B.double(), A.double(), scaling=0.5)
    B_m, A_m = canonicalize(B.double() @ M, torch.linalg.solve(M, A.double()), scaling=0.5)
    # Same dW gives the same factors, signs included (not merely the same product).
    torch.testing.assert_close(B_m, B_c, rtol=0, atol=1e-9 * float(B_c.abs().max()))
    torch.testing.assert_close(A_m, A_c, rtol=0, atol=1e-9 * float(A_c.abs().max()))


def test_canonicalize_names_the_shapes_when_factors_do_not_chain() -> None:
    with pytest.raises(ValueError, match=r"B is \(6, 3\), A is \(4, 5\)"):
        canonicalize(torch.zeros(6, 3), torch.zeros(4, 5))


def assert_same_subspace(left, right) -> None:
    """Same k, same basis projectors on both sides, same dW for every task."""
    assert left.k() == right.k()
    for m in SHAPES:
        for side in ("U_A", "U_B"):
            P_left = projector(getattr(left.modules[m], side))
            P_right = projector(getattr(right.modules[m], side))
            assert float(torch.linalg.matrix_norm(P_left - P_right, ord=2)) <= 1e-5, (m, side)
    assert list(left.tasks) == list(right.tasks)
    for t in left.tasks:
        for m in SHAPES:
            dW_left, dW_right = left.delta_weight(t, m).double(), right.delta_weight(t, m).double()
            assert float((dW_left - dW_right).norm() / dW_left.norm()) <= 1e-5, (t, m)


@pytest.mark.parametrize("policy", [KPolicy(k=5), KPolicy(variance=0.6), KPolicy(k=64)])
def test_regauged_adapters_give_the_same_subspace(policy: KPolicy) -> None:
    """Init from three adapters, then merge two more: once as trained, once in another gauge each."""
    first = {f"t{i}": random_adapter(i) for i in range(3)}
    later = {f"t{i}": random_adapter(i) for i in range(3, 5)}
    plain, _ = merge(None, first, policy)
    other, _ = merge(None, {name: regauged(a, 10 * i) for i, (name, a) in enumerate(first.items())}, policy)
    assert_same_subspace(plain, other)

    plain2, report_plain = merge(plain, later, policy)
    # Merge the re-gauged later adapters into the *same* starting subspace: only the gauge differs.
    other2, report_other = merge(plain, {n: regauged(a, 50 + 10 * i) for i, (n, a) in enumerate(later.items())}, policy)
    assert_same_subspace(plain2, other2)
    for t, err in report_plain.reconstruction_error.items():
        assert abs(err - report_other.reconstruction_error[t]) <= 1e-6, t


def test_scaling_is_part_of_the_update_not_of_the_gauge() -> None:
    """``s B A`` given as ``(s, B, A)`` or ``(1, B, s A)`` is one update: same subspace, same dW.

    Two adapters with very different scalings, so that where ``s`` sits would change a raw stack of B's.
    """
    given = {"t0": random_adapter(7, scaling=4.0), "t1": random_adapter(8, scaling=0.25)}
    folded = {
        name: LoraAdapter(
            factors={m: (B, a.scale(m) * A) for m, (B, A) in a.factors.items()}, scaling={m: 1.0 for m in SHAPES}
        )
        for name, a in given.items()
    }
    left, _ = merge(None, given, KPolicy(k=3))
    right, _ = merge(None, folded, KPolicy(k=3))
    assert_same_subspace(left, right)
