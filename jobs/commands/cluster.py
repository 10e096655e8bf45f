"""Cluster commands: run jobs on Ray, watch them, feed external adapters, and the demo.

sharecl submit JOB.yaml [KEY=VALUE ...] [--address ADDR] [--no-wait] [--cluster-dir DIR]
sharecl status [--namespace NS] [--jobs N] [--json]
sharecl adapters add DIR... [--task NAME ...] [--base-model NAME] [--allow-over-bound] [--wait [--timeout S]]
sharecl coordinator stop [--namespace NS] [--address ADDR]
sharecl demo [--tasks N] [--data DIR] [KEY=VALUE ...]

``--address``: nothing (a local Ray), ``auto`` / ``ray://host:10001`` (the job's driver runs here and
connects), or ``http://head:8265`` (the Ray Jobs API: the driver runs on the cluster, this command
only submits and follows its log). Through the Jobs API the driver reads relative task paths from
``--cluster-dir`` on the cluster (default ``~/share-cl``, where ray_cluster.yaml syncs the checkout;
a head on this machine: ``--cluster-dir $PWD``); a directory that is not there fails before anything
is submitted (a head on this machine) or as the driver's first step (a remote head). The Ray submission
is ``sharecl-<job id>`` with the job id and namespace as its metadata.

Every submit reads every task file as its worker will before launching anything, and refuses the job
with one message listing every bad file and what it lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.commands.options import add_store_options, namespace_given
from jobs.errors import CLIError
from subspace_store.progress import ProgressBoard, TaskPhase, TaskProgress

NAMESPACE_ENV = "SHARECL_NAMESPACE"
CLUSTER_DIR = "~/share-cl"  # where ray_cluster.yaml syncs the checkout on every node


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit",
        help="run a job file on Ray: train every task, merge every result",
        description="Run JOB.yaml: one Ray task per task job, merged by the namespace's coordinator. Every task "
        "file is read first, as its worker will; a bad one stops the job before anything is launched. "
        f"With --address http://HEAD:8265 (the Ray Jobs API) the job's driver runs on the cluster and reads "
        f"relative task paths from --cluster-dir there (default {CLUSTER_DIR}, where ray_cluster.yaml syncs the "
        "checkout; for a head on this machine pass the checkout, e.g. --cluster-dir $PWD). The Ray submission "
        "id is sharecl-<job id>.",
    )
    submit.add_argument("job", metavar="JOB.yaml", help="job file (examples in jobs/examples/; check it with validate)")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.steps=50")
    submit.add_argument(
        "--address",
        default=None,
        help="Ray address: auto, ray://host:10001, or http://head:8265 to submit through the Ray Jobs API "
        "(default: cluster.address of the job, else a local Ray)",
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="with an http:// address: return once the job is submitted"
    )
    submit.add_argument(
        "--cluster-dir",
        default=CLUSTER_DIR,
        metavar="DIR",
        help=f"with an http:// address: the checkout on the cluster that relative task paths are read from "
        f"(default {CLUSTER_DIR}, as ray_cluster.yaml syncs it; for a head on this machine: the checkout, "
        "e.g. $PWD). Absolute or ~/...",
    )
    # Set by the Jobs API entrypoint: the cluster dir, and the sharecl job id the submission id names.
    submit.add_argument("--base-dir", default=None, help=argparse.SUPPRESS)
    submit.add_argument("--job-id", default=None, help=argparse.SUPPRESS)
    submit.set_defaults(func=run_submit)

    status = subparsers.add_parser(
        "status", help="jobs, tasks, submissions and versions of a namespace (without one: every namespace)"
    )
    add_store_options(status)
    status.add_argument("--mlflow-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the sqlite default")
    status.add_argument("--experiment", default=None, help="MLflow experiment (default: the namespace)")
    status.add_argument("--jobs", type=int, default=5, metavar="N", help="show the newest N jobs (default 5)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=run_status)

    adapters = subparsers.add_parser("adapters", help="feed external PEFT LoRA adapters into the stream")
    sub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="submit PEFT LoRA folders as new tasks; the coordinator merges them")
    add.add_argument("folders", nargs="+", metavar="DIR", help="PEFT LoRA folders (as save_pretrained writes them)")
    add.add_argument(
        "--task",
        dest="tasks",
        action="append",
        default=None,
        metavar="NAME",
        help="task name, once per DIR in order (default: each folder's name)",
    )
    add.add_argument("--base-model", default=None, help="the base model they were trained on (checked on merge)")
    add.add_argument(
        "--module-prefix",
        type=_module_prefix,
        default=None,
        metavar="FROM=TO",
        help="rename the adapters' modules from prefix FROM to TO (e.g. '=encoder.' for an adapter trained on "
        "AutoModel joining a namespace of hf-text-classifier jobs); default: the one prefix change that makes "
        "them the namespace's modules, when their names are not already",
    )
    add.add_argument(
        "--wait",
        action="store_true",
        help="start the namespace's coordinator (local Ray unless --address) and wait until they are merged",
    )
    add.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="for --wait: how long to wait for the coordinator (default 300)",
    )
    add.add_argument(
        "--allow-over-bound",
        action="store_true",
        help="let the coordinator merge them even if that leaves some task over the merge policy's max_error "
        "(it rejects such a merge otherwise)",
    )
    add.add_argument("--address", default=None, help="Ray address for --wait (default: a local Ray)")
    add.add_argument(
        "--mlflow-uri", default=None, help="for --wait: default $MLFLOW_TRACKING_URI, else the sqlite default"
    )
    add.add_argument("--experiment", default=None, help="for --wait: MLflow experiment (default: the namespace)")
    add_store_options(add)
    add.set_defaults(func=run_adapters_add)

    coordinator = subparsers.add_parser("coordinator", help="manage the detached coordinator actor of a namespace")
    actions = coordinator.add_subparsers(dest="coordinator_command", required=True, metavar="ACTION")
    stop = actions.add_parser(
        "stop",
        help="stop a namespace's coordinator (after its current merge) and remove the actor",
        description="Stop the detached coordinator actor of a namespace on a running Ray cluster: it finishes "
        "its current merge and its MLflow runs, then the actor is removed. Says whether one was running.",
    )
    stop.add_argument("--namespace", default=None, help=f"store namespace (default ${NAMESPACE_ENV}, else 'default')")
    stop.add_argument(
        "--address", default="auto", help="Ray cluster to look on (default: auto, the cluster running on this machine)"
    )
    stop.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to wait for its current merge"
    )
    stop.set_defaults(func=run_coordinator_stop)

    demo = subparsers.add_parser(
        "demo",
        help="the main job on one machine: WordNet tasks, MiniLM, local Ray, embedded Redis, MLflow",
        description="Learn the WordNet gloss tasks concurrently into one Share subspace on this machine "
        "(data built on first use), then print the accuracy matrix and the `mlflow ui` command.",
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. training.steps=100")
    demo.add_argument("--tasks", type=int, default=None, metavar="N", help="only the first N tasks")
    demo.add_argument(
        "--data", default=None, metavar="DIR", help="WordNet task folder (default: benchmarks/data/wordnet)"
    )
    demo.add_argument("--namespace", default=None, help="store namespace (default: a new demo-<time> one per run)")
    demo.set_defaults(func=run_demo)


# ---------------------------------------------------------------- submit


def _is_http(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def run_submit(args: argparse.Namespace) -> int:
    from jobs.runner import run_job
    from jobs.schema import load_job

    if _is_http(args.address):
        return _submit_to_jobs_api(args)
    if args.no_wait:
        raise CLIError(
            "--no-wait needs a Ray Jobs API address (--address http://head:8265): a job driven from here "
            "stops when this command exits"
        )
    job_path = Path(args.job).absolute()
    if args.base_dir:
        os.chdir(_existing_cluster_dir(args.base_dir, on_cluster=True))
    cfg = load_job(job_path, args.overrides)
    result = run_job(cfg, address=args.address, job_id=args.job_id)  # task files checked before launching
    return 0 if result.ok else 1


def _existing_cluster_dir(path: str, *, on_cluster: bool) -> Path:
    """``path`` (``~`` expanded) if it is a directory; else a ``CLIError`` naming ``--cluster-dir``."""
    import socket

    found = Path(path).expanduser()
    if found.is_dir():
        return found
    where = f"on the cluster node running the job's driver ({socket.gethostname()})" if on_cluster else "here"
    raise CLIError(
        f"--cluster-dir {path}: no such directory {where}. Through the Ray Jobs API the job's driver reads "
        f"relative task paths from --cluster-dir (default {CLUSTER_DIR}, where ray_cluster.yaml syncs the "
        "checkout); pass the checkout on the cluster, e.g. --cluster-dir $PWD for a head on this machine"
    )


def _head_is_here(address: str) -> bool:
    """Whether the Jobs API at ``address`` runs on this machine (its host is a loopback or this host's name
    or address), so that ``--cluster-dir`` and the task files can be checked here before submitting."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(address).hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        own = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return str(ip) in own


def _submit_to_jobs_api(args: argparse.Namespace) -> int:
    from contextlib import chdir

    from jobs.runner import check_task_files, new_job_id, ray_submission_id
    from jobs.schema import load_job
    from workers.run_task import QUIET_ENV

    # Checked here so that a typo fails now, before anything is contacted; the files are checked where
    # the driver runs: here too when the head runs on this machine (then --cluster-dir must be here).
    job_file = Path(args.job).absolute()
    cfg = load_job(job_file, args.overrides, check_files=False)
    cluster_dir = args.cluster_dir
    here = _head_is_here(args.address)
    if not (cluster_dir.startswith("~") or Path(cluster_dir).is_absolute()):
        if not here:
            raise CLIError(
                f"--cluster-dir {cluster_dir}: give the checkout's path on the cluster, absolute or ~/... "
                f"(default {CLUSTER_DIR}); a relative path would be read from the submission's upload folder"
            )
        cluster_dir = str(Path(cluster_dir).absolute())
    if here:
        with chdir(_existing_cluster_dir(cluster_dir, on_cluster=False)):
            cfg = load_job(job_file, args.overrides)
            check_task_files(cfg)
    job_id = new_job_id()
    submission_id = ray_submission_id(job_id)
    metadata = {"sharecl_job_id": job_id, "namespace": cfg.store.namespace, "job_file": job_file.name}
    return _submit_and_follow(args, cluster_dir, job_id, submission_id, metadata, cfg.store.namespace, QUIET_ENV)


def _submit_and_follow(
    args: argparse.Namespace,
    cluster_dir: str,
    job_id: str,
    submission_id: str,
    metadata: dict[str, str],
    namespace: str,
    env: dict[str, str],
) -> int:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    with tempfile.TemporaryDirectory() as tmp:
        # Only the job file travels (the code and data are on the cluster's nodes already).
        (Path(tmp) / "job.yaml").write_bytes(Path(args.job).read_bytes())
        entrypoint = shlex.join(
            ["sharecl", "submit", "job.yaml", *args.overrides, "--base-dir", cluster_dir, "--job-id", job_id]
        )
        try:
            client = JobSubmissionClient(args.address)
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                metadata=metadata,
                runtime_env={"working_dir": tmp, "env_vars": dict(env)},
            )
        except AuthenticationError as err:
            raise CLIError(
                f"the Ray Jobs API at {args.address} needs an auth token: put the cluster's token in "
                "~/.ray/auth_token or RAY_AUTH_TOKEN (on the head: `ray get-auth-token`); "
                f"Ray said: {str(err).splitlines()[0]}"
            ) from None
        except (ConnectionError, RuntimeError) as err:
            raise CLIError(
                f"could not submit to the Ray Jobs API at {args.address} ({err}); is the cluster up and its "
                "dashboard port reachable (`ray dashboard ray_cluster.yaml` forwards it to localhost:8265)?"
            ) from None
    print(
        f"submitted Ray job {submission_id} (sharecl job {job_id}, namespace {namespace!r}) to {args.address}: "
        f"{entrypoint}",
        flush=True,
    )
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {args.address} {submission_id}")
        print(f"or: sharecl status --namespace {namespace}   (job {job_id})")
        return 0
    seen = 0
    while True:
        status = client.get_job_status(submission_id)
        logs = client.get_job_logs(submission_id)
        if len(logs) > seen:
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"Ray job {submission_id} (sharecl job {job_id}): {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)


# ---------------------------------------------------------------- status


def _namespace(args: argparse.Namespace) -> str:
    return args.namespace or os.environ.get(NAMESPACE_ENV, "").strip() or "default"


def _open_store(args: argparse.Namespace) -> tuple[Any, Any]:
    from subspace_store import SubmissionStream, SubspaceStore, connect

    client = connect(args.redis_url)
    namespace = _namespace(args)
    return SubspaceStore(client, namespace), SubmissionStream(client, namespace)


@dataclass(frozen=True)
class TaskRow:
    """One task of a job as ``sharecl status`` shows it: its final state in the job, else its latest attempt's."""

    task: str
    status: str | None  # as recorded in MLflow ("merged v3", "training", "failed", ...)
    attempts: int
    eval_accuracy: float | None  # measured by the worker right after training
    accuracy_after_merge: float | None  # served from the head when the job ended
    base_version: str | None
    gpu_ids: str | None
    error: str | None  # why it failed: its run's error, else the job run's failed/<task> (before its run started)
    progress: TaskProgress | None = None  # its worker's latest report (step/total, loss, ETA)

    @property
    def accuracy(self) -> float | None:
        return self.accuracy_after_merge if self.accuracy_after_merge is not None else self.eval_accuracy

    @property
    def finished(self) -> bool:
        """Merged, rejected or failed: the job run holds its final state."""
        return bool(self.status) and self.status.split()[0] in ("merged", "rejected", "failed")

    def line(self, now: float) -> str:
        """What ``sharecl status`` prints after the task's name."""
        shown = f"accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        status = self.status or "-"
        if not self.finished and self.progress is not None:
            if not self.progress.phase.finished:  # training: step/total, loss, ETA
                return f"{self.progress.line(now)}{tries}"
            if self.progress.phase is TaskPhase.FAILED:  # also before its MLflow run started
                status = "failed"
        error = f"  {_one_line(self.error)}" if self.error and not status.startswith("merged") else ""
        return f"{status:<22} {shown}{tries}{error}".rstrip()


@dataclass(frozen=True)
class JobRow:
    """One job (its MLflow run) with its tasks."""

    job_id: str
    run_id: str
    mlflow_status: str
    status: str | None
    started: float  # unix seconds
    head: str | None
    tasks: list[TaskRow] = field(default_factory=list)
    ray_submission_id: str | None = None  # the Ray Jobs API submission its driver ran in
    ray_address: str | None = None  # "local", or the cluster's GCS address


def _one_line(text: str, limit: int = 400) -> str:
    first = " ".join(text.split())
    return first if len(first) <= limit else first[: limit - 3] + "..."


def jobs_summary(
    uri: str, experiment: str, last: int, progress: Callable[[str], dict[str, TaskProgress]] | None = None
) -> list[JobRow]:
    """The newest ``last`` jobs of ``experiment`` with their tasks' latest attempts (from MLflow) and, with
    ``progress`` (job id -> its tasks' progress records), where their workers are."""
    from subspace_store.tracking import (
        ACCURACY_METRIC,
        TAG_BASE_VERSION,
        TAG_ERROR,
        TAG_GPU_IDS,
        TAG_HEAD,
        TAG_JOB,
        TAG_KIND,
        TAG_RAY_ADDRESS,
        TAG_RAY_SUBMISSION,
        TAG_STATUS,
        TAG_TASK,
        TAG_TASK_OUTCOME,
        TAG_TASKS,
        RunKind,
        failed_tasks,
    )
    from workers import tracking

    found = tracking.client(uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    exp = found.experiment_id
    jobs = tracking.find_runs(uri, exp, f"tags.`{TAG_KIND}` = '{RunKind.JOB}'", max_results=1000)
    jobs = sorted(jobs, key=lambda r: r.info.start_time, reverse=True)[:last]
    out = []
    for run in jobs:
        job_id = run.data.tags.get(TAG_JOB, run.info.run_name)
        task_runs = tracking.find_runs(
            uri, exp, f"tags.`{TAG_JOB}` = '{job_id}' and tags.`{TAG_KIND}` = '{RunKind.TASK}'"
        )
        latest: dict[str, Any] = {}
        for t in sorted(task_runs, key=lambda r: r.info.start_time):
            latest[t.data.tags.get(TAG_TASK, "?")] = t
        task_names = [n for n in run.data.tags.get(TAG_TASKS, "").split(",") if n] or sorted(latest)
        failures = failed_tasks(run.data.tags)
        records = _quietly_read(progress, job_id) if progress is not None and run.info.status == "RUNNING" else {}
        tasks = []
        for name in task_names:
            t = latest.get(name)
            record = records.get(name)
            final = run.data.tags.get(TAG_TASK_OUTCOME + name)
            tasks.append(
                TaskRow(
                    task=name,
                    status=final or (t.data.tags.get(TAG_STATUS) if t else "queued"),
                    attempts=sum(1 for r in task_runs if r.data.tags.get(TAG_TASK) == name),
                    eval_accuracy=t.data.metrics.get("eval_accuracy") if t else None,
                    accuracy_after_merge=run.data.metrics.get(ACCURACY_METRIC + name),
                    base_version=t.data.tags.get(TAG_BASE_VERSION) if t else None,
                    gpu_ids=t.data.tags.get(TAG_GPU_IDS) if t else None,
                    error=(t.data.tags.get(TAG_ERROR) if t else None)
                    or failures.get(name)
                    or (record.error if record is not None else None),
                    progress=record,
                )
            )
        out.append(
            JobRow(
                job_id=job_id,
                run_id=run.info.run_id,
                mlflow_status=run.info.status,
                status=run.data.tags.get(TAG_STATUS),
                started=run.info.start_time / 1000.0,
                head=run.data.tags.get(TAG_HEAD),
                tasks=tasks,
                ray_submission_id=run.data.tags.get(TAG_RAY_SUBMISSION),
                ray_address=run.data.tags.get(TAG_RAY_ADDRESS),
            )
        )
    return out


def _quietly_read(progress: Callable[[str], dict[str, TaskProgress]], job_id: str) -> dict[str, TaskProgress]:
    try:
        return progress(job_id)
    except Exception as err:  # a view: status still shows what MLflow holds
        print(f"progress of job {job_id} unreadable ({err})", file=sys.stderr)
        return {}


def run_status(args: argparse.Namespace) -> int:
    from subspace_store.tracking import resolve_mlflow_uri

    if not namespace_given(args):  # every namespace, as `sharecl namespaces` lists them (jobs.commands.store)
        from jobs.commands.store import status_of_every_namespace

        return status_of_every_namespace(args)
    store, stream = _open_store(args)
    namespace = store.namespace
    uri = resolve_mlflow_uri(args.mlflow_uri)
    versions = store.list_versions()
    subs = stream.summary()
    board = ProgressBoard(store.client, namespace)
    try:
        jobs = jobs_summary(uri, args.experiment or namespace, args.jobs, board.read)
        tracking_error = None
    except Exception as err:  # the store part is still worth showing
        jobs, tracking_error = [], f"{type(err).__name__}: {err}"
    if args.json:
        print(
            json.dumps(
                {
                    "namespace": namespace,
                    "head": store.head(),
                    "versions": [v.__dict__ for v in versions],
                    "submissions": subs.to_dict(),
                    "jobs": [asdict(job) for job in jobs],
                    "tracking_error": tracking_error,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    head = store.head()
    print(f"namespace {namespace!r}: head {head or '- (no version yet)'}, {len(versions)} version(s)")
    for v in versions[-5:]:
        marks = (["HEAD"] if v.is_head else []) + v.tags + [f"pin:{p}" for p in v.pins]
        print(f"  {v.version:<6} {len(v.tasks):>3} task(s)  +{len(v.submissions)} submission(s)  {', '.join(marks)}")
    print(
        f"submissions: {subs.total} total, {subs.merged} merged, {subs.rejected} rejected, "
        f"{subs.pending} being merged, {subs.queued} queued"
    )
    for s in subs.newest:
        print(f"  {s.id:<17} {s.task:<28} {s.kind.value:<7} base {s.base_version or '-':<6} {s.status}")
    if tracking_error:
        print(f"jobs: MLflow at {uri} could not be read ({tracking_error})")
    elif not jobs:
        print(f"jobs: none in MLflow experiment {args.experiment or namespace!r} at {uri}")
    now = time.time()
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.started))
        ray = f", Ray job {job.ray_submission_id}" if job.ray_submission_id else ""
        print(f"job {job.job_id} ({started}{ray}): {job.status or job.mlflow_status}, head {job.head or '-'}")
        for t in job.tasks:
            print(f"  {t.task:<30} {t.line(now)}")
    print(f"watch: mlflow ui --backend-store-uri {uri}")
    return 0


# ---------------------------------------------------------------- adapters add


def _module_prefix(text: str) -> Any:
    from share.peft_io import ModulePrefix

    try:
        return ModulePrefix.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run_adapters_add(args: argparse.Namespace) -> int:
    from share import load_peft_adapter
    from share.errors import ShareClError
    from share.peft_io import match_subspace_modules
    from share.subspace import check_task_name
    from subspace_store import Submission
    from subspace_store.stream import check_names

    folders = [Path(f) for f in args.folders]
    names = args.tasks or [f.resolve().name for f in folders]
    if len(names) != len(folders):
        raise CLIError(f"{len(folders)} folder(s) but {len(names)} --task name(s); give one --task per DIR, in order")
    if len(set(names)) != len(names):
        raise CLIError(f"task names repeat: {names}; give each adapter its own --task")
    for folder, name in zip(folders, names, strict=True):
        try:
            check_task_name(name)
        except ShareClError as err:
            named = "" if args.tasks else " (a task is named after its folder unless --task names it)"
            raise CLIError(f"adapter {folder}: {err}{named}; nothing was submitted") from None
    store, stream = _open_store(args)
    head_modules, head_tasks = None, []
    if store.head() is not None:
        manifest = store.manifest("head")
        head_modules, head_tasks = set(manifest["modules"]), list(manifest["tasks"])
    adapters = []  # every adapter is loaded and its names checked before the first is submitted
    for folder, name in zip(folders, names, strict=True):
        if name in head_tasks:
            raise CLIError(f"task {name!r} is already in {store.head()}; choose another --task name")
        adapter = load_peft_adapter(folder)
        if head_modules is not None:  # names as the namespace's (a prefix change if needed), else a clear error
            adapter, prefix = match_subspace_modules(adapter, head_modules, str(folder), args.module_prefix)
            if prefix is not None:
                print(f"{folder}: module names mapped by prefix {str(prefix)!r}")
        try:
            check_names(name, adapter.factors, adapter.head)  # what submit would refuse
        except ShareClError as err:
            raise CLIError(f"adapter {folder}: {err}; nothing was submitted") from None
        adapters.append((folder, name, adapter))
    ids = []
    for folder, name, adapter in adapters:
        config = _peft_config(folder)
        metadata = {
            "source": "peft",
            "path": str(folder.resolve()),
            "peft_base_model": config.get("base_model_name_or_path"),
        }
        if args.base_model:
            metadata["base_model"] = args.base_model
        if "module_prefix" in adapter.metadata:  # renamed to the namespace's module names
            metadata["module_prefix"] = adapter.metadata["module_prefix"]
        submission = Submission(
            name, adapter=adapter, base_version=None, metadata=metadata, allow_over_bound=args.allow_over_bound
        )
        sid = stream.submit(submission)
        ids.append((name, sid))
        print(f"{folder} -> task {name!r}: submitted {sid} ({len(adapter.factors)} modules)")
    if not args.wait:
        print(
            f"the coordinator of namespace {store.namespace!r} merges them when it runs (during any job, or "
            "now with `--wait`); see `sharecl status`"
        )
        return 0
    return _wait_merged(args, store, stream, ids)


def _peft_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _wait_merged(args: argparse.Namespace, store: Any, stream: Any, ids: list[tuple[str, str]]) -> int:
    import ray

    from coordinator.actor import get_or_start_coordinator
    from subspace_store import SubmissionStatus, resolve_url

    url = resolve_url(args.redis_url)
    owns = not ray.is_initialized()
    if owns and args.address is None:
        ray.init(address="local", include_dashboard=False)
    elif owns:
        ray.init(address=args.address)
    problem = None
    try:
        coordinator = get_or_start_coordinator(
            store.namespace, url, args.mlflow_uri, experiment=args.experiment or store.namespace
        )
        try:
            ray.get(coordinator.flush.remote(args.timeout), timeout=args.timeout + 60)
        except (TimeoutError, ray.exceptions.RayError) as err:
            problem = _flush_problem(coordinator, err)
    finally:
        if owns:
            from coordinator.actor import stop_coordinator

            stop_coordinator(store.namespace)  # this Ray goes away: let it end its MLflow runs first
            ray.shutdown()
    failed = 0
    for name, sid in ids:
        state = stream.status(sid)
        failed += state.state is not SubmissionStatus.MERGED
        print(f"task {name!r} ({sid}): {state}")
    if problem:
        print(
            f"the coordinator of namespace {store.namespace!r} did not settle every submission within "
            f"{args.timeout:.0f}s: {problem}. See `sharecl status --namespace {store.namespace}`"
        )
    return 1 if failed else 0


def _flush_problem(coordinator: Any, err: BaseException) -> str:
    """One line for a flush that did not finish: the coordinator's last error if it reports one."""
    import ray

    cause = getattr(err, "cause", None) or err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    try:
        last = ray.get(coordinator.status.remote(), timeout=30).get("last_error")
    except Exception:
        last = None
    return f"{first}" + (f"; its last error: {last}" if last else "")


# ---------------------------------------------------------------- coordinator


def run_coordinator_stop(args: argparse.Namespace) -> int:
    import ray

    from coordinator.actor import stop_coordinator

    namespace = _namespace(args)
    owns = not ray.is_initialized()
    if owns:
        try:
            ray.init(address=args.address, log_to_driver=False)
        except ConnectionError as err:
            print(f"no Ray cluster at {args.address} ({str(err).splitlines()[0]}): no coordinator is running")
            return 0
    try:
        status = stop_coordinator(namespace, timeout_s=args.timeout)
    finally:
        if owns:
            ray.shutdown()
    if status is None:
        print(f"no coordinator was running for namespace {namespace!r}")
        return 0
    left = status.get("open_runs") or []
    unclean = " (it did not finish its current merge in time)" if status.get("loop_alive") else ""
    runs = f"; MLflow runs left open: {left}" if left else ""
    print(f"stopped the coordinator of namespace {namespace!r}{unclean}{runs}")
    return 0


# ---------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    from jobs.demo import default_data_dir, demo_job, run_demo_job
    from jobs.runner import say_line

    started = time.time()
    data = Path(args.data) if args.data else default_data_dir()
    cfg = demo_job(data, num_tasks=args.tasks, namespace=args.namespace, overrides=args.overrides, say=say_line)
    print(
        f"[demo] {len(cfg.tasks)} WordNet tasks, {cfg.training.steps} steps each, on local Ray with embedded Redis "
        f"and MLflow; namespace {cfg.store.namespace!r}",
        flush=True,
    )
    result = run_demo_job(cfg)
    print(f"[demo] done in {time.time() - started:.0f}s")
    return 0 if result.ok else 1
