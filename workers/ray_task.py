"""Launching task jobs on Ray.

``launch(job, ...)`` schedules :func:`workers.run_task.run_task_job` on the cluster with the job's
resources (``num_gpus`` from ``cluster.num_gpus_per_task``). Ray reruns it if its worker process or
node dies (``max_retries``; the rerun finds what the dead attempt did, see ``recovery``); an error
raised by the task itself (bad data, divergence) is not retried: the driver records the task as failed.

A task that uses GPUs runs in a worker process of its own (``remote_function``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.run_task import run_task_job
from workers.task_job import TaskJob

_REMOTES: dict[tuple[Callable[..., Any], bool], Any] = {}


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
    return remote_function(run_task_job, gpus=num_gpus > 0).options(**options).remote(job)


def remote_function(fn: Callable[..., Any], *, gpus: bool) -> Any:
    """``fn`` as a Ray remote function (made once per function and GPU use). With ``gpus`` each call runs
    in a fresh worker process (``max_calls=1``: the process exits after the call). Ray sets
    CUDA_VISIBLE_DEVICES per call, but torch keeps the CUDA context of the first call a process made, so a
    reused process would run the next task on the previous task's GPU. Ray makes GPU functions
    ``max_calls=1`` by itself only when ``num_gpus`` is given to ``ray.remote``, not per call through
    ``.options`` (which cannot set ``max_calls`` either)."""
    key = (fn, gpus)
    if key not in _REMOTES:
        import ray

        _REMOTES[key] = ray.remote(max_calls=1)(fn) if gpus else ray.remote(fn)
    return _REMOTES[key]
