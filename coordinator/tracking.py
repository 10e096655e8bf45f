"""MLflow for merges: one experiment per store namespace, one run per merge, one model version per version.

The run is created before the publish, so the version can name it (``metadata["mlflow_run_id"]``),
and finished after it from the published manifest (``MergeRecord``). If the coordinator dies in
between, ``reconcile`` (run at every start) completes the runs whose version exists and marks the
others FAILED: their submissions were still pending and were merged by a later run.

Finishing a run also
- nests it under the run of the job whose task entered first (``mlflow.parentRunId``; the other jobs'
  runs are named in ``sharecl.job_runs``), so job -> tasks -> merges reads as a tree;
- logs every task's accuracy and reconstruction error at step = version number on the merge run and on
  the run of the job that trained the task (a job run's series are its tasks' forgetting curves);
- logs the version's manifest and a pointer file as artifacts (``sharecl_version/``) and registers
  them as a model version of ``sharecl-<namespace>`` (tags: store version, tasks, parent), then points
  the registered model's aliases at the store's tags (``subspace_store.tracking.sync_aliases``).

Tracking is best effort: an MLflow outage is logged and merging goes on. Runs are addressed by id
through ``MlflowClient`` (no fluent, thread-local ``mlflow.start_run`` state).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from subspace_store.keys import version_number
from subspace_store.tracking import (
    ACCURACY_METRIC,
    NO_VALUE,
    PARENT_TAG,
    RECONSTRUCTION_METRIC,
    RUN_NAME_TAG,
    TAG_JOB,
    TAG_JOB_RUNS,
    TAG_JOBS,
    TAG_KIND,
    TAG_NAMESPACE,
    TAG_NEW_TASKS,
    TAG_PARENT_VERSION,
    TAG_REGISTRY_ERROR,
    TAG_STATUS,
    TAG_TASKS,
    TAG_VERSION,
    VERSION_ARTIFACTS,
    RunKind,
    ensure_experiment,
    model_version_of,
    registered_model_name,
    retry,
    sync_aliases,
)

from .matrix import AccuracyMatrix
from .record import MergeRecord

log = logging.getLogger(__name__)

MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"
MANIFEST_JSON = "manifest.json"  # in VERSION_ARTIFACTS: the version's manifest as the store holds it
POINTER_JSON = "pointer.json"  # in VERSION_ARTIFACTS: namespace, version, tasks and how to pull it
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
_TAG_MAX = 5000

StoreTags = Callable[[], Mapping[str, str]]


class MergeTracker:
    """``store_tags`` (e.g. ``SubspaceStore.tags``) gives the store's tags, mirrored as registry aliases
    after each version is registered; None: aliases are mirrored only by ``sharecl tag``."""

    def __init__(self, uri: str, experiment: str, namespace: str, *, store_tags: StoreTags | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.namespace = namespace
        self.store_tags = store_tags
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None
        self._job_runs: dict[str, str | None] = {}  # job id -> its MLflow run (None: it has none)

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._ensure_experiment()
        return self._experiment_id

    def _ensure_experiment(self) -> str:
        return ensure_experiment(self.client, self.uri, self.experiment)

    @property
    def model_name(self) -> str:
        """The registered model of this namespace's versions."""
        return registered_model_name(self.namespace)

    # -- one merge -----------------------------------------------------------------------------
    def start(self, parent: str | None, new_tasks: list[str]) -> str | None:
        """Open the run of a merge about to be published; None if MLflow is unreachable."""
        name = f"merge {parent or 'init'} +{len(new_tasks)}"
        tags = {
            TAG_KIND: RunKind.MERGE,
            TAG_NAMESPACE: self.namespace,
            TAG_STATUS: "publishing",
            TAG_NEW_TASKS: " ".join(new_tasks)[:_TAG_MAX],
            RUN_NAME_TAG: name,
        }
        try:
            run = retry(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=name), "create_run")
            return run.info.run_id
        except Exception as err:
            log.warning("MLflow run for merge of %s not created (%s); merging goes on untracked", new_tasks, err)
            return None

    def finish(
        self,
        run_id: str | None,
        record: MergeRecord,
        matrix: AccuracyMatrix,
        accuracy: dict[str, float],
        eval_errors: dict[str, str],
        extra_metrics: dict[str, float] | None = None,
    ) -> bool:
        """Log everything of the published merge into its run and end it. Best effort: False (logged)
        when MLflow did not take it (the coordinator tries again at its next step, or its next start)."""
        if run_id is None:
            return True
        try:
            self._finish(run_id, record, matrix, accuracy, eval_errors, extra_metrics or {})
            return True
        except Exception as err:
            log.warning("MLflow run %s of %s not completed (%s); tried again later", run_id, record.version, err)
            return False

    def _finish(
        self,
        run_id: str,
        record: MergeRecord,
        matrix: AccuracyMatrix,
        accuracy: dict[str, float],
        eval_errors: dict[str, str],
        extra_metrics: dict[str, float],
    ) -> None:
        from mlflow.entities import Param, RunTag

        step = version_number(record.version) or 0
        params = [
            Param("version", record.version),
            Param("parent", str(record.parent)),
            Param("new_tasks", " ".join(record.new_tasks)[:6000]),
            Param("submissions", " ".join(f"{t}={s}" for t, s in record.submissions.items())[:6000]),
        ]
        tags = [RunTag(TAG_VERSION, record.version), RunTag(RUN_NAME_TAG, f"merge {record.version}")]
        tags += [RunTag(f"eval_error/{t}", msg[:_TAG_MAX]) for t, msg in eval_errors.items()]
        tags += [RunTag(k, v) for k, v in self._nesting(record).items()]
        # A run restarted after a crash may already hold these params (MLflow refuses changing them).
        logged = retry(lambda: self.client.get_run(run_id), "get_run").data.params
        params = [p for p in params if p.key not in logged]
        retry(lambda: self.client.log_batch(run_id, params=params, tags=tags), "log_params")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if matrix.rows:
                matrix.write_csv(folder / MATRIX_CSV)
                matrix.write_heatmap(folder / MATRIX_PNG, title=f"{self.namespace}: accuracy after each merge")
            version_folder = folder / VERSION_ARTIFACTS
            version_folder.mkdir()
            # Not indented: json's C encoder only writes compact JSON (indenting is pure Python, slow at many tasks);
            # MLflow's artifact viewer lays JSON out itself.
            (version_folder / MANIFEST_JSON).write_text(json.dumps(record.manifest, sort_keys=True))
            (version_folder / POINTER_JSON).write_text(json.dumps(self._pointer(run_id, record), indent=1))
            retry(lambda: self.client.log_artifacts(run_id, str(folder)), "log_artifacts")
        # Metrics after what reads the run back (the params check, the artifact store's lookup): a read of a run
        # loads every metric it holds, and a merge run holds three per task.
        metrics = {**record.metrics(), **extra_metrics, **{ACCURACY_METRIC + t: a for t, a in accuracy.items()}}
        self._log_metrics(run_id, metrics, step)
        self._log_job_curves(record, accuracy, step)
        self._register(run_id, record)
        retry(lambda: self.client.set_tag(run_id, TAG_STATUS, "published"), "set_tag")
        retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "set_terminated")

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            chunk = items[i : i + _METRICS_PER_BATCH]
            retry(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk), "log_metrics")

    # -- the run tree and the jobs' curves -----------------------------------------------------
    def job_run(self, job_id: str, task_run: str | None) -> str | None:
        """The MLflow run of sharecl job ``job_id``, found from one of its task runs (the task run's
        parent; the job's own tag otherwise), or None. Remembered per job."""
        if job_id not in self._job_runs:
            self._job_runs[job_id] = self._find_job_run(job_id, task_run)
        return self._job_runs[job_id]

    def _find_job_run(self, job_id: str, task_run: str | None) -> str | None:
        if task_run:
            try:
                parent = retry(lambda: self.client.get_run(task_run), "get_run").data.tags.get(PARENT_TAG)
            except Exception as err:  # a task run deleted since: look for the job's run by its tags
                log.debug("task run %s of job %s not readable (%s)", task_run, job_id, err)
            else:
                if parent:
                    return parent
        query = f"tags.`{TAG_KIND}` = '{RunKind.JOB}' and tags.`{TAG_JOB}` = '{job_id}'"
        runs = retry(lambda: self.client.search_runs([self.experiment_id], query, max_results=1), "search_runs")
        return runs[0].info.run_id if runs else None

    def _jobs_of(self, record: MergeRecord, tasks: list[str]) -> dict[str, str]:
        """Job id -> its run, for the jobs that trained ``tasks`` (in the order of ``tasks``)."""
        out: dict[str, str] = {}
        for task in tasks:
            job_id = record.jobs.get(task)
            if job_id is None or job_id in out:
                continue
            run = self.job_run(job_id, record.task_runs.get(task))
            if run is not None:
                out[job_id] = run
        return out

    def _nesting(self, record: MergeRecord) -> dict[str, str]:
        """Tags nesting a merge run under the run of the job whose task entered first; the other
        jobs' ids and runs tagged. Empty when no job trained its new tasks (``sharecl add``, removals)."""
        try:
            jobs = self._jobs_of(record, record.new_tasks)
        except Exception as err:
            log.warning(
                "jobs of the merge of %s not found in MLflow (%s); its run stays top-level", record.version, err
            )
            return {}
        if not jobs:
            return {}
        return {
            PARENT_TAG: next(iter(jobs.values())),
            TAG_JOBS: " ".join(jobs)[:_TAG_MAX],
            TAG_JOB_RUNS: " ".join(jobs.values())[:_TAG_MAX],
        }

    def _log_job_curves(self, record: MergeRecord, accuracy: Mapping[str, float], step: int) -> None:
        """Each task's accuracy and reconstruction error in this version, at step = version number, on
        the run of the job that trained it. Best effort (a deleted job run must not block the merge's run)."""
        try:
            runs = self._jobs_of(record, record.tasks)
            for job_id, run in runs.items():
                tasks = [t for t in record.tasks if record.jobs.get(t) == job_id]
                metrics = {ACCURACY_METRIC + t: accuracy[t] for t in tasks if t in accuracy}
                metrics |= {
                    RECONSTRUCTION_METRIC + t: record.reconstruction_error[t]
                    for t in tasks
                    if t in record.reconstruction_error
                }
                self._log_metrics(run, metrics, step)
        except Exception as err:
            log.warning("forgetting curves of %s not logged on the job runs (%s)", record.version, err)

    # -- the model registry --------------------------------------------------------------------
    def _pointer(self, run_id: str, record: MergeRecord) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "version": record.version,
            "parent": record.parent,
            "tasks": record.tasks,
            "created": record.created,
            "mlflow_run_id": run_id,
            "pull": f"sharecl pull {record.version} --namespace {self.namespace} -o DIR",
        }

    def _register(self, run_id: str, record: MergeRecord) -> None:
        """The version as a model version of the namespace's registered model (once, also when a run is
        finished again after a crash), then the store's tags as its aliases. Best effort: a registry that
        refuses leaves a ``sharecl.registry_error`` tag on the run."""
        try:
            number = model_version_of(self.client, self.namespace, record.version)
            if number is None:
                number = self._create_model_version(run_id, record)
            if self.store_tags is not None:
                for mirror in sync_aliases(self.client, self.namespace, self.store_tags()):
                    if not mirror.ok:
                        log.info("%s", mirror.message)
            log.info("%s is model version %s of %s", record.version, number, self.model_name)
        except Exception as err:
            log.warning("%s not registered in the MLflow model registry (%s)", record.version, err)
            text = f"{type(err).__name__}: {err}"[:_TAG_MAX]
            retry(lambda: self.client.set_tag(run_id, TAG_REGISTRY_ERROR, text), "set_tag")

    def _create_model_version(self, run_id: str, record: MergeRecord) -> str:
        from mlflow.exceptions import MlflowException

        try:
            retry(
                lambda: self.client.create_registered_model(
                    self.model_name,
                    tags={TAG_NAMESPACE: self.namespace},
                    description=(
                        f"share-cl namespace {self.namespace!r}: one model version per published store version "
                        f"(its manifest and a pointer, from the merge run's {VERSION_ARTIFACTS}/ artifacts). "
                        f"Aliases mirror the store's tags: models:/{self.model_name}@prod is what "
                        f"`sharecl pull prod --namespace {self.namespace}` pulls."
                    ),
                ),
                "create_registered_model",
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tasks = ",".join(record.tasks)
        tags = {
            TAG_NAMESPACE: self.namespace,
            TAG_VERSION: record.version,
            TAG_PARENT_VERSION: record.parent or NO_VALUE,
            TAG_TASKS: tasks if len(tasks) <= _TAG_MAX else tasks[: _TAG_MAX - 3] + "...",
            "sharecl.num_tasks": str(len(record.tasks)),
            TAG_NEW_TASKS: " ".join(record.new_tasks)[:_TAG_MAX],
        }
        removed = record.extra.get("removed_tasks")
        if removed:
            tags["sharecl.removed_tasks"] = " ".join(removed)[:_TAG_MAX]
        description = (
            f"{record.version} of namespace {self.namespace!r}: {len(record.tasks)} task(s), parent "
            f"{record.parent or 'none'}; pull it with `sharecl pull {record.version} --namespace {self.namespace}`"
        )
        created = retry(
            lambda: self.client.create_model_version(
                self.model_name,
                f"runs:/{run_id}/{VERSION_ARTIFACTS}",
                run_id=run_id,
                tags=tags,
                description=description,
            ),
            "create_model_version",
        )
        return str(created.version)

    def abandon(self, run_id: str | None, reason: str) -> bool:
        """End a run whose merge was not published (head conflict, crash) as FAILED with the reason:
        its submissions stay pending. False (logged) when MLflow could not be reached."""
        return self.fail(run_id, f"not published: {reason}")

    def fail(self, run_id: str | None, status: str) -> bool:
        """End a run as FAILED with ``status`` as its status tag. False (logged) when MLflow could not be reached."""
        if run_id is None:
            return True
        try:
            retry(lambda: self.client.set_tag(run_id, TAG_STATUS, status[:_TAG_MAX]), "set_tag")
            retry(lambda: self.client.set_terminated(run_id, "FAILED"), "set_terminated")
            return True
        except Exception as err:
            log.warning("MLflow run %s could not be closed (%s)", run_id, err)
            return False

    # -- restart -------------------------------------------------------------------------------
    def open_runs(self) -> list[str]:
        """Ids of merge runs left RUNNING by an incarnation that died."""
        return [run.info.run_id for run in merge_runs(self.client, self.experiment_id, self.namespace, "RUNNING")]

    def load_matrix(self) -> AccuracyMatrix:
        """The accuracy matrix so far, from the finished merge runs (how a restart picks it up)."""
        return load_matrix(self.client, self.experiment_id, self.namespace)


def merge_runs(client: Any, experiment_id: str, namespace: str, status: str) -> list[Any]:
    """The merge runs of ``namespace`` whose MLflow status is ``status`` (every page)."""
    query = (
        f"tags.`{TAG_KIND}` = '{RunKind.MERGE}' and tags.`{TAG_NAMESPACE}` = '{namespace}' "
        f"and attributes.status = '{status}'"
    )
    runs: list[Any] = []
    token = None
    while True:
        page = retry(
            lambda token=token: client.search_runs([experiment_id], query, max_results=1000, page_token=token),
            "search_runs",
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def load_matrix(client: Any, experiment_id: str, namespace: str) -> AccuracyMatrix:
    """The accuracy matrix of ``namespace`` from its finished merge runs (``client``: an ``MlflowClient``).

    The one reader of the matrix: the coordinator picks it up with it after a restart, the job driver
    reports it.
    """
    matrix = AccuracyMatrix()
    for run in merge_runs(client, experiment_id, namespace, "FINISHED"):
        version = run.data.tags.get(TAG_VERSION)
        accuracy = {k[len(ACCURACY_METRIC) :]: v for k, v in run.data.metrics.items() if k.startswith(ACCURACY_METRIC)}
        if version and accuracy:
            matrix.add(version, run.data.tags.get(TAG_NEW_TASKS, "").split(), accuracy)
    return matrix
