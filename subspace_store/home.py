"""Where the project keeps its local state: the data folder (``$SHARECL_HOME``, else ``./.sharecl``).

The embedded Redis lives in ``<data folder>/redis`` and MLflow's default sqlite store in
``<data folder>/mlflow.db``. Light on imports: every layer above reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import StoreError

HOME_ENV = "SHARECL_HOME"


def data_dir() -> Path:
    """The project's data folder: ``$SHARECL_HOME``, else ``./.sharecl``; absolute, created on demand."""
    configured = os.environ.get(HOME_ENV, "").strip()
    folder = Path(configured).expanduser() if configured else Path(".sharecl")
    # Absolute now, so that a later chdir (Ray workers, tests) cannot move it.
    folder = folder.absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(
            f"cannot create the data folder {folder} ({err.strerror}); set {HOME_ENV} to a writable folder"
        ) from err
    return folder


def embedded_redis_folder() -> Path:
    """The embedded Redis server's folder: ``<data folder>/redis``."""
    return data_dir() / "redis"
