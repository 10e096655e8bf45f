"""The store's CLI commands, run in-process against real Redis servers."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.cli import main
from share import Subspace, merge


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
    assert "layer.0.query  24x16" in out and "reconstruction error" in out and "\n  mlflow_run_id: r1\n" in out
    assert json.loads(cli("show", "v2", "--json")[1])["parent"] == "v1"

    assert cli("tag", "v2", "canary")[1].splitlines()[0] == "canary -> v2"
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


# -- namespaces: listed, named when a command's namespace is empty, status without one ---------------------


@pytest.fixture
def private_cli(cli, private_redis, monkeypatch):
    """The CLI on a Redis of this test's own (so the namespaces listed are exactly this test's), no namespace set:
    ``cli`` with its environment set over (this fixture's setup runs after ``cli``'s)."""
    monkeypatch.setenv("SHARECL_REDIS_URL", private_redis.url)
    monkeypatch.delenv("SHARECL_NAMESPACE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(private_redis.folder / "mlflow.db"))
    return cli


def _three_namespaces(url: str, make_adapter) -> dict[str, object]:
    """wordnet: v1 (a, b) then v2 (a, b, c); demo-1: v1 (a, b); queued: one submission, no version."""
    from subspace_store import Submission, SubmissionStream, SubspaceStore, connect

    client = connect(url)
    first, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    second, _ = merge(first, {"c": make_adapter(2)})
    wordnet = SubspaceStore(client, "wordnet")
    wordnet.publish(second, parent=wordnet.publish(first, parent=None))
    SubspaceStore(client, "demo-1").publish(first, parent=None)
    queued = SubmissionStream(client, "queued")
    sid = queued.submit(Submission("z", adapter=make_adapter(3), base_version=None))
    return {"client": client, "wordnet": wordnet, "submission": sid}


def test_namespaces_lists_each_with_head_versions_tasks_and_activity(private_cli, private_redis, make_adapter) -> None:
    made = _three_namespaces(private_redis.url, make_adapter)
    code, out, _ = private_cli("namespaces")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["namespace", "head", "versions", "tasks", "submissions", "last", "activity"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert list(rows) == ["demo-1", "queued", "wordnet"]
    assert rows["wordnet"][1:5] == ["v2", "2", "3", "0"] and rows["demo-1"][1:5] == ["v1", "1", "2", "0"]
    assert rows["queued"][1:7] == ["-", "0", "0", "1", "(1", "waiting)"]
    assert "--namespace" in lines[4]

    code, out, _ = private_cli("namespaces", "--json")
    listed = {row["namespace"]: row for row in json.loads(out)}
    assert listed["wordnet"]["tasks"] == ["a", "b", "c"] and listed["wordnet"]["versions"] == 2
    assert listed["wordnet"]["last_activity"] == made["wordnet"].manifest("head")["created"]
    submitted_ms = int(made["submission"].split("-")[0])
    assert listed["queued"] == {
        "namespace": "queued",
        "head": None,
        "versions": 0,
        "tasks": [],
        "submissions": 1,
        "waiting": 1,
        "last_activity": submitted_ms / 1000.0,
    }


def test_status_without_a_namespace_lists_every_namespace(private_cli, private_redis, make_adapter, monkeypatch):
    _three_namespaces(private_redis.url, make_adapter)
    code, out, _ = private_cli("status")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["demo-1", "queued", "wordnet"]
    assert "sharecl status --namespace NAME" in out and "jobs" not in out.splitlines()[0]
    shown = json.loads(private_cli("status", "--json")[1])
    assert shown["namespace"] is None and [n["namespace"] for n in shown["namespaces"]] == [
        "demo-1",
        "queued",
        "wordnet",
    ]

    # A namespace named by the option or the environment: that namespace's status, as before.
    for argv, env in ((["status", "--namespace", "wordnet"], None), (["status"], "wordnet")):
        if env:
            monkeypatch.setenv("SHARECL_NAMESPACE", env)
        code, out, _ = private_cli(*argv)
        assert code == 0 and out.startswith("namespace 'wordnet': head v2, 2 version(s)")


def test_a_command_on_an_empty_namespace_names_the_namespaces_with_versions(
    private_cli, private_redis, make_adapter, tmp_path
) -> None:
    code, out, _ = private_cli("versions")
    assert code == 0 and "nor does any other namespace" in out and "sharecl submit" in out
    code, out, _ = private_cli("namespaces")
    assert code == 0 and out.startswith("no namespace of the Redis at redis://")

    _three_namespaces(private_redis.url, make_adapter)
    named = (
        "namespace 'default' holds no version; namespaces with versions: demo-1, wordnet; pass --namespace NAME "
        "(or set $SHARECL_NAMESPACE)"
    )
    code, out, _ = private_cli("versions")
    assert (code, out) == (0, named + "\n")
    for argv in (
        ["show", "head"],
        ["show", "v3"],
        ["tag", "head", "prod"],
        ["untag", "prod"],
        ["pull", "prod", "-o", str(tmp_path / "out")],
        ["prune", "--keep", "1"],
    ):
        code, _, err = private_cli(*argv)
        assert (code, err) == (2, f"sharecl {argv[0]}: error: {named}\n"), argv
    assert not (tmp_path / "out").exists()
    code, _, err = private_cli("show", "head", "--namespace", "queued")  # submissions, but no version yet
    assert code == 2 and "namespace 'queued' holds no version; namespaces with versions: demo-1, wordnet;" in err


def test_list_namespaces_keeps_only_names_share_cl_could_have_written(private_redis, make_adapter) -> None:
    from subspace_store import SubspaceStore, connect
    from subspace_store.store import list_namespaces

    client = connect(private_redis.url)
    sub, _ = merge(None, {"a": make_adapter(0)})
    SubspaceStore(client, "real.ns-1").publish(sub, parent=None)
    for key in ("sharecl:{bad name}:head", "sharecl:{a}:b}:head", "sharecl:{}:head", "other:{x}:head", "sharecl:{y}:x"):
        client.set(key, b"v1")
    client.set("sharecl:{" + "n" * 65 + "}:head", b"v1")  # longer than a namespace may be
    assert list_namespaces(client) == ["real.ns-1"]


def test_show_prints_aligned_fields_and_tables_and_json_for_scripts(cli, redis_client, namespace, make_adapter) -> None:
    from subspace_store import SubspaceStore

    sub, _ = merge(None, {"a": make_adapter(0), "bb_long_name": make_adapter(1)})
    store = SubspaceStore(redis_client, namespace)
    metadata = {"mlflow_run_id": "r1", "job": {"id": "j1", "tasks": ["a", "b"], "variance": [0.123456, 1.0]}}
    store.publish(sub, parent=None, metadata=metadata)
    store.tag("v1", "prod")
    code, out, _ = cli("show", "prod")
    assert code == 0
    head, _, rest = out.partition("modules (2):\n")
    top, _, nested = head.partition("metadata:\n")
    fields = top.splitlines()
    assert len({len(line) - len(line.split(":", 1)[1].lstrip()) for line in fields}) == 1  # values in one column
    values = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in fields}
    assert values["version"] == "v1 (HEAD, tag prod)" and values["namespace"] == namespace
    assert values["parent"] == "- (first version)" and values["submissions"] == "-"
    # The metadata nests as YAML would, each level's values aligned; floats shown short (--json has them exact).
    assert nested.splitlines() == [
        "  mlflow_run_id: r1",
        "  job:",
        "    id:       j1",
        '    tasks:    ["a", "b"]',
        "    variance: [0.1235, 1]",
    ]
    modules, _, tasks = rest.partition("tasks (2):\n")
    assert modules.splitlines()[1].split() == ["layer.0.query", "24x16", "8", "8"]
    rows = [line.split() for line in tasks.splitlines()]
    assert rows[0] == ["task", "reconstruction", "error", "error", "bound", "head", "size"]
    manifest = store.manifest("v1")
    for row, (name, entry) in zip(rows[1:], manifest["tasks"].items(), strict=True):
        assert row[:4] == [
            name,
            f"{entry['reconstruction_error']:.3g}",
            f"{entry['metadata']['error_bound']:.3g}",
            "classifier.weight",
        ]
    assert json.loads(cli("show", "prod", "--json")[1]) == manifest


def test_an_empty_namespace_is_reported_even_when_another_namespace_head_is_damaged(cli, redis_client) -> None:
    """A damaged head elsewhere (here: not a version id) is that namespace's problem: listing an empty
    namespace still answers, naming the healthy namespaces only."""
    from subspace_store.keys import Keys

    broken = Keys("t-damaged-head").head
    redis_client.set(broken, b"../etc")
    try:
        code, out, err = cli("versions", "--namespace", "elsewhere-ns2")
        assert code == 0, err
        assert "namespace 'elsewhere-ns2' holds no version" in out and "t-damaged-head" not in out
    finally:
        redis_client.delete(broken)
