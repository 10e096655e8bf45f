"""A plain low-rank adapter: per module ``(B, A)`` with ``dW = scaling * B @ A`` (PEFT's convention)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ShareClError


@dataclass
class LoraAdapter:
    """Factors per module: ``B`` is ``n x r``, ``A`` is ``r x d``; ``r`` may differ between modules."""

    factors: dict[str, tuple[Tensor, Tensor]]
    scaling: dict[str, float] = field(default_factory=dict)  # module -> s; missing means 1.0
    head: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def scale(self, module: str) -> float:
        return float(self.scaling.get(module, 1.0))

    def delta_weight(self, module: str) -> Tensor:
        B, A = self.factors[module]
        return self.scale(module) * (B @ A)

    def validate(self, name: str) -> None:
        """Raise ShareClError naming the adapter and module for NaN/Inf or factor shapes that do not chain."""
        if not self.factors:
            raise ShareClError(f"adapter {name!r} has no modules; check its target_modules")
        for module, (B, A) in self.factors.items():
            if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
                raise ShareClError(
                    f"adapter {name!r}, module {module!r}: lora_B {tuple(B.shape)} and lora_A "
                    f"{tuple(A.shape)} do not chain (rank mismatch); expected B (n x r) and A (r x d)"
                )
            for side, value in (("lora_B", B), ("lora_A", A)):
                if not torch.isfinite(value).all():
                    raise ShareClError(
                        f"adapter {name!r}, module {module!r}: {side} holds NaN or Inf; "
                        "the training run diverged, retrain with a lower learning rate"
                    )
            if not torch.isfinite(torch.tensor(self.scale(module))):
                raise ShareClError(f"adapter {name!r}, module {module!r}: scaling is not finite")
        for key, value in self.head.items():
            if not torch.isfinite(value).all():
                raise ShareClError(f"adapter {name!r}: head tensor {key!r} holds NaN or Inf")
