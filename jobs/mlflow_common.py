"""MLflow plumbing shared by the workers' and the coordinator's runs (they never import each other).

Runs are addressed by id through ``MlflowClient``. The default store is one sqlite file that
workers and the coordinator write at once, so sqlite's "database is locked" is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
T = TypeVar("T")
_ATTEMPTS = 6


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
            raise ValueError(
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
