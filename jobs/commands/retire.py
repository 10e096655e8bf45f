"""Retiring tasks: ``sharecl remove``.

sharecl remove TASK... [--reason TEXT] [--wait [--timeout S] [--address ADDR]] [--namespace NS]
sharecl remove DIR --task TASK [--task ...] [-o OUT]

In a store, the request goes into the namespace's submission stream, so the coordinator carries it out
in order with the merges around it: it publishes a new version without the tasks, with every module's
bases refitted exactly to the remaining tasks (``share.remove_tasks``), and records the removal in that
version. Older versions keep the tasks until retention prunes them (``sharecl prune``; tagged and pinned
versions are never pruned). With ``--task``, the positional is a subspace folder, rewritten in place
(or written to ``-o OUT``) without the tasks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobs.commands.options import add_store_options, namespace
from jobs.errors import CLIError

_DEFAULT_TIMEOUT_S = 300.0


def register(subparsers: argparse._SubParsersAction) -> None:
    remove = subparsers.add_parser(
        "remove",
        help="retire tasks: publish a version without them (bases refitted to the remaining tasks)",
        description=(
            "Take tasks out of a namespace's subspace: the coordinator publishes a new version without them, "
            "its bases refitted exactly to the remaining tasks, in order with the merges around the request. "
            "Older versions keep the tasks until retention prunes them (`sharecl prune --keep N`; tagged and "
            "pinned versions are never pruned). With --task, the positional is a subspace folder instead."
        ),
    )
    remove.add_argument(
        "targets", nargs="+", metavar="TASK|DIR", help="tasks to remove from the store; with --task: one folder"
    )
    remove.add_argument(
        "--task",
        dest="tasks",
        action="append",
        default=None,
        metavar="NAME",
        help="remove this task from the folder DIR (repeatable); without it, TASK... name tasks of the store",
    )
    remove.add_argument("-o", "--output", default=None, metavar="OUT", help="with --task: write here, not in place")
    remove.add_argument("--overwrite", action="store_true", help="with -o: replace OUT if it is not empty")
    remove.add_argument("--reason", default=None, help="why (a customer left, ...): recorded in the new version")
    remove.add_argument(
        "--wait",
        action="store_true",
        help="start the namespace's coordinator (local Ray unless --address) and wait for the new version",
    )
    remove.add_argument(
        "--timeout",
        type=float,
        default=_DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"for --wait: how long to wait for the coordinator (default {_DEFAULT_TIMEOUT_S:.0f})",
    )
    remove.add_argument("--address", default=None, help="Ray address for --wait (default: a local Ray)")
    remove.add_argument(
        "--mlflow-uri", default=None, help="for --wait: default $MLFLOW_TRACKING_URI, else the sqlite default"
    )
    remove.add_argument("--experiment", default=None, help="for --wait: MLflow experiment (default: the namespace)")
    add_store_options(remove)
    remove.set_defaults(func=run_remove)


def run_remove(args: argparse.Namespace) -> int:
    import redis

    from subspace_store import redact

    try:
        return _run(args)
    except redis.RedisError as err:
        where = redact(args.redis_url) if args.redis_url else "the configured Redis"
        raise CLIError(f"Redis error at {where}: {err}; check the server with `sharecl store status`") from None


def _run(args: argparse.Namespace) -> int:
    if args.tasks:
        return _remove_from_folder(args)
    if args.output is not None:
        raise CLIError("-o/--output is for a folder (`sharecl remove DIR --task TASK -o OUT`); a store keeps versions")
    folders = [t for t in args.targets if (Path(t) / "manifest.json").is_file()]
    if folders:
        raise CLIError(
            f"{folders[0]} is a subspace folder; name the tasks to remove from it with --task "
            f"(`sharecl remove {folders[0]} --task TASK`)"
        )
    return _remove_from_store(args)


# ---------------------------------------------------------------- a folder


def _remove_from_folder(args: argparse.Namespace) -> int:
    from share import Subspace, remove_tasks

    if len(args.targets) != 1:
        raise CLIError(f"with --task, give one subspace folder, got {len(args.targets)}: {' '.join(args.targets)}")
    if args.wait:
        raise CLIError("--wait is for a store; a folder is rewritten at once")
    folder = Path(args.targets[0])
    subspace = Subspace.load(folder)
    reduced, report = remove_tasks(subspace, args.tasks)
    out = Path(args.output) if args.output is not None else folder
    if args.reason:
        reduced.metadata["removal_reason"] = args.reason
    reduced.save(out, overwrite=args.overwrite or out.resolve() == folder.resolve())
    print(f"removed {_names(args.tasks)} from {folder}; wrote {out} ({len(reduced.tasks)} task(s) left)")
    _print_k(report.k_before, report.k)
    _print_errors(report.reconstruction_error, report.error_bound, report.max_error)
    return 0


# ---------------------------------------------------------------- a store


def _remove_from_store(args: argparse.Namespace) -> int:
    from subspace_store import SubmissionStream, SubspaceStore, connect
    from subspace_store.stream import RemovalRequest

    tasks = list(args.targets)
    if len(set(tasks)) != len(tasks):
        raise CLIError(f"tasks repeat: {tasks}; name each task once")
    ns = namespace(args)
    client = connect(args.redis_url)
    store, stream = SubspaceStore(client, ns), SubmissionStream(client, ns)
    head = store.head()
    if head is None:
        raise CLIError(
            f"namespace {ns!r} holds no version: nothing to remove "
            "(`sharecl namespaces` lists the namespaces; pass --namespace NS)"
        )
    held = list(store.manifest(head)["tasks"])
    unknown = [t for t in tasks if t not in held]
    if unknown:
        raise CLIError(
            f"the head {head} of namespace {ns!r} holds no task {_names(unknown)} (it holds: {', '.join(held)}); "
            "a task still being merged can be removed once it is in the head (`sharecl status`)"
        )
    if len(tasks) == len(held):
        raise CLIError(
            f"removing {_names(tasks)} would leave the head {head} with no task; keep at least one "
            "(to start over, use a new --namespace)"
        )
    request = RemovalRequest(tasks, reason=args.reason, metadata={"requested_by": "sharecl remove"})
    sid = stream.submit_removal(request)
    print(f"requested the removal of {_names(tasks)} from namespace {ns!r} (request {sid}, head {head})")
    if not args.wait:
        print(
            f"the coordinator of namespace {ns!r} publishes a version without them when it runs (during any job, "
            "or now with `--wait`); see `sharecl status`"
        )
        _print_retention(store, tasks, published=False)
        return 0
    problem = _wait(args, ns)
    return _report(store, stream, sid, tasks, problem, args.timeout)


def _wait(args: argparse.Namespace, ns: str) -> str | None:
    """Run the namespace's coordinator until the stream is settled; a line saying why not, or None."""
    import ray

    from coordinator.actor import get_or_start_coordinator, stop_coordinator
    from subspace_store import resolve_url

    url = resolve_url(args.redis_url)
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
    try:
        coordinator = get_or_start_coordinator(ns, url, args.mlflow_uri, experiment=args.experiment or ns)
        try:
            ray.get(coordinator.flush.remote(args.timeout), timeout=args.timeout + 60)
        except (TimeoutError, ray.exceptions.RayError) as err:
            cause = getattr(err, "cause", None) or err
            lines = str(cause).strip().splitlines()
            return lines[0] if lines else type(cause).__name__
        return None
    finally:
        if owns:
            stop_coordinator(ns)  # this Ray goes away: let the coordinator end its MLflow runs first
            ray.shutdown()


def _report(store: Any, stream: Any, sid: str, tasks: list[str], problem: str | None, timeout: float) -> int:
    from coordinator.service import REMOVAL_KEY
    from subspace_store import SubmissionStatus

    state = stream.status(sid)
    if state.state is SubmissionStatus.REJECTED:
        print(f"removal request {sid} was rejected: {state.reason}")
        return 1
    if state.state is not SubmissionStatus.MERGED:
        print(
            f"removal request {sid} is still {state} after {timeout:.0f}s"
            + (f" ({problem})" if problem else "")
            + f"; see `sharecl status --namespace {store.namespace}`"
        )
        return 1
    manifest = store.manifest(state.version)
    removal = manifest["metadata"].get(REMOVAL_KEY, {})
    parent = manifest.get("parent")
    print(f"published {state.version} without {_names(tasks)} (parent {parent}, {len(manifest['tasks'])} task(s) left)")
    k_before = {m: tuple(k) for m, k in removal.get("k_before", {}).items()}
    k_after = {m: (e["k_A"], e["k_B"]) for m, e in manifest["modules"].items()}
    _print_k(k_before, k_after)
    bound = manifest["metadata"].get("coordinator", {}).get("max_error")
    _print_errors(removal.get("reconstruction_error", {}), removal.get("error_bound", {}), bound)
    _print_retention(store, tasks, published=True)
    return 0


def _print_k(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> None:
    for module, (k_A, k_B) in after.items():
        old = before.get(module)
        was = f"{old[0]}/{old[1]} -> " if old is not None else ""
        print(f"  {module}: k_A/k_B {was}{k_A}/{k_B}")


def _print_errors(errors: dict[str, float], bounds: dict[str, float], max_error: float | None) -> None:
    """Every remaining task's reconstruction error of this step and its cumulative bound."""
    print("remaining tasks (reconstruction error of this removal, cumulative error bound):")
    for task, error in errors.items():
        bound = bounds.get(task)
        over = max_error is not None and bound is not None and bound > max_error
        note = f"  OVER max_error {max_error:g}" if over else ""
        shown = f"{bound:.3g}" if bound is not None else "-"
        print(f"  {task}: {error:.3g} (bound {shown}){note}")


def _print_retention(store: Any, tasks: list[str], published: bool) -> None:
    """Which versions hold the tasks (and keep them until retention prunes them), and what protects them."""
    versions = store.list_versions()
    for task in tasks:
        holding = [info for info in versions if task in info.tasks]
        if not holding:
            continue
        protected = [
            f"{info.version} ({', '.join([*info.tags, *(f'pinned by {p}' for p in info.pins)])})"
            for info in holding
            if info.tags or info.pins
        ]
        why = f"; never pruned while tagged or pinned: {', '.join(protected)}" if protected else ""
        which = "older versions still hold" if published else "the versions before the removal keep"
        print(
            f"note: {which} {task!r} until retention prunes them: {', '.join(info.version for info in holding)} "
            f"(`sharecl prune --keep N`){why}"
        )


def _names(tasks: list[str]) -> str:
    return ", ".join(repr(t) for t in tasks)
