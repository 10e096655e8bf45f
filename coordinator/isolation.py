"""Merge a batch so that one bad submission never blocks the others: isolate it by bisection.

``merge_isolating(head, accepted, policy)`` tries the whole batch. If ``share.merge`` raises, or the
merge leaves some task over the policy's ``max_error`` (``MergeReport.over_bound``) and not every
submission in it allows that, the batch is split in halves and each half is tried on its own, down
to single submissions: a single one that fails is the culprit and is rejected with the reason. The
halves that merge are then merged together. If two halves merge alone but not together (only their
combination goes over the bound), the first half is merged now and the second waits, still pending,
for the next version (where it is tried against the new head). A batch with no bad submission costs
one merge, as before; each bad one adds about ``2 log2(batch)`` small merges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from share import KPolicy, MergeReport, Subspace, merge

from .validation import Accepted

log = logging.getLogger(__name__)

_SHOWN = 8  # tasks listed in an over-bound reason


@dataclass
class Isolation:
    """What to publish (``merged``/``report``, None when nothing merges), from which submissions
    (``kept``), what to reject (submission id -> reason) and what to leave pending for the next step."""

    merged: Subspace | None = None
    report: MergeReport | None = None
    kept: list[Accepted] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    deferred: list[Accepted] = field(default_factory=list)
    merges: int = 0  # merges tried (1 when the batch merged at once)


def merge_isolating(head: Subspace | None, batch: list[Accepted], policy: KPolicy | None) -> Isolation:
    """Merge as much of ``batch`` into ``head`` as can go in; see the module docstring."""
    if not batch:
        return Isolation()
    outcome = _try(head, batch, policy)
    if not isinstance(outcome, str):
        return Isolation(outcome[0], outcome[1], list(batch), merges=1)
    if len(batch) == 1:
        sid = batch[0].submission.id
        assert sid is not None
        log.info("submission %s cannot be merged: %s", sid, outcome)
        return Isolation(rejected={sid: outcome}, merges=1)
    half = len(batch) // 2
    left = merge_isolating(head, batch[:half], policy)
    right = merge_isolating(head, batch[half:], policy)
    rejected = {**left.rejected, **right.rejected}
    deferred = left.deferred + right.deferred
    merges = 1 + left.merges + right.merges
    if not left.kept or not right.kept:
        one = left if left.kept else right
        return Isolation(one.merged, one.report, one.kept, rejected, deferred, merges)
    both = left.kept + right.kept
    outcome = _try(head, both, policy)
    merges += 1
    if not isinstance(outcome, str):
        return Isolation(outcome[0], outcome[1], both, rejected, deferred, merges)
    # Each half merges alone, together they do not: the second half waits for the next version.
    log.info("%d submission(s) merge only without each other; %d wait for the next version", len(both), len(right.kept))
    return Isolation(left.merged, left.report, left.kept, rejected, deferred + right.kept, merges)


def _try(head: Subspace | None, group: list[Accepted], policy: KPolicy | None) -> tuple[Subspace, MergeReport] | str:
    """The merge of ``group`` into ``head``, or why it cannot be published (a reason naming the task
    when ``group`` is a single submission)."""
    adapters = {a.submission.task: a.adapter for a in group}
    try:
        merged, report = merge(head, adapters, policy)
    except Exception as err:  # any failure of one submission's merge must not block the others
        task = group[0].submission.task if len(group) == 1 else "this batch"
        return (
            f"task {task!r}: merging it failed ({type(err).__name__}: {err}); it was rejected so that the other "
            "submissions could merge: fix the adapter and submit it again under a new task name"
        )
    if report.over_bound and not all(a.submission.allow_over_bound for a in group):
        return over_bound_reason([a.submission.task for a in group], report)
    return merged, report


def over_bound_reason(tasks: list[str], report: MergeReport) -> str:
    """Why a merge that leaves tasks over the policy's bound is refused, with the numbers."""
    worst = sorted(report.over_bound.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{task}: {bound:.3g}" for task, bound in worst[:_SHOWN])
    more = f" and {len(worst) - _SHOWN} more" if len(worst) > _SHOWN else ""
    capped = f"; k_max capped modules {report.capped_modules[:_SHOWN]}" if report.capped_modules else ""
    ks = sorted({k for pair in report.k.values() for k in pair})
    k_range = f"k {ks[0]}-{ks[-1]}" if ks else "k n/a"
    name = repr(tasks[0]) if len(tasks) == 1 else f"of {tasks}"
    return (
        f"task {name}: merging it would leave {len(worst)} task(s) over the forgetting bound "
        f"max_error={report.max_error} (cumulative relative error bound {shown}{more}; {k_range}{capped}). "
        "Rejected to protect the committed tasks: raise adapter.k_max or adapter.max_error of the job, "
        "or set adapter.allow_over_bound=true to accept the loss"
    )
