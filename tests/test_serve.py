"""``sharecl serve`` (jobs/serving): one model answers for every task of a tagged version, through a real
local Ray Serve; the tag is followed and versions swap between batches.

The store holds versions of a tiny random-init BERT (saved with save_pretrained, the MiniLM tokenizer
beside it), with 3 classification tasks whose heads have 2, 3 and 4 labels. Reference answers are
computed without Share's serving path: each task's ``dW`` added to a plain copy of the model's weights
and its head copied in.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import torch
from transformers import BertConfig, BertModel

from share import KPolicy, LoraAdapter, Subspace, merge
from subspace_store import SubspaceStore
from workers.models import DEFAULT_BUILDER, build_text_classifier, default_model_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN = 32
MODULES = [f"encoder.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
LABELS = {"colour": ["red", "green"], "size": ["small", "medium", "large"], "mood": ["sad", "calm", "glad", "wild"]}
TEXTS = [
    "a red apple on the table",
    "the green hills far away",
    "one small step for a man",
    "large waves broke on the shore",
    "she was sad and tired",
    "a calm evening by the lake",
    "we were glad to be home",
    "a wild ride through the night",
]


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the MiniLM tokenizer, loadable offline."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, folder / name)
    return folder


def adapter(seed: int) -> LoraAdapter:
    """Random rank-2 updates of every query/value module (heads are set after the merge, see ``version``)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(HIDDEN, 2, generator=gen), torch.randn(2, HIDDEN, generator=gen) * 0.3) for m in MODULES}
    return LoraAdapter(factors=factors, scaling={m: 1.0 for m in MODULES})


def plain_model(model_folder: Path, subspace: Subspace, task: str) -> tuple[torch.nn.Module, object]:
    """The task without Share's serving path: its dW added to a plain copy of the weights, its head copied in."""
    model, tokenizer = build_text_classifier(str(model_folder), len(LABELS[task]), seed=0)
    with torch.no_grad():
        for name in MODULES:
            model.get_submodule(name).weight += subspace.delta_weight(task, name)
        for key, value in subspace.tasks[task].head.items():
            model.head.get_parameter(key.removeprefix("head.")).copy_(value)
    return model.eval(), tokenizer


def pooled(model: torch.nn.Module, tokenizer: object, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled encoder outputs (what the head sees) and the logits."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = model.encoder(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1), model(encoded["input_ids"], encoded["attention_mask"])


def version(model_folder: Path, *, flip: bool = False, recorded: Path | None = None) -> Subspace:
    """A subspace of the 3 tasks with the metadata a job's submission leaves (builder, model, labels).

    Each head is a prototype classifier: label j's row is the centred pooled output of one text (another
    text per task), so answers differ between texts and tasks; ``flip`` reverses the rows (another version).
    """
    subspace, _ = merge(None, {t: adapter(i) for i, t in enumerate(LABELS)}, KPolicy(variance=1.0))
    for i, (task, names) in enumerate(LABELS.items()):
        zeros = {"head.weight": torch.zeros(len(names), HIDDEN), "head.bias": torch.zeros(len(names))}
        subspace.tasks[task].head = zeros
        features, _ = pooled(*plain_model(model_folder, subspace, task), TEXTS)
        features = features - features.mean(0)
        rows = torch.stack([features[(2 * i + j) % len(TEXTS)] for j in range(len(names))])
        subspace.tasks[task].head["head.weight"] = (rows.flip(0) if flip else rows) * 10
        submitted = {
            "builder": DEFAULT_BUILDER,
            "model_name_or_path": str(recorded or model_folder),
            "dtype": "float32",
            "max_length": 16,
            "label_names": names,
        }
        subspace.tasks[task].metadata["submission"] = {"id": f"0-{task}", "base_version": None, "metadata": submitted}
    return subspace


def reference(model_folder: Path, subspace: Subspace, task: str, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Logits and predictions of ``task`` computed by ``plain_model``."""
    _, logits = pooled(*plain_model(model_folder, subspace, task), texts)
    return logits, logits.argmax(-1).tolist()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: str) -> SimpleNamespace:
    """Namespace with v1 (3 tasks), v2 (same tasks, heads reversed), v3 (tasks of another base model)."""
    tmp = tmp_path_factory.mktemp("serve")
    model = tiny_bert(tmp / "bert")
    client = redis.Redis.from_url(redis_server)
    store = SubspaceStore(client, f"t-serve-{tmp.name[-6:]}")
    other = tmp / "no-such-model"
    subspaces = {"v1": version(model), "v2": version(model, flip=True), "v3": version(model, recorded=other)}
    parent = None
    for name, subspace in subspaces.items():
        parent = store.publish(subspace, parent)
        assert parent == name
    store.tag("v1", "prod")
    expected = {v: {t: reference(model, store.get(v), t, TEXTS)[1] for t in LABELS} for v in ("v1", "v2")}
    # The test is only as good as its inputs: answers differ between texts, tasks and versions.
    assert len({p for v in expected.values() for preds in v.values() for p in preds}) >= 3
    assert expected["v1"] != expected["v2"]
    yield SimpleNamespace(tmp=tmp, model=model, store=store, url=redis_server, expected=expected)
    client.close()


# ------------------------------------------------------------------ the real local Ray Serve

MAX_INPUTS = 16


@pytest.fixture(scope="module")
def server(env: SimpleNamespace) -> str:
    """The app on a local Ray Serve, following tag prod every 0.2 s; yields its base URL."""
    import ray
    from ray import serve

    from jobs.serving import build_app
    from subspace_store.embedded import free_port

    owns = not ray.is_initialized()
    if owns:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            env.store.namespace,
            env.url,
            tag="prod",
            poll_s=0.2,
            max_batch_size=16,
            batch_wait_ms=50,
            max_inputs=MAX_INPUTS,
            num_cpus=0.5,
            threads=1,
        )
        serve.run(app, name="sharecl-serve-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if owns:
            ray.shutdown()


def post(url: str, body: object) -> tuple[int, dict]:
    import requests

    response = requests.post(f"{url}/predict", json=body, timeout=60)
    return response.status_code, response.json()


def health(url: str) -> dict:
    import requests

    return requests.get(f"{url}/health", timeout=30).json()


def wait_for(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def queries() -> list[tuple[str, list[int]]]:
    """Requests for every task, each with another subset of the texts (by index)."""
    return [(task, [i for i in range(len(TEXTS)) if (i + k) % 3]) for k in range(4) for task in LABELS]


def check(answer: dict, task: str, rows: list[int], expected: dict) -> None:
    version = answer["version"]
    assert version in expected, answer
    want = [expected[version][task][i] for i in rows]
    assert answer["task"] == task and answer["predictions"] == want, (answer, want)
    assert answer["labels"] == [LABELS[task][p] for p in want]


@pytest.mark.slow
def test_a_burst_for_several_tasks_answers_as_each_task_alone(env, server) -> None:
    assert health(server) == {
        "status": "ok",
        "version": "v1",
        "tag": "prod",
        "namespace": env.store.namespace,
        "tasks": 3,
        "batches": 0,
        "requests": 0,
        "mixed_batches": 0,
    }
    burst = queries() * 2
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda q: post(server, {"task": q[0], "inputs": [TEXTS[i] for i in q[1]]}), burst))
    for (task, rows), (status, body) in zip(burst, answers, strict=True):
        assert status == 200, body
        assert body["version"] == "v1"
        check(body, task, rows, env.expected)
    stats = health(server)
    assert stats["requests"] == len(burst)
    # Requests of several tasks were answered together (one forward), so fewer batches than requests.
    assert stats["mixed_batches"] >= 1 and stats["batches"] < len(burst), stats


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_the_reason(server) -> None:
    import requests

    status, body = post(server, {"task": "weather", "inputs": ["rain"]})
    assert status == 404 and "unknown task 'weather'" in body["error"] and body["known_tasks"] == 3
    raw = requests.post(f"{server}/predict", data=b"{not json", timeout=30)
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]
    deep = requests.post(f"{server}/predict", data=b"[" * 200_000, timeout=30)  # Python's json cannot nest so deep
    assert deep.status_code == 400 and "too deeply" in deep.json()["error"]
    cases = [
        ([1, 2], 400, "JSON object"),
        ({"task": "mood"}, 400, "lacks 'inputs'"),
        ({"task": "mood", "inputs": "a text"}, 422, "list of strings"),
        ({"task": "mood", "inputs": []}, 422, "empty"),
        ({"task": "mood", "inputs": ["fine", 3]}, 422, "inputs[1] must be a string"),
        ({"task": "mood", "inputs": ["  "]}, 422, "inputs[0] is empty"),
        ({"task": "mood", "inputs": ["fine", "x\ud800"]}, 422, "inputs[1] is not valid Unicode"),  # half a pair
        ({"task": "mood", "inputs": ["x"] * (MAX_INPUTS + 1)}, 422, f"at most {MAX_INPUTS}"),
        ({"task": 7, "inputs": ["x"]}, 422, "'task' must be"),
        ({"task": "mood", "inputs": ["x"], "extra": 1}, 422, "unknown field"),
    ]
    for body_sent, want_status, reason in cases:
        status, body = post(server, body_sent)
        assert status == want_status and reason in body["error"], (body_sent, status, body)
    assert requests.get(f"{server}/predict", timeout=30).status_code == 405
    assert post(server, {"task": "mood", "inputs": ["still fine"]})[0] == 200  # bad requests broke nothing


def unfinished_request(url: str, data: bytes) -> bytes:
    """Send ``data`` (a request, its body unfinished) and return the status line the server answers with."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the server answered and closed before all of it went out
            pass
        return sock.recv(4096).split(b"\r\n", 1)[0]


@pytest.mark.slow
def test_a_body_over_4_mib_is_refused_before_it_has_all_arrived(server) -> None:
    from jobs.serving.requests import Limits

    limit = Limits().max_body_bytes
    head = "POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    declared = f"{head}Content-Length: {limit + 1}\r\n\r\n".encode() + b'{"task": "mood"'
    piece = b"x" * 65536  # chunked: no Content-Length, so refused once more than the limit has been read
    chunked = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + (
        f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    ) * (limit // len(piece) + 1)
    for data in (declared, chunked):  # neither body ends: a server that waited for the rest would never answer
        assert unfinished_request(server, data).startswith(b"HTTP/1.1 413"), data[:160]
    assert post(server, {"task": "mood", "inputs": ["still fine"]})[0] == 200


def load_while(server: str, stop, expected: dict, seen_by: list[list[str]]) -> list[tuple[str, list[str]]]:
    """Send requests until ``stop`` is set; each answer checked against its version's expected answers.
    Client ``offset`` appends each answer's version to ``seen_by[offset]`` as it comes (the test waits on it)."""

    def loop(offset: int) -> list[str]:
        seen = seen_by[offset]
        items = queries()
        k = offset
        while not stop.is_set():
            task, rows = items[k % len(items)]
            k += 1
            status, body = post(server, {"task": task, "inputs": [TEXTS[i] for i in rows]})
            assert status == 200, body
            check(body, task, rows, expected)
            seen.append(body["version"])
        return seen

    return loop


@pytest.mark.slow
def test_moving_the_tag_switches_versions_with_no_failed_request(env, server) -> None:
    import threading

    stop = threading.Event()
    seen_by: list[list[str]] = [[] for _ in range(4)]

    def every_client(predicate) -> bool:  # or a client failed: its result() below re-raises why
        return all(predicate(versions) for versions in seen_by) or any(f.done() for f in futures)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load_while(server, stop, env.expected, seen_by), i) for i in range(4)]
        try:  # waited on, not slept: on a loaded machine a client's first answer can take seconds
            wait_for(lambda: every_client(lambda v: v), timeout_s=120, what="an answer (v1) for every client")
            env.store.tag("v2", "prod")
            wait_for(lambda: health(server)["version"] == "v2", what="the server to serve v2")
            wait_for(lambda: every_client(lambda v: v[-1] == "v2"), timeout_s=120, what="a v2 answer for every client")
        finally:
            stop.set()
        seen = [f.result() for f in futures]  # re-raises any failed request
    for versions in seen:
        assert versions and versions[-1] == "v2"
        # Once a client saw v2 it never got v1 again: the swap is one step.
        assert "v1" not in versions[versions.index("v2") :]
    assert any("v1" in versions for versions in seen)  # the clients were running when the tag moved


@pytest.mark.slow
def test_a_version_that_cannot_load_leaves_the_old_one_serving(env, server) -> None:
    env.store.tag("v2", "prod")
    wait_for(lambda: health(server)["version"] == "v2", what="v2")
    env.store.tag("v3", "prod")  # its tasks name a base model that does not exist
    wait_for(lambda: "v3" in health(server).get("not_served", {}), what="v3 to be refused")
    stats = health(server)
    assert stats["version"] == "v2" and "no-such-model" in stats["not_served"]["v3"], stats
    for task, rows in queries()[:3]:
        status, body = post(server, {"task": task, "inputs": [TEXTS[i] for i in rows]})
        assert status == 200 and body["version"] == "v2"
        check(body, task, rows, env.expected)
    env.store.tag("v1", "prod")  # and it still follows the tag
    wait_for(lambda: health(server)["version"] == "v1", what="v1 after the refused v3")


# ------------------------------------------------------------------ without Serve


def test_one_mixed_forward_gives_each_row_its_own_tasks_logits(env) -> None:
    from jobs.serving.model import ServedModel, VersionLoadError

    served = ServedModel(device="cpu")
    served.load_subspace(env.store.get("v1"))
    assert served.labels == LABELS and served.max_length == 16  # label names and max_length as the jobs recorded
    rows = [(list(LABELS)[i % 3], TEXTS[i]) for i in range(len(TEXTS))]  # tasks interleaved row by row
    encoded = served.tokenizer([t for _, t in rows], padding=True, max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        mixed = served.model(encoded["input_ids"], encoded["attention_mask"], tasks=[task for task, _ in rows])
    subspace = env.store.get("v1")
    for i, (task, text) in enumerate(rows):
        alone, _ = reference(env.model, subspace, task, [text])
        n = len(LABELS[task])
        torch.testing.assert_close(mixed[i, :n], alone[0], rtol=1e-4, atol=1e-4)
        assert torch.isinf(mixed[i, n:]).all()  # narrower heads are padded with -inf, outside argmax's reach
    before = served.predict([task for task, _ in rows], [text for _, text in rows])
    with pytest.raises(VersionLoadError, match="no-such-model"):  # v3: its tasks name another base model
        served.load_subspace(env.store.get("v3"))
    assert served.predict([task for task, _ in rows], [text for _, text in rows]) == before  # v1 still served


def test_serve_without_the_tag_names_the_command_that_sets_it(env, capsys) -> None:
    from jobs.cli import main

    code = main(["serve", "--redis-url", env.url, "--namespace", env.store.namespace, "--tag", "canary"])
    err = capsys.readouterr().err
    assert code == 2 and f"sharecl tag head canary --namespace {env.store.namespace}" in err, err
    code = main(["serve", "--redis-url", env.url, "--namespace", env.store.namespace, "--max-batch-size", "0"])
    assert code == 2 and "--max-batch-size must be >= 1" in capsys.readouterr().err
