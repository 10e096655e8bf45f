"""Optional int8 storage of a subspace's bases: per-column symmetric quantization with float32 scales.

Column ``j`` of a basis ``U`` is stored as ``q[:, j] = round(U[:, j] / s_j)`` in ``[-127, 127]`` (int8)
with ``s_j = max_i |U[i, j]| / 127`` (float32; an all-zero column gets ``s_j = 1`` and stays zero).
``dequantize()`` gives back a float32 ``Subspace`` with ``q * s`` as bases and the same tasks, so it
loads into a ``ShareModel`` as any other. Coefficients stay float32: they are tiny next to the bases
and the exactness of merges is defined on float32 state. Each entry's error is at most ``s_j / 2``,
so a basis column loses about ``1 / (127 sqrt(3))`` of its largest entry per entry in rms terms;
``relative_delta_errors`` measures what that does to each task's update ``dW``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import KPolicy
from .errors import ShareClError
from .subspace import ModuleBasis, Subspace, TaskCoefficients

QMAX = 127  # symmetric range: -127..127, so the scale maps the largest entry to exactly +-127


@dataclass(frozen=True)
class QuantizedMatrix:
    """An int8 matrix and one float32 scale per column: the matrix is ``values * scales``."""

    values: Tensor  # int8, rows x cols
    scales: Tensor  # float32, cols

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> Tensor:
        return self.values.to(torch.float32) * self.scales


@dataclass(frozen=True)
class QuantizedBasis:
    U_A: QuantizedMatrix
    U_B: QuantizedMatrix

    @property
    def nbytes(self) -> int:
        return self.U_A.nbytes + self.U_B.nbytes


@dataclass
class QuantizedBases:
    """A subspace whose bases are int8: per module ``U_A`` and ``U_B``; tasks as in the source (float32)."""

    modules: dict[str, QuantizedBasis]
    tasks: dict[str, TaskCoefficients]
    policy: KPolicy = field(default_factory=KPolicy)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized bases: int8 entries plus float32 scales (coefficients not included)."""
        return sum(basis.nbytes for basis in self.modules.values())

    @property
    def coefficient_nbytes(self) -> int:
        """Bytes of every task's coefficients ``E_A``, ``E_B`` (float32, unchanged by quantization)."""
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for task in self.tasks.values()
            for a, b in task.E.values()
        )

    @property
    def total_nbytes(self) -> int:
        """Resident bytes of the adapters: quantized bases plus coefficients (heads not included)."""
        return self.nbytes + self.coefficient_nbytes

    def dequantize(self) -> Subspace:
        """A float32 ``Subspace`` with the dequantized bases and the same tasks, policy and metadata."""
        modules = {
            name: ModuleBasis(U_A=basis.U_A.dequantize(), U_B=basis.U_B.dequantize())
            for name, basis in self.modules.items()
        }
        return Subspace(modules=modules, tasks=dict(self.tasks), policy=self.policy, metadata=dict(self.metadata))


def quantize_columns(matrix: Tensor, what: str = "matrix") -> QuantizedMatrix:
    """Per-column symmetric int8 quantization of a finite floating-point matrix."""
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise ShareClError(
            f"{what}: int8 quantization needs a floating-point matrix, "
            f"got {matrix.dtype} of shape {tuple(matrix.shape)}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise ShareClError(f"{what} holds NaN or Inf; it cannot be quantized (check the subspace with validate())")
    wide = matrix.detach().to("cpu", torch.float64)
    scales = (wide.abs().amax(dim=0) / QMAX).to(torch.float32)
    scales[scales == 0] = 1.0  # an all-zero column: any scale keeps it zero
    values = torch.round(wide / scales.to(torch.float64)).clamp_(-QMAX, QMAX).to(torch.int8)
    return QuantizedMatrix(values=values, scales=scales)


def quantize_subspace(subspace: Subspace) -> QuantizedBases:
    """Quantize every module's ``U_A`` and ``U_B`` to int8 with float32 per-column scales.

    The tasks are shared with ``subspace`` (not copied); raises ``ShareClError`` for a basis holding
    NaN or Inf, naming the module and side.
    """
    modules = {
        name: QuantizedBasis(
            U_A=quantize_columns(basis.U_A, f"module {name!r}: U_A"),
            U_B=quantize_columns(basis.U_B, f"module {name!r}: U_B"),
        )
        for name, basis in subspace.modules.items()
    }
    return QuantizedBases(
        modules=modules, tasks=dict(subspace.tasks), policy=subspace.policy, metadata=dict(subspace.metadata)
    )


def relative_delta_errors(reference: Subspace, other: Subspace) -> dict[str, float]:
    """Per task, ``|dW_other - dW_ref| / |dW_ref|`` (Frobenius, over all modules), in float64.

    Both subspaces must hold the same modules and tasks with equal ``k``. No ``n x d`` matrix is
    formed: with ``B = U_B E_B`` and ``A = U_A E_A``, ``|B A.T - B' A'.T|^2`` is the sum of the
    elementwise product of the ``2p x 2p`` Gram matrices of ``[B, -B']`` and ``[A, A']``, and those
    need only ``U.T U'`` (``k x k``, once per module) and the coefficients.
    """
    if set(reference.modules) != set(other.modules) or set(reference.tasks) != set(other.tasks):
        raise ShareClError("relative_delta_errors: the two subspaces hold different modules or tasks")
    diff_sq = dict.fromkeys(reference.tasks, 0.0)
    norm_sq = dict.fromkeys(reference.tasks, 0.0)
    for name, basis in reference.modules.items():
        alt = other.modules[name]
        if (basis.U_A.shape, basis.U_B.shape) != (alt.U_A.shape, alt.U_B.shape):
            raise ShareClError(f"relative_delta_errors: module {name!r} has different basis shapes in the two")
        gram_A = _cross_grams(basis.U_A, alt.U_A)
        gram_B = _cross_grams(basis.U_B, alt.U_B)
        for task in reference.tasks:
            E_A, E_B = (e.to(torch.float64) for e in reference.tasks[task].E[name])
            F_A, F_B = (e.to(torch.float64) for e in other.tasks[task].E[name])
            # Blocks of [B, -B'].T [B, -B'] and [A, A'].T [A, A'], multiplied elementwise and summed.
            a = _blocks(gram_A, E_A, F_A)
            b = _blocks(gram_B, E_B, F_B)
            ref = float((a[0] * b[0]).sum())
            cross = float((a[1] * b[1]).sum())
            alt_sq = float((a[2] * b[2]).sum())
            norm_sq[task] += ref
            diff_sq[task] += ref - 2.0 * cross + alt_sq
    return {
        task: (max(diff_sq[task], 0.0) / norm_sq[task]) ** 0.5 if norm_sq[task] > 0 else 0.0 for task in reference.tasks
    }


def _cross_grams(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    U64, V64 = U.to(torch.float64), V.to(torch.float64)
    return U64.T @ U64, U64.T @ V64, V64.T @ V64


def _blocks(grams: tuple[Tensor, Tensor, Tensor], E: Tensor, F: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(X.T X, X.T Y, Y.T Y)`` for ``X = U E`` and ``Y = V F`` from the Gram matrices of ``U`` and ``V``."""
    uu, uv, vv = grams
    return E.T @ uu @ E, E.T @ uv @ F, F.T @ vv @ F
