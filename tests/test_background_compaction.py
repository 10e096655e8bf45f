"""The coordinator compacts in the background (issue 14, item 2): the step that reaches ``max_chain`` returns while
the compaction runs, the next step reports it and merges on it, a merge that meets a compaction of its own parent
is published on it without merging again (a compaction of any other version is merged on again), a compaction that
loses the race to a merge changes nothing and is retried, one that the head moved past is not held as the head,
chains stay within ``min(2 * max_chain, MAX_CHAIN)``, and ``close`` (so the actor's ``stop``) settles the MLflow runs
first and waits for a running compaction only within its budget.

The compaction thread is held at exact points by gates (``threading.Event``) around the real store methods:
nothing is faked, and nothing waits on time (each wait's timeout only keeps a broken run from hanging).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from mlflow import MlflowClient

from coordinator import Coordinator, MergeTracker
from coordinator.actor import CoordinatorActor
from coordinator.config import CoordinatorConfig
from coordinator.crash import AFTER_MERGE
from share import KPolicy, LoraAdapter
from subspace_store import Submission, SubmissionStream, SubspaceStore
from subspace_store.chains import relative_difference
from subspace_store.store import COMPACTION_KEY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-6
WAIT_S = 120.0  # only against a hang: every wait below ends on an event


def _open(redis_client: Any, namespace: str, **kwargs: Any) -> tuple[SubspaceStore, SubmissionStream, Coordinator]:
    store = SubspaceStore(redis_client, namespace)
    stream = SubmissionStream(redis_client, namespace)
    return store, stream, Coordinator(store, stream, KPolicy(k=6), **{"max_chain": 2, **kwargs})


def _merge(coordinator: Coordinator, make_adapter: Callable[..., LoraAdapter], i: int) -> Any:
    """Submit task ``t<i>`` on the current head and run one step."""
    coordinator.stream.submit(Submission(f"t{i}", make_adapter(i, r=2), coordinator.store.head()))
    return coordinator.step(block_ms=None)


def _gate_compaction(store: SubspaceStore, gate: threading.Event) -> None:
    """``store.compact`` waits for ``gate`` before doing anything (the real method then runs)."""
    compact = store.compact

    def gated(**kwargs: Any) -> str | None:
        assert gate.wait(WAIT_S), "the test never opened the compaction's gate"
        return compact(**kwargs)

    store.compact = gated  # type: ignore[method-assign]


def _three_merges_compaction_held(store: SubspaceStore, coordinator: Coordinator, make_adapter: Any) -> threading.Event:
    """Merge t0..t2 (v1..v3; max_chain=2, so v3 starts a compaction of itself) with the compaction held at a gate;
    returns the gate."""
    gate = threading.Event()
    _gate_compaction(store, gate)
    for i in range(3):
        _merge(coordinator, make_adapter, i)
    return gate


def _note_compaction_reads_head(store: SubspaceStore, gate: threading.Event | None = None) -> threading.Event:
    """An event set once the compaction thread (``Coordinator`` names it ``compaction``) has read the head; with
    ``gate``, the compaction then waits for it before reading that version."""
    head, read = store.head, threading.Event()

    def noting() -> str | None:
        version = head()
        if threading.current_thread().name == "compaction":
            read.set()
            assert gate is None or gate.wait(WAIT_S), "the test never opened the compaction's gate"
        return version

    store.head = noting  # type: ignore[method-assign]
    return read


def _assert_head_is_held(coordinator: Coordinator) -> None:
    """Every task of the store's head reads back within TOL of the coordinator's in-memory head."""
    held, got = coordinator._head, coordinator.store.get()
    assert held is not None and coordinator._head_version == coordinator.store.head()
    assert list(got.tasks) == list(held.tasks)
    for t, task in held.tasks.items():
        assert relative_difference(got.tasks[t], task) <= TOL, t


def test_the_step_returns_while_the_compaction_runs(redis_client, namespace, make_adapter) -> None:
    store, _, coordinator = _open(redis_client, namespace)
    gate = threading.Event()
    _gate_compaction(store, gate)
    steps = [_merge(coordinator, make_adapter, i) for i in range(3)]
    # v3's t0 reads through 2 rotations: a compaction started, held at its gate; the step did not wait for it.
    assert [s.version for s in steps] == ["v1", "v2", "v3"] and store.head() == "v3"
    assert store.chain_lengths("v3")["t0"] == 2 and [s.compacted for s in steps] == [None, None, None]
    assert coordinator.wait_for_compaction(0) is False
    held = coordinator._head
    gate.set()
    assert coordinator.wait_for_compaction(WAIT_S)
    assert store.head() == "v4" and store.manifest("v4")["metadata"][COMPACTION_KEY] == {"of": "v3", "longest_chain": 2}
    idle = coordinator.step(block_ms=None)  # collects it: v4 is the head held in memory, not read again
    assert idle.version is None and idle.compacted == "v4" and idle.compaction_seconds > 0
    assert coordinator._head_version == "v4" == coordinator.last_version and coordinator._head is held
    assert coordinator.counters["compactions"] == 1
    after = _merge(coordinator, make_adapter, 3)
    assert after.compacted is None and coordinator.counters["compactions"] == 1
    assert after.version == "v5" and after.parent == "v4" and store.manifest("v5")["parent"] == "v4"
    assert store.manifest("v5")["rotations"]  # a delta on the compaction
    assert store.chain_lengths("v5") == {"t0": 1, "t1": 1, "t2": 1, "t3": 0}
    _assert_head_is_held(coordinator)
    coordinator.close()


def test_a_compaction_that_lands_while_the_step_waits_is_taken_without_reading_the_head(
    redis_client, namespace, make_adapter
) -> None:
    store, stream, coordinator = _open(redis_client, namespace)
    gate = _three_merges_compaction_held(store, coordinator, make_adapter)
    stream.submit(Submission("t3", make_adapter(3, r=2), "v3"))
    read, get = stream.read, store.get
    full_reads = []

    def counting(ref: str = "head", tasks: Any = None, **kwargs: Any) -> Any:
        if tasks is None:
            full_reads.append(ref)
        return get(ref, tasks, **kwargs)

    def reading(*args: Any, **kwargs: Any) -> Any:
        """The step has collected (nothing yet) and reads submissions: the compaction lands now. From here on,
        reads of whole versions are counted."""
        gate.set()
        assert coordinator.wait_for_compaction(WAIT_S)
        store.get = counting  # type: ignore[method-assign]
        return read(*args, **kwargs)

    stream.read = reading  # type: ignore[method-assign]
    step = coordinator.step(block_ms=None)
    assert step.compacted is None and step.version == "v5" and step.parent == "v4" and step.head_conflicts == 0
    assert full_reads == []  # v4 compacts the head held in memory: merged from memory
    store.get = get  # type: ignore[method-assign]
    _assert_head_is_held(coordinator)
    assert coordinator.step(block_ms=None).compacted == "v4" and coordinator._head_version == "v5"
    coordinator.close()


def test_a_merge_that_meets_a_compaction_of_its_parent_is_published_on_it(
    redis_client, namespace, make_adapter, mlflow_uri
) -> None:
    store, _, coordinator = _open(redis_client, namespace, tracking=MergeTracker(mlflow_uri, namespace, namespace))
    gate = _three_merges_compaction_held(store, coordinator, make_adapter)
    merges = []
    fire = coordinator.crash.fire

    def after_merge(point: str) -> None:
        """Merged in memory on v3, not published yet: let the compaction of v3 land now."""
        if point == AFTER_MERGE:
            merges.append(store.head())
            gate.set()
            assert coordinator.wait_for_compaction(WAIT_S)
        fire(point)

    coordinator.crash.fire = after_merge  # type: ignore[method-assign]
    step = _merge(coordinator, make_adapter, 3)
    assert store.manifest("v4")["metadata"][COMPACTION_KEY] == {"of": "v3", "longest_chain": 2}
    # Published on the compaction v4 without merging again: one merge, no head conflict.
    assert merges == ["v3"] and step.head_conflicts == 0 and coordinator.counters["head_conflicts"] == 0
    assert step.version == "v5" and step.parent == "v4" and step.rebased_on_compaction == "v4"
    assert coordinator.counters["rebased_on_compaction"] == 1 and coordinator.counters["merges"] == 4
    assert store.manifest("v5")["parent"] == "v4" and store.manifest("v5")["rotations"]
    assert store.chain_lengths("v5") == {"t0": 1, "t1": 1, "t2": 1, "t3": 0}
    assert step.merged and store.manifest("v5")["submissions"] == list(step.merged)
    _assert_head_is_held(coordinator)
    # The next step reports the compaction that landed; the head stays v5.
    idle = coordinator.step(block_ms=None)
    assert idle.compacted == "v4" and coordinator.counters["compactions"] == 1
    assert coordinator._head_version == "v5" == coordinator.last_version == store.head()
    assert coordinator.close() == []
    # One MLflow run per published merge, each finished; v5's names the compaction as its parent.
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(namespace)
    runs = client.search_runs([experiment.experiment_id], "tags.`sharecl.kind` = 'merge'")
    by_version = {run.data.tags.get("sharecl.version", run.info.run_id): run for run in runs}
    assert set(by_version) == {"v1", "v2", "v3", "v5"}
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert by_version["v5"].data.params["parent"] == "v4"
    assert store.manifest("v5")["metadata"]["mlflow_run_id"] == by_version["v5"].info.run_id


def test_a_compaction_that_loses_to_a_merge_changes_nothing_and_is_retried(
    redis_client, namespace, make_adapter, caplog
) -> None:
    store, _, coordinator = _open(redis_client, namespace)
    assert coordinator.hard_chain == 4
    gate = threading.Event()
    publish = store.publish

    def gated(subspace: Any, parent: Any, metadata: Any = None, **kwargs: Any) -> str:
        """The compaction's publish (it has read and rebuilt the head) waits for ``gate``; merges go through."""
        if COMPACTION_KEY in (metadata or {}):
            assert gate.wait(WAIT_S), "the test never opened the compaction's gate"
        return publish(subspace, parent, metadata, **kwargs)

    store.publish = gated  # type: ignore[method-assign]
    read_head = _note_compaction_reads_head(store)
    steps = [_merge(coordinator, make_adapter, i) for i in range(3)]
    assert read_head.wait(WAIT_S)  # v3 started a compaction, which has read the head: v3
    steps += [_merge(coordinator, make_adapter, i) for i in range(3, 6)]
    # The compaction of v3 is held while v4..v6 are published on top (no second one meanwhile).
    assert [s.version for s in steps] == [f"v{i}" for i in range(1, 7)] and coordinator.wait_for_compaction(0) is False
    gate.set()
    assert coordinator.wait_for_compaction(WAIT_S)  # it found the head moved: nothing published, nothing left
    assert [info.version for info in store.list_versions()] == [f"v{i}" for i in range(1, 7)] and store.head() == "v6"
    assert not any(COMPACTION_KEY in info.metadata for info in store.list_versions())
    assert redis_client.hlen(store.keys.writing) == 0
    with caplog.at_level(logging.INFO, logger="coordinator.service"):
        lost = _merge(coordinator, make_adapter, 6)  # collects the lost compaction (nothing), publishes v7
    assert "compaction after v3 lost to a publish (head v6)" in caplog.text
    assert lost.compacted is None and lost.version == "v7" and lost.parent == "v6"
    assert coordinator.counters["compactions"] == 0 and coordinator._head_version == "v7"
    # Chains grew past max_chain while no compaction landed, up to the hard bound and never past it.
    longest = [max(store.chain_lengths(f"v{i}").values()) for i in range(1, 8)]
    assert longest == [0, 1, 2, 3, 4, 4, 4]
    # v7's publish started the retry; it lands, and the next step reports it and merges on it.
    assert coordinator.wait_for_compaction(WAIT_S)
    assert redis_client.hlen(store.keys.writing) == 0
    assert store.manifest("v8")["metadata"][COMPACTION_KEY] == {"of": "v7", "longest_chain": 4}
    after = _merge(coordinator, make_adapter, 7)
    assert after.compacted == "v8" and after.version == "v9" and after.parent == "v8"
    assert coordinator.counters["compactions"] == 1 and max(store.chain_lengths("v9").values()) == 1
    _assert_head_is_held(coordinator)
    coordinator.close()


def test_close_waits_for_a_running_compaction(redis_client, namespace, make_adapter) -> None:
    store, _, coordinator = _open(redis_client, namespace)
    gate = _three_merges_compaction_held(store, coordinator, make_adapter)
    assert coordinator.wait_for_compaction(0) is False
    wait = coordinator.wait_for_compaction

    def opening(timeout_s: float | None = None) -> bool:
        """``close`` is waiting: only now may the compaction run."""
        gate.set()
        return wait(timeout_s)

    coordinator.wait_for_compaction = opening  # type: ignore[method-assign]
    assert coordinator.close() == []
    assert gate.is_set() and wait(0)
    assert store.head() == "v4" and store.manifest("v4")["metadata"][COMPACTION_KEY]["of"] == "v3"
    assert coordinator.counters["compactions"] == 1 and coordinator.last_version == "v4"


def test_a_merge_that_meets_a_compaction_of_another_version_merges_again(redis_client, namespace, make_adapter) -> None:
    store, _, coordinator = _open(redis_client, namespace, max_chain=4)  # compacts nothing itself here
    for i in range(3):
        _merge(coordinator, make_adapter, i)
    other = SubspaceStore(redis_client, namespace)  # another publisher
    merges = []
    fire = coordinator.crash.fire

    def after_merge(point: str) -> None:
        """Merged on v3, not published yet: another publisher moves the head twice, to v4 (a delta on v3) and then
        to v5, a compaction of v4 (not of v3)."""
        if point == AFTER_MERGE:
            merges.append(store.head())
            if len(merges) == 1:
                assert other.publish(other.get("v3"), "v3", {"by": "another publisher"}, delta=True) == "v4"
                assert other.compact() == "v5"
        fire(point)

    coordinator.crash.fire = after_merge  # type: ignore[method-assign]
    step = _merge(coordinator, make_adapter, 3)
    assert store.manifest("v5")["metadata"][COMPACTION_KEY]["of"] == "v4"
    # v4's tasks are not v3's merged: merged again on v5, a head conflict, no rebase.
    assert merges == ["v3", "v5"] and step.head_conflicts == 1 and step.rebased_on_compaction is None
    assert step.version == "v6" and step.parent == "v5" and coordinator.counters["rebased_on_compaction"] == 0
    _assert_head_is_held(coordinator)
    coordinator.close()


def test_a_compaction_the_head_moved_past_is_not_held_as_the_head(redis_client, namespace, make_adapter) -> None:
    store, _, coordinator = _open(redis_client, namespace)
    gate = _three_merges_compaction_held(store, coordinator, make_adapter)
    gate.set()
    assert coordinator.wait_for_compaction(WAIT_S) and store.head() == "v4"  # landed, not collected yet
    other = SubspaceStore(redis_client, namespace)  # another publisher moves the head on before the collection
    assert other.publish(other.get("v4"), "v4", {"by": "another publisher"}) == "v5"
    idle = coordinator.step(block_ms=None)
    assert idle.compacted == "v4" and coordinator.counters["compactions"] == 1  # reported, but not the head:
    assert coordinator._head_version == "v3" == coordinator.last_version == coordinator.status()["head"]
    after = _merge(coordinator, make_adapter, 3)  # merged on v5, read from the store
    assert after.version == "v6" and after.parent == "v5" and after.head_conflicts == 0
    _assert_head_is_held(coordinator)
    coordinator.close()


def test_close_settles_the_runs_first_and_waits_for_the_compaction_only_wait_s(
    redis_client, namespace, make_adapter, mlflow_uri
) -> None:
    store, stream, coordinator = _open(redis_client, namespace, tracking=MergeTracker(mlflow_uri, namespace, namespace))
    gate = _three_merges_compaction_held(store, coordinator, make_adapter)
    publish_with_ack = stream.publish_with_ack

    def reply_lost(*args: Any, **kwargs: Any) -> str:
        """The publish happens, its reply is lost: the step cannot tell whether it did."""
        publish_with_ack(*args, **kwargs)
        raise redis.ConnectionError("connection lost after the publish (test)")

    stream.publish_with_ack = reply_lost  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        _merge(coordinator, make_adapter, 3)
    assert store.head() == "v4" and len(coordinator.open_runs) == 1
    wait = coordinator.wait_for_compaction
    open_when_waiting = []

    def waiting(timeout_s: float | None = None) -> bool:
        open_when_waiting.append(coordinator.open_runs)
        return wait(timeout_s)

    coordinator.wait_for_compaction = waiting  # type: ignore[method-assign]
    assert coordinator.close(wait_s=0.01) == []
    assert open_when_waiting == [[]]  # the runs were settled before it waited
    assert wait(0) is False and coordinator.status()["compacting"]  # it returned; the compaction is still held
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(namespace).experiment_id], "tags.`sharecl.kind` = 'merge'")
    assert {run.data.tags.get("sharecl.version"): run.info.status for run in runs} == {
        f"v{i}": "FINISHED" for i in range(1, 5)
    }
    gate.set()
    assert wait(WAIT_S)


def test_the_actors_stop_waits_for_a_compaction_only_within_its_timeout(redis_server, namespace, make_adapter) -> None:
    """``CoordinatorActor`` as a plain object (Ray only wraps it): ``stop(timeout_s)`` passes ``close`` what is left
    of ``timeout_s``, not ``close``'s own default."""
    config = CoordinatorConfig(
        namespace=namespace,
        redis_url=redis_server,
        policy=KPolicy(k=6),
        max_batch=1,  # one version per submission
        block_ms=100,
        max_chain=2,
        torch_threads=None,
        idle_timeout_s=0,
    )
    actor = CoordinatorActor(config.to_dict())
    service = actor.service
    started, gate = threading.Event(), threading.Event()
    compact = service.store.compact

    def gated(**kwargs: Any) -> str | None:
        started.set()
        assert gate.wait(WAIT_S), "the test never opened the compaction's gate"
        return compact(**kwargs)

    service.store.compact = gated  # type: ignore[method-assign]
    for i in range(3):
        service.stream.submit(Submission(f"t{i}", make_adapter(i, r=2), None))
    assert started.wait(WAIT_S)  # the loop published v1..v3; v3 started a compaction, held at the gate
    wait = service.wait_for_compaction
    waits = []

    def opening(timeout_s: float | None = None) -> bool:
        """The actor waits for the compaction: only now may it run."""
        waits.append(timeout_s)
        gate.set()
        return wait(timeout_s)

    service.wait_for_compaction = opening  # type: ignore[method-assign]
    timeout_s = 60.0
    status = actor.stop(timeout_s=timeout_s)
    assert waits and waits[0] is not None and 0 <= waits[0] <= timeout_s  # close's wait: what was left
    assert not status["loop_alive"] and status["open_runs"] == [] and not status["compacting"]
    assert status["compactions"] == 1 and service.store.head() == "v4"


def test_a_compaction_whose_head_was_pruned_meanwhile_lost_to_a_publish(
    redis_client, namespace, make_adapter, caplog
) -> None:
    store, _, coordinator = _open(redis_client, namespace, keep_versions=1)
    gate = threading.Event()
    read_head = _note_compaction_reads_head(store, gate)
    for i in range(3):
        _merge(coordinator, make_adapter, i)
    assert read_head.wait(WAIT_S)  # v3 started a compaction, which has read the head (v3) and waits
    _merge(coordinator, make_adapter, 3)  # v4; keeping one version prunes v3
    assert [info.version for info in store.list_versions()] == ["v4"]
    gate.set()
    assert coordinator.wait_for_compaction(WAIT_S)
    with caplog.at_level(logging.INFO, logger="coordinator.service"):
        assert coordinator.step(block_ms=None).compacted is None
    lost = [r for r in caplog.records if "compaction after v3" in r.getMessage()]
    assert [(r.levelno, "lost to a publish" in r.getMessage()) for r in lost] == [(logging.INFO, True)]
    coordinator.close()
