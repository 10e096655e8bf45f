"""What the continual benchmark runs: the methods, their merge policies and the training budget.

Every default comes from the job schema (``jobs/schema.py``) or ``share.config``, so the benchmark
measures what jobs run; the few benchmark-only settings (steps, the head-only lr grid) live here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from jobs.schema import AdapterConfig, ModelConfig, TrainingConfig
from share import KPolicy
from share.config import DEFAULT_MAX_ERROR
from share.errors import ShareClError

_ADAPTER = AdapterConfig()
_TRAINING = TrainingConfig()
TARGETS = tuple(_ADAPTER.target_modules)


class MethodKind(StrEnum):
    HEAD_ONLY = "head-only"  # frozen encoder, a linear head per task
    SHARE = "share"  # continual Share: LoRA cold start, then coefficients, merged after every task
    LORA_SEQ = "lora-seq"  # one LoRA adapter finetuned task after task (a head per task)
    LORA_PER_TASK = "lora-per-task"  # a separate LoRA adapter per task
    SHARE_FULL = "share-full"  # the per-task adapters compressed into one subspace, no retraining
    JOINT = "joint"  # one LoRA trained on all tasks at once, a head per task


@dataclass(frozen=True)
class Method:
    """A named method; share kinds carry their merge policy (``share-full`` compresses with it)."""

    name: str
    kind: MethodKind
    policy: KPolicy | None = None

    @property
    def job(self) -> str:
        """The unit of work that produces this method's result (share-full comes with lora-per-task)."""
        return MethodKind.LORA_PER_TASK.value if self.kind is MethodKind.SHARE_FULL else self.name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "policy": policy_text(self.policy)}


def max_error_policy(eps: float = DEFAULT_MAX_ERROR) -> KPolicy:
    return KPolicy(max_error=eps, k_max=_ADAPTER.k_max)


def variance_policy(fraction: float) -> KPolicy:
    return KPolicy(variance=fraction, k_max=_ADAPTER.k_max)


def fixed_k_policy(k: int) -> KPolicy:
    return KPolicy(k=k, k_max=_ADAPTER.k_max)


def policy_text(policy: KPolicy | None) -> str:
    if policy is None:
        return "-"
    rule = policy.rule.value
    cap = f", k_max={policy.k_max}" if policy.k_max is not None else ""
    return f"{rule}={getattr(policy, rule)}{cap}"


PAPER_VARIANCE = 0.6
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("head-only", MethodKind.HEAD_ONLY),
        Method("share", MethodKind.SHARE, max_error_policy()),
        Method("share-variance", MethodKind.SHARE, variance_policy(PAPER_VARIANCE)),
        Method("lora-seq", MethodKind.LORA_SEQ),
        Method("lora-per-task", MethodKind.LORA_PER_TASK),
        Method("share-full", MethodKind.SHARE_FULL, max_error_policy()),
        Method("joint", MethodKind.JOINT),
    )
}

SWEEP_MAX_ERROR = (0.02, 0.05, 0.1, 0.2)
SWEEP_VARIANCE = (0.6, 0.9)
SWEEP_K = (4, 8, 16, 32)
SWEEP_REFERENCES = ("lora-per-task", "lora-seq", "head-only")


def sweep_methods() -> list[Method]:
    """Share under every policy of the sweep (the defaults keep their main names, so results are shared)."""
    methods = []
    for eps in SWEEP_MAX_ERROR:
        name = "share" if eps == DEFAULT_MAX_ERROR else f"share-e{eps:g}"
        methods.append(Method(name, MethodKind.SHARE, max_error_policy(eps)))
    for fraction in SWEEP_VARIANCE:
        name = "share-variance" if fraction == PAPER_VARIANCE else f"share-v{fraction:g}"
        methods.append(Method(name, MethodKind.SHARE, variance_policy(fraction)))
    methods += [Method(f"share-k{k}", MethodKind.SHARE, fixed_k_policy(k)) for k in SWEEP_K]
    return methods + [METHODS[name] for name in SWEEP_REFERENCES]


def resolve_methods(names: list[str], sweep: bool) -> list[Method]:
    known = {m.name: m for m in (*METHODS.values(), *sweep_methods())}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ShareClError(f"--methods: unknown {unknown}; choose from {sorted(known)}")
    return [known[n] for n in names]


@dataclass(frozen=True)
class Budget:
    """The training budget every method gets (same data, seeds, steps, batch size, tokens).

    The defaults are the budget at which the relation sequence qualified (``jobs.datasets.relations``:
    per-task LoRA beat the linear probe by 12-37 points at 250 steps of batch 16, lr 2e-3).
    """

    steps: int = 250
    batch_size: int = 16
    max_length: int = 32
    # Each chosen on the grid {2e-3, 5e-3, 1e-2, 2e-2} by seed 0 on the first 4 relation tasks (RESULTS.md,
    # "learning-rate grid"): LoRA diverges above 2e-3; coefficient tasks learn best at 1e-2.
    lr_lora: float = 2e-3
    lr_coefficients: float = 1e-2
    head_lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    validation_fraction: float = 0.2  # of each task's TRAIN split, to choose head-only's lr
    lr_scheduler: str = _TRAINING.lr_scheduler
    warmup_ratio: float = _TRAINING.warmup_ratio
    max_grad_norm: float | None = _TRAINING.max_grad_norm
    weight_decay: float = _TRAINING.weight_decay
    r: int = _ADAPTER.r
    lora_alpha: float = _ADAPTER.lora_alpha
    phi: int = _ADAPTER.phi
    eval_batch_size: int = _TRAINING.eval_batch_size

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"--steps {self.steps} and --batch-size {self.batch_size} must be >= 1")
        if self.max_length < 2:
            problems.append(f"--max-length {self.max_length} must be >= 2 tokens (default {ModelConfig.max_length})")
        if min(self.lr_lora, self.lr_coefficients, *self.head_lr_grid) <= 0:
            problems.append("learning rates must be > 0")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction {self.validation_fraction} must be in (0, 1)")
        if problems:
            raise ShareClError("; ".join(problems))

    @property
    def p(self) -> int:
        return _ADAPTER.p if _ADAPTER.p is not None else self.r

    def schedule(self) -> dict[str, Any]:
        return {
            "lr_scheduler": self.lr_scheduler,
            "warmup_ratio": self.warmup_ratio,
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
        }

    def hyper(self, method: Method, num_tasks: int) -> dict[str, Any]:
        """Every setting that decides ``method``'s result: printed in the results table and part of its key."""
        common = {"steps": self.steps, "batch_size": self.batch_size, "max_length": self.max_length}
        lora = {"r": self.r, "lora_alpha": self.lora_alpha}
        kind = method.kind
        if kind is MethodKind.HEAD_ONLY:
            specific: dict[str, Any] = {
                "lr_grid": list(self.head_lr_grid),
                "validation_fraction": self.validation_fraction,
            }
        elif kind is MethodKind.SHARE:
            specific = {
                "lr_lora": self.lr_lora,
                "lr_coefficients": self.lr_coefficients,
                **lora,
                "p": self.p,
                "phi": self.phi,
                "policy": policy_text(method.policy),
            }
        elif kind is MethodKind.SHARE_FULL:
            specific = {"lr_lora": self.lr_lora, **lora, "policy": policy_text(method.policy)}
        elif kind is MethodKind.JOINT:
            specific = {"lr_lora": self.lr_lora, **lora, "total_steps": self.steps * num_tasks}
        else:
            specific = {"lr_lora": self.lr_lora, **lora}
        return {**common, **specific, **self.schedule()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
