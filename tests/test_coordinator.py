"""The merge service without Ray, against a real redis-server: batching, validation and rejections,
stale base versions, duplicates, and a concurrent publisher."""

from __future__ import annotations

import json
import math

import pytest
import torch

from coordinator import AccuracyMatrix, Coordinator, MergeTracker
from share import KPolicy, LoraAdapter, Subspace, TaskUpdate, merge
from subspace_store import Submission, SubmissionState, SubmissionStatus, SubmissionStream, SubspaceStore
from subspace_store.keys import Keys
from subspace_store.payloads import encode_tensors, sha256

MODULES = {"layer.0.query": (40, 32), "layer.0.value": (40, 32)}  # name -> (out n, in d)


def merged_into(version: str) -> SubmissionState:
    return SubmissionState(SubmissionStatus.MERGED, version=version)


def lora(seed: int, r: int = 4, shapes: dict[str, tuple[int, int]] = MODULES) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)) for m, (n, d) in shapes.items()}
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in shapes}, head={"classifier.weight": torch.ones(3, 8)})


def update_for(base: Subspace, seed: int, p: int = 4, phi: int = 2) -> TaskUpdate:
    """What a coefficient-mode worker ships: coefficients in ``base``'s bases plus temporary directions."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for m, b in base.modules.items():
        parts[m] = {
            "E_A": torch.randn(b.k_A, p, generator=g),
            "E_B": torch.randn(b.k_B, p, generator=g),
            "V_A": torch.randn(b.in_features, phi, generator=g),
            "F_A": torch.randn(phi, p, generator=g),
            "V_B": torch.randn(b.out_features, phi, generator=g),
            "F_B": torch.randn(phi, p, generator=g),
        }
    return TaskUpdate(parts=parts, head={"classifier.weight": torch.zeros(3, 8)})


def expected_delta(base: Subspace, update: TaskUpdate, module: str) -> torch.Tensor:
    """``dW`` of an update, rebuilt independently of ``TaskUpdate.to_adapter`` (float64)."""
    b, p = base.modules[module], {k: v.double() for k, v in update.parts[module].items()}
    B = b.U_B.double() @ p["E_B"] + p["V_B"] @ p["F_B"]
    A_T = b.U_A.double() @ p["E_A"] + p["V_A"] @ p["F_A"]
    return B @ A_T.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.fixture
def setup(redis_client, namespace):
    store = SubspaceStore(redis_client, namespace)
    stream = SubmissionStream(redis_client, namespace)
    return store, stream


def test_batched_merge_one_version_per_batch_all_acknowledged(setup) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    assert coordinator.step(block_ms=None).read == 0  # empty stream: an idle step

    ids = [stream.submit(Submission(f"t{i}", lora(i), None, {"base_model": "tiny"})) for i in range(3)]
    result = coordinator.step(max_batch=16, block_ms=None)
    assert result.version == "v1" and result.parent is None
    assert result.merged == {sid: f"t{i}" for i, sid in enumerate(ids)} and not result.rejected
    assert set(result.latency_s) == set(ids) and all(v >= 0 for v in result.latency_s.values())
    manifest = store.manifest("v1")
    assert manifest["submissions"] == ids and list(manifest["tasks"]) == ["t0", "t1", "t2"]
    assert manifest["subspace_metadata"]["base_model"] == "tiny"
    assert manifest["metadata"]["coordinator"]["batch_size"] == 3
    assert all(stream.status(s) == merged_into("v1") for s in ids) and stream.pending() == []
    # Provenance: each task records the submission it came from.
    assert store.get("v1").tasks["t1"].metadata["submission"]["id"] == ids[1]

    # One merge per submission when the batch size is 1.
    more = [stream.submit(Submission(f"u{i}", lora(10 + i), "v1")) for i in range(2)]
    assert coordinator.step(max_batch=1, block_ms=None).version == "v2"
    assert coordinator.step(max_batch=1, block_ms=None).version == "v3"
    assert [stream.status(s) for s in more] == [merged_into("v2"), merged_into("v3")]
    assert list(store.get().tasks) == ["t0", "t1", "t2", "u0", "u1"]
    # Large k keeps every task exactly (reported error is the truncation error: ~0 here).
    assert max(e["reconstruction_error"] for e in store.manifest()["tasks"].values()) < 1e-5
    assert coordinator.step(block_ms=None).version is None and store.head() == "v3"


def test_bad_submissions_rejected_with_reason_head_unchanged(setup) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=6))
    stream.submit(Submission("good", lora(0), None, {"base_model": "tiny"}))
    assert coordinator.step(block_ms=None).version == "v1"
    head = store.get("v1")

    nan_update = update_for(head, 1)
    nan_update.parts["layer.0.query"]["E_B"][0, 0] = math.nan
    other_shapes = {m: (n + 3, d) for m, (n, d) in MODULES.items()}
    bad = {
        "nan": stream.submit(Submission("nan", None, "v1", update=nan_update)),
        "shape": stream.submit(Submission("shape", lora(2, shapes=other_shapes), "v1")),
        "modules": stream.submit(Submission("modules", lora(3, shapes={"layer.0.key": (40, 32)}), "v1")),
        "unknown_base": stream.submit(Submission("unknown_base", None, "v99", update=update_for(head, 4))),
        "base_model": stream.submit(Submission("base_model", lora(5), "v1", {"base_model": "huge"})),
        "duplicate": stream.submit(Submission("good", lora(6), "v1")),
    }
    result = coordinator.step(max_batch=16, block_ms=None)
    assert result.version is None and result.merged == {} and set(result.rejected) == set(bad.values())
    assert store.head() == "v1" and [v.version for v in store.list_versions()] == ["v1"]
    rejections = stream.rejections()
    reasons = {name: rejections[sid]["reason"] for name, sid in bad.items()}
    assert "NaN" in reasons["nan"] and "E_B" in reasons["nan"]
    assert "(43, 32)" in reasons["shape"] and "(40, 32)" in reasons["shape"]
    assert "layer.0.key" in reasons["modules"] and "target_modules" in reasons["modules"]
    assert "'v99' does not exist" in reasons["unknown_base"]
    assert "'huge'" in reasons["base_model"] and "'tiny'" in reasons["base_model"]
    assert "already in v1" in reasons["duplicate"] and "new task name" in reasons["duplicate"]
    assert all(stream.status(sid).state is SubmissionStatus.REJECTED for sid in bad.values()) and stream.pending() == []

    # The loop goes on: the next good submission is merged on top of the unchanged head.
    sid = stream.submit(Submission("next", lora(8), "v1"))
    assert coordinator.step(block_ms=None).merged == {sid: "next"} and store.head() == "v2"


def test_update_with_the_wrong_base_version_is_rejected(setup) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=6))
    stream.submit(Submission("a", lora(0), None))
    coordinator.step(block_ms=None)
    stream.submit(Submission("b", lora(1), "v1"))
    coordinator.step(block_ms=None)
    # Trained on v1 (k=4: one rank-4 task) but claiming v2 (k=6) as its base.
    mislabeled = update_for(store.get("v1"), 2)
    sid = stream.submit(Submission("c", None, "v2", update=mislabeled))
    result = coordinator.step(block_ms=None)
    assert result.version is None and store.head() == "v2"
    assert "k=(4, 4)" in result.rejected[sid] and "k=(6, 6)" in result.rejected[sid]


@pytest.mark.parametrize("k", [None, 3])
def test_stale_base_update_merged_in_its_own_basis(setup, k) -> None:
    """An update trained on v1 arrives when the head is v3: rebuilt in v1's bases, its only error is the
    truncation of the new merge (~0 when k keeps everything)."""
    store, stream = setup
    policy = KPolicy(variance=1.0) if k is None else KPolicy(k=k)
    coordinator = Coordinator(store, stream, policy)
    stream.submit(Submission("a", lora(0), None))
    coordinator.step(block_ms=None)
    v1 = store.get("v1")
    upd = update_for(v1, 11)
    for i in range(2):  # the head moves on: the bases rotate and grow
        stream.submit(Submission(f"b{i}", lora(20 + i), store.head()))
        coordinator.step(block_ms=None)
    assert store.head() == "v3"
    v3 = store.get("v3", tasks=[])
    for m in MODULES:  # its base is stale: the head's bases span other directions
        P1, P3 = (s.modules[m].U_B @ s.modules[m].U_B.T for s in (v1, v3))
        assert float(torch.linalg.norm(P3 - P1)) > 0.5
    sid = stream.submit(Submission("late", None, "v1", update=upd))
    result = coordinator.step(block_ms=None)
    assert result.version == "v4" and result.merged == {sid: "late"}

    merged = store.get("v4")
    error = store.manifest("v4")["tasks"]["late"]["reconstruction_error"]
    for m in MODULES:
        truth = expected_delta(v1, upd, m)
        if k is None:
            assert rel(merged.delta_weight("late", m), truth) < 1e-5
    if k is None:
        assert error < 1e-5
    else:
        # The reported error equals the explicit truncation error over all modules.
        diff = sum(
            float((merged.delta_weight("late", m).double() - expected_delta(v1, upd, m)).square().sum())
            for m in MODULES
        )
        norm = sum(float(expected_delta(v1, upd, m).square().sum()) for m in MODULES)
        assert error > 0.05 and error == pytest.approx(math.sqrt(diff / norm), rel=1e-3)


def test_same_task_twice_in_a_batch_and_lost_ack(setup) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=4))
    first = stream.submit(Submission("a", lora(0), None))
    second = stream.submit(Submission("a", lora(1), None))
    result = coordinator.step(max_batch=8, block_ms=None)
    assert result.merged == {first: "a"} and "submitted twice" in result.rejected[second]

    # A merged and a rejected submission whose acknowledgements were lost (simulated on the real server: the
    # entries are put back into the pending list) are acknowledged by the stream when handed out again, never
    # merged or rejected twice, and nothing stays pending.
    raw = store.client  # the raw server, as a lost ack leaves it
    raw.xclaim(Keys(store.namespace).stream, stream.group, "coordinator", 0, [first, second], force=True)
    assert [p.id for p in stream.pending()] == [first, second]
    reason = stream.status(second).reason
    again = Coordinator(store, stream, KPolicy(k=4))  # a new incarnation recovers them
    result = again.step(block_ms=None)
    assert result.recovered == 0 and result.version is None and not result.rejected and not result.merged
    assert stream.pending() == [] and store.head() == "v1" and stream.status(first) == merged_into("v1")
    assert stream.status(second).reason == reason


class _RacingPublisher(MergeTracker):
    """Publishes a version of its own at the moment the coordinator has merged but not yet published
    (``start`` is called exactly there): a concurrent publisher, deterministically. No MLflow run."""

    def __init__(self, store: SubspaceStore, task: str) -> None:
        self.store, self.task, self.fired = store, task, False

    def start(self, parent, new_tasks):
        if not self.fired:
            self.fired = True
            other, _ = merge(self.store.get(parent), {self.task: lora(5)}, KPolicy(k=4))
            self.store.publish(other, parent)
        return None

    def load_matrix(self) -> AccuracyMatrix:
        return AccuracyMatrix()

    def open_runs(self) -> list[str]:
        return []


def test_head_conflict_merges_again_on_the_new_head(setup) -> None:
    store, stream = setup
    stream.submit(Submission("a", lora(0), None))
    Coordinator(store, stream, KPolicy(k=4)).step(block_ms=None)
    coordinator = Coordinator(store, stream, KPolicy(k=4), tracking=_RacingPublisher(store, "offline"))
    sid = stream.submit(Submission("b", lora(1), "v1"))
    result = coordinator.step(block_ms=None)
    assert result.head_conflicts == 1 and result.version == "v3" and result.parent == "v2"
    assert result.merged == {sid: "b"} and list(store.get().tasks) == ["a", "offline", "b"]
    assert stream.status(sid) == merged_into("v3")

    # A task the other publisher already added is rejected, not merged twice.
    racer = _RacingPublisher(store, "c")
    coordinator.tracking = racer
    dup = stream.submit(Submission("c", lora(2), "v3"))
    result = coordinator.step(block_ms=None)
    assert result.head_conflicts == 1 and result.version is None and "already in v4" in result.rejected[dup]


def test_malformed_entry_is_rejected_not_blocking_the_stream(setup) -> None:
    """An entry whose payload lacks a tensor its fields name (not written by ``submit``) is rejected on
    read; it must not fail every read and block the submissions behind it."""
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=4))
    stream.ensure_group()
    data = encode_tensors({"B:layer.0.query": torch.ones(40, 2)})  # no "A:layer.0.query"
    raw, keys = store.client, Keys(store.namespace)  # written by hand, as no submit() would
    raw.set(keys.submission_payload("broken"), data)
    fields = {
        "task": "broken",
        "base_version": "",
        "payload_key": keys.submission_payload("broken"),
        "sha256": sha256(data),
        "bytes": str(len(data)),
        "kind": "adapter",
        "scaling": json.dumps({"layer.0.query": 1.0}),
        "adapter_metadata": "{}",
        "metadata": "{}",
    }
    bad = raw.xadd(keys.stream, fields).decode()
    good = stream.submit(Submission("good", lora(0), None))
    result = coordinator.step(max_batch=8, block_ms=None)
    assert result.merged == {good: "good"} and result.version == "v1"
    assert stream.status(bad).reason.startswith("unreadable submission") and stream.pending() == []
