"""Store benchmark: pull vs a raw redis-py GET of the same bytes, publish throughput, bytes per task.

    python -m benchmarks.store [--write]

Starts its own redis-server (append-only, fsync every second: the embedded default) in a temporary
folder. Shapes: MiniLM (6 layers x query,value, 384x384, k=16, p=8) and 7B (32 layers x q,v,
4096x4096, k=32, p=16). Subspaces are random but correctly shaped (orthonormal bases), since the
store's cost depends only on shapes. The raw baseline GETs exactly the payload keys of the version,
both one by one and in one pipeline; the faster of the two is the baseline. ``--write`` replaces
the ``## Store`` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from benchmarks.results_md import RESULTS, command_line, markdown_table, write_section
from share import KPolicy, ModuleBasis, Subspace, TaskCoefficients
from subspace_store import SubspaceStore, connect
from subspace_store.codec import decode_basis, decode_task
from subspace_store.embedded import start_redis
from subspace_store.payloads import sha256

HEADING = "## Store"


@dataclass
class Shape:
    name: str
    modules: list[str]
    n: int
    d: int
    k: int
    p: int
    tasks: int


def shapes(minilm_tasks: int, big_tasks: int) -> list[Shape]:
    minilm = [f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]
    big = [f"model.layers.{i}.self_attn.{m}" for i in range(32) for m in ("q_proj", "v_proj")]
    return [
        Shape("MiniLM-L6 q,v 384x384", minilm, 384, 384, 16, 8, minilm_tasks),
        Shape("7B q,v 4096x4096", big, 4096, 4096, 32, 16, big_tasks),
    ]


def random_subspace(shape: Shape, tasks: int, seed: int = 0) -> Subspace:
    gen = torch.Generator().manual_seed(seed)

    def orthonormal(rows: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(rows, shape.k, generator=gen))[0].contiguous()

    modules = {m: ModuleBasis(U_A=orthonormal(shape.d), U_B=orthonormal(shape.n)) for m in shape.modules}
    task_entries = {
        f"task{t}": TaskCoefficients(
            E={
                m: (torch.randn(shape.k, shape.p, generator=gen), torch.randn(shape.k, shape.p, generator=gen))
                for m in shape.modules
            },
            metadata={"reconstruction_error": 0.0},
        )
        for t in range(tasks)
    }
    return Subspace(modules=modules, tasks=task_entries, policy=KPolicy(k=shape.k))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_pull(store: SubspaceStore, default_client: redis.Redis, version: str, reps: int) -> dict[str, float]:
    manifest = store.manifest(version)
    keys = [e["key"] for e in manifest["modules"].values()] + [e["key"] for e in manifest["tasks"].values()]
    total = manifest["bytes"]
    client = store.client
    first_task = next(iter(manifest["tasks"]))

    def raw_sequential(c: redis.Redis = client) -> None:
        for key in keys:
            c.get(key)

    def raw_pipeline() -> None:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        pipe.execute()

    # The parts of a pull, each alone: the payloads' bytes are in memory here (writable, as a pull reads them).
    modules = list(manifest["modules"])
    payloads = [bytearray(client.get(key)) for key in keys]
    decoders = [decode_basis] * len(modules) + [
        lambda data, t=t: decode_task(data, modules, manifest["tasks"][t]) for t in manifest["tasks"]
    ]
    variants = {
        "seq": raw_sequential,
        "pipe": raw_pipeline,
        "default": lambda: raw_sequential(default_client),
        "pull": lambda: store.get(version),
        "pull_noverify": lambda: store.get(version, verify=False),
        "pull1": lambda: store.get(version, tasks=[first_task]),
        "manifest": lambda: store.manifest(version),
        "sha256": lambda: [sha256(data) for data in payloads],
        "decode": lambda: [decode(data) for decode, data in zip(decoders, payloads, strict=True)],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    store.get(version)  # warm up connections and the decode pool
    for _ in range(reps):  # interleaved, so machine noise hits every variant alike
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # least-disturbed run: steadier on a shared machine
    return {
        "bytes": total,
        "raw_s": min(med["seq"], med["pipe"]),
        "raw_best_s": min(best["seq"], best["pipe"]),
        "pull_best_s": best["pull"],
        **{f"{k}_s": v for k, v in med.items()},
    }


def bench_publish(store: SubspaceStore, subspace: Subspace, count: int) -> dict[str, float]:
    head = store.head()
    start = time.perf_counter()
    for _ in range(count):
        head = store.publish(subspace, head)
    seconds = time.perf_counter() - start
    size = store.manifest(head)["bytes"]
    store.prune(keep=1)
    return {"per_s": count / seconds, "MBps": count * size / seconds / 1e6, "seconds_each": seconds / count}


def bench_bytes_per_task(store: SubspaceStore, shape: Shape) -> dict[str, float]:
    """Grow a subspace one task at a time; what each added task costs in the stored version."""
    sizes, memory = [], []
    head = store.head()
    for tasks in (1, 2, 3):
        head = store.publish(random_subspace(shape, tasks, seed=1), head)
        m = store.manifest(head)
        sizes.append(m["bytes"])
        memory.append(sum(store.client.memory_usage(e["key"]) for e in m["tasks"].values()) / tasks)
    task_payload = store.manifest(head)["tasks"]["task0"]["bytes"]
    lora = len(shape.modules) * shape.p * (shape.n + shape.d) * 4  # one fp32 rank-p LoRA adapter
    store.prune(keep=1)
    return {
        "per_task": (sizes[-1] - sizes[0]) / 2,
        "task_payload": task_payload,
        "redis_memory_per_task": statistics.mean(memory),
        "bases": sizes[0] - task_payload,
        "lora": lora,
    }


def _validate_per_tensor(subspace: Subspace) -> None:
    """What ``Subspace.validate`` checked for finiteness before: one ``isfinite`` per basis and coefficient."""
    for basis in subspace.modules.values():
        for U in (basis.U_A, basis.U_B):
            if not torch.isfinite(U).all():
                raise ValueError("non-finite basis")
    for task in subspace.tasks.values():
        for E_A, E_B in task.E.values():
            if not (torch.isfinite(E_A).all() and torch.isfinite(E_B).all()):
                raise ValueError("non-finite coefficients")


def bench_validate(shape: Shape, tasks: int, reps: int) -> dict[str, float]:
    """``Subspace.validate`` (run by every publish) on ``tasks`` tasks of ``shape``, vs the per-tensor check alone.

    The coefficients are views of one random block (separate tensors, as validate sees them either way).
    """
    gen = torch.Generator().manual_seed(2)
    block = torch.randn(tasks, len(shape.modules), 2, shape.k, shape.p, generator=gen)
    base = random_subspace(shape, 0)
    task_entries = {
        f"task{t}": TaskCoefficients(E={m: (block[t, i, 0], block[t, i, 1]) for i, m in enumerate(shape.modules)})
        for t in range(tasks)
    }
    subspace = Subspace(modules=base.modules, tasks=task_entries, policy=base.policy)
    times: dict[str, list[float]] = {"validate": [], "per_tensor": []}
    for _ in range(reps):
        times["validate"].append(_timed(subspace.validate))
        times["per_tensor"].append(_timed(lambda: _validate_per_tensor(subspace)))
    tensors = 2 * len(shape.modules) * (tasks + 1)
    return {"tensors": tensors, **{k: statistics.median(v) for k, v in times.items()}}


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _table(titles: list[str], rows: list[list[str]]) -> str:
    return markdown_table([(title, "l") for title in titles], rows)


def run(args: argparse.Namespace) -> str:
    lines = []
    with tempfile.TemporaryDirectory(prefix="sharecl-bench-") as tmp:
        server = start_redis(Path(tmp) / "redis")
        try:
            client = connect(server.url, timeout_s=60)  # the store's own client settings
            default_client = redis.Redis.from_url(server.url, socket_timeout=60)  # redis-py defaults
            rows_pull, rows_parts, rows_pub, rows_bytes = [], [], [], []
            for i, shape in enumerate(shapes(args.minilm_tasks, args.big_tasks)):
                store = SubspaceStore(client, f"bench{i}")
                subspace = random_subspace(shape, shape.tasks)
                version = store.publish(subspace, None)
                p = bench_pull(store, default_client, version, args.reps)
                mbps = p["bytes"] / 1e6
                label = f"{shape.name}, T={shape.tasks}"
                parts = [f"{p[k] * 1e3:.2f} ms" for k in ("manifest_s", "sha256_s", "decode_s", "raw_s", "pull_s")]
                rows_parts.append([label, *parts])
                if i == 0:
                    small = p
                rows_pull.append(
                    [label, _mb(p["bytes"]), f"{p['raw_s'] * 1e3:.1f} ms ({mbps / p['raw_s']:.0f} MB/s)"]
                    + [f"{p['pull_s'] * 1e3:.1f} ms ({mbps / p['pull_s']:.0f} MB/s)"]
                    + [f"**{p['raw_s'] / p['pull_s']:.2f}x**", f"{p['raw_best_s'] / p['pull_best_s']:.2f}x"]
                    + [f"{p['pull_noverify_s'] * 1e3:.1f} ms ({p['raw_s'] / p['pull_noverify_s']:.2f}x)"]
                    + [f"{p['default_s'] * 1e3:.1f} ms", f"{p['pull1_s'] * 1e3:.1f} ms"]
                )
                q = bench_publish(store, subspace, args.publishes)
                per_publish = f"{q['seconds_each'] * 1e3:.1f} ms"
                rows_pub.append([label, f"{q['per_s']:.1f} versions/s", f"{q['MBps']:.0f} MB/s", per_publish])
                b = bench_bytes_per_task(SubspaceStore(client, f"bench{i}-grow"), shape)
                rows_bytes.append(
                    [shape.name, _mb(b["bases"]), _mb(b["per_task"]), _mb(b["redis_memory_per_task"]), _mb(b["lora"])]
                    + [f"{b['lora'] / b['per_task']:.0f}x"]
                )
                print(f"done: {shape.name}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    big = shapes(args.minilm_tasks, args.big_tasks)[1]
    v = bench_validate(big, args.validate_tasks, args.validate_reps)
    lines += [
        "Pull of a whole version (`SubspaceStore.get`: manifest read and checked, payload GETs, sha256 of every "
        "payload, decode into torch tensors) vs "
        "a raw redis-py GET of the same payload keys with the same client (faster of one-by-one and one "
        "pipeline; no checks, no decode). Median of "
        f"{args.reps} interleaved runs; ratio = raw time / pull time (target >= 0.8x), from the medians and "
        "from the fastest runs. Also: the pull without "
        "sha256 (`verify=False`), a raw GET with redis-py's default client (64 KiB socket reads; the store's "
        "`connect()` uses 1 MiB), and a pull of one task (bases + that task).",
        "",
        _table(
            ["shape", "payload", "raw GET", "pull", "ratio", "ratio (fastest)", "pull, verify=False"]
            + ["raw GET, default client", "pull one task"],
            rows_pull,
        ),
        "",
        "Where a pull's time goes (medians of the same interleaved runs, each part alone): reading and checking "
        "the manifest (`SubspaceStore.manifest`), sha256 of every payload, decoding every payload from bytes "
        "in memory (`decode_basis`/`decode_task`); against the raw GET and the whole pull.",
        "",
        _table(["shape", "manifest", "sha256", "decode", "raw GET", "pull"], rows_parts),
        "",
        f"At the MiniLM shape the work beyond the transfer, each part alone, takes "
        f"{(small['sha256_s'] + small['decode_s'] + small['manifest_s']) / small['raw_s']:.2f}x the raw GET's time "
        f"(sha256 {small['sha256_s'] / small['raw_s']:.2f}x, decode {small['decode_s'] / small['raw_s']:.2f}x, "
        f"manifest {small['manifest_s'] / small['raw_s']:.2f}x); a pull at 0.8x would leave it 0.25x.",
        "",
        f"Publish throughput (full version each time: payloads + manifest + CAS head; {args.publishes} publishes):",
        "",
        _table(["shape", "versions/s", "payload MB/s", "per publish"], rows_pub),
        "",
        "Bytes stored per added task (a version grown from 1 to 3 tasks; Redis MEMORY USAGE of a task's key; "
        "vs one fp32 LoRA adapter of rank p on the same modules):",
        "",
        _table(
            ["shape", "bases per version", "added per task", "Redis memory per task", "LoRA adapter", "LoRA / task"],
            rows_bytes,
        ),
        "",
        f"`Subspace.validate()` (every publish runs it) on {big.name} with T={args.validate_tasks} tasks "
        f"({v['tensors']} bases and coefficients; median of {args.validate_reps}): "
        f"**{v['validate'] * 1e3:.0f} ms**, whole check (shapes, names, finiteness as sums of same-shaped batches); "
        f"one `isfinite` per tensor, as before, takes {v['per_tensor'] * 1e3:.0f} ms for the finiteness alone "
        f"({v['per_tensor'] / v['validate']:.1f}x).",
    ]
    return "\n".join(lines)


def redis_version() -> str:
    import subprocess

    from subspace_store.embedded import find_redis_server

    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-tasks", type=int, default=20)
    parser.add_argument("--big-tasks", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--publishes", type=int, default=5)
    parser.add_argument("--validate-tasks", type=int, default=1000, help="tasks of the 7B shape for validate()")
    parser.add_argument("--validate-reps", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the ## Store section of RESULTS.md")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    body = run(args)
    load = f"1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end, on {os.cpu_count()} CPUs"
    body = f"{load} (the machine is shared; wall times move with it).\n\n{body}"
    print(body)
    if args.write:
        machine = f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
        write_section(HEADING, command_line("store", argv), body, f"{machine}; redis-server {redis_version()}")
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
