"""The merge's fast paths, each against the exact computation it replaces.

- ``MergeReport.rotations[m] = (R_A, R_B)`` maps every old task's coefficients before the merge onto the
  ones the merge returns (the store rebuilds old tasks from them), under every k rule.
- The residual frame from the smaller Gram matrix (wide and tall, at initialization and in later merges)
  gives the merge the thin-SVD path gives; an ill-conditioned one is caught and redone on that path.
- The running Gram kept on the bases gives the merge that recomputing it from the tasks gives, and is
  ignored when it belongs to other tasks; so do the stacks a merge leaves its tasks as rows of.
- Nothing dropped: old tasks' errors are exactly 0 and their tracked bounds unchanged.
"""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch

from share import (
    KPolicy,
    LoraAdapter,
    ModuleBasis,
    Subspace,
    TaskCoefficients,
    canonicalize,
    merge,
)
from share.errors import ShareClError
from share.gauge import canonicalize_batch
from share.merge import MODULE_DRIFT, MODULE_ENTRY_NORM
from share.subspace import StackedCoefficients

merge_module = importlib.import_module("share.merge")  # the module; ``share.merge`` is the function

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


# -- the Gram-based residual frame against the exact (SVD) path ------------------------------------------
@pytest.fixture
def gram_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram-based frames for every batch (the merge takes them from ``_SVD_COLUMNS`` new columns on;
    these shapes are small)."""
    monkeypatch.setattr(merge_module, "_SVD_COLUMNS", 0)


def force_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every merge take the thin-SVD path (what the merge falls back to when a fast frame fails its check)."""
    original = merge_module._residual_frame

    def exact(Z, X, a, k, limit, fast, policy=None):
        return original(Z, X, a, k, limit, False, policy)

    monkeypatch.setattr(merge_module, "_residual_frame", exact)


def assert_same_merge(fast: tuple[Subspace, object], exact: tuple[Subspace, object], tol: float = 1e-6) -> None:
    (left, left_report), (right, right_report) = fast, exact
    assert left.k() == right.k()
    assert left_report.over_bound.keys() == right_report.over_bound.keys()
    for m in left.modules:
        for side in ("U_A", "U_B"):
            U, V = getattr(left.modules[m], side).double(), getattr(right.modules[m], side).double()
            assert float(torch.linalg.matrix_norm(U @ U.T - V @ V.T, ord=2)) <= tol, (m, side)
        for name in left.tasks:
            dW, ref = left.delta_weight(name, m).double(), right.delta_weight(name, m).double()
            assert float((dW - ref).abs().max()) <= tol * max(1.0, float(ref.abs().max())), (name, m)
    for name, err in right_report.reconstruction_error.items():
        assert left_report.reconstruction_error[name] == pytest.approx(err, rel=1e-6, abs=1e-7), name
        assert left_report.error_bound[name] == pytest.approx(right_report.error_bound[name], rel=1e-6, abs=1e-7)


def run_merges(rounds: list[dict[str, LoraAdapter]], policy: KPolicy) -> list[tuple[Subspace, object]]:
    out, subspace = [], None
    for batch in rounds:
        subspace, report = merge(subspace, batch, policy)
        out.append((subspace, report))
    return out


ROUNDS = {
    # 7 adapters x r=4: 28 columns > 24 and > 20 (wide: eigenvectors of Z Z.T); then tall merges, then wide again.
    "wide-init": [{f"a{i}": random_adapter(i) for i in range(7)}, {"b": random_adapter(20)}, {"c": random_adapter(21)}],
    "tall-init": [{f"a{i}": random_adapter(i) for i in range(3)}, {"b": random_adapter(20), "c": random_adapter(21)}],
    "wide-merge": [{"a": random_adapter(0)}, {f"b{i}": random_adapter(10 + i) for i in range(7)}],
}


@pytest.mark.parametrize("rounds", list(ROUNDS), ids=list(ROUNDS))
@pytest.mark.parametrize(
    "policy", [KPolicy(k=6), KPolicy(variance=0.8), KPolicy(max_error=0.2), KPolicy(max_error=0.1, k_max=9)]
)
@pytest.mark.usefixtures("gram_paths")
def test_fast_frames_give_the_exact_paths_merge(rounds: str, policy: KPolicy, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run_merges(ROUNDS[rounds], policy)
    force_exact(monkeypatch)
    exact = run_merges(ROUNDS[rounds], policy)
    for left, right in zip(fast, exact, strict=True):
        assert_same_merge(left, right)
        # Column signs are fixed (largest-magnitude entry positive), so the two paths give the same bases, not
        # only the same spans, and the same coefficients.
        for m, basis in left[0].modules.items():
            for side in ("U_A", "U_B"):
                U, V = getattr(basis, side), getattr(right[0].modules[m], side)
                assert bool((U.gather(0, U.abs().argmax(dim=0, keepdim=True)) > 0).all()), (m, side)
                assert float((U - V).abs().max()) <= 1e-4, (m, side)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall", "wide"])
@pytest.mark.usefixtures("gram_paths")
def test_residual_frame_fast_equals_svd(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(3)
    dim, m = shape
    # Singular values spread over six decades, and two columns repeated (rank below min(dim, m)).
    Z = torch.randn(dim, m, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -6, m, dtype=torch.float64)
    )
    Z[:, -2:] = Z[:, :2]
    fast = merge_module._residual_frame(Z, Z, Z.new_zeros(0, m), 0, dim, True)
    exact = merge_module._residual_frame(Z, Z, Z.new_zeros(0, m), 0, dim, False)
    assert fast.eigvals.shape == exact.eigvals.shape
    assert torch.allclose(fast.eigvals, exact.eigvals, rtol=1e-8, atol=1e-14 * float(exact.eigvals[0]))
    Q = fast.Q if fast.Q is not None else Z @ fast.to_Q
    assert torch.allclose(Q @ fast.R, Z, atol=1e-10)  # the frame holds the whole residual
    for j in (1, 4, 8):  # the top-j spans agree wherever the spectrum has a gap (logspace: every j)
        P, P_ref = Q[:, :j] @ Q[:, :j].T, exact.Q[:, :j] @ exact.Q[:, :j].T
        assert float(torch.linalg.matrix_norm(P - P_ref, ord=2)) <= 1e-8


@pytest.mark.usefixtures("gram_paths")
def test_an_ill_conditioned_fast_frame_falls_back_to_the_exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge adapter beside tiny ones: Z V S^-1 loses orthonormality in the tiny directions, the check sees it,
    and the module is merged again on the SVD path, so the result is the exact path's."""
    huge = random_adapter(1)
    huge.scaling = {m: 1e9 for m in SHAPES}  # singular values ~3e4 times the tiny ones': S^2 ratio ~1e9
    batch = {"huge": huge, "tiny0": random_adapter(2), "tiny1": random_adapter(3)}
    calls: list[bool] = []
    original = merge_module._truncate_module

    def counting(*args, **kwargs):
        cut = original(*args, **kwargs)
        calls.append(cut.orthonormal)
        return cut

    monkeypatch.setattr(merge_module, "_truncate_module", counting)
    fast = merge(None, batch, KPolicy(max_error=1e-3))
    assert False in calls  # at least one module needed the fallback ...
    assert len(calls) == len(SHAPES) + calls.count(False)  # ... and each such module was redone once
    force_exact(monkeypatch)
    exact = merge(None, batch, KPolicy(max_error=1e-3))
    assert_same_merge(fast, exact, tol=1e-6)
    for basis in fast[0].modules.values():
        for U in (basis.U_A.double(), basis.U_B.double()):
            assert float((U.T @ U - torch.eye(U.shape[1], dtype=torch.float64)).abs().max()) <= 1e-6


# -- the running Gram and the per-task arithmetic ---------------------------------------------------------
def test_the_gram_cache_gives_the_merge_that_recomputing_it_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_module, "_GRAM_FROM_CACHE", 0)  # use the running Gram from the first old column
    policy = KPolicy(max_error=0.15)
    cached, _ = merge(None, {"a": random_adapter(0), "b": random_adapter(1)}, policy)
    fresh = cached
    for i in range(2, 8):
        batch = {f"t{i}": random_adapter(i)}
        cache = next(iter(cached.modules.values())).gram_cache
        assert cache is not None and cache.tasks == tuple(cached.tasks)
        for basis in fresh.modules.values():
            basis.gram_cache = None  # as after a load: recomputed from the tasks
        cached_result = merge(cached, batch, policy)
        fresh_result = merge(fresh, batch, policy)
        # The cache is the Gram of the coefficients before their float32 storage; recomputed, of the stored
        # ones: the two merges differ at float32 rounding, no more.
        assert_same_merge(cached_result, fresh_result, tol=1e-6)
        cached, fresh = cached_result[0], fresh_result[0]
    # The cache holds the Gram of the tasks' (float32) coefficients up to their rounding.
    for m, basis in cached.modules.items():
        E_A = torch.cat([t.E[m][0] for t in cached.tasks.values()], dim=1).double()
        gram = E_A @ E_A.T
        assert float((basis.gram_cache.A - gram).abs().max()) <= 1e-6 * float(gram.abs().max())


def test_a_cache_of_other_tasks_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(merge_module, "_GRAM_FROM_CACHE", 0)
    """Bases shared into a subspace with fewer tasks (as the coordinator's bases-only copies are) must not
    carry the cache of the full task set into a merge."""
    policy = KPolicy(k=8)
    full, _ = merge(None, {f"t{i}": random_adapter(i) for i in range(4)}, policy)
    fewer = Subspace(modules=full.modules, tasks={"t0": full.tasks["t0"]}, policy=policy)
    copied = Subspace(
        modules={m: ModuleBasis(U_A=b.U_A, U_B=b.U_B) for m, b in full.modules.items()},
        tasks={"t0": full.tasks["t0"]},
        policy=policy,
    )
    assert_same_merge(
        merge(fewer, {"new": random_adapter(9)}, policy), merge(copied, {"new": random_adapter(9)}, policy)
    )


def test_the_stacks_a_merge_leaves_give_the_merge_that_stacking_the_tasks_again_gives() -> None:
    """The next merge reads the old tasks from the stacks the last one left (every task is a row of them), not
    task by task: bit for bit the same merge, and a task whose coefficients were replaced is seen."""
    policy = KPolicy(max_error=0.1)
    cached, _ = merge(None, {f"t{i}": random_adapter(i) for i in range(3)}, policy)
    for i in range(3, 7):
        module = next(iter(cached.modules))
        rows = [task.E for task in cached.tasks.values()]
        assert all(isinstance(E, StackedCoefficients) and E.stacks is rows[0].stacks for E in rows)
        assert [E.row for E in rows] == list(range(len(rows)))
        S_A = rows[0].stacks[module][0]
        assert S_A.shape[0] == len(rows) and rows[1][module][0]._base is S_A  # a view, no copy
        restacked = Subspace(
            modules={m: ModuleBasis(U_A=b.U_A, U_B=b.U_B) for m, b in cached.modules.items()},
            tasks={
                t: TaskCoefficients(E={m: (a.clone(), b.clone()) for m, (a, b) in c.E.items()}, metadata=c.metadata)
                for t, c in cached.tasks.items()
            },
            policy=policy,
        )
        batch = {f"t{i}": random_adapter(i)}
        left, right = merge(cached, batch, policy), merge(restacked, batch, policy)
        for m in SHAPES:
            assert torch.equal(left[0].modules[m].U_A, right[0].modules[m].U_A)
            for t in left[0].tasks:
                assert all(
                    torch.equal(x, y) for x, y in zip(left[0].tasks[t].E[m], right[0].tasks[t].E[m], strict=True)
                )
        assert left[1].error_bound == right[1].error_bound
        cached = left[0]
    # A task's coefficients replaced in place of the views: the stacks are not used, the new values are.
    m = next(iter(SHAPES))
    E_A, E_B = cached.tasks["t0"].E[m]
    cached.tasks["t0"].E[m] = (E_A * 0.5, E_B)
    assert cached.tasks["t0"].E.stacks is None and torch.equal(cached.tasks["t0"].E[m][0], E_A * 0.5)
    t1 = cached.tasks["t1"].E
    assert t1.stacks is not None and torch.equal(t1[m][0], t1.stacks[m][0][1])  # the others still read their rows
    fresh = Subspace(
        modules={k: ModuleBasis(U_A=b.U_A, U_B=b.U_B) for k, b in cached.modules.items()},
        tasks=cached.tasks,
        policy=policy,
    )
    left, right = merge(cached, {"z": random_adapter(99)}, policy), merge(fresh, {"z": random_adapter(99)}, policy)
    assert_same_merge(left, right, tol=1e-6)


def test_chunked_energies_and_coefficients_are_the_written_out_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every task is projected in chunks (several per group, the last one short), old tasks straight from the
    stored float32 stacks: its coefficients are ``W.T c`` of its whole group, its energy ``|M|^2`` and its error
    ``|M|^2 - |W_B.T M W_A|^2`` with ``M = c_B c_A.T`` written out in float64 (the merge gets the error from the
    dropped directions' coordinates instead, without the subtraction), with one width and with two."""
    original, seen = merge_module._truncate_module, []

    def checked(names, widths, A, B, drift, policy, totals=None, groups=None):
        cut = original(names, widths, A, B, drift, policy, totals, groups)
        W_A, W_B = cut.W
        for index, group_A, group_B in groups:
            c_A, c_B = group_A.double(), group_B.double()
            E_A, E_B = W_A[: c_A.shape[1]].T @ c_A, W_B[: c_B.shape[1]].T @ c_B
            total = (c_B @ c_A.transpose(1, 2)).square().sum(dim=(1, 2))
            kept = (E_B @ E_A.transpose(1, 2)).square().sum(dim=(1, 2))
            assert torch.allclose(cut.sq_norm[index], total, rtol=1e-12, atol=0.0)
            assert torch.allclose(cut.sq_diff[index], total - kept, rtol=0.0, atol=1e-12 * float(total.max()))
            for i, a, b in zip(index.tolist(), E_A, E_B, strict=True):
                got_A, got_B = cut.E[names[i]]
                assert torch.allclose(got_A, a.float(), rtol=1e-6, atol=1e-7) and got_A.dtype == torch.float32
                assert torch.allclose(got_B, b.float(), rtol=1e-6, atol=1e-7)
        seen.append((cut.stacks is not None, float(cut.sq_diff.max()), groups[0][1].dtype))
        return cut

    def no_energies(*args: object) -> None:
        raise AssertionError("the |M|^2 pass ran: the merge did not take the kept/dropped error path")

    policy = KPolicy(k=5)
    subspace, _ = merge(None, {f"t{i}": random_adapter(i) for i in range(7)}, policy)
    monkeypatch.setattr(merge_module, "_energies", no_energies)
    monkeypatch.setattr(merge_module, "_truncate_module", checked)
    monkeypatch.setattr(merge_module, "_ROTATE_CHUNK", 100)  # 2 or 3 tasks a chunk: K x p is 36 or more
    subspace, _ = merge(subspace, {"one": random_adapter(10)}, policy)  # one width: every task a row of the stacks
    merge(subspace, {"two": random_adapter(11, r=2)}, policy)  # two widths: a pair per task
    assert [stacked for stacked, _, _ in seen] == [True] * len(SHAPES) + [False] * len(SHAPES)
    assert all(dtype == torch.float32 for _, _, dtype in seen)  # old tasks read from the stored stacks
    assert all(worst > 1e-3 for _, worst, _ in seen)  # directions are dropped: the errors are not vacuous


def test_a_task_tracked_in_some_modules_only_starts_tracking_the_others_now() -> None:
    """A task whose per-module entry norms and drifts lack a module (committed before that module was tracked):
    that module's tracking starts at this merge (entry = its update now, drift = this merge's error there), and
    every other module goes on from its stored entry norm and drift."""
    policy = KPolicy(k=5)
    sub, _ = merge(None, {f"t{i}": random_adapter(i) for i in range(3)}, policy)
    sub, _ = merge(sub, {"u": random_adapter(5)}, policy)
    untracked, tracked = list(SHAPES)[:2]
    task = sub.tasks["t0"]
    before = {key: dict(task.metadata[key]) for key in (MODULE_ENTRY_NORM, MODULE_DRIFT)}
    metadata = {**task.metadata, **{key: {m: v for m, v in before[key].items() if m != untracked} for key in before}}
    sub.tasks["t0"] = TaskCoefficients(dict(task.E), dict(task.head), metadata)
    merged, report = merge(sub, {"v": random_adapter(6)}, policy)
    got = merged.tasks["t0"].metadata
    assert report.module_error["t0"][untracked] > 1e-3  # the merge dropped something there
    assert got[MODULE_DRIFT][untracked] == pytest.approx(report.module_error["t0"][untracked], rel=1e-9)
    assert got[MODULE_ENTRY_NORM][untracked] < before[MODULE_ENTRY_NORM][untracked]  # its norm now, not at entry
    assert got[MODULE_ENTRY_NORM][tracked] == before[MODULE_ENTRY_NORM][tracked]
    assert got[MODULE_DRIFT][tracked] > before[MODULE_DRIFT][tracked] > 0


def test_the_merge_caches_stay_with_their_subspace() -> None:
    """Pickled (Ray), the bases leave the Gram cache behind, and the tasks' shared stacks travel once (still
    shared on the other side, so the next merge there reads them whole); a task-less copy holds no coefficients."""
    merged, _ = merge(None, {"a": random_adapter(0), "b": random_adapter(1)}, KPolicy(k=6))
    basis = next(iter(merged.modules.values()))
    assert basis.gram_cache is not None
    copy = pickle.loads(pickle.dumps(merged))
    assert next(iter(copy.modules.values())).gram_cache is None
    assert torch.equal(next(iter(copy.modules.values())).U_A, basis.U_A) and list(copy.tasks) == ["a", "b"]
    a, b = copy.tasks["a"].E, copy.tasks["b"].E
    assert isinstance(a, StackedCoefficients) and a.stacks is b.stacks and (a.row, b.row) == (0, 1)
    for m in merged.modules:
        for x, y in zip(a[m] + b[m], merged.tasks["a"].E[m] + merged.tasks["b"].E[m], strict=True):
            assert torch.equal(x, y)
    assert merge_module._shared_stacks(copy, ["a", "b"]) is a.stacks


def _reference_worst(groups, W_A, W_B, drift, eps, totals) -> torch.Tensor:
    """``_worst_excess`` written out (every intermediate its own tensor, no chunks), for the in-place one to match."""
    worst = torch.full((W_B.shape[1], W_A.shape[1]), -float("inf"), dtype=torch.float64)
    for index, c_A, c_B in groups:
        total = totals[index]
        M = (W_B[: c_B.shape[1]].T @ c_B) @ (W_A[: c_A.shape[1]].T @ c_A).transpose(1, 2)
        kept = M.square().cumsum(dim=1).cumsum(dim=2)
        entry, prior, limit = merge_module._bound_terms(index, total, drift, eps)
        lost = (total[:, None, None] - kept).clamp_min(0.0).sqrt()
        excess = prior[:, None, None] + lost / entry[:, None, None] - limit[:, None, None]
        excess[entry == 0] = -float("inf")
        worst = torch.maximum(worst, excess.amax(dim=0))
    return worst


@pytest.mark.parametrize("policy", [KPolicy(max_error=0.05), KPolicy(max_error=0.2), KPolicy(max_error=0.02, k_max=12)])
def test_the_bounded_choice_in_place_computes_what_the_written_out_arithmetic_computes(
    policy: KPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, seen = merge_module._worst_excess, []

    def checked(groups, W_A, W_B, drift, eps, totals):
        got = original(groups, W_A, W_B, drift, eps, totals)
        assert torch.equal(got, _reference_worst(groups, W_A, W_B, drift, eps, totals))
        seen.append(int((got <= 0).sum()))
        return got

    monkeypatch.setattr(merge_module, "_worst_excess", checked)
    monkeypatch.setattr(merge_module, "_PREFIX_CHUNK", 3 * 12 * 12)  # several chunks per group
    subspace = None
    for i in range(0, 12, 3):
        subspace, _ = merge(subspace, {f"t{j}": random_adapter(j, r=2 + j % 3) for j in range(i, i + 3)}, policy)
    assert len(seen) == 4 * len(SHAPES) and len(set(seen)) > 1  # the feasible region varied, equal every time


def test_nothing_dropped_leaves_old_tasks_exactly_as_they_were() -> None:
    policy = KPolicy(max_error=0.05)
    old, _ = merge(None, {"a": random_adapter(0), "b": random_adapter(1)}, KPolicy(k=40))
    merged, report = merge(old, {"c": random_adapter(2)}, KPolicy(k=40))
    assert policy.max_error  # (the fixed k here keeps every direction: 8 + 4 <= 20 per side)
    for name in ("a", "b"):
        assert report.reconstruction_error[name] == 0.0
        assert set(report.module_error[name].values()) == {0.0}
        assert merged.tasks[name].metadata["module_drift"] == old.tasks[name].metadata["module_drift"]
        assert merged.tasks[name].metadata["energy_kept"] == old.tasks[name].metadata["energy_kept"]


def test_batched_gauge_equals_the_gauge_of_each_pair() -> None:
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(6, 30, 4, generator=g), torch.randn(6, 4, 20, generator=g)
    scaling = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    B_c, A_c = canonicalize_batch(B, A, scaling)
    for i in range(6):
        b, a = canonicalize(B[i], A[i], scaling=float(scaling[i]))
        assert torch.allclose(B_c[i], b, atol=1e-12) and torch.allclose(A_c[i], a, atol=1e-12)


@pytest.mark.parametrize("fault", ["lora_A", "lora_B", "scaling"])
def test_batched_validation_names_the_adapter_and_module_at_fault(fault: str) -> None:
    batch = {f"t{i}": random_adapter(i) for i in range(5)}
    B, A = batch["t3"].factors["enc.0.value"]
    if fault == "lora_A":
        A[1, 2] = float("nan")
    elif fault == "lora_B":
        B[0, 0] = float("inf")
    else:
        batch["t3"].scaling["enc.0.value"] = float("inf")
    with pytest.raises(ShareClError, match=r"adapter 't3', module 'enc.0.value'"):
        merge(None, batch, KPolicy(k=4))
