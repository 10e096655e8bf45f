"""The data folder and which services a process uses: explicit, else the environment, else the local default."""

from pathlib import Path

import pytest

from subspace_store import connection, home, tracking
from subspace_store.errors import StoreError


def test_data_dir_defaults_to_dot_sharecl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(home.HOME_ENV, raising=False)
    assert home.data_dir() == tmp_path / ".sharecl"
    assert (tmp_path / ".sharecl").is_dir()
    assert home.embedded_redis_folder() == tmp_path / ".sharecl" / "redis"
    assert tracking.default_mlflow_uri() == f"sqlite:///{tmp_path}/.sharecl/mlflow.db"
    assert tracking.default_mlflow_uri().startswith("sqlite:////")


def test_data_dir_follows_sharecl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(home.HOME_ENV, "state/here")
    assert home.data_dir() == tmp_path / "state" / "here"
    assert (tmp_path / "state" / "here").is_dir()


def test_an_unwritable_data_dir_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path / "file" / "home"))
    with pytest.raises(StoreError, match="set SHARECL_HOME to a writable folder"):
        home.data_dir()


def test_service_urls_prefer_explicit_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path))
    monkeypatch.delenv(connection.REDIS_URL_ENV, raising=False)
    monkeypatch.delenv(tracking.MLFLOW_URI_ENV, raising=False)
    assert connection.configured_url(None) is None
    assert tracking.resolve_mlflow_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv(connection.REDIS_URL_ENV, " redis://head:6380/0 ")
    monkeypatch.setenv(tracking.MLFLOW_URI_ENV, "http://head:5000")
    assert connection.configured_url(None) == "redis://head:6380/0"
    assert connection.resolve_url(None) == "redis://head:6380/0"  # configured: nothing is started
    assert tracking.resolve_mlflow_uri(None) == "http://head:5000"
    assert connection.configured_url("redis://x:1/0") == connection.resolve_url("redis://x:1/0") == "redis://x:1/0"
    assert tracking.resolve_mlflow_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
