"""What a worker receives (``TaskJob``) and what it hands back (``TaskSummary``) for one task of a job.

Everything a worker needs travels in the ``TaskJob``, with the service addresses already resolved
(a worker resolves nothing itself: a default such as the sqlite file under ``./.sharecl`` would mean
another file on another node), so the same task runs on a laptop, on a GPU node of a cluster, or
directly in a test without Ray. Both cross the process boundary to and from Ray workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from share import TrainingMode
from share.errors import ShareClError
from subspace_store import EvalSpec
from workers.causal_lm import ModelDtype
from workers.evaluator import EVALUATOR
from workers.task import TaskSpec

# TaskSpec fields a job sets; name and mode are decided per task.
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec) if f.name not in ("name", "mode"))
AUTO_MODE = "auto"  # TaskJob.mode: LoRA when the store has no version yet, else coefficients
DEFAULT_PIN_TTL_S = 24 * 3600.0
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"  # how metadata names the builder's default model


class TaskJobError(ShareClError):
    """A task cannot run as configured (its data, its name, its training mode); the message says why."""


@dataclass(frozen=True)
class TaskJob:
    """One task of a job, with the resolved service addresses. ``training`` holds ``TaskSpec`` fields
    (``SPEC_FIELDS``); every value comes from the job schema."""

    job_id: str
    task: str
    train_path: str
    eval_path: str | None
    redis_url: str
    namespace: str
    tracking_uri: str
    experiment_id: str
    target_modules: tuple[str, ...]
    builder: str
    model_name_or_path: str | None = None
    num_labels: int | None = None
    mode: str = AUTO_MODE  # "auto", or a TrainingMode value
    training: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    job_params: dict[str, Any] = field(default_factory=dict)  # logged with the task's run
    pin_ttl_s: float = DEFAULT_PIN_TTL_S
    # adapter.allow_over_bound of the job: the coordinator may merge this task even if that leaves
    # some task over the merge policy's max_error (it rejects such a merge otherwise).
    allow_over_bound: bool = False
    # model.dtype and model.gradient_checkpointing of the job: the base weights' dtype (a name such as
    # "bf16" becomes its ModelDtype) and activation recomputation in the backward pass.
    dtype: ModelDtype = ModelDtype.FLOAT32
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.training) - set(SPEC_FIELDS))
        if unknown:
            raise TaskJobError(f"TaskJob.training has unknown keys {unknown}; allowed: {', '.join(SPEC_FIELDS)}")
        TrainingMode.resolve(self.mode, has_base=True)  # raises naming the allowed modes
        object.__setattr__(self, "dtype", ModelDtype.parse(self.dtype))  # raises naming the allowed dtypes

    @property
    def pin_id(self) -> str:
        """The holder of this task's pin on its base version: ``<job_id>/<task>`` (one per task: a job's
        tasks may start from different versions, and one task unpinning must not release another's;
        ``SubspaceStore.release_pins(job_id)`` releases them all)."""
        return f"{self.job_id}/{self.task}"

    @property
    def attempt_key(self) -> str:
        """The same for every attempt at this task of this job (``<job_id>/<task>``): the stream records
        the submission under it, so a retried attempt finds it in Redis (``recovery``)."""
        return f"{self.job_id}/{self.task}"

    @property
    def base_model(self) -> str:
        return self.model_name_or_path or BUNDLED_MODEL

    def spec(self, mode: TrainingMode) -> TaskSpec:
        return TaskSpec(name=self.task, mode=mode, **self.training)

    def eval_spec(self) -> EvalSpec | None:
        """How the coordinator evaluates this task after every merge (None without eval data)."""
        if self.eval_path is None:
            return None
        spec = self.spec(TrainingMode.LORA)  # the mode does not change evaluation
        return EvalSpec(
            eval_path=self.eval_path,
            builder=self.builder,
            target_modules=tuple(self.target_modules),
            max_length=spec.max_length,
            batch_size=spec.eval_batch_size,
            model_name_or_path=self.model_name_or_path,
            evaluator=EVALUATOR,
            dtype=self.dtype.value,
            gradient_checkpointing=self.gradient_checkpointing,
        )


@dataclass(frozen=True)
class TaskSummary:
    """What one task job did: the worker's answer to the job driver (also rebuilt from MLflow when an
    earlier attempt submitted the task and then died)."""

    task: str
    submission_id: str
    mode: TrainingMode
    base_version: str | None  # None: a cold start
    pin: tuple[str, str] | None  # (version, holder) of the pin on the base version
    eval_metrics: dict[str, float]
    trainable_params: int
    gpu_ids: tuple[str, ...]
    node: str | None
    node_ip: str | None
    mlflow_run_id: str
    attempt: int
    eval_spec: EvalSpec | None
    seconds: float
