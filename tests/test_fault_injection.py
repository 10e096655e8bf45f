"""Fault injection (issue 10): the embedded redis-server is SIGKILLed at a random point of a running
job (a seeded random delay: ``SHARECL_FAULT_SEED`` picks another point), then restarted on the same
data folder and port. The job still finishes: every submission merged exactly once, every version
reads back and verifies its checksums, and exactly one server runs on the folder.

Real local Ray, real redis-server (append-only file), real MLflow sqlite store, the tiny model.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import servers_on, write_tiny_job
from test_workers_task import write_tiny_task

from jobs.runner import start_job
from jobs.schema import load_job
from subspace_store import SubmissionStatus, SubmissionStream, SubspaceStore, connect
from subspace_store.embedded import ensure_running, stop_embedded

pytestmark = pytest.mark.slow
TESTS_DIR = str(Path(__file__).parent)
TASKS = ("fruit", "colors", "cars")


def write_job(folder: Path, redis_url: str, namespace: str, mlflow_uri: str) -> Path:
    entries = []
    for i, name in enumerate(TASKS):
        write_tiny_task(folder, name, ((0, 1), (2, 1), (1, 0))[i])
        entries.append({"name": name, "train": str(folder / name / "train.parquet")})
    return write_tiny_job(folder, entries, redis_url, namespace, mlflow_uri, k_max=16, max_retries=1)


def test_redis_sigkill_mid_job_then_restart(tmp_path: Path, namespace: str, monkeypatch) -> None:
    seed = int(os.environ.get("SHARECL_FAULT_SEED", "7"))
    delay = random.Random(seed).uniform(1.0, 10.0)  # from launch: starting, training, submitting or merging
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR)
    folder = tmp_path / "redis"
    server = ensure_running(folder)  # the CLI's embedded server: detached, password, append-only file
    try:
        mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        cfg = load_job(write_job(tmp_path, server.url, namespace, mlflow_uri))
        job = start_job(cfg, say=lambda _: None)
        restarted: list[int] = []
        killed = threading.Event()

        def kill_and_restart() -> None:
            time.sleep(delay)
            os.kill(server.pid, signal.SIGKILL)
            killed.set()
            deadline = time.monotonic() + 30
            while servers_on(folder) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(random.Random(seed + 1).uniform(0.2, 2.0))  # down for a moment
            restarted.append(ensure_running(folder, port=server.port).pid)

        fault = threading.Thread(target=kill_and_restart, name="redis-killer")
        fault.start()
        result = job.wait(merge_timeout_s=300)
        mid_job = killed.is_set()
        fault.join(60)
        assert mid_job and restarted, f"seed {seed}: the job ended before the kill at {delay:.1f}s"
        assert result.ok, (seed, delay, {t: (o.status, o.error) for t, o in result.tasks.items()})

        client = connect(server.url)
        store, stream = SubspaceStore(client, namespace), SubmissionStream(client, namespace)
        merged = {t: o.submission_id for t, o in result.tasks.items()}
        versions = store.list_versions()
        carried = [sid for info in versions for sid in info.submissions]
        assert sorted(carried) == sorted(merged.values()), (seed, delay)  # each in exactly one version
        assert sorted(store.get().tasks) == sorted(TASKS)
        assert all(stream.status(sid).state is SubmissionStatus.MERGED for sid in merged.values())
        assert stream.pending() == [] and stream.rejections() == {}
        assert int(client.xlen(stream.keys.stream)) == len(TASKS)  # nothing submitted twice
        for info in versions:  # every version reads back, its checksums verified
            assert sorted(store.get(info.version).tasks) == sorted(info.tasks)
        assert servers_on(folder) == restarted  # one server on the folder: the restarted one
        client.close()
    finally:
        stop_embedded(folder)
