"""MLflow names and plumbing shared by the workers' runs, the coordinator's merge runs and the CLI.

Workers and the coordinator never import each other; both write MLflow runs that ``sharecl status``
and the job driver read back, so the tag and metric names they agree on live here, once. Runs are
addressed by id through ``MlflowClient``. The default store is one sqlite file that workers and the
coordinator write at once, so sqlite's "database is locked" is retried.

Runs read as a tree in the MLflow UI: a job run is the parent (``mlflow.parentRunId``) of its task runs
and of the merge runs that took its tasks in. Published versions are model versions of one registered
model per namespace (``registered_model_name``); the store's tags are mirrored as its aliases
(``mirror_tag``, ``sync_aliases``), so ``models:/sharecl-<namespace>@prod`` is what ``sharecl pull prod``
pulls. MLflow is imported lazily, by the functions that open a client.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
TAG_FAILED = "failed/"  # job runs: + task name -> why it failed (also when it never got a run of its own)
TAG_JOBS = "sharecl.jobs"  # merge runs: the jobs whose tasks entered, space-separated (first: the parent run's)
TAG_JOB_RUNS = "sharecl.job_runs"  # merge runs: those jobs' MLflow runs, same order
TAG_PARENT_VERSION = "sharecl.parent"  # model versions: the store version it was merged onto, or "none"
TAG_REGISTRY_ERROR = "sharecl.registry_error"  # merge runs: why the version is not in the model registry
TAG_RAY_ADDRESS = "sharecl.ray_address"  # job runs: the Ray cluster the driver ran on ("local" for its own)
TAG_RAY_SUBMISSION = "sharecl.ray_submission_id"  # job runs: the Ray Jobs API submission it ran in
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# Metrics.
# Both at step = version number (v7 -> 7), on the merge run of that version and on the run of the job
# that trained the task: a job run's series are its tasks' forgetting curves.
ACCURACY_METRIC = "accuracy/"  # + task name: its accuracy served from a version
RECONSTRUCTION_METRIC = "reconstruction_error/"  # + task name: its relative reconstruction error in a version
# Merge runs' artifacts: the version's manifest.json and pointer.json, the source of its model version.
VERSION_ARTIFACTS = "sharecl_version"
MODEL_PREFIX = "sharecl-"  # + namespace: the registered model of a namespace

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


def failed_tasks(tags: Mapping[str, str]) -> dict[str, str]:
    """Task -> why it failed, read from a job run's tags (``TAG_FAILED``)."""
    return {key[len(TAG_FAILED) :]: value for key, value in tags.items() if key.startswith(TAG_FAILED)}


# ---------------------------------------------------------------- the model registry


def registered_model_name(namespace: str) -> str:
    """The registered model holding ``namespace``'s published versions: ``sharecl-<namespace>``."""
    return MODEL_PREFIX + namespace


class AliasOutcome(StrEnum):
    """What mirroring a store tag as a registry alias did."""

    SET = "set"  # the alias now names the model version of the tag's store version
    UNCHANGED = "unchanged"  # it already did (or, deleting, there was no such alias)
    DELETED = "deleted"
    NOT_REGISTERED = "not registered"  # the store version has no model version (published while MLflow was away)
    INVALID = "invalid alias"  # the tag has a character MLflow aliases do not allow
    FAILED = "failed"  # MLflow could not be reached, or refused


@dataclass(frozen=True)
class AliasMirror:
    """The outcome of mirroring store tag ``alias`` (at store ``version``; None: deleted) in ``model``."""

    outcome: AliasOutcome
    model: str
    alias: str
    version: str | None
    model_version: str | None
    message: str  # one line for people

    @property
    def ok(self) -> bool:
        return self.outcome in (AliasOutcome.SET, AliasOutcome.UNCHANGED, AliasOutcome.DELETED)


_ALIAS = re.compile(r"[\w\-]+")  # what MLflow accepts as an alias (store tags may also hold '.')


def alias_problem(tag: str) -> str | None:
    """Why store tag ``tag`` cannot be an MLflow alias, or None."""
    if not _ALIAS.fullmatch(tag):
        return (
            f"MLflow aliases allow only letters, digits, '_' and '-', so tag {tag!r} has no registry alias; "
            f"name the tag without '.' (e.g. {tag.replace('.', '-')!r}) to find it as models:/...@alias"
        )
    return None


def model_versions(client: Any, namespace: str) -> dict[str, str]:
    """Store version -> number of its model version in the namespace's registered model (every page)."""
    query = f"name='{registered_model_name(namespace)}'"
    found: dict[str, str] = {}
    token = None
    while True:
        page = retry(
            lambda token=token: client.search_model_versions(query, max_results=1000, page_token=token),
            "search_model_versions",
        )
        for model_version in page:
            version = model_version.tags.get(TAG_VERSION)
            if version and (version not in found or int(model_version.version) < int(found[version])):
                found[version] = str(model_version.version)  # the first registered, should there be two
        token = page.token
        if not token:
            return found


def model_version_of(client: Any, namespace: str, version: str) -> str | None:
    """The number of store ``version``'s model version, or None if it was never registered."""
    query = f"name='{registered_model_name(namespace)}' and tags.`{TAG_VERSION}` = '{version}'"
    page = retry(lambda: client.search_model_versions(query, max_results=100), "search_model_versions")
    numbers = sorted(int(model_version.version) for model_version in page)
    return str(numbers[0]) if numbers else None


def _aliases(client: Any, model: str) -> dict[str, str]:
    """Alias -> model version number of registered model ``model`` (empty if there is no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        found = retry(lambda: client.get_registered_model(model), "get_registered_model")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(number) for alias, number in found.aliases.items()}


def _set_alias(
    client: Any, namespace: str, tag: str, version: str, number: str | None, current: str | None
) -> AliasMirror:
    model = registered_model_name(namespace)
    if number is None:
        return AliasMirror(
            AliasOutcome.NOT_REGISTERED,
            model,
            tag,
            version,
            None,
            f"MLflow: {version} of namespace {namespace!r} is not in the model registry (published while MLflow "
            f"was unreachable, or before tracking): no alias models:/{model}@{tag}",
        )
    where = f"models:/{model}@{tag} -> model version {number} ({version})"
    if current == number:
        return AliasMirror(AliasOutcome.UNCHANGED, model, tag, version, number, f"MLflow: {where}")
    retry(lambda: client.set_registered_model_alias(model, tag, number), "set_alias")
    return AliasMirror(AliasOutcome.SET, model, tag, version, number, f"MLflow: {where}")


def mirror_tag(namespace: str, tag: str, version: str | None, uri: str | None = None) -> AliasMirror:
    """Mirror store tag ``tag`` of ``namespace`` as an alias of its registered model: pointing at the model
    version of store ``version``, or deleted when ``version`` is None (``sharecl untag``).

    What ``sharecl tag``/``untag`` call after moving the store's tag (the store is the truth; the
    coordinator also syncs every tag with each version it registers, so a tag set just before the
    version's model version existed is mirrored then). Never raises: the outcome says what happened,
    its ``message`` is one line for people. ``uri``: the tracking URI, as ``resolve_mlflow_uri``; the
    registry is MLflow's for it (``$MLFLOW_REGISTRY_URI`` if set, else the tracking store), as for the
    coordinator. A sqlite store that does not exist yet is not created (nothing can be registered there).
    """
    model = registered_model_name(namespace)
    problem = alias_problem(tag)
    if problem is not None:
        return AliasMirror(AliasOutcome.INVALID, model, tag, version, None, problem)
    resolved = resolve_mlflow_uri(uri)
    sqlite = _sqlite_file(resolved)
    if sqlite is not None and not sqlite.is_file():
        return AliasMirror(
            AliasOutcome.NOT_REGISTERED, model, tag, version, None, f"MLflow: no store at {resolved} yet: no alias"
        )
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=resolved)
        if version is None:
            if tag not in _aliases(client, model):
                return AliasMirror(AliasOutcome.UNCHANGED, model, tag, None, None, f"MLflow: no alias {model}@{tag}")
            retry(lambda: client.delete_registered_model_alias(model, tag), "delete_alias")
            return AliasMirror(AliasOutcome.DELETED, model, tag, None, None, f"MLflow: alias {model}@{tag} deleted")
        number = model_version_of(client, namespace, version)
        current = _aliases(client, model).get(tag) if number is not None else None
        return _set_alias(client, namespace, tag, version, number, current)
    except Exception as err:
        return AliasMirror(
            AliasOutcome.FAILED,
            model,
            tag,
            version,
            None,
            f"MLflow at {resolved}: alias {model}@{tag} not mirrored ({type(err).__name__}: {err}); the store's tag "
            "is set, and the coordinator mirrors it with the next version it registers",
        )


def sync_aliases(client: Any, namespace: str, tags: Mapping[str, str]) -> list[AliasMirror]:
    """Point the alias of every store tag (tag -> store version) at that version's model version.

    Aliases of tags that no longer exist are left (``sharecl untag`` deletes them through ``mirror_tag``);
    MLflow errors raise (``client``: an ``MlflowClient``).
    """
    model = registered_model_name(namespace)
    numbers = model_versions(client, namespace)
    current = _aliases(client, model)
    out = []
    for tag, version in sorted(tags.items()):
        problem = alias_problem(tag)
        if problem is not None:
            out.append(AliasMirror(AliasOutcome.INVALID, model, tag, version, None, problem))
            continue
        out.append(_set_alias(client, namespace, tag, version, numbers.get(version), current.get(tag)))
    return out


def _sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI, None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
