"""The merge service: read submissions, validate, merge in one batch, publish with the acks, track.

Pure logic over a ``SubspaceStore`` and a ``SubmissionStream`` (no Ray here; ``actor.py`` wraps it).
Exactly once rests on the store: a submission is acknowledged only in the transaction that
publishes the version holding it, or that records its rejection. So whenever this process dies,
everything it had read is still pending, and the next incarnation (same consumer name) is handed it
again by ``recover`` before reading anything new. A merge already published is never redone: its
submissions are no longer pending, and a task already in the head is never merged twice.

One bad submission never blocks the others: whatever makes its merge fail (an exception from
``share.merge``, or leaving a task over the policy's ``max_error`` when its job does not allow that) is
isolated by bisecting the batch (``isolation.py``) and the submission is rejected with the reason.

A removal request (``subspace_store.RemovalRequest``) in the stream is handled in stream order: the
submissions read before it are merged first, then it is published as its own version (the head
without its tasks, bases refitted by ``share.remove_tasks``; ``metadata["removal"]`` records it), and
what was read after it is handed back to the next step. Older versions keep the removed tasks until
retention prunes them.

Merges are published as delta versions (the new tasks, the bases and the merge's rotations; old tasks
are read through the rotations since, ``subspace_store.chains``). Once the head's longest chain reaches
``max_chain`` after a publish, the coordinator compacts it (``SubspaceStore.compact``, a full version whose
metadata says ``compaction``) in a background thread, at most one at a time: the step returns without
waiting, and the next step (or ``close``) collects the outcome. The hard bound is ``min(2 * max_chain,
MAX_CHAIN)``: a delta publish writes in full every task whose chain would pass it, so a read of the head
applies at most that many rotations even when compaction cannot keep up. A merge whose publish finds the
head moved to a compaction of its own parent (the same subspace) is published again on that compaction,
not merged again. Removals are written in full.

Every MLflow merge run this process opens is ended: finished once its version is published,
FAILED when it is not, and, when a publish ended in an error that leaves its outcome unknown (Redis
went away), settled at the next step or at ``close``. A published merge's record stays with its open run
until MLflow takes it (an MLflow outage), so retention pruning its version never keeps the run open.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from share import KPolicy, Subspace, remove_tasks
from share.errors import ShareClError
from subspace_store import (
    HeadConflictError,
    StoreError,
    Submission,
    SubmissionError,
    SubmissionStatus,
    SubmissionStream,
    SubspaceStore,
    VersionNotFoundError,
)
from subspace_store.chains import DEFAULT_MAX_CHAIN, MAX_CHAIN
from subspace_store.store import COMPACTION_KEY
from subspace_store.stream import RemovalRequest, StreamItem

from .crash import AFTER_MERGE, AFTER_PUBLISH, AFTER_READ, CrashPoints
from .evaluation import Evaluation
from .isolation import merge_isolating
from .matrix import AccuracyMatrix
from .record import COORDINATOR_KEY, RUN_ID_KEY, MergeRecord
from .tracking import MergeTracker
from .validation import BASE_MODEL_KEY, BaseCache, check_batch

log = logging.getLogger(__name__)

REMOVAL_KEY = "removal"  # version metadata of a removal: request id, tasks, reason, parent, errors
CLOSE_WAIT_S = 120.0  # how long ``close`` waits for a running background compaction


@dataclass
class StepResult:
    """What one ``step`` did. ``version`` is None when nothing was published."""

    read: int = 0
    recovered: int = 0  # of ``read``: handed out again (a previous incarnation died holding them)
    version: str | None = None
    parent: str | None = None
    merged: dict[str, str] = field(default_factory=dict)  # submission id -> task
    rejected: dict[str, str] = field(default_factory=dict)  # submission id -> reason
    acknowledged: list[str] = field(default_factory=list)  # already merged earlier: acknowledged only
    deferred: list[str] = field(default_factory=list)  # still pending: merged into the next version instead
    removed: dict[str, list[str]] = field(default_factory=dict)  # removal request id -> tasks it took out
    over_bound: dict[str, float] = field(default_factory=dict)  # task -> error bound, merged over it (allowed)
    head_conflicts: int = 0
    merge_seconds: float = 0.0
    publish_seconds: float = 0.0
    rebased_on_compaction: str | None = None  # the head moved to this compaction of the parent: published on it
    compacted: str | None = None  # a background compaction that landed since the previous step
    compaction_seconds: float = 0.0  # how long that compaction took (in its thread)
    latency_s: dict[str, float] = field(default_factory=dict)  # submission id -> submit-to-published
    accuracy: dict[str, float] = field(default_factory=dict)


@dataclass
class _Compaction:
    """One background compaction. Its thread writes the outcome fields; the coordinator thread reads them only
    once the thread has ended."""

    after: str  # the publish that started it
    thread: threading.Thread = field(init=False)
    version: str | None = None  # the compaction version it published (None: none, the head needed none)
    of: str | None = None  # the version that compaction compacts
    seconds: float = 0.0
    error: Exception | None = None


class Coordinator:
    """Merges everything that arrives on ``stream`` into ``store``'s head, one batch per version.

    ``policy`` chooses ``k`` (None: the head's own policy; ``KPolicy()`` at a cold start).
    ``tracking`` and ``evaluation`` are optional. ``consumer`` must stay the same across restarts:
    it is how a new incarnation finds what the old one held. ``keep_versions`` prunes older versions
    after each publish (tagged and pinned ones are always kept). ``max_chain``: once reading a task of the
    head applies that many versions' rotations, the head is compacted in a background thread (one at a
    time, collected at the next ``step``; ``wait_for_compaction`` waits for it). Delta publishes write a
    task in full past ``hard_chain = min(2 * max_chain, MAX_CHAIN)`` rotations, so reads stay bounded by
    that while a compaction is running or has lost a race with a merge.
    """

    def __init__(
        self,
        store: SubspaceStore,
        stream: SubmissionStream,
        policy: KPolicy | None = None,
        tracking: MergeTracker | None = None,
        evaluation: Evaluation | None = None,
        *,
        consumer: str = "coordinator",
        recover_idle_ms: int = 60_000,
        recover_every_s: float = 30.0,
        keep_versions: int | None = None,
        max_conflicts: int = 16,
        crash: CrashPoints | None = None,
        max_chain: int = DEFAULT_MAX_CHAIN,
    ) -> None:
        if store.namespace != stream.namespace:
            raise ShareClError(
                f"store namespace {store.namespace!r} differs from stream namespace {stream.namespace!r}; "
                "give both the same namespace"
            )
        if keep_versions is not None and keep_versions < 1:
            raise ShareClError(f"keep_versions must be >= 1 or None (got {keep_versions})")
        if not 1 <= max_chain <= MAX_CHAIN:
            raise ShareClError(f"max_chain must be between 1 and {MAX_CHAIN} (got {max_chain})")
        self.max_chain = max_chain
        self.hard_chain = min(2 * max_chain, MAX_CHAIN)  # delta publishes write a task in full past this chain
        self.store = store
        self.stream = stream
        self.policy = policy
        self.tracking = tracking
        self.evaluation = evaluation
        self.consumer = consumer
        self.recover_idle_ms = recover_idle_ms
        self.recover_every_s = recover_every_s
        self.keep_versions = keep_versions
        self.max_conflicts = max_conflicts
        self.crash = crash or CrashPoints()
        self.bases = BaseCache(store)
        self.matrix = AccuracyMatrix()
        self._head: Subspace | None = None
        self._head_version: str | None = None
        self._started = False
        self._need_recover = True  # a fresh incarnation first takes back what a dead one held
        self._last_recover = 0.0
        self._lock = threading.Lock()
        # MLflow runs not ended yet -> what is known of their merge: None (whether it was published is unknown), its
        # version (published, its record not read yet) or its record (finishing the run needs nothing from the store)
        self._open_runs: dict[str, str | MergeRecord | None] = {}
        self._compaction: _Compaction | None = None  # the background compaction, until collected
        self.counters = {
            "steps": 0,
            "merges": 0,
            "merged": 0,
            "rejected": 0,
            "recovered": 0,
            "head_conflicts": 0,
            "removals": 0,
            "compactions": 0,
            "rebased_on_compaction": 0,
        }
        self.last_version: str | None = None
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Pick up after a previous incarnation: its accuracy matrix and its unfinished MLflow runs."""
        if self._started:
            return
        if self.tracking is not None:
            try:
                self.matrix = self.tracking.load_matrix()
                self._reconcile()
            except Exception as err:  # tracking never blocks merging
                log.warning("could not reconcile MLflow merge runs (%s); merging goes on", err)
        self._started = True

    def _reconcile(self) -> None:
        assert self.tracking is not None
        open_runs = self.tracking.open_runs()
        if open_runs:
            self._open_runs.update({run_id: None for run_id in open_runs})
            self._settle_runs(evaluate=True)

    def _settle_runs(self, evaluate: bool = False) -> None:
        """End the open runs: finished where a version names them (published), else FAILED (its
        submissions were still pending and a later merge took them). Those MLflow does not take stay open.

        A published run's record is kept with it (``_after_publish``), so it is finished even once retention has
        pruned its version; one whose version was pruned before its record was read ends FAILED, saying so, and
        never keeps the runs after it open."""
        if not self._open_runs or self.tracking is None:
            return
        by_run: dict[Any, str] = {}
        if any(known is None for known in self._open_runs.values()):
            by_run = {info.metadata.get(RUN_ID_KEY): info.version for info in self.store.list_versions()}
        for run_id, known in list(self._open_runs.items()):
            found = known if known is not None else by_run.get(run_id)
            if found is None:
                reason = "the coordinator stopped before publishing; a later merge took its tasks"
                ended = self.tracking.abandon(run_id, reason)
            else:
                ended = self._finish_run(run_id, found, evaluate)
            if ended:
                del self._open_runs[run_id]

    def _finish_run(self, run_id: str, found: str | MergeRecord, evaluate: bool) -> bool:
        """Finish the run of a published merge (its record, or its version to read the record from); True when
        MLflow took it. Evaluates the version first when ``evaluate`` (and it is still retained)."""
        assert self.tracking is not None
        if isinstance(found, MergeRecord):
            record, version = found, found.version
        else:
            version = found
            try:
                record = MergeRecord.from_manifest(self.store.manifest(version))
            except VersionNotFoundError:
                log.warning(
                    "MLflow run %s ends FAILED: its version %s was pruned before MLflow took it", run_id, version
                )
                return self.tracking.fail(
                    run_id, f"published as {version}, which was pruned before MLflow took its run: its numbers are lost"
                )
        accuracy: dict[str, float] = {}
        errors: dict[str, str] = {}
        if evaluate and self.evaluation is not None:
            try:
                accuracy, errors = self._evaluate(self.store.get(version))
            except VersionNotFoundError:
                log.info("%s was pruned before it could be evaluated; its run is finished without accuracy", version)
        if accuracy:
            self.matrix.add(version, record.new_tasks, accuracy)
        ended = self.tracking.finish(run_id, record, self.matrix, accuracy, errors)
        if ended:
            log.info("completed the MLflow run of %s left open (crash or tracking outage)", version)
        return ended

    @property
    def open_runs(self) -> list[str]:
        """MLflow merge runs this process opened and has not ended (outcome unknown or MLflow unreachable)."""
        return list(self._open_runs)

    def close(self, wait_s: float | None = CLOSE_WAIT_S) -> list[str]:
        """End every run still open (as ``_settle_runs``; FAILED with the error when the store cannot be read),
        then wait up to ``wait_s`` (None: for good) for a running background compaction and collect it. Returns
        the runs that stay open because MLflow refused even that; a compaction still running is left to finish on
        its own (``status`` says ``compacting``)."""
        with self._lock:
            try:
                self._settle_runs()
            except Exception as err:  # Redis unreachable: nothing can say whether they were published
                log.warning("could not check which merges were published (%s); ending their runs as FAILED", err)
            for run_id, known in list(self._open_runs.items()):
                if self.tracking is None:
                    ended = True
                elif known is None:
                    reason = "the coordinator stopped while the outcome of its publish was unknown (store unreachable)"
                    ended = self.tracking.abandon(run_id, reason)
                else:
                    version = known.version if isinstance(known, MergeRecord) else known
                    reason = f"published as {version}; the coordinator stopped before MLflow took its numbers"
                    ended = self.tracking.fail(run_id, reason)
                if ended:
                    del self._open_runs[run_id]
            if not self.wait_for_compaction(wait_s):
                log.warning(
                    "a background compaction is still running after %.0fs; closing without it (if it lands, it is "
                    "a full copy of the head it read)",
                    wait_s,
                )
            try:
                self._collect_compaction()
            except Exception as err:  # Redis unreachable: the outcome only mattered to the next step
                log.warning("could not collect the background compaction (%s)", err)
            return self.open_runs

    def run_forever(
        self,
        stop: threading.Event,
        max_batch: int = 64,
        block_ms: int = 1000,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        """``step`` until ``stop`` is set. Errors (Redis down, a bug) are logged and retried with backoff."""
        delay = 0.5
        while not stop.is_set():
            try:
                result = self.step(max_batch=max_batch, block_ms=block_ms)
                delay = 0.5
                if on_step is not None:
                    on_step(result)
            except Exception as err:
                self.last_error = f"{type(err).__name__}: {err}"
                log.exception("coordinator step failed; retrying in %.1fs", delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def status(self) -> dict[str, Any]:
        return {
            "namespace": self.store.namespace,
            "consumer": self.consumer,
            "head": self._head_version,
            "last_version": self.last_version,
            "last_error": self.last_error,
            "compacting": not self.wait_for_compaction(0),
            **self.counters,
        }

    # -- one step ------------------------------------------------------------------------------
    def step(self, max_batch: int = 64, block_ms: int | None = 1000) -> StepResult:
        """Take up to ``max_batch`` submissions (waiting up to ``block_ms`` for one) and merge them
        into one new version. Returns what happened; an idle step returns an empty result."""
        if max_batch < 1:
            raise ShareClError(f"max_batch must be >= 1 (got {max_batch})")
        with self._lock:
            self.start()
            if self._open_runs:
                try:
                    self._settle_runs()
                except Exception as err:  # the store is still unreachable: try again next step
                    log.warning("open MLflow merge runs not settled yet (%s)", err)
            result = StepResult()
            self._collect_compaction(result)
            batch = self._take(max_batch, block_ms, result)
            self.counters["steps"] += 1
            if not batch:
                return result
            self.crash.fire(AFTER_READ)
            try:
                self._handle(batch, result)
            except BaseException:
                self._need_recover = True  # what we hold is still pending: take it back next step
                raise
            self.counters["merged"] += len(result.merged)
            self.counters["rejected"] += len(result.rejected)
            self.counters["head_conflicts"] += result.head_conflicts
            self.last_error = None
            return result

    def _handle(self, batch: list[StreamItem], result: StepResult) -> None:
        """Merge the submissions before the first removal request, or, when the batch starts with one,
        publish that removal. What comes after stays pending and is taken back, in order, next step."""
        cut = next((i for i, item in enumerate(batch) if isinstance(item, RemovalRequest)), len(batch))
        first = batch[0]
        later = batch[1:] if isinstance(first, RemovalRequest) else batch[cut:]
        if later:
            self._need_recover = True  # our own pending entries come back first, in stream order
        try:
            if isinstance(first, RemovalRequest):
                self._remove(first, result)
            else:
                self._merge_batch([item for item in batch[:cut] if isinstance(item, Submission)], result)
        finally:
            result.deferred += [item.id for item in later if item.id is not None]

    def _take(self, max_batch: int, block_ms: int | None, result: StepResult) -> list[StreamItem]:
        now = time.monotonic()
        if self._need_recover or now - self._last_recover >= self.recover_every_s:
            held = self.stream.recover(self.consumer, min_idle_ms=self.recover_idle_ms, count=max_batch)
            self._last_recover = now
            self._need_recover = len(held) >= max_batch  # more may be waiting behind this batch
            if held:
                log.info("recovered %d pending submission(s)", len(held))
                result.read = result.recovered = len(held)
                self.counters["recovered"] += len(held)
                return held
        batch = self.stream.read(self.consumer, count=max_batch, block_ms=block_ms)
        result.read = len(batch)
        return batch

    def _load_head(self) -> tuple[str | None, Subspace | None]:
        """The head, from memory when it is still the version this process published last, or a compaction of it
        (one that landed after this step collected the outcomes); read from the store otherwise."""
        version = self.store.head()
        if version is not None and self._head_version is not None and version != self._head_version:
            if self._compaction_of(version) == self._head_version:
                self._hold_compaction(version)
        if version != self._head_version:
            self._head = self.store.get(version) if version is not None else None
            self._head_version = version
        return self._head_version, self._head

    def _hold(self, version: str, subspace: Subspace) -> None:
        """``subspace`` is ``version``'s (published by this process, or a compaction of the head it holds): it is
        the head held in memory, and its bases serve the submissions trained on ``version``."""
        self._head, self._head_version = subspace, version
        self.bases.put(version, Subspace(modules=subspace.modules, policy=subspace.policy, metadata=subspace.metadata))

    def _hold_compaction(self, version: str) -> None:
        """``version`` compacts the head held in memory (the same subspace, coefficients equal up to float
        rounding): it becomes the head version and the in-memory head stays (validation and the next merge)."""
        assert self._head is not None
        self._hold(version, self._head)

    def _merge_batch(self, batch: list[Submission], result: StepResult) -> None:
        todo = batch
        for _ in range(self.max_conflicts):
            parent, head = self._load_head()
            verdicts = check_batch(todo, head, parent, self.bases)
            for sid, reason in verdicts.rejected.items():
                self.stream.reject(sid, reason)
                log.info("rejected submission %s: %s", sid, reason)
            result.rejected.update(verdicts.rejected)
            for sid in verdicts.already_merged:
                self._acknowledge_merged(sid)
            result.acknowledged += verdicts.already_merged
            if not verdicts.accepted:
                return
            isolation = merge_isolating(head, verdicts.accepted, self.policy)
            for sid, reason in isolation.rejected.items():
                self.stream.reject(sid, reason)
            result.rejected.update(isolation.rejected)
            if isolation.deferred:
                self._need_recover = True  # still pending: the next step takes them back first
                result.deferred = [a.submission.id for a in isolation.deferred if a.submission.id is not None]
            if isolation.merged is None or isolation.report is None:
                return
            merged, report = isolation.merged, isolation.report
            accepted = [a.submission for a in isolation.kept]
            adapters = {a.submission.task: a.adapter for a in isolation.kept}
            if report.over_bound:
                log.warning(
                    "merging %s leaves tasks over max_error (allowed by their jobs): %s",
                    list(adapters),
                    report.over_bound,
                )
            if head is None:
                models = [s.metadata[BASE_MODEL_KEY] for s in accepted if s.metadata.get(BASE_MODEL_KEY)]
                if models:
                    merged.metadata[BASE_MODEL_KEY] = models[0]
            self.crash.fire(AFTER_MERGE)

            run_id = self.tracking.start(parent, list(adapters)) if self.tracking is not None else None
            metadata = {
                RUN_ID_KEY: run_id,
                COORDINATOR_KEY: {
                    "consumer": self.consumer,
                    "new_tasks": list(adapters),
                    "submissions": {s.task: s.id for s in accepted},
                    "explained_variance": {m: list(v) for m, v in report.explained_variance.items()},
                    "merge_seconds": report.seconds,
                    "batch_size": len(accepted),
                    "head_conflicts": result.head_conflicts,
                    "rejected": len(result.rejected),
                    "merge_attempts": isolation.merges,
                    "over_bound": dict(report.over_bound),
                    "max_error": report.max_error,
                },
            }
            started = time.perf_counter()
            try:
                version, parent = self._publish_merge(merged, parent, accepted, metadata, report.rotations, result)
            except HeadConflictError as err:
                # Someone else published first: re-validate against the new head and merge again.
                log.info("head moved (%s); merging again on the new head", err.actual)
                reason = f"head conflict: {parent} -> {err.actual}"
                if self.tracking is not None and run_id is not None and not self.tracking.abandon(run_id, reason):
                    self._open_runs[run_id] = None  # ended by a later step
                result.head_conflicts += 1
                todo = accepted
                continue
            except SubmissionError as err:
                # Another consumer settled some of them meanwhile: keep the ones still pending.
                if self.tracking is not None and run_id is not None and not self.tracking.abandon(run_id, str(err)):
                    self._open_runs[run_id] = None  # ended by a later step
                pending = SubmissionStatus.PENDING
                todo = [s for s in accepted if s.id is not None and self.stream.status(s.id).state is pending]
                log.info("%s; retrying with the %d still pending", err, len(todo))
                continue
            except BaseException:
                # Published or not is unknown (e.g. Redis went away mid-transaction): settled later.
                if run_id is not None:
                    self._open_runs[run_id] = None
                raise
            result.publish_seconds = time.perf_counter() - started
            self._hold(version, merged)
            self.crash.fire(AFTER_PUBLISH)
            result.version, result.parent, result.merge_seconds = version, parent, report.seconds
            result.merged = {s.id: s.task for s in accepted if s.id is not None}
            result.over_bound = dict(report.over_bound)
            self.counters["merges"] += 1
            self.last_version = version
            log.info("published %s: +%s (%d rejected)", version, list(adapters), len(result.rejected))
            self._after_publish(version, merged, run_id, result)
            return
        raise StoreError(
            f"gave up merging {len(todo)} submission(s) after {self.max_conflicts} head conflicts; another "
            "publisher keeps moving the head of this namespace: run one coordinator per namespace"
        )

    def _publish_merge(
        self,
        merged: Subspace,
        parent: str | None,
        accepted: list[Submission],
        metadata: dict[str, Any],
        rotations: dict[str, Any],
        result: StepResult,
    ) -> tuple[str, str | None]:
        """Publish ``merged`` on ``parent`` with the acks of ``accepted``, as a delta (chains up to ``hard_chain``).

        When the head moved to a compaction of ``parent`` meanwhile (the same subspace, its coefficients
        re-encoded, the same bases), ``merged`` is published again on that compaction: the merge's rotations
        hold from its bases as from the parent's, so nothing is merged again (same MLflow run, same metadata).
        Returns (the version, the parent it was published on); ``HeadConflictError`` for any other move.
        """

        def publish(on: str | None) -> str:
            return self.stream.publish_with_ack(
                self.store,
                merged,
                on,
                accepted,
                metadata,
                delta=True,
                rotations=rotations or None,  # None: derived from the bases (a cold start has none)
                max_chain=self.hard_chain,
            )

        try:
            return publish(parent), parent
        except HeadConflictError as err:
            if parent is None or err.actual is None or self._compaction_of(err.actual) != parent:
                raise
            compaction = err.actual
        log.info("head moved to %s, a compaction of %s: publishing the same merge on it", compaction, parent)
        version = publish(compaction)
        result.rebased_on_compaction = compaction
        self.counters["rebased_on_compaction"] += 1
        return version, compaction

    def _compaction_of(self, version: str) -> str | None:
        """The version ``version`` compacts (its metadata ``compaction.of``); None for any other version, or when
        its manifest cannot be read (pruned meanwhile).

        Reads the whole manifest (``SubspaceStore.manifest``): the store has no call for one version's metadata
        alone, and ``list_versions`` reads every retained version's manifest. For a version this process wrote
        (its own compactions) that is a copy of the cached manifest; for another's in format 4 its entries are
        fetched too, which the read of that head that follows (``_load_head``) then finds in the cache."""
        try:
            info = self.store.manifest(version)["metadata"].get(COMPACTION_KEY)
        except StoreError as err:
            log.info("could not read the manifest of %s (%s)", version, err)
            return None
        return info.get("of") if isinstance(info, dict) else None

    def _remove(self, request: RemovalRequest, result: StepResult) -> None:
        """Publish the head without ``request.tasks`` (bases refitted to the rest), acknowledging the
        request in the same transaction; or reject it with the reason (a task the head does not hold,
        every task, no head yet). A request some version already carries out is only acknowledged."""
        assert request.id is not None
        for _ in range(self.max_conflicts):
            parent, head = self._load_head()
            # Carried out meanwhile (another consumer): its version recorded it as merged, in the publish's transaction.
            if self.stream.status(request.id).state is SubmissionStatus.MERGED:
                self._acknowledge_merged(request.id)
                result.acknowledged.append(request.id)
                return
            try:
                if head is None or parent is None:
                    raise ShareClError(f"namespace {self.store.namespace!r} holds no version yet")
                reduced, report = remove_tasks(head, request.tasks, self.policy)
            except ShareClError as err:
                reason = f"cannot remove {', '.join(request.tasks)} from {parent or 'an empty namespace'}: {err}"
                self.stream.reject(request.id, reason)
                result.rejected[request.id] = reason
                log.info("rejected removal request %s: %s", request.id, reason)
                return
            if report.over_bound:
                log.warning("removing %s leaves tasks over max_error: %s", request.tasks, report.over_bound)
            self.crash.fire(AFTER_MERGE)

            run_id = self.tracking.start(parent, []) if self.tracking is not None else None
            metadata = {
                RUN_ID_KEY: run_id,
                REMOVAL_KEY: {
                    "request": request.id,
                    "tasks": list(request.tasks),
                    "reason": request.reason,
                    "parent": parent,
                    "metadata": request.metadata,
                    "k_before": {m: list(k) for m, k in report.k_before.items()},
                    "reconstruction_error": dict(report.reconstruction_error),
                    "error_bound": dict(report.error_bound),
                },
                COORDINATOR_KEY: {
                    "consumer": self.consumer,
                    "new_tasks": [],
                    "submissions": {},
                    "removed_tasks": list(request.tasks),
                    "explained_variance": {m: list(v) for m, v in report.explained_variance.items()},
                    "merge_seconds": report.seconds,
                    "batch_size": 0,
                    "head_conflicts": result.head_conflicts,
                    "rejected": len(result.rejected),
                    "merge_attempts": 1,
                    "over_bound": dict(report.over_bound),
                    "max_error": report.max_error,
                },
            }
            started = time.perf_counter()
            try:
                version = self.stream.publish_with_ack(self.store, reduced, parent, [request], metadata)
            except HeadConflictError as err:
                log.info("head moved (%s); removing again from the new head", err.actual)
                reason = f"head conflict: {parent} -> {err.actual}"
                if self.tracking is not None and run_id is not None and not self.tracking.abandon(run_id, reason):
                    self._open_runs[run_id] = None
                result.head_conflicts += 1
                continue
            except SubmissionError as err:
                # Another consumer settled the request meanwhile: nothing is left to do.
                if self.tracking is not None and run_id is not None and not self.tracking.abandon(run_id, str(err)):
                    self._open_runs[run_id] = None
                log.info("removal request %s settled elsewhere: %s", request.id, err)
                return
            except BaseException:
                if run_id is not None:
                    self._open_runs[run_id] = None
                raise
            result.publish_seconds = time.perf_counter() - started
            self._hold(version, reduced)
            self.crash.fire(AFTER_PUBLISH)
            result.version, result.parent, result.merge_seconds = version, parent, report.seconds
            result.removed = {request.id: list(request.tasks)}
            result.over_bound = dict(report.over_bound)
            self.counters["removals"] += 1
            self.last_version = version
            log.info("published %s: -%s (parent %s)", version, request.tasks, parent)
            self._after_publish(version, reduced, run_id, result)
            return
        raise StoreError(
            f"gave up removing {request.tasks} after {self.max_conflicts} head conflicts; another publisher keeps "
            "moving the head of this namespace: run one coordinator per namespace"
        )

    def _after_publish(self, version: str, merged: Subspace, run_id: str | None, result: StepResult) -> None:
        if run_id is not None:
            self._open_runs[run_id] = version  # published: from here on it only needs finishing
        errors: dict[str, str] = {}
        record: MergeRecord | None = None
        try:
            record = MergeRecord.from_manifest(self.store.manifest(version))
            if run_id is not None:
                self._open_runs[run_id] = record  # finishing it never reads the store again (the version may be pruned)
            result.latency_s = record.latency_s
            if self.evaluation is not None:
                result.accuracy, errors = self._evaluate(merged)
            if result.accuracy:
                self.matrix.add(version, record.new_tasks, result.accuracy)
        finally:
            # Whatever evaluation did; without a record (store unreachable) the next step finishes it.
            if self.tracking is not None and run_id is not None and record is not None:
                extra = {"publish_seconds": result.publish_seconds}
                if self.tracking.finish(run_id, record, self.matrix, result.accuracy, errors, extra):
                    del self._open_runs[run_id]
        self._start_compaction(version)
        if self.keep_versions is not None:
            try:
                self.store.prune(self.keep_versions)
            except StoreError as err:
                log.warning("pruning to %d versions failed (%s)", self.keep_versions, err)

    def _start_compaction(self, version: str) -> None:
        """After ``version``'s publish: once a task of it reads through ``max_chain`` rotations, compact the head in
        a background thread (none while another one is not collected yet: the next publish tries again)."""
        if self._compaction is not None:
            return
        try:
            if max(self.store.chain_lengths(version).values(), default=0) < self.max_chain:
                return
        except (StoreError, ShareClError) as err:
            log.warning("reading the chains of %s failed (%s); the next publish tries again", version, err)
            return
        job = _Compaction(after=version)
        job.thread = threading.Thread(target=self._compact, args=(job,), name="compaction", daemon=True)
        job.thread.start()
        self._compaction = job  # started: ``status`` (another thread) may ask whether it runs

    def _compact(self, job: _Compaction) -> None:
        """The compaction thread: publish the head in full (``SubspaceStore.compact``) and note what it compacts.

        It shares ``self.store``, which is safe: the store keeps no mutable state of its own (its client's
        connection pool, the manifest and rotation caches and a cached manifest's entries are locked). It writes
        only its ``_Compaction``; the head, the counters and MLflow are the coordinator thread's."""
        started = time.perf_counter()
        try:
            job.version = self.store.compact(min_chain=self.max_chain, metadata={"compacted_by": self.consumer})
            if job.version is not None:
                job.of = self._compaction_of(job.version)
        except Exception as err:  # the coordinator thread logs it when it collects the outcome
            job.error = err
        job.seconds = time.perf_counter() - started

    def wait_for_compaction(self, timeout_s: float | None = None) -> bool:
        """Wait up to ``timeout_s`` (None: for good) for the running background compaction to end; True when
        none is running (ended ones are collected by the next ``step`` or ``close``)."""
        job = self._compaction
        if job is None:
            return True
        job.thread.join(timeout_s)
        return not job.thread.is_alive()

    def _collect_compaction(self, result: StepResult | None = None) -> None:
        """On the coordinator thread, with the lock held: take the outcome of a background compaction that ended.

        One that landed is counted and reported (``result.compacted``); if it is still the head and compacts the
        version held in memory, it becomes the head version, the in-memory head kept (the same subspace,
        coefficients equal up to float rounding). A failure is logged; the next publish tries again."""
        job = self._compaction
        if job is None or job.thread.is_alive():
            return
        self._compaction = None
        if isinstance(job.error, HeadConflictError):
            log.info(
                "compaction after %s lost to a publish (head %s); the next publish tries again",
                job.after,
                job.error.actual,
            )
        elif isinstance(job.error, VersionNotFoundError):  # the head it read was pruned: a newer head is kept
            log.info(
                "compaction after %s lost to a publish (the version it read was pruned: %s); the next publish tries "
                "again",
                job.after,
                job.error,
            )
        elif job.error is not None:
            # Ours, or Redis unreachable meanwhile: the message says it all. Anything else is a bug: its traceback too.
            expected = isinstance(job.error, ShareClError | RedisError | OSError)
            unexpected = None if expected else job.error
            log.warning(
                "compaction after %s failed (%s); the next publish tries again",
                job.after,
                job.error,
                exc_info=unexpected,
            )
        if job.version is None:
            return
        self.counters["compactions"] += 1
        if result is not None:
            result.compacted, result.compaction_seconds = job.version, job.seconds
        log.info("compacted %s into %s in %.2fs (in the background)", job.of, job.version, job.seconds)
        if job.of is not None and job.of == self._head_version and self.store.head() == job.version:
            self._hold_compaction(job.version)
            self.last_version = job.version

    def _evaluate(self, subspace: Subspace) -> tuple[dict[str, float], dict[str, str]]:
        assert self.evaluation is not None
        return self.evaluation(subspace)

    def _acknowledge_merged(self, submission_id: str) -> None:
        """A submission (or removal request) already carried out, yet still handed to this consumer: acknowledge it
        without merging. Publishing acknowledges in its own transaction, and the stream acknowledges what it hands
        out again though settled, so this happens when another consumer carried it out between this step's read
        and its check; the check keeps exactly once even then.
        """
        self.stream.ack(submission_id)
        log.warning("submission %s is already merged; acknowledged it without merging again", submission_id)
