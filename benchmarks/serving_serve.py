"""Requests per second through ``sharecl serve`` (``jobs.serving.build_app``) on a local Ray Serve.

The benchmark's MiniLM subspace is published as a sharecl job would leave it: modules under the text
classifier's ``encoder.`` prefix, a classifier head per task (2-4 labels, random weights) and the
submission metadata the server reads (builder, dtype, max_length, label names). A redis-server of its
own holds it, tagged ``prod``; one replica with one torch thread answers. A thread pool of ``clients``
sends ``requests`` POST /predict, each for a task drawn at random with ``inputs_per_request`` texts of
12-20 random words, after a warmup of ``clients`` requests; the server batches them across tasks.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from share import Subspace, TaskCoefficients

WORDS = (
    "river stone light paper window garden music winter market letter engine forest silver doctor "
    "island bridge camera orange pocket history castle animal travel summer planet coffee school "
    "mountain village"
).split()


@dataclass
class ServeResult:
    tasks: int
    requests: int
    rows: int
    clients: int
    seconds: float
    latency_p50: float
    latency_p95: float
    batches: int
    mixed_batches: int
    failed: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def as_served(subspace: Subspace, max_length: int, seed: int = 0) -> Subspace:
    """``subspace`` (modules named as in the bare encoder) as the text classifier's tasks, with heads."""
    from workers.models import DEFAULT_BUILDER

    g = torch.Generator().manual_seed(seed)
    tasks = {}
    for i, (name, task) in enumerate(subspace.tasks.items()):
        labels = [f"{name}-class{j}" for j in range(2 + i % 3)]
        hidden = next(iter(subspace.modules.values())).out_features
        head = {"head.weight": torch.randn(len(labels), hidden, generator=g), "head.bias": torch.zeros(len(labels))}
        submitted = {"builder": DEFAULT_BUILDER, "dtype": "float32", "max_length": max_length, "label_names": labels}
        metadata = {"submission": {"id": f"0-{name}", "base_version": None, "metadata": submitted}}
        E = {f"encoder.{module}": pair for module, pair in task.E.items()}
        tasks[name] = TaskCoefficients(E=E, head=head, metadata=metadata)
    modules = {f"encoder.{module}": basis for module, basis in subspace.modules.items()}
    return Subspace(modules=modules, tasks=tasks, policy=subspace.policy)


def measure(
    subspace: Subspace,
    *,
    requests: int,
    clients: int,
    inputs_per_request: int,
    threads: int,
    max_batch_size: int,
    batch_wait_ms: float,
    max_length: int = 32,
    seed: int = 0,
) -> ServeResult:
    import ray
    import redis
    from ray import serve

    from jobs.serving import build_app
    from subspace_store import SubspaceStore
    from subspace_store.embedded import free_port, start_redis

    served = as_served(subspace, max_length, seed)
    names = list(served.tasks)
    rng = random.Random(seed)

    def body() -> dict:
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(12, 20))) for _ in range(inputs_per_request)]
        return {"task": rng.choice(names), "inputs": texts}

    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp) / "redis", appendonly=False)
        client = redis.Redis.from_url(server.url)
        try:
            store = SubspaceStore(client, "serving-benchmark")
            store.tag(store.publish(served, None), "prod")
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = build_app(
                store.namespace,
                server.url,
                tag="prod",
                threads=threads,
                num_cpus=1,
                max_batch_size=max_batch_size,
                batch_wait_ms=batch_wait_ms,
            )
            serve.run(app, name="sharecl-serving-benchmark", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            warmup = [body() for _ in range(clients)]
            load = [body() for _ in range(requests)]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda b: _post(url, b), warmup))
                before = _health(url)
                start = time.perf_counter()
                answers = list(pool.map(lambda b: _post(url, b), load))
                seconds = time.perf_counter() - start
            after = _health(url)
        finally:
            try:
                serve.shutdown()
            finally:
                if ray.is_initialized():
                    ray.shutdown()
                client.close()
                server.stop()
    latencies = sorted(latency for ok, latency in answers if ok)
    return ServeResult(
        tasks=len(names),
        requests=requests,
        rows=requests * inputs_per_request,
        clients=clients,
        seconds=seconds,
        latency_p50=statistics.median(latencies) if latencies else float("nan"),
        latency_p95=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        batches=after["batches"] - before["batches"],
        mixed_batches=after["mixed_batches"] - before["mixed_batches"],
        failed=sum(1 for ok, _ in answers if not ok),
    )


def _post(url: str, body: dict) -> tuple[bool, float]:
    import requests

    start = time.perf_counter()
    response = requests.post(f"{url}/predict", json=body, timeout=300)
    ok = response.status_code == 200 and len(response.json().get("predictions", [])) == len(body["inputs"])
    return ok, time.perf_counter() - start


def _health(url: str) -> dict:
    import requests

    return requests.get(f"{url}/health", timeout=60).json()
