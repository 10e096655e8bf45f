"""The coordinator as a detached Ray actor (real local Ray, real Redis, real MLflow sqlite store):
killed at every crash point of a merge and by ``ray.kill``, it is restarted by Ray, and every
submission ends up merged exactly once."""

from __future__ import annotations

import pytest
import ray
import torch
from mlflow import MlflowClient

from coordinator.actor import find_coordinator, get_or_start_coordinator, stop_coordinator
from coordinator.crash import POINTS
from share import KPolicy, LoraAdapter
from subspace_store import Submission, SubmissionStatus, SubmissionStream, SubspaceStore, connect

pytestmark = pytest.mark.slow
SHAPES = {"layer.0.query": (24, 16), "layer.0.value": (24, 16)}


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: starting it costs ~10 s here. address="local": a plain ray.init() would join
    the cluster /tmp/ray/ray_current_cluster names (any `ray start` or ray.cluster_utils.Cluster on this machine,
    or a stale address a killed run left), and refuse num_cpus or fail to connect."""
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 << 20, log_to_driver=False)
    yield
    ray.shutdown()


def adapter(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {m: (torch.randn(n, 2, generator=g), torch.randn(2, d, generator=g)) for m, (n, d) in SHAPES.items()}
    )


def assert_merged_exactly_once(store: SubspaceStore, stream: SubmissionStream, ids: dict[str, str]) -> None:
    """Every submission is in exactly one version, its task exactly once in the head, nothing pending."""
    versions = store.list_versions()
    carried = [sid for info in versions for sid in info.submissions]
    assert sorted(carried) == sorted(ids.values())  # no id in two versions, none missing
    assert sorted(store.get().tasks) == sorted(ids)
    assert all(stream.status(sid).state is SubmissionStatus.MERGED for sid in ids.values())
    assert stream.pending() == []


def test_killed_at_every_crash_point_and_by_ray_kill(ray_session, redis_server, namespace, mlflow_uri, tmp_path):
    store = SubspaceStore(connect(redis_server), namespace)
    stream = SubmissionStream(store.client, namespace)
    # Submitted before the coordinator starts, so its first read takes all three (one batch, one
    # version) however slowly the submissions would otherwise trickle in on a loaded machine.
    ids = {f"a{i}": stream.submit(Submission(f"a{i}", adapter(i), None)) for i in range(3)}
    handle = get_or_start_coordinator(
        namespace,
        redis_server,
        mlflow_uri,
        policy=KPolicy(k=16),
        block_ms=200,
        crash_at=list(POINTS),
        crash_marker_dir=str(tmp_path / "markers"),
    )
    # Dies after reading them, again after merging them, again after publishing v1; Ray restarts it
    # each time (and retries this call on the new incarnation).
    status = ray.get(handle.flush.remote(240), timeout=300)
    assert status["crashes"] == list(POINTS) and status["settled"] and status["last_error"] is None
    assert store.head() == "v1" and [v.version for v in store.list_versions()] == ["v1"]
    assert_merged_exactly_once(store, stream, ids)
    # The run the last crash left open was completed by the restarted incarnation.
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(namespace)
    runs = client.search_runs([experiment.experiment_id], "tags.`sharecl.kind` = 'merge'")
    assert [(r.data.tags["sharecl.version"], r.info.status) for r in runs] == [("v1", "FINISHED")]
    assert runs[0].info.run_id == store.manifest("v1")["metadata"]["mlflow_run_id"]

    # Killed from outside while submissions arrive: restarted, nothing lost or doubled.
    pid = status["pid"]
    more = {f"b{i}": stream.submit(Submission(f"b{i}", adapter(10 + i), "v1")) for i in range(3)}
    ray.kill(handle, no_restart=False)
    more.update({f"c{i}": stream.submit(Submission(f"c{i}", adapter(20 + i), "v1")) for i in range(2)})
    same = get_or_start_coordinator(namespace, redis_server, mlflow_uri, policy=KPolicy(k=16), block_ms=200)
    status = ray.get(same.flush.remote(240), timeout=300)
    assert status["pid"] != pid
    assert_merged_exactly_once(store, stream, {**ids, **more})
    runs = client.search_runs([experiment.experiment_id], "tags.`sharecl.kind` = 'merge'")
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)
    assert {r.data.tags.get("sharecl.version") for r in runs if r.info.status == "FINISHED"} == {
        v.version for v in store.list_versions()
    }

    assert stop_coordinator(namespace) and find_coordinator(namespace) is None


def test_another_redis_for_a_running_namespace_is_refused(ray_session, redis_server, namespace):
    get_or_start_coordinator(namespace, redis_server, tracking=False, block_ms=200)
    try:
        with pytest.raises(ValueError, match="already runs against Redis"):
            get_or_start_coordinator(namespace, "redis://127.0.0.1:1/0", tracking=False)
    finally:
        assert stop_coordinator(namespace)
