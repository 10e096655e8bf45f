"""Crashes: a publisher killed between writes, Redis killed and restarted, Redis gone mid-publish."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import redis

from share import merge
from subspace_store import StoreConnectionError, Submission, SubmissionStream, SubspaceStore, connect
from subspace_store.codec import encode_subspace
from subspace_store.store import _Publication

# Runs in a child process: write every payload of a new version, then die by SIGKILL before the commit.
_KILLED_PUBLISHER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from share import LoraAdapter, merge
    from subspace_store import SubspaceStore, connect
    from subspace_store.codec import encode_subspace
    from subspace_store.store import _Publication

    store = SubspaceStore(connect(sys.argv[1]), sys.argv[2])
    base = store.get()
    gen = torch.Generator().manual_seed(5)
    adapter = LoraAdapter(factors={m: (torch.randn(b.out_features, 4, generator=gen),
                                       torch.randn(4, b.in_features, generator=gen))
                                   for m, b in base.modules.items()})
    sub, _ = merge(base, {"doomed": adapter})
    publication = _Publication(store, encode_subspace(sub))
    print(publication.begin(), flush=True)
    publication.write_payloads()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_publisher_killed_between_writes_leaves_no_visible_version(redis_server, namespace, make_adapter) -> None:
    store = SubspaceStore(connect(redis_server), namespace)
    base, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(base, None)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_PUBLISHER, redis_server, namespace], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    doomed = child.stdout.strip()
    assert doomed == "v2"
    record = store.client.hget(store.keys.writing, doomed)
    assert record is not None  # its payloads exist, but nothing points at them
    assert store.head() == v1 and [i.version for i in store.list_versions()] == [v1]
    assert list(store.get().tasks) == ["a"]
    with pytest.raises(ValueError, match="no version v2"):
        store.get(doomed)

    # The next publish is unaffected (it gets v3), and prune sweeps the orphaned payloads.
    sub, _ = merge(base, {"b": make_adapter(1)})
    assert store.publish(sub, v1) == "v3"
    assert store.prune(keep=10, orphan_grace_s=3600).orphans == []  # too fresh to be called dead
    result = store.prune(keep=10, orphan_grace_s=0)
    assert result.orphans == [doomed] and result.removed == []
    assert store.client.keys(f"{store.keys.prefix}v:{doomed}:*") == [] and not store.client.hexists(
        store.keys.writing, doomed
    )
    assert list(store.get().tasks) == ["a", "b"]


def test_redis_restart_keeps_every_version_and_checksums(redis_factory, tmp_path, make_adapter) -> None:
    folder = tmp_path / "redis"
    server = redis_factory(folder)
    store = SubspaceStore(connect(server.url), "ns")
    stream = SubmissionStream(store.client, "ns")
    subs = {}
    sub, _ = merge(None, {"t0": make_adapter(0)})
    parent = None
    for i in range(1, 4):
        sub, _ = merge(sub, {f"t{i}": make_adapter(i)})
        parent = store.publish(sub, parent, {"i": i})
        subs[parent] = sub
    store.tag("v2", "prod")
    pending_id = stream.submit(Submission("late", make_adapter(7), parent))
    manifests = {v: store.manifest(v) for v in subs}

    server.kill()  # SIGKILL: no shutdown, no final flush beyond what Redis already wrote
    with pytest.raises(StoreConnectionError, match="cannot reach Redis"):
        connect(server.url)
    server = redis_factory(folder, port=server.port)

    store = SubspaceStore(connect(server.url), "ns")
    assert store.head() == "v3" and store.resolve("prod") == "v2"
    for version, expected in subs.items():
        assert store.manifest(version) == manifests[version]
        got = store.get(version)  # verifies every checksum
        assert list(got.tasks) == list(expected.tasks)
    stream = SubmissionStream(store.client, "ns")
    (late,) = stream.read("coordinator-1")
    assert late.id == pending_id and late.task == "late"


def test_redis_down_mid_publish_commits_nothing(redis_factory, tmp_path, make_adapter) -> None:
    folder = tmp_path / "redis"
    server = redis_factory(folder)
    store = SubspaceStore(connect(server.url), "ns")
    base, _ = merge(None, {"a": make_adapter(0)})
    v1 = store.publish(base, None)
    sub, _ = merge(base, {"b": make_adapter(1)})
    publication = _Publication(store, encode_subspace(sub))
    version = publication.begin()
    publication.write_payloads()
    server.kill()
    with pytest.raises((redis.ConnectionError, StoreConnectionError)):
        publication.commit(sub, v1, v1, {}, [], "coordinator")
    publication.abort()  # best effort: Redis is down, so this must not raise

    server = redis_factory(folder, port=server.port)
    store = SubspaceStore(connect(server.url), "ns")
    assert store.head() == v1 and [i.version for i in store.list_versions()] == [v1]
    assert store.prune(keep=5, orphan_grace_s=0).orphans == [version]
    assert store.client.keys(f"{store.keys.prefix}v:{version}:*") == []
