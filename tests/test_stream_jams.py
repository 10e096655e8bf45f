"""One malformed submission never jams the stream, and a consumer group Redis lost is created again.

Each malformed submission (metadata that is no JSON object, a ``scaling`` that is no map, a field that is no
UTF-8, a 0-d coefficient) is rejected with a reason naming the problem, and the good submission behind it is
merged: nothing stays pending, so no later step hands the bad one out again. Real redis-server, a real
``Coordinator`` (no Ray).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import torch

from coordinator import Coordinator
from coordinator.validation import BaseCache, check_batch
from share import KPolicy, LoraAdapter, TaskUpdate
from subspace_store import (
    StoreError,
    Submission,
    SubmissionState,
    SubmissionStatus,
    SubmissionStream,
    SubspaceStore,
)
from subspace_store.embedded import RedisServer
from subspace_store.keys import Keys
from subspace_store.stream import RemovalRequest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = {"layer.0.query": (24, 16)}  # name -> (out n, in d)


def lora(seed: int, metadata: Any = None) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, 2, generator=g), torch.randn(2, d, generator=g)) for m, (n, d) in MODULES.items()}
    return LoraAdapter(factors=factors, head={"classifier.weight": torch.ones(3, 8)}, metadata=metadata or {})


def write_entry(stream: SubmissionStream, sub: Submission, **fields: str | bytes | None) -> str:
    """``sub`` written straight into ``stream`` (as no ``submit`` would): the entry ``submit`` writes, with
    ``fields`` replaced (None: left out), and a payload of its own. Returns the entry id."""
    scratch = SubmissionStream(stream.client, f"{stream.namespace}-scratch-{uuid.uuid4().hex[:6]}")
    sid = scratch.submit(sub)
    ((_, raw),) = stream.client.xrange(scratch.keys.stream, min=sid, max=sid)
    entry: dict[str, str | bytes] = {k.decode(): v for k, v in raw.items()}
    payload_key = Keys(stream.namespace).submission_payload(uuid.uuid4().hex)
    stream.client.set(payload_key, stream.client.get(entry["payload_key"]))
    entry["payload_key"] = payload_key
    for name, value in fields.items():
        if value is None:
            del entry[name]
        else:
            entry[name] = value
    stream.ensure_group()
    return stream.client.xadd(stream.keys.stream, entry).decode()


def merged_into(version: str) -> SubmissionState:
    return SubmissionState(SubmissionStatus.MERGED, version=version)


@pytest.fixture
def setup(redis_client: redis.Redis, namespace: str) -> tuple[SubspaceStore, SubmissionStream, Coordinator]:
    store = SubspaceStore(redis_client, namespace)
    stream = SubmissionStream(redis_client, namespace)
    return store, stream, Coordinator(store, stream, KPolicy(k=4))


def assert_only_good_merged(stream: SubmissionStream, coordinator: Coordinator, bad: str, good: str, into: str) -> str:
    """Steps until idle: ``good`` is merged into ``into``, ``bad`` rejected, nothing pending. Returns bad's reason."""
    versions = []
    for _ in range(3):
        versions.append(coordinator.step(max_batch=8, block_ms=None).version)
    assert versions == [into, None, None]
    assert stream.status(good) == merged_into(into)
    state = stream.status(bad)
    assert state.state is SubmissionStatus.REJECTED and stream.pending() == []
    assert stream.recover(coordinator.consumer, min_idle_ms=0) == []
    return state.reason or ""


# -- 1. what submit() refuses -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metadata", "adapter_metadata", "what"),
    [
        (["x"], {}, "metadata"),
        ({1: "x"}, {}, "metadata"),  # json.dumps would write the key as "1"
        ({}, "note", "adapter metadata"),
        ({}, ["note"], "adapter metadata"),
    ],
)
def test_submit_refuses_metadata_that_is_not_a_json_object(setup, metadata, adapter_metadata, what) -> None:
    _, stream, _ = setup
    with pytest.raises(StoreError, match=f"submission 'a': {what} must be a JSON object"):
        stream.submit(Submission("a", lora(0, adapter_metadata), None, metadata))
    with pytest.raises(StoreError, match="metadata must be a JSON object"):
        stream.submit_removal(RemovalRequest(["a"], metadata=["x"]))  # type: ignore[arg-type]
    assert stream.latest_id() is None  # nothing was written


# -- 2. entries written straight into the stream --------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"metadata": '["x"]'}, "metadata is '[\"x\"]', expected a JSON object"),
        ({"adapter_metadata": '"note"'}, "adapter_metadata is '\"note\"', expected a JSON object"),
        ({"scaling": "5"}, "TypeError"),
        ({"scaling": "[[1]]"}, "TypeError"),
        ({"task": b"\xff"}, "not UTF-8"),
        ({"payload_key": None}, "payload '' is missing"),
    ],
    ids=["metadata-list", "adapter-metadata-string", "scaling-int", "scaling-nested-list", "not-utf8", "no-payload"],
)
def test_a_malformed_entry_is_rejected_and_the_next_submission_merges(
    setup, fields: dict[str, str | bytes | None], named: str
) -> None:
    _, stream, coordinator = setup
    bad = write_entry(stream, Submission("bad", lora(0), None), **fields)
    good = stream.submit(Submission("good", lora(1), None))
    reason = assert_only_good_merged(stream, coordinator, bad, good, "v1")
    assert reason.startswith("unreadable ") and named in reason and "resubmit" in reason


def test_the_summary_shows_malformed_entries(setup) -> None:
    # ``sharecl status`` reads the summary: entries no ``submit`` wrote must not break it, before or after the
    # coordinator rejected them.
    _, stream, coordinator = setup
    odd = [
        write_entry(stream, Submission("bad", lora(0), None), task=b"\xff"),
        write_entry(stream, Submission("bad", lora(0), None), task=None),
        write_entry(stream, Submission("bad", lora(0), None), kind="nonsense"),
    ]
    rows = {row.id: row for row in stream.summary().newest}
    assert set(odd) <= set(rows) and rows[odd[1]].task == "?" and rows[odd[0]].task == "\ufffd"
    coordinator.step(max_batch=8, block_ms=None)
    summary = stream.summary()
    assert summary.rejected == 3 and {row.status.state for row in summary.newest} == {SubmissionStatus.REJECTED}


def test_an_update_with_a_0d_coefficient_is_rejected_and_the_next_submission_merges(setup) -> None:
    store, stream, coordinator = setup
    stream.submit(Submission("first", lora(0), None))
    assert coordinator.step(block_ms=None).version == "v1"
    head = store.get("v1")
    parts = {}
    for m, b in head.modules.items():
        parts[m] = {
            "E_A": torch.tensor(1.0),  # 0-d: submit() and the stream take it, the rebuild cannot
            "E_B": torch.ones(b.k_B, 2),
            "V_A": torch.ones(b.in_features, 1),
            "F_A": torch.ones(1, 2),
            "V_B": torch.ones(b.out_features, 1),
            "F_B": torch.ones(1, 2),
        }
    bad = stream.submit(Submission("bad", None, "v1", update=TaskUpdate(parts=parts)))
    good = stream.submit(Submission("good", lora(1), "v1"))
    reason = assert_only_good_merged(stream, coordinator, bad, good, "v2")
    assert reason.startswith("task 'bad': checking it failed (IndexError: ") and "submit it again" in reason
    assert list(store.get("v2").tasks) == ["first", "good"]


def test_check_batch_rejects_whatever_one_submission_raises(setup) -> None:
    """What no decoding lets through any more, in memory: each is rejected with the exception, never raised."""
    store, _, _ = setup
    subs = [
        Submission("listed", lora(0), None, ["x"], id="1-1"),  # type: ignore[arg-type]  # .get: AttributeError
        Submission("noted", lora(1, "note"), None, id="1-2"),  # dict("note"): ValueError
        Submission("good", lora(2), None, id="1-3"),
    ]
    verdicts = check_batch(subs, None, None, BaseCache(store))
    assert [a.submission.id for a in verdicts.accepted] == ["1-3"] and not verdicts.already_merged
    assert verdicts.rejected["1-1"].startswith("task 'listed': checking it failed (AttributeError: ")
    assert verdicts.rejected["1-2"].startswith("task 'noted': checking it failed (ValueError: ")


def test_check_batch_gives_no_verdict_while_redis_is_unreachable(namespace: str) -> None:
    """A base version that cannot be loaded because Redis is unreachable says nothing about the submission: the
    error propagates (the step fails and is retried with the submission still pending), nothing is rejected."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    sub = Submission("a", lora(0), "v1", id="1-1")
    with pytest.raises(redis.ConnectionError):
        check_batch([sub], None, None, BaseCache(SubspaceStore(dead, namespace)))


# -- 3. a consumer group Redis lost -----------------------------------------------------------------------
def test_a_destroyed_group_is_created_again_and_the_coordinator_goes_on(setup, caplog) -> None:
    store, stream, coordinator = setup
    first = stream.submit(Submission("first", lora(0), None))
    assert coordinator.step(block_ms=None).version == "v1"
    again = stream.submit(Submission("first", lora(2), "v1"))  # the same task name: rejected
    assert "already in v1" in coordinator.step(block_ms=None).rejected[again]
    reason = stream.status(again).reason
    stream.client.xgroup_destroy(stream.keys.stream, stream.group)
    second = stream.submit(Submission("second", lora(1), "v1"))
    with caplog.at_level(logging.WARNING, logger="subspace_store.stream"):
        result = coordinator.step(max_batch=8, block_ms=None)
    assert "was gone" in caplog.text and "created it again" in caplog.text
    # The stream survived, so the group hands out every entry again: the merged and the rejected one are only
    # acknowledged by the stream (neither merged nor rejected twice), the new one is merged.
    assert result.merged == {second: "second"} and not result.rejected and result.version == "v2"
    assert stream.status(second) == merged_into("v2") and stream.pending() == []
    assert stream.status(first) == merged_into("v1") and stream.status(again).reason == reason


@pytest.mark.parametrize("call", ["read", "recover", "pending", "status"])
def test_after_redis_lost_its_data_the_next_call_works(
    redis_factory: Callable[..., RedisServer], namespace: str, call: str, caplog
) -> None:
    server = redis_factory(appendonly=False)
    client = redis.Redis.from_url(server.url)
    stream = SubmissionStream(client, namespace)
    held = stream.submit(Submission("held", lora(0), None))
    assert [s.id for s in stream.read("c")] == [held]
    client.flushall()  # what a restart without persistence leaves: no stream, no group
    with caplog.at_level(logging.WARNING, logger="subspace_store.stream"):
        if call == "read":
            assert stream.read("c") == []
        elif call == "recover":
            assert stream.recover("c", min_idle_ms=0) == []
        elif call == "pending":
            assert stream.pending() == []
        else:
            new = stream.submit(Submission("new", lora(1), None))
            assert stream.status(new) == SubmissionState(SubmissionStatus.QUEUED)
    assert "was gone" in caplog.text
    after = stream.submit(Submission("after", lora(2), None))
    assert after in [s.id for s in stream.read("c")]
    assert [p.id for p in stream.pending()][-1] == after
    client.close()
