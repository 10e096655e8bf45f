"""Issue 10, the coordinator's part: one bad submission never jams the merge loop (it is isolated by
bisecting the batch and rejected with its reason), a merge that would leave a task over the forgetting
bound is refused unless the job allows it, and the job driver never leaves a merge run RUNNING.
Real redis-server, real PEFT files, real local Ray and a real MLflow sqlite store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import peft_folder, write_tiny_job
from helpers import write_unchecked as raw_submit
from mlflow import MlflowClient
from test_workers_task import write_tiny_task

from coordinator import Coordinator
from coordinator.actor import find_coordinator, get_or_start_coordinator
from jobs.cli import main
from jobs.errors import JobConfigError
from jobs.runner import check_capacity, run_job, start_job, task_jobs
from jobs.schema import load_job
from share import KPolicy, LoraAdapter, load_peft_adapter
from subspace_store import Submission, SubmissionStatus, SubmissionStream, SubspaceStore
from workers import tracking
from workers.run_task import run_task_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS_DIR = str(Path(__file__).parent)
DIM = 12  # the tiny model's query/value layers are 12 x 12


def small_lora(seed: int, r: int = 2) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(DIM, r, generator=g), torch.randn(r, DIM, generator=g)) for m in ("query", "value")}
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in factors})


def rank_zero() -> LoraAdapter:
    """Factors that chain and hold no NaN, yet no merge can use (rank 0)."""
    return LoraAdapter(factors={m: (torch.zeros(DIM, 0), torch.zeros(0, DIM)) for m in ("query", "value")})


@pytest.fixture
def setup(redis_client, namespace):
    return SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)


# -- defect 1: one bad submission never jams the coordinator -------------------------------------


def test_adapter_with_rank_above_the_layer_is_rejected_and_the_good_one_merges(setup, tmp_path) -> None:
    store, stream = setup
    too_big = load_peft_adapter(peft_folder(tmp_path / "r16", r=16))  # r=16 on 12 x 12 layers
    good = load_peft_adapter(peft_folder(tmp_path / "r2", r=2, seed=8))
    bad_id = raw_submit(stream, "too_big", too_big)
    good_id = stream.submit(Submission("good", good, None))

    coordinator = Coordinator(store, stream)
    result = coordinator.step(max_batch=8, block_ms=None)  # before the fix: raised, and every retry again
    assert result.merged == {good_id: "good"} and result.version == "v1"
    assert set(result.rejected) == {bad_id}
    reason = stream.status(bad_id).reason
    assert "too_big" in reason and "rank 16" in reason and "12" in reason
    assert list(store.get("v1").tasks) == ["good"] and stream.pending() == []
    assert coordinator.last_error is None and coordinator.counters["rejected"] == 1


def test_bisection_isolates_every_bad_submission_of_a_batch(setup, tmp_path) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=8))
    stream.submit(Submission("first", small_lora(0), None))
    assert coordinator.step(block_ms=None).version == "v1"

    too_big = load_peft_adapter(peft_folder(tmp_path / "r16", r=16))
    ids: dict[str, str] = {}
    for i, name in enumerate(["g0", "zero_rank", "g1", "g2", "too_big", "g3"]):
        if name == "zero_rank":
            ids[name] = raw_submit(stream, name, rank_zero())
        elif name == "too_big":
            ids[name] = raw_submit(stream, name, too_big)
        else:
            ids[name] = stream.submit(Submission(name, small_lora(10 + i), "v1"))
    result = coordinator.step(max_batch=16, block_ms=None)
    good = {ids[n]: n for n in ("g0", "g1", "g2", "g3")}
    assert result.version == "v2" and result.merged == good  # the four good ones in one version
    assert set(result.rejected) == {ids["zero_rank"], ids["too_big"]}
    assert list(store.get("v2").tasks) == ["first", "g0", "g1", "g2", "g3"]
    for name in ("zero_rank", "too_big"):
        state = stream.status(ids[name])
        assert state.state is SubmissionStatus.REJECTED and name in state.reason
    assert stream.pending() == [] and stream.is_settled()


# -- defect 4: no merge leaves a committed task over the forgetting bound without saying so -------


def in_span(head_adapters: list[LoraAdapter], seed: int) -> LoraAdapter:
    """A rank-2 adapter inside the span of the committed tasks' factors: it needs no new direction."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in ("query", "value"):
        Bs = torch.cat([a.factors[m][0] for a in head_adapters], dim=1)
        As = torch.cat([a.factors[m][1] for a in head_adapters], dim=0)
        mix = torch.randn(Bs.shape[1], 2, generator=g)
        factors[m] = (Bs @ mix, mix.T @ As)
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in factors})


def test_merge_over_the_bound_is_rejected_with_the_numbers_unless_allowed(setup) -> None:
    store, stream = setup
    policy = KPolicy(max_error=0.05, k_max=6)  # three rank-2 tasks fill k_max
    coordinator = Coordinator(store, stream, policy)
    committed = [small_lora(i) for i in range(3)]
    for i, adapter in enumerate(committed):
        stream.submit(Submission(f"t{i}", adapter, None))
    assert coordinator.step(max_batch=8, block_ms=None).version == "v1"

    huge = small_lora(10)
    huge.factors["query"][1][0, 0] = 3e38  # one lora_A entry at 3e38: finite, so validation passes
    huge_id = stream.submit(Submission("huge", huge, "v1"))
    fits_id = stream.submit(Submission("fits", in_span(committed, 11), "v1"))
    result = coordinator.step(max_batch=8, block_ms=None)
    assert result.merged == {fits_id: "fits"} and set(result.rejected) == {huge_id}
    reason = stream.status(huge_id).reason
    assert "max_error=0.05" in reason and "allow_over_bound" in reason
    for task in ("t0", "t1", "t2"):  # every committed task it would have pushed over, with its number
        assert f"{task}: " in reason
    head = store.get(result.version)
    assert list(head.tasks) == ["t0", "t1", "t2", "fits"]
    for i, adapter in enumerate(committed):  # the old tasks are intact
        for m in ("query", "value"):
            truth = adapter.delta_weight(m)
            assert float(torch.linalg.norm(head.delta_weight(f"t{i}", m) - truth) / torch.linalg.norm(truth)) < 0.05

    # A job that allows it gets it merged; the version records who went over and by how much.
    allowed = stream.submit(Submission("huge_ok", huge, result.version, allow_over_bound=True))
    again = coordinator.step(block_ms=None)
    assert again.merged == {allowed: "huge_ok"} and not again.rejected
    over = store.manifest(again.version)["metadata"]["coordinator"]["over_bound"]
    assert set(over) >= {"t0", "t1", "t2"} and all(v > 0.05 for v in over.values())


def test_two_that_only_fit_one_at_a_time_the_second_waits_for_the_next_version(setup) -> None:
    """Each merges alone within the bound, together they need more than k_max: the first is merged, the
    second stays pending and is tried on the new head (where it no longer fits: rejected, with why)."""
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(max_error=0.05, k_max=6))
    for i in range(2):
        stream.submit(Submission(f"t{i}", small_lora(i), None))
    assert coordinator.step(max_batch=8, block_ms=None).version == "v1"  # k = 4 of 6
    x = stream.submit(Submission("x", small_lora(20), "v1"))
    y = stream.submit(Submission("y", small_lora(21), "v1"))
    first = coordinator.step(max_batch=8, block_ms=None)
    assert first.merged == {x: "x"} and first.deferred == [y] and not first.rejected
    assert stream.status(y).state is SubmissionStatus.PENDING
    second = coordinator.step(max_batch=8, block_ms=None)  # takes y back first
    assert second.recovered == 1 and second.version is None and set(second.rejected) == {y}
    assert "max_error=0.05" in stream.status(y).reason and stream.pending() == []
    assert list(store.get().tasks) == ["t0", "t1", "x"]


def test_allow_over_bound_travels_from_the_job_file_to_the_stream(tmp_path, redis_server, redis_client, namespace):
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = job_file(tmp_path, redis_server, namespace, mlflow_uri, ("a",))
    assert load_job(path).adapter.allow_over_bound is False
    with pytest.raises(JobConfigError, match="adapter.allow_over_bound"):
        load_job(path, ["adapter.allow_over_bound=maybe"])
    cfg = load_job(path, ["adapter.allow_over_bound=true"])
    experiment_id = tracking.ensure_experiment(mlflow_uri, cfg.experiment_name)
    (job,) = task_jobs(cfg, "job1", redis_server, mlflow_uri, experiment_id, None)
    assert job.allow_over_bound and job.attempt_key == "job1/a"
    summary = run_task_job(job)
    entry = SubmissionStream(redis_client, namespace).submitted("job1/a")
    assert entry is not None and entry.id == summary.submission_id and entry.allow_over_bound


# -- through Ray: --wait, the driver's shutdown, stopping coordinators, resources -----------------
# Each of the first two starts (and stops) a local Ray of its own, as the commands do; the last one
# connects to a multi-node cluster. Keep this order: one Ray per process at a time.


def job_file(folder: Path, redis_url: str, namespace: str, mlflow_uri: str, tasks: tuple[str, ...]) -> Path:
    entries = []
    for name in tasks:
        write_tiny_task(folder, name)
        entries.append(
            {"name": name, "train": str(folder / name / "train.parquet"), "eval": str(folder / name / "eval.parquet")}
        )
    return write_tiny_job(folder, entries, redis_url, namespace, mlflow_uri)


@pytest.mark.slow
def test_wait_settles_a_batch_with_a_bad_adapter_and_ends_with_a_clear_line(
    tmp_path, redis_server, redis_client, namespace, monkeypatch, capsys
) -> None:
    """Defect 1 through the real coordinator actor: before the fix, the bad entry kept the batch
    failing every 30 s and ``--wait`` ended in a raw TimeoutError traceback."""
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    stream = SubmissionStream(redis_client, namespace)
    bad_id = raw_submit(stream, "too_big", load_peft_adapter(peft_folder(tmp_path / "r16", r=16)))
    good = peft_folder(tmp_path / "good", r=2)
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", mlflow_uri]
    code = main(["adapters", "add", str(good), "--task", "good", *args, "--wait", "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 0 and "task 'good' (" in out and "merged into v1" in out
    state = stream.status(bad_id)
    assert state.state is SubmissionStatus.REJECTED and "rank 16" in state.reason
    assert list(SubspaceStore(redis_client, namespace).get().tasks) == ["good"]
    assert_no_run_left_running(mlflow_uri)


def assert_no_run_left_running(mlflow_uri: str) -> None:
    """Every run of every experiment is FINISHED, or FAILED with its reason in the status tag."""
    client = MlflowClient(mlflow_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    assert runs
    for run in runs:
        assert run.info.status in ("FINISHED", "FAILED"), (run.info.run_name, run.info.status, run.data.tags)
        if run.info.status == "FAILED":
            assert run.data.tags.get("sharecl.status"), run.info.run_name


@pytest.mark.slow
def test_the_driver_shuts_ray_down_only_after_the_last_merge_run_is_finished(
    tmp_path, redis_server, namespace, monkeypatch
) -> None:
    """Defect 9: the coordinator is still evaluating (and logging) the last merge when the driver is
    done; before the fix the driver shut Ray down under it and the merge run stayed RUNNING."""
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    monkeypatch.setenv("SHARECL_TEST_SLOW_ACTOR_S", "20")  # the coordinator's evaluator is slow
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_job(job_file(tmp_path, redis_server, namespace, mlflow_uri, ("only",)))
    result = run_job(cfg, say=lambda _: None)
    assert result.ok and result.head == "v1"
    assert_no_run_left_running(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    (merge_run,) = client.search_runs(
        [client.get_experiment_by_name(namespace).experiment_id], "tags.`sharecl.kind` = 'merge'"
    )
    assert merge_run.info.status == "FINISHED" and merge_run.data.tags["sharecl.version"] == "v1"
    assert "accuracy/only" in merge_run.data.metrics  # its evaluation was logged, not cut off


@pytest.fixture(scope="module")
def gpu_cluster():
    """A real two-node Ray cluster: a head without GPUs and a worker node declaring one GPU."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_resources_no_node_has_are_refused_at_submit(gpu_cluster, tmp_path, redis_server, namespace) -> None:
    """Defect 12: a job asking for more GPUs per task than any node has fails before launching anything."""
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = job_file(tmp_path, redis_server, namespace, mlflow_uri, ("a",))
    check_capacity(load_job(path, ["cluster.num_gpus_per_task=1"]))  # the worker node has one

    cfg = load_job(path, ["cluster.num_gpus_per_task=2"])
    with pytest.raises(JobConfigError) as caught:
        start_job(cfg, say=lambda _: None)
    message = str(caught.value)
    assert "cluster.num_gpus_per_task=2" in message and "{CPU: 1, GPU: 2}" in message
    assert "{CPU: 1, GPU: 0}" in message and "{CPU: 1, GPU: 1}" in message  # each node, named
    assert "cluster total {CPU: 2, GPU: 1}" in message
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    assert client.search_runs([experiment.experiment_id]) == []  # no job run, no task launched

    with pytest.raises(JobConfigError, match="asks Ray for {CPU: 4}"):
        check_capacity(load_job(path, ["cluster.num_cpus_per_task=4"]))


@pytest.mark.slow
def test_coordinator_stop_and_idle_exit(gpu_cluster, redis_server, namespace, capsys) -> None:
    """Defect 12: `sharecl coordinator stop` removes a namespace's detached coordinator and says
    whether one ran; an idle coordinator exits by itself after idle_timeout_s."""
    get_or_start_coordinator(namespace, redis_server, tracking=False, block_ms=200)
    assert find_coordinator(namespace) is not None
    assert main(["coordinator", "stop", "--namespace", namespace]) == 0
    assert f"stopped the coordinator of namespace {namespace!r}" in capsys.readouterr().out
    assert find_coordinator(namespace) is None
    assert main(["coordinator", "stop", "--namespace", namespace]) == 0
    assert f"no coordinator was running for namespace {namespace!r}" in capsys.readouterr().out

    idle = f"{namespace}-idle"
    get_or_start_coordinator(idle, redis_server, tracking=False, block_ms=200, idle_timeout_s=1)
    deadline = time.monotonic() + 90
    while find_coordinator(idle) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert find_coordinator(idle) is None  # it removed itself

    with pytest.raises(ValueError, match="idle_timeout_s must be a number of seconds >= 0"):
        get_or_start_coordinator(namespace, redis_server, tracking=False, idle_timeout_s=-1)
