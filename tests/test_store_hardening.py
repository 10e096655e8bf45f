"""Issue 10 in the store and its CLI: names read from Redis never become paths outside ``-o`` (defect 2),
checksums are mandatory in stored manifests, ``push`` checks everything before it publishes and never
drops the head's tasks silently (defect 5), names are full matches (defect 7), and a closed stdout pipe
ends a command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from share import merge
from subspace_store import CorruptPayloadError, SubspaceStore, connect
from subspace_store.errors import StoreError
from subspace_store.keys import check_namespace, version_number
from subspace_store.tags import check_tag_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(redis_server, namespace) -> SubspaceStore:
    return SubspaceStore(connect(redis_server), namespace)


def _publish_two_tasks(store: SubspaceStore, make_adapter) -> str:
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    return store.publish(sub, None)


def _edit_manifest(store: SubspaceStore, version: str, edit) -> None:
    key = store.keys.manifest(version)
    manifest = json.loads(store.client.get(key))
    edit(manifest)
    store.client.set(key, json.dumps(manifest))


def _rename_task(manifest: dict[str, Any], old: str, new: str) -> None:
    manifest["tasks"] = {(new if name == old else name): entry for name, entry in manifest["tasks"].items()}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- defect 2: pull never writes outside -o ---------------------------------------------------------
@pytest.mark.parametrize("hostile", ["absolute", "../..", "..", "b/../../x", "b\n"])
def test_pull_refuses_a_manifest_task_named_like_a_path(cli, store, make_adapter, tmp_path, hostile) -> None:
    version = _publish_two_tasks(store, make_adapter)
    victim = tmp_path / "work" / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    name = str(victim) if hostile == "absolute" else hostile
    _edit_manifest(store, version, lambda m: _rename_task(m, "b", name))
    out = tmp_path / "work" / "deep" / "out"
    before = _tree(tmp_path)

    code, _, err = cli("pull", version, "-o", str(out), "--format", "peft", "--overwrite")

    assert code == 2 and "invalid task name" in err and version in err, err
    assert _tree(tmp_path) == before  # nothing written, nothing deleted
    assert not out.exists() and (victim / "keep.txt").read_text() == "precious"


def test_pull_refuses_a_manifest_whose_checksums_were_removed(cli, store, make_adapter, tmp_path) -> None:
    version = _publish_two_tasks(store, make_adapter)

    def strip(manifest: dict[str, Any]) -> None:
        for entry in [*manifest["modules"].values(), *manifest["tasks"].values()]:
            del entry["sha256"]

    _edit_manifest(store, version, strip)
    for fmt in ("peft", "share"):
        code, _, err = cli("pull", version, "-o", str(tmp_path / fmt), "--format", fmt)
        assert code == 2 and "'sha256'" in err and "missing" in err, err
        assert not (tmp_path / fmt).exists()
    with pytest.raises(CorruptPayloadError, match="sha256"):
        store.get(version, verify=False)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda m: m["modules"].update({"../x": m["modules"].pop("layer.0.query")}), "invalid module name"),
        (lambda m: m["tasks"]["a"].update(key="sharecl:{other}:v:v1:task:a"), "'key'"),
        (lambda m: m.update(version="v7"), "'version'"),
        (lambda m: m["tasks"]["a"].update(head=["/etc/passwd"]), "invalid head tensor name"),
        (lambda m: m["tasks"]["a"].update(p=[2]), "'p'"),  # format 3: one p per module, or one for all
        (lambda m: m["modules"]["layer.0.query"].update(sha256="0" * 63), "sha256"),
        (lambda m: m.update(tasks=[]), "'tasks'"),
        (lambda m: m.update(parent="../v1"), "'parent'"),
    ],
    ids=["module-path", "foreign-key", "version", "head-path", "p", "short-sha", "tasks-list", "parent"],
)
def test_every_manifest_field_read_from_redis_is_checked(store, make_adapter, edit, problem) -> None:
    version = _publish_two_tasks(store, make_adapter)
    _edit_manifest(store, version, edit)
    with pytest.raises(CorruptPayloadError, match=problem):
        store.get(version)
    with pytest.raises(CorruptPayloadError, match=problem):
        store.list_versions()


def test_a_tag_pointing_at_a_non_version_is_refused(store, make_adapter) -> None:
    _publish_two_tasks(store, make_adapter)
    store.client.hset(store.keys.tags, "prod", "../../etc")
    with pytest.raises(StoreError, match="not a version id"):
        store.get("prod")


def test_pull_output_paths_stay_under_o(cli, store, make_adapter, tmp_path) -> None:
    version = _publish_two_tasks(store, make_adapter)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").symlink_to(victim)  # a task folder that leads out of -o

    code, _, err = cli("pull", version, "-o", str(out), "--format", "peft", "--overwrite")

    assert code == 2 and "outside" in err and str(out) in err, err
    assert sorted(p.name for p in out.iterdir()) == ["b"] and (victim / "keep.txt").read_text() == "precious"


# -- defect 5: push checks everything first, never drops the head's tasks silently -------------------
@pytest.mark.parametrize("tag", ["head", "latest", "v3", "bad\n"])
def test_push_with_an_invalid_tag_publishes_nothing(cli, store, make_adapter, tmp_path, tag) -> None:
    sub, _ = merge(None, {"a": make_adapter(0)})
    sub.save(tmp_path / "sub")
    code, _, err = cli("push", str(tmp_path / "sub"), "--tag", tag)
    assert code == 2 and "tag" in err, err
    assert store.head() is None and store.list_versions() == []


def test_push_refuses_to_drop_the_heads_tasks_unless_replace(cli, store, make_adapter, tmp_path) -> None:
    both, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1), "c": make_adapter(2)})
    both.save(tmp_path / "abc")
    only_a, _ = merge(None, {"a": make_adapter(0)})
    only_a.save(tmp_path / "a")
    assert cli("push", str(tmp_path / "abc"))[0] == 0

    code, _, err = cli("push", str(tmp_path / "a"), "--tag", "prod")
    assert code == 2 and "'b', 'c'" in err and "--replace" in err, err
    assert store.head() == "v1" and store.tags() == {}

    code, out, _ = cli("push", str(tmp_path / "a"), "--replace", "--tag", "prod")
    assert code == 0 and "published v2" in out and "drops b, c" in out
    assert list(store.manifest("head")["tasks"]) == ["a"] and store.tags() == {"prod": "v2"}
    assert cli("push", str(tmp_path / "abc"))[0] == 0  # adding tasks needs no flag


# -- defect 7: names are full matches ----------------------------------------------------------------
def test_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(StoreError, match="invalid namespace"):
        check_namespace("default\n")
    with pytest.raises(StoreError, match="invalid tag"):
        check_tag_name("prod\n")
    assert version_number("v1\n") is None and version_number("v1") == 1


# -- a closed stdout pipe (`sharecl info DIR | head -1`) ---------------------------------------------
def _run_into_closed_pipe(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone, as `head -1` is once it has its line
    try:
        return subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
            timeout=300,
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_without_a_traceback(
    redis_server, namespace, store, make_adapter, tmp_path
) -> None:
    sub, _ = merge(None, {"a": make_adapter(0), "b": make_adapter(1)})
    sub.save(tmp_path / "sub")
    store.publish(sub, None)
    env = {**os.environ, "SHARECL_REDIS_URL": redis_server, "SHARECL_NAMESPACE": namespace}
    for argv in (["info", str(tmp_path / "sub")], ["versions"]):
        done = _run_into_closed_pipe(*argv, env=env)
        assert done.returncode == 141 and done.stderr == "", (argv, done.returncode, done.stderr)
