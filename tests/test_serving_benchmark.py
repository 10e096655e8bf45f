"""The serving benchmark's parts (benchmarks/serving*.py): the structured-adapter generator, the exact
error against the original adapters, the rows' task spread, and PEFT adapters put directly into the LoRA
layers answering exactly as ``load_adapter`` ones (on the real all-MiniLM-L6-v2)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.serving import row_tasks
from benchmarks.serving_adapters import AdapterSource, Structure, errors_against, task_name
from share import KPolicy, merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = {"enc.q": (48, 40), "enc.v": (32, 40)}


def test_generated_tasks_share_a_subspace_of_the_stated_size():
    structure = Structure(shared_dim=6, task_specific=0.02, r=3)
    source = AdapterSource(SHAPES, structure, {"enc.q": 2.0, "enc.v": 0.5})
    adapters = source.adapters(0, 12)
    assert source.adapter(5).factors["enc.q"][0].equal(adapters["t5"].factors["enc.q"][0])  # reproducible
    assert math.isclose(float(adapters["t3"].delta_weight("enc.q").norm()), 2.0, rel_tol=1e-5)
    subspace, report = merge(None, adapters, KPolicy(max_error=0.05))
    # 12 tasks of rank 3 span 36 directions, but all but the task-specific 2% lie in 6: Share keeps 6.
    assert set(subspace.k().values()) == {(6, 6)}
    assert max(report.error_bound.values()) <= 0.05


def test_errors_against_equals_the_dense_computation():
    source = AdapterSource(SHAPES, Structure(shared_dim=6, task_specific=0.2, r=3), dict.fromkeys(SHAPES, 1.0))
    adapters = source.adapters(0, 5)
    subspace, _ = merge(None, adapters, KPolicy(k=5))
    fast = errors_against(subspace, adapters)
    for name, adapter in adapters.items():
        diff = norm = 0.0
        for module in SHAPES:
            original = adapter.delta_weight(module).double()
            diff += float((subspace.delta_weight(name, module).double() - original).square().sum())
            norm += float(original.square().sum())
        assert fast[name] == pytest.approx(math.sqrt(diff / norm), rel=1e-4)
        assert fast[name] > 1e-3  # k=5 < 6 common directions: visibly lossy, so the check means something


def test_rows_spread_over_min_t_batch_distinct_tasks_across_all_resident():
    rows = row_tasks(1024, 64)
    assert len(set(rows)) == 64 and rows[0] == "t0" and rows[-1] == task_name(1008)
    assert set(row_tasks(32, 64)) == {task_name(i) for i in range(32)}
    assert set(row_tasks(1, 64)) == {"t0"}


@pytest.mark.slow
def test_direct_peft_adapters_answer_like_load_adapter_ones(tmp_path):
    from benchmarks.minilm import load_model
    from benchmarks.serving_peft import add_direct, check_direct_equals_official, load_official
    from share import match_modules

    base = load_model()
    modules = match_modules(base, ["query", "value"])
    shapes = {m: (base.get_submodule(m).out_features, base.get_submodule(m).in_features) for m in modules}
    source = AdapterSource(shapes, Structure(), dict.fromkeys(shapes, 1.0))
    adapters = source.adapters(0, 4)
    peft = load_official(adapters, 2, tmp_path)
    add_direct(peft, adapters, 4)
    assert (peft.count, peft.official, len(peft.load_seconds)) == (4, 2, 2)
    assert peft.lora_bytes() == 4 * len(shapes) * 8 * (384 + 384) * 4
    assert check_direct_equals_official(peft, adapters, "t1") == 0.0
    assert set(peft.model.peft_config) == {"t0", "t1", "t2", "t3"}  # the probe is gone again
    ids = torch.randint(1000, 30000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = peft.model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["t2", "t3"])[0]
        b = base(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
    assert float((a - b).abs().max()) > 1e-3  # the direct adapters do change the answers
