"""Issue 10, the coordinator's part: one bad submission never jams the merge loop (it is isolated by
bisecting the batch and rejected with its reason), a merge that would leave a task over the forgetting
bound is refused unless the job allows it, and the job driver never leaves a merge run RUNNING.
Real redis-server, real PEFT files, real local Ray and a real MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_workers_task import TINY_BUILDER, tiny_builder, write_tiny_task

from coordinator import Coordinator
from share import KPolicy, LoraAdapter, load_peft_adapter
from subspace_store import Submission, SubmissionStatus, SubmissionStream, SubspaceStore
from subspace_store.keys import Keys
from subspace_store.payloads import encode_tensors, sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESTS_DIR = str(Path(__file__).parent)
DIM = 12  # the tiny model's query/value layers are 12 x 12


def peft_folder(folder: Path, r: int, seed: int = 7) -> Path:
    """A real PEFT LoRA folder (``save_pretrained``) for the tiny model's query and value layers."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_builder(None, 2, seed=seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter (PEFT starts lora_B at zero)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


def small_lora(seed: int, r: int = 2) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(DIM, r, generator=g), torch.randn(r, DIM, generator=g)) for m in ("query", "value")}
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in factors})


def raw_submit(stream: SubmissionStream, task: str, adapter: LoraAdapter) -> str:
    """Write a stream entry as a producer that skips ``submit``'s checks would (an older or hostile client)."""
    tensors = {}
    for module, (B, A) in adapter.factors.items():
        tensors[f"B:{module}"], tensors[f"A:{module}"] = B, A
    data = encode_tensors(tensors)
    keys = Keys(stream.namespace)
    payload_key = keys.submission_payload(f"raw-{task}")
    stream.ensure_group()
    stream.client.set(payload_key, data)
    fields = {
        "task": task,
        "base_version": "",
        "payload_key": payload_key,
        "sha256": sha256(data),
        "bytes": str(len(data)),
        "kind": "adapter",
        "scaling": json.dumps({m: adapter.scale(m) for m in adapter.factors}),
        "adapter_metadata": "{}",
        "metadata": "{}",
    }
    return stream.client.xadd(keys.stream, fields).decode()


def rank_zero() -> LoraAdapter:
    """Factors that chain and hold no NaN, yet no merge can use (rank 0)."""
    return LoraAdapter(factors={m: (torch.zeros(DIM, 0), torch.zeros(0, DIM)) for m in ("query", "value")})


@pytest.fixture
def setup(redis_client, namespace):
    return SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)


# -- defect 1: one bad submission never jams the coordinator -------------------------------------


def test_adapter_with_rank_above_the_layer_is_rejected_and_the_good_one_merges(setup, tmp_path) -> None:
    store, stream = setup
    too_big = load_peft_adapter(peft_folder(tmp_path / "r16", r=16))  # r=16 on 12 x 12 layers
    good = load_peft_adapter(peft_folder(tmp_path / "r2", r=2, seed=8))
    bad_id = raw_submit(stream, "too_big", too_big)
    good_id = stream.submit(Submission("good", good, None))

    coordinator = Coordinator(store, stream)
    result = coordinator.step(max_batch=8, block_ms=None)  # before the fix: raised, and every retry again
    assert result.merged == {good_id: "good"} and result.version == "v1"
    assert set(result.rejected) == {bad_id}
    reason = stream.status(bad_id).reason
    assert "too_big" in reason and "rank 16" in reason and "12" in reason
    assert list(store.get("v1").tasks) == ["good"] and stream.pending() == []
    assert coordinator.last_error is None and coordinator.counters["rejected"] == 1


def test_bisection_isolates_every_bad_submission_of_a_batch(setup, tmp_path) -> None:
    store, stream = setup
    coordinator = Coordinator(store, stream, KPolicy(k=8))
    stream.submit(Submission("first", small_lora(0), None))
    assert coordinator.step(block_ms=None).version == "v1"

    too_big = load_peft_adapter(peft_folder(tmp_path / "r16", r=16))
    ids: dict[str, str] = {}
    for i, name in enumerate(["g0", "zero_rank", "g1", "g2", "too_big", "g3"]):
        if name == "zero_rank":
            ids[name] = raw_submit(stream, name, rank_zero())
        elif name == "too_big":
            ids[name] = raw_submit(stream, name, too_big)
        else:
            ids[name] = stream.submit(Submission(name, small_lora(10 + i), "v1"))
    result = coordinator.step(max_batch=16, block_ms=None)
    good = {ids[n]: n for n in ("g0", "g1", "g2", "g3")}
    assert result.version == "v2" and result.merged == good  # the four good ones in one version
    assert set(result.rejected) == {ids["zero_rank"], ids["too_big"]}
    assert list(store.get("v2").tasks) == ["first", "g0", "g1", "g2", "g3"]
    for name in ("zero_rank", "too_big"):
        state = stream.status(ids[name])
        assert state.state is SubmissionStatus.REJECTED and name in state.reason
    assert stream.pending() == [] and stream.is_settled()


# -- defect 4: no merge leaves a committed task over the forgetting bound without saying so -------


def in_span(head_adapters: list[LoraAdapter], seed: int) -> LoraAdapter:
    """A rank-2 adapter inside the span of the committed tasks' factors: it needs no new direction."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in ("query", "value"):
        Bs = torch.cat([a.factors[m][0] for a in head_adapters], dim=1)
        As = torch.cat([a.factors[m][1] for a in head_adapters], dim=0)
        mix = torch.randn(Bs.shape[1], 2, generator=g)
        factors[m] = (Bs @ mix, mix.T @ As)
    return LoraAdapter(factors=factors, scaling={m: 2.0 for m in factors})


def test_merge_over_the_bound_is_rejected_with_the_numbers_unless_allowed(setup) -> None:
    store, stream = setup
    policy = KPolicy(max_error=0.05, k_max=6)  # three rank-2 tasks fill k_max
    coordinator = Coordinator(store, stream, policy)
    committed = [small_lora(i) for i in range(3)]
    for i, adapter in enumerate(committed):
        stream.submit(Submission(f"t{i}", adapter, None))
    assert coordinator.step(max_batch=8, block_ms=None).version == "v1"

    huge = small_lora(10)
    huge.factors["query"][1][0, 0] = 3e38  # one lora_A entry at 3e38: finite, so validation passes
    huge_id = stream.submit(Submission("huge", huge, "v1"))
    fits_id = stream.submit(Submission("fits", in_span(committed, 11), "v1"))
    result = coordinator.step(max_batch=8, block_ms=None)
    assert result.merged == {fits_id: "fits"} and set(result.rejected) == {huge_id}
    reason = stream.status(huge_id).reason
    assert "max_error=0.05" in reason and "allow_over_bound" in reason
    for task in ("t0", "t1", "t2"):  # every committed task it would have pushed over, with its number
        assert f"{task}: " in reason
    head = store.get(result.version)
    assert list(head.tasks) == ["t0", "t1", "t2", "fits"]
    for i, adapter in enumerate(committed):  # the old tasks are intact
        for m in ("query", "value"):
            truth = adapter.delta_weight(m)
            assert float(torch.linalg.norm(head.delta_weight(f"t{i}", m) - truth) / torch.linalg.norm(truth)) < 0.05

    # A job that allows it gets it merged; the version records who went over and by how much.
    allowed = stream.submit(Submission("huge_ok", huge, result.version, allow_over_bound=True))
    again = coordinator.step(block_ms=None)
    assert again.merged == {allowed: "huge_ok"} and not again.rejected
    over = store.manifest(again.version)["metadata"]["coordinator"]["over_bound"]
    assert set(over) >= {"t0", "t1", "t2"} and all(v > 0.05 for v in over.values())
