"""Configuration of a Share subspace: how many basis directions each module keeps."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from .errors import ShareClError

# The forgetting bound used when no rule is given. Issue 9's sweep (ACC against stored bytes) is
# the place to confirm or change it; jobs and the CLI take their defaults from here.
DEFAULT_MAX_ERROR = 0.05

_RULE_FIELDS = ("k", "variance", "max_error")
_FIELDS = (*_RULE_FIELDS, "k_max")


class KRule(StrEnum):
    """Which field of a :class:`KPolicy` decides ``k``."""

    FIXED = "k"
    VARIANCE = "variance"
    MAX_ERROR = "max_error"


@dataclass(frozen=True)
class KPolicy:
    """How ``k`` (basis directions per side of a module) is chosen at init and after every merge.

    Exactly one rule decides; with none given, ``max_error=DEFAULT_MAX_ERROR``:

    - ``max_error=eps`` (the forgetting bound): per module, the smallest ``k_A + k_B`` such that every
      task, old and new, keeps its cumulative error bound in that module (the sum of its per-merge
      relative errors since it entered, see ``share.merge``) at or below ``eps``.
    - ``variance=f`` (the paper's rule, 0.6 there): per side, the smallest ``k`` whose explained
      variance reaches ``f``. It bounds no task's error.
    - ``k=K``: a fixed number of directions per side.

    ``k_max`` caps every rule. The data's rank caps it too: no direction is kept that spans nothing.
    """

    k: int | None = None
    variance: float | None = None
    max_error: float | None = None
    k_max: int | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in _RULE_FIELDS if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ShareClError(
                f"KPolicy: {' and '.join(chosen)} are both set, but exactly one rule decides k; "
                "give only one of k, variance, max_error"
            )
        if not chosen:
            object.__setattr__(self, "max_error", DEFAULT_MAX_ERROR)
        _check_count("k", self.k, "leave k unset to choose it by max_error or variance")
        _check_count("k_max", self.k_max, "leave k_max unset for no cap")
        if self.variance is not None and not (_is_real(self.variance) and 0.0 < self.variance <= 1.0):
            raise ShareClError(f"KPolicy: variance must be in (0, 1] (got {self.variance!r}); the paper uses 0.6")
        if self.max_error is not None and not (_is_real(self.max_error) and 0.0 < self.max_error < 1.0):
            raise ShareClError(
                f"KPolicy: max_error must be in (0, 1) (got {self.max_error!r}); it bounds each task's "
                f"relative reconstruction error, e.g. {DEFAULT_MAX_ERROR}"
            )

    @property
    def rule(self) -> KRule:
        if self.k is not None:
            return KRule.FIXED
        return KRule.VARIANCE if self.variance is not None else KRule.MAX_ERROR

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KPolicy:
        """Inverse of ``to_dict``. Dicts written before ``max_error`` existed always carried ``variance``
        (its old default, 0.6) even when ``k`` decided: there ``k`` wins, as it did then."""
        if not isinstance(data, dict):
            raise ShareClError(f"KPolicy: expected a mapping of {', '.join(_FIELDS)}, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _FIELDS)
        if unknown:
            raise ShareClError(f"KPolicy: unknown field(s) {unknown}; the fields are {', '.join(_FIELDS)}")
        values = {key: data[key] for key in _FIELDS if key in data}
        if "max_error" not in values and values.get("k") is not None:
            values.pop("variance", None)
        return cls(**values)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_count(name: str, value: object, fix: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ShareClError(f"KPolicy: {name} must be an integer >= 1 (got {value!r}); {fix}")


class TrainingMode(StrEnum):
    """What a task trains: a plain LoRA adapter (cold start, baselines) or coefficients against frozen bases."""

    LORA = "lora"
    COEFFICIENTS = "coefficients"

    @classmethod
    def resolve(cls, requested: str, has_base: bool) -> TrainingMode:
        """``"auto"`` trains coefficients when a subspace exists and LoRA otherwise (the cold start)."""
        if requested == "auto":
            return cls.COEFFICIENTS if has_base else cls.LORA
        try:
            mode = cls(requested)
        except ValueError:
            choices = ", ".join(["auto", *(m.value for m in cls)])
            raise ValueError(f"training mode {requested!r} is not one of {choices}") from None
        if mode is cls.COEFFICIENTS and not has_base:
            raise ValueError(
                "mode 'coefficients' needs a subspace to train against; use 'auto' or 'lora' for the first task"
            )
        return mode
