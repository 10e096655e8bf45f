"""Where a task attempt runs (node, host, the GPUs Ray assigned) and which torch device that means."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field

from subspace_store.tracking import NO_VALUE


@dataclass(frozen=True)
class Placement:
    hostname: str
    node: str | None = None  # Ray node id; None outside Ray
    node_ip: str | None = None
    gpu_ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gpus_label(self) -> str:
        """The GPU ids comma-separated, or ``none``."""
        return ",".join(self.gpu_ids) or NO_VALUE

    @property
    def where(self) -> str:
        return self.node_ip or self.hostname

    @property
    def device(self) -> str:
        """``cuda`` when Ray assigned GPUs and CUDA is there, else ``cpu``.

        Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so "cuda" is this task's GPU. Declared GPUs
        on a machine without CUDA (tests, CPU clusters that label nodes) train on the CPU.
        """
        import torch

        return "cuda" if self.gpu_ids and torch.cuda.is_available() else "cpu"


def current_placement() -> Placement:
    """Where this attempt runs: node, node IP, host, and the GPU ids Ray assigned."""
    hostname = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return Placement(
                hostname=hostname,
                node=ray.get_runtime_context().get_node_id(),
                node_ip=ray.util.get_node_ip_address(),
                gpu_ids=tuple(str(g) for g in ray.get_gpu_ids()),
            )
    except Exception as err:  # placement is reported, never needed to train
        print(f"[sharecl] could not read Ray placement: {err}", file=sys.stderr)
    return Placement(hostname=hostname)


def _ray_task_name() -> str | None:
    """The Ray task name of the running task (``sharecl:<job>:<task>``), or None outside Ray.

    For tests' fault-injection hooks (a worker that dies mid-job); not part of the API.
    """
    try:
        import ray

        return ray.get_runtime_context().get_task_name() if ray.is_initialized() else None
    except Exception:
        return None
