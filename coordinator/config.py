"""The coordinator's settings and the wiring of a ``Coordinator`` from them.

``to_dict``/``from_dict`` turn the settings into plain JSON-able values and back, so Ray can hand them
to every incarnation of the coordinator actor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from share import KPolicy
from share.errors import ShareClError
from subspace_store import SubmissionStream, SubspaceStore, connect
from subspace_store.chains import DEFAULT_MAX_CHAIN, MAX_CHAIN
from subspace_store.connection import outlast_restarts

from .crash import CrashPoints
from .evaluation import Evaluation
from .service import Coordinator
from .tracking import MergeTracker


class CoordinatorConfigError(ShareClError):
    """A coordinator setting is out of range or unknown; the message names it and the fix."""


@dataclass
class CoordinatorConfig:
    namespace: str = "default"
    redis_url: str | None = None  # None: $SHARECL_REDIS_URL, else the embedded server
    mlflow_uri: str | None = None  # None: no tracking (get_or_start_coordinator resolves the default)
    experiment: str | None = None  # None: the namespace (one experiment per namespace)
    policy: KPolicy | None = None  # how k is chosen at every merge; None: the head's own (KPolicy() at a cold start)
    evaluator: str | None = None  # default evaluator "package.module:function" (see evaluation.py)
    evaluate: bool = True  # False: never evaluate, whatever the submissions carry
    consumer: str = "coordinator"
    max_batch: int = 64
    block_ms: int = 1000
    recover_idle_ms: int = 60_000
    keep_versions: int | None = None
    # Rotations a read of the head may apply (versions are deltas) before the coordinator compacts the
    # head into a full version, in a background thread started after the publish that reached it. Delta
    # publishes write a task in full past min(2 * max_chain, MAX_CHAIN) rotations, the bound on reads.
    max_chain: int = DEFAULT_MAX_CHAIN
    # torch threads in the coordinator's process. Merges are many small matrix products: one thread
    # is fastest, and more oversubscribe the cores that training workers share (measured: a merge
    # took 10 s with 2 threads on a loaded 2-core machine, 0.03 s with 1). None: torch's default.
    torch_threads: int | None = 1
    # The actor exits by itself after this long without a submission to merge and without a call
    # (a running job's driver keeps it alive; a detached coordinator holds 0.5-1 GB). 0: never.
    idle_timeout_s: float = 1800.0
    crash_at: list[str] = field(default_factory=list)  # tests only: crash points (crash.py)
    crash_marker_dir: str | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise CoordinatorConfigError("invalid coordinator settings: " + "; ".join(problems))
        CrashPoints(self.crash_at, self.crash_marker_dir)

    def problems(self) -> list[str]:
        """Every out-of-range setting, each named with its fix."""
        found = []
        if not isinstance(self.policy, KPolicy | None):
            found.append(
                f"policy must be a share.KPolicy or None, got {type(self.policy).__name__}; "
                "build it with KPolicy(k=..., max_error=..., variance=..., k_max=...)"
            )
        if self.max_batch < 1:
            found.append(f"max_batch must be >= 1 (got {self.max_batch})")
        if self.block_ms < 0:
            found.append(f"block_ms must be >= 0 (got {self.block_ms})")
        if not isinstance(self.max_chain, int) or not 1 <= self.max_chain <= MAX_CHAIN:
            found.append(f"max_chain must be an integer from 1 to {MAX_CHAIN} (got {self.max_chain!r})")
        if self.torch_threads is not None and self.torch_threads < 1:
            found.append(f"torch_threads must be >= 1 or None (got {self.torch_threads})")
        if not isinstance(self.idle_timeout_s, int | float) or not self.idle_timeout_s >= 0:
            found.append(
                f"idle_timeout_s must be a number of seconds >= 0, 0 to never exit (got {self.idle_timeout_s!r})"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the policy as its own ``to_dict``)."""
        data = asdict(self)
        data["policy"] = None if self.policy is None else self.policy.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoordinatorConfig:
        """The inverse of ``to_dict``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CoordinatorConfigError(f"unknown coordinator setting(s) {unknown}; known: {sorted(known)}")
        policy = data.get("policy")
        return cls(**{**data, "policy": None if policy is None else KPolicy.from_dict(policy)})


def build(config: CoordinatorConfig) -> Coordinator:
    """A ready ``Coordinator`` (connects to Redis; MLflow is contacted lazily)."""
    client = outlast_restarts(connect(config.redis_url))  # a long-running process: ride out a Redis restart
    store = SubspaceStore(client, config.namespace)
    stream = SubmissionStream(client, config.namespace)
    tracking = (
        MergeTracker(config.mlflow_uri, config.experiment or config.namespace, config.namespace, store_tags=store.tags)
        if config.mlflow_uri
        else None
    )
    evaluation = Evaluation(config.evaluator) if config.evaluate else None
    return Coordinator(
        store,
        stream,
        policy=config.policy,
        tracking=tracking,
        evaluation=evaluation,
        consumer=config.consumer,
        recover_idle_ms=config.recover_idle_ms,
        keep_versions=config.keep_versions,
        max_chain=config.max_chain,
        crash=CrashPoints(config.crash_at, config.crash_marker_dir),
    )
