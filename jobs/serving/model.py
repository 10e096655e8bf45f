"""The model a ``sharecl serve`` replica answers with: one base model, every task of a version installed.

``ServedModel`` has the ``load_subspace(subspace)`` method that ``subspace_store.deploy.TagFollower``
installs versions through. The first version builds the base model its tasks were trained on (the
builder, model and dtype their jobs recorded, through ``workers.models.build_share_model`` as the
coordinator's evaluation does); every later version is checked against that model before anything is
changed, so a version that cannot be served leaves the one being served untouched. Inputs are truncated
to ``max_length`` tokens (the ``max_length`` option, else the longest its tasks' jobs recorded), capped at
what the base model takes (its tokenizer's ``model_max_length``, its config's ``max_position_embeddings``).
``predict`` runs one mixed-task forward (one task per row) and returns each row's class index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from share import Subspace
from share.errors import ShareClError
from subspace_store.deploy import head_modules

DEFAULT_MAX_LENGTH = 128  # tokens per input when no task recorded its job's model.max_length
UNSET_MAX_LENGTH = 1_000_000  # a tokenizer's model_max_length at or above this is transformers' "not set"
SUBMISSION_KEY = "submission"  # task metadata: the submission the coordinator merged (coordinator.validation)

log = logging.getLogger("ray.serve")  # as engine's: Serve keeps replica logs of this logger


class ServeError(ShareClError):
    """The server cannot start, or cannot serve a version; the message says why and what to do."""


class VersionLoadError(ServeError):
    """A version cannot be installed into the served model (the model being served is unchanged)."""


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model a version's tasks were trained on, as their jobs recorded it."""

    builder: str
    model_name_or_path: str | None  # None: the builder's default (the bundled all-MiniLM-L6-v2)
    dtype: str = "float32"

    def describe(self) -> str:
        return f"{self.model_name_or_path or 'the bundled all-MiniLM-L6-v2'} (builder {self.builder}, {self.dtype})"


def submitted_metadata(task_metadata: dict[str, Any]) -> dict[str, Any]:
    """What the task's job (or ``sharecl adapters add``) submitted with it, as the coordinator recorded it."""
    entry = task_metadata.get(SUBMISSION_KEY)
    meta = entry.get("metadata") if isinstance(entry, dict) else None
    return meta if isinstance(meta, dict) else {}


def base_model_spec(subspace: Subspace) -> BaseModelSpec:
    """The one base model every task of ``subspace`` was trained on. Tasks that recorded no builder (e.g.
    added as PEFT folders) go with the others; with none recorded at all, the default builder's model."""
    from workers.models import DEFAULT_BUILDER

    specs: dict[BaseModelSpec, list[str]] = {}
    for name, task in subspace.tasks.items():
        meta = submitted_metadata(task.metadata)
        builder = meta.get("builder")
        if not isinstance(builder, str) or not builder:
            continue
        model = meta.get("model_name_or_path")
        dtype = meta.get("dtype")
        spec = BaseModelSpec(
            builder,
            model if isinstance(model, str) and model else None,
            dtype if isinstance(dtype, str) and dtype else "float32",
        )
        specs.setdefault(spec, []).append(name)
    if len(specs) > 1:
        listed = "; ".join(f"{spec.describe()}: {', '.join(names)}" for spec, names in specs.items())
        raise VersionLoadError(
            f"the version's tasks were trained on different base models ({listed}); one server serves one base "
            "model: serve a version whose tasks share theirs"
        )
    return next(iter(specs)) if specs else BaseModelSpec(DEFAULT_BUILDER, None)


def _recorded_max_length(subspace: Subspace) -> int | None:
    lengths = [
        meta["max_length"]
        for meta in (submitted_metadata(t.metadata) for t in subspace.tasks.values())
        if isinstance(meta.get("max_length"), int) and not isinstance(meta.get("max_length"), bool)
    ]
    lengths = [n for n in lengths if n >= 1]
    return max(lengths) if lengths else None


def _length_limit(model: torch.nn.Module, tokenizer: Any) -> int | None:
    """The most tokens ``model`` takes per input: the smaller of its tokenizer's ``model_max_length`` (when
    set) and the ``max_position_embeddings`` of the first config in it that states one; None if neither does."""
    limits = []
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 1 <= stated < UNSET_MAX_LENGTH:
        limits.append(stated)
    for module in model.modules():
        positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and positions >= 1:
            limits.append(positions)
            break
    return min(limits, default=None)


def label_names(subspace: Subspace, task: str, num_labels: int) -> list[str]:
    """The task's label names as its training data named them, else the class indices as strings."""
    names = submitted_metadata(subspace.tasks[task].metadata).get("label_names")
    if isinstance(names, list) and len(names) == num_labels and all(isinstance(n, str) for n in names):
        return list(names)
    return [str(i) for i in range(num_labels)]


class ServedModel:
    """One base model (a ``ShareModel``) holding every task of the version being served, and its tokenizer."""

    def __init__(self, *, device: str | None = None, max_length: int | None = None, chunk_rows: int = 256) -> None:
        if chunk_rows < 1:
            raise ServeError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.device = device
        self.max_length_option = max_length
        self.chunk_rows = chunk_rows
        self.spec: BaseModelSpec | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_length = max_length or DEFAULT_MAX_LENGTH
        self.length_limit: int | None = None  # the most tokens the base model takes (known once it is built)
        self._capped_logged: int | None = None  # the max_length whose cap was last logged
        self.labels: dict[str, list[str]] = {}
        self._forward_lock = threading.Lock()  # a forward sets per-row task ids on the layers: one at a time

    @property
    def task_names(self) -> list[str]:
        return list(self.labels)

    # -- installing a version --------------------------------------------------------------------
    def load_subspace(self, subspace: Subspace) -> None:
        """Install every task of ``subspace``; ``VersionLoadError`` (the served version untouched) if it cannot."""
        try:
            spec = base_model_spec(subspace)
            if self.model is not None and spec != self.spec:
                raise VersionLoadError(
                    f"its tasks were trained on {spec.describe()}, this server serves {self.spec.describe()}; "
                    "restart `sharecl serve` to serve another base model"
                )
            labels = self._check_tasks(subspace)
            if self.model is None:
                self._build(spec, subspace)
            self.model.check_subspace(subspace)
            missing = sorted(set(head_modules(subspace)) - set(self.model.heads))
            if missing:
                raise VersionLoadError(f"its tasks have heads {missing} that the served model lacks")
        except VersionLoadError:
            raise
        except (ShareClError, OSError) as err:  # their messages say what is wrong
            raise VersionLoadError(str(err)) from err
        except Exception as err:  # e.g. a builder or a model config that fails otherwise: still not servable
            raise VersionLoadError(f"{type(err).__name__}: {err}") from err
        previous = self.model.subspace
        try:
            self.model.load_subspace(subspace)
        except Exception as err:  # checked above, so unexpected: put the served version back
            if previous is not None:
                self.model.load_subspace(previous)
            raise VersionLoadError(f"installing it failed ({type(err).__name__}: {err})") from err
        self.model.eval()
        self.spec = spec
        self.labels = labels
        self.max_length = self._capped(self.max_length_option or _recorded_max_length(subspace) or DEFAULT_MAX_LENGTH)

    def _capped(self, max_length: int) -> int:
        """``max_length`` at most ``length_limit``; a cap is logged once per ``max_length`` it cuts."""
        if self.length_limit is None or max_length <= self.length_limit:
            return max_length
        if max_length != self._capped_logged:
            log.warning(
                "sharecl serve: max_length %d (the jobs' model.max_length or the max_length option) is more than "
                "%s takes; inputs are truncated to %d tokens",
                max_length,
                self.spec.describe() if self.spec else "the base model",
                self.length_limit,
            )
            self._capped_logged = max_length
        return self.length_limit

    def _check_tasks(self, subspace: Subspace) -> dict[str, list[str]]:
        labels = {}
        for name, task in subspace.tasks.items():
            weight = task.head.get("head.weight")
            if weight is None or weight.ndim != 2 or weight.shape[0] < 1:
                raise VersionLoadError(
                    f"task {name!r} has no classifier head (head.weight); `sharecl serve` answers classification "
                    "tasks trained by sharecl jobs"
                )
            labels[name] = label_names(subspace, name, int(weight.shape[0]))
        return labels

    def _build(self, spec: BaseModelSpec, subspace: Subspace) -> None:
        from workers.models import build_share_model
        from workers.placement import current_placement

        device = self.device or current_placement().device
        model, tokenizer = build_share_model(
            spec.builder, spec.model_name_or_path, list(subspace.modules), 2, seed=0, device=device, dtype=spec.dtype
        )
        if tokenizer is None or not callable(tokenizer):
            raise VersionLoadError(f"builder {spec.builder!r} returned no tokenizer; `sharecl serve` takes text inputs")
        self.model, self.tokenizer, self.spec = model.eval(), tokenizer, spec
        self.length_limit = _length_limit(model.model, tokenizer)

    # -- answering -------------------------------------------------------------------------------
    def predict(self, tasks: Sequence[str], texts: Sequence[str]) -> list[int]:
        """Each row's class index: one forward per ``chunk_rows`` rows, every row with its own task."""
        if len(tasks) != len(texts):
            raise ServeError(f"{len(tasks)} task names for {len(texts)} inputs")
        out: list[int] = []
        with self._forward_lock, torch.inference_mode():
            for start in range(0, len(texts), self.chunk_rows):
                rows = slice(start, start + self.chunk_rows)
                encoded = self.tokenizer(
                    list(texts[rows]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                device = next(iter(self.model.layers.values())).base_layer.weight.device
                logits = self.model(
                    input_ids=encoded["input_ids"].to(device),
                    attention_mask=encoded["attention_mask"].to(device),
                    tasks=list(tasks[rows]),
                )
                # Heads of different widths are padded with -inf, so the argmax stays within each task's labels.
                out.extend(int(i) for i in logits.argmax(dim=-1).tolist())
        return out
