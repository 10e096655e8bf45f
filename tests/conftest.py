"""Shared fixtures. Redis is a real ``redis-server`` that the tests start themselves.

- ``redis_server`` (session): URL of one server shared by the whole run (no password, no persistence).
  Tests keep apart by using their own namespace (``namespace`` fixture), never by flushing.
- ``redis_client``: a connected ``redis.Redis`` (bytes responses) for ``redis_server``.
- ``namespace``: a fresh namespace name per test.
- ``redis_factory(folder=None, **kwargs)``: starts servers of the test's own (``start_redis``
  arguments; append-only persistence in ``tmp_path`` by default), for tests that kill, restart or
  password-protect them; all are stopped afterwards.
- ``private_redis``: one such server.
- ``make_adapter(seed, ...)``: a random ``share.LoraAdapter`` (small shapes) for store/merge tests.
- ``mlflow_uri`` (module): a real MLflow sqlite store with its tables created.
- ``cli(*argv)``: runs ``sharecl`` in process against ``redis_server`` in ``namespace``; returns
  ``(exit code, stdout, stderr)``.

Plain helper functions shared by several test files are in ``helpers.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from share import LoraAdapter
from subspace_store.embedded import RedisServer, start_redis


@pytest.fixture(scope="session")
def _shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(_shared_redis: RedisServer) -> str:
    return _shared_redis.url


@pytest.fixture
def redis_client(redis_server: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def factory(folder: Path | None = None, **kwargs: Any) -> RedisServer:
        server = start_redis(folder or tmp_path / "redis", **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@pytest.fixture
def private_redis(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def make_adapter() -> Callable[..., LoraAdapter]:
    def make(
        seed: int,
        modules: tuple[str, ...] = ("layer.0.query", "layer.0.value"),
        n: int = 24,
        d: int = 16,
        r: int = 4,
        head: dict[str, tuple[int, ...]] | None = None,
    ) -> LoraAdapter:
        gen = torch.Generator().manual_seed(seed)
        factors = {m: (torch.randn(n, r, generator=gen), torch.randn(r, d, generator=gen)) for m in modules}
        heads = {k: torch.randn(*shape, generator=gen) for k, shape in (head or {"classifier.weight": (3, d)}).items()}
        return LoraAdapter(factors=factors, scaling={m: 2.0 for m in modules}, head=heads, metadata={"seed": seed})

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny linear algebra stalls with 2 threads on this shared 2-core machine (15x slower); restore after.

    Use per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(
    redis_server: str, namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``sharecl`` in process, with ``SHARECL_REDIS_URL``/``SHARECL_NAMESPACE`` set to this test's server and
    namespace: ``cli("versions", "--json")`` returns ``(exit code, stdout, stderr)``."""
    from jobs.cli import main

    monkeypatch.setenv("SHARECL_REDIS_URL", redis_server)
    monkeypatch.setenv("SHARECL_NAMESPACE", namespace)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow sqlite store, one per test module (creating its tables takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the tables once, up front
    return uri
