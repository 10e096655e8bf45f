"""The store on a real local Redis Cluster (issue 14, item 5): three masters started from the tests'
redis-server binary, slots split between them (``subspace_store.embedded.start_redis_cluster``).

Commit keys (head, versions, tags, stream, manifests, ...) share the namespace's slot, so the
transactions over them stay valid; version payloads spread over the masters. Covered: publish and
pull (payloads on several masters, the raw large-payload reader going to the node that owns each
key), an aborted publish, the submission stream through ``Coordinator.step``, tags and pins, ``prune``
deleting payloads on other masters (and finishing a prune that died after its commit), stores
written with the legacy key layout, a master restart (append-only persistence), ``sharecl versions``
against ``redis+cluster://``, and the errors for a cluster named by a plain URL and vice versa.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis.cluster import RedisCluster

from coordinator import Coordinator
from share import KPolicy, merge
from subspace_store import StoreConnectionError, Submission, SubmissionStream, SubspaceStore, connect
from subspace_store.codec import encode_subspace
from subspace_store.connection import outlast_restarts
from subspace_store.embedded import LocalCluster, start_redis_cluster
from subspace_store.keys import Keys
from subspace_store.rawget import RawGetter
from subspace_store.store import _Publication, list_namespaces

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
# Enough modules and tasks that payload keys hash to several masters whatever the namespace is.
MODULES = tuple(f"layer.{i}.query" for i in range(6))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    started = start_redis_cluster(tmp_path_factory.mktemp("cluster"), masters=3, appendonly=True)
    yield started
    started.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    made = connect(cluster.url)
    yield made
    made.close()


def node_keys(cluster: LocalCluster, pattern: str) -> dict[int, set[str]]:
    """Port -> the keys matching ``pattern`` that master holds, read from each node on its own."""
    out = {}
    for server in cluster.servers:
        node = server.client()
        try:
            out[server.port] = {k.decode() for k in node.scan_iter(match=pattern, count=1000)}
        finally:
            node.close()
    return out


def owner(cluster: LocalCluster, key: str) -> int:
    """The port of the master whose slots hold ``key`` (CLUSTER KEYSLOT, then CLUSTER SLOTS), asked of a node."""
    node = cluster.servers[0].client()
    try:
        slot = int(node.execute_command("CLUSTER KEYSLOT", key))
        for low, high, master, *_ in node.execute_command("CLUSTER SLOTS"):
            if int(low) <= slot <= int(high):
                return int(master[1])
    finally:
        node.close()
    raise AssertionError(f"no master serves slot {slot}")


def payload_keys(manifest: dict) -> list[str]:
    return [e["key"] for e in manifest["modules"].values()] + [e["key"] for e in manifest["tasks"].values()]


def assert_same_tasks(got, want, names=None) -> None:
    """``got`` holds ``want``'s tasks (or those ``names``) bit for bit: coefficients and heads."""
    for name in names or want.tasks:
        mine, theirs = got.tasks[name], want.tasks[name]
        assert set(mine.E) == set(theirs.E) and set(mine.head) == set(theirs.head), name
        for module, (E_A, E_B) in theirs.E.items():
            assert torch.equal(mine.E[module][0], E_A) and torch.equal(mine.E[module][1], E_B), (name, module)
        assert all(torch.equal(mine.head[h], t) for h, t in theirs.head.items()), name


def publish_tasks(store: SubspaceStore, make_adapter, seeds: range, parent=None):
    adapters = {f"t{s}": make_adapter(s, modules=MODULES) for s in seeds}
    head = store.get(parent) if parent else None
    subspace, _ = merge(head, adapters)
    return store.publish(subspace, parent), subspace


def test_publish_and_pull_spread_payloads_over_masters(cluster, client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    version, subspace = publish_tasks(store, make_adapter, range(4))
    manifest = store.manifest(version)
    keys = payload_keys(manifest)
    held = node_keys(cluster, f"sharecl:{namespace}:*")
    # Every payload lies on the master that owns its slot, and they are spread over more than one.
    for key in keys:
        assert key in held[owner(cluster, key)], key
    assert len({owner(cluster, key) for key in keys}) >= 2
    assert sum(len(v) for v in held.values()) == len(keys)  # nothing else of the version outside the slot
    # The commit keys all live on the master of the namespace's slot.
    ns = Keys(namespace)
    commit = node_keys(cluster, f"sharecl:{{{namespace}}}:*")
    home = owner(cluster, ns.head)
    assert {ns.head, ns.versions, ns.manifest(version), ns.writing} - {ns.writing} <= commit[home]
    assert all(not found for port, found in commit.items() if port != home)

    pulled = store.get(version)
    assert list(pulled.tasks) == list(subspace.tasks)
    for name, module in subspace.modules.items():
        assert torch.equal(pulled.modules[name].U_A, module.U_A) and torch.equal(pulled.modules[name].U_B, module.U_B)
    assert_same_tasks(pulled, subspace)
    assert store.resolve("head") == version and store.version_count() == 1
    assert namespace in list_namespaces(client)
    assert [info.version for info in store.list_versions()] == [version]


def test_raw_reader_goes_to_the_node_that_owns_each_key(cluster, client, namespace) -> None:
    values = {f"sharecl:{namespace}:v:v1:task:t{i}": os.urandom(300_000 + i) for i in range(8)}
    for key, value in values.items():
        client.set(key, value)
    assert len({owner(cluster, key) for key in values}) >= 2
    with RawGetter(client) as get:
        for key, value in values.items():
            assert bytes(get(key)) == value
        assert get(f"sharecl:{namespace}:v:v1:task:missing") is None


def test_pull_of_large_payloads_through_the_raw_reader(cluster, client, namespace, make_adapter) -> None:
    """Bases of 2048 x 16 floats (over fetch's inline size) take the raw reader, node by node."""
    store = SubspaceStore(client, namespace)
    modules = ("big.0.query", "big.1.query", "big.2.query", "big.3.query")
    subspace, _ = merge(None, {f"t{s}": make_adapter(s, modules=modules, n=2048, d=2048, r=8) for s in range(2)})
    version = store.publish(subspace, None)
    bases = store.manifest(version)["modules"]
    assert min(e["bytes"] for e in bases.values()) >= 256 << 10
    assert len({owner(cluster, e["key"]) for e in bases.values()}) >= 2
    pulled = store.get(version)
    for name, module in subspace.modules.items():
        assert torch.equal(pulled.modules[name].U_A, module.U_A) and torch.equal(pulled.modules[name].U_B, module.U_B)
    assert_same_tasks(pulled, subspace)


def test_aborted_publish_deletes_its_payloads_on_every_master(cluster, client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    subspace, _ = merge(None, {f"t{s}": make_adapter(s, modules=MODULES) for s in range(3)})
    publication = _Publication(store, encode_subspace(subspace, None))
    version = publication.begin()
    publication.write_payloads()
    assert len({owner(cluster, key) for key in publication.payload_keys}) >= 2
    assert client.exists(*publication.payload_keys) == len(publication.payload_keys)
    publication.abort()
    assert client.exists(*publication.payload_keys) == 0
    assert not client.hexists(store.keys.writing, version) and store.head() is None


def test_stream_submit_read_and_acknowledge_through_the_coordinator(client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    stream = SubmissionStream(client, namespace)
    coordinator = Coordinator(store, stream, KPolicy(variance=1.0))
    ids = [stream.submit(Submission(f"t{i}", make_adapter(i, modules=MODULES), None)) for i in range(3)]
    again = stream.submit(Submission("t0", make_adapter(0, modules=MODULES), None, attempt_key="job/t0"))
    assert stream.submit(Submission("t0", make_adapter(0, modules=MODULES), None, attempt_key="job/t0")) == again
    result = coordinator.step(max_batch=2, block_ms=None)
    assert result.version == "v1" and list(result.merged) == ids[:2]
    result = coordinator.step(max_batch=16, block_ms=None)
    assert result.version == "v2" and set(result.merged) | set(result.rejected) == {ids[2], again}
    assert stream.pending() == [] and stream.is_settled()
    assert {stream.status(sid).version for sid in ids[:2]} == {"v1"} and stream.status(ids[2]).version == "v2"
    assert set(store.manifest("head")["tasks"]) >= {"t0", "t1", "t2"}
    # A rejection is a transaction on the namespace's slot too.
    late = stream.submit(Submission("t9", make_adapter(9, modules=MODULES), None))
    stream.read("someone", block_ms=None)
    stream.reject(late, "test")
    assert stream.status(late).reason == "test" and stream.pending() == []


def test_tags_and_pins(client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    v1, _ = publish_tasks(store, make_adapter, range(2))
    v2, _ = publish_tasks(store, make_adapter, range(2, 3), parent=v1)
    assert store.tag(v1, "prod") == v1 and store.resolve("prod") == v1
    assert store.tag("head", "prod") == v2 and store.tags() == {"prod": v2}
    assert store.pin(v1, "job-1", ttl_s=60) == v1 and store.pins() == {v1: ["job-1"]}
    assert store.release_pins("job-1") == [f"{v1}:job-1"] and store.pins() == {}
    assert store.untag("prod") and store.tags() == {}


def test_prune_deletes_payloads_on_other_masters(cluster, client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    v1, _ = publish_tasks(store, make_adapter, range(3))
    v2, _ = publish_tasks(store, make_adapter, range(3, 4), parent=v1)
    v3, last = publish_tasks(store, make_adapter, range(4, 5), parent=v2)
    first = payload_keys(store.manifest(v1))
    home = owner(cluster, store.keys.head)
    assert {owner(cluster, key) for key in first} - {home}  # some lie on a master other than the commit keys'
    store.pin(v2, "job", ttl_s=60)
    result = store.prune(keep=1)
    assert result.removed == [v1] and set(result.kept) == {v2, v3}
    assert client.exists(*first) == 0 and client.exists(store.keys.manifest(v1)) == 0
    held = node_keys(cluster, f"sharecl:{namespace}:v:{v1}:*")
    assert not any(held.values()), held
    assert client.hlen(store.keys.writing) == 0
    store.unpin(v2, "job")
    assert store.prune(keep=1).removed == [v2]
    left = set().union(*node_keys(cluster, f"sharecl:{namespace}:*").values())
    assert left == set(payload_keys(store.manifest(v3)))
    assert list(store.get(v3).tasks) == list(last.tasks)


@pytest.mark.parametrize("shared_entries_from", [256, 1], ids=["format3", "format4"])
def test_delta_versions_keep_the_payloads_they_read_through_on_other_masters(
    cluster, client, namespace, make_adapter, shared_entries_from
) -> None:
    """Delta versions name older versions' task payloads and their own rotations (format 4: entries payloads and
    numbers too); prune keeps those a retained version reads through, on whichever master they lie, and deletes
    the rest."""
    store = SubspaceStore(client, namespace, shared_entries_from=shared_entries_from)
    subspace, _ = merge(None, {f"t{s}": make_adapter(s, modules=MODULES) for s in range(3)}, KPolicy(k=8))
    versions, subs = [store.publish(subspace, None, delta=True)], [subspace]
    for s in range(3, 6):
        subspace, report = merge(subspace, {f"t{s}": make_adapter(s, modules=MODULES)}, KPolicy(k=8))
        versions.append(store.publish(subspace, versions[-1], delta=True, rotations=report.rotations))
        subs.append(subspace)
    last = store.manifest(versions[-1])
    inherited = [
        e["key"] for e in last["tasks"].values() if not e["key"].startswith(f"sharecl:{namespace}:v:{versions[-1]}:")
    ]
    assert inherited and len({owner(cluster, key) for key in inherited}) >= 2  # read through, on several masters
    assert store.prune(keep=1).removed == versions[:-1]
    assert client.exists(*inherited) == len(inherited)
    got = store.get(versions[-1])
    for name, task in subs[-1].tasks.items():
        for module, (E_A, E_B) in task.E.items():
            assert torch.allclose(got.tasks[name].E[module][0], E_A, rtol=1e-5, atol=1e-6)
            assert torch.allclose(got.tasks[name].E[module][1], E_B, rtol=1e-5, atol=1e-6)
    left = set().union(*node_keys(cluster, f"sharecl:{namespace}:*").values())
    assert left == set(inherited) | {k for k in payload_keys(last) if k not in inherited} | {
        r["key"] for element in last.get("rotations", []) for r in element["rotations"].values()
    } | {e["key"] for e in last.get("entries", [])} | ({last["numbers"]["key"]} if "numbers" in last else set())
    assert last["format_version"] == (4 if shared_entries_from == 1 else 3)
    assert client.hlen(store.keys.writing) == 0


def test_prune_that_died_after_its_commit_is_finished_by_the_next(client, namespace, make_adapter) -> None:
    """What prune files before its commit (the payloads outside the namespace's slot, as a record of
    their version started at 0) is swept by the next prune when the first died before deleting them."""
    store = SubspaceStore(client, namespace)
    v1, _ = publish_tasks(store, make_adapter, range(2))
    publish_tasks(store, make_adapter, range(2, 3), parent=v1)
    left = payload_keys(store.manifest(v1))
    # The state right after prune's transaction: v1 uncommitted, its manifest gone, the record filed.
    client.zrem(store.keys.versions, v1)
    client.delete(store.keys.manifest(v1))
    client.hset(store.keys.writing, v1, json.dumps({"started": 0, "keys": left}))
    assert client.exists(*left) == len(left)
    result = store.prune(keep=5)
    assert result.orphans == [v1] and result.removed == []
    assert client.exists(*left) == 0 and client.hlen(store.keys.writing) == 0


def test_legacy_key_layout_reads_and_prunes(client, namespace, make_adapter, monkeypatch) -> None:
    """A store written before payloads left the namespace's slot (``sharecl:{ns}:v:...``) stays readable."""
    store = SubspaceStore(client, namespace)
    with monkeypatch.context() as patch:
        patch.setattr(Keys, "basis", lambda self, v, m: f"{self.legacy_payload_prefix(v)}basis:{m}")
        patch.setattr(Keys, "task", lambda self, v, t: f"{self.legacy_payload_prefix(v)}task:{t}")
        v1, first = publish_tasks(store, make_adapter, range(2))
    legacy = payload_keys(store.manifest(v1))
    assert all(key.startswith(f"sharecl:{{{namespace}}}:v:{v1}:") for key in legacy)
    v2, _ = publish_tasks(store, make_adapter, range(2, 3), parent=v1)
    assert all(key.startswith(f"sharecl:{namespace}:v:{v2}:") for key in payload_keys(store.manifest(v2)))
    assert_same_tasks(store.get(v1), first)
    assert store.prune(keep=1).removed == [v1]
    assert client.exists(*legacy) == 0 and client.hlen(store.keys.writing) == 0


def test_master_restart_keeps_versions_and_stream(cluster, namespace, make_adapter) -> None:
    client = outlast_restarts(connect(cluster.url))
    store = SubspaceStore(client, namespace)
    stream = SubmissionStream(client, namespace)
    v1, _ = publish_tasks(store, make_adapter, range(3))
    v2, second = publish_tasks(store, make_adapter, range(3, 4), parent=v1)
    store.tag(v1, "stable")
    queued = stream.submit(Submission("later", make_adapter(7, modules=MODULES), None))
    held = stream.read("c1", block_ms=None)
    assert [s.id for s in held] == [queued]
    home = owner(cluster, store.keys.head)
    others = {owner(cluster, key) for key in payload_keys(store.manifest(v2))} - {home}
    for port in [home, *sorted(others)[:1]]:  # the commit keys' master, then one that holds only payloads
        index = next(i for i, s in enumerate(cluster.servers) if s.port == port)
        cluster.restart(index)
    for reader in (client, connect(cluster.url)):  # the client that lived through it, and a new one
        again = SubspaceStore(reader, namespace)
        assert [info.version for info in again.list_versions()] == [v1, v2]
        assert again.tags() == {"stable": v1} and again.head() == v2
        assert_same_tasks(again.get(v2), second)
        assert set(again.get(v1).tasks) == {"t0", "t1", "t2"}
        entries = SubmissionStream(reader, namespace)
        assert entries.latest_id() == queued and [p.id for p in entries.pending()] == [queued]
    recovered = SubmissionStream(client, namespace).recover("c1", min_idle_ms=0)
    assert [s.id for s in recovered] == [queued] and recovered[0].task == "later"


def test_cli_versions_on_a_cluster_url(cluster, client, namespace, make_adapter) -> None:
    store = SubspaceStore(client, namespace)
    v1, _ = publish_tasks(store, make_adapter, range(2))
    store.tag(v1, "prod")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SHARECL_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "versions", "--redis-url", cluster.url, "--namespace", namespace],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(v1))
    assert "HEAD, prod" in row and " 2 " in row  # two tasks


def test_store_status_reports_every_master_and_says_which_one_is_down(
    cluster, client, namespace, make_adapter, capsys
) -> None:
    from jobs.cli import main

    publish_tasks(SubspaceStore(client, namespace), make_adapter, range(2))

    def reported() -> tuple[int, str, dict[int, str]]:
        code = main(["store", "status", "--redis-url", cluster.url])
        out = capsys.readouterr().out
        rows = {int(line.split(":")[1]): line for line in out.splitlines() if line.startswith("  127.0.0.1:")}
        return code, out, rows

    code, out, rows = reported()
    assert code == 0 and f"{len(cluster.servers)} master(s)" in out.splitlines()[0]
    assert sorted(rows) == sorted(server.port for server in cluster.servers)
    for server in cluster.servers:  # each master's own key count, not one node's
        own = server.client()
        try:
            assert f"keys {own.dbsize()}," in rows[server.port]
        finally:
            own.close()
    down = cluster.servers[-1]  # not the node the URL names
    down.stop()
    try:
        code, out, rows = reported()
        assert code == 1 and "not answering" in rows[down.port] and "1 master(s) not answering" in out
        assert all("append-only persistence" in line for port, line in rows.items() if port != down.port)
    finally:
        cluster.restart(len(cluster.servers) - 1)


def test_cluster_and_plain_urls_are_not_mixed_up(cluster, redis_server) -> None:
    port = cluster.servers[0].port
    with pytest.raises(StoreConnectionError, match=rf"node of a Redis Cluster.*redis\+cluster://127.0.0.1:{port}"):
        connect(f"redis://127.0.0.1:{port}")
    plain = redis_server.replace("redis://", "redis+cluster://", 1)
    with pytest.raises(StoreConnectionError, match=r"not a Redis Cluster node.*redis://"):
        connect(plain)
    with pytest.raises(StoreConnectionError, match="cannot reach Redis"):
        connect(f"redis+cluster://127.0.0.1:{_closed_port()}", timeout_s=0.5)
    assert isinstance(connect(cluster.url), RedisCluster)
    assert isinstance(connect(redis_server), redis.Redis)


def _closed_port() -> int:
    from subspace_store.embedded import free_port

    return free_port()


def test_job_files_accept_a_cluster_url() -> None:
    from jobs.schema import StoreConfig

    assert StoreConfig(redis_url="redis+cluster://10.0.0.5:7000").problems() == []
    assert StoreConfig(redis_url="rediss+cluster://:pw@10.0.0.5:7000").problems() == []
    assert StoreConfig(redis_url="cluster://10.0.0.5:7000").problems()
