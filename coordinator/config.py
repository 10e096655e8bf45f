"""The coordinator's settings (plain JSON-able values, so Ray can hand them to every incarnation) and
the wiring of a ``Coordinator`` from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from share import KPolicy
from subspace_store import SubmissionStream, SubspaceStore, connect

from .crash import CrashPoints
from .evaluation import Evaluation
from .service import Coordinator
from .tracking import MergeTracker


@dataclass
class CoordinatorConfig:
    namespace: str = "default"
    redis_url: str | None = None  # None: $SHARECL_REDIS_URL, else the embedded server
    mlflow_uri: str | None = None  # None: no tracking (get_or_start_coordinator resolves the default)
    experiment: str | None = None  # None: the namespace (one experiment per namespace)
    policy: dict[str, Any] | None = None  # KPolicy fields (k, variance, k_max); None: the head's own
    evaluator: str | None = None  # default evaluator "package.module:function" (see evaluation.py)
    evaluate: bool = True  # False: never evaluate, whatever the submissions carry
    consumer: str = "coordinator"
    max_batch: int = 64
    block_ms: int = 1000
    recover_idle_ms: int = 60_000
    keep_versions: int | None = None
    # torch threads in the coordinator's process. Merges are many small matrix products: one thread
    # is fastest, and more oversubscribe the cores that training workers share (measured: a merge
    # took 10 s with 2 threads on a loaded 2-core machine, 0.03 s with 1). None: torch's default.
    torch_threads: int | None = 1
    crash_at: list[str] = field(default_factory=list)  # tests only: crash points (crash.py)
    crash_marker_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.block_ms < 0:
            raise ValueError(f"block_ms must be >= 0 (got {self.block_ms})")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None (got {self.torch_threads})")
        if self.policy is not None:
            KPolicy.from_dict(self.policy)  # raises with the offending field
        CrashPoints(self.crash_at, self.crash_marker_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoordinatorConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown coordinator setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def build(config: CoordinatorConfig) -> Coordinator:
    """A ready ``Coordinator`` (connects to Redis; MLflow is contacted lazily)."""
    client = connect(config.redis_url)
    store = SubspaceStore(client, config.namespace)
    stream = SubmissionStream(client, config.namespace)
    tracking = (
        MergeTracker(config.mlflow_uri, config.experiment or config.namespace, config.namespace)
        if config.mlflow_uri
        else None
    )
    evaluation = Evaluation(config.evaluator) if config.evaluate else None
    return Coordinator(
        store,
        stream,
        policy=KPolicy.from_dict(config.policy) if config.policy is not None else None,
        tracking=tracking,
        evaluation=evaluation,
        consumer=config.consumer,
        recover_idle_ms=config.recover_idle_ms,
        keep_versions=config.keep_versions,
        crash=CrashPoints(config.crash_at, config.crash_marker_dir),
    )
