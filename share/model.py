"""Attach Share to any ``torch.nn.Module`` by target module names, as PEFT's ``target_modules`` does.

model = ShareModel(base, target_modules=["query", "value"], heads=["head"])
model.start_lora("task0", r=8)                  # cold start: plain LoRA training
... train, then: adapter = model.trained_adapter()
subspace, report = share.merge(None, {"task0": adapter})
model.load_subspace(subspace)
model.start_coefficients("task1", p=8, phi=2)   # Phase 2: coefficients + temporary directions
...
model.set_task("task0"); model(x)               # one task
model(x, tasks=["task0", "task1", ...])         # one task per row
model.materialize("task0"); model.restore()     # fold one task into the weights, and back
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import LoraAdapter
from .config import TrainingMode
from .errors import ShareClError
from .head import TaskHead
from .layer import ModelStateError, Serving, ShareLinear
from .subspace import Subspace, UnknownTaskError, check_task_name
from .targets import is_target
from .update import TaskUpdate


def match_modules(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """Names of ``nn.Linear`` modules that ``target`` selects.

    A string is a regular expression that must match the whole name; a list matches a name equal
    to an entry or ending with ``"." + entry`` (PEFT's rules, ``share.targets.is_target``).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear | ShareLinear)]
    names = [n for n in names if not n.endswith(".base_layer")]
    chosen = [n for n in names if is_target(target, n)]
    if not chosen:
        sample = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise ShareClError(f"target_modules {target!r} matched no nn.Linear module; linear modules are: {sample}")
    return chosen


class ShareModel(nn.Module):
    def __init__(self, model: nn.Module, target_modules: str | Sequence[str], heads: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
        self.layers: dict[str, ShareLinear] = {}
        for name in match_modules(model, target_modules):
            layer = model.get_submodule(name)
            if not isinstance(layer, ShareLinear):
                layer = ShareLinear(layer)
                _replace(model, name, layer)
            self.layers[name] = layer
        self.heads: dict[str, TaskHead] = {}
        for name in heads:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ShareClError(
                    f"head {name!r} is not a submodule of the model; name it as in named_modules()"
                ) from None
            if not isinstance(module, TaskHead):
                module = TaskHead(module)
                _replace(model, name, module)
            self.heads[name] = module
        self.task_names: list[str] = []
        self.training_task: str | None = None
        self._subspace: Subspace | None = None
        self._materialized_task: str | None = None

    # -- subspace ------------------------------------------------------------------------------
    def check_subspace(self, subspace: Subspace) -> None:
        """``ShareClError`` naming what does not fit if ``load_subspace(subspace)`` could not install it
        (modules, their shapes, head tensors); changes nothing.

        A task's tensors for an attached head must hold every parameter of the model's head, each with its
        trailing dimensions (the leading one, e.g. the number of labels, is the task's own), and a bias as long
        as its weight's leading dimension where the model's head has it so. A task holding none of a head's
        tensors is served by the model's own head (as a PEFT adapter without ``modules_to_save`` is)."""
        if set(subspace.modules) != set(self.layers):
            raise ShareClError(
                "the subspace's modules differ from the attached ones; unknown: "
                f"{sorted(set(subspace.modules) - set(self.layers))}, "
                f"not in subspace: {sorted(set(self.layers) - set(subspace.modules))}. "
                "Attach with the target_modules the subspace was built with"
            )
        for name, layer in self.layers.items():
            basis = subspace.modules[name]
            if (basis.out_features, basis.in_features) != (layer.out_features, layer.in_features):
                raise ShareClError(
                    f"module {name!r}: subspace shape {(basis.out_features, basis.in_features)} differs from "
                    f"the model's {(layer.out_features, layer.in_features)}; is this the same base model?"
                )
        templates = {h: dict(head.template.named_parameters()) for h, head in self.heads.items()}
        for tname, task in subspace.tasks.items():
            states: dict[str, dict[str, Tensor]] = {h: {} for h in templates}
            for key, value in task.head.items():
                owner = next((h for h in templates if key.startswith(h + ".")), None)
                if owner is not None:  # else a head this model does not attach: not installed
                    states[owner][key[len(owner) + 1 :]] = value
            for owner, state in states.items():
                problem = _head_state_problem(owner, state, templates[owner]) if state else None
                if problem is not None:
                    shapes = {k: tuple(v.shape) for k, v in templates[owner].items()}
                    raise ShareClError(
                        f"task {tname!r}: {problem}, so it does not fit head {owner!r} {shapes}; "
                        "publish the task with the whole head it was trained with"
                    )

    def load_subspace(self, subspace: Subspace) -> None:
        """Install the subspace's bases, every task's coefficients and every task's head; checked first
        (``check_subspace``), so a subspace that does not fit leaves the model as it was."""
        self.check_subspace(subspace)
        self.restore()
        self.task_names = list(subspace.tasks)
        for name, layer in self.layers.items():
            basis = subspace.modules[name]
            E = [subspace.tasks[t].E[name] for t in self.task_names]
            layer.set_subspace(basis.U_A, basis.U_B, [e[0] for e in E], [e[1] for e in E])
        for hname, head in self.heads.items():
            prefix = hname + "."
            head.set_heads(
                [
                    {k[len(prefix) :]: v for k, v in subspace.tasks[t].head.items() if k.startswith(prefix)}
                    for t in self.task_names
                ]
            )
        self._subspace = subspace
        self.set_task(None)

    @property
    def subspace(self) -> Subspace | None:
        return self._subspace

    # -- training ------------------------------------------------------------------------------
    def start_lora(
        self, task: str, r: int = 8, lora_alpha: float = 16.0, seed: int = 0, init: LoraAdapter | None = None
    ) -> int:
        """Plain LoRA training of a new task (cold start). Returns the trainable parameter count.

        ``init`` continues from an adapter's factors (its scaling must be ``lora_alpha / r``); the head
        starts fresh either way.
        """
        if r < 1:
            raise ShareClError(f"r must be >= 1 (got {r})")
        generator = self._begin(task, seed)
        for name, layer in self.layers.items():
            layer.start_lora(r, lora_alpha, generator, init=init.factors[name] if init is not None else None)
        return self._finish_start(generator)

    def start_coefficients(self, task: str, p: int, phi: int = 2, seed: int = 0, warm_start: str | None = None) -> int:
        """Phase 2: train coefficients, ``phi`` temporary directions per side and the head.

        Starts with ``dW = 0`` exactly, or from task ``warm_start``'s coefficients and head.
        Returns the trainable parameter count.
        """
        if self._subspace is None:
            raise ModelStateError("no subspace loaded: call load_subspace() first, or start_lora() for a cold start")
        if p < 1 or phi < 0:
            raise ShareClError(f"need p >= 1 and phi >= 0 (got p={p}, phi={phi})")
        generator = self._begin(task, seed)
        source = self._subspace.task(warm_start) if warm_start is not None else None
        for name, layer in self.layers.items():
            layer.start_coefficients(p, phi, generator, init=source.E[name] if source else None)
        return self._finish_start(generator, source.head if source else None)

    def trained_adapter(self) -> LoraAdapter:
        """The task being trained as full factors (temporary directions included) plus its head."""
        if self.training_task is None:
            raise ModelStateError("no task is being trained; call start_lora() or start_coefficients() first")
        factors, scaling = {}, {}
        for name, layer in self.layers.items():
            B, A, s = layer.trained_factors()
            factors[name] = (B.float().cpu(), A.float().cpu())
            scaling[name] = s
        return LoraAdapter(
            factors=factors, scaling=scaling, head=self._trained_head(), metadata={"task": self.training_task}
        )

    def trained_update(self) -> TaskUpdate:
        """The task being trained in coefficient mode, compactly (relative to the loaded subspace)."""
        if self.training_task is None or any(layer.mode != TrainingMode.COEFFICIENTS for layer in self.layers.values()):
            raise ModelStateError(
                "trained_update() needs a task started with start_coefficients(); use trained_adapter()"
            )
        parts = {
            name: {key: value.detach().float().cpu().clone() for key, value in layer.trainable.items()}
            for name, layer in self.layers.items()
        }
        return TaskUpdate(parts=parts, head=self._trained_head(), metadata={"task": self.training_task})

    def _trained_head(self) -> dict[str, Tensor]:
        """The trained head's tensors, keyed by model-relative name (``head.weight``), as PEFT saves them."""
        return {
            f"{hname}.{k}": v.detach().float().cpu().clone()
            for hname, h in self.heads.items()
            for k, v in h.training_head.named_parameters()
        }

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _begin(self, task: str, seed: int) -> torch.Generator:
        check_task_name(task)
        if task in self.task_names:
            raise ShareClError(f"task {task!r} is already in the loaded subspace; choose a new task name")
        self.restore()
        self.training_task = task
        return torch.Generator().manual_seed(seed)

    def _finish_start(self, generator: torch.Generator, head_state: dict[str, Tensor] | None = None) -> int:
        for hname, head in self.heads.items():
            prefix = hname + "."
            state = {k[len(prefix) :]: v for k, v in head_state.items() if k.startswith(prefix)} if head_state else None
            head.start_training(generator, state)
        return self.trainable_parameter_count()

    def stop_training(self) -> None:
        """Leave training mode; the stored tasks (if any) serve inference again."""
        self.training_task = None
        for layer in self.layers.values():
            layer.trainable = nn.ParameterDict()
            layer.mode = Serving.TASKS if self._subspace is not None else Serving.OFF
        for head in self.heads.values():
            head.stop_training()

    # -- inference -----------------------------------------------------------------------------
    def set_task(self, tasks: str | Sequence[str] | None) -> None:
        """Select stored task(s) for inference: one name for all rows, or one name (or None) per row.

        The selection stays until the next call, as PEFT's ``set_adapter`` does.

        ``None`` selects the base model alone. Ends any training in progress. Selecting anything but
        the materialized task (by its name) restores the base weights first, as PEFT unmerges before
        ``set_adapter``.
        """
        if self.training_task is not None:
            self.stop_training()
        if self._materialized_task is not None and tasks != self._materialized_task:
            self.restore()
        if tasks is None:
            for layer in self.layers.values():
                layer.mode = Serving.OFF
            for head in self.heads.values():
                head.task_ids = None
            return
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        index: dict[str | None, int] = {name: i for i, name in enumerate(self.task_names)}
        index[None] = -1  # a row named None runs the base model alone (PEFT's "__base__")
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            raise UnknownTaskError(f"unknown task(s) {unknown}; loaded tasks: {', '.join(self.task_names) or 'none'}")
        self._set_ids(torch.tensor([index[n] for n in names], dtype=torch.long))

    def _set_ids(self, ids: Tensor) -> None:
        for layer in self.layers.values():
            layer.mode = Serving.TASKS
            layer.task_ids = ids.to(layer.U_A.device)
        for head in self.heads.values():
            head.task_ids = ids

    def forward(self, *args: Any, tasks: str | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; ``tasks`` (a name, or one name per row) selects stored tasks for this call."""
        if tasks is not None:
            batch = _batch_size(args, kwargs)
            if not isinstance(tasks, str) and len(tasks) != batch:
                raise ShareClError(f"tasks names {len(tasks)} rows but the batch has {batch}")
            self.set_task(tasks)
        return self.model(*args, **kwargs)

    # -- materialize / restore -----------------------------------------------------------------
    @property
    def materialized(self) -> str | None:
        """The task folded into the base weights now, or None."""
        return self._materialized_task

    def materialize(self, task: str) -> None:
        """Fold ``task`` into the base weights (zero overhead) and select its head; ``restore()`` undoes it.

        Another materialized task is restored first; selecting another task later restores this one.
        """
        if task == self._materialized_task:
            return
        self.set_task(task)  # restores any other materialized task
        index = self.task_names.index(task)
        for layer in self.layers.values():
            layer.materialize(index)
        self._materialized_task = task

    def restore(self) -> None:
        """Put the original base weights back, bit-exact. The selected task stays selected (unfolded)."""
        for layer in self.layers.values():
            layer.restore()
        self._materialized_task = None


def _head_state_problem(head: str, state: dict[str, Tensor], template: dict[str, nn.Parameter]) -> str | None:
    """What keeps a task's ``state`` for ``head`` (parameter name -> tensor) from replacing the ``template``
    head's parameters, or None (the rules: ``ShareModel.check_subspace``)."""
    missing = sorted(set(template) - set(state))
    if missing:
        return f"its head tensors lack {[f'{head}.{n}' for n in missing]} (it has {[f'{head}.{n}' for n in state]})"
    for name, value in state.items():
        own = template.get(name)
        if own is None or value.ndim != own.ndim or value.shape[1:] != own.shape[1:]:
            return f"head tensor '{head}.{name}' of shape {tuple(value.shape)} has no counterpart of that shape"
    for name, bias in state.items():
        module, _, leaf = name.rpartition(".")
        weight_name = f"{module}.weight" if module else "weight"
        if leaf != "bias" or weight_name not in template:
            continue
        weight = state[weight_name]
        if template[name].shape == template[weight_name].shape[:1] and bias.shape != weight.shape[:1]:
            return (
                f"head tensor '{head}.{name}' of shape {tuple(bias.shape)} does not match '{head}.{weight_name}' "
                f"of shape {tuple(weight.shape)} (a bias has one entry per row of its weight)"
            )
    return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ShareClError("cannot tell the batch size: pass at least one tensor input")
