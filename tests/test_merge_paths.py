"""The merge's fast paths: the rotations it reports for old tasks.

``MergeReport.rotations[m] = (R_A, R_B)`` must map every old task's coefficients before the merge onto
the ones the merge returns (the store rebuilds old tasks from them), under every k rule, with and
without truncation.
"""

from __future__ import annotations

import pytest
import torch

from share import KPolicy, LoraAdapter, ModuleBasis, Subspace, TaskCoefficients, merge

SHAPES = {"enc.0.query": (24, 20), "enc.0.value": (20, 24), "enc.1.query": (24, 20)}  # name -> (n, d)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_adapter(seed: int, r: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)) for m, (n, d) in SHAPES.items()}
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in SHAPES})


def random_subspace(tasks: int, k: int, seed: int, p: int = 3) -> Subspace:
    """Random orthonormal bases and random coefficients: an old state no merge produced."""
    g = torch.Generator().manual_seed(seed)

    def orthonormal(rows: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, k, generator=g))[0]

    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(k, p, generator=g), torch.randn(k, p, generator=g)

    modules = {m: ModuleBasis(U_A=orthonormal(d), U_B=orthonormal(n)) for m, (n, d) in SHAPES.items()}
    coefficients = {f"old{t}": TaskCoefficients(E={m: pair() for m in SHAPES}) for t in range(tasks)}
    return Subspace(modules=modules, tasks=coefficients, policy=KPolicy(k=k))


@pytest.mark.parametrize(
    "policy",
    [KPolicy(k=5), KPolicy(k=9), KPolicy(variance=0.7), KPolicy(max_error=0.3), KPolicy(max_error=0.05, k_max=7)],
    ids=["k5-truncates", "k9", "variance", "max_error", "max_error-capped"],
)
def test_rotations_map_old_coefficients_onto_the_merged_ones(policy: KPolicy) -> None:
    old = random_subspace(tasks=6, k=6, seed=1)
    merged, report = merge(old, {"new0": random_adapter(10), "new1": random_adapter(11)}, policy)
    assert set(report.rotations) == set(SHAPES)
    for m, (R_A, R_B) in report.rotations.items():
        k_A, k_B = merged.modules[m].k_A, merged.modules[m].k_B
        assert R_A.dtype == R_B.dtype == torch.float64
        assert tuple(R_A.shape) == (k_A, old.modules[m].k_A) and tuple(R_B.shape) == (k_B, old.modules[m].k_B)
        for name, task in old.tasks.items():
            for R, before, after in zip((R_A, R_B), task.E[m], merged.tasks[name].E[m], strict=True):
                expected = R @ before.double()
                assert torch.allclose(after.double(), expected, atol=1e-6, rtol=0), (name, m)
                # The update the rotated coefficients give is the merged task's update.
            U_A, U_B = merged.modules[m].U_A.double(), merged.modules[m].U_B.double()
            rebuilt = (U_B @ R_B @ task.E[m][1].double()) @ (U_A @ R_A @ task.E[m][0].double()).T
            assert torch.allclose(rebuilt, merged.delta_weight(name, m).double(), atol=1e-5)


def test_rotations_are_empty_at_initialization_and_orthogonal_without_truncation() -> None:
    first, report = merge(None, {"a": random_adapter(0), "b": random_adapter(1)}, KPolicy(k=20))
    assert report.rotations == {}
    _, report = merge(first, {"c": random_adapter(2)}, KPolicy(k=20))
    for R_A, R_B in report.rotations.values():
        for R in (R_A, R_B):
            # Nothing dropped: the old span is kept whole, so R has orthonormal columns.
            assert torch.allclose(R.T @ R, torch.eye(R.shape[1], dtype=torch.float64), atol=1e-10)
