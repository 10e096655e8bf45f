"""Merge benchmark: latency and memory of one merge into T tasks; --compress and --scaling modes.

Default: merging ONE new adapter into a T-task subspace against explicit baselines. ``--compress``:
compressing many adapters at once against the other public implementations (lorashare, vlora-dev).
``--scaling``: ``share.merge`` alone as T grows.

    python -m benchmarks.merge [--quick] [--tasks T ...] [--budget S] [--skip-above S] [--threads N] [--write]
    python -m benchmarks.merge --compress [--quick] [--repeats N] [--write]
    python -m benchmarks.merge --scaling [--tasks T ...] [--repeats N] [--write]

Methods, all on the same synthetic state (random orthonormal bases, random coefficients, one random
new adapter) and the same new adapter:

- ``share``: ``share.merge`` (project, QR the residual, eigendecompose the small Gram matrix,
  rotate; every old task re-projected, every task's error computed). Always run on ALL modules.
- ``stack-svd``: form the ``n x (T+1)p`` stack of reconstructions ``[U E_1 ... U E_T, X_new]`` per
  side, full (thin) SVD, top-k, re-project every task.
- ``cov-eigh``: the official code's approach: form the same stack, its ``n x n`` covariance
  ``S S^T``, ``eigh``, top-k, re-project every task (no mean-centering, which only adds work).

The baselines run in float32 (their fastest; ``share`` computes in float64 and stores float32). Each
(model, T, method) runs in its own subprocess with ONE torch thread by default: on a machine whose
two cores are shared, multi-threaded BLAS/LAPACK calls stall on busy cores (a 384 x 384 ``eigh`` took
3 s with two threads and 0.02 s with one). ``share`` is timed on ALL modules (median of 3 runs
unless a run takes over 5 s). A baseline runs module after module (each module is a repeat; the
table shows the median per module) until the next module would overrun ``--budget`` seconds, so it
may be measured on a subset of modules: the table says how many, compares seconds PER MODULE
(every module has the same shape), and marks all-module times computed from that as extrapolated.
A baseline whose estimated time for one module exceeds ``--skip-above`` is not run; the estimate
comes from the same method's measured time at the previous T scaled by its flop count (``cost``).
Memory is the peak increase of the process's resident set size (sampled every 1 ms from
/proc/self/statm) over its value just before the merge: it covers torch's allocations, which
tracemalloc does not see. The returned coefficients count (every method returns all tasks' new
coefficients); for a baseline it is the peak over single modules, for ``share`` over the whole merge.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.results_md import command_line, markdown_table, write_section

HEADING = "## Merge"
METHODS = ("share", "stack-svd", "cov-eigh")
NOTES = """\
Merging ONE new adapter (r = p = 8, k = 16 for MiniLM; r = p = 16, k = 32 for LLaMA-7B) into a synthetic
T-task state. `share`: `share.merge`, always on all modules. `stack-svd` (a): stack `[U E_1 ... U E_T, X]`
(n x (T+1)p), thin SVD, top-k, re-project all tasks. `cov-eigh` (b, the official code's approach): the same
stack, its n x n covariance, `eigh`. Baselines in float32 (Share computes in float64). A baseline measured
on fewer modules than the model has ran module by module within a time budget; its all-module time is then
extrapolated (marked). Seconds per module: `share` total / modules; baselines the median over measured
modules. Peak RSS increase: sampled every 1 ms over the RSS before the merge (for `share` over the whole
merge, for the baselines the largest single module). One torch thread per run; the two cores are shared
with other users, so absolute times carry noise (runs under heavy load were seen 2-4x slower)."""


@dataclass(frozen=True)
class Shape:
    layers: int
    targets: tuple[str, ...]
    n: int  # out features
    d: int  # in features
    r: int  # rank of the new adapter and pseudo-rank p of every task
    k: int

    def modules(self) -> list[str]:
        return [f"layers.{i}.{t}" for i in range(self.layers) for t in self.targets]


SHAPES = {
    "MiniLM": Shape(layers=6, targets=("query", "value"), n=384, d=384, r=8, k=16),
    "LLaMA-7B": Shape(layers=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), n=4096, d=4096, r=16, k=32),
}


# -- memory ------------------------------------------------------------------------------------------
class PeakRSS:
    """Samples the resident set size in a thread; ``peak - start`` is the increase during the block."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


# -- synthetic state ---------------------------------------------------------------------------------
def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0].contiguous()


def module_state(shape: Shape, tasks: int, seed: int) -> dict[str, torch.Tensor]:
    """One module: bases, every task's coefficients stacked (T x k x p), and the new adapter's factors."""
    g = torch.Generator().manual_seed(seed)
    return {
        "U_A": orthonormal(shape.d, shape.k, g),
        "U_B": orthonormal(shape.n, shape.k, g),
        "E_A": torch.randn(tasks, shape.k, shape.r, generator=g),
        "E_B": torch.randn(tasks, shape.k, shape.r, generator=g),
        "B": torch.randn(shape.n, shape.r, generator=g),
        "A": torch.randn(shape.r, shape.d, generator=g) / shape.d**0.5,
    }


def share_subspace(shape: Shape, tasks: int):
    """The T-task state as a ``share.Subspace`` (coefficients are views into one tensor per module)."""
    from share import KPolicy, LoraAdapter, ModuleBasis, Subspace, TaskCoefficients

    modules, per_task, factors = {}, [dict() for _ in range(tasks)], {}
    for i, m in enumerate(shape.modules()):
        s = module_state(shape, tasks, seed=i)
        modules[m] = ModuleBasis(U_A=s["U_A"], U_B=s["U_B"])
        for t in range(tasks):
            per_task[t][m] = (s["E_A"][t], s["E_B"][t])
        factors[m] = (s["B"], s["A"])
    subspace = Subspace(
        modules=modules,
        tasks={f"t{t}": TaskCoefficients(E=E) for t, E in enumerate(per_task)},
        policy=KPolicy(k=shape.k),
    )
    return subspace, LoraAdapter(factors=factors, scaling={m: 2.0 for m in factors})


# -- the methods -------------------------------------------------------------------------------------
def run_share(shape: Shape, tasks: int) -> dict:
    from share import merge

    subspace, adapter = share_subspace(shape, tasks)
    times, peaks = [], []
    for _ in range(3):
        with PeakRSS() as mem:
            start = time.perf_counter()
            merged, _ = merge(subspace, {"new": adapter})
            times.append(time.perf_counter() - start)
        del merged
        peaks.append(mem.delta_mb)
        if times[-1] > 5:  # one repeat is enough for long runs
            break
    modules = len(shape.modules())
    seconds = statistics.median(times)
    return {"modules": modules, "seconds": seconds, "per_module": seconds / modules, "peak_mb": max(peaks)}


def baseline_module(s: dict[str, torch.Tensor], shape: Shape, method: str) -> list[torch.Tensor]:
    """Merge the new adapter into one module the explicit way; returns every task's new coefficients."""
    from share import canonicalize

    B_c, A_c = canonicalize(s["B"], s["A"], scaling=2.0)
    out = []
    for U, E, X in ((s["U_A"], s["E_A"], A_c.T.float()), (s["U_B"], s["E_B"], B_c.float())):
        tasks, k, p = E.shape
        stack = torch.cat([U @ E.permute(1, 0, 2).reshape(k, tasks * p), X], dim=1)  # n x (T+1)p
        if method == "stack-svd":
            basis = torch.linalg.svd(stack, full_matrices=False)[0][:, : shape.k]
        else:
            eigvals, eigvecs = torch.linalg.eigh(stack @ stack.T)  # n x n covariance
            basis = eigvecs[:, torch.argsort(eigvals, descending=True)[: shape.k]]
        del stack
        rotation = basis.T @ U  # every old task: E' = U'^T U E
        out.append(torch.einsum("ij,tjp->tip", rotation, E))
        out.append(basis.T @ X)
    return out


def run_baseline(shape: Shape, tasks: int, method: str, budget: float) -> dict:
    modules = shape.modules()
    times, peaks = [], []
    for i, _ in enumerate(modules):
        state = module_state(shape, tasks, seed=i)
        with PeakRSS() as mem:
            start = time.perf_counter()
            result = baseline_module(state, shape, method)
            times.append(time.perf_counter() - start)
        del result, state
        peaks.append(mem.delta_mb)
        mean = sum(times) / len(times)
        if sum(times) + mean > budget:
            break
    # Every module has the same shape, so each is a repeat: the median resists interference.
    per_module = statistics.median(times)
    return {"modules": len(times), "seconds": sum(times), "per_module": per_module, "peak_mb": max(peaks)}


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    if args.layers:
        shape = Shape(args.layers, shape.targets, shape.n, shape.d, shape.r, shape.k)
    if args.method == "share":
        result = run_share(shape, args.tasks)
    else:
        result = run_baseline(shape, args.tasks, args.method, args.budget)
    print(json.dumps(result))


# -- driver ------------------------------------------------------------------------------------------
def cost(shape: Shape, tasks: int, method: str) -> float:
    """Dominant flop count of one module (both sides) for the baselines' cost model."""
    n, w = shape.n, (tasks + 1) * shape.r
    if method == "stack-svd":
        return 2 * min(n, w) ** 2 * max(n, w)
    return 2 * (n * n * w + n**3)


def run_config(model: str, tasks: int, method: str, args: argparse.Namespace, layers: int | None) -> dict:
    command = [sys.executable, "-m", "benchmarks.merge", "--worker", model, str(tasks), method]
    command += ["--budget", str(args.budget), "--threads", str(args.threads)]
    if layers:
        command += ["--layers", str(layers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{model} T={tasks} {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> str:
    rows = []
    for model, shape in SHAPES.items():
        layers = 2 if (args.quick and model == "LLaMA-7B") else None
        total_modules = (layers or shape.layers) * len(shape.targets)
        rate: dict[str, float] = {}  # seconds per flop, from this method's previous T
        for tasks in args.tasks:
            results = {}
            for method in METHODS:
                if method != "share" and method in rate:
                    estimate = rate[method] * cost(shape, tasks, method)
                    if estimate > args.skip_above:
                        results[method] = {"skipped": estimate}
                        print(f"{model} T={tasks} {method}: skipped, ~{estimate:.0f} s per module", file=sys.stderr)
                        continue
                results[method] = run_config(model, tasks, method, args, layers)
                if method != "share":
                    rate[method] = results[method]["per_module"] / cost(shape, tasks, method)
                print(f"{model} T={tasks} {method}: {results[method]}", file=sys.stderr)
            rows.append((model, tasks, total_modules, results))
    return table(rows, args.skip_above) + "\n\n" + NOTES


def table(rows: list, skip_above: float) -> str:
    columns = [("model", "l"), ("T", "r"), ("method", "l"), ("modules measured", "r"), ("seconds / module", "r")]
    columns += [("all modules, seconds", "r"), ("peak RSS increase", "r"), ("Share faster (per module)", "r")]
    lines = []
    for model, tasks, total, results in rows:
        share = results["share"]["per_module"]
        for method, r in results.items():
            if "skipped" in r:
                estimate = f"skipped: estimated ~{r['skipped']:,.0f} s (> {skip_above:.0f} s)"
                whole = f"~{r['skipped'] * total:,.0f} (extrapolated)"
                ratio = f"~{r['skipped'] / share:,.0f}x (estimated)"
                lines.append([model, tasks, method, f"0 / {total}", estimate, whole, "", ratio])
                continue
            ratio = "1x" if method == "share" else f"{r['per_module'] / share:,.0f}x"
            if r["modules"] == total:
                whole = f"{r['seconds']:,.2f} (measured)"
            else:
                whole = f"~{r['per_module'] * total:,.0f} (extrapolated)"
            lines.append(
                [model, tasks, method, f"{r['modules']} / {total}", f"{r['per_module'] * 1e3:,.1f} ms", whole]
                + [f"{r['peak_mb']:,.0f} MB", ratio]
            )
    return markdown_table(columns, lines)


# -- compress: many adapters at once, side by side with lorashare and vlora-dev ---------------------------
COMPRESS_HEADING = "## Merge: compressing many adapters at once"
COMPRESS_CONFIGS = ((384, 50), (384, 200), (4096, 50), (4096, 200))  # (n = d, adapters)
COMPRESS_RANK = 8
COMPRESS_K = 32
COMPRESS_METHODS = ("sharecl", "sharecl-default", "lorashare", "vlora-dev")
COMPRESS_NOTES = f"""\
Compressing T random adapters (one {{n}} x {{n}} module, r = {COMPRESS_RANK}, factors N(0, 1/n)) into one shared
subspace, all methods on the same adapters in the same process, repeats interleaved (method after method) so
that load on the shared machine hits them alike; the table gives the median (at n = 4096 lorashare, about a
minute a run, runs once without warm-up). `sharecl`: `share.merge(None,
adapters, KPolicy(k={COMPRESS_K}))` (what `sharecl compress --k {COMPRESS_K}` runs after reading the files:
canonical gauge, exact top-k of the stacked factors in float64, every task's coefficients and exact error).
`sharecl-default`: the same with `sharecl compress`'s default rule (`max_error` 0.05, `k_max` 32).
`lorashare`: `compute_shared_components` + `compute_adapter_loadings` (num_components={COMPRESS_K}; its
`compress` minus file reading: float32 covariance n x n and `eigh`). `vlora-dev`:
`SharedSubspace.from_adapters(num_components={COMPRESS_K})` (float32 SVD of the T x (r n) matrix of flattened
factors; a different, coarser model: one vector per adapter and side). A method whose package is not
installed is skipped and named (they are not project dependencies: `pip install --no-deps lorashare
vlora-dev`). One torch thread."""


def compress_adapters(n: int, tasks: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    r = COMPRESS_RANK
    return [(torch.randn(n, r, generator=g) / n**0.5, torch.randn(r, n, generator=g) / n**0.5) for _ in range(tasks)]


def compress_runner(method: str, factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """A no-argument callable that compresses ``factors`` with ``method``, or None if its package is absent."""
    if method.startswith("sharecl"):
        from share import KPolicy, LoraAdapter, merge

        policy = KPolicy(k=COMPRESS_K) if method == "sharecl" else KPolicy(max_error=0.05, k_max=32)
        adapters = {f"t{i}": LoraAdapter(factors={"m": f}, scaling={"m": 1.0}) for i, f in enumerate(factors)}
        return lambda: merge(None, adapters, policy)
    if method == "lorashare":
        try:
            from lorashare.compression import (
                combine_adapter_weights,
                compute_adapter_loadings,
                compute_shared_components,
            )
        except ImportError:
            return None
        weights = {
            f"t{i}": {"base_model.model.m.lora_A.weight": A, "base_model.model.m.lora_B.weight": B}
            for i, (B, A) in enumerate(factors)
        }

        def run_lorashare():
            components, _, _ = compute_shared_components(
                combine_adapter_weights(weights), num_components=COMPRESS_K, device="cpu"
            )
            return {name: compute_adapter_loadings(components, w) for name, w in weights.items()}

        return run_lorashare
    try:
        from vlora import LoRAWeights, SharedSubspace
    except ImportError:
        return None
    loras = [LoRAWeights(layer_names=["m"], lora_a={"m": A}, lora_b={"m": B}, rank=A.shape[0]) for B, A in factors]
    return lambda: SharedSubspace.from_adapters(loras, num_components=COMPRESS_K)


# At n = 4096 lorashare's n x n eigh takes about a minute: it runs once, without a warm-up.
COMPRESS_ONCE_ABOVE = 1024


def compress_worker(n: int, tasks: int, repeats: int, threads: int) -> dict:
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    factors = compress_adapters(n, tasks)
    runners = {method: compress_runner(method, factors) for method in COMPRESS_METHODS}
    times: dict[str, list[float]] = {method: [] for method, run in runners.items() if run is not None}
    once = {"lorashare"} if n > COMPRESS_ONCE_ABOVE else set()
    for method in set(times) - once:  # warm-up: imports and first-call allocations stay out of the figures
        runners[method]()
    for repeat in range(repeats):
        for method in times:
            if method in once and repeat > 0:
                continue
            start = time.perf_counter()
            runners[method]()
            times[method].append(time.perf_counter() - start)
    return {
        "seconds": {method: statistics.median(values) for method, values in times.items()},
        "repeats": repeats,
        "once": sorted(once),
        "missing": [method for method, run in runners.items() if run is None],
    }


def run_compress(args: argparse.Namespace) -> str:
    rows = []
    for n, tasks in COMPRESS_CONFIGS:
        if args.quick and n > 384:
            continue
        repeats = args.repeats if n <= 384 else max(1, args.repeats // 3)
        command = [sys.executable, "-m", "benchmarks.merge", "--compress-worker", str(n), str(tasks)]
        command += ["--repeats", str(repeats), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"compress n={n} T={tasks} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"compress n={n} T={tasks}: {result}", file=sys.stderr)
        rows.append((n, tasks, result))
    return compress_table(rows) + "\n\n" + COMPRESS_NOTES.replace("{n}", "n")


def compress_table(rows: list) -> str:
    columns = [("n = d", "r"), ("adapters", "r"), ("repeats", "r")]
    columns += [(f"{m} (s)", "r") for m in COMPRESS_METHODS] + [("sharecl vs the fastest other", "r")]
    lines = []
    missing: set[str] = set()
    for n, tasks, result in rows:
        seconds = result["seconds"]
        missing.update(result["missing"])
        cells = [f"{seconds[m]:.3f}" if m in seconds else "not installed" for m in COMPRESS_METHODS]
        others = [seconds[m] for m in ("lorashare", "vlora-dev") if m in seconds]
        ratio = "no other method installed"
        if others:
            factor = min(others) / seconds["sharecl"]
            ratio = f"{factor:.2f}x faster" if factor >= 1 else f"{1 / factor:.2f}x slower"
        repeats = f"{result['repeats']}" + (f" ({', '.join(result['once'])}: 1)" if result.get("once") else "")
        lines.append([n, tasks, repeats, *cells, ratio])
    text = markdown_table(columns, lines)
    if missing:
        text += f"\n\nSkipped (package not installed): {', '.join(sorted(missing))}."
    return text


# -- scaling: one merge into T tasks, share only ------------------------------------------------------------
SCALING_HEADING = "## Merge: one merge as the number of tasks grows"
SCALING_NOTES = """\
`share.merge` of ONE new adapter into a synthetic T-task state (MiniLM shapes: 12 modules 384 x 384, r = p = 8,
k = 16; the state of the `## Merge` table), under `KPolicy(k=16)` and under the default rule with the job's cap
(`max_error` 0.05, `k_max` 32). Median of the repeats, each T in its own process, one torch thread."""


def scaling_worker(tasks: int, repeats: int, threads: int) -> dict:
    from share import KPolicy, merge

    torch.set_num_threads(threads)
    subspace, adapter = share_subspace(SHAPES["MiniLM"], tasks)
    out = {}
    for label, policy in (("k=16", None), ("max_error=0.05, k_max=32", KPolicy(max_error=0.05, k_max=32))):
        merge(subspace, {"new": adapter}, policy)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            merge(subspace, {"new": adapter}, policy)
            times.append(time.perf_counter() - start)
        out[label] = statistics.median(times)
    return out


def run_scaling(args: argparse.Namespace) -> str:
    lines = []
    for tasks in args.tasks:
        command = [sys.executable, "-m", "benchmarks.merge", "--scaling-worker", str(tasks)]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"scaling T={tasks} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"scaling T={tasks}: {result}", file=sys.stderr)
        lines.append([tasks, *(f"{seconds:.3f}" for seconds in result.values())])
    columns = [("T", "r"), ("k=16 (s)", "r"), ("max_error=0.05, k_max=32 (s)", "r")]
    return markdown_table(columns, lines) + "\n\n" + SCALING_NOTES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 10, 100; 2 LLaMA-7B layers; small budgets")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="numbers of tasks T (10 100 1000)")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds a baseline may spend on more modules after the first (30)"
    )
    parser.add_argument(
        "--skip-above",
        type=float,
        default=None,
        help="skip a baseline whose estimated seconds per module exceed this (240)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: stable timings on a shared machine)"
    )
    parser.add_argument("--write", action="store_true", help="replace the ## Merge section of RESULTS.md")
    parser.add_argument(
        "--compress", action="store_true", help="compress many adapters at once: sharecl vs lorashare vs vlora-dev"
    )
    parser.add_argument(
        "--repeats", type=int, default=9, help="repeats per method (--compress: a third at n=4096, lorashare once)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "T", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--compress-worker", nargs=2, type=int, metavar=("N", "T"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--scaling", action="store_true", help="share.merge only, MiniLM shapes, for each --tasks T (one merge)"
    )
    parser.add_argument("--scaling-worker", type=int, metavar="T", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compress_worker:
        print(json.dumps(compress_worker(*args.compress_worker, args.repeats, args.threads)))
        return 0
    if args.scaling_worker:
        print(json.dumps(scaling_worker(args.scaling_worker, args.repeats, args.threads)))
        return 0
    if args.scaling or args.compress:
        if args.scaling:
            args.tasks = args.tasks or [10, 100, 1000]
        body = run_scaling(args) if args.scaling else run_compress(args)
        print(body)
        if args.write:
            machine = f"{os.cpu_count()} CPUs shared with other users, {args.threads} torch thread(s)"
            heading = SCALING_HEADING if args.scaling else COMPRESS_HEADING
            write_section(heading, command_line("merge", argv), body, machine)
        return 0
    if args.worker:
        args.model, tasks, args.method = args.worker
        args.tasks = int(tasks)
        worker(args)
        return 0
    args.tasks = args.tasks or ([10, 100] if args.quick else [10, 100, 1000])
    args.budget = args.budget if args.budget is not None else (10.0 if args.quick else 30.0)
    args.skip_above = args.skip_above if args.skip_above is not None else (20.0 if args.quick else 240.0)
    body = run(args)
    print(body)
    if args.write:
        machine = f"{os.cpu_count()} CPUs shared with other users, {args.threads} torch thread(s)"
        write_section(HEADING, command_line("merge", argv), body, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
