"""``ShareLinear``: a frozen ``nn.Linear`` plus a Share update, in one of several modes.

Modes (set by ``ShareModel``; a layer is in exactly one):

- ``Serving.OFF``: the base layer alone.
- ``TrainingMode.LORA``: plain LoRA training (cold start): trainable ``lora_A`` (``r x d``), ``lora_B``
  (``n x r``).
- ``TrainingMode.COEFFICIENTS``: training against frozen bases: trainable ``E_A``, ``E_B`` and
  ``phi`` temporary directions per side, ``A_t.T = U_A E_A + V_A F_A``, ``B_t = U_B E_B + V_B F_B``.
- ``Serving.TASKS``: inference with stored tasks; row ``i`` of the batch uses task ``task_ids[i]``
  (``-1``: no update). ``U_A.T x`` is shared by every row; per-row work is ``k x p`` sized.

Independently of the mode, ``materialize(index)`` folds one stored task's ``dW`` into the base weight
(zero inference overhead) and ``restore()`` puts the original weight back, bit-exact. See "Inference"
in ``docs/architecture.md``.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch
from torch import Tensor, nn

from .config import TrainingMode
from .errors import ShareClError

ADAPTER_DTYPE = torch.float32  # bases, coefficients and trainables, whatever the base weights' dtype


class Serving(StrEnum):
    """What a layer that is not training computes."""

    OFF = "off"  # the base layer alone
    TASKS = "tasks"  # the stored tasks that ``task_ids`` selects, one per row


class ModelStateError(ShareClError, RuntimeError):
    """The layer or model is not in the state the call needs (no task selected, none training, ...)."""


class ShareLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"ShareLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.mode: TrainingMode | Serving = Serving.OFF
        self.scaling = 1.0
        # Bases, stacked task coefficients and trainables stay float32 whatever the base weights' dtype: a
        # bf16 base then trains and serves against exact bases (``ADAPTER_DTYPE``; see ``_delta``).
        factory = {"dtype": ADAPTER_DTYPE, "device": base_layer.weight.device}
        # Bases and stacked task coefficients are buffers: saved with the model, never trained.
        self.register_buffer("U_A", torch.zeros(self.in_features, 0, **factory), persistent=False)
        self.register_buffer("U_B", torch.zeros(self.out_features, 0, **factory), persistent=False)
        self.register_buffer("task_E_A", torch.zeros(1, 0, 0, **factory), persistent=False)
        self.register_buffer("task_E_B", torch.zeros(1, 0, 0, **factory), persistent=False)
        self.task_ids: Tensor | None = None  # set per forward by ShareModel
        self.trainable = nn.ParameterDict()
        self._original_weight: Tensor | None = None  # the base weight while a task is materialized

    # -- state ---------------------------------------------------------------------------------
    def set_subspace(self, U_A: Tensor, U_B: Tensor, E_A: list[Tensor], E_B: list[Tensor]) -> None:
        """Install bases and every task's coefficients (zero-padded to a common ``p``).

        A zero slot is appended so that task id ``-1`` (no update) indexes it. A materialized task is
        restored first.
        """
        self.restore()
        dtype, device = ADAPTER_DTYPE, self.base_layer.weight.device
        self.U_A = U_A.to(device=device, dtype=dtype)
        self.U_B = U_B.to(device=device, dtype=dtype)
        p = max((e.shape[1] for e in E_A), default=1)
        stack_A = torch.zeros(len(E_A) + 1, U_A.shape[1], p, dtype=dtype, device=device)
        stack_B = torch.zeros(len(E_B) + 1, U_B.shape[1], p, dtype=dtype, device=device)
        for i, (ea, eb) in enumerate(zip(E_A, E_B, strict=True)):
            stack_A[i, :, : ea.shape[1]] = ea
            stack_B[i, :, : eb.shape[1]] = eb
        self.task_E_A, self.task_E_B = stack_A, stack_B

    def start_lora(
        self, r: int, lora_alpha: float, generator: torch.Generator, init: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """LoRA factors: ``A`` random (Kaiming-uniform as PEFT), ``B`` zero, so ``dW = 0`` exactly.

        ``init = (B, A)`` continues training existing factors instead (sequential finetuning).
        A materialized task is restored first: training starts from the base weight.
        """
        self.restore()
        factory = {"dtype": ADAPTER_DTYPE, "device": self.base_layer.weight.device}
        if init is None:
            bound = 1.0 / math.sqrt(self.in_features)
            A = (torch.rand(r, self.in_features, generator=generator) * 2 - 1) * bound
            B = torch.zeros(self.out_features, r)
        else:
            B, A = (t.detach().clone() for t in init)
            if B.shape != (self.out_features, r) or A.shape != (r, self.in_features):
                raise ShareClError(f"initial factors {tuple(B.shape)}, {tuple(A.shape)} do not fit r={r} here")
        self.trainable = nn.ParameterDict(
            {"lora_A": nn.Parameter(A.to(**factory)), "lora_B": nn.Parameter(B.to(**factory))}
        )
        self.scaling = lora_alpha / r
        self.mode = TrainingMode.LORA

    def start_coefficients(
        self,
        p: int,
        phi: int,
        generator: torch.Generator,
        init: tuple[Tensor, Tensor] | None = None,
        init_scale: float = 1e-2,
    ) -> None:
        """Fresh coefficients against the frozen bases.

        Without ``init``: ``E_B`` and ``F_B`` are zero and the A side small random, so ``dW = 0``
        exactly. With ``init = (E_A, E_B)`` (an old task's), the new task warm-starts from it.
        Temporary directions ``V`` are random unit directions orthogonal to the bases. A materialized
        task is restored first.
        """
        self.restore()
        factory = {"dtype": ADAPTER_DTYPE, "device": self.base_layer.weight.device}
        k_A, k_B = self.U_A.shape[1], self.U_B.shape[1]
        if init is None:
            E_A = torch.randn(k_A, p, generator=generator) * init_scale
            E_B = torch.zeros(k_B, p)
            F_A = torch.randn(phi, p, generator=generator) * init_scale
        else:
            E_A, E_B = (t.detach().to("cpu", torch.float32).clone() for t in init)
            if E_A.shape != (k_A, p) or E_B.shape != (k_B, p):
                raise ShareClError(
                    f"warm-start coefficients {tuple(E_A.shape)}, {tuple(E_B.shape)} do not fit "
                    f"k_A={k_A}, k_B={k_B}, p={p}; warm-start from a task with the same p"
                )
            F_A = torch.zeros(phi, p)
        V_A = _orthogonal_directions(self.U_A.cpu().float(), phi, generator)
        V_B = _orthogonal_directions(self.U_B.cpu().float(), phi, generator)
        # A full-rank basis leaves no room for temporary directions on that side.
        params = {
            "E_A": E_A,
            "E_B": E_B,
            "V_A": V_A,
            "F_A": F_A[: V_A.shape[1]],
            "V_B": V_B,
            "F_B": torch.zeros(V_B.shape[1], p),
        }
        self.trainable = nn.ParameterDict({k: nn.Parameter(v.to(**factory)) for k, v in params.items()})
        self.scaling = 1.0
        self.mode = TrainingMode.COEFFICIENTS

    def trained_factors(self) -> tuple[Tensor, Tensor, float]:
        """``(B, A, scaling)`` of what is being trained, temporary directions included, in float32 (also
        under an autocast context, which would otherwise round the products to half precision)."""
        t = {k: v.detach().to(ADAPTER_DTYPE) for k, v in self.trainable.items()}
        if self.mode == TrainingMode.LORA:
            return t["lora_B"].clone(), t["lora_A"].clone(), self.scaling
        if self.mode == TrainingMode.COEFFICIENTS:
            U_A, U_B = self.U_A.to(ADAPTER_DTYPE), self.U_B.to(ADAPTER_DTYPE)
            with torch.autocast(U_A.device.type, enabled=False):
                B = U_B @ t["E_B"] + t["V_B"] @ t["F_B"]
                A_T = U_A @ t["E_A"] + t["V_A"] @ t["F_A"]
            return B.clone(), A_T.T.clone(), 1.0
        raise ModelStateError(f"layer is in mode {str(self.mode)!r}, not training; start a task first")

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.mode == Serving.OFF or self._original_weight is not None:
            return out
        return out + self._delta(x).to(out.dtype)

    def _delta(self, x: Tensor) -> Tensor:
        """The update's output for ``x``. A half-precision ``x`` outside autocast (a bf16 base called
        directly) is computed in float32 against the float32 adapter; under autocast the matmuls
        follow the autocast dtype, as the base layer's do."""
        if x.dtype != ADAPTER_DTYPE and not torch.is_autocast_enabled(x.device.type):
            x = x.to(ADAPTER_DTYPE)
        if self.mode == TrainingMode.LORA:
            t = self.trainable
            return self.scaling * ((x @ t["lora_A"].T) @ t["lora_B"].T)
        if self.mode == TrainingMode.COEFFICIENTS:
            t = self.trainable
            A_T = self.U_A @ t["E_A"] + t["V_A"] @ t["F_A"]
            B = self.U_B @ t["E_B"] + t["V_B"] @ t["F_B"]
            return (x @ A_T) @ B.T
        return self._mixed_delta(x)

    def _mixed_delta(self, x: Tensor) -> Tensor:
        if self.task_ids is None:
            raise ModelStateError("no task selected: call ShareModel.set_task(...) or pass tasks= to the model")
        ids = self.task_ids
        batch = x.shape[0]
        if ids.shape[0] not in (1, batch):
            raise ShareClError(f"task_ids has {ids.shape[0]} entries but the batch has {batch} rows")
        z = (x @ self.U_A).reshape(batch, -1, self.U_A.shape[1])  # shared by all rows: b x L x k_A
        if ids.shape[0] == 1 or bool((ids == ids[0]).all()):  # one task for the batch: plain matmuls
            y = (z @ self.task_E_A[ids[0]]) @ self.task_E_B[ids[0]].T
        else:
            y = torch.bmm(torch.bmm(z, self.task_E_A[ids]), self.task_E_B[ids].transpose(1, 2))
        return (y @ self.U_B.T).reshape(*x.shape[:-1], self.out_features)

    # -- materialize / restore -----------------------------------------------------------------
    def materialize(self, index: int) -> None:
        """Fold stored task ``index``'s ``dW`` into the base weight (no inference overhead); ``restore()`` undoes it."""
        if self._original_weight is not None:
            raise ModelStateError("a task is already materialized in this layer; call restore() first")
        weight = self.base_layer.weight
        self._original_weight = weight.detach().clone()
        dW = (self.U_B @ self.task_E_B[index]) @ (self.U_A @ self.task_E_A[index]).T
        with torch.no_grad():
            weight.add_(dW.to(weight.dtype))

    def restore(self) -> None:
        """Put the original base weight back, bit-exact (nothing to do if no task is materialized)."""
        if self._original_weight is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._original_weight)
            self._original_weight = None

    def extra_repr(self) -> str:
        k = (self.U_A.shape[1], self.U_B.shape[1])
        return f"in={self.in_features}, out={self.out_features}, k={k}, mode={self.mode}"


def _orthogonal_directions(U: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` orthonormal columns orthogonal to ``U``'s (random, reproducible by ``generator``)."""
    dim = U.shape[0]
    if count == 0:
        return torch.zeros(dim, 0)
    count = min(count, dim - U.shape[1])
    G = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    U64 = U.to(torch.float64)
    for _ in range(2):  # twice is enough for orthogonality to working precision
        G = G - U64 @ (U64.T @ G)
    Q, _ = torch.linalg.qr(G)
    return Q.to(torch.float32)
