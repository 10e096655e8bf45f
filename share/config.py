"""Configuration of a Share subspace: how many basis directions each module keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class KPolicy:
    """How ``k`` (basis directions per side of a module) is chosen at init and after every merge.

    ``k`` set: a fixed number of directions (capped by the data's rank and by ``k_max``).
    ``k`` unset: the smallest ``k`` whose explained variance reaches ``variance``, capped by ``k_max``.
    """

    k: int | None = None
    variance: float = 0.6
    k_max: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k}); leave k unset to choose it by variance")
        if not 0.0 < self.variance <= 1.0:
            raise ValueError(f"variance must be in (0, 1] (got {self.variance}); the paper uses 0.6")
        if self.k_max is not None and self.k_max < 1:
            raise ValueError(f"k_max must be >= 1 (got {self.k_max}); leave it unset for no cap")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KPolicy:
        return cls(**{key: data[key] for key in ("k", "variance", "k_max") if key in data})


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
