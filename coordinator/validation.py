"""Check submissions before they may enter a merge, and rebuild each one's full factors.

Every check that can fail names the submission and what to do; a failing submission is rejected
with that reason and never reaches ``share.merge``, so one bad result cannot block a batch. Anything
else its checks raise (a malformed submission no check foresaw, a bug) rejects it too, with the
exception's type and message.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from share import LoraAdapter, Subspace
from share.errors import ShareClError
from subspace_store import Submission, SubspaceStore, VersionNotFoundError
from subspace_store.stream import check_names

BASE_MODEL_KEY = "base_model"  # in submission metadata and in the subspace's metadata
SUBMISSION_KEY = "submission"  # task metadata: where the coordinator records the submission it came from

log = logging.getLogger(__name__)


@dataclass
class Accepted:
    submission: Submission
    adapter: LoraAdapter  # full factors (rebuilt in the base version's bases for updates)


@dataclass
class Verdicts:
    accepted: list[Accepted] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # submission id -> reason
    already_merged: list[str] = field(default_factory=list)  # ids the head already holds: acknowledge only


class BaseCache:
    """Bases (no tasks) of recently used versions: every update trained on ``vN`` needs ``vN``'s bases."""

    def __init__(self, store: SubspaceStore, size: int = 8) -> None:
        self.store = store
        self.size = size
        self._cache: OrderedDict[str, Subspace] = OrderedDict()

    def put(self, version: str, subspace: Subspace) -> None:
        self._cache[version] = subspace
        self._cache.move_to_end(version)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def get(self, version: str) -> Subspace:
        """Raises VersionNotFoundError if ``version`` was never published or was pruned."""
        if version in self._cache:
            self._cache.move_to_end(version)
            return self._cache[version]
        subspace = self.store.get(version, tasks=[])
        self.put(version, subspace)
        return subspace


def check_batch(
    submissions: list[Submission], head: Subspace | None, head_version: str | None, bases: BaseCache
) -> Verdicts:
    """Sort ``submissions`` into accepted (with full factors), rejected (with a reason) and already merged.

    Never raises for one submission: whatever its checks raise (malformed metadata or tensors that the
    stream's decoding let through, a bug) rejects that submission with the exception's type and message.
    """
    verdicts = Verdicts()
    taken: dict[str, str] = {}  # task -> id of the submission that claimed it in this batch
    reference = _Reference.of(head)
    base_model = head.metadata.get(BASE_MODEL_KEY) if head is not None else None
    for sub in submissions:
        assert sub.id is not None
        try:
            verdict = _check(sub, head, head_version, bases, taken, reference, base_model)
        except (RedisError, OSError):  # the store unreachable (loading a base version): no verdict; the step retries
            raise
        except ShareClError as err:  # our own checks: the message names the problem and the fix
            verdicts.rejected[sub.id] = str(err)
            continue
        except RuntimeError as err:  # torch: factors whose shapes do not chain in the rebuild
            verdicts.rejected[sub.id] = f"task {sub.task!r}: malformed update ({err}); resubmit the trainer's output"
            continue
        except Exception as err:  # anything else must not fail the batch and block the stream
            log.warning("submission %s (task %r) failed its checks", sub.id, sub.task, exc_info=True)
            verdicts.rejected[sub.id] = (
                f"task {sub.task!r}: checking it failed ({type(err).__name__}: {err}); it was rejected so that "
                "the other submissions could merge: fix the submission and submit it again"
            )
            continue
        if isinstance(verdict, str):
            verdicts.already_merged.append(sub.id)
            continue
        accepted, reference = verdict
        theirs = sub.metadata.get(BASE_MODEL_KEY)
        if base_model is None and theirs is not None:
            base_model = theirs  # cold start: the first submission decides the subspace's base model
        taken[sub.task] = sub.id
        verdicts.accepted.append(accepted)
    return verdicts


def _check(
    sub: Submission,
    head: Subspace | None,
    head_version: str | None,
    bases: BaseCache,
    taken: dict[str, str],
    reference: _Reference,
    base_model: Any,
) -> tuple[Accepted, _Reference] | str:
    """One submission's checks: the accepted submission (with provenance) and the reference that the next ones
    must match, or its id when the head already holds it. Raises ShareClError naming why it is rejected."""
    assert sub.id is not None
    if head is not None and sub.task in head.tasks:
        origin = head.tasks[sub.task].metadata.get(SUBMISSION_KEY, {}).get("id")
        if origin == sub.id:
            return sub.id
        raise ShareClError(
            f"task {sub.task!r} is already in {head_version} (from submission {origin or 'unknown'}); "
            "tasks are never overwritten: submit it under a new task name"
        )
    if sub.task in taken:
        raise ShareClError(
            f"task {sub.task!r} was submitted twice in one batch; submission {taken[sub.task]} is merged, "
            "this one is dropped: submit it under a new task name"
        )
    theirs = sub.metadata.get(BASE_MODEL_KEY)
    if base_model is not None and theirs is not None and theirs != base_model:
        raise ShareClError(
            f"task {sub.task!r} was trained on base model {theirs!r}, the subspace is for {base_model!r}; "
            "train it on the subspace's base model or use another store namespace"
        )
    adapter = _rebuild(sub, bases)
    check_names(sub.task, adapter.factors, adapter.head)  # names publishing would refuse, failing the whole batch
    adapter.validate(sub.task)
    reference = reference.check(sub.task, adapter)
    return Accepted(sub, _with_provenance(sub, adapter)), reference


def _rebuild(sub: Submission, bases: BaseCache) -> LoraAdapter:
    base = None
    if sub.base_version is not None:
        try:
            base = bases.get(sub.base_version)
        except VersionNotFoundError:
            raise ShareClError(
                f"task {sub.task!r}: base version {sub.base_version!r} does not exist (never published, or "
                "pruned; pin versions that running jobs start from); retrain it from the current head"
            ) from None
    if sub.update is not None and base is None:
        raise ShareClError(f"task {sub.task!r}: a coefficient update needs the base version it was trained from")
    return sub.to_adapter(base)


def _with_provenance(sub: Submission, adapter: LoraAdapter) -> LoraAdapter:
    """A copy whose metadata (it becomes the task's metadata) records where the task came from.

    The submission's own metadata travels along: it carries, e.g., the eval spec that lets the
    coordinator evaluate the task after every later merge, from any incarnation.
    """
    metadata = dict(adapter.metadata)
    metadata[SUBMISSION_KEY] = {"id": sub.id, "base_version": sub.base_version, "metadata": sub.metadata}
    return LoraAdapter(factors=adapter.factors, scaling=adapter.scaling, head=adapter.head, metadata=metadata)


@dataclass
class _Reference:
    """Module names and ``(out, in)`` shapes every submission must match: the head's, or at a cold
    start the first accepted submission's."""

    shapes: dict[str, tuple[int, int]] | None

    @classmethod
    def of(cls, head: Subspace | None) -> _Reference:
        if head is None:
            return cls(None)
        return cls({m: (b.out_features, b.in_features) for m, b in head.modules.items()})

    def check(self, task: str, adapter: LoraAdapter) -> _Reference:
        shapes = {m: (B.shape[0], A.shape[1]) for m, (B, A) in adapter.factors.items()}
        if self.shapes is None:
            return _Reference(shapes)
        got, expected = set(shapes), set(self.shapes)
        if got != expected:
            raise ShareClError(
                f"task {task!r}: modules differ from the subspace's; unknown: {sorted(got - expected)}, "
                f"missing: {sorted(expected - got)}. Train it with the subspace's target_modules"
            )
        for module, shape in shapes.items():
            if shape != self.shapes[module]:
                raise ShareClError(
                    f"task {task!r}, module {module!r}: update shape {shape} (out x in) does not match the "
                    f"subspace's {self.shapes[module]}; was it trained on another base model?"
                )
        return self
