"""``TaskHead``: per-task copies of a model's head (e.g. a classifier), routed by task id per row.

The role of PEFT's ``modules_to_save``: the head is not low-rank, so each task keeps its own.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .errors import ShareClError


class TaskHead(nn.Module):
    def __init__(self, template: nn.Module) -> None:
        super().__init__()
        self.template = template
        for param in self.template.parameters():
            param.requires_grad_(False)
        self.task_heads = nn.ModuleDict()  # task index (as str) -> head
        self.training_head: nn.Module | None = None
        self.task_ids: Tensor | None = None

    def new_head(self, state: dict[str, Tensor] | None = None, generator: torch.Generator | None = None) -> nn.Module:
        """A copy of the template, re-initialized, or holding ``state`` (shapes may differ, e.g. num_labels)."""
        head = copy.deepcopy(self.template)
        if state is None:
            with torch.random.fork_rng(devices=[]):
                if generator is not None:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                for module in head.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        else:
            own = dict(head.named_parameters())
            unknown = set(state) - set(own)
            if unknown:
                raise ShareClError(f"head state has keys {sorted(unknown)} that the head lacks ({sorted(own)})")
            for name, value in state.items():
                owner, _, leaf = name.rpartition(".")
                module = head.get_submodule(owner) if owner else head
                setattr(module, leaf, nn.Parameter(value.detach().clone().to(own[name].dtype), requires_grad=False))
        return head

    def set_heads(self, states: list[dict[str, Tensor]]) -> None:
        self.task_heads = nn.ModuleDict(
            {str(i): self.new_head(state) if state else copy.deepcopy(self.template) for i, state in enumerate(states)}
        )

    def start_training(self, generator: torch.Generator, state: dict[str, Tensor] | None = None) -> None:
        self.training_head = self.new_head(state, generator)
        for param in self.training_head.parameters():
            param.requires_grad_(True)

    def stop_training(self) -> None:
        self.training_head = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training_head is not None:
            return self.training_head(x)
        ids = self.task_ids
        if ids is None:
            return self.template(x)
        unique = ids.unique().tolist()
        if len(unique) == 1:
            return self._head(unique[0])(x)
        outputs = {i: self._head(i)(x[ids == i]) for i in unique}
        width = max(out.shape[-1] for out in outputs.values())
        first = next(iter(outputs.values()))
        # Tasks may have different label counts: pad logits with -inf so argmax stays per task.
        result = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for i, out in outputs.items():
            result[ids == i, ..., : out.shape[-1]] = out
        return result

    def _head(self, index: int) -> nn.Module:
        return self.template if index < 0 else self.task_heads[str(index)]
