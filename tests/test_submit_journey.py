"""`sharecl submit --address http://HEAD:8265` as a user runs it against a real Ray head with its Jobs API
(started here with `ray start --head`, token auth as Ray 2.60 sets it up), real Redis and a real MLflow
sqlite store: a missing --cluster-dir is refused before anything is submitted; the submission is
``sharecl-<job id>`` with the job id and namespace as its metadata; the driver's log names the cluster
(not "local") and carries the workers' step lines without Hugging Face's "Loading weights" bars; the
job's MLflow run, its progress records and `sharecl status` all name the same ids.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_submit_cli import LOADING_BUILDER, TESTS_DIR, _job_file, save_tiny_bert

from jobs.cli import main
from jobs.runner import ray_submission_id
from subspace_store import SubspaceStore
from subspace_store.embedded import free_ports
from subspace_store.progress import ProgressBoard, TaskPhase
from subspace_store.tracking import TAG_JOB, TAG_KIND, TAG_RAY_ADDRESS, TAG_RAY_SUBMISSION, RunKind
from workers import tracking

pytestmark = pytest.mark.slow

HEAD_START_S = 240


@dataclass(frozen=True)
class RayHead:
    dashboard_url: str  # the Jobs API
    gcs_port: int


def _ray(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def ray_head(monkeypatch: pytest.MonkeyPatch) -> Iterator[RayHead]:
    """A one-node Ray cluster with its dashboard (the Jobs API), in its own process group, stopped by
    killing that group (never `ray stop`, which would stop every Ray on this machine)."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    names = (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    ports = dict(zip(names, free_ports(len(names)), strict=True))  # distinct: two services on one port fail
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `sharecl` for the entrypoint
    env["PYTHONPATH"] = TESTS_DIR  # the test builders, for the driver and the workers
    env["RAY_AUTH_MODE"] = "token"
    for key in ("RAY_ADDRESS", "HF_HUB_DISABLE_PROGRESS_BARS"):  # a clean start: the job must set what it needs
        env.pop(key, None)
    args = [f"--{name}={port}" for name, port in ports.items()]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    starter = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            *args,
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the head's daemons join this process group
    )
    group = starter.pid
    try:
        out, _ = starter.communicate(timeout=HEAD_START_S)
        assert starter.returncode == 0, out
        token = _ray("get-auth-token", env=env, timeout=60).stdout.strip().splitlines()[-1]
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        yield RayHead(f"http://127.0.0.1:{ports['dashboard-port']}", ports["port"])
    finally:
        _stop_group(group)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(group: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def test_a_job_through_the_ray_jobs_api_names_its_submission_and_its_cluster(
    tmp_path: Path,
    ray_head: RayHead,
    redis_server: str,
    redis_client,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.job_submission import JobSubmissionClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = _job_file(tmp_path, redis_server, namespace, uri)
    spec = yaml.safe_load(job.read_text())
    # A builder that loads a Hugging Face checkpoint, as real ones do: its "Loading weights" bar is what
    # cluttered every job log.
    spec["model"].update(builder=LOADING_BUILDER, name_or_path=str(save_tiny_bert(tmp_path / "bert")))
    spec["training"].update(steps=6, log_every=2)
    job.write_text(yaml.safe_dump(spec))
    url = ray_head.dashboard_url
    client = JobSubmissionClient(url)

    # No checkout at --cluster-dir: refused here, and nothing reaches the cluster.
    assert main(["submit", str(job), "--address", url, "--cluster-dir", str(tmp_path / "absent")]) == 2
    assert f"--cluster-dir {tmp_path / 'absent'}: no such directory here" in capsys.readouterr().err
    assert client.list_jobs() == []

    assert main(["submit", str(job), "--address", url, "--cluster-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    found = re.search(rf"submitted Ray job (\S+) \(sharecl job (\S+), namespace '{namespace}'\) to {url}", out)
    assert found, out
    submission_id, job_id = found.groups()
    assert submission_id == ray_submission_id(job_id) == f"sharecl-{job_id}"
    assert client.get_job_info(submission_id).metadata == {
        "sharecl_job_id": job_id,
        "namespace": namespace,
        "job_file": "job.yaml",
    }
    # The driver's log, as the command streamed it: where it ran, truthfully, and the workers' progress.
    launched = re.search(rf"\[job\] {job_id}: 2 task\(s\) launched on (.*), namespace '{namespace}'", out)
    assert launched, out
    assert re.fullmatch(rf"the Ray cluster at [\d.]+:{ray_head.gcs_port} \(Ray job {submission_id}\)", launched[1])
    assert "launched on Ray (local)" not in out
    assert "[fruit] step 2/6 loss" in out and "[colors] step 6/6 loss" in out
    assert "Loading weights" not in out and "it/s]" not in out
    assert "fruit: merged into v" in out and "colors: merged into v" in out
    assert out.rstrip().endswith(f"Ray job {submission_id} (sharecl job {job_id}): SUCCEEDED")

    # The same ids on the job's MLflow run, in its progress records and in `sharecl status`.
    (run,) = tracking.find_runs(
        uri,
        tracking.ensure_experiment(uri, namespace),
        f"tags.`{TAG_JOB}` = '{job_id}' and tags.`{TAG_KIND}` = '{RunKind.JOB}'",
    )
    assert run.data.tags[TAG_RAY_SUBMISSION] == submission_id
    assert run.data.tags[TAG_RAY_ADDRESS].endswith(f":{ray_head.gcs_port}")
    records = ProgressBoard(redis_client, namespace).read(job_id)
    assert {task: (r.phase, r.step, r.total) for task, r in records.items()} == {
        "fruit": (TaskPhase.SUBMITTED, 6, 6),
        "colors": (TaskPhase.SUBMITTED, 6, 6),
    }
    assert set(SubspaceStore(redis_client, namespace).manifest("head")["tasks"]) == {"fruit", "colors"}
    store_args = ["--redis-url", redis_server, "--namespace", namespace, "--mlflow-uri", uri]
    assert main(["status", *store_args]) == 0
    assert re.search(rf"job {job_id} \([\d: -]+, Ray job {submission_id}\): merged", capsys.readouterr().out)
