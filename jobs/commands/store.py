"""Store commands: the embedded Redis and the versions it holds.

sharecl store start|stop|status          embedded redis-server in <data dir>/redis
sharecl namespaces [--json]              every namespace: head, versions, tasks, submissions, last activity
sharecl versions [--json]
sharecl show VERSION|TAG [--json]
sharecl tag VERSION NAME / sharecl untag NAME
sharecl pull VERSION|TAG [--task NAME ...] -o DIR [--format share|peft] [--layout L] [--base-model M]
sharecl push SUBSPACE_DIR [--meta KEY=VALUE ...] [--tag NAME] [--replace]
sharecl prune --keep N [--dry-run]

Every command takes --redis-url (default $SHARECL_REDIS_URL, else the embedded server, started if
needed) and, but for ``namespaces``, --namespace (default $SHARECL_NAMESPACE, else "default"). A command
that finds its namespace empty names the namespaces that hold versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.commands.offline import PULLED_FROM, add_export_options, export_task
from jobs.commands.options import add_store_options, namespace
from jobs.errors import CLIError
from subspace_store.tracking import mirror_tag


def _common(*, with_namespace: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_store_options(parent, with_namespace=with_namespace)
    return parent


_REF_HELP = "a version id (v3), a tag (prod), or head"


def register(subparsers: argparse._SubParsersAction) -> None:
    common = _common()
    store = subparsers.add_parser(
        "store",
        parents=[common],
        help="start, stop or inspect the embedded Redis",
        description="Manage the embedded redis-server that holds the versions when no --redis-url or "
        "$SHARECL_REDIS_URL is set (its data in $SHARECL_HOME/redis). Other commands start it on their own.",
    )
    store.add_argument(
        "action",
        choices=["start", "stop", "status"],
        help="start it (if it is not running), stop it (data kept), or show its address and memory",
    )
    store.add_argument("--port", type=int, default=None, help="port for `start` (default: a free one)")
    store.set_defaults(func=_guard(run_store))

    namespaces = subparsers.add_parser(
        "namespaces",
        parents=[_common(with_namespace=False)],
        help="list the namespaces in the store: head, versions, tasks, last activity",
        description="List every namespace of the Redis that holds a version or a submission (each job writes to "
        "its own: store.namespace of the job file, demo-<time> for the demo), with its head, number of versions, "
        "the head's tasks, submissions and last activity. Pass one to other commands with --namespace NAME.",
    )
    namespaces.add_argument("--json", action="store_true", help="print one JSON list")
    namespaces.set_defaults(func=_guard(run_namespaces))

    versions = subparsers.add_parser(
        "versions",
        parents=[common],
        help="list the subspace versions of a namespace",
        description="List the committed versions of a namespace, oldest first: created, parent, tasks, k, size, "
        "and which is the head, tagged or pinned by a running job.",
    )
    versions.add_argument("--json", action="store_true", help="print one JSON list")
    versions.set_defaults(func=_guard(run_versions))

    show = subparsers.add_parser(
        "show",
        parents=[common],
        help="show one version: metadata, modules, tasks",
        description="Show one version's manifest readably: where it comes from (created, parent, merged "
        "submissions, metadata such as the MLflow run), its modules with k, and its tasks with their "
        "reconstruction error and error bound. --json prints the whole manifest for scripts.",
    )
    show.add_argument("ref", metavar="VERSION|TAG", help=_REF_HELP)
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(func=_guard(run_show))

    tag = subparsers.add_parser(
        "tag",
        parents=[common],
        help="point a tag (prod, canary, ...) at a version",
        description="Point tag NAME at a version, moving it if it exists. Tagged versions are never pruned; "
        "deployments follow a tag (`sharecl pull prod`, subspace_store.TagFollower).",
    )
    tag.add_argument("ref", metavar="VERSION", help=_REF_HELP)
    tag.add_argument("name", metavar="NAME", help="the tag: letters, digits, '_', '.', '-' (e.g. prod)")
    tag.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI whose registry alias follows the tag")
    tag.set_defaults(func=_guard(run_tag))

    untag = subparsers.add_parser(
        "untag", parents=[common], help="delete a tag", description="Delete a tag (the version stays)."
    )
    untag.add_argument("name", metavar="NAME", help="the tag to delete")
    untag.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI whose registry alias follows the tag")
    untag.set_defaults(func=_guard(run_untag))

    pull = subparsers.add_parser(
        "pull",
        parents=[common],
        help="write a version (or some tasks) to a folder",
        description="Write a version to a folder: as a subspace folder (--format share; `sharecl export`, "
        "`sharecl add` and `sharecl info` read it), or each task as a PEFT LoRA adapter with its model card "
        "(--format peft).",
    )
    pull.add_argument("ref", metavar="VERSION|TAG", help=_REF_HELP)
    pull.add_argument(
        "--task", dest="tasks", action="append", default=None, metavar="NAME", help="only this task (repeatable)"
    )
    pull.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write (new or empty)")
    pull.add_argument(
        "--format",
        choices=["share", "peft"],
        default="share",
        help="share: a subspace folder (default); peft: a PEFT LoRA folder (DIR for one task, else DIR/<task>)",
    )
    add_export_options(pull)
    pull.add_argument(
        "--mlflow-uri",
        default=None,
        help="peft: where the model card reads each task's accuracy at this version (default: $MLFLOW_TRACKING_URI, "
        "else the sqlite default if it exists)",
    )
    pull.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    pull.set_defaults(func=_guard(run_pull))

    push = subparsers.add_parser(
        "push",
        parents=[common],
        help="publish a subspace folder as a new version",
        description="Publish a subspace folder (from compress, add or pull) as the namespace's new head version.",
    )
    push.add_argument("folder", metavar="SUBSPACE_DIR", help="subspace folder to publish")
    push.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="version metadata (repeatable)")
    push.add_argument("--tag", default=None, metavar="NAME", help="also point this tag at the new version")
    push.add_argument(
        "--replace",
        action="store_true",
        help="allow the new version to drop tasks that the head holds (by default such a push is refused)",
    )
    push.set_defaults(func=_guard(run_push))

    prune = subparsers.add_parser(
        "prune",
        parents=[common],
        help="delete old versions (never the head, a tagged or a pinned one)",
        description="Delete all but the newest N versions of a namespace; the head, tagged versions and versions "
        "pinned by running jobs are always kept.",
    )
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="keep the newest N versions")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    prune.set_defaults(func=_guard(run_prune))


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn Redis protocol/connection errors that escape the library into one-line CLI errors."""

    def run(args: argparse.Namespace) -> int:
        import redis

        from subspace_store import redact

        try:
            return func(args)
        except redis.RedisError as err:
            where = redact(args.redis_url) if args.redis_url else "the configured Redis"
            raise CLIError(f"Redis error at {where}: {err}; check the server with `sharecl store status`") from None

    return run


def _embedded_folder() -> Path:
    from subspace_store.home import embedded_redis_folder

    return embedded_redis_folder()


def _url(args: argparse.Namespace) -> str | None:
    """The Redis URL the options or the environment name; None: the embedded server."""
    from subspace_store.connection import configured_url

    return configured_url(args.redis_url)


def _open(args: argparse.Namespace, *, need_versions: bool = False) -> Any:
    """The namespace's store; with ``need_versions``, a namespace without a version is an error that names
    the namespaces holding versions."""
    from subspace_store import SubspaceStore, connect

    store = SubspaceStore(connect(args.redis_url), namespace(args))
    if need_versions and store.head() is None:
        raise CLIError(empty_namespace_message(store.client, store.namespace))
    return store


def empty_namespace_message(client: Any, name: str) -> str:
    """ "namespace 'x' holds no version", with the namespaces that hold one (or how to make one)."""
    from subspace_store import SubspaceStore
    from subspace_store.store import list_namespaces

    others = [n for n in list_namespaces(client) if n != name and _has_head(SubspaceStore(client, n))]
    if not others:
        return (
            f"namespace {name!r} holds no version, nor does any other namespace of this Redis; run a job "
            "(`sharecl submit JOB.yaml`, `sharecl demo`) or publish a subspace folder with `sharecl push SUBSPACE_DIR`"
        )
    shown = ", ".join(others[:10]) + (f", ... ({len(others)} in all: `sharecl namespaces`)" if len(others) > 10 else "")
    return (
        f"namespace {name!r} holds no version; namespaces with versions: {shown}; pass --namespace NAME "
        "(or set $SHARECL_NAMESPACE)"
    )


def _has_head(store: Any) -> bool:
    """Whether ``store``'s namespace has a head; one whose head key was damaged is left out here (it is
    another namespace's problem, reported by the commands that read it)."""
    from subspace_store import StoreError

    try:
        return store.head() is not None
    except StoreError:
        return False


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- store start|stop|status ------------------------------------------------------------------
def run_store(args: argparse.Namespace) -> int:
    from subspace_store import connect, redact
    from subspace_store.embedded import ensure_running, running_server, stop_embedded

    url = _url(args)
    folder = _embedded_folder()
    if args.action in ("start", "stop") and url:
        raise CLIError(
            f"`sharecl store {args.action}` manages the embedded Redis, but a Redis URL is set "
            f"({redact(url)}); unset --redis-url / SHARECL_REDIS_URL, or manage that server yourself"
        )
    if args.action == "start":
        before = running_server(folder)
        server = before or ensure_running(folder, port=args.port)
        state = "already running" if before else "started"
        print(f"embedded Redis {state}: {redact(server.url)} (pid {server.pid}, data in {folder})")
        print(f"password in {folder / 'password'}; other commands find this server on their own")
        return 0
    if args.action == "stop":
        stopped = stop_embedded(folder)
        print(f"embedded Redis stopped (data kept in {folder})" if stopped else "embedded Redis was not running")
        return 0
    if url:
        client = connect(url)
        where = redact(url)
    else:
        server = running_server(folder)
        if server is None:
            print(f"embedded Redis: not running (data folder {folder}); start it with `sharecl store start`")
            return 1
        client = server.client()
        where = f"{redact(server.url)} (embedded, pid {server.pid}, data in {folder})"
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return _cluster_status(client, where)
    info = client.info()
    print(f"Redis {info.get('redis_version')} at {where}")
    print(f"  memory used: {info.get('used_memory_human')}, keys: {client.dbsize()}")
    print(f"  append-only persistence: {'on' if info.get('aof_enabled') else 'off'}")
    return 0


def _cluster_status(client: Any, where: str) -> int:
    """A line per master (a namespace's payloads lie on all of them); 1 if one does not answer."""
    import redis

    masters = sorted(client.get_primaries(), key=lambda node: (node.host, node.port))
    lines, total, down = [], 0, 0
    for node in masters:
        try:
            info = client.info(target_nodes=node)
            keys = int(client.dbsize(target_nodes=node))
        except (redis.RedisError, OSError) as err:
            down += 1
            lines.append(f"  {node.host}:{node.port}: not answering ({type(err).__name__}: {err})")
            continue
        total += keys
        lines.append(
            f"  {node.host}:{node.port}: Redis {info.get('redis_version')}, memory used "
            f"{info.get('used_memory_human')}, keys {keys}, append-only persistence "
            f"{'on' if info.get('aof_enabled') else 'off'}"
        )
    answered = f"{total} keys on the {len(masters) - down} answering" if down else f"{total} keys in all"
    print(f"Redis Cluster at {where}: {len(masters)} master(s), {answered}")
    print("\n".join(lines))
    if down:
        print(f"{down} master(s) not answering: their slots' keys cannot be read or written until they are back")
    return 1 if down else 0


# -- namespaces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NamespaceRow:
    """One namespace of the store, as ``sharecl namespaces`` and ``sharecl status`` list it."""

    namespace: str
    head: str | None
    versions: int
    tasks: list[str]  # the head's
    submissions: int
    waiting: int  # submissions not yet merged or rejected
    last_activity: float | None  # unix seconds: the newest version or submission


def namespace_rows(client: Any) -> list[NamespaceRow]:
    """Every namespace of the Redis behind ``client`` that holds a version or a submission."""
    from subspace_store import SubmissionStream, SubspaceStore
    from subspace_store.store import list_namespaces

    rows = []
    for name in list_namespaces(client):
        store, stream = SubspaceStore(client, name), SubmissionStream(client, name)
        head = store.head()
        manifest = store.manifest(head) if head else None
        subs = stream.summary(last=1)  # counts; (last=0 would ask Redis for 0 entries, an error)
        newest = stream.latest_id()
        times = [manifest["created"]] if manifest else []
        if newest:
            times.append(int(newest.split("-", 1)[0]) / 1000.0)  # a stream id starts with its time in ms
        rows.append(
            NamespaceRow(
                namespace=name,
                head=head,
                versions=store.version_count(),
                tasks=list(manifest["tasks"]) if manifest else [],
                submissions=subs.total,
                waiting=subs.pending + subs.queued,
                last_activity=max(times, default=None),
            )
        )
    return rows


def print_namespaces(rows: list[NamespaceRow], where: str) -> None:
    """The namespaces as a table, then how to look into one."""
    if not rows:
        print(
            f"no namespace of {where} holds a version or a submission yet; run a job (`sharecl submit JOB.yaml`, "
            "`sharecl demo`) or publish a subspace folder (`sharecl push SUBSPACE_DIR --namespace NAME`)"
        )
        return
    width = max(len("namespace"), *(len(r.namespace) for r in rows))
    print(f"{'namespace':<{width}}  {'head':<6} {'versions':>8} {'tasks':>5} {'submissions':>17}  last activity")
    for r in rows:
        subs = f"{r.submissions}" + (f" ({r.waiting} waiting)" if r.waiting else "")
        when = _when(r.last_activity) if r.last_activity is not None else "-"
        print(f"{r.namespace:<{width}}  {r.head or '-':<6} {r.versions:>8} {len(r.tasks):>5} {subs:>17}  {when}")
    example = next((r.namespace for r in reversed(rows) if r.head), rows[-1].namespace)
    print(
        f"look into one with --namespace NAME (or export SHARECL_NAMESPACE=NAME), e.g. "
        f"`sharecl versions --namespace {example}`, `sharecl status --namespace {example}`"
    )


def _where(args: argparse.Namespace) -> str:
    from subspace_store import redact

    url = _url(args)
    return f"the Redis at {redact(url)}" if url else "the embedded Redis"


def run_namespaces(args: argparse.Namespace) -> int:
    from subspace_store import connect

    rows = namespace_rows(connect(args.redis_url))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print_namespaces(rows, _where(args))
    return 0


def status_of_every_namespace(args: argparse.Namespace) -> int:
    """``sharecl status`` without a namespace: the namespaces (JSON: ``{"namespaces": [...]}``), then how to
    see one's jobs, submissions and versions."""
    from subspace_store import connect

    rows = namespace_rows(connect(args.redis_url))
    if args.json:
        print(json.dumps({"namespace": None, "namespaces": [asdict(r) for r in rows]}, indent=2))
        return 0
    print_namespaces(rows, _where(args))
    if rows:
        print("status of one namespace (its jobs, tasks, submissions): sharecl status --namespace NAME")
    return 0


# -- versions / show / tag --------------------------------------------------------------------
def run_versions(args: argparse.Namespace) -> int:
    store = _open(args)
    rows = store.list_versions()
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    if not rows:
        print(empty_namespace_message(store.client, store.namespace))
        return 0
    print(f"{'version':<9} {'created':<19} {'parent':<7} {'tasks':>5} {'k (min-max)':>11} {'size':>10}  tags / pins")
    for r in rows:
        ks = [k for pair in r.k.values() for k in pair] or [0]
        marks = (["HEAD"] if r.is_head else []) + r.tags + [f"pin:{j}" for j in r.pins]
        print(
            f"{r.version:<9} {_when(r.created):<19} {r.parent or '-':<7} {len(r.tasks):>5} "
            f"{f'{min(ks)}-{max(ks)}':>11} {_size(r.bytes):>10}  {', '.join(marks)}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    store = _open(args, need_versions=True)
    m = store.manifest(args.ref)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    marks = (["HEAD"] if m["version"] == store.head() else []) + [
        f"tag {t}" for t, v in sorted(store.tags().items()) if v == m["version"]
    ]
    policy = ", ".join(f"{k} {v}" for k, v in m["policy"].items() if v is not None) or "-"
    fields = [
        ("version", m["version"] + (f" ({', '.join(marks)})" if marks else "")),
        ("namespace", m["namespace"]),
        ("created", f"{_when(m['created'])} ({m['created_iso']})"),
        ("parent", m["parent"] or "- (first version)"),
        ("payloads", _size(m["bytes"])),
        ("policy", policy),
        ("submissions", ", ".join(m["submissions"]) or "-"),
    ]
    _aligned([*fields, ("metadata", "" if m["metadata"] else "-")])
    _print_mapping(m["metadata"], indent=2)
    print(f"modules ({len(m['modules'])}):")
    _table(
        ["module", "shape (out x in)", "k_A", "k_B"],
        [[name, f"{e['out_features']}x{e['in_features']}", e["k_A"], e["k_B"]] for name, e in m["modules"].items()],
    )
    print(f"tasks ({len(m['tasks'])}):")
    _table(
        ["task", "reconstruction error", "error bound", "head", "size"],
        [
            [
                name,
                _num(e["reconstruction_error"]),
                _num(e["metadata"].get("error_bound")),
                ", ".join(e["head"]) or "-",
                _size(e["bytes"]),
            ]
            for name, e in m["tasks"].items()
        ],
    )
    return 0


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _shown(value: Any) -> str:
    """A metadata value on one line: strings as they are, floats to 4 significant digits (``--json`` has them
    exact), anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return json.dumps(value)


def _aligned(fields: list[tuple[str, Any]], indent: int = 0) -> None:
    """``key: value`` lines, the values in one column."""
    width = max(len(key) for key, _ in fields)
    for key, value in fields:
        print(f"{' ' * indent}{key + ':':<{width + 1}} {value}".rstrip())


def _print_mapping(mapping: dict[str, Any], indent: int) -> None:
    """A nested mapping as indented ``key: value`` lines, each level's values aligned (as YAML would nest it)."""
    leaves = [(str(k), _shown(v)) for k, v in mapping.items() if not (isinstance(v, dict) and v)]
    if leaves:
        _aligned(leaves, indent)
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            _print_mapping(value, indent + 2)


def _table(header: list[str], rows: list[list[Any]]) -> None:
    """Left-aligned text columns, right-aligned numbers, indented two spaces."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(header))]
    for row in cells:
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(parts).rstrip())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


def run_tag(args: argparse.Namespace) -> int:
    store = _open(args, need_versions=True)
    version = store.tag(args.ref, args.name)
    print(f"{args.name} -> {version}")
    # The store is the truth; the MLflow registry mirrors the tag as an alias (models:/sharecl-NS@TAG).
    print(mirror_tag(store.namespace, args.name, version, args.mlflow_uri).message)
    return 0


def run_untag(args: argparse.Namespace) -> int:
    store = _open(args, need_versions=True)
    if not store.untag(args.name):
        raise CLIError(f"no tag {args.name!r} in namespace {store.namespace!r}; see `sharecl versions`")
    print(f"tag {args.name} deleted")
    print(mirror_tag(store.namespace, args.name, None, args.mlflow_uri).message)
    return 0


# -- pull / push / prune ----------------------------------------------------------------------
def _check_output(folder: Path, overwrite: bool) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise CLIError(f"{folder} exists and is not empty; pass --overwrite or choose another folder")


def _inside(out: Path, name: str) -> Path:
    """``out / name``, refused unless it resolves inside ``out`` (symlinks followed): nothing is written elsewhere."""
    from share.subspace import check_task_name

    check_task_name(name)  # already checked when the manifest was read; a path is never built from an unchecked name
    target = out / name
    if not target.resolve().is_relative_to(out.resolve()) or target.resolve() == out.resolve():
        raise CLIError(
            f"task {name!r} would be written to {target.resolve()}, outside the output folder {out}; "
            f"remove what {target} leads to, or choose another folder with -o"
        )
    return target


def run_pull(args: argparse.Namespace) -> int:
    from share.folders import write_folder
    from share.model_card import task_fingerprint

    out = Path(args.output)
    _check_output(out, args.overwrite)
    store = _open(args, need_versions=True)
    version = store.resolve(args.ref)
    # Every name in the manifest is checked as it is read (full matches), before any path is built here.
    subspace = store.get(version, tasks=args.tasks)
    if args.format == "share":
        # What `sharecl export` names the folder's tasks by; it is dropped if the folder changes (`sharecl add`).
        subspace.metadata[PULLED_FROM] = {
            "namespace": store.namespace,
            "version": version,
            "tasks": {task: task_fingerprint(subspace, task) for task in subspace.tasks},
        }
        subspace.save(out, overwrite=True)
        print(f"{version} ({len(subspace.tasks)} task(s)) -> {out}")
        return 0
    tasks = list(subspace.tasks)
    if not tasks:
        raise CLIError(f"version {version} holds no task to export")
    if len(tasks) > 1:
        for task in tasks:
            _inside(out, task)  # every name checked before anything is written
    manifest = store.manifest(version)
    every_task = {name: entry.get("metadata", {}) for name, entry in manifest["tasks"].items()}
    accuracy = _accuracy_at(manifest, args.mlflow_uri)
    done: list[str] = []

    def export(task: str, target: Path) -> None:
        extra = []
        if task in accuracy:
            from share.model_card import CardMetric

            measured = "at this version: the coordinator served the task from it on its eval split after the merge"
            extra.append(CardMetric("accuracy", accuracy[task], measured))
        _, layout, card = export_task(
            subspace,
            task,
            target,
            layout=args.layout,
            base_model=args.base_model,
            task_metadata=every_task,
            namespace=store.namespace,
            version=version,
            extra_metrics=extra,
        )
        where = f"for {layout.auto_class}" if layout.auto_class else "names as trained"
        final = out if len(tasks) == 1 else out / task
        done.append(f"{version} task {task} -> {final} (PEFT LoRA {where}; {card.adapter_id})")

    def export_all(folder: Path) -> None:
        for task in tasks:
            export(task, folder / task)

    if len(tasks) == 1:
        export(tasks[0], out)  # export_peft swaps the whole folder in, or leaves -o as it was
    else:
        # Every task into one temporary folder, swapped in at the end: a task that fails to export (a head that
        # does not fit the layout, say) leaves -o as it was, never holding only the tasks exported before it.
        write_folder(out, export_all, overwrite=args.overwrite)
    print("\n".join(done))
    return 0


def _accuracy_at(manifest: dict[str, Any], uri: str | None) -> dict[str, float]:
    """Each task's accuracy that the coordinator logged on the merge run of this version (MLflow), if any.

    Best effort: the evaluation runs after the version is published, and MLflow may be elsewhere; the
    default sqlite store is read only if it exists (never created by a pull).
    """
    from coordinator.record import RUN_ID_KEY
    from subspace_store.tracking import ACCURACY_METRIC, default_mlflow_uri, resolve_mlflow_uri

    run_id = manifest.get("metadata", {}).get(RUN_ID_KEY)
    if not isinstance(run_id, str) or not run_id:
        return {}
    resolved = resolve_mlflow_uri(uri)
    if resolved == default_mlflow_uri() and not Path(resolved.removeprefix("sqlite:///")).is_file():
        return {}
    try:
        from workers import tracking

        metrics = tracking.client(resolved).get_run(run_id).data.metrics
    except Exception as err:  # the card is still worth writing without it
        print(f"note: no accuracy from MLflow at {resolved} ({type(err).__name__}); the card omits it", file=sys.stderr)
        return {}
    return {k[len(ACCURACY_METRIC) :]: float(v) for k, v in metrics.items() if k.startswith(ACCURACY_METRIC)}


def _parse_meta(items: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--meta {item!r}: use KEY=VALUE")
        meta[key] = value
    return meta


def _dropped(store: Any, head: str | None, tasks: list[str], replace: bool) -> list[str]:
    """Tasks of ``head`` that the pushed folder lacks; refused (naming them) unless ``replace``."""
    if head is None:
        return []
    dropped = [t for t in store.manifest(head)["tasks"] if t not in tasks]
    if dropped and not replace:
        raise CLIError(
            f"the folder lacks task(s) {', '.join(map(repr, dropped))} that the head {head} holds; pushing it "
            "would drop them from the head. Pass --replace to drop them, or add them to the folder "
            "(`sharecl pull head -o DIR` and merge)"
        )
    return dropped


def run_push(args: argparse.Namespace) -> int:
    from share import Subspace
    from subspace_store import HeadConflictError
    from subspace_store.tags import check_tag_name

    # Every argument is checked before anything is published: a failure after publishing would
    # leave a version that a retry publishes again.
    meta = {"pushed_from": str(Path(args.folder).resolve()), **_parse_meta(args.meta)}
    if args.tag is not None:
        check_tag_name(args.tag)
    subspace = Subspace.load(args.folder)
    subspace.metadata.pop(PULLED_FROM, None)  # the new version is not the one the folder was pulled as
    store = _open(args)
    for attempt in range(5):
        head = store.head()
        dropped = _dropped(store, head, list(subspace.tasks), args.replace)
        try:
            # The folder does not derive from any version; its parent is just the head it lands on.
            version = store.publish(subspace, parent=head, metadata=meta)
            break
        except HeadConflictError:
            if attempt == 4:
                raise
    drops = f"; drops {', '.join(dropped)} (--replace)" if dropped else ""
    print(f"published {version} ({len(subspace.tasks)} task(s), parent {head or '-'}{drops})")
    if args.tag:
        store.tag(version, args.tag)
        print(f"{args.tag} -> {version}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    store = _open(args, need_versions=True)
    result = store.prune(args.keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(result.removed)} version(s): {', '.join(result.removed) or '-'}")
    for version, why in result.kept.items():
        print(f"  kept {version}: {', '.join(why)}")
    if result.orphans:
        print(f"  swept payloads of unfinished publishes: {', '.join(result.orphans)}", file=sys.stderr)
    return 0
