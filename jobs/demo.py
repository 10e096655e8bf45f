"""The main job on embedded defaults: WordNet gloss tasks learned concurrently into one subspace.

``demo_job()`` builds the job of ``jobs/examples/wordnet.yaml`` with the tasks found in the WordNet
data folder (built first if missing) and small training budgets, so that a 2-core machine runs it
end to end in minutes: local Ray, embedded Redis, MLflow in sqlite, the bundled all-MiniLM-L6-v2.
``run_demo_job()`` runs it, printing the Ray dashboard's URL while it runs and, at the end, the
``sharecl`` commands that look at what it published (with the ``--namespace`` they need: every demo
run writes to a new ``demo-<time>`` namespace).
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from jobs.datasets.glosses import prepare_wordnet_tasks
from jobs.schema import JobConfig, TaskConfig, load_job

if TYPE_CHECKING:
    from jobs.runner import JobResult

EXAMPLE = Path(__file__).parent / "examples" / "wordnet.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Sized for a 2-core machine (two workers train at once, each on one core); see the report in
# `sharecl demo --help`. On a bigger machine raise training.steps.
DEMO_SETTINGS = (
    "training.steps=60",
    "training.batch_size=16",
    "training.lr=0.003",
    "training.log_every=10",
    "training.eval_batch_size=64",
    "model.max_length=48",
)


def default_data_dir() -> Path:
    """``benchmarks/data/wordnet`` of the checkout (where the example jobs and the README point)."""
    return REPO_ROOT / "benchmarks" / "data" / "wordnet"


def ensure_wordnet(data: Path, num_tasks: int | None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The task list of ``data/tasks.json``, building the WordNet tasks there first if it is missing."""
    manifest = data / "tasks.json"
    if not manifest.is_file():
        say(f"[demo] building the WordNet tasks in {data} (once; needs the Debian package wordnet-base)")
        started = time.time()
        prepare_wordnet_tasks(data)
        say(f"[demo] data ready in {time.time() - started:.0f}s")
    entries = json.loads(manifest.read_text(encoding="utf-8"))["tasks"]
    if num_tasks is not None:
        if not 1 <= num_tasks <= len(entries):
            raise ValueError(f"--tasks must be between 1 and {len(entries)} (the tasks in {manifest}), got {num_tasks}")
        entries = entries[:num_tasks]
    return entries


def demo_job(
    data: Path,
    *,
    num_tasks: int | None = None,
    namespace: str | None = None,
    overrides: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> JobConfig:
    """The WordNet example job with the tasks in ``data``, demo budgets, a fresh namespace (so a rerun
    never collides with the tasks of an earlier one), then ``overrides`` (``KEY=VALUE``)."""
    entries = ensure_wordnet(data, num_tasks, say)
    base = load_job(EXAMPLE, check_files=False)
    base.tasks = [
        TaskConfig(name=e["name"], train=str((data / e["train"]).absolute()), eval=str((data / e["eval"]).absolute()))
        for e in entries
    ]
    base.store.namespace = namespace or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    # Through a job file, so the demo's settings and the user's overrides are parsed and checked
    # exactly as `sharecl submit` does.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.structured(base)), encoding="utf-8")
        return load_job(path, [*DEMO_SETTINGS, *overrides])


def follow_up_commands(namespace: str, task: str) -> list[str]:
    """The commands that look at what a job published into ``namespace`` and deploy ``task`` from it."""
    ns, name = shlex.quote(namespace), shlex.quote(task)
    return [
        f"sharecl versions --namespace {ns}",
        f"sharecl show head --namespace {ns}",
        f"sharecl status --namespace {ns}",
        f"sharecl tag head prod --namespace {ns}",
        f"sharecl pull prod --task {name} -o {shlex.quote(task + '_peft')} --format peft --namespace {ns}",
    ]


def dashboard_url() -> str | None:
    """The dashboard URL of the Ray this process is connected to; None if none runs (or Ray is not connected).

    Ray hands the URL to whoever calls ``ray.init`` (the job runner here); its node object is where
    everyone else finds it.
    """
    import ray

    if not ray.is_initialized():
        return None
    node = getattr(ray._private.worker, "_global_node", None)
    url = getattr(node, "webui_url", None) if node is not None else None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def run_demo_job(cfg: JobConfig, say: Callable[[str], None] | None = None) -> JobResult:
    """Run the demo's job on a local Ray, saying where to watch it and how to look at what it published."""
    from jobs.runner import say_line, start_job

    say = say or say_line
    running = start_job(cfg, say=say, dashboard=True)
    url = dashboard_url()
    if url:
        say(f"[demo] Ray dashboard (workers, tasks, logs) while the job runs: {url}")
        say("[demo]   if it asks for a token: `ray get-auth-token`")
    else:
        say("[demo] this Ray runs without its dashboard (jobs.runner starts it with include_dashboard=False)")
    result = running.wait()
    task = cfg.tasks[0].name
    say("")
    say(f"[demo] the versions are in namespace {cfg.store.namespace!r}, not 'default'; look at them with:")
    for line in follow_up_commands(cfg.store.namespace, task):
        say(f"  {line}")
    say(f"[demo] or `export SHARECL_NAMESPACE={shlex.quote(cfg.store.namespace)}` once; `sharecl namespaces` lists all")
    return result
