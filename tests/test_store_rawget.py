"""The large-payload read path (GET into writable buffers, decoded in place) against real Redis."""

from __future__ import annotations

import os

import pytest
import redis
import torch

from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients
from subspace_store import CorruptPayloadError, SubspaceStore, connect
from subspace_store.rawget import RawGetter


def test_raw_get_matches_redis_get_and_keeps_the_connection_usable(redis_client, namespace) -> None:
    big, small = os.urandom(3 << 20), os.urandom(10)
    redis_client.set(f"{namespace}:big", big)
    redis_client.set(f"{namespace}:small", small)
    redis_client.hset(f"{namespace}:hash", "f", "v")
    with RawGetter(redis_client) as get:
        got = get(f"{namespace}:big")
        assert isinstance(got, memoryview) and not got.readonly and bytes(got) == big
        assert bytes(get(f"{namespace}:small")) == small
        assert get(f"{namespace}:missing") is None
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            get(f"{namespace}:hash")
        assert bytes(get(f"{namespace}:small")) == small  # the error reply was consumed whole
    assert redis_client.get(f"{namespace}:small") == small  # the pooled connection is still in sync


def _big_subspace() -> Subspace:
    """Bases of 2048 x 32 (512 KiB payload per module): pulled through the large-payload path."""
    gen = torch.Generator().manual_seed(0)
    modules = {
        m: ModuleBasis(
            U_A=torch.linalg.qr(torch.randn(2048, 32, generator=gen))[0].contiguous(),
            U_B=torch.linalg.qr(torch.randn(2048, 32, generator=gen))[0].contiguous(),
        )
        for m in ("l0.q", "l0.v")
    }
    E = {m: (torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)) for m in modules}
    return Subspace(modules=modules, tasks={"t": TaskCoefficients(E=E)}, policy=KPolicy(k=32))


def test_large_payloads_round_trip_in_place_and_detect_damage(private_redis) -> None:
    store = SubspaceStore(connect(private_redis.url), "ns")
    sub = _big_subspace()
    version = store.publish(sub, None)
    assert store.manifest(version)["modules"]["l0.q"]["bytes"] > 256 << 10
    got = store.get(version)
    for m, basis in sub.modules.items():
        assert torch.equal(got.modules[m].U_A, basis.U_A) and torch.equal(got.modules[m].U_B, basis.U_B)
    got.modules["l0.q"].U_A.mul_(2)  # pulled tensors are writable ...
    assert torch.equal(store.get(version).modules["l0.q"].U_A, sub.modules["l0.q"].U_A)  # ... and private

    key = store.manifest(version)["modules"]["l0.v"]["key"]
    data = bytearray(store.client.get(key))
    data[300_000] ^= 0x10
    store.client.set(key, bytes(data))
    with pytest.raises(CorruptPayloadError) as info:
        store.get(version)
    assert info.value.key == key and info.value.version == version
    assert torch.equal(store.get(version, verify=False).modules["l0.q"].U_A, sub.modules["l0.q"].U_A)


def test_raw_path_with_a_password(redis_factory) -> None:
    server = redis_factory(password="p4ss", appendonly=False)
    client = connect(server.url)
    client.set("k", b"x" * (1 << 20))
    with RawGetter(client) as get:
        assert bytes(get("k")) == b"x" * (1 << 20)
