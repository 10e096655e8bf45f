"""Delta versions: basis rotations between versions, and old tasks' coefficients carried through them.

A merge rotates every old task's coefficients by the same small matrices per module and side
(``E' = R E``, ``R`` is ``k_after x k_before``). A delta version stores those rotations (one float64
payload per module) instead of rewriting every old task; an old task's manifest entry names the
version it was written in, and reading it applies the product of the rotations of the versions since
(its chain), in float64. Products and decoded rotations are cached per process, keyed by the
rotation payloads' sha256 (content, so two Redis servers with the same namespace never mix).
Pure functions and a cache: no Redis here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from share import ModuleBasis, TaskCoefficients

from .payloads import PayloadFormatError, decode_tensors, encode_tensors

R_A, R_B = "R_A", "R_B"
# A reader refuses longer chains than this (what a writer may build is ``max_chain``, default 16).
MAX_CHAIN = 256
DEFAULT_MAX_CHAIN = 16
# Relative Frobenius difference under which an old task counts as the rotated stored one.
DELTA_TOLERANCE = 1e-6

Rotation = tuple[Tensor, Tensor]  # (R_A, R_B), float64


def encode_rotation(rotation: Rotation) -> bytes:
    ra, rb = rotation
    return encode_tensors({R_A: ra.detach().to(torch.float64), R_B: rb.detach().to(torch.float64)})


def decode_rotation(data: bytes | memoryview, to: tuple[int, int], frm: tuple[int, int]) -> Rotation:
    """One module's ``(R_A, R_B)``; shapes must be ``to[i] x frm[i]`` (from the manifest), values finite float64."""
    tensors, _ = decode_tensors(data)
    out = []
    for i, name in enumerate((R_A, R_B)):
        if name not in tensors:
            raise PayloadFormatError(f"lacks tensor {name!r}")
        value = tensors[name]
        if value.dtype != torch.float64 or tuple(value.shape) != (to[i], frm[i]):
            raise PayloadFormatError(
                f"holds {name!r} as {value.dtype} {tuple(value.shape)}, the manifest says float64 {(to[i], frm[i])}"
            )
        if not torch.isfinite(value).all():
            raise PayloadFormatError(f"holds non-finite values in {name!r}")
        out.append(value)
    return out[0], out[1]


def basis_rotations(before: dict[str, ModuleBasis], after: dict[str, ModuleBasis]) -> dict[str, Rotation]:
    """``U_after.T @ U_before`` per module and side, float64: the rotation of a merge whose old tasks kept
    their directions (equal to ``MergeReport.rotations`` up to the bases' float32 rounding)."""
    out = {}
    for m, b in after.items():
        a = before[m]
        out[m] = (_rotation(a.U_A, b.U_A), _rotation(a.U_B, b.U_B))
    return out


def _rotation(before: Tensor, after: Tensor) -> Tensor:
    """``R`` with ``after ~ before R.T`` on ``before``'s span: ``(pinv(before) after).T``, which corrects for
    the float32 bases' drift from orthonormality (``after.T before`` alone drifts by ~1e-7 per merge)."""
    u0, u1 = before.to(torch.float64), after.to(torch.float64)
    if u0.shape[1] == 0 or u1.shape[1] == 0:
        return u1.new_zeros(u1.shape[1], u0.shape[1])
    return torch.linalg.solve(u0.T @ u0, u0.T @ u1).T


def rotate(task: TaskCoefficients, product: dict[str, Rotation], metadata: dict[str, Any]) -> TaskCoefficients:
    """``task`` carried by ``product`` (module -> (P_A, P_B)); float64 arithmetic, stored dtype kept."""
    E = {}
    for m, (ea, eb) in task.E.items():
        pa, pb = product[m]
        E[m] = ((pa @ ea.to(torch.float64)).to(ea.dtype), (pb @ eb.to(torch.float64)).to(eb.dtype))
    return TaskCoefficients(E=E, head=task.head, metadata=metadata)


def relative_difference(a: TaskCoefficients, b: TaskCoefficients) -> float:
    """``|a - b| / |b|`` over every module's ``E_A`` and ``E_B`` (Frobenius, float64); inf if shapes differ."""
    diff = norm = 0.0
    for m, (bea, beb) in b.E.items():
        if m not in a.E:
            return float("inf")
        for x, y in zip(a.E[m], (bea, beb), strict=True):
            if x.shape != y.shape:
                return float("inf")
            diff += float((x.to(torch.float64) - y.to(torch.float64)).square().sum())
            norm += float(y.to(torch.float64).square().sum())
    if set(a.E) != set(b.E):
        return float("inf")
    return (diff**0.5) / norm**0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_rotations = _LRU(4096)  # rotation payload sha256 -> decoded (R_A, R_B)
_products = _LRU(4096)  # tuple of sha256 (oldest first) -> (P_A, P_B)


def cached_rotation(digest: str) -> Rotation | None:
    return _rotations.get(digest)


def remember_rotation(digest: str, rotation: Rotation) -> None:
    _rotations.put(digest, rotation)


def product(digests: list[str], rotations: dict[str, Rotation], remember: bool = True) -> Rotation:
    """``R_n ... R_1`` for one module's chain (``digests`` oldest first, ``rotations`` digest -> matrices).

    Cached per chain when ``remember`` (the rotations' bytes were checked against their digests); a
    suffix's product is reused when a longer chain is asked for later.
    """
    key = tuple(digests)
    hit = _products.get(key)
    if hit is not None:
        return hit
    if len(digests) == 1:
        value = rotations[digests[0]]
    else:
        newer = product(digests[1:], rotations, remember)
        ra, rb = rotations[digests[0]]
        value = (newer[0] @ ra, newer[1] @ rb)
    if remember:
        _products.put(key, value)
    return value


def clear_caches() -> None:
    """Forget cached rotations and products (tests; a process that wants its memory back)."""
    for cache in (_rotations, _products):
        with cache.lock:
            cache.items.clear()
