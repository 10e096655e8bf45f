"""MLflow merge runs left open by an MLflow outage are all ended once it is back, also when retention
(``keep_versions=1``) has pruned their versions meanwhile: none blocks the others, each status is true.

Real Redis, real MLflow sqlite stores. The outage: from just after each merge's run is created until the next
merge is about to start its run, the tracker's client points at another, empty MLflow store, which refuses
every write to the run (``Outage``, the coordinator's crash points as the hook).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
import torch
from mlflow import MlflowClient

from coordinator import Coordinator, MergeTracker
from coordinator.crash import AFTER_MERGE, AFTER_PUBLISH, CrashPoints
from share import KPolicy, LoraAdapter
from subspace_store import Submission, SubmissionStream, SubspaceStore, VersionNotFoundError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULE = "layer.0.query"


@pytest.fixture(scope="module")
def mlflow_uris(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The tracking store, and the empty one the tracker talks to during an outage (tables created up front)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uris = f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder / 'elsewhere.db'}"
    for uri in uris:
        MlflowClient(uri).search_experiments()
    return uris


class Outage(CrashPoints):
    """MLflow is away between a merge's publish and the next merge's run: each run is created, none is
    finished. ``over()`` brings it back for good."""

    def __init__(self, tracker: MergeTracker, elsewhere: str) -> None:
        super().__init__()
        self.tracker, self.up, self.down = tracker, tracker.client, MlflowClient(elsewhere)
        self.lasting = True

    def fire(self, point: str) -> None:
        if point == AFTER_MERGE:  # the run is created next
            self.tracker.client = self.up
        elif point == AFTER_PUBLISH and self.lasting:  # its run would be finished next
            self.tracker.client = self.down

    def over(self) -> None:
        self.lasting = False
        self.tracker.client = self.up


def lora(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(factors={MODULE: (torch.randn(24, 2, generator=g), torch.randn(2, 16, generator=g))})


def open_coordinator(client: redis.Redis, namespace: str, uri: str, elsewhere: str) -> tuple[Coordinator, Outage]:
    tracker = MergeTracker(uri, namespace, namespace)
    outage = Outage(tracker, elsewhere)
    store, stream = SubspaceStore(client, namespace), SubmissionStream(client, namespace)
    coordinator = Coordinator(store, stream, KPolicy(k=4), tracker, keep_versions=1, crash=outage)
    return coordinator, outage


def merge(coordinator: Coordinator, i: int) -> str | None:
    coordinator.stream.submit(Submission(f"t{i}", lora(i), coordinator.store.head()))
    return coordinator.step(block_ms=None).version


def runs_by_version(uri: str, namespace: str) -> dict[str, Any]:
    """Merge run of each version (``sharecl.version`` tag; runs never finished have none)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(namespace)
    runs = client.search_runs([experiment.experiment_id], "tags.`sharecl.kind` = 'merge'")
    return {run.data.tags.get("sharecl.version", run.info.run_id): run for run in runs}


def test_runs_of_pruned_versions_are_finished_once_mlflow_is_back(redis_client, namespace, mlflow_uris) -> None:
    uri, elsewhere = mlflow_uris
    coordinator, outage = open_coordinator(redis_client, namespace, uri, elsewhere)
    assert [merge(coordinator, i) for i in range(3)] == ["v1", "v2", "v3"]
    assert [v.version for v in coordinator.store.list_versions()] == ["v3"]  # v1 and v2 are pruned
    assert len(coordinator.open_runs) == 3

    outage.over()
    assert coordinator.step(block_ms=None).version is None  # an idle step settles them
    assert coordinator.open_runs == [] and coordinator.close() == []
    runs = runs_by_version(uri, namespace)
    assert sorted(runs) == ["v1", "v2", "v3"]
    for version, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["sharecl.status"] == "published", version
        assert run.data.params["version"] == version
    head = runs["v3"].data
    assert head.metrics["num_tasks"] == 3 and head.metrics["k_A/" + MODULE] == 4
    assert set(head.metrics) >= {f"reconstruction_error/t{i}" for i in range(3)}
    assert runs["v1"].data.metrics["num_tasks"] == 1  # v1's own numbers, kept from before it was pruned


def test_a_run_whose_version_was_pruned_before_its_record_was_read_ends_failed_saying_so(
    redis_client, namespace, mlflow_uris
) -> None:
    uri, elsewhere = mlflow_uris
    coordinator, outage = open_coordinator(redis_client, namespace, uri, elsewhere)
    manifest = coordinator.store.manifest
    lost = []

    def lost_once(ref: str = "head") -> dict[str, Any]:
        """The first read of v1's manifest (right after its publish) finds Redis gone."""
        if ref == "v1" and not lost:
            lost.append(ref)
            raise redis.ConnectionError("connection lost after the publish (test)")
        return manifest(ref)

    coordinator.store.manifest = lost_once  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        merge(coordinator, 0)  # published v1; its record was never read
    assert lost == ["v1"] and coordinator.store.head() == "v1"
    (first,) = coordinator.open_runs
    assert [merge(coordinator, i) for i in (1, 2)] == ["v2", "v3"]
    with pytest.raises(VersionNotFoundError):
        manifest("v1")
    assert len(coordinator.open_runs) == 3

    outage.over()
    coordinator.step(block_ms=None)
    assert coordinator.open_runs == []
    runs = runs_by_version(uri, namespace)
    pruned = runs.pop(first)  # never finished: no version tag
    assert pruned.info.status == "FAILED"
    assert pruned.data.tags["sharecl.status"] == (
        "published as v1, which was pruned before MLflow took its run: its numbers are lost"
    )
    assert {v: run.info.status for v, run in runs.items()} == {"v2": "FINISHED", "v3": "FINISHED"}
