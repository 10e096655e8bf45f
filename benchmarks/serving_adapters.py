"""Adapters with the shared structure Share is for, merged into subspaces as tasks arrive.

The generator (``Structure``): per module, a common subspace of ``shared_dim`` directions on each side
(orthonormal ``S_A``, ``d x s``, and ``S_B``, ``n x s``, fixed per module). Task ``t``'s LoRA factors are

    A_t.T = S_A X_t + N_A,   B_t = S_B Y_t + N_B   (PEFT's lora_A is A_t, lora_B is B_t; scaling alpha/r = 2)

with ``X_t``, ``Y_t`` (``s x r``) Gaussian with row ``i`` scaled by ``(1 + i) ** -0.5`` (a few common
directions dominate, as in trained adapters), and ``N`` a task-specific Gaussian part whose norm is
``task_specific`` times that of the common part on the same side. Each task's update is then scaled to
``norm`` (per module). Everything is reproducible from ``seed`` and the task's index, so any range of
tasks can be generated on its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from share import KPolicy, LoraAdapter, Subspace, merge


@dataclass(frozen=True)
class Structure:
    shared_dim: int = 24  # s: common directions per side of a module
    task_specific: float = 0.02  # |N| / |S X| per side and task
    r: int = 8
    lora_alpha: float = 16.0
    seed: int = 0

    def describe(self) -> str:
        return (
            f"per module a common subspace of s={self.shared_dim} directions per side; task factors "
            f"A.T = S_A X + N_A, B = S_B Y + N_B with X, Y ({self.shared_dim} x {self.r}) Gaussian, row i "
            f"scaled by (1+i)^-0.5, and a task-specific Gaussian N of {self.task_specific:.0%} of the common "
            f"part's norm per side; r={self.r}, lora_alpha={self.lora_alpha:g}, seed {self.seed}"
        )


class AdapterSource:
    """Task ``i``'s adapter for modules ``shapes`` (name -> ``(n, d)``), any ``i``, reproducibly."""

    def __init__(self, shapes: dict[str, tuple[int, int]], structure: Structure, norms: dict[str, float]) -> None:
        self.shapes = shapes
        self.structure = structure
        self.norms = norms
        self._common = {}
        for name, (n, d) in shapes.items():
            g = _generator(structure.seed, "common", name)
            s = structure.shared_dim
            S_A = torch.linalg.qr(torch.randn(d, s, generator=g, dtype=torch.float64))[0]
            S_B = torch.linalg.qr(torch.randn(n, s, generator=g, dtype=torch.float64))[0]
            self._common[name] = (S_A, S_B)
        self._spectrum = (1.0 + torch.arange(structure.shared_dim, dtype=torch.float64)) ** -0.5

    def adapter(self, index: int) -> LoraAdapter:
        st = self.structure
        scaling = st.lora_alpha / st.r
        factors = {}
        for name in self.shapes:
            g = _generator(st.seed, f"task{index}", name)
            S_A, S_B = self._common[name]
            A_T = self._side(S_A, g)
            B = self._side(S_B, g)
            # Scale both factors alike so that |scaling * B A| is this module's norm.
            current = scaling * float(((B.T @ B) * (A_T.T @ A_T)).sum()) ** 0.5
            factor = (self.norms[name] / current) ** 0.5
            factors[name] = ((B * factor).to(torch.float32), (A_T.T * factor).to(torch.float32).contiguous())
        return LoraAdapter(factors=factors, scaling={m: scaling for m in self.shapes}, metadata={"index": index})

    def _side(self, S: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        st = self.structure
        common = S @ (self._spectrum[:, None] * torch.randn(st.shared_dim, st.r, generator=g, dtype=torch.float64))
        noise = torch.randn(S.shape[0], st.r, generator=g, dtype=torch.float64)
        noise *= st.task_specific * float(common.norm()) / float(noise.norm())
        return common + noise

    def adapters(self, start: int, stop: int) -> dict[str, LoraAdapter]:
        return {task_name(i): self.adapter(i) for i in range(start, stop)}


def task_name(index: int) -> str:
    return f"t{index}"


@dataclass
class Snapshot:
    """The subspace holding the first ``tasks`` tasks, and the wall time its merges took in all."""

    tasks: int
    subspace: Subspace
    merge_seconds: float


def grow(source: AdapterSource, checkpoints: list[int], chunk: int, policy: KPolicy) -> Iterator[Snapshot]:
    """Merge tasks ``0, 1, ...`` in arrival chunks of at most ``chunk`` and yield the subspace at each checkpoint.

    Chunks never straddle a checkpoint, so the subspace at ``T`` is exactly what a coordinator that had
    merged the first ``T`` tasks in such batches would hold.
    """
    subspace: Subspace | None = None
    done, seconds = 0, 0.0
    for target in sorted(checkpoints):
        while done < target:
            stop = min(done + chunk, target)
            subspace, report = merge(subspace, source.adapters(done, stop), policy)
            seconds += report.seconds
            done = stop
        assert subspace is not None
        yield Snapshot(tasks=target, subspace=subspace, merge_seconds=seconds)


def errors_against(subspace: Subspace, adapters: dict[str, LoraAdapter]) -> dict[str, float]:
    """Each task's actual relative error ``|dW_share - dW_adapter| / |dW_adapter|`` over all modules (float64).

    No ``n x d`` matrix is formed: with ``X = U_B E_B`` and ``Y = U_A E_A``, the inner products reduce to
    ``p x r`` and ``p x p`` products (``<X Y.T, s B A> = s sum((X.T B) * (Y.T A.T))``).
    """
    out = {}
    for name, adapter in adapters.items():
        diff = norm = 0.0
        for module, (B, A) in adapter.factors.items():
            basis = subspace.modules[module]
            E_A, E_B = (e.to(torch.float64) for e in subspace.tasks[name].E[module])
            X, Y = basis.U_B.to(torch.float64) @ E_B, basis.U_A.to(torch.float64) @ E_A
            B64, A64, s = B.to(torch.float64), A.to(torch.float64), adapter.scale(module)
            share_sq = float(((X.T @ X) * (Y.T @ Y)).sum())
            cross = s * float(((X.T @ B64) * (Y.T @ A64.T)).sum())
            orig_sq = s * s * float(((B64.T @ B64) * (A64 @ A64.T)).sum())
            diff += share_sq - 2.0 * cross + orig_sq
            norm += orig_sq
        out[name] = (max(diff, 0.0) / norm) ** 0.5 if norm > 0 else 0.0
    return out


def _generator(seed: int, *parts: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join([str(seed), *parts]).encode()))
