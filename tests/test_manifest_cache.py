"""The per-process manifest cache and the one-round-trip read of a ref and its manifest (real redis-server)."""

from __future__ import annotations

import json
import threading

import pytest
import redis
import torch

from share import merge
from subspace_store import (
    CorruptPayloadError,
    StoreError,
    SubspaceStore,
    TaskNotFoundError,
    VersionNotFoundError,
    manifest_cache,
)
from subspace_store.codec import encode_subspace
from subspace_store.manifest_cache import MEMORY_PER_BYTE, ManifestCache, server_identity
from subspace_store.store import _Publication


@pytest.fixture(autouse=True)
def _fresh_cache():
    manifest_cache.clear()
    yield
    manifest_cache.clear()


class _CountingConnection(redis.Connection):
    """Counts what goes over the wire in one write: one per command, one per pipeline (a round trip each)."""

    sends = 0

    def send_packed_command(self, command, check_health=True):  # noqa: ANN001
        type(self).sends += 1
        return super().send_packed_command(command, check_health)


def _another_client(redis_client: redis.Redis, connection_class: type = redis.Connection, **change) -> redis.Redis:
    kwargs = {**redis_client.connection_pool.connection_kwargs, **change}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))


def _counting_client(redis_client: redis.Redis) -> redis.Redis:
    return _another_client(redis_client, _CountingConnection)


def _publish(store: SubspaceStore, make_adapter, names: list[str], parent=None, base=None):
    sub, _ = merge(base, {n: make_adapter(i) for i, n in enumerate(names)})
    return sub, store.publish(sub, parent)


def _round_trips(fn) -> int:
    before = _CountingConnection.sends
    fn()
    return _CountingConnection.sends - before


def test_a_second_read_reuses_the_checked_manifest_in_one_round_trip(redis_client, namespace, make_adapter) -> None:
    client = _counting_client(redis_client)
    store = SubspaceStore(client, namespace)
    sub, v1 = _publish(store, make_adapter, ["a", "b"])
    store.tag(v1, "prod")
    cache = manifest_cache.MANIFESTS
    cache.clear()  # as a process that did not publish v1 (the publisher's own commit leaves it cached)
    first = cache.misses
    for ref in ("head", "prod", v1):
        store._checked(ref)  # first: the guess for this ref is learned (head/tag: one more GET)
        hits = cache.hits
        assert _round_trips(lambda ref=ref: store._checked(ref)) == 1, ref  # ref + manifest in one transaction
        assert cache.hits == hits + 1
    assert cache.misses == first + 1  # parsed and checked once for all three refs
    got = store.get("head", tasks=["b"])
    assert list(got.tasks) == ["b"]
    assert torch.equal(got.tasks["b"].E["layer.0.query"][0], sub.tasks["b"].E["layer.0.query"][0])
    # A new store object (another request of a server) on another client of the same server shares the cache.
    other = SubspaceStore(_another_client(redis_client), namespace)
    misses = cache.misses
    assert list(other.get(v1).tasks) == ["a", "b"] and cache.misses == misses


def test_what_leaves_the_cache_is_the_callers_copy(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    _, v1 = _publish(store, make_adapter, ["a"])
    m = store.manifest(v1)
    m["tasks"]["a"]["metadata"]["spoiled"] = True
    m["metadata"]["spoiled"] = True
    del m["tasks"]["a"]
    again = store.manifest(v1)
    assert "a" in again["tasks"] and "spoiled" not in again["tasks"]["a"]["metadata"]
    assert "spoiled" not in again["metadata"]
    pulled = store.get(v1)
    pulled.tasks["a"].metadata["spoiled"] = True
    pulled.metadata["spoiled"] = True
    fresh = store.get(v1)
    assert "spoiled" not in fresh.tasks["a"].metadata and "spoiled" not in fresh.metadata
    assert "spoiled" not in store.manifest(v1)["tasks"]["a"]["metadata"]
    info = store.list_versions()[0]
    info.metadata["spoiled"] = True
    info.submissions.append("x")
    assert store.manifest(v1)["metadata"] == {} and store.manifest(v1)["submissions"] == []


def test_a_manifest_rewritten_after_it_was_cached_is_checked_again(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    _, v1 = _publish(store, make_adapter, ["a", "b"])
    key = store.keys.manifest(v1)
    original = redis_client.get(key)
    store.get(v1)  # cached
    # Valid but different bytes: the new content is read, not the cached one.
    changed = json.loads(original)
    changed["metadata"] = {"rewritten": 1}
    redis_client.set(key, json.dumps(changed))
    assert store.manifest(v1)["metadata"] == {"rewritten": 1}
    # Invalid bytes: refused as without a cache, for every way of reading.
    broken = json.loads(original)
    broken["tasks"]["b"]["sha256"] = "not-a-digest"
    redis_client.set(key, json.dumps(broken))
    for read in (lambda: store.get(v1), lambda: store.get(v1, tasks=["b"]), lambda: store.manifest(v1)):
        with pytest.raises(CorruptPayloadError, match=r"\['tasks'\]\['b'\]\['sha256'\]"):
            read()
    with pytest.raises(CorruptPayloadError, match="sha256"):
        store.list_versions()
    broken["version"] = "v99"
    redis_client.set(key, json.dumps(broken))
    with pytest.raises(CorruptPayloadError, match="expected 'v1'"):
        store.get(v1, tasks=["a"])
    redis_client.set(key, original)
    assert list(store.get(v1).tasks) == ["a", "b"]


def test_only_the_entries_used_are_checked_but_every_used_one_is(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    _, v1 = _publish(store, make_adapter, ["a", "b", "c"])
    key = store.keys.manifest(v1)
    broken = json.loads(redis_client.get(key))
    broken["tasks"]["c"]["key"] = "sharecl:elsewhere:secret"  # an entry that must never be followed
    redis_client.set(key, json.dumps(broken))
    assert list(store.get(v1, tasks=["a"]).tasks) == ["a"]  # c's entry is not used, so not needed
    for read in (lambda: store.get(v1, tasks=["c"]), lambda: store.get(v1), lambda: store.chain_lengths(v1)):
        with pytest.raises(CorruptPayloadError, match=r"\['tasks'\]\['c'\]\['key'\]"):
            read()
    # A missing task's message lists the held names only once they are checked.
    with pytest.raises(CorruptPayloadError):
        store.get(v1, tasks=["zzz"])
    broken["tasks"]["c"]["key"] = store.keys.task(v1, "c")
    redis_client.set(key, json.dumps(broken))
    with pytest.raises(TaskNotFoundError, match="it holds: a, b, c"):
        store.get(v1, tasks=["zzz"])


def test_a_pruned_version_is_not_served_from_the_cache(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    sub1, v1 = _publish(store, make_adapter, ["a"])
    store.tag(v1, "old")
    assert list(store.get(v1).tasks) == ["a"] and list(store.get("old").tasks) == ["a"]
    sub2, report = merge(sub1, {"b": make_adapter(5)})
    store.publish(sub2, v1)
    store.untag("old")
    assert store.prune(keep=1).removed == [v1]
    assert len(manifest_cache.MANIFESTS) >= 1  # still cached, yet never served for a version that is gone
    with pytest.raises(VersionNotFoundError, match="never published or pruned"):
        store.get(v1)
    with pytest.raises(VersionNotFoundError, match="never published or pruned"):
        store.manifest(v1)
    with pytest.raises(VersionNotFoundError, match="neither a version id"):
        store.get("old")
    assert list(store.get("head").tasks) == ["a", "b"]


def test_a_moved_head_or_tag_is_followed(redis_client, namespace, make_adapter) -> None:
    client = _counting_client(redis_client)
    store = SubspaceStore(client, namespace)
    sub1, v1 = _publish(store, make_adapter, ["a"])
    store.tag(v1, "prod")
    assert store.manifest("head")["version"] == v1 and store.manifest("prod")["version"] == v1
    sub2, _ = merge(sub1, {"b": make_adapter(7)})
    v2 = store.publish(sub2, v1)
    store.tag(v2, "prod")
    # Another process moved them: the guess (v1) is wrong, one more round trip reads v2's manifest.
    assert _round_trips(lambda: store.manifest("head")) == 2
    assert store.manifest("prod")["version"] == v2 and list(store.get("head").tasks) == ["a", "b"]
    assert _round_trips(lambda: store.manifest("head")) == 1


def test_a_head_that_names_no_version_id_is_refused(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    _publish(store, make_adapter, ["a"])
    store.get()
    redis_client.set(store.keys.head, b"\xff../etc")
    with pytest.raises(StoreError, match="which is not a version id"):
        store.get()


def test_format_1_manifests_read_lazily_from_many_threads(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    names = [f"t{i}" for i in range(8)]
    sub, _ = merge(None, {n: make_adapter(i) for i, n in enumerate(names)})
    old = _Publication(store, encode_subspace(sub))
    old.format_version = 1
    old.begin()
    old.write_payloads()
    v1 = old.commit(sub, None, None, {}, [], "coordinators")
    errors: list[BaseException] = []

    def pull(name: str) -> None:
        try:
            for _ in range(3):
                got = store.get(v1, tasks=[name])
                assert torch.equal(got.tasks[name].E["layer.0.query"][1], sub.tasks[name].E["layer.0.query"][1])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=pull, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    m = store.manifest(v1)
    assert m["rotations"] == [] and all(e["written_in"] == v1 for e in m["tasks"].values())


def test_the_cache_is_bounded_by_entries_and_bytes() -> None:
    cache: ManifestCache[str] = ManifestCache(max_entries=2, max_bytes=100 * MEMORY_PER_BYTE)
    cache.put(("s", "ns", "v1"), b"1" * 10, "one")
    cache.put(("s", "ns", "v2"), b"2" * 10, "two")
    assert cache.lookup(("s", "ns", "v1"), b"1" * 10) == "one"  # v1 now the most recent
    cache.put(("s", "ns", "v3"), b"3" * 10, "three")
    assert len(cache) == 2 and cache.lookup(("s", "ns", "v2"), b"2" * 10) is None
    assert cache.lookup(("s", "ns", "v1"), b"1" * 10) == "one"
    cache.put(("s", "ns", "v4"), b"4" * 90, "four")  # over the byte bound with both others: the oldest go
    assert cache.bytes <= 100 * MEMORY_PER_BYTE and cache.lookup(("s", "ns", "v4"), b"4" * 90) == "four"
    assert cache.lookup(("s", "ns", "v3"), b"3" * 10) is None
    cache.put(("s", "ns", "v5"), b"5" * 101, "five")  # larger than the whole budget: not kept
    assert cache.lookup(("s", "ns", "v5"), b"5" * 101) is None
    assert cache.lookup(("s", "ns", "v4"), b"4" * 89 + b"x") is None  # other bytes: a miss, and dropped
    assert len(cache) == 1 and cache.bytes == 10 * MEMORY_PER_BYTE  # v1 (10 + 90 fit the bound exactly)


def test_server_identity_tells_servers_apart(redis_client) -> None:
    same, other = _another_client(redis_client), _another_client(redis_client, db=3)
    assert server_identity(same) == server_identity(redis_client) != server_identity(other)
