"""Where the project keeps its local state, and which service URLs a process should use.

Kept free of heavy imports: the store, the workers, the coordinator and the CLI all import it.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SHARECL_HOME"
REDIS_URL_ENV = "SHARECL_REDIS_URL"
# MLflow's own variable, so a node set up for MLflow works for us without a second name.
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"


def data_dir() -> Path:
    """The project's data folder: ``$SHARECL_HOME``, else ``./.sharecl``; absolute, created on demand."""
    configured = os.environ.get(HOME_ENV, "").strip()
    folder = Path(configured).expanduser() if configured else Path(".sharecl")
    # Absolute now, so that a later chdir (Ray workers, tests) cannot move it.
    folder = folder.absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cannot create the data folder {folder} ({err.strerror}); set {HOME_ENV} to a writable folder"
        ) from err
    return folder


def default_mlflow_uri() -> str:
    """MLflow's tracking URI on one machine: a sqlite file in the data folder."""
    # data_dir() is absolute, so this gives sqlite://// + path, which is what SQLAlchemy expects.
    return f"sqlite:///{data_dir() / 'mlflow.db'}"


def resolve_redis_url(url: str | None = None) -> str | None:
    """The Redis URL to use: ``url`` if given, else ``$SHARECL_REDIS_URL``, else None (embedded Redis)."""
    if url:
        return url
    return os.environ.get(REDIS_URL_ENV, "").strip() or None


def resolve_mlflow_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the sqlite default.

    Cluster nodes export ``MLFLOW_TRACKING_URI`` (see ray_cluster.yaml), so code that calls
    ``mlflow.set_tracking_uri`` must go through this rather than straight to the default.
    """
    if uri:
        return uri
    return os.environ.get(MLFLOW_URI_ENV, "").strip() or default_mlflow_uri()
