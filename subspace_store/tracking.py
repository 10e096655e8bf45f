"""MLflow names and plumbing shared by the workers' runs, the coordinator's merge runs and the CLI.

Workers and the coordinator never import each other; both write MLflow runs that ``sharecl status``
and the job driver read back, so the tag and metric names they agree on live here, once. Runs are
addressed by id through ``MlflowClient``. The default store is one sqlite file that workers and the
coordinator write at once, so sqlite's "database is locked" is retried. MLflow itself is imported by
the callers: nothing here needs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import StoreError
from .home import data_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's own variable, so a node set up for MLflow works for us without a second name.
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"


class RunKind(StrEnum):
    """What an MLflow run records (tag ``sharecl.kind``)."""

    JOB = "job"  # one ``sharecl submit``: the parent of its task runs
    TASK = "task"  # one attempt at training one task
    MERGE = "merge"  # one version published by the coordinator


# Tags.
TAG_KIND = "sharecl.kind"  # a RunKind
TAG_JOB = "sharecl.job_id"
TAG_TASK = "sharecl.task"
TAG_TASKS = "sharecl.tasks"  # job runs: its task names, comma-separated
TAG_NAMESPACE = "sharecl.namespace"
TAG_STATUS = "sharecl.status"
TAG_ERROR = "sharecl.error"
TAG_ATTEMPT = "sharecl.attempt"
TAG_BASE_VERSION = "sharecl.base_version"  # task runs: the version it trained from, or "none"
TAG_NODE = "sharecl.node"
TAG_GPU_IDS = "sharecl.gpu_ids"
TAG_SUBMISSION = "sharecl.submission_id"  # task runs: set once the task is in the stream
TAG_VERSION = "sharecl.version"  # merge runs: the version published
TAG_NEW_TASKS = "sharecl.new_tasks"  # merge runs: the tasks that entered, space-separated
TAG_HEAD = "sharecl.head"  # job runs: the head when the job ended
TAG_TASK_OUTCOME = "sharecl.task."  # job runs: + task name -> its final state
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# Metrics.
ACCURACY_METRIC = "accuracy/"  # + task name: its accuracy served from a version (merge and job runs)

NO_VALUE = "none"  # how a missing version or GPU list is written in tags and params

_ATTEMPTS = 6


def default_mlflow_uri() -> str:
    """MLflow's tracking URI on one machine: a sqlite file in the data folder."""
    # data_dir() is absolute, so this gives sqlite://// + path, which is what SQLAlchemy expects.
    return f"sqlite:///{data_dir() / 'mlflow.db'}"


def resolve_mlflow_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the sqlite default.

    Cluster nodes export ``MLFLOW_TRACKING_URI`` (see ray_cluster.yaml), so code that opens MLflow
    must go through this rather than straight to the default.
    """
    if uri:
        return uri
    return os.environ.get(MLFLOW_URI_ENV, "").strip() or default_mlflow_uri()


def retry(fn: Callable[[], T], what: str) -> T:
    """Call ``fn``, retrying transient store errors (locked sqlite, busy or lost connections)."""
    delay = 0.2
    for attempt in range(_ATTEMPTS):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps the driver's OperationalError
            text = str(err).lower()
            transient = "locked" in text or "busy" in text or "timed out" in text or "connection" in text
            if not transient or attempt == _ATTEMPTS - 1:
                raise
            log.debug("MLflow %s failed (%s); retrying", what, err)
            time.sleep(delay)
            delay = min(delay * 2, 3.0)
    raise AssertionError("unreachable")


def artifact_root(uri: str, experiment: str) -> str | None:
    """Next to a local sqlite file (not ./mlruns of whatever folder the process runs in); None for a
    tracking server, which chooses its own artifact store."""
    if urlsplit(uri).scheme == "sqlite" and uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / experiment).as_uri()
    return None


def ensure_experiment(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (two creators may race: both get its id)."""
    found = retry(lambda: client.get_experiment_by_name(name), "get_experiment")
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise StoreError(
                f"MLflow experiment {name!r} at {uri} is deleted; restore it (`mlflow experiments restore`) "
                "or set tracking.experiment to another name"
            )
        return found.experiment_id
    try:
        return retry(lambda: client.create_experiment(name, artifact_root(uri, name)), "create_experiment")
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
