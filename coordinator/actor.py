"""The coordinator as a named, detached Ray actor that Ray restarts whenever it dies.

One actor per store namespace (``sharecl-coordinator-<namespace>`` in Ray namespace ``sharecl``).
Its merge loop runs in a background thread; methods answer while it runs (``max_concurrency``).
A restart reruns ``__init__`` with the same settings: the loop starts again, takes back the
submissions the dead incarnation held (same consumer name) and completes its MLflow run.
Calls in flight when it dies are retried on the new incarnation (``max_task_retries=-1``).

``stop`` ends the loop after its current step and ends every MLflow run it opened, so a caller that
waits for it (the job driver before it shuts Ray down) never leaves a run RUNNING. An actor that had
nothing to merge and no call for ``idle_timeout_s`` stops the same way and removes itself
(``sharecl coordinator stop`` removes one at once).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray
import torch

from subspace_store import redact, resolve_url
from subspace_store.tracking import resolve_mlflow_uri

from .config import CoordinatorConfig, CoordinatorConfigError, build
from .service import StepResult

log = logging.getLogger(__name__)

RAY_NAMESPACE = "sharecl"


def actor_name(namespace: str) -> str:
    return f"sharecl-coordinator-{namespace}"


class CoordinatorActor:
    def __init__(self, config: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = CoordinatorConfig.from_dict(config)
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)  # its own process: no one else's setting
        self.service = build(self.config)
        self.started = time.time()
        self.idle_steps = 0  # steps that found nothing to do: flush waits for one after settling
        self.last_step = 0.0
        self._last_activity = time.monotonic()  # a step that read something, or a call
        self._idle_exit = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coordinator-loop", daemon=True)
        self._thread.start()
        log.info("coordinator for namespace %r started (pid %d)", self.config.namespace, os.getpid())

    def _loop(self) -> None:
        self.service.run_forever(
            self._stop, max_batch=self.config.max_batch, block_ms=self.config.block_ms, on_step=self._on_step
        )
        if self._idle_exit:
            left = self.service.close()
            log.info(
                "coordinator for namespace %r idle for %.0fs: exiting (MLflow runs left open: %s)",
                self.config.namespace,
                self.config.idle_timeout_s,
                left or "none",
            )
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _on_step(self, result: StepResult) -> None:
        self.last_step = time.time()
        if result.read == 0:
            self.idle_steps += 1
        else:
            self._active()
        timeout = self.config.idle_timeout_s
        if timeout and time.monotonic() - self._last_activity > timeout and self._settled():
            self._idle_exit = True
            self._stop.set()

    def _settled(self) -> bool:
        try:
            return self.service.stream.is_settled()
        except Exception:  # Redis unreachable: not idle in any sense that allows leaving
            return False

    def _active(self) -> None:
        self._last_activity = time.monotonic()

    # -- remote methods ------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        self._active()
        return self.config.to_dict()

    def touch(self) -> None:
        """Keep an idle coordinator alive (a job driver calls it while its tasks train)."""
        self._active()

    def status(self) -> dict[str, Any]:
        self._active()
        stream = self.service.stream
        return {
            **self.service.status(),
            "pid": os.getpid(),
            "running": self._thread.is_alive() and not self._stop.is_set(),
            "loop_alive": self._thread.is_alive(),
            "started": self.started,
            "last_step": self.last_step,
            "idle_s": time.monotonic() - self._last_activity,
            "open_runs": self.service.open_runs,
            "pending": len(stream.pending()),
            "settled": stream.is_settled(),
            "crashes": self.service.crash.fired(),
        }

    def flush(self, timeout_s: float = 300.0) -> dict[str, Any]:
        """Wait until every submission so far is merged or rejected and the loop has finished with it
        (its MLflow run included). Raises TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        stream = self.service.stream
        while time.monotonic() < deadline:
            self._active()
            if not self._thread.is_alive():
                raise RuntimeError("the coordinator loop is not running; call stop() only to shut it down")
            if stream.is_settled():
                seen = self.idle_steps
                while self.idle_steps == seen and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.idle_steps != seen and stream.is_settled():
                    return self.status()
            else:
                time.sleep(0.1)
        raise TimeoutError(
            f"submissions of namespace {self.config.namespace!r} still pending after {timeout_s:.0f}s "
            f"({len(stream.pending())} delivered, not settled); check status() for the last error"
        )

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Stop the merge loop after its current step and end the MLflow runs it opened (the actor
        stays; ``stop_coordinator`` removes it), all within ``timeout_s``: a background compaction is
        waited for only with what is left of it. ``loop_alive`` and ``open_runs`` in the returned
        status say whether the loop and the runs finished; ``compacting`` that a compaction still runs
        (it lands or not on its own: a full copy of the head it read)."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.service.close(wait_s=max(deadline - time.monotonic(), 0.0))
        return {
            **self.service.status(),
            "pid": os.getpid(),
            "running": False,
            "loop_alive": self._thread.is_alive(),
            "open_runs": self.service.open_runs,
        }


def get_or_start_coordinator(
    namespace: str = "default",
    redis_url: str | None = None,
    mlflow_uri: str | None = None,
    *,
    tracking: bool = True,
    num_cpus: float = 0,
    **settings: Any,
) -> Any:
    """The namespace's coordinator actor, started if it is not running (needs ``ray.init`` first).

    ``redis_url`` and ``mlflow_uri`` are resolved here, in the caller's process (the embedded Redis
    is started if needed; MLflow defaults to ``subspace_store.tracking.resolve_mlflow_uri``), so the actor gets
    concrete addresses wherever Ray places it. ``settings`` are further ``CoordinatorConfig`` fields.
    An existing actor is reused; it must use the same Redis. ``num_cpus`` is 0 by default so the
    coordinator never takes a CPU slot a training task needs.
    """
    url = resolve_url(redis_url)
    uri = resolve_mlflow_uri(mlflow_uri) if tracking else None
    config = CoordinatorConfig(namespace=namespace, redis_url=url, mlflow_uri=uri, **settings)
    handle = (
        ray.remote(CoordinatorActor)
        .options(
            name=actor_name(namespace),
            namespace=RAY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=4,
            num_cpus=num_cpus,
        )
        .remote(config.to_dict())
    )
    running = ray.get(handle.settings.remote())
    if running["redis_url"] != url:
        raise CoordinatorConfigError(
            f"a coordinator for namespace {namespace!r} already runs against Redis {redact(running['redis_url'])}, "
            f"not {redact(url)}; stop it first (coordinator.actor.stop_coordinator({namespace!r}))"
        )
    different = sorted(k for k, v in config.to_dict().items() if running.get(k) != v)
    if different:
        log.warning("reusing the running coordinator of %r; its settings differ in %s", namespace, different)
    return handle


def find_coordinator(namespace: str = "default") -> Any | None:
    """The running coordinator actor of ``namespace``, or None."""
    try:
        return ray.get_actor(actor_name(namespace), namespace=RAY_NAMESPACE)
    except ValueError:
        return None


def stop_coordinator(namespace: str = "default", timeout_s: float = 60.0) -> dict[str, Any] | None:
    """Stop the namespace's coordinator after its current step (its MLflow runs ended) and remove the
    actor. Returns its last status (``open_runs``: runs it could not end), or None if none ran."""
    handle = find_coordinator(namespace)
    if handle is None:
        return None
    try:
        status: dict[str, Any] = ray.get(handle.stop.remote(timeout_s), timeout=timeout_s + 30)
    except (ray.exceptions.RayError, TimeoutError) as err:
        log.warning("the coordinator of %r did not stop cleanly (%s); removing it", namespace, err)
        status = {"namespace": namespace, "loop_alive": True, "open_runs": [], "error": f"{type(err).__name__}: {err}"}
    finally:
        ray.kill(handle, no_restart=True)
    # ray.kill returns before the actor's name is released: wait (bounded) so that a caller that stops and
    # then looks up or starts the namespace's coordinator never finds the dying one.
    deadline = time.monotonic() + 30.0
    while find_coordinator(namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    return status
