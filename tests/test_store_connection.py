"""Connecting: wrong URL, wrong or missing password, Redis down, TLS mismatch; the embedded server."""

from __future__ import annotations

import pytest

from share import merge
from subspace_store import StoreConnectionError, SubspaceStore, connect, redact
from subspace_store.embedded import ensure_running, free_port, running_server, stop_embedded


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://:s3cret@db.example:6380/2") == "redis://:***@db.example:6380/2"
    assert redact("rediss://alice:s3cret@db.example/0") == "rediss://alice:***@db.example/0"
    assert redact("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_malformed_url_and_redis_down() -> None:
    with pytest.raises(StoreConnectionError, match=r"invalid Redis URL 'http://x:1'.*redis://"):
        connect("http://x:1")
    port = free_port()
    with pytest.raises(
        StoreConnectionError, match=rf"cannot reach Redis at redis://:\*\*\*@127.0.0.1:{port}/0"
    ) as info:
        connect(f"redis://:topsecret@127.0.0.1:{port}/0")
    assert "topsecret" not in str(info.value) and "sharecl store start" in str(info.value)


def test_wrong_and_missing_password_write_nothing(redis_factory, make_adapter) -> None:
    server = redis_factory(password="right-pass", appendonly=False)
    for url in (
        f"redis://:wrong-pass@127.0.0.1:{server.port}/0",
        f"redis://alice:wrong-pass@127.0.0.1:{server.port}/0",
        f"redis://127.0.0.1:{server.port}/0",
    ):
        with pytest.raises(StoreConnectionError, match="rejected the credentials.*PASSWORD") as info:
            connect(url)
        assert "wrong-pass" not in str(info.value) and "right-pass" not in str(info.value)
    client = connect(server.url)
    assert client.dbsize() == 0  # the failed attempts wrote nothing
    store = SubspaceStore(client, "ns")
    sub, _ = merge(None, {"a": make_adapter(0)})
    assert store.publish(sub, None) == "v1"


def test_rediss_against_a_plain_server_explains_tls(private_redis) -> None:
    with pytest.raises(StoreConnectionError, match="TLS"):
        connect(f"rediss://127.0.0.1:{private_redis.port}/0", timeout_s=0.5)


def test_embedded_server_is_started_once_reused_and_persistent(tmp_path, monkeypatch, make_adapter) -> None:
    monkeypatch.delenv("SHARECL_REDIS_URL", raising=False)
    folder = tmp_path / "home" / "redis"
    try:
        first = ensure_running(folder)
        assert first.password and (folder / "password").stat().st_mode & 0o077 == 0
        again = ensure_running(folder)
        assert (again.pid, again.port) == (first.pid, first.port)
        store = SubspaceStore(connect(folder=folder), "ns")  # no URL: the embedded server
        sub, _ = merge(None, {"a": make_adapter(0)})
        store.publish(sub, None)
        store.client.close()
        assert stop_embedded(folder) and running_server(folder) is None and not stop_embedded(folder)
        restarted = ensure_running(folder)
        assert restarted.pid != first.pid
        assert SubspaceStore(connect(restarted.url), "ns").head() == "v1"  # replayed from appendonly.aof
    finally:
        stop_embedded(folder)
