"""MLflow for merges: one experiment per store namespace, one run per merge.

The run is created before the publish, so the version can name it (``metadata["mlflow_run_id"]``),
and finished after it from the published manifest (``MergeRecord``). If the coordinator dies in
between, ``reconcile`` (run at every start) completes the runs whose version exists and marks the
others FAILED: their submissions were still pending and were merged by a later run.

Tracking is best effort: an MLflow outage is logged and merging goes on. Runs are addressed by id
through ``MlflowClient`` (no fluent, thread-local ``mlflow.start_run`` state).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from subspace_store.keys import version_number
from subspace_store.tracking import (
    ACCURACY_METRIC,
    RUN_NAME_TAG,
    TAG_KIND,
    TAG_NAMESPACE,
    TAG_NEW_TASKS,
    TAG_STATUS,
    TAG_VERSION,
    RunKind,
    ensure_experiment,
    retry,
)

from .matrix import AccuracyMatrix
from .record import MergeRecord

log = logging.getLogger(__name__)

MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"
_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch
_TAG_MAX = 5000


class MergeTracker:
    def __init__(self, uri: str, experiment: str, namespace: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.namespace = namespace
        self.client = MlflowClient(tracking_uri=uri)
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._ensure_experiment()
        return self._experiment_id

    def _ensure_experiment(self) -> str:
        return ensure_experiment(self.client, self.uri, self.experiment)

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
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        step = version_number(record.version) or 0
        metrics = {**record.metrics(), **extra_metrics, **{ACCURACY_METRIC + t: a for t, a in accuracy.items()}}
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        params = [
            Param("version", record.version),
            Param("parent", str(record.parent)),
            Param("new_tasks", " ".join(record.new_tasks)[:6000]),
            Param("submissions", " ".join(f"{t}={s}" for t, s in record.submissions.items())[:6000]),
        ]
        tags = [RunTag(TAG_VERSION, record.version), RunTag(RUN_NAME_TAG, f"merge {record.version}")]
        tags += [RunTag(f"eval_error/{t}", msg[:_TAG_MAX]) for t, msg in eval_errors.items()]
        for i in range(0, max(len(items), 1), _METRICS_PER_BATCH):
            chunk = items[i : i + _METRICS_PER_BATCH]
            retry(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk), "log_metrics")
        # A run restarted after a crash may already hold these params (MLflow refuses changing them).
        logged = retry(lambda: self.client.get_run(run_id), "get_run").data.params
        params = [p for p in params if p.key not in logged]
        retry(lambda: self.client.log_batch(run_id, params=params, tags=tags), "log_params")
        if matrix.rows:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                matrix.write_csv(folder / MATRIX_CSV)
                matrix.write_heatmap(folder / MATRIX_PNG, title=f"{self.namespace}: accuracy after each merge")
                retry(lambda: self.client.log_artifacts(run_id, str(folder)), "log_artifacts")
        retry(lambda: self.client.set_tag(run_id, TAG_STATUS, "published"), "set_tag")
        retry(lambda: self.client.set_terminated(run_id, "FINISHED"), "set_terminated")

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
