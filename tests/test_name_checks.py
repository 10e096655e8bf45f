"""Names the store would not publish never jam the coordinator, and ``sharecl adapters add`` submits all or nothing.

``share.peft_io.load_peft_adapter`` takes a head tensor like ``x+head.weight`` (``modules_to_save: ["head"]``)
and, at a cold start, any module name whose dot parts are non-empty; publishing refuses both. ``submit``
refuses such a submission before writing anything; one written straight into the stream (by an older client)
is rejected by the coordinator with the reason, and the good submission behind it is merged. ``adapters add``
checks every folder's names before it submits the first. Real redis-server, a real ``Coordinator`` (no Ray).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
import torch
from helpers import peft_folder, write_unchecked
from safetensors.torch import load_file, save_file
from test_stream_jams import assert_only_good_merged

from coordinator import Coordinator
from share import KPolicy, LoraAdapter, TaskUpdate
from subspace_store import StoreError, Submission, SubmissionStream, SubspaceStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD_MODULE, GOOD_HEAD = "layer.0.query", "classifier.weight"


def lora(seed: int, module: str = GOOD_MODULE, head: str = GOOD_HEAD) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {module: (torch.randn(24, 2, generator=g), torch.randn(2, 16, generator=g))}
    return LoraAdapter(factors=factors, head={head: torch.ones(3, 8)})


@pytest.fixture
def setup(redis_client: redis.Redis, namespace: str) -> tuple[SubspaceStore, SubmissionStream, Coordinator]:
    store = SubspaceStore(redis_client, namespace)
    stream = SubmissionStream(redis_client, namespace)
    return store, stream, Coordinator(store, stream, KPolicy(k=4))


BAD_NAMES = [
    ({"head": "x+head.weight"}, "invalid head tensor name 'x+head.weight'"),
    ({"head": "head weight"}, "invalid head tensor name 'head weight'"),
    ({"module": "layer.0.query+x"}, "invalid module name 'layer.0.query+x'"),
    ({"module": "layer/0.query"}, "invalid module name 'layer/0.query'"),
]
BAD_IDS = ["head-plus", "head-space", "module-plus", "module-slash"]


# -- submit ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("names", "problem"), BAD_NAMES, ids=BAD_IDS)
def test_submit_refuses_names_the_store_would_not_publish(setup, names: dict[str, str], problem: str) -> None:
    _, stream, _ = setup
    adapter = lora(0, **names)
    with pytest.raises(StoreError, match=f"task 'bad': {re.escape(problem)}.*cannot publish"):
        stream.submit(Submission("bad", adapter, None))
    parts = {m: {} for m in adapter.factors}  # the names are refused before the parts are looked at
    with pytest.raises(StoreError, match=f"task 'bad': {re.escape(problem)}"):
        stream.submit(Submission("bad", None, "v1", update=TaskUpdate(parts=parts, head=adapter.head)))
    assert stream.latest_id() is None and not stream.client.exists(stream.keys.stream)  # nothing was written


# -- the coordinator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("names", "problem"), BAD_NAMES, ids=BAD_IDS)
def test_an_entry_with_such_names_is_rejected_and_the_next_submission_merges(
    setup, names: dict[str, str], problem: str
) -> None:
    store, stream, coordinator = setup
    bad = write_unchecked(stream, "bad", lora(0, **names))  # at a cold start: any module names could be first
    good = stream.submit(Submission("good", lora(1), None))
    reason = assert_only_good_merged(stream, coordinator, bad, good, "v1")
    assert reason.startswith(f"task 'bad': {problem}") and "submit it again" in reason
    assert list(store.get("v1").tasks) == ["good"] and list(store.get("v1").modules) == [GOOD_MODULE]


def test_a_bad_head_name_is_rejected_after_the_first_version_too(setup) -> None:
    store, stream, coordinator = setup
    stream.submit(Submission("first", lora(0), None))
    assert coordinator.step(block_ms=None).version == "v1"
    bad = write_unchecked(stream, "bad", lora(1, head="x+head.weight"))
    good = stream.submit(Submission("good", lora(2), "v1"))
    reason = assert_only_good_merged(stream, coordinator, bad, good, "v2")
    assert reason.startswith("task 'bad': invalid head tensor name 'x+head.weight'")
    assert list(store.get("v2").tasks) == ["first", "good"]


# -- sharecl adapters add ----------------------------------------------------------------------------------
def test_adapters_add_with_a_bad_folder_name_submits_nothing(cli, redis_client, namespace, tmp_path: Path) -> None:
    good, bad = peft_folder(tmp_path / "good"), peft_folder(tmp_path / "my adapter", seed=8)
    code, out, err = cli("adapters", "add", str(good), str(bad))
    assert code == 2 and SubmissionStream(redis_client, namespace).latest_id() is None  # not the good one either
    assert f"adapter {bad}: invalid task name 'my adapter'" in err and "--task" in err and "submitted" not in out, err


def test_adapters_add_with_a_head_the_store_would_refuse_submits_nothing(
    cli, redis_client, namespace, tmp_path: Path
) -> None:
    good = peft_folder(tmp_path / "good", modules_to_save=["head"])
    bad = peft_folder(tmp_path / "bad", seed=8, modules_to_save=["head"])
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    renamed = {key.replace(".head.", ".x+head."): value for key, value in tensors.items()}
    assert renamed != tensors  # the saved head was renamed: PEFT's modules_to_save suffix rule still takes it
    save_file(renamed, str(weights))

    code, out, err = cli("adapters", "add", str(good), str(bad))

    assert code == 2 and SubmissionStream(redis_client, namespace).latest_id() is None
    assert f"adapter {bad}: task 'bad': invalid head tensor name 'x+head." in err, err
    assert "submitted" not in out and "nothing was submitted" in err
