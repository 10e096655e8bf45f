"""Retiring tasks (issue 12): ``share.remove_tasks`` refits the bases to the remaining tasks exactly,
the coordinator carries out a removal request in stream order under the compare-and-set head (real
redis-server), and ``sharecl remove`` requests it (store) or rewrites a folder."""

from __future__ import annotations

import pytest
import torch

from coordinator import AccuracyMatrix, Coordinator, MergeTracker
from coordinator.service import REMOVAL_KEY
from jobs.cli import main
from share import KPolicy, LoraAdapter, Subspace, TaskUpdate, merge, remove_tasks
from share.errors import ShareClError
from subspace_store import (
    SubmissionKind,
    SubmissionStatus,
    SubmissionStream,
    SubspaceStore,
    TaskNotFoundError,
)
from subspace_store.keys import Keys
from subspace_store.stream import RemovalRequest, Submission

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = {"layer.0.query": (40, 32), "layer.0.value": (36, 28)}  # name -> (out n, in d)
TIGHT = 1e-6  # nothing truncated: every remaining task's dW is the same up to float32 round-off


def lora(seed: int, r: int = 4, share_with: LoraAdapter | None = None, shared: int = 0) -> LoraAdapter:
    """A random LoRA; with ``share_with``, its first ``shared`` columns of B (rows of A) are that adapter's,
    so two tasks overlap in the subspace and the rank they need together is below the sum of ranks."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m, (n, d) in MODULES.items():
        B, A = torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)
        if share_with is not None:
            B[:, :shared] = share_with.factors[m][0][:, :shared]
            A[:shared] = share_with.factors[m][1][:shared] * 2.0
        factors[m] = (B, A)
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in MODULES}, head={"classifier.weight": torch.ones(3, 8)})


def four_tasks() -> dict[str, LoraAdapter]:
    a = lora(0)
    return {"a": a, "b": lora(1), "c": lora(2, share_with=a, shared=2), "d": lora(3, r=2)}


def adapter_delta(adapter: LoraAdapter, module: str) -> torch.Tensor:
    B, A = adapter.factors[module]
    return adapter.scale(module) * B.double() @ A.double()


def delta(sub: Subspace, task: str, module: str) -> torch.Tensor:
    """``dW`` from the stored float32 state, computed in float64 (independent of ``Subspace.delta_weight``)."""
    basis, (E_A, E_B) = sub.modules[module], sub.tasks[task].E[module]
    return (basis.U_B.double() @ E_B.double()) @ (basis.U_A.double() @ E_A.double()).T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def task_error(after: Subspace, before: Subspace, task: str) -> float:
    """``|dW' - dW| / |dW|`` over all modules, measured on the matrices."""
    diff = sum(float(torch.linalg.norm(delta(after, task, m) - delta(before, task, m)) ** 2) for m in MODULES)
    norm = sum(float(torch.linalg.norm(delta(before, task, m)) ** 2) for m in MODULES)
    return (diff / norm) ** 0.5


def needed_rank(adapters: list[LoraAdapter], module: str) -> tuple[int, int]:
    """(k_A, k_B) the adapters need together: the ranks of their stacked factors, from the factors alone."""
    A_T = torch.cat([a.factors[module][1].double().T for a in adapters], dim=1)
    B = torch.cat([a.factors[module][0].double() for a in adapters], dim=1)
    return int(torch.linalg.matrix_rank(A_T)), int(torch.linalg.matrix_rank(B))


def assert_orthonormal(sub: Subspace) -> None:
    for basis in sub.modules.values():
        for U in (basis.U_A.double(), basis.U_B.double()):
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-5)


def projector(U: torch.Tensor) -> torch.Tensor:
    U = U.double()
    return U @ U.T


# -- share.remove_tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [KPolicy(variance=1.0), KPolicy(), KPolicy(k=16)], ids=["variance1", "bound", "k16"])
def test_removal_keeps_every_remaining_task_and_shrinks_k_to_their_rank(policy: KPolicy) -> None:
    adapters = four_tasks()
    full, _ = merge(None, adapters, policy)
    assert full.k()["layer.0.query"] == (12, 12)  # 4 + 4 + (4 - 2 shared) + 2: nothing truncated at merge
    before = {t: {m: delta(full, t, m) for m in MODULES} for t in full.tasks}

    reduced, report = remove_tasks(full, ["b"])

    assert list(reduced.tasks) == ["a", "c", "d"] and "b" not in reduced.tasks
    remaining = [adapters[t] for t in reduced.tasks]
    for m in MODULES:
        # k is the rank the remaining tasks need, read from their factors alone (b's 4 directions are gone).
        assert reduced.k()[m] == needed_rank(remaining, m) == (8, 8)
        for t in reduced.tasks:
            assert rel(delta(reduced, t, m), before[t][m]) <= TIGHT
            assert rel(delta(reduced, t, m), adapter_delta(adapters[t], m)) <= 1e-5
    assert_orthonormal(reduced)
    # The same span as a subspace built from the remaining adapters from scratch.
    fresh, _ = merge(None, {t: adapters[t] for t in reduced.tasks}, policy)
    for m, basis in reduced.modules.items():
        assert torch.allclose(projector(basis.U_A), projector(fresh.modules[m].U_A), atol=1e-5)
        assert torch.allclose(projector(basis.U_B), projector(fresh.modules[m].U_B), atol=1e-5)

    assert report.removed_tasks == ["b"] and report.new_tasks == []
    assert report.k_before == full.k() and report.k == reduced.k()
    assert set(report.reconstruction_error) == set(report.error_bound) == {"a", "c", "d"}
    assert report.worst_error <= TIGHT and report.within_bound and not report.capped_modules
    assert reduced.metadata["removed_tasks"] == ["b"]
    # The input is untouched; heads and metadata travel with the remaining tasks.
    assert list(full.tasks) == ["a", "b", "c", "d"] and full.k()["layer.0.query"] == (12, 12)
    assert torch.equal(reduced.tasks["a"].head["classifier.weight"], full.tasks["a"].head["classifier.weight"])


def test_removing_several_tasks_then_more_later() -> None:
    adapters = four_tasks()
    full, _ = merge(None, adapters, KPolicy(variance=1.0))
    reduced, _ = remove_tasks(full, ["a", "d"])
    for m in MODULES:
        assert reduced.k()[m] == needed_rank([adapters["b"], adapters["c"]], m) == (8, 8)
        for t in ("b", "c"):
            assert rel(delta(reduced, t, m), delta(full, t, m)) <= TIGHT
    last, _ = remove_tasks(reduced, ["c"])
    assert last.k() == {m: (4, 4) for m in MODULES} and last.metadata["removed_tasks"] == ["a", "d", "c"]
    for m in MODULES:
        assert rel(delta(last, "b", m), adapter_delta(adapters["b"], m)) <= 1e-5
    assert_orthonormal(last)


def test_a_stricter_policy_truncates_further_and_reports_the_errors_it_makes() -> None:
    adapters = four_tasks()
    full, _ = merge(None, adapters, KPolicy(variance=1.0))

    # A fixed k below the rank: the reported error of each remaining task is the measured one.
    reduced, report = remove_tasks(full, ["b"], KPolicy(k=5))
    assert reduced.k() == {m: (5, 5) for m in MODULES}
    for t in reduced.tasks:
        measured = task_error(reduced, full, t)
        assert measured > 0.01 and report.reconstruction_error[t] == pytest.approx(measured, rel=1e-4)
        assert reduced.tasks[t].metadata["reconstruction_error"] == report.reconstruction_error[t]

    # max_error: the fewest directions that keep every remaining task within the bound.
    eps = 0.4
    reduced, report = remove_tasks(full, ["b"], KPolicy(max_error=eps))
    assert sum(sum(k) for k in reduced.k().values()) < 32  # below the exact rank (8 + 8 per module)
    assert report.max_error == eps and report.within_bound and not report.over_bound
    assert set(report.error_bound) == {"a", "c", "d"}
    for t in reduced.tasks:
        assert report.error_bound[t] <= eps
        for m in MODULES:  # the bound holds per module, measured on the matrices
            assert rel(delta(reduced, t, m), delta(full, t, m)) <= report.module_drift[t][m] + 1e-6


def test_bad_removals_are_refused_with_the_fix_and_change_nothing() -> None:
    full, _ = merge(None, four_tasks(), KPolicy(variance=1.0))
    with pytest.raises(ShareClError, match="nothing to remove"):
        remove_tasks(full, [])
    with pytest.raises(ShareClError, match=r"unknown task\(s\) 'zzz'.*holds: a, b, c, d"):
        remove_tasks(full, ["a", "zzz"])
    with pytest.raises(ShareClError, match="every task.*keep at least one"):
        remove_tasks(full, ["a", "b", "c", "d"])
    with pytest.raises(ShareClError, match="more than once"):
        remove_tasks(full, ["a", "a"])
    with pytest.raises(ShareClError, match=r"pass \['a'\]"):
        remove_tasks(full, "a")  # type: ignore[arg-type]
    assert list(full.tasks) == ["a", "b", "c", "d"]


def test_folder_removal_drops_the_task_file(tmp_path, capsys) -> None:
    full, _ = merge(None, four_tasks(), KPolicy(variance=1.0))
    full.save(tmp_path / "sub")
    assert main(["remove", str(tmp_path / "sub"), "--task", "b", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "removed 'b'" in out and "layer.0.query: k_A/k_B 12/12 -> 8/8" in out and "  a: " in out
    reduced = Subspace.load(tmp_path / "out")
    assert list(reduced.tasks) == ["a", "c", "d"]
    assert sorted(p.name for p in (tmp_path / "out" / "tasks").iterdir()) == [
        "a.safetensors",
        "c.safetensors",
        "d.safetensors",
    ]
    for m in MODULES:
        assert rel(delta(reduced, "c", m), delta(full, "c", m)) <= TIGHT
    assert list(Subspace.load(tmp_path / "sub").tasks) == ["a", "b", "c", "d"]  # -o: the source stays

    # In place; a store-style call on a folder names --task; an unknown task is one line.
    assert main(["remove", str(tmp_path / "sub"), "--task", "a", "--task", "d"]) == 0
    assert list(Subspace.load(tmp_path / "sub").tasks) == ["b", "c"]
    capsys.readouterr()
    assert main(["remove", str(tmp_path / "sub")]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["remove", str(tmp_path / "sub"), "--task", "zzz"]) == 2
    assert "unknown task(s) 'zzz'" in capsys.readouterr().err


# -- through the coordinator ------------------------------------------------------------------------


@pytest.fixture
def setup(redis_client, namespace):
    return SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)


def merged_state(stream: SubmissionStream, sid: str) -> tuple[SubmissionStatus, str | None]:
    state = stream.status(sid)
    return state.state, state.version


def test_coordinator_removes_in_stream_order_and_older_versions_keep_the_task(setup, redis_client) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    adapters = four_tasks()
    for name in ("a", "b", "c"):
        stream.submit(Submission(name, adapters[name], None, {"base_model": "tiny"}))
    assert coordinator.step(max_batch=16, block_ms=None).version == "v1"
    v1 = store.get("v1")

    # One read holds a submission, the removal, and a submission after it: three versions, in that order.
    before = stream.submit(Submission("d", adapters["d"], "v1"))
    request = RemovalRequest(["b"], reason="customer left")
    rid = stream.submit_removal(request)
    after = stream.submit(Submission("e", lora(9), "v1"))
    assert stream.entry(rid).kind is SubmissionKind.REMOVAL

    first = coordinator.step(max_batch=16, block_ms=None)
    assert first.version == "v2" and first.merged == {before: "d"} and first.deferred == [rid, after]
    second = coordinator.step(max_batch=16, block_ms=None)
    assert second.recovered == 2 and second.version == "v3" and second.parent == "v2"
    assert second.removed == {rid: ["b"]} and second.merged == {} and second.deferred == [after]
    third = coordinator.step(max_batch=16, block_ms=None)
    assert third.version == "v4" and third.merged == {after: "e"}
    assert stream.pending() == [] and merged_state(stream, rid) == (SubmissionStatus.MERGED, "v3")

    v2, v3 = store.get("v2"), store.get("v3")
    assert list(v3.tasks) == ["a", "c", "d"] and list(store.get("head").tasks) == ["a", "c", "d", "e"]
    for t in v3.tasks:
        for m in MODULES:
            assert rel(delta(v3, t, m), delta(v2, t, m)) <= TIGHT
    for m in MODULES:  # b's four directions are gone: the rank a, c, d need
        assert v2.k()[m] == (12, 12) and v3.k()[m] == needed_rank([adapters[t] for t in ("a", "c", "d")], m) == (8, 8)
    assert_orthonormal(v3)

    # The manifest records the removal; the versions before still hold b, unchanged.
    manifest = store.manifest("v3")
    removal = manifest["metadata"][REMOVAL_KEY]
    assert removal["request"] == rid and removal["tasks"] == ["b"] and removal["reason"] == "customer left"
    assert removal["parent"] == "v2" and removal["k_before"]["layer.0.query"] == [12, 12]
    errors = removal["reconstruction_error"]
    assert set(errors) == set(removal["error_bound"]) == {"a", "c", "d"} and max(errors.values()) < TIGHT
    assert manifest["metadata"]["coordinator"]["removed_tasks"] == ["b"] and manifest["submissions"] == [rid]
    assert "b" not in manifest["tasks"] and manifest["subspace_metadata"]["removed_tasks"] == ["b"]
    for old in ("v1", "v2"):
        held = store.get(old)
        assert "b" in held.tasks
        for m in MODULES:
            assert rel(delta(held, "b", m), delta(v1, "b", m)) <= TIGHT
    # b's payload is not in the new version: not listed, not readable, no key.
    keys = Keys(store.namespace)
    with pytest.raises(TaskNotFoundError, match="no task 'b'"):
        store.get("v3", tasks=["b"])
    # v2 is a delta version: it names b's payload where b was written (v1 or v2), which stays.
    assert (
        redis_client.exists(keys.task("v3", "b")) == 0
        and redis_client.exists(store.manifest("v2")["tasks"]["b"]["key"]) == 1
    )
    assert coordinator.counters["removals"] == 1


def test_update_trained_before_the_removal_merges_in_its_own_basis(setup) -> None:
    """A worker that started from v1 (which held b) submits after b was removed: its update is rebuilt in
    v1's bases and merged into the reduced head exactly."""
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    adapters = four_tasks()
    for name in ("a", "b"):
        stream.submit(Submission(name, adapters[name], None))
    coordinator.step(max_batch=16, block_ms=None)
    v1 = store.get("v1")
    stream.submit_removal(RemovalRequest(["a"]))
    assert coordinator.step(block_ms=None).version == "v2"

    g = torch.Generator().manual_seed(7)
    parts = {
        m: {
            "E_A": torch.randn(b.k_A, 3, generator=g),
            "E_B": torch.randn(b.k_B, 3, generator=g),
            "V_A": torch.randn(b.in_features, 1, generator=g),
            "F_A": torch.randn(1, 3, generator=g),
            "V_B": torch.randn(b.out_features, 1, generator=g),
            "F_B": torch.randn(1, 3, generator=g),
        }
        for m, b in v1.modules.items()
    }
    update = TaskUpdate(parts=parts)
    stream.submit(Submission("late", None, "v1", update=update))
    assert coordinator.step(block_ms=None).version == "v3"
    head = store.get("v3")
    assert list(head.tasks) == ["b", "late"]
    for m, b in v1.modules.items():
        p = {k: v.double() for k, v in parts[m].items()}
        B, A_T = b.U_B.double() @ p["E_B"] + p["V_B"] @ p["F_B"], b.U_A.double() @ p["E_A"] + p["V_A"] @ p["F_A"]
        expected = B @ A_T.T
        assert rel(delta(head, "late", m), expected) <= 1e-5
        assert rel(delta(head, "b", m), adapter_delta(adapters["b"], m)) <= 1e-5


def test_impossible_removals_are_rejected_with_the_reason(setup) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    early = stream.submit_removal(RemovalRequest(["a"]))  # nothing published yet
    assert "holds no version yet" in coordinator.step(block_ms=None).rejected[early]
    for name in ("a", "b"):
        stream.submit(Submission(name, lora(ord(name)), None))
    coordinator.step(max_batch=16, block_ms=None)
    unknown = stream.submit_removal(RemovalRequest(["zzz"]))
    every = stream.submit_removal(RemovalRequest(["a", "b"]))
    result = coordinator.step(block_ms=None)
    assert "unknown task(s) 'zzz'" in result.rejected[unknown] and result.deferred == [every]
    result = coordinator.step(block_ms=None)
    assert "keep at least one" in result.rejected[every]
    assert store.head() == "v1" and stream.pending() == []
    assert stream.status(unknown).state is SubmissionStatus.REJECTED

    # Form errors are refused at submit, before anything enters the stream.
    for tasks in ([], ["a", "a"], ["bad name"]):
        with pytest.raises(ShareClError):
            stream.submit_removal(RemovalRequest(tasks))


def test_a_removal_whose_ack_was_lost_is_acknowledged_not_redone(setup) -> None:
    store, stream = setup
    for name in ("a", "b", "c"):
        stream.submit(Submission(name, lora(ord(name)), None))
    Coordinator(store, stream, KPolicy(variance=1.0)).step(max_batch=16, block_ms=None)
    rid = stream.submit_removal(RemovalRequest(["b"]))
    assert Coordinator(store, stream, KPolicy(variance=1.0)).step(block_ms=None).version == "v2"
    # Put the request back into the pending list on the real server, as a lost acknowledgement leaves it: the
    # stream acknowledges it when it is handed out again (it is recorded as carried out by v2).
    store.client.xclaim(Keys(store.namespace).stream, stream.group, "coordinator", 0, [rid], force=True)
    result = Coordinator(store, stream, KPolicy(variance=1.0)).step(block_ms=None)
    assert result.recovered == 0 and not result.acknowledged and not result.rejected
    assert result.version is None and store.head() == "v2" and stream.pending() == []


def test_a_removal_another_consumer_carried_out_meanwhile_is_acknowledged_not_redone(setup) -> None:
    store, stream = setup
    for name in ("a", "b", "c"):
        stream.submit(Submission(name, lora(ord(name)), None))
    Coordinator(store, stream, KPolicy(variance=1.0)).step(max_batch=16, block_ms=None)
    rid = stream.submit_removal(RemovalRequest(["b"]))
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    fire = coordinator.crash.fire

    def after_read(point: str) -> None:
        """Delivered to this coordinator, not handled yet: another consumer carries the request out (v2)."""
        if point == "after_read":
            reduced, _ = remove_tasks(store.get("v1"), ["b"], KPolicy(variance=1.0))
            request = RemovalRequest(["b"], id=rid)
            assert stream.publish_with_ack(store, reduced, "v1", [request], {REMOVAL_KEY: {"request": rid}}) == "v2"
        fire(point)

    coordinator.crash.fire = after_read  # type: ignore[method-assign]
    result = coordinator.step(block_ms=None)
    assert result.acknowledged == [rid] and result.version is None and not result.rejected
    assert store.head() == "v2" and stream.pending() == [] and len(store.list_versions()) == 2


class _RacingPublisher(MergeTracker):
    """Publishes a merge of its own exactly between the coordinator's removal and its publish (``start``
    is called there): the removal must be redone on the new head, keeping what the other one added."""

    def __init__(self, store: SubspaceStore) -> None:
        self.store, self.fired = store, False

    def start(self, parent, new_tasks):
        if not self.fired:
            self.fired = True
            other, _ = merge(self.store.get(parent), {"racer": lora(42)}, KPolicy(variance=1.0))
            self.store.publish(other, parent)
        return None

    def load_matrix(self) -> AccuracyMatrix:
        return AccuracyMatrix()

    def open_runs(self) -> list[str]:
        return []


def test_removal_under_a_head_conflict_is_redone_on_the_new_head(setup) -> None:
    store, stream = setup
    for name in ("a", "b"):
        stream.submit(Submission(name, lora(ord(name)), None))
    Coordinator(store, stream, KPolicy(variance=1.0)).step(max_batch=16, block_ms=None)
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0), tracking=_RacingPublisher(store))
    rid = stream.submit_removal(RemovalRequest(["a"]))
    result = coordinator.step(block_ms=None)
    assert result.head_conflicts == 1 and result.version == "v3" and result.parent == "v2"
    assert list(store.get("v3").tasks) == ["b", "racer"] and list(store.get("v2").tasks) == ["a", "b", "racer"]
    assert store.manifest("v3")["metadata"][REMOVAL_KEY]["parent"] == "v2"
    assert merged_state(stream, rid) == (SubmissionStatus.MERGED, "v3")


# -- sharecl remove against a store -----------------------------------------------------------------


def test_cli_requests_the_removal_and_says_older_versions_keep_it(setup, redis_server, capsys) -> None:
    store, stream = setup
    ns = ["--redis-url", redis_server, "--namespace", store.namespace]
    for name in ("a", "b", "c"):
        stream.submit(Submission(name, lora(ord(name)), None))
    Coordinator(store, stream, KPolicy(variance=1.0)).step(max_batch=16, block_ms=None)
    store.tag("v1", "prod")

    assert main(["remove", "b", *ns, "--reason", "retired"]) == 0
    out = capsys.readouterr().out
    (entry,) = [row for row in stream.summary().newest if row.kind is SubmissionKind.REMOVAL]
    assert f"request {entry.id}, head v1" in out and "--wait" in out
    assert "keep 'b' until retention prunes them: v1" in out and "v1 (prod)" in out and "sharecl prune" in out
    result = Coordinator(store, stream, KPolicy(variance=1.0)).step(block_ms=None)
    assert result.removed == {entry.id: ["b"]} and list(store.get().tasks) == ["a", "c"]
    assert store.manifest()["metadata"][REMOVAL_KEY]["reason"] == "retired"

    # Refused before anything is requested: a task the head lacks (now b), every task, an empty namespace.
    assert main(["remove", "b", *ns]) == 2
    assert "holds no task 'b' (it holds: a, c)" in capsys.readouterr().err
    assert main(["remove", "a", "c", *ns]) == 2
    assert "keep at least one" in capsys.readouterr().err
    assert main(["remove", "a", "--redis-url", redis_server, "--namespace", store.namespace + "-empty"]) == 2
    assert "holds no version" in capsys.readouterr().err
    assert stream.summary().total == 4  # three submissions and the one request


@pytest.mark.slow
def test_cli_wait_publishes_through_the_coordinator_actor(setup, redis_server, tmp_path, capsys) -> None:
    """``sharecl remove --wait`` through the real detached actor on a local Ray, with MLflow."""
    from mlflow import MlflowClient

    store, stream = setup
    for name in ("a", "b", "c"):
        stream.submit(Submission(name, lora(ord(name)), None))
    Coordinator(store, stream, KPolicy(variance=1.0)).step(max_batch=16, block_ms=None)
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["remove", "c", "--redis-url", redis_server, "--namespace", store.namespace, "--mlflow-uri", mlflow_uri]
    assert main([*argv, "--wait", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "published v2 without 'c' (parent v1, 2 task(s) left)" in out
    assert "layer.0.query: k_A/k_B 12/12 -> 8/8" in out and "  a: " in out and "  b: " in out
    assert "older versions still hold 'c' until retention prunes them: v1" in out
    assert list(store.get().tasks) == ["a", "b"]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(store.namespace).experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags["sharecl.version"] == "v2"
