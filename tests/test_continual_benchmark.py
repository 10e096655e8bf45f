"""A tiny end-to-end run of every method of the continual benchmark: real MiniLM, real WordNet data."""

import json
import math

import pytest

from benchmarks import continual


@pytest.mark.slow
def test_every_method_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--seeds", "0", "--num-tasks", "2", "--steps", "2", "--train-per-task", "12", "--eval-per-task", "8"]
    argv += ["--data", str(tmp_path / "data"), "--out", str(out)]
    assert continual.main(argv) == 0

    results = json.loads((out / "continual-full.json").read_text())
    assert sorted(r["method"] for r in results) == sorted(continual.METHODS)
    for r in results:
        R = r["R"]
        assert len(R) == 2 and all(len(row) == 2 for row in R)
        assert math.isnan(R[0][1]) and all(0.0 <= v <= 1.0 for v in (R[0][0], *R[1]))
        assert r["acc"] == pytest.approx((R[1][0] + R[1][1]) / 2)
        assert r["stored_params"] > 0 and len(r["trained_params_per_task"]) == 2
        assert (out / f"continual-full-{r['method']}-seed0.png").stat().st_size > 0
    by_method = {r["method"]: r for r in results}
    # Share trains LoRA for the cold start, then far fewer parameters (coefficients + phi directions + head).
    share = by_method["share"]["trained_params_per_task"]
    assert share[1] < share[0] == by_method["lora-per-task"]["trained_params_per_task"][0]
    # Separate adapters are never touched again: no forgetting by construction.
    assert by_method["lora-per-task"]["bwt"] == 0.0
    assert "| share |" in capsys.readouterr().out
    assert (out / "continual-full.csv").read_text().startswith("method,seed,after_task")
