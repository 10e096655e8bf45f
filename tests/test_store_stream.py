"""The submission stream: submit, read, acknowledge in the publish, reject, recover after a consumer dies."""

from __future__ import annotations

import pytest
import torch

from share import TaskUpdate, merge
from subspace_store import (
    HeadConflictError,
    Submission,
    SubmissionError,
    SubmissionKind,
    SubmissionState,
    SubmissionStatus,
    SubmissionStream,
    SubspaceStore,
)

QUEUED, PENDING, UNKNOWN = (SubmissionState(s) for s in ("queued", "pending", "unknown"))


def merged_into(version: str) -> SubmissionState:
    return SubmissionState(SubmissionStatus.MERGED, version=version)


def _setup(client, namespace, make_adapter):
    store = SubspaceStore(client, namespace)
    base, _ = merge(None, {"a": make_adapter(0)})
    return store, SubmissionStream(client, namespace), base, store.publish(base, None)


def test_submit_read_round_trip_and_ack_in_publish(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    adapter = make_adapter(1, head={"classifier.weight": (3, 16), "classifier.bias": (3,)})
    sid = stream.submit(Submission("b", adapter, v1, {"job_id": "j1", "mlflow_run_id": "r9"}))
    assert stream.status(sid) == QUEUED

    (got,) = stream.read("coord", count=10)
    assert got.id == sid and got.task == "b" and got.base_version == v1 and got.deliveries == 1
    assert got.metadata == {"job_id": "j1", "mlflow_run_id": "r9"} and got.adapter.metadata == {"seed": 1}
    assert got.adapter.scaling == adapter.scaling
    for m, (B, A) in adapter.factors.items():
        assert torch.equal(got.adapter.factors[m][0], B) and torch.equal(got.adapter.factors[m][1], A)
    assert all(torch.equal(got.adapter.head[k], v) for k, v in adapter.head.items())
    assert stream.status(sid) == PENDING and stream.read("coord") == []

    merged, _ = merge(base, {"b": got.adapter})
    v2 = stream.publish_with_ack(store, merged, v1, [got], {"mlflow_run_id": "merge-1"})
    assert store.manifest(v2)["submissions"] == [sid]
    assert stream.status(sid) == merged_into(v2) and stream.pending() == []
    # Exactly once: it can be neither merged again nor rejected afterwards.
    with pytest.raises(SubmissionError, match=f"already merged into {v2}"):
        stream.publish_with_ack(store, merged, v2, [sid])
    with pytest.raises(SubmissionError, match="already merged"):
        stream.reject(sid, "too late")
    assert store.head() == v2


def test_failed_publish_leaves_submissions_pending(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    sid = stream.submit(Submission("b", make_adapter(1), v1))
    (got,) = stream.read("coord")
    other, _ = merge(base, {"x": make_adapter(2)})
    v2 = store.publish(other, v1)  # someone else moves the head
    merged, _ = merge(base, {"b": got.adapter})
    with pytest.raises(HeadConflictError):
        stream.publish_with_ack(store, merged, v1, [got])
    assert stream.status(sid) == PENDING and [p.id for p in stream.pending()] == [sid]
    rebased, _ = merge(store.get(v2), {"b": got.adapter})
    v3 = stream.publish_with_ack(store, rebased, v2, [got])
    assert stream.status(sid) == merged_into(v3)


def test_reject_keeps_the_reason_and_blocks_merging(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    sid = stream.submit(Submission("b", make_adapter(1), v1))
    stream.read("coord")
    stream.reject(sid, "update norm 1e9 exceeds the limit")
    stream.reject(sid, "again")  # no-op
    assert stream.status(sid) == SubmissionState(SubmissionStatus.REJECTED, reason="update norm 1e9 exceeds the limit")
    assert str(stream.status(sid)) == "rejected: update norm 1e9 exceeds the limit"
    (record,) = stream.rejections().values()
    assert record["task"] == "b" and record["base_version"] == v1 and record["reason"].startswith("update norm")
    assert stream.pending() == []
    merged, _ = merge(base, {"b": make_adapter(1)})
    with pytest.raises(SubmissionError, match="was rejected"):
        stream.publish_with_ack(store, merged, v1, [sid])
    with pytest.raises(SubmissionError, match="not pending"):
        unread = stream.submit(Submission("c", make_adapter(2), v1))
        stream.publish_with_ack(store, merged, v1, [unread])
    assert store.head() == v1


def test_recover_after_a_consumer_dies(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    ids = [stream.submit(Submission(f"t{i}", make_adapter(i + 1), v1)) for i in range(3)]
    assert [s.id for s in stream.read("coord-1", count=2)] == ids[:2]  # coord-1 then dies holding two

    # The same coordinator, restarted, gets back its own unacknowledged submissions.
    restarted = SubmissionStream(redis_client, namespace)
    assert [s.id for s in restarted.recover("coord-1", min_idle_ms=10**9)] == ids[:2]
    # A replacement with another name claims the dead one's stale submissions (XAUTOCLAIM).
    replacement = SubmissionStream(redis_client, namespace)
    claimed = replacement.recover("coord-2", min_idle_ms=0)
    assert [s.id for s in claimed] == ids[:2] and all(s.deliveries >= 2 for s in claimed)
    assert {p.consumer for p in replacement.pending()} == {"coord-2"}
    (third,) = replacement.read("coord-2")
    subs = [*claimed, third]
    merged, _ = merge(base, {s.task: s.adapter for s in subs})
    v2 = replacement.publish_with_ack(store, merged, v1, subs)
    assert all(replacement.status(i) == merged_into(v2) for i in ids)
    # The old coordinator, if it comes back with a stale result, cannot merge them a second time.
    with pytest.raises(SubmissionError, match="already merged"):
        stream.publish_with_ack(store, merged, v2, ids[:1])


def test_unreadable_and_oversized_submissions(redis_client, namespace, make_adapter) -> None:
    store, stream, _, v1 = _setup(redis_client, namespace, make_adapter)
    sid = stream.submit(Submission("b", make_adapter(1), v1))
    entry = redis_client.xrange(store.keys.stream, min=sid, max=sid)[0][1]
    key = entry[b"payload_key"]
    data = bytearray(redis_client.get(key))
    data[-20] ^= 0xFF
    redis_client.set(key, bytes(data))
    assert stream.read("coord") == []  # rejected on read, with the reason
    assert "checksum" in stream.status(sid).reason and stream.status(sid).state is SubmissionStatus.REJECTED

    small = SubmissionStream(redis_client, namespace, max_bytes=1024)
    with pytest.raises(ValueError, match="over the"):
        small.submit(Submission("c", make_adapter(2), v1))
    with pytest.raises(ValueError, match="invalid task name"):
        stream.submit(Submission("bad name", make_adapter(2), v1))
    assert stream.status("0-1") == UNKNOWN


def test_compact_update_submission_rebuilds_in_its_base(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    gen = torch.Generator().manual_seed(3)
    p, phi = 4, 2
    parts = {
        m: {
            "E_A": torch.randn(b.k_A, p, generator=gen),
            "E_B": torch.randn(b.k_B, p, generator=gen),
            "V_A": torch.randn(b.in_features, phi, generator=gen),
            "F_A": torch.randn(phi, p, generator=gen),
            "V_B": torch.randn(b.out_features, phi, generator=gen),
            "F_B": torch.randn(phi, p, generator=gen),
        }
        for m, b in base.modules.items()
    }
    update = TaskUpdate(parts=parts, head={"classifier.weight": torch.ones(3, 16)}, metadata={"task": "u"})
    with pytest.raises(ValueError, match="base_version"):
        stream.submit(Submission("u", None, None, update=update))
    with pytest.raises(ValueError, match="exactly one"):
        stream.submit(Submission("u", make_adapter(1), v1, update=update))
    sid = stream.submit(Submission("u", None, v1, update=update))
    (got,) = stream.read("coord")
    assert got.id == sid and got.adapter is None and got.update.metadata == {"task": "u"}
    rebuilt, expected = got.to_adapter(store.get(got.base_version)), update.to_adapter(base, "u")
    for m in base.modules:
        assert torch.equal(rebuilt.factors[m][0], expected.factors[m][0])
        assert torch.equal(rebuilt.factors[m][1], expected.factors[m][1])
    assert torch.equal(rebuilt.head["classifier.weight"], torch.ones(3, 16))


def test_summary_latest_and_settled_follow_each_submission(redis_client, namespace, make_adapter) -> None:
    store, stream, base, v1 = _setup(redis_client, namespace, make_adapter)
    assert stream.is_settled() and stream.latest_id() is None and stream.summary().total == 0
    kept = stream.submit(Submission("b", make_adapter(1), v1))
    dropped = stream.submit(Submission("c", make_adapter(2), None, {"note": "x"}))
    assert stream.latest_id() == dropped and not stream.is_settled()
    summary = stream.summary()
    assert (summary.total, summary.merged, summary.rejected, summary.pending, summary.queued) == (2, 0, 0, 0, 2)
    assert [(r.id, r.task, r.base_version, r.kind) for r in summary.newest] == [
        (dropped, "c", None, SubmissionKind.ADAPTER),
        (kept, "b", v1, SubmissionKind.ADAPTER),
    ]
    subs = stream.read("coord", count=10)
    assert not stream.is_settled() and stream.summary().pending == 2
    stream.reject(dropped, "bad data")
    assert not stream.is_settled()  # the newest is settled, but "b" is still being merged
    merged, _ = merge(base, {"b": subs[0].adapter})
    v2 = stream.publish_with_ack(store, merged, v1, subs[:1])
    assert stream.is_settled()
    summary = stream.summary(last=1)
    assert (summary.total, summary.merged, summary.rejected, summary.pending, summary.queued) == (2, 1, 1, 0, 0)
    assert summary.to_dict()["newest"] == [
        {"id": dropped, "task": "c", "base_version": None, "kind": "adapter", "status": "rejected: bad data"}
    ]
    assert str(stream.status(kept)) == f"merged into {v2}" and stream.status(kept).settled


def test_ack_only_acknowledges(redis_client, namespace, make_adapter) -> None:
    _, stream, _, v1 = _setup(redis_client, namespace, make_adapter)
    sid = stream.submit(Submission("b", make_adapter(1), v1))
    stream.read("coord")
    stream.ack(sid)
    assert stream.pending() == [] and stream.rejections() == {}


def test_a_resent_submit_transaction_keeps_the_committed_payload(redis_client, namespace, make_adapter) -> None:
    """redis-py resends a whole MULTI whose reply was lost (a restart, a timeout): the second run of the same
    transaction finds its attempt key taken by the entry it committed itself, and must keep that entry's payload
    (it deleted it: the worker reported "submitted" and the entry was rejected as unreadable)."""
    from subspace_store import stream as stream_module

    stream = SubmissionStream(redis_client, namespace)
    sid = stream.submit(Submission("a", make_adapter(1), None, attempt_key="job1/a"))
    ((_, raw),) = redis_client.xrange(stream.keys.stream, min=sid, max=sid)
    payload_key, data = raw[b"payload_key"], redis_client.get(raw[b"payload_key"])
    fields = [item for pair in raw.items() for item in pair]
    pipe = redis_client.pipeline(transaction=True)  # the resend: the same SET and script again
    pipe.set(payload_key, data)
    pipe.execute_command(
        "EVAL", stream_module._SUBMIT_LUA, 3, payload_key, stream.keys.stream, stream.attempts_key, "job1/a", *fields
    )
    _, (added, again) = pipe.execute()
    assert added == 0 and again.decode() == sid and redis_client.get(payload_key) == data
    (got,) = stream.read("coord")  # decodes: its payload is there
    assert got.id == sid and stream.rejections() == {} and int(redis_client.xlen(stream.keys.stream)) == 1


def test_attempt_key_records_the_entry_and_submits_once(redis_client, namespace, make_adapter) -> None:
    """Issue 10, defect 10: the entry is recorded under its attempt key in the transaction that adds it."""
    stream = SubmissionStream(redis_client, namespace)
    assert stream.submitted("job1/a") is None
    first = Submission("a", make_adapter(1), None, {"mode": "lora"}, attempt_key="job1/a", allow_over_bound=True)
    sid = stream.submit(first)
    entry = stream.submitted("job1/a")
    assert entry is not None and entry.id == sid and entry.task == "a" and entry.metadata == {"mode": "lora"}
    assert entry.allow_over_bound and entry.attempt_key == "job1/a" and entry.kind is SubmissionKind.ADAPTER
    # A retry (or a client resending after a lost reply) gets the first id; nothing is added.
    again = stream.submit(Submission("a", make_adapter(2), None, attempt_key="job1/a"))
    assert again == sid and int(redis_client.xlen(stream.keys.stream)) == 1
    other = stream.submit(Submission("a", make_adapter(3), None, attempt_key="job2/a"))
    assert other != sid and stream.submitted("job2/a").id == other
    (got, nxt) = stream.read("coord", count=10)
    assert got.id == sid and got.allow_over_bound and got.attempt_key == "job1/a"
    assert nxt.id == other and not nxt.allow_over_bound
    with pytest.raises(ValueError, match="attempt_key must be a non-empty string"):
        stream.submit(Submission("b", make_adapter(4), None, attempt_key=" "))
