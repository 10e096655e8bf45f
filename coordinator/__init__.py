"""The merge service: validates submissions, merges them in batches, publishes versions, tracks merges.

coordinator = build(CoordinatorConfig(namespace="default", redis_url=...))   # pure logic, no Ray
coordinator.step()                                                           # one batch
handle = coordinator.actor.get_or_start_coordinator("default")               # the Ray actor

Never imports ``workers/``: the two meet only through the store, the stream and Ray handles.
Crash points (``coordinator.crash``) are for tests.
"""

from .config import CoordinatorConfig, build
from .evaluation import Evaluation, load_evaluator
from .matrix import AccuracyMatrix
from .record import MergeRecord
from .service import Coordinator, StepResult
from .tracking import MergeTracker

__all__ = [
    "AccuracyMatrix",
    "Coordinator",
    "CoordinatorConfig",
    "Evaluation",
    "MergeRecord",
    "MergeTracker",
    "StepResult",
    "build",
    "load_evaluator",
]
