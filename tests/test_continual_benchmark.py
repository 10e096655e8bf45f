"""The continual benchmark: every method end to end on a tiny task folder (real MiniLM, real writer),
resuming, the stored-result rules, and the metrics and targets on hand-made numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import continual
from benchmarks.continual_config import METHODS, sweep_methods
from benchmarks.continual_data import read_manifest, select
from benchmarks.continual_report import targets
from benchmarks.continual_store import MethodResult, ResultStore
from jobs.datasets.taskset import write_manifest, write_task
from share.errors import ShareClError

NAN = float("nan")
WORDS = {
    "animal": ["dog", "cat", "horse", "cow", "goat"],
    "plant": ["oak", "rose", "fern", "moss", "pine"],
    "tool": ["hammer", "saw", "drill", "wrench", "file"],
    "colour": ["red", "blue", "green", "black", "white"],
}
LABELS = {"two": ["animal", "plant"], "three": ["animal", "tool", "colour"], "four": list(WORDS)}


def _write_tiny_tasks(folder: Path) -> None:
    """Three tasks of 2, 3 and 4 labels, written by jobs.datasets' own writer (splits + tasks.json)."""
    written = []
    for t, (name, labels) in enumerate(LABELS.items()):

        def rows(n: int, offset: int, labels=labels) -> list[tuple[str, int]]:
            return [
                (f"{WORDS[labels[i % len(labels)]][(i + offset) % 5]} ; thing {i}", i % len(labels)) for i in range(n)
            ]

        written.append(write_task(folder, name, labels, rows(16, t), rows(8, t + 2)))
    write_manifest(folder, "test words", {}, written)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    _write_tiny_tasks(root / "data")
    return root


def _argv(root: Path, *extra: str) -> list[str]:
    return [
        "--data", str(root / "data"), "--out", str(root / "results"), "--cache", str(root / "cache"),
        "--seeds", "0", "--steps", "2", "--batch-size", "8", "--max-length", "16", "--threads", "1", *extra,
    ]  # fmt: skip


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*-seed*.json")}


def test_every_method_end_to_end_then_resume_skips_finished_pairs(tiny, capsys):
    before, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    try:
        assert continual.main(_argv(tiny)) == 0
        first = capsys.readouterr()
        out, run_dir = tiny / "results", tiny / "results" / "continual-data-full"
        results = {r["method"]: r for r in json.loads((out / "continual-data-full.json").read_text())}
        assert sorted(results) == sorted(METHODS)
        for name, r in results.items():
            R = r["R"]
            assert len(R) == 3 and all(len(row) == 3 for row in R)
            assert r["acc"] == pytest.approx(sum(R[2]) / 3)
            assert all(0.0 <= v <= 1.0 for v in R[2])
            assert r["stored_bytes"] > 0 and len(r["trained_params_per_task"]) == 3
            assert r["hyper"]["steps"] == 2 and r["hyper"]["batch_size"] == 8 and r["hyper"]["max_length"] == 16
            assert (run_dir / f"heatmap-{name}-seed0.png").stat().st_size > 0
            if name != "joint":  # joint trains once: only its final row exists
                assert R[0][1] is None and R[0][0] is not None  # NaN above the diagonal is stored as null
        # Heads of 2, 3 and 4 labels: head-only's heads are 384*C + C parameters each, and it stores no adapter.
        assert results["head-only"]["trained_params_per_task"] == [384 * c + c for c in (2, 3, 4)]
        assert results["head-only"]["stored_params_without_heads"] == 0
        # Share trains LoRA for the cold start, then far fewer parameters (coefficients + phi directions + head).
        share = results["share"]["trained_params_per_task"]
        assert share[1] < share[0] == results["lora-per-task"]["trained_params_per_task"][0]
        assert results["share"]["extra"]["k"] and "max_error_bound" in results["share"]["extra"]
        assert results["share"]["hyper"]["policy"].startswith("max_error=")
        assert results["share-variance"]["hyper"]["policy"].startswith("variance=0.6")
        # Separate adapters are never touched again: no forgetting by construction.
        assert results["lora-per-task"]["bwt"] == 0.0 and results["lora-per-task"]["merge_loss"] == 0.0
        assert results["joint"]["hyper"]["total_steps"] == 6
        for suffix in (".csv", "-matrices.csv", "-pareto.png"):
            assert (out / f"continual-data-full{suffix}").stat().st_size > 0
        assert (out / "continual-data-full.csv").read_text().startswith("method,seed,acc,bwt,merge_loss")
        assert "| share |" in first.out and "learning rate(s)" in first.out
        assert "qualification: lora-per-task ACC" in first.out

        # A rerun trains nothing: every (method, seed) is loaded, no file rewritten.
        stamps = _mtimes(run_dir)
        assert continual.main(_argv(tiny)) == 0
        second = capsys.readouterr()
        assert _mtimes(run_dir) == stamps
        assert second.err.count("stored, skipped") == 6  # six jobs: lora-per-task also yields share-full

        # A lost pair is retrained alone.
        (run_dir / "lora-seq-seed0.json").unlink()
        assert continual.main(_argv(tiny, "--methods", "lora-seq")) == 0
        third = capsys.readouterr()
        after = _mtimes(run_dir)
        assert "lora-seq seed 0: ACC" in third.err
        assert {k: v for k, v in after.items() if k != "lora-seq-seed0.json"} == {
            k: v for k, v in stamps.items() if k != "lora-seq-seed0.json"
        }
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _result(method: str, R: list[list[float]], just_trained: list[float], stored: int = 0) -> MethodResult:
    names = [f"t{j}" for j in range(len(R))]
    return MethodResult(method, 0, names, R, just_trained, stored_params_without_heads=stored).finish()


def test_metrics_on_a_hand_made_matrix():
    R = [[0.90, NAN, NAN], [0.85, 0.80, NAN], [0.80, 0.80, 0.50]]
    r = _result("share", R, just_trained=[0.90, 0.80, 0.70])
    assert r.acc == pytest.approx(0.70)
    assert r.bwt == pytest.approx((-0.10 + 0.0) / 2)  # excludes the last task
    assert r.merge_loss == pytest.approx((-0.10 + 0.0 - 0.20) / 3)  # includes it: its final merge cost 0.20


def test_results_round_trip_through_strict_json(tmp_path):
    r = _result("share", [[0.5, NAN], [0.5, 0.6]], [0.5, 0.7])
    text = json.dumps(r.to_json(), allow_nan=False)
    back = MethodResult.from_json(json.loads(text))
    assert math.isnan(back.R[0][1]) and back.R[1] == [0.5, 0.6] and back.merge_loss == r.merge_loss


def test_store_refuses_other_settings_and_reuses_a_sibling_run_with_the_same_key(tmp_path):
    full, sweep = ResultStore(tmp_path / "continual-a-full"), ResultStore(tmp_path / "continual-a-sweep")
    r = _result("share", [[0.5, NAN], [0.5, 0.6]], [0.5, 0.7])
    r.key = "k1"
    full.save(r)
    assert full.load("share", 0, "k1").acc == r.acc
    with pytest.raises(ShareClError, match="delete that file"):
        full.load("share", 0, "k2")
    assert sweep.load("share", 0, "k2") is None  # another key: never reused
    reused = sweep.load("share", 0, "k1")
    assert reused is not None and reused.extra["reused_from"].endswith("continual-a-full/share-seed0.json")
    assert sweep.path("share", 0).is_file()


def test_a_claim_held_by_a_live_process_is_respected_and_a_dead_ones_is_taken_over(tmp_path):
    store = ResultStore(tmp_path / "run")
    with store.claim("share", 0) as mine:
        assert mine
        with store.claim("share", 0) as again:  # this (live) process holds it
            assert not again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims = tmp_path / "run" / ".claims"
    (claims / "share-seed0").write_text(f"{os.uname().nodename} {int(dead.stdout)}")
    with store.claim("share", 0) as mine:
        assert mine


def test_targets_report_pass_and_miss_with_the_numbers():
    R2 = lambda a, b: [[a, NAN], [a, b]]  # noqa: E731
    results = [
        _result("share", R2(0.80, 0.70), [0.80, 0.80], stored=1_000),  # ACC 75, BWT 0, merge loss -5
        _result("lora-per-task", R2(0.80, 0.80), [0.80, 0.80], stored=20_000),  # ACC 80
        _result("head-only", R2(0.70, 0.60), [0.70, 0.60]),  # ACC 65
        _result("lora-seq", R2(0.70, 0.80), [0.80, 0.80]),  # BWT -10
    ]
    lines = "\n".join(targets(results))
    assert "MISS share ACC 75.0 >= lora-per-task ACC 80.0 - 3 (difference -5.0)" in lines
    assert "PASS share BWT +0.0 >= -3" in lines
    assert "info share merge loss -5.0" in lines
    assert "PASS share ACC 75.0 >= head-only ACC 65.0 + 8" in lines
    assert "PASS stored params without heads: lora-per-task 20,000 / share 1,000 = 20.0x" in lines
    assert "info lora-seq BWT -10.0" in lines and "too easy" not in lines
    assert "PASS qualification: lora-per-task ACC 80.0 >= head-only ACC 65.0 + 10" in lines
    assert "t1: lora-per-task 80.0, head-only 60.0, difference +20.0" in lines
    easy = targets([_result("lora-seq", R2(0.8, 0.8), [0.8, 0.8])])
    assert "too easy" in easy[0]


def test_manifest_order_selection_and_errors(tiny, tmp_path):
    entries = read_manifest(tiny / "data")
    assert [e.name for e in entries] == ["two", "three", "four"]
    assert [e.name for e in select(entries, 2, reverse=True)] == ["three", "two"]
    with pytest.raises(ShareClError, match="tasks.json"):
        read_manifest(tmp_path)
    with pytest.raises(ShareClError, match="--num-tasks 5"):
        select(entries, 5, reverse=False)


def test_sweep_covers_every_policy_and_the_references():
    methods = {m.name: m for m in sweep_methods()}
    policies = sorted(m.describe()["policy"] for m in methods.values() if m.policy is not None)
    assert len(policies) == 10
    for eps in ("0.02", "0.05", "0.1", "0.2"):
        assert f"max_error={eps}, k_max=32" in policies
    assert {"variance=0.6, k_max=32", "variance=0.9, k_max=32"} <= set(policies)
    assert {f"k={k}, k_max=32" for k in (4, 8, 16, 32)} <= set(policies)
    assert {"lora-per-task", "lora-seq", "head-only"} <= set(methods)
    # The sweep's default policies keep the main names, so the full run's results are reused.
    assert methods["share"].policy == METHODS["share"].policy


def test_help_works():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.continual", "--help"], capture_output=True, text=True, cwd=root
    )
    assert done.returncode == 0 and "--lr-coefficients" in done.stdout and "--sweep" in done.stdout
