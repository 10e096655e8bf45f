"""Named crash points, so tests can kill the coordinator at exact moments of a merge.

A crash point is armed by configuration (``CoordinatorConfig.crash_at`` plus a marker folder). It
fires at most once per marker folder: the marker file is written before the process exits, so the
incarnation that Ray restarts (with the same constructor arguments) runs past it. ``os._exit`` skips
every ``finally`` and atexit handler, which is what a SIGKILL or a lost node looks like.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from share.errors import ShareClError

log = logging.getLogger(__name__)

AFTER_READ = "after_read"  # submissions delivered to this consumer; nothing validated yet
AFTER_MERGE = "after_merge"  # merged in memory; nothing published, nothing acknowledged
AFTER_PUBLISH = "after_publish"  # version published and its submissions acknowledged; MLflow run not finished
POINTS = (AFTER_READ, AFTER_MERGE, AFTER_PUBLISH)
EXIT_CODE = 77


class CrashPoints:
    """``fire(point)`` ends the process at each armed point, once."""

    def __init__(self, points: Sequence[str] = (), marker_dir: str | os.PathLike[str] | None = None) -> None:
        unknown = sorted(set(points) - set(POINTS))
        if unknown:
            raise ShareClError(f"unknown crash point(s) {unknown}; choose from {list(POINTS)}")
        if points and marker_dir is None:
            raise ShareClError("crash points need a marker folder (crash_marker_dir), so that each fires only once")
        self.points = tuple(points)
        self.marker_dir = Path(marker_dir) if marker_dir is not None else None

    def fire(self, point: str) -> None:
        if point not in self.points or self.marker_dir is None:
            return
        marker = self.marker_dir / f"crashed-{point}"
        if marker.exists():
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as handle:
            handle.write(str(os.getpid()))
            handle.flush()
            os.fsync(handle.fileno())
        log.warning("crash point %s armed: exiting the coordinator process (pid %d)", point, os.getpid())
        os._exit(EXIT_CODE)

    def fired(self) -> list[str]:
        """Points that have fired (their markers exist), in ``POINTS`` order."""
        if self.marker_dir is None:
            return []
        return [p for p in POINTS if (self.marker_dir / f"crashed-{p}").exists()]
