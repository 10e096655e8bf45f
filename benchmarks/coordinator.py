"""Coordinator benchmark: submissions merged per second and submit-to-published latency as the
subspace grows to 1000 tasks, batched merges vs one merge per submission.

    python -m benchmarks.coordinator [--tasks 10 100 300 1000] [--burst 16] [--write]
    python -m benchmarks.coordinator --scaling [...]   # full vs delta versions as T grows (delta_scaling.py)

Runs the merge service itself (``coordinator.Coordinator``, no Ray) against a real redis-server it
starts in a temporary folder (append-only, fsync every second: the embedded default). Shapes are
MiniLM's: 6 layers x query,value, 384 x 384, policy variance 0.6 capped at k_max 32 (the example job's).
For each T, a subspace holding T tasks (random rank-8 LoRA adapters) is published as v1 in two
namespaces; then a burst of coefficient-mode submissions (``TaskUpdate``, p=8, phi=2, trained on
v1) is submitted at once and merged, in one namespace one merge per submission (``max_batch=1``),
in the other in one batched merge. Latency is Redis server time from XADD to the commit of the
version holding the submission. Old versions are pruned (keep 2), as a long-running coordinator
would be configured. ``--mlflow`` also measures both modes with a merge run per version (temporary sqlite store).
``--write`` replaces the ``## Coordinator`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.results_md import command_line, markdown_table, write_section
from coordinator import Coordinator, MergeTracker, StepResult
from share import KPolicy, LoraAdapter, Subspace, TaskUpdate, merge
from subspace_store import Submission, SubmissionStream, SubspaceStore
from subspace_store.embedded import start_redis

HEADING = "## Coordinator"
MODULES = [f"encoder.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
HIDDEN, R, P, PHI = 384, 8, 8, 2
POLICY = KPolicy(variance=0.6, k_max=32)


def lora(seed: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(HIDDEN, R, generator=g) * 0.01, torch.randn(R, HIDDEN, generator=g)) for m in MODULES}
    return LoraAdapter(factors, scaling={m: 2.0 for m in MODULES}, head={"head.weight": torch.randn(4, HIDDEN)})


def update(base: Subspace, seed: int) -> TaskUpdate:
    """Shaped like what a coefficient-mode worker submits against ``base``."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for m, b in base.modules.items():
        parts[m] = {
            "E_A": torch.randn(b.k_A, P, generator=g),
            "E_B": torch.randn(b.k_B, P, generator=g) * 0.01,
            "V_A": torch.linalg.qr(torch.randn(HIDDEN, PHI, generator=g))[0],
            "F_A": torch.randn(PHI, P, generator=g) * 0.1,
            "V_B": torch.linalg.qr(torch.randn(HIDDEN, PHI, generator=g))[0],
            "F_B": torch.randn(PHI, P, generator=g) * 0.001,
        }
    return TaskUpdate(parts=parts, head={"head.weight": torch.randn(4, HIDDEN, generator=g)})


def base_subspace(tasks: int) -> Subspace:
    """T tasks, merged in chunks of 100 (the way they would have accumulated, but faster)."""
    subspace = None
    for start in range(0, tasks, 100):
        chunk = {f"t{i:04d}": lora(i) for i in range(start, min(start + 100, tasks))}
        subspace, _ = merge(subspace, chunk, POLICY)
    assert subspace is not None
    return subspace


@dataclass
class Run:
    tasks: int
    mode: str
    burst: int
    seconds: float
    merges: int
    latencies: list[float]
    merge_s: list[float]
    publish_s: list[float]

    @property
    def per_second(self) -> float:
        return self.burst / self.seconds


def measure(
    store: SubspaceStore,
    stream: SubmissionStream,
    base: Subspace,
    burst: int,
    batch: int,
    tasks: int,
    mlflow_uri: str | None,
) -> Run:
    tracker = None
    if mlflow_uri is not None:
        tracker = MergeTracker(mlflow_uri, store.namespace, store.namespace)
        tracker.experiment_id  # noqa: B018 -- create the experiment outside the measurement
    coordinator = Coordinator(store, stream, POLICY, tracker, keep_versions=2)
    coordinator.step(block_ms=None)  # loads the head (v1) into memory, as a running coordinator has it
    updates = [update(base, 10_000 + i) for i in range(burst)]
    for i, u in enumerate(updates):
        stream.submit(Submission(f"new{i:03d}", None, "v1", {"base_model": "minilm"}, update=u))
    results: list[StepResult] = []
    start = time.perf_counter()
    merged = 0
    while merged < burst:
        result = coordinator.step(max_batch=batch, block_ms=None)
        if result.rejected:
            raise RuntimeError(f"unexpected rejections: {result.rejected}")
        merged += len(result.merged)
        results.append(result)
    seconds = time.perf_counter() - start
    # A compaction the last publish started runs in the background, off these timings: let it end before the next
    # measurement shares the cores with it.
    coordinator.close(wait_s=None)  # waits for it, collects it (a failure is logged) and ends the MLflow runs
    return Run(
        tasks=tasks,
        mode=("batched" if batch > 1 else "one per submission") + (" + MLflow" if mlflow_uri else ""),
        burst=burst,
        seconds=seconds,
        merges=len(results),
        latencies=[v for r in results for v in r.latency_s.values()],
        merge_s=[r.merge_seconds for r in results],
        publish_s=[r.publish_seconds for r in results],
    )


def table(runs: list[Run]) -> str:
    columns = [("T (tasks in head)", "r"), ("mode", "l"), ("merges", "r"), ("merged / s", "r")]
    columns += [("latency mean (s)", "r"), ("latency max (s)", "r"), ("merge s / version", "r")]
    columns += [("publish s / version", "r")]
    return markdown_table(
        columns,
        (
            [run.tasks, run.mode, run.merges, f"{run.per_second:.2f}", f"{statistics.mean(run.latencies):.2f}"]
            + [f"{max(run.latencies):.2f}", f"{statistics.mean(run.merge_s):.3f}"]
            + [f"{statistics.mean(run.publish_s):.3f}"]
            for run in runs
        ),
    )


NOTES = (
    "Every merge rotates every task's coefficients (``E_i' = W^T [E_i; 0]``, batched per module), and a version "
    "still writes something per task (every task's entry in its manifest, or in manifest format 4, which a store "
    "uses once it writes a full version of 256 tasks or more, a name in the manifest and a row of numbers), so a "
    "version still costs O(T) (delta "
    "versions write only the new tasks' payloads: ``--scaling``); a batch pays that once for all its "
    "submissions. Latency runs from "
    "XADD to the commit of the version holding the submission; in one-merge-per-submission mode the last of a "
    "burst waits for every merge before it. With MLflow each version also gets a merge run (sqlite here) holding "
    "three numbers per task (reconstruction error, energy kept, drift bound: 3T metrics per merge), so its cost "
    "grows with T too (the + MLflow rows against the plain ones). The machine is shared (2 cores): figures vary "
    "by tens of percent between runs. A compaction (a publish of the head in full, once a chain reaches 16 "
    "rotations) runs in a background thread, off these timings; each measurement waits for it before the next."
)


def summary(runs: list[Run]) -> str:
    """Batched over one-merge-per-submission throughput, per T (plain runs)."""
    parts = []
    for tasks in sorted({r.tasks for r in runs}):
        by_mode = {r.mode: r for r in runs if r.tasks == tasks}
        single, batched = by_mode.get("one per submission"), by_mode.get("batched")
        if single and batched:
            parts.append(f"T={tasks}: {batched.per_second / single.per_second:.1f}x")
    return "Batched over one merge per submission (merged / s): " + ", ".join(parts) + "."


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if "--scaling" in arguments:  # the T-scaling table, full vs delta versions (benchmarks/delta_scaling.py)
        from benchmarks import delta_scaling

        delta_scaling.main(arguments, command_line("coordinator", argv))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 300, 1000], help="T values")
    parser.add_argument("--burst", type=int, default=16, help="submissions arriving at once per T")
    parser.add_argument("--mlflow", action="store_true", help="also measure with MLflow runs (temp. sqlite)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the coordinator actor's default)")
    parser.add_argument("--write", action="store_true", help="replace the ## Coordinator section of RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as folder:
        server = start_redis(Path(folder) / "redis")
        mlflow_uri = f"sqlite:///{Path(folder) / 'mlflow.db'}" if args.mlflow else None
        try:
            client = server.client()
            for tasks in args.tasks:
                base = base_subspace(tasks)
                variants = [(batch, None) for batch in (1, args.burst)]
                variants += [(batch, mlflow_uri) for batch in (1, args.burst) if mlflow_uri is not None]
                for index, (batch, uri) in enumerate(variants):
                    namespace = f"bench-{tasks}-{index}"
                    store, stream = SubspaceStore(client, namespace), SubmissionStream(client, namespace)
                    store.publish(base, None)
                    run = measure(store, stream, base, args.burst, batch, tasks, uri)
                    runs.append(run)
                    print(
                        f"T={tasks:5d} {run.mode:>20}: {run.per_second:6.2f} merged/s, latency mean "
                        f"{statistics.mean(run.latencies):6.2f}s max {max(run.latencies):6.2f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                    client.flushdb()  # keep the server's memory to one T at a time
        finally:
            server.stop()
    body = table(runs) + "\n\n" + summary(runs) + "\n\n" + NOTES
    print(body)
    if args.write:
        machine = f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
        write_section(HEADING, command_line("coordinator", argv), body, machine)


if __name__ == "__main__":
    main()
