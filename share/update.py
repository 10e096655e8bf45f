"""A compact trained task: coefficients and temporary directions relative to a base subspace.

A worker that trained in coefficient mode ships this instead of full factors: per module
``E_A, E_B`` (``k x p``) and the temporary directions ``V_A, F_A, V_B, F_B`` (``n x phi``,
``phi x p``). Whoever holds the base version rebuilds the full factors
``B = U_B E_B + V_B F_B`` and ``A.T = U_A E_A + V_A F_A`` exactly (``to_adapter``), which is
how a result trained on a stale version is merged into a newer head correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapter import LoraAdapter
from .errors import ShareClError
from .subspace import Subspace

PARTS = ("E_A", "E_B", "V_A", "F_A", "V_B", "F_B")


@dataclass
class TaskUpdate:
    """Per module a dict with the six ``PARTS``; plus the task's head and JSON-able metadata."""

    parts: dict[str, dict[str, Tensor]]
    head: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_adapter(self, base: Subspace, name: str = "update") -> LoraAdapter:
        """Full factors in ``base``'s bases (scaling 1); ShareClError if it does not fit ``base``."""
        if set(self.parts) != set(base.modules):
            raise ShareClError(
                f"update {name!r}: modules {sorted(self.parts)} differ from the base version's "
                f"{sorted(base.modules)}; was it trained against another subspace?"
            )
        factors = {}
        for module, p in self.parts.items():
            missing = [k for k in PARTS if k not in p]
            if missing:
                raise ShareClError(f"update {name!r}, module {module!r}: missing {missing}")
            basis = base.modules[module]
            U_A, U_B = basis.U_A.to(torch.float32), basis.U_B.to(torch.float32)
            if p["E_A"].shape[0] != U_A.shape[1] or p["E_B"].shape[0] != U_B.shape[1]:
                raise ShareClError(
                    f"update {name!r}, module {module!r}: coefficients have k=({p['E_A'].shape[0]}, "
                    f"{p['E_B'].shape[0]}) but the base version has k=({U_A.shape[1]}, {U_B.shape[1]}); "
                    "submit it with the base version it was trained from"
                )
            if p["V_A"].shape[0] != U_A.shape[0] or p["V_B"].shape[0] != U_B.shape[0]:
                raise ShareClError(
                    f"update {name!r}, module {module!r}: temporary directions have {p['V_A'].shape[0]} / "
                    f"{p['V_B'].shape[0]} rows, the module is {U_B.shape[0]} x {U_A.shape[0]}"
                )
            for key in PARTS:
                if not torch.isfinite(p[key]).all():
                    raise ShareClError(f"update {name!r}, module {module!r}: {key} holds NaN or Inf")
            B = U_B @ p["E_B"] + p["V_B"] @ p["F_B"]
            A_T = U_A @ p["E_A"] + p["V_A"] @ p["F_A"]
            factors[module] = (B, A_T.T.contiguous())
        return LoraAdapter(factors=factors, head=dict(self.head), metadata=dict(self.metadata))

    def num_parameters(self) -> int:
        return sum(t.numel() for p in self.parts.values() for t in p.values())
