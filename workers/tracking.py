"""MLflow for task jobs: one run per task training, a child of its job's run.

Runs are addressed by id through ``MlflowClient`` (never the fluent ``mlflow.start_run`` stack), so
several runs can be open in one process and nothing depends on thread-local state. Tags name the job
and the task (names in ``subspace_store.tracking``), which is how ``sharecl status`` and a retried
attempt find a task's runs again.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from subspace_store.tracking import PARENT_TAG, RUN_NAME_TAG, TAG_JOB, TAG_STATUS, TAG_TASK, retry
from subspace_store.tracking import ensure_experiment as _ensure_experiment

_PARAM_MAX = 6000  # MLflow refuses longer param values
_TAG_MAX = 5000


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, created if missing."""
    return _ensure_experiment(client(uri), uri, name)


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."


class TrackedRun:
    """One open MLflow run. Step metrics are best effort (a tracking hiccup must not throw away a
    training run, nor an outage stall it); creating, params, final metrics and the outcome raise after retries.

    A best-effort call that fails (after the usual retries) starts a cool-down of ``BEST_EFFORT_COOLDOWN_S``:
    best-effort calls until then are skipped, and the first one after it is tried once, without retries
    (each MLflow call of an outage costs MLflow's own HTTP retries). One warning is printed per run.
    """

    BEST_EFFORT_COOLDOWN_S = 60.0

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._client = client(uri)
        self._warned = False
        self._failed_at: float | None = None  # time.monotonic() of the last failed best-effort call

    @classmethod
    def start(
        cls,
        uri: str,
        experiment_id: str,
        name: str,
        tags: Mapping[str, Any],
        parent_run_id: str | None = None,
    ) -> TrackedRun:
        mlflow_client = client(uri)
        all_tags = {RUN_NAME_TAG: name, **{k: str(v) for k, v in tags.items()}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = retry(lambda: mlflow_client.create_run(experiment_id, tags=all_tags, run_name=name), "create_run")
        return cls(uri, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            chunk = items[i : i + 100]
            retry(lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk), "log_params")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *, best_effort: bool = False) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        if not items:
            return

        def call() -> None:
            self._client.log_batch(self.run_id, metrics=items)

        if best_effort:
            self._best_effort(call)
        else:
            retry(call, "log_metrics")

    def _best_effort(self, call: Callable[[], None]) -> None:
        """``call()`` with retries while MLflow answers; skipped for ``BEST_EFFORT_COOLDOWN_S`` after a failure,
        then tried once. Failures are printed (the first only), never raised."""
        failed_at = self._failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.BEST_EFFORT_COOLDOWN_S:
            return
        try:
            if failed_at is None:
                retry(call, "log_metrics")
            else:
                call()
        except Exception as err:
            self._failed_at = time.monotonic()
            if not self._warned:
                print(
                    f"[sharecl] warning: MLflow metrics not logged ({err}); training goes on, and step metrics "
                    f"are skipped for {self.BEST_EFFORT_COOLDOWN_S:.0f}s after each failure",
                    file=sys.stderr,
                )
                self._warned = True
        else:
            self._failed_at = None

    def log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        """One metric at many steps, e.g. the loss of every training step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(step)) for step, v in points if math.isfinite(float(v))]
        for i in range(0, len(items), 1000):  # MLflow's per-batch metric limit
            chunk = items[i : i + 1000]
            retry(lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk), "log_series")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:_TAG_MAX]) for k, v in tags.items()]
        retry(lambda: self._client.log_batch(self.run_id, tags=items), "set_tags")

    def log_text(self, text: str, artifact_file: str) -> None:
        """A small text artifact (e.g. a CSV) of this run."""
        retry(lambda: self._client.log_text(self.run_id, text, artifact_file), "log_text")

    def finish(self, status: str = "FINISHED") -> None:
        retry(lambda: self._client.set_terminated(self.run_id, status), "set_terminated")


def find_runs(uri: str, experiment_id: str, filter_string: str, max_results: int = 1000) -> list[Any]:
    mlflow_client = client(uri)
    return list(
        retry(
            lambda: mlflow_client.search_runs([experiment_id], filter_string, max_results=max_results),
            "search_runs",
        )
    )


def close_stale_attempts(uri: str, experiment_id: str, job_id: str, task: str, status: str = "KILLED") -> int:
    """Mark runs of ``task`` in ``job_id`` that are still RUNNING as ended (their worker died: a retried
    attempt, or the job driver gave up on it). Returns how many were closed."""
    runs = find_runs(
        uri,
        experiment_id,
        f"tags.`{TAG_JOB}` = '{job_id}' and tags.`{TAG_TASK}` = '{task}' and attributes.status = 'RUNNING'",
    )
    mlflow_client = client(uri)
    for run in runs:
        run_id = run.info.run_id
        retry(lambda run_id=run_id: mlflow_client.set_tag(run_id, TAG_STATUS, "worker died"), "set_tag")
        retry(lambda run_id=run_id: mlflow_client.set_terminated(run_id, status), "set_terminated")
    return len(runs)


def progress_logger(run: TrackedRun | None, label: str, total_steps: int) -> Callable[[int, dict[str, float]], None]:
    """``on_metrics`` for ``workers.train.train``: the loss curve as MLflow step metrics plus one log
    line per report (Ray forwards worker output to the driver, so the user sees training progress)."""

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({f"train_{k}": v for k, v in metrics.items()}, step=step, best_effort=True)
        print(
            f"[{label}] step {step}/{total_steps} loss {metrics.get('loss', math.nan):.4f} "
            f"({metrics.get('examples_per_s', math.nan):.1f} ex/s, {metrics.get('elapsed_s', 0.0):.0f}s)",
            file=sys.stderr,
            flush=True,
        )

    return on_metrics
