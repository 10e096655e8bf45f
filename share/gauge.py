"""Canonical (balanced) gauge of a low-rank factor pair.

``(B, A)`` and ``(B M, M^-1 A)`` describe the same update ``dW = s B A``. Before an adapter enters a
subspace it is rewritten so that the result depends only on ``dW``: QR both factors, SVD the small
``r x r`` core, and give each side ``S^(1/2)``. The scaling ``s`` is absorbed into the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ShareClError


def canonicalize(B: Tensor, A: Tensor, scaling: float = 1.0) -> tuple[Tensor, Tensor]:
    """Return ``(B_c, A_c)`` with ``B_c @ A_c == scaling * B @ A`` and ``B_c.T B_c == A_c A_c.T`` diagonal.

    ``B`` is ``n x r`` and ``A`` is ``r x d`` (PEFT's ``lora_B`` / ``lora_A``). Computed in float64 and
    returned in float64; the singular values come sorted, largest first, so the column order is
    canonical too. Signs follow the convention that each column of ``B_c`` has a positive largest entry.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ShareClError(
            f"factor shapes do not chain: B is {tuple(B.shape)}, A is {tuple(A.shape)}; "
            "expected B (n x r) and A (r x d) as PEFT's lora_B and lora_A"
        )
    r = B.shape[1]
    B64 = B.detach().to(torch.float64)
    A64 = A.detach().to(torch.float64)
    q_b, r_b = torch.linalg.qr(B64)  # n x r, r x r
    q_a, r_a = torch.linalg.qr(A64.T)  # d x r, r x r
    core = scaling * (r_b @ r_a.T)
    u, s, vh = torch.linalg.svd(core)
    root = s.sqrt()
    B_c = (q_b @ u) * root
    A_c = ((q_a @ vh.T) * root).T
    # Fix the sign of each rank-1 pair so equal dW gives bit-comparable factors.
    pivot = B_c.abs().argmax(dim=0)
    signs = torch.sign(B_c[pivot, torch.arange(r)])
    signs[signs == 0] = 1.0
    return B_c * signs, A_c * signs[:, None]


def canonicalize_batch(B: Tensor, A: Tensor, scaling: Tensor) -> tuple[Tensor, Tensor]:
    """``canonicalize`` of ``g`` factor pairs of equal shapes at once: ``B`` is ``g x n x r``, ``A`` is
    ``g x r x d``, ``scaling`` has ``g`` entries. The same computation, batched (no loop over pairs)."""
    if B.ndim != 3 or A.ndim != 3 or B.shape[0] != A.shape[0] or B.shape[2] != A.shape[1]:
        raise ShareClError(
            f"factor stacks do not chain: B is {tuple(B.shape)}, A is {tuple(A.shape)}; "
            "expected B (g x n x r) and A (g x r x d)"
        )
    g, _, r = B.shape
    q_b, r_b = torch.linalg.qr(B.detach().to(torch.float64))
    q_a, r_a = torch.linalg.qr(A.detach().to(torch.float64).transpose(1, 2))
    core = scaling.to(torch.float64)[:, None, None] * (r_b @ r_a.transpose(1, 2))
    u, s, vh = torch.linalg.svd(core)
    root = s.sqrt()[:, None, :]
    B_c = (q_b @ u) * root
    A_c = ((q_a @ vh.transpose(1, 2)) * root).transpose(1, 2)
    pivot = B_c.abs().argmax(dim=1)  # g x r
    signs = torch.sign(torch.gather(B_c, 1, pivot[:, None, :]))  # g x 1 x r
    signs[signs == 0] = 1.0
    return B_c * signs, A_c * signs.transpose(1, 2)
