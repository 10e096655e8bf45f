"""``sharecl serve``: answer for every task of a tagged version over HTTP, with Ray Serve.

sharecl serve [--tag prod] [--namespace NS] [--redis-url URL] [--host 127.0.0.1] [--port 8000]
              [--route-prefix /] [--max-batch-size 32] [--batch-wait-ms 10] [--poll-s 2] [--address ADDR]

Starts a local Ray (or joins ``--address``), runs ``jobs.serving.app`` with ``serve.run``, prints the URL
and a ``curl`` line, and blocks until Ctrl-C (or SIGTERM): then the application is deleted, and Serve and
the local Ray are shut down (on a cluster only this application is deleted).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from typing import Any

from jobs.commands.options import add_store_options, namespace
from jobs.errors import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve every task of a tagged version over HTTP (Ray Serve), following the tag",
        description="Serve every task of the version a tag names from one model, over HTTP with Ray Serve: "
        'POST /predict {"task": NAME, "inputs": [TEXT, ...]} answers {"predictions", "labels", "version"}; '
        "GET /health reports the version; GET /tasks lists the tasks and their labels. Requests of any tasks are "
        "batched together (one forward per batch). The tag is read every --poll-s seconds; a new version is "
        "swapped in between batches, and one that cannot be served is logged and skipped (the old one keeps "
        "serving). Ctrl-C stops it.",
    )
    serve.add_argument("--tag", default="prod", help="the tag to serve and follow (default prod; `sharecl tag`)")
    add_store_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--route-prefix", default="/", metavar="PREFIX", help="URL prefix of the routes (default /)")
    serve.add_argument(
        "--max-batch-size", type=int, default=32, metavar="N", help="requests answered by one forward (default 32)"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="how long a batch waits for more requests before it runs (default 10)",
    )
    serve.add_argument("--poll-s", type=float, default=2.0, metavar="S", help="how often the tag is read (default 2)")
    serve.add_argument(
        "--max-inputs", type=int, default=64, metavar="N", help="texts per request; more get a 422 (default 64)"
    )
    serve.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="Serve replicas, one model each (default 1)"
    )
    serve.add_argument(
        "--num-cpus", type=int, default=1, metavar="N", help="CPUs per replica, its torch threads (default 1)"
    )
    serve.add_argument("--num-gpus", type=float, default=0.0, metavar="G", help="GPUs per replica (default 0: the CPU)")
    serve.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run on (auto, ray://host:10001); default: a local Ray. The Redis URL must be "
        "reachable from the cluster's nodes",
    )
    serve.set_defaults(func=run_serve)


def _check(args: argparse.Namespace) -> None:
    problems = [
        f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}"
        for name, ok, rule in (
            ("port", 0 < args.port < 65536, "a TCP port (1-65535)"),
            ("max_batch_size", args.max_batch_size >= 1, ">= 1"),
            ("batch_wait_ms", args.batch_wait_ms >= 0, ">= 0"),
            ("poll_s", args.poll_s > 0, "> 0"),
            ("max_inputs", args.max_inputs >= 1, ">= 1"),
            ("replicas", args.replicas >= 1, ">= 1"),
            ("num_cpus", args.num_cpus >= 1, ">= 1"),
            ("num_gpus", args.num_gpus >= 0, ">= 0"),
        )
        if not ok
    ]
    if not args.route_prefix.startswith("/"):
        problems.append(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    if problems:
        raise CLIError("; ".join(problems))


def _served_version(store: Any, tag: str) -> tuple[str, list[str]]:
    """The version ``tag`` names and its tasks; a ``CLIError`` with the command that sets the tag."""
    from subspace_store import VersionNotFoundError

    try:
        version = store.resolve(tag)
        return version, list(store.manifest(version)["tasks"])
    except VersionNotFoundError as err:
        raise CLIError(
            f"nothing to serve: {err}. Point the tag at a version first: "
            f"`sharecl tag head {tag} --namespace {store.namespace}`"
        ) from None


def curl_example(url: str, task: str) -> str:
    body = json.dumps({"task": task, "inputs": ["a text to classify"]})
    return f"curl -s -X POST {url}predict -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def run_serve(args: argparse.Namespace) -> int:
    from subspace_store import SubspaceStore, connect, redact, resolve_url

    _check(args)
    ns = namespace(args)
    url = resolve_url(args.redis_url)
    store = SubspaceStore(connect(url), ns)
    version, tasks = _served_version(store, args.tag)

    import ray
    from ray import serve

    from jobs.serving.app import build_app

    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=args.address or "local", include_dashboard=False)
    name = f"sharecl-{ns}"
    started = False
    # SIGTERM stops it as Ctrl-C does; SIGINT too when a shell started it in the background (which ignores it).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(
            ns,
            url,
            args.tag,
            poll_s=args.poll_s,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            max_inputs=args.max_inputs,
            num_replicas=args.replicas,
            num_cpus=args.num_cpus,
            threads=args.num_cpus,
            num_gpus=args.num_gpus,
        )
        print(
            f"[serve] starting: tag {args.tag!r} of namespace {ns!r} ({version}, {len(tasks)} tasks), "
            f"Redis {redact(url)}",
            flush=True,
        )
        try:
            serve.run(app, name=name, route_prefix=args.route_prefix)
        except RuntimeError as err:
            raise CLIError(f"the server did not start: {_deploy_failure(name) or err}") from None
        started = True
        base = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}/"
        print(
            f"[serve] serving {version} of namespace {ns!r} at {base} (following tag {args.tag!r} every "
            f"{args.poll_s:g}s); Ctrl-C stops it",
            flush=True,
        )
        print(f"[serve] health: curl -s {base}health", flush=True)
        print(f"[serve] predict: {curl_example(base, tasks[0] if tasks else 'TASK')}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(serve, ray, name, started, owns_ray and args.address is None)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(serve: Any, ray: Any, name: str, started: bool, local: bool) -> None:
    """Delete the application; on a local Ray of our own, shut Serve and Ray down too."""
    try:
        if local:
            serve.shutdown()
        elif started:
            serve.delete(name)
    except Exception as err:  # stopping anyway: say what was left behind
        print(f"[serve] could not stop Serve cleanly ({err})", file=sys.stderr)
    if local:
        ray.shutdown()


def _deploy_failure(name: str) -> str | None:
    """The last line of why a deployment of application ``name`` failed, as Serve reports it."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:
        return None
    if app is None:
        return None
    for deployment in app.deployments.values():
        lines = [line for line in (deployment.message or "").strip().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    lines = [line for line in (app.message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None
