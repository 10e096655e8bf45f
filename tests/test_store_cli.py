"""The store's CLI commands, run in-process against real Redis servers."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.cli import main
from share import Subspace, merge


@pytest.fixture
def cli(redis_server, namespace, monkeypatch, capsys):
    monkeypatch.setenv("SHARECL_REDIS_URL", redis_server)
    monkeypatch.setenv("SHARECL_NAMESPACE", namespace)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_push_versions_show_tag_pull(cli, tmp_path, make_adapter) -> None:
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    sub.save(tmp_path / "sub")
    code, out, _ = cli("push", str(tmp_path / "sub"), "--meta", "mlflow_run_id=r1", "--tag", "prod")
    assert code == 0 and "published v1" in out and "prod -> v1" in out
    assert cli("push", str(tmp_path / "sub"))[0] == 0

    code, out, _ = cli("versions")
    assert code == 0 and "v1" in out and "prod" in out and "HEAD" in out.splitlines()[2]
    rows = json.loads(cli("versions", "--json")[1])
    assert [r["version"] for r in rows] == ["v1", "v2"] and rows[0]["metadata"]["mlflow_run_id"] == "r1"

    code, out, _ = cli("show", "prod")
    assert code == 0 and out.startswith("version:") and "v1 (tag prod)" in out.splitlines()[0]
    assert "layer.0.query  24x16" in out and "reconstruction error" in out and "metadata.mlflow_run_id: r1" in out
    assert json.loads(cli("show", "v2", "--json")[1])["parent"] == "v1"

    assert cli("tag", "v2", "canary")[1].strip() == "canary -> v2"
    code, _, err = cli("tag", "v9", "x")
    assert code == 2 and "no version v9" in err

    code, out, _ = cli("pull", "canary", "--task", "b", "-o", str(tmp_path / "pulled"))
    assert code == 0
    pulled = Subspace.load(tmp_path / "pulled")
    assert list(pulled.tasks) == ["b"]
    assert torch.equal(pulled.delta_weight("b", "layer.0.value"), sub.delta_weight("b", "layer.0.value"))
    code, _, err = cli("pull", "v1", "-o", str(tmp_path / "pulled"))
    assert code == 2 and "--overwrite" in err
    # A TaskNotFoundError is also a KeyError; it is still one line, its message unquoted.
    code, _, err = cli("pull", "v1", "--task", "nope", "-o", str(tmp_path / "nope"))
    assert (code, err) == (2, "sharecl pull: error: version v1 has no task 'nope'; it holds: a, b\n")

    code, out, _ = cli("pull", "v1", "--task", "a", "-o", str(tmp_path / "peft"), "--format", "peft")
    assert code == 0 and (tmp_path / "peft" / "adapter_config.json").is_file()

    code, out, _ = cli("prune", "--keep", "0", "--dry-run")
    assert code == 0 and "would delete 0" in out and "kept v1: tag prod" in out
    assert cli("untag", "prod")[0] == 0 and cli("untag", "prod")[0] == 2
    code, out, _ = cli("prune", "--keep", "0")  # v1 is neither head nor tagged any more
    assert code == 0 and "deleted 1 version(s): v1" in out and "kept v2: head, tag canary" in out
    assert [r["version"] for r in json.loads(cli("versions", "--json")[1])] == ["v2"]


@pytest.mark.parametrize(
    "command", [["versions"], ["pull", "v1", "-o", "x"], ["status"], ["adapters", "add", "dir"]], ids=lambda c: c[0]
)
def test_store_and_cluster_commands_take_the_same_store_options(command: list[str]) -> None:
    from jobs.cli import build_parser

    args = build_parser().parse_args([*command, "--redis-url", "redis://h:1/0", "--namespace", "ns"])
    assert (args.redis_url, args.namespace) == ("redis://h:1/0", "ns")
    args = build_parser().parse_args(command)
    assert (args.redis_url, args.namespace) == (None, None)  # None: the environment, then the default


def test_namespace_comes_from_the_option_then_the_environment(cli, tmp_path, make_adapter, monkeypatch) -> None:
    sub, _ = merge(None, {"a": make_adapter(0)})
    sub.save(tmp_path / "sub")
    assert cli("push", str(tmp_path / "sub"))[0] == 0  # into $SHARECL_NAMESPACE
    code, out, _ = cli("versions", "--namespace", "elsewhere-ns")
    assert code == 0 and "namespace 'elsewhere-ns' holds no version" in out
    assert [r["version"] for r in json.loads(cli("versions", "--json")[1])] == ["v1"]


def test_connection_errors_are_one_line(cli, monkeypatch) -> None:
    code, _, err = cli("versions", "--redis-url", "redis://:hunter2@127.0.0.1:1/0")
    assert code == 2 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in err and "hunter2" not in err
    code, _, err = cli("store", "start")
    assert code == 2 and "manages the embedded Redis" in err


def test_embedded_store_start_status_stop(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SHARECL_REDIS_URL", raising=False)
    monkeypatch.setenv("SHARECL_HOME", str(tmp_path / "home"))
    try:
        assert main(["store", "status"]) == 1
        assert "not running" in capsys.readouterr().out
        assert main(["store", "start"]) == 0
        assert "started" in capsys.readouterr().out
        assert main(["store", "start"]) == 0
        assert "already running" in capsys.readouterr().out
        assert main(["versions"]) == 0  # found the embedded server on its own
        assert "holds no version" in capsys.readouterr().out
        assert main(["store", "status"]) == 0
        out = capsys.readouterr().out
        assert "append-only persistence: on" in out and "***" in out
        password = (tmp_path / "home" / "redis" / "password").read_text().strip()
        assert password not in out
    finally:
        main(["store", "stop"])
    assert "stopped" in capsys.readouterr().out
    assert main(["store", "status"]) == 1
