"""The same tasks as PEFT LoRA adapters in ONE ``PeftModel``, for the serving benchmark.

PEFT's own path is a folder per adapter and ``load_adapter`` per task. Each ``load_adapter`` walks every
module and parameter of the model, whose count grows with the adapters already resident, so building T
adapters costs O(T^2) (measured here: ~2 s for the 257th MiniLM adapter on this machine, minutes for a
few hundred). Beyond ``official`` tasks the benchmark therefore puts the adapters into the LoRA layers
directly, setting exactly the per-adapter entries ``LoraLayer.update_layer`` sets for a plain LoRA
(r, alpha, scaling, identity dropout, lora_A/lora_B) and the model's ``peft_config``; the forward code is
PEFT's. ``check_direct_equals_official`` shows that such an adapter answers bit-for-bit like the same
adapter loaded with ``load_adapter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.minilm import TARGETS, load_model
from share import LoraAdapter


def lora_config(r: int, lora_alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, lora_dropout=0.0)


def write_peft_folder(adapter: LoraAdapter, folder: Path) -> Path:
    """``adapter`` as PEFT saves one: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    r, alpha = _rank_alpha(adapter)
    lora_config(r, alpha).save_pretrained(str(folder))
    tensors = {}
    for module, (B, A) in adapter.factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@dataclass
class PeftTasks:
    """One ``PeftModel`` holding the first ``count`` tasks, and how it was built."""

    model: nn.Module
    count: int = 0
    official: int = 0  # tasks loaded with PEFT's load_adapter (the first ones)
    load_seconds: list[float] = field(default_factory=list)  # CPU seconds of each load_adapter call, in order

    def lora_bytes(self) -> int:
        """Exact resident bytes of every lora_A / lora_B parameter."""
        return sum(
            p.numel() * p.element_size()
            for name, p in self.model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name
        )


def load_official(
    adapters: dict[str, LoraAdapter],
    stop: int,
    folder: Path,
    tasks: PeftTasks | None = None,
    base: nn.Module | None = None,
) -> PeftTasks:
    """PEFT's own path up to the ``stop``-th adapter: each saved as a PEFT folder, then
    ``PeftModel.from_pretrained`` for the first and ``load_adapter`` for each next one (each call's CPU time).
    ``tasks`` continues a model built so far by this path alone; ``base`` is the model to wrap (default: a
    fresh all-MiniLM-L6-v2)."""
    from peft import PeftModel

    names = list(adapters)
    if tasks is None:
        start = time.process_time()
        first = write_peft_folder(adapters[names[0]], folder / names[0])
        model = PeftModel.from_pretrained(base or load_model(), str(first), adapter_name=names[0])
        tasks = PeftTasks(model=model.eval(), count=1, official=1, load_seconds=[time.process_time() - start])
    if tasks.count != tasks.official:
        raise ValueError("load_official continues only a model whose every adapter came in by load_adapter")
    for name in names[tasks.count : stop]:
        path = write_peft_folder(adapters[name], folder / name)
        start = time.process_time()
        tasks.model.load_adapter(str(path), adapter_name=name)
        tasks.load_seconds.append(time.process_time() - start)
        tasks.count = tasks.official = tasks.count + 1
    tasks.model.eval()
    return tasks


def add_direct(tasks: PeftTasks, adapters: dict[str, LoraAdapter], stop: int) -> None:
    """Add the adapters from ``tasks.count`` up to ``stop`` straight into the LoRA layers (module docstring)."""
    for name in list(adapters)[tasks.count : stop]:
        put_adapter(tasks.model, adapters[name], name)
    tasks.count = max(tasks.count, stop)


def put_adapter(model: nn.Module, adapter: LoraAdapter, name: str) -> None:
    """What ``LoraLayer.update_layer`` sets for a plain LoRA adapter, with ``adapter``'s weights."""
    r, alpha = _rank_alpha(adapter)
    model.peft_config[name] = lora_config(r, alpha)
    inner = model.base_model.model
    for module, (B, A) in adapter.factors.items():
        layer = inner.get_submodule(module)
        layer.r[name] = r
        layer.lora_alpha[name] = alpha
        layer.lora_dropout[name] = nn.Identity()
        layer.lora_A[name] = _linear(A)
        layer.lora_B[name] = _linear(B)
        layer.lora_bias[name] = False
        layer.scaling[name] = alpha / r
        layer.use_rslora[name] = False
        layer.use_dora[name] = False


def _rank_alpha(adapter: LoraAdapter) -> tuple[int, float]:
    """``(r, lora_alpha)`` of an adapter with one rank and one scaling (``scaling = alpha / r``)."""
    ranks = {A.shape[0] for _, A in adapter.factors.values()}
    scalings = {adapter.scale(m) for m in adapter.factors}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"one rank and one scaling expected, got ranks {ranks} and scalings {scalings}")
    r = ranks.pop()
    return r, scalings.pop() * r


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return linear


def check_direct_equals_official(tasks: PeftTasks, adapters: dict[str, LoraAdapter], name: str) -> float:
    """Put adapter ``name`` (loaded with load_adapter) in again directly under another name; the max
    |difference| of the two answers on the same rows (0.0: the direct path is PEFT's adapter, bit for bit)."""
    if name not in list(adapters)[: tasks.official]:
        raise ValueError(f"{name!r} was not loaded with load_adapter (only the first {tasks.official} were)")
    probe = "direct-check"
    put_adapter(tasks.model, adapters[name], probe)
    try:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 30000, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            official = tasks.model(input_ids=ids, attention_mask=mask, adapter_names=[name] * 4)[0]
            direct = tasks.model(input_ids=ids, attention_mask=mask, adapter_names=[probe] * 4)[0]
        return float((official - direct).abs().max())
    finally:
        _remove(tasks.model, probe)


def _remove(model: nn.Module, name: str) -> None:
    del model.peft_config[name]
    for module in model.base_model.model.modules():
        for attr in ("r", "lora_alpha", "lora_dropout", "lora_A", "lora_B", "lora_bias", "scaling", "use_rslora"):
            holder = getattr(module, attr, None)
            if isinstance(holder, dict | nn.ModuleDict) and name in holder:
                del holder[name]
        use_dora = getattr(module, "use_dora", None)
        if isinstance(use_dora, dict) and name in use_dora:
            del use_dora[name]


def time_one_more(tasks: PeftTasks, adapter: LoraAdapter, name: str, folder: Path) -> float:
    """CPU seconds of one more ``load_adapter`` into the model as it is (the adapter stays resident)."""
    path = write_peft_folder(adapter, folder / name)
    start = time.process_time()
    tasks.model.load_adapter(str(path), adapter_name=name)
    return time.process_time() - start
