"""T-scaling of a version: full format vs delta versions, side by side in one run (issue 14, item 4).

    python -m benchmarks.coordinator --scaling [--tasks 10 100 1000 10000] [--shapes minilm llama7b] [--write]

For each shape and T, a synthetic head of T tasks (random orthonormal bases, random coefficients with
p=8, a 4x16 head each) is published as v1 in two namespaces of one real redis-server (append-only,
fsync every second). Then ``--merges`` times: one new random rank-8 LoRA adapter is merged into the head
(``share.merge``, KPolicy(k=32): k stays 32, so every merge rotates every old task) and the result is
published in both formats, full (every task's payload written again) and delta (bases, the merge's
rotations, the new task; ``publish(delta=True, rotations=report.rotations)``). Measured per version:
merge seconds (the same merge for both), publish seconds, bytes written (payloads + manifest), Redis
memory of the keys the version wrote (``MEMORY USAGE`` of its manifest, bases, rotations and new payloads), the
latency of pulling one old task of the head (``get(head, tasks=[t])``; delta: with a cold and a warm
rotation cache, the task read through ``--merges`` rotations), and the error floor (``error_floor``).
Shapes: MiniLM (6 layers x query,value, 384 x 384) and LLaMA-7B (32 layers x q_proj,v_proj, 4096 x 4096).
``--write`` replaces the ``## Versions as deltas (T scaling)`` section of benchmarks/RESULTS.md.
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

from benchmarks.results_md import markdown_table, write_section
from share import KPolicy, LoraAdapter, ModuleBasis, Subspace, TaskCoefficients, merge
from subspace_store import SubspaceStore, chains, manifest_cache
from subspace_store.codec import read_manifest
from subspace_store.embedded import start_redis

HEADING = "## Versions as deltas (T scaling)"
K, P = 32, 8
POLICY = KPolicy(k=K)
SHAPES = {
    "minilm": ([f"encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")], 384, 384),
    "llama7b": ([f"model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("q_proj", "v_proj")], 4096, 4096),
}


def synthetic_head(shape: str, tasks: int) -> Subspace:
    modules, n, d = SHAPES[shape]
    g = torch.Generator().manual_seed(tasks)
    bases = {
        m: ModuleBasis(
            U_A=torch.linalg.qr(torch.randn(d, K, generator=g))[0],
            U_B=torch.linalg.qr(torch.randn(n, K, generator=g))[0],
        )
        for m in modules
    }
    entries = {}
    for t in range(tasks):
        E = {m: (torch.randn(K, P, generator=g), torch.randn(K, P, generator=g) * 0.01) for m in modules}
        entries[f"t{t:05d}"] = TaskCoefficients(E=E, head={"head.weight": torch.randn(4, 16, generator=g)})
    return Subspace(modules=bases, tasks=entries, policy=POLICY)


def adapter(shape: str, seed: int) -> LoraAdapter:
    modules, n, d = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(n, P, generator=g) * 0.01, torch.randn(P, d, generator=g)) for m in modules}
    return LoraAdapter(factors, head={"head.weight": torch.randn(4, 16, generator=g)})


@dataclass
class Row:
    shape: str
    tasks: int
    fmt: str
    merge_s: float
    publish_s: float
    written_mb: float
    redis_mb: float
    manifest_mb: float
    pull_ms: float
    pull_warm_ms: float | None
    floor_s: float  # the least arithmetic exact per-task errors need per merge at this T (``error_floor``)


def _version_bytes(client, store: SubspaceStore, version: str, raw: bytes) -> tuple[int, int]:
    """(bytes written, Redis memory) of ``version`` from its stored manifest ``raw``: the payloads it wrote plus the
    manifest, and ``MEMORY USAGE`` (exact per key) of its manifest, bases, rotations, the task payloads written in
    it and (format 4) its entries and numbers payloads. Not ``used_memory`` before and after: that also moves with
    client and replication buffers freed meanwhile (it went negative after a 200 MB full version)."""
    checked = read_manifest(raw, store.keys, version)
    named = checked.payload_keys()  # format 4: its entries and numbers too
    keys = [store.keys.manifest(version)] + [k for k in named if store.keys.owned_by(version, k)]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return checked.top.get("written_bytes", 0) + len(raw), sum(int(n or 0) for n in pipe.execute())


def _quiet(client, timeout_s: float = 300.0) -> None:
    """Wait until Redis runs no background rewrite or save. Appending a full version of hundreds of MB makes it
    rewrite its append-only file in a forked child; while that runs, this process's page faults (a merge at
    T=10000 allocates hundreds of MB) cost several times as much, and the merge's seconds would measure that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("rdb_bgsave_in_progress"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"Redis still rewriting its files after {timeout_s:.0f} s")


def _pull_ms(store: SubspaceStore, task: str, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        store.get("head", tasks=[task])
        best = min(best, time.perf_counter() - start)
    return best * 1000


def error_floor(head: Subspace, dropped: int = P, reps: int = 3) -> float:
    """Seconds of the least arithmetic the merge's exact per-task errors (``share.merge``'s split of kept and dropped
    coordinates) need when it drops ``dropped`` directions per side: every old task's dropped coordinates
    ``V_drop.T E_i`` (``dropped x k`` by ``k x p``, float32, one batched product per module and side). Here a merge
    adds one rank-``P`` adapter to a head at ``k = K`` and keeps ``K``: it drops ``P`` per side. The stacks are
    random ones of the head's shapes and dtype (a product's cost does not depend on the values). A lower bound of
    that form: its errors also need these coordinates' Gram matrices and the kept part, and the merge also writes
    the rotated coefficients. The best of ``reps``."""
    g = torch.Generator().manual_seed(0)
    count = len(head.tasks)
    stacks = [torch.randn(count, k, P, generator=g) for basis in head.modules.values() for k in (basis.k_A, basis.k_B)]
    drops = [torch.randn(dropped, S.shape[1], generator=g) for S in stacks]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for V, S in zip(drops, stacks, strict=True):
            V @ S
        best = min(best, time.perf_counter() - start)
    return best


def measure(client, shape: str, tasks: int, merges: int) -> list[Row]:
    # One untimed merge first: the synthetic head's tasks are stacked once, as the coordinator's were when its
    # head was first merged; every timed merge then follows a merge, as in a running coordinator.
    head, _ = merge(synthetic_head(shape, tasks), {"warmup": adapter(shape, 99_999)}, POLICY)
    stores = {fmt: SubspaceStore(client, f"scale-{shape}-{tasks}-{fmt}") for fmt in ("full", "delta")}
    parents = {fmt: store.publish(head, None) for fmt, store in stores.items()}
    stats: dict[str, dict[str, list[float]]] = {fmt: {} for fmt in stores}
    merge_s = []
    for j in range(merges):
        _quiet(client)
        start = time.perf_counter()
        head, report = merge(head, {f"new{j:02d}": adapter(shape, 100_000 + j)}, POLICY)
        merge_s.append(time.perf_counter() - start)
        for fmt, store in stores.items():
            _quiet(client)
            start = time.perf_counter()
            parents[fmt] = store.publish(
                head, parents[fmt], delta=fmt == "delta", rotations=report.rotations if fmt == "delta" else None
            )
            seconds = time.perf_counter() - start
            raw = client.get(store.keys.manifest(parents[fmt]))
            written, memory = _version_bytes(client, store, parents[fmt], raw)
            row = stats[fmt]
            row.setdefault("publish_s", []).append(seconds)
            row.setdefault("written", []).append(written)
            row.setdefault("redis", []).append(memory)
            row.setdefault("manifest", []).append(len(raw))
    floor = error_floor(head)
    out = []
    old_task = "t00000"
    for fmt, store in stores.items():
        chains.clear_caches()
        manifest_cache.clear()  # cold: neither the rotations' product nor the checked manifest is cached
        cold = _pull_ms(store, old_task, reps=1)
        warm = _pull_ms(store, old_task) if fmt == "delta" else None
        row = stats[fmt]
        out.append(
            Row(
                shape,
                tasks,
                fmt,
                statistics.mean(merge_s),
                statistics.mean(row["publish_s"]),
                statistics.mean(row["written"]) / 1e6,
                statistics.mean(row["redis"]) / 1e6,
                statistics.mean(row["manifest"]) / 1e6,
                cold,
                warm,
                floor,
            )
        )
    client.flushdb()
    return out


def table(rows: list[Row]) -> str:
    columns = [("shape", "l"), ("T", "r"), ("format", "l"), ("merge s", "r"), ("publish s", "r")]
    columns += [("merge + publish s", "r"), ("written MB / version", "r"), ("Redis MB / version", "r")]
    columns += [("manifest MB", "r"), ("pull one old task ms (cold)", "r"), ("(warm)", "r"), ("error floor ms", "r")]
    return markdown_table(
        columns,
        (
            [r.shape, r.tasks, r.fmt, f"{r.merge_s:.3f}", f"{r.publish_s:.3f}", f"{r.merge_s + r.publish_s:.3f}"]
            + [f"{r.written_mb:.2f}", f"{r.redis_mb:.2f}", f"{r.manifest_mb:.3f}", f"{r.pull_ms:.1f}"]
            + [f"{r.pull_warm_ms:.1f}" if r.pull_warm_ms is not None else "-", f"{r.floor_s * 1000:.1f}"]
            for r in rows
        ),
    )


def ratios(rows: list[Row]) -> str:
    """Per shape and format: the largest T's merge + publish and Redis bytes per version over the smallest T's."""
    parts = []
    for shape in dict.fromkeys(r.shape for r in rows):
        for fmt in ("full", "delta"):
            mine = sorted((r for r in rows if r.shape == shape and r.fmt == fmt), key=lambda r: r.tasks)
            if len(mine) < 2:
                continue
            lo, hi = mine[0], mine[-1]
            cost = (hi.merge_s + hi.publish_s) / (lo.merge_s + lo.publish_s)
            publish = hi.publish_s / lo.publish_s
            memory = hi.redis_mb / lo.redis_mb if lo.redis_mb > 0 else float("nan")
            parts.append(
                f"{shape} {fmt}, T={hi.tasks} over T={lo.tasks}: merge + publish {cost:.1f}x (publish alone "
                f"{publish:.1f}x), Redis bytes per version {memory:.1f}x"
            )
            if fmt == "delta":
                floor = (lo.merge_s + lo.publish_s + hi.floor_s) / (lo.merge_s + lo.publish_s)
                parts.append(
                    f"{shape} delta, floor at T={hi.tasks}: the dropped coordinates alone of every old task (error "
                    f"floor {hi.floor_s:.3f} s) on top of T={lo.tasks}'s merge + publish make {floor:.1f}x T={lo.tasks}"
                )
    same = {(r.shape, r.tasks): r for r in rows if r.fmt == "full"}
    for r in rows:
        if (
            r.fmt == "delta"
            and (r.shape, r.tasks) in same
            and r.tasks == max(x.tasks for x in rows if x.shape == r.shape)
        ):
            f = same[(r.shape, r.tasks)]
            parts.append(
                f"{r.shape} T={r.tasks}, delta over full: publish {f.publish_s / r.publish_s:.1f}x faster, "
                f"{f.redis_mb / r.redis_mb:.0f}x less Redis memory per version"
            )
    return "\n".join(f"- {p}" for p in parts)


def main(argv: list[str], command: str) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", action="store_true", help="(selects this benchmark in benchmarks.coordinator)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[10, 100, 1000, 10000], help="T values")
    parser.add_argument("--shapes", nargs="+", default=["minilm", "llama7b"], choices=sorted(SHAPES))
    parser.add_argument("--max-7b-tasks", type=int, default=1000, help="largest T for llama7b (memory of one box)")
    parser.add_argument("--merges", type=int, default=3, help="merges (versions) measured per T and format")
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING} section of RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        server = start_redis(Path(folder) / "redis")
        try:
            client = server.client()
            for shape in args.shapes:
                for tasks in args.tasks:
                    if shape == "llama7b" and tasks > args.max_7b_tasks:
                        print(f"skipping llama7b T={tasks} (--max-7b-tasks {args.max_7b_tasks})", file=sys.stderr)
                        continue
                    got = measure(client, shape, tasks, args.merges)
                    rows += got
                    for r in got:
                        print(
                            f"{shape:8s} T={tasks:6d} {r.fmt:5s}: merge {r.merge_s:.3f}s publish {r.publish_s:.3f}s "
                            f"written {r.written_mb:.2f}MB redis {r.redis_mb:.2f}MB pull {r.pull_ms:.1f}ms",
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            server.stop()
    body = table(rows) + "\n\n" + ratios(rows)
    print(body)
    if args.write:
        machine = f"1 torch thread, Python {platform.python_version()}, {args.merges} merges per T and format"
        write_section(HEADING, command, body + "\n\n" + NOTES, machine)


NOTES = (
    "Bases, k=32 and p=8 are the same in both formats; only what a version writes differs. The merge is "
    "``share.merge`` as it is at this commit (the same call for both formats, timed once; an untimed merge into "
    "the synthetic head comes first, so every timed merge reads the stacks the previous merge left, as in a "
    "running coordinator). Each merge and publish starts when Redis runs no background rewrite of its "
    "append-only file (which the full format's hundreds of MB trigger, and which slows this process's page faults "
    "several times over). Written MB and Redis MB include the manifest and, from T=1000 on (a store's "
    "``shared_entries_from``, 256 tasks, for the first full version), manifest format 4's entries parts and numbers "
    "payload: at T=10 and 100 both formats write format-3 manifests (every task's entry in every manifest).\n\n"
    "The issue's target (at T=10000 a merge + publish at most 2x its T=10 cost, Redis bytes per version "
    "independent of T) is missed on time and, by a per-task remainder, on bytes. (1) Bytes: in format 4 a delta "
    "version writes per old task one row of float64 numbers, (5 + modules) x 8 bytes (136 at MiniLM's 12 "
    "modules: the bounds a merge changes), and its name and entries position in the manifest (the manifest MB "
    "column); every old task's entry stays in the entries part of the version that wrote its payload. The numbers "
    "are O(T) because every merge that drops directions changes every task's bounds. (2) Time: the merge still "
    "rotates every old task and computes its exact error in every module when directions are dropped (every merge "
    "here: KPolicy(k=32) at k=32), batched in cache-sized chunks straight from the stored float32 stacks, and "
    "builds every task's metadata dictionaries; a delta publish still does some Python per task (the delta plan's "
    "checks, the numbers row, the cached manifest's entry). The error floor column is the least arithmetic the "
    "merge's exact per-task errors need when it drops directions (which the issue allows the merge to spend): every "
    "old task's coordinates along the dropped directions, one batched float32 product per module and side over "
    "stacks of the head's shapes (``error_floor``); the ratio line puts it on top of the smallest T's delta merge + "
    "publish. It is a lower bound of that form, not a method: its errors also need those coordinates' Gram matrices "
    "and the kept part. "
    "Pull latency of one old task (cold: the process has "
    "seen neither the rotations nor the manifest; warm: the rotations' product and the checked manifest cached, its "
    "bytes still fetched and compared): in format 4 a cold one-task pull fetches the manifest, the one entries part "
    "(512 tasks) that holds the task and the numbers, not every task's entry. For LLaMA-7B shapes the bases "
    "(most of what a version writes at T=10, the same in both formats) dominate a version until T is in the "
    "thousands. The machine is "
    "shared (2 cores), so seconds vary by tens of percent between runs; bytes do not."
)
