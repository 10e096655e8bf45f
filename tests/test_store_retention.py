"""Retention never deletes the head, tagged or pinned versions; per-task pulls transfer only what they need."""

from __future__ import annotations

import pytest
import redis

from share import merge
from subspace_store import SubspaceStore, VersionNotFoundError, connect


def _publish_chain(store: SubspaceStore, make_adapter, count: int) -> list[str]:
    sub, _ = merge(None, {"t0": make_adapter(0)})
    versions = [store.publish(sub, None)]
    for i in range(1, count):
        sub, _ = merge(sub, {f"t{i}": make_adapter(i)})
        versions.append(store.publish(sub, versions[-1]))
    return versions


def test_prune_keeps_head_tagged_pinned_and_newest(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    v = _publish_chain(store, make_adapter, 7)  # v1..v7
    store.tag("v2", "prod")
    assert store.pin("v4", "job-17", ttl_s=600) == "v4"
    # A crashed job's pin whose ttl has run out (written as it would look a while later) protects nothing.
    store.client.zadd(store.keys.pins, {"v1|job-crashed": 1.0})

    plan = store.prune(keep=2, dry_run=True)
    assert plan.removed == ["v1", "v3", "v5"] and plan.dry_run
    assert len(store.list_versions()) == 7  # dry run deletes nothing

    result = store.prune(keep=2)
    assert result.removed == ["v1", "v3", "v5"]
    assert result.kept == {
        "v2": ["tag prod"],
        "v4": ["pinned by job-17"],
        "v6": ["newest 2"],
        "v7": ["head", "newest 2"],
    }
    assert [i.version for i in store.list_versions()] == ["v2", "v4", "v6", "v7"]
    for gone in ("v1", "v3", "v5"):
        with pytest.raises(VersionNotFoundError):
            store.get(gone)
        assert store.client.keys(f"{store.keys.prefix}v:{gone}:*") == []
    for kept in ("v2", "v4", "v6", "v7"):
        store.get(kept)
    assert store.pins() == {"v4": ["job-17"]}

    store.unpin("v4", "job-17")
    store.untag("prod")
    assert store.prune(keep=0).removed == ["v2", "v4", "v6"]
    assert [i.version for i in store.list_versions()] == ["v7"] and store.head() == v[-1]
    with pytest.raises(VersionNotFoundError):
        store.pin("v2", "job-18")  # cannot pin what is gone
    with pytest.raises(ValueError, match="keep"):
        store.prune(keep=-1)


def test_pin_follows_a_tag_atomically(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    _publish_chain(store, make_adapter, 3)
    assert store.pin("head", "job-1") == "v3"
    store.tag("v1", "canary")
    assert store.pin("canary", "job-2") == "v1"
    assert store.pins() == {"v3": ["job-1"], "v1": ["job-2"]}
    assert {i.version: i.pins for i in store.list_versions()} == {"v1": ["job-2"], "v2": [], "v3": ["job-1"]}
    with pytest.raises(ValueError, match="job id"):
        store.pin("v1", "a|b")


def test_one_task_pull_transfers_only_bases_and_that_task(private_redis, make_adapter) -> None:
    """Measured on the server: INFO's total_net_output_bytes before and after the pull."""
    store = SubspaceStore(connect(private_redis.url), "ns")
    big_head = {"classifier.weight": (64, 512)}  # 128 KiB per task, so task payloads dominate
    adapters = {f"t{i}": make_adapter(i, head=big_head, d=512) for i in range(8)}
    sub, _ = merge(None, adapters)
    version = store.publish(sub, None)
    manifest = store.manifest(version)
    bases = sum(e["bytes"] for e in manifest["modules"].values())
    task_bytes = manifest["tasks"]["t3"]["bytes"]
    all_tasks = sum(e["bytes"] for e in manifest["tasks"].values())

    probe = redis.Redis.from_url(private_redis.url)  # a separate connection only reads INFO

    def sent() -> int:
        return int(probe.info("stats")["total_net_output_bytes"])

    info_cost = sent() - sent()  # bytes one INFO call itself sends (negated)
    before = sent()
    one = store.get(version, tasks=["t3"])
    one_task = sent() - before + info_cost
    before = sent()
    store.get(version)
    everything = sent() - before + info_cost

    assert list(one.tasks) == ["t3"]
    overhead = len(store.client.get(store.keys.manifest(version))) + 4096  # manifest read + protocol framing
    assert bases + task_bytes <= one_task <= bases + task_bytes + overhead
    assert everything >= bases + all_tasks
    assert one_task < bases + 2 * task_bytes  # not one other task's coefficients came along


def test_release_pins_frees_a_job_and_its_tasks_only(redis_client, namespace, make_adapter) -> None:
    store = SubspaceStore(redis_client, namespace)
    v1 = store.publish(merge(None, {"a": make_adapter(0)})[0], None)
    for holder in ("job1", "job1/a", "job1/b", "job10/a", "job2"):
        store.pin(v1, holder)
    assert sorted(store.release_pins("job1")) == [f"{v1}:job1", f"{v1}:job1/a", f"{v1}:job1/b"]
    assert sorted(store.pins()[v1]) == ["job10/a", "job2"] and store.release_pins("job1") == []
