"""The coordinator compacts in the background (issue 14, item 2): the step that reaches ``max_chain`` returns while
the compaction runs, the next step reports it and merges on it, a merge that meets a compaction of its own parent
is published on it without merging again, a compaction that loses the race to a merge changes nothing and is
retried, chains stay within ``min(2 * max_chain, MAX_CHAIN)``, and ``close`` waits for a running compaction.

The compaction thread is held at exact points by gates (``threading.Event``) around the real store methods:
nothing is faked, and nothing waits on time (each wait's timeout only keeps a broken run from hanging).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from mlflow import MlflowClient

from coordinator import Coordinator, MergeTracker
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
    return store, stream, Coordinator(store, stream, KPolicy(k=6), max_chain=2, **kwargs)


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
    gate = threading.Event()
    _gate_compaction(store, gate)
    for i in range(3):
        _merge(coordinator, make_adapter, i)  # v3 starts a compaction of itself, held at the gate
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


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the tables once, up front
    return uri


def test_a_merge_that_meets_a_compaction_of_its_parent_is_published_on_it(
    redis_client, namespace, make_adapter, mlflow_uri
) -> None:
    store, _, coordinator = _open(redis_client, namespace, tracking=MergeTracker(mlflow_uri, namespace, namespace))
    gate = threading.Event()
    _gate_compaction(store, gate)
    for i in range(3):
        _merge(coordinator, make_adapter, i)  # v3 starts a compaction of itself, held at the gate
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
    steps = [_merge(coordinator, make_adapter, i) for i in range(6)]
    # v3 started a compaction of v3; it is held while v4..v6 are published on top (no second one meanwhile).
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
    gate = threading.Event()
    _gate_compaction(store, gate)
    for i in range(3):
        _merge(coordinator, make_adapter, i)
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
