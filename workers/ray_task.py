"""Launching task jobs on Ray.

``launch(job, ...)`` schedules :func:`workers.run_task.run_task_job` on the cluster with the job's
resources (``num_gpus`` from ``cluster.num_gpus_per_task``). Ray reruns it if its worker process or
node dies (``max_retries``; the rerun finds what the dead attempt did, see ``recovery``); an error
raised by the task itself (bad data, divergence) is not retried: the driver records the task as failed.
"""

from __future__ import annotations

from typing import Any

from workers.run_task import run_task_job
from workers.task_job import TaskJob

_REMOTE: Any = None


def launch(
    job: TaskJob,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_retries: int = 1,
    runtime_env: dict[str, Any] | None = None,
) -> Any:
    """Schedule ``run_task_job(job)`` on the connected Ray cluster; returns its ObjectRef (a ``TaskSummary``).

    ``max_retries`` counts reruns after the worker process or its node died (-1: unlimited);
    exceptions raised by the task are final (``retry_exceptions=False``).
    """
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_retries": max_retries,
        "retry_exceptions": False,
        # The Ray dashboard (and a fault-injection hook in tests) see which task this is.
        "name": f"sharecl:{job.job_id}:{job.task}",
    }
    if runtime_env:
        options["runtime_env"] = runtime_env
    return _remote_run().options(**options).remote(job)


def _remote_run() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(run_task_job)
    return _REMOTE
