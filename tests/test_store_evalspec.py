"""EvalSpec: the eval hand-off from the worker that trained a task to the coordinator that evaluates it."""

import json

import pytest

from subspace_store import EvalSpec, EvalSpecError, PluginImportError, load_callable

SPEC = EvalSpec(
    eval_path="data/t/eval.parquet",
    builder="hf-text-classifier",
    target_modules=("query", "value"),
    max_length=128,
    batch_size=64,
    evaluator="workers.evaluator:evaluate_subspace",
)


def test_round_trip_through_json() -> None:
    data = json.loads(json.dumps(SPEC.to_dict()))
    assert data["target_modules"] == ["query", "value"] and data["model_name_or_path"] is None
    assert EvalSpec.from_dict(data) == SPEC
    assert EvalSpec.of({"eval": data, "other": 1}) == SPEC and EvalSpec.of({"other": 1}) is None


def test_every_problem_is_named() -> None:
    data = {**SPEC.to_dict(), "max_length": 0, "batch_size": "64", "evaluator": "no colon", "target_modules": "q"}
    with pytest.raises(EvalSpecError) as info:
        EvalSpec.from_dict(data)
    message = str(info.value)
    for part in ("max_length must be an integer >= 1", "batch_size", "evaluator must be 'package.module:function'"):
        assert part in message
    assert "target_modules must be a list" in message
    missing = {k: v for k, v in SPEC.to_dict().items() if k not in ("eval_path", "builder")}
    with pytest.raises(EvalSpecError, match="builder is missing; eval_path is missing"):
        EvalSpec.from_dict({**missing, "path": "x"})
    with pytest.raises(EvalSpecError, match="unknown key 'path'"):
        EvalSpec.from_dict({**SPEC.to_dict(), "path": "x"})
    with pytest.raises(EvalSpecError, match="expected a JSON object"):
        EvalSpec.from_dict(["not", "a", "dict"])
    with pytest.raises(ValueError, match="eval_path must be a non-empty string"):
        EvalSpec(eval_path="", builder="b", target_modules=("q",), max_length=8, batch_size=8)


def test_load_callable_names_the_path_and_the_fix() -> None:
    assert load_callable("json:dumps", "thing", "fix it") is json.dumps
    with pytest.raises(PluginImportError, match="must look like 'package.module:function'"):
        load_callable("json.dumps", "thing", "fix it")
    with pytest.raises(PluginImportError, match=r"thing 'no_such_pkg:f' could not be imported .*; fix it"):
        load_callable("no_such_pkg:f", "thing", "fix it")
    with pytest.raises(PluginImportError, match="is not callable"):
        load_callable("json:__name__", "thing", "fix it")
