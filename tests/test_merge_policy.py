"""The forgetting-bounded merge policy ``KPolicy(max_error=eps)`` against an independent numpy reference.

The reference keeps every task's ORIGINAL dense ``dW`` (float64 numpy, from its adapter) and recomputes
each task's current ``dW`` from the subspace after every merge. It never calls ``share``'s linear algebra:
canonical factors come from an SVD of the explicit ``dW``, candidate bases from an SVD of the explicitly
stacked ``[U E_1 ... U E_T, X_new]``, per-merge errors from dense matrices.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from share import DEFAULT_MAX_ERROR, KPolicy, KRule, LoraAdapter, Subspace, merge
from share.errors import ShareClError

SHAPES = {"q": (16, 12), "v": (12, 16)}  # module -> (n out, d in)
EPS = 0.05
TOL = 1e-5  # float32 storage of bases and coefficients

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- adapters with shared structure plus noise ------------------------------------------------------------
def structured_adapter(seed: int, r: int, noise: float, scaling: float = 2.0) -> LoraAdapter:
    """Factors mostly inside a fixed rank-3 structure per module (shared by every task), plus noise."""
    shared = torch.Generator().manual_seed(1234)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m, (n, d) in SHAPES.items():
        S_B, S_A = torch.randn(n, 3, generator=shared), torch.randn(d, 3, generator=shared)
        B = S_B @ torch.randn(3, r, generator=g) + noise * torch.randn(n, r, generator=g)
        A = torch.randn(r, 3, generator=g) @ S_A.T + noise * torch.randn(r, d, generator=g)
        factors[m] = (B, A)
    return LoraAdapter(factors=factors, scaling={m: scaling for m in SHAPES})


def dense(adapter: LoraAdapter, module: str) -> np.ndarray:
    B, A = adapter.factors[module]
    return adapter.scale(module) * (B.double().numpy() @ A.double().numpy())


def current(subspace: Subspace, task: str, module: str) -> np.ndarray:
    basis = subspace.modules[module]
    E_A, E_B = (e.double().numpy() for e in subspace.tasks[task].E[module])
    return (basis.U_B.double().numpy() @ E_B) @ (basis.U_A.double().numpy() @ E_A).T


def fro(x: np.ndarray) -> float:
    return float(np.linalg.norm(x))


# -- the reference ------------------------------------------------------------------------------------------
class Reference:
    """Every task's first committed dW, and the numpy sum of its per-merge errors (per module and overall)."""

    def __init__(self) -> None:
        self.first: dict[str, dict[str, np.ndarray]] = {}
        self.module_drift: dict[str, dict[str, float]] = {}
        self.drift: dict[str, float] = {}

    def entry(self, task: str, module: str) -> float:
        return fro(self.first[task][module])

    def before(self, subspace: Subspace | None, new: dict[str, LoraAdapter]) -> dict[str, dict[str, np.ndarray]]:
        """Each task's dW just before the merge (old: from the subspace; new: its adapter)."""
        out = {t: {m: current(subspace, t, m) for m in SHAPES} for t in (subspace.tasks if subspace else {})}
        out |= {t: {m: dense(a, m) for m in SHAPES} for t, a in new.items()}
        return out

    def record(self, before: dict[str, dict[str, np.ndarray]], merged: Subspace, new: list[str]) -> None:
        """Add this merge's errors (dense, before against after) to every task's drift."""
        for t in new:
            self.first[t] = before[t]
            self.module_drift[t] = {m: 0.0 for m in SHAPES}
            self.drift[t] = 0.0
        for t, per_module in before.items():
            sq = 0.0
            for m, dW in per_module.items():
                diff = fro(dW - current(merged, t, m))
                self.module_drift[t][m] += diff / self.entry(t, m)
                sq += diff**2
            self.drift[t] += math.sqrt(sq) / math.sqrt(sum(self.entry(t, m) ** 2 for m in SHAPES))


def canonical_columns(dW: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced factors of ``dW`` from its SVD: ``(B_c: n x r, A_c.T: d x r)``."""
    U, S, Vh = np.linalg.svd(dW, full_matrices=False)
    root = np.sqrt(S[:r])
    return U[:, :r] * root, Vh[:r].T * root


def candidate_bases(old: Subspace | None, new: dict[str, LoraAdapter], module: str) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors (numerical rank only) of the stacked columns, side A and side B."""
    cols: dict[str, list[np.ndarray]] = {"A": [], "B": []}
    if old is not None:
        basis = old.modules[module]
        for t in old.tasks.values():
            E_A, E_B = (e.double().numpy() for e in t.E[module])
            cols["A"].append(basis.U_A.double().numpy() @ E_A)
            cols["B"].append(basis.U_B.double().numpy() @ E_B)
    for adapter in new.values():
        B_c, A_cT = canonical_columns(dense(adapter, module), adapter.factors[module][0].shape[1])
        cols["B"].append(B_c)
        cols["A"].append(A_cT)
    out = []
    for side in ("A", "B"):
        U, S, _ = np.linalg.svd(np.concatenate(cols[side], axis=1), full_matrices=False)
        out.append(U[:, : int((S > 1e-9 * S[0]).sum())])
    return out[0], out[1]


def worst_excess(
    ref: Reference,
    before: dict[str, dict[str, np.ndarray]],
    module: str,
    L_A: np.ndarray,
    L_B: np.ndarray,
    a: int,
    b: int,
) -> tuple[float, str]:
    """max over tasks of (prior drift + error of keeping the top a / b directions) - eps, and that task."""
    a, b = min(a, L_A.shape[1]), min(b, L_B.shape[1])
    P_A, P_B = L_A[:, :a] @ L_A[:, :a].T, L_B[:, :b] @ L_B[:, :b].T
    names = list(before)
    D = np.stack([before[t][module] for t in names])
    errors = np.linalg.norm(D - P_B @ D @ P_A, axis=(1, 2))
    bounds = [
        ref.module_drift.get(t, {}).get(module, 0.0) + e / fro(ref.first.get(t, before[t])[module])
        for t, e in zip(names, errors, strict=True)
    ]
    i = int(np.argmax(bounds))
    return bounds[i] - EPS, names[i]


# -- 30 merges against the reference ------------------------------------------------------------------------
def test_thirty_merges_keep_every_task_within_eps_with_minimal_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    policy = KPolicy(max_error=EPS)
    ref = Reference()
    subspace: Subspace | None = None
    seed = 0
    truncated = 0
    for step in range(30):
        batch = {}
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            scaling = float(rng.uniform(0.5, 3))
            batch[f"t{seed}"] = structured_adapter(seed, r=int(rng.choice([2, 3])), noise=0.02, scaling=scaling)
            seed += 1
        before = ref.before(subspace, batch)
        bases = {m: candidate_bases(subspace, batch, m) for m in SHAPES}
        merged, report = merge(subspace, batch, policy)
        assert report.max_error == EPS and not report.capped_modules and report.over_bound == {}

        # k is minimal: every (k_A', k_B') with a smaller sum pushes some task over eps (the reference
        # checks the maximal ones, (a, s - a) with s = k_A + k_B - 1; the bound falls as either k grows).
        for m in SHAPES:
            k_A, k_B = report.k[m]
            assert merged.k()[m] == (k_A, k_B)
            L_A, L_B = bases[m]
            assert worst_excess(ref, before, m, L_A, L_B, k_A, k_B)[0] <= 1e-6, (step, m)
            s = k_A + k_B - 1
            for a in range(1, s):
                excess, task = worst_excess(ref, before, m, L_A, L_B, a, s - a)
                assert excess > 0, f"merge {step}, module {m}: ({a}, {s - a}) keeps every task within eps"
            truncated += (k_A, k_B) != (L_A.shape[1], L_B.shape[1])

        ref.record(before, merged, list(batch))
        for t, task in merged.tasks.items():
            meta = task.metadata
            sq_first = sum(ref.entry(t, m) ** 2 for m in SHAPES)
            sq_now = 0.0
            for m in SHAPES:
                now = current(merged, t, m)
                sq_now += fro(now) ** 2
                true_error = fro(now - ref.first[t][m]) / ref.entry(t, m)
                assert true_error <= EPS + TOL, (step, t, m, true_error)
                assert true_error <= ref.module_drift[t][m] + TOL  # the drift is an upper bound ...
                assert meta["module_drift"][m] == pytest.approx(ref.module_drift[t][m], abs=TOL), (step, t, m)
                assert meta["module_entry_norm"][m] == pytest.approx(ref.entry(t, m), rel=1e-5)
                assert report.module_drift[t][m] == meta["module_drift"][m]
            assert meta["drift_bound"] == pytest.approx(ref.drift[t], abs=TOL), (step, t)
            assert meta["energy_kept"] == pytest.approx(sq_now / sq_first, abs=TOL), (step, t)
            assert meta["entry_norm"] == pytest.approx(math.sqrt(sq_first), rel=1e-5)
            assert meta["error_bound"] == max(meta["module_drift"].values()) <= EPS + 1e-9
            assert report.error_bound[t] == meta["error_bound"]
            assert report.energy_kept[t] == meta["energy_kept"] and report.drift_bound[t] == meta["drift_bound"]
        subspace = merged
        if step == 14:  # the tracking lives in the saved metadata: a round trip changes nothing
            subspace = Subspace.load(merged.save(tmp_path / "mid"))
            assert subspace.tasks["t0"].metadata == merged.tasks["t0"].metadata
            assert subspace.policy == policy
    # ... and the test is not vacuous: merges truncated, and drift accumulated for many tasks.
    drifted = sum(d > 1e-2 for d in ref.drift.values())
    assert truncated >= 15 and drifted >= 10, (truncated, drifted)


# -- k_max binds: the report names the tasks over eps with their numbers --------------------------------------
def _old_pair() -> tuple[Subspace, Reference]:
    ref = Reference()
    first = {"t0": structured_adapter(0, r=2, noise=0.01), "t1": structured_adapter(1, r=2, noise=0.01)}
    before = ref.before(None, first)
    subspace, report = merge(None, first, KPolicy(max_error=EPS))
    assert report.over_bound == {}
    ref.record(before, subspace, list(first))
    return subspace, ref


def strong_new_direction(seed: int, magnitude: float) -> LoraAdapter:
    """A rank-1 update outside the shared structure, much stronger than the old tasks."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        m: (magnitude * torch.randn(n, 1, generator=g), torch.randn(1, d, generator=g)) for m, (n, d) in SHAPES.items()
    }
    return LoraAdapter(factors=factors)


def expected_over(ref: Reference, merged: Subspace, eps: float) -> dict[str, float]:
    """Tasks some module of which the reference finds over eps, with the worst module's bound."""
    return {
        t: max(ref.module_drift[t].values()) for t in merged.tasks if any(d > eps for d in ref.module_drift[t].values())
    }


def test_k_max_binding_names_the_tasks_over_eps_with_their_bounds() -> None:
    old, ref = _old_pair()
    k_old = old.k()
    new = {"big": strong_new_direction(7, magnitude=30.0)}
    before = ref.before(old, new)
    cap = min(min(pair) for pair in k_old.values())
    merged, report = merge(old, new, KPolicy(max_error=EPS, k_max=cap))
    ref.record(before, merged, list(new))
    assert set(report.capped_modules) == set(SHAPES)
    assert all(k == (cap, cap) for k in merged.k().values())  # the cap corner: least error for every task
    expected = expected_over(ref, merged, EPS)
    assert set(expected) == {"t0", "t1"}  # the strong new task is kept whole, the old ones pay
    assert set(report.over_bound) == set(expected)
    for t, bound in expected.items():
        assert report.over_bound[t] == pytest.approx(bound, rel=1e-4)
        assert report.error_bound[t] == report.over_bound[t] > EPS
    assert not report.within_bound
    assert report.error_bound["big"] <= EPS

    # The next merge without a cap names nobody: tasks already over lose nothing more, the rest stay within eps.
    later = {"t9": structured_adapter(9, r=2, noise=0.15)}
    before = ref.before(merged, later)
    again, report2 = merge(merged, later, KPolicy(max_error=EPS))
    ref.record(before, again, list(later))
    assert report2.over_bound == {} and report2.within_bound and not report2.capped_modules
    for t in ("t0", "t1"):
        assert report2.error_bound[t] == pytest.approx(report.error_bound[t], abs=1e-6)
        for m in SHAPES:
            assert fro(current(again, t, m) - current(merged, t, m)) <= 1e-5 * ref.entry(t, m)


# -- issue 10, defect 4: a huge (finite) adapter does not silently wipe the old tasks -------------------------
def huge_adapter() -> LoraAdapter:
    adapter = structured_adapter(5, r=4, noise=0.5)
    for _, A in adapter.factors.values():
        A[0, 0] = 3e38  # finite in float32
    return adapter


@pytest.mark.parametrize("k_max", [None, "old"])
def test_a_huge_adapter_keeps_the_old_tasks_or_reports_them(k_max: str | None) -> None:
    old, ref = _old_pair()
    cap = None if k_max is None else min(min(pair) for pair in old.k().values())
    new = {"huge": huge_adapter()}
    assert torch.isfinite(new["huge"].factors["q"][1]).all()
    before = ref.before(old, new)
    merged, report = merge(old, new, KPolicy(max_error=EPS, k_max=cap))
    ref.record(before, merged, list(new))
    for t in ("t0", "t1"):
        errors = [fro(current(merged, t, m) - ref.first[t][m]) / ref.entry(t, m) for m in SHAPES]
        if cap is None:
            assert max(errors) <= EPS + TOL, (t, errors)  # enough directions were kept
        else:
            # The cap keeps the huge direction and drops old ones: reported, with the reference's numbers.
            assert report.over_bound[t] == pytest.approx(max(ref.module_drift[t].values()), rel=1e-4)
            assert report.over_bound[t] >= max(errors) - TOL > EPS
    if cap is None:
        assert report.over_bound == {}
        assert all(sum(report.k[m]) > sum(old.k()[m]) for m in SHAPES)  # the huge direction came on top
    assert report.error_bound["huge"] <= 1e-5


# -- issue 10, defect 1: rank above the layer's size --------------------------------------------------------------
def test_rank_above_the_layer_size_is_refused_before_any_work() -> None:
    n, d = SHAPES["q"]
    too_big = structured_adapter(3, r=min(n, d) + 1, noise=0.1)
    with pytest.raises(ShareClError, match=r"adapter 'wide', module 'q': rank 13 exceeds .*min\(out, in\) = 12"):
        merge(None, {"wide": too_big})
    old, _ = _old_pair()
    with pytest.raises(ShareClError, match="rank 13 exceeds"):
        merge(old, {"wide": too_big})
    full, report = merge(old, {"full": structured_adapter(3, r=min(n, d), noise=0.1)})  # rank == min(n, d) is fine
    assert "full" in full.tasks and report.error_bound["full"] <= EPS


# -- tasks committed before per-module tracking ---------------------------------------------------------------------
def test_tasks_without_module_tracking_start_it_at_their_next_merge() -> None:
    old, _ = _old_pair()
    for task in old.tasks.values():
        for key in ("module_entry_norm", "module_drift", "error_bound"):
            del task.metadata[key]
    now = {t: {m: current(old, t, m) for m in SHAPES} for t in old.tasks}
    merged, report = merge(old, {"t2": structured_adapter(2, r=2, noise=0.15)}, KPolicy(max_error=EPS))
    for t in old.tasks:
        for m in SHAPES:
            assert merged.tasks[t].metadata["module_entry_norm"][m] == pytest.approx(fro(now[t][m]), rel=1e-5)
            error = fro(current(merged, t, m) - now[t][m]) / fro(now[t][m])
            assert report.module_drift[t][m] == pytest.approx(error, abs=TOL) and error <= EPS + TOL


# -- KPolicy ----------------------------------------------------------------------------------------------------------
def test_policy_rules_defaults_and_round_trip() -> None:
    assert KPolicy() == KPolicy(max_error=DEFAULT_MAX_ERROR) and DEFAULT_MAX_ERROR == 0.05
    assert KPolicy().rule is KRule.MAX_ERROR
    assert KPolicy(variance=0.6).rule is KRule.VARIANCE and KPolicy(variance=0.6).max_error is None
    assert KPolicy(k=4, k_max=8).rule is KRule.FIXED
    for policy in (KPolicy(), KPolicy(variance=0.6, k_max=3), KPolicy(k=5), KPolicy(max_error=0.1, k_max=16)):
        assert KPolicy.from_dict(policy.to_dict()) == policy
    # Dicts written before max_error existed: variance alone, or k beside the then-default variance.
    assert KPolicy.from_dict({"k": None, "variance": 0.6, "k_max": None}) == KPolicy(variance=0.6)
    assert KPolicy.from_dict({"k": 4, "variance": 0.6, "k_max": 6}) == KPolicy(k=4, k_max=6)
    assert KPolicy.from_dict({}) == KPolicy()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 4, "variance": 0.6}, "k and variance are both set"),
        ({"variance": 0.6, "max_error": 0.1}, "variance and max_error are both set"),
        ({"max_error": 0.0}, r"max_error must be in \(0, 1\)"),
        ({"max_error": 1.0}, r"max_error must be in \(0, 1\)"),
        ({"max_error": float("nan")}, r"max_error must be in \(0, 1\)"),
        ({"variance": 1.5}, r"variance must be in \(0, 1\]"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 2.5}, "k must be an integer >= 1"),
        ({"k_max": 0}, "k_max must be an integer >= 1"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ShareClError, match=message):
        KPolicy(**kwargs)


def test_policy_from_dict_refuses_unknown_fields_and_non_mappings() -> None:
    with pytest.raises(ShareClError, match=r"unknown field\(s\) \['max_eror'\]"):
        KPolicy.from_dict({"max_eror": 0.1})
    with pytest.raises(ShareClError, match="expected a mapping"):
        KPolicy.from_dict([0.1])  # type: ignore[arg-type]
    with pytest.raises(ShareClError, match="k and max_error are both set"):
        KPolicy.from_dict({"k": 4, "variance": None, "max_error": 0.05, "k_max": None})
