"""``sharecl serve`` against hostile or broken input, without Ray Serve (``tests/test_serve.py`` has the HTTP
side): request bodies that used to get a 500, a request that fails in the model inside a batch, a recorded
``max_length`` past the base model's positions, and task heads whose tensors do not fit each other.

The store holds versions of ``test_serve``'s tiny random-init BERT (64 positions) and its 3 tasks.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import redis
import torch
from test_serve import LABELS, TEXTS, tiny_bert, version

from jobs.serving.engine import Engine
from jobs.serving.model import ServedModel, VersionLoadError
from jobs.serving.requests import Limits, Query, RequestError, parse_predict
from subspace_store import SubspaceStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIONS = 64  # tiny_bert's max_position_embeddings
LONG_TEXT = " ".join(["word"] * 300)  # ~300 tokens: past the tiny BERT's positions


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> SimpleNamespace:
    """v1: the 3 tasks as a job leaves them; v2: their jobs recorded max_length 1024; v3: task size's head.bias
    has 5 entries for its weight's 3 rows; v4: task size's head has no bias. Tag prod names v1."""
    tmp = tmp_path_factory.mktemp("serve-hardening")
    model = tiny_bert(tmp / "bert")
    client = redis.Redis.from_url(redis_server)
    store = SubspaceStore(client, f"t-serve-hard-{tmp.name[-6:]}")
    good = version(model)
    v1 = store.publish(good, None)
    long = store.get(v1)
    for task in long.tasks.values():
        task.metadata["submission"]["metadata"]["max_length"] = 1024
    v2 = store.publish(long, v1)
    bad_bias = store.get(v1)
    bad_bias.tasks["size"].head["head.bias"] = torch.zeros(5)
    v3 = store.publish(bad_bias, v2)
    no_bias = store.get(v1)
    del no_bias.tasks["size"].head["head.bias"]
    v4 = store.publish(no_bias, v3)
    store.tag(v1, "prod")
    yield SimpleNamespace(store=store, v1=v1, long=v2, bad_bias=v3, no_bias=v4)
    client.close()


def body(data: object) -> bytes:
    return json.dumps(data).encode()


def test_deep_json_and_lone_surrogates_are_refused_as_bad_input() -> None:
    for deep in (b"[" * 200_000, b'{"task": "mood", "inputs": ' + b"[" * 200_000):
        with pytest.raises(RequestError, match="too deeply") as err:
            parse_predict(deep, Limits())
        assert err.value.status == 400
    with pytest.raises(RequestError, match=r"inputs\[1\] is not valid Unicode") as err:
        parse_predict(body({"task": "mood", "inputs": ["fine", "x\ud800"]}), Limits())
    assert err.value.status == 422
    with pytest.raises(RequestError, match=r"inputs\[0\] is not valid Unicode"):
        parse_predict(b'{"task": "mood", "inputs": ["\\udc00 low half"]}', Limits())
    # A whole surrogate pair is a character (U+1F600), escaped or not.
    for raw in (b'{"task": "mood", "inputs": ["\\ud83d\\ude00"]}', body({"task": "mood", "inputs": ["\U0001f600"]})):
        assert parse_predict(raw, Limits()).inputs == ("\U0001f600",)


def test_a_request_that_fails_in_the_model_fails_alone(env) -> None:
    engine = Engine(env.store, "prod", device="cpu")
    queries = [
        Query("colour", (TEXTS[0],)),
        Query("size", ("x\ud800",)),  # past parse_predict's check (built directly): the tokenizer raises
        Query("mood", (TEXTS[1], TEXTS[2])),
        Query("weather", ("rain",)),
    ]
    answers = engine.answer(queries)
    assert [a.status for a in answers] == [200, 500, 200, 404], answers
    assert "TypeError" in answers[1].body["error"] and answers[1].body["version"] == env.v1
    for query, answer in zip(queries, answers, strict=True):
        if answer.status == 200:
            alone = engine.model.predict([query.task] * len(query.inputs), list(query.inputs))
            assert answer.body["predictions"] == alone and answer.body["version"] == env.v1
            assert answer.body["labels"] == [LABELS[query.task][p] for p in alone]
    assert engine.answer([queries[1]])[0].status == 500  # alone too: an answer, not an exception


def test_max_length_is_capped_at_what_the_base_model_takes(env) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        served = ServedModel(device="cpu")
        served.load_subspace(env.store.get(env.long))  # its jobs recorded max_length 1024
        assert served.max_length == POSITIONS
        prediction = served.predict(["mood", "size"], [LONG_TEXT, TEXTS[0]])
        assert 0 <= prediction[0] < len(LABELS["mood"]) and 0 <= prediction[1] < len(LABELS["size"])
        served.load_subspace(env.store.get(env.v1))  # max_length 16: under the cap
        assert served.max_length == 16
        served.load_subspace(env.store.get(env.long))
        assert served.max_length == POSITIONS
        option = ServedModel(device="cpu", max_length=1024)  # the option is capped too
        option.load_subspace(env.store.get(env.v1))
        assert option.max_length == POSITIONS and option.predict(["colour"], [LONG_TEXT])[0] in (0, 1)
    finally:
        logger.removeHandler(handler)
    capped = [r.getMessage() for r in records if "truncated to" in r.getMessage()]
    assert len(capped) == 2 and all("max_length 1024 " in m for m in capped), capped  # once per model


def test_a_head_whose_tensors_do_not_fit_each_other_is_not_served(env) -> None:
    engine = Engine(env.store, "prod", device="cpu")
    reasons = {
        env.bad_bias: r"task 'size': head tensor 'head.bias' of shape \(5,\) does not match 'head.weight' of shape "
        r"\(3, 32\)",
        env.no_bias: r"task 'size': its head tensors lack \['head.bias'\]",
    }
    for refused, reason in reasons.items():
        env.store.tag(refused, "prod")
        with pytest.raises(VersionLoadError, match=reason):
            engine.follower.poll()
        health = engine.health()
        assert health["version"] == env.v1 and refused in health["not_served"], health
        answer = engine.answer([Query("size", (TEXTS[0],))])[0]
        assert answer.status == 200 and answer.body["version"] == env.v1
    # A task holding none of the head's tensors keeps the model's own head (as before).
    headless = env.store.get(env.v1)
    headless.tasks["size"].head = {}
    engine.model.model.check_subspace(headless)
    env.store.tag(env.v1, "prod")
