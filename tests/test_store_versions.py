"""Publishing and reading versions against a real redis-server: round trip, manifest, tags, CAS, corruption."""

from __future__ import annotations

import threading

import pytest
import redis
import torch

from share import merge
from subspace_store import (
    CorruptPayloadError,
    HeadConflictError,
    SubspaceStore,
    TaskNotFoundError,
    VersionNotFoundError,
)
from subspace_store.codec import encode_subspace
from subspace_store.store import _Publication


def _same(a, b) -> None:
    assert list(a.modules) == list(b.modules) and list(a.tasks) == list(b.tasks)
    for m in a.modules:
        assert torch.equal(a.modules[m].U_A, b.modules[m].U_A) and torch.equal(a.modules[m].U_B, b.modules[m].U_B)
    for t in a.tasks:
        for m in a.modules:
            assert all(torch.equal(x, y) for x, y in zip(a.tasks[t].E[m], b.tasks[t].E[m], strict=True))
        assert a.tasks[t].head.keys() == b.tasks[t].head.keys()
        assert all(torch.equal(a.tasks[t].head[k], b.tasks[t].head[k]) for k in a.tasks[t].head)
        assert a.tasks[t].metadata == b.tasks[t].metadata
    assert a.policy == b.policy and a.metadata == b.metadata


def test_publish_get_round_trip_and_manifest(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    assert store.head() is None and store.list_versions() == []
    with pytest.raises(VersionNotFoundError, match="holds no version yet"):
        store.get()
    sub1, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    sub1.metadata["base_model"] = "tiny"
    v1 = store.publish(sub1, None, {"mlflow_run_id": "r1"})
    sub2, report = merge(sub1, {"c": make_adapter(2)})
    v2 = store.publish(sub2, v1, {"mlflow_run_id": "r2"}, reconstruction_error=report.reconstruction_error)
    assert (v1, v2) == ("v1", "v2") and store.head() == "v2"
    _same(store.get(), sub2)
    _same(store.get("v1"), sub1)

    m = store.manifest("v2")
    assert m["parent"] == "v1" and m["metadata"] == {"mlflow_run_id": "r2"} and m["submissions"] == []
    assert list(m["tasks"]) == ["a", "b", "c"]
    assert m["modules"]["layer.0.query"]["k_A"] == sub2.modules["layer.0.query"].k_A
    assert m["modules"]["layer.0.query"]["out_features"] == 24
    for t, err in report.reconstruction_error.items():
        assert m["tasks"][t]["reconstruction_error"] == pytest.approx(err)
    assert all(len(e["sha256"]) == 64 for e in [*m["modules"].values(), *m["tasks"].values()])
    assert isinstance(m["created"], float)

    infos = store.list_versions()
    assert [i.version for i in infos] == ["v1", "v2"] and infos[1].is_head and infos[1].parent == "v1"

    only_b = store.get("v2", tasks=["b"])
    assert list(only_b.tasks) == ["b"]
    with pytest.raises(TaskNotFoundError, match="no task 'zzz'.*holds: a, b, c"):
        store.get("v2", tasks=["zzz"])


def test_tags_resolve_and_errors(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(sub, None)
    v2 = store.publish(sub, v1)
    assert store.tag("v1", "prod") == "v1" and store.resolve("prod") == "v1"
    assert store.tag("head", "prod") == v2 and store.resolve("prod") == "v2"  # tags move
    assert store.resolve("latest") == "v2"
    assert [i.tags for i in store.list_versions()] == [[], ["prod"]]
    with pytest.raises(VersionNotFoundError, match="tags: prod"):
        store.resolve("canary")
    with pytest.raises(VersionNotFoundError, match="no version v7"):
        store.tag("v7", "x")
    for bad in ("v3", "head", "-x", ""):
        with pytest.raises(ValueError):
            store.tag("v1", bad)
    assert store.untag("prod") and not store.untag("prod")


def test_other_namespaces_are_separate(redis_client, namespace, make_adapter) -> None:
    sub, _ = merge(None, {"a": make_adapter(0)})
    SubspaceStore(redis_client, namespace).publish(sub, None)
    other = SubspaceStore(redis_client, namespace + "-other")
    assert other.head() is None and other.list_versions() == []
    with pytest.raises(ValueError, match="invalid namespace"):
        SubspaceStore(redis_client, "a:b")


def test_concurrent_publishers_exactly_one_wins(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    base, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(base, None)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def publisher(task: str, seed: int) -> None:
        sub, _ = merge(base, {task: make_adapter(seed)})
        client = redis.Redis(connection_pool=redis_client.connection_pool)
        barrier.wait()
        try:
            results[task] = SubspaceStore(client, namespace).publish(sub, v1)
        except HeadConflictError as err:
            results[task] = err

    threads = [threading.Thread(target=publisher, args=(t, s)) for t, s in (("x", 1), ("y", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {t: r for t, r in results.items() if isinstance(r, str)}
    losers = {t: r for t, r in results.items() if isinstance(r, HeadConflictError)}
    assert len(winners) == 1 and len(losers) == 1
    (won,) = winners.values()
    (loser_task, err) = next(iter(losers.items()))
    assert err.expected == v1 and err.actual == won and won in str(err) and "retry" in str(err)
    assert store.head() == won and [i.version for i in store.list_versions()] == [v1, won]

    # The loser retries from the new head and wins.
    retried, _ = merge(store.get(won), {loser_task: make_adapter(9)})
    v3 = store.publish(retried, won)
    assert store.head() == v3 and set(store.get().tasks) == {"a", "x", "y"}


def test_conflict_at_commit_names_both_versions_and_cleans_up(redis_client, namespace, make_adapter) -> None:
    """A publisher whose payloads are written when another moves the head loses at the CAS."""
    store = SubspaceStore(redis_client, namespace)
    base, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(base, None)
    slow_sub, _ = merge(base, {"slow": make_adapter(1)})
    slow = _Publication(store, encode_subspace(slow_sub))
    slow_version = slow.begin()
    slow.write_payloads()
    fast_sub, _ = merge(base, {"fast": make_adapter(2)})
    fast_version = store.publish(fast_sub, v1)
    with pytest.raises(HeadConflictError) as info:
        slow.commit(slow_sub, v1, v1, {}, [], "coordinator")
    slow.abort()
    assert info.value.attempted == slow_version and info.value.actual == fast_version
    assert slow_version in str(info.value) and fast_version in str(info.value)
    assert store.head() == fast_version
    assert not any(redis_client.exists(k) for k in slow.payload_keys)
    assert not redis_client.hexists(store.keys.writing, slow_version)
    with pytest.raises(VersionNotFoundError):
        store.get(slow_version)


def test_corrupted_payload_names_version_and_key(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    version = store.publish(sub, None)
    key = store.manifest(version)["tasks"]["b"]["key"]
    data = bytearray(redis_client.get(key))
    data[len(data) // 2] ^= 0x01
    redis_client.set(key, bytes(data))
    with pytest.raises(CorruptPayloadError, match="checksum") as info:
        store.get(version)
    assert info.value.version == version and info.value.key == key
    assert version in str(info.value) and key in str(info.value)
    store.get(version, tasks=["a"])  # the undamaged task is still readable

    redis_client.set(key, bytes(data[:-8]))  # truncated
    with pytest.raises(CorruptPayloadError, match="bytes"):
        store.get(version, tasks=["b"])


def test_invalid_subspace_writes_nothing(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub, _ = merge(None, {"a": make_adapter(0)})
    sub.tasks["a"].E["layer.0.query"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        store.publish(sub, None)
    sub2, _ = merge(None, {"a": make_adapter(0)})
    with pytest.raises(ValueError, match="JSON"):
        store.publish(sub2, None, {"bad": object()})
    assert redis_client.keys(store.keys.prefix.replace("{", "\\{").replace("}", "\\}") + "*") == []
