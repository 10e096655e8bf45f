"""The main job on embedded defaults: WordNet gloss tasks learned concurrently into one subspace.

``demo_job()`` builds the job of ``jobs/examples/wordnet.yaml`` with the tasks found in the WordNet
data folder (built first if missing) and small training budgets, so that a 2-core machine runs it
end to end in minutes: local Ray, embedded Redis, MLflow in sqlite, the bundled all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from jobs.datasets.glosses import prepare_wordnet_tasks
from jobs.schema import JobConfig, TaskConfig, load_job

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
