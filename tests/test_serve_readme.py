"""The README's serve block, run as written: ``sharecl serve --tag prod`` started as a user would (the venv's
``sharecl`` script, in a subprocess), then its ``curl`` line run literally from another "shell".

The store holds two versions of a tiny random-init BERT (``test_serve.tiny_bert``) with the tasks
``wn_things`` (the one the README asks) and ``colour``; ``prod`` names the first version while the head is the
second, whose ``wn_things`` head is reversed, so the answer shows which version was served. This module is
apart from ``test_serve.py``: that module's in-process Ray Serve must be gone before the CLI starts its own on
port 8000, the README's port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from test_serve import HIDDEN, MODULES, adapter, pooled, tiny_bert

from share import KPolicy, Subspace, merge
from subspace_store import SubspaceStore
from workers.models import DEFAULT_BUILDER, build_text_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
SHARECL = Path(sys.executable).parent / "sharecl"
LABELS = {"wn_things": ["noun.plant", "noun.animal", "noun.artifact"], "colour": ["red", "green"]}
PORT = 8000  # the README's
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def serve_block() -> list[str]:
    """The lines of the ```bash block of the README's "Using it" section whose first line is `sharecl serve`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Using it\n")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = [b.strip().splitlines() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]
    (block,) = [b for b in blocks if b and b[0].startswith("sharecl serve")]
    return block


def subspace_of(model: Path, readme_text: str, *, flip: bool) -> Subspace:
    """Both tasks with the metadata a job's submission leaves; ``wn_things``'s head answers label 1 for the
    README's text (label 0 with ``flip``): its rows are -f, f, 0 (f, -f, 0), f the text's pooled features."""
    subspace, _ = merge(None, {t: adapter(i) for i, t in enumerate(LABELS)}, KPolicy(variance=1.0))
    for task, names in LABELS.items():
        zeros = {"head.weight": torch.zeros(len(names), HIDDEN), "head.bias": torch.zeros(len(names))}
        subspace.tasks[task].head = zeros
        classifier, tokenizer = build_text_classifier(str(model), len(names), seed=0)
        with torch.no_grad():
            for name in MODULES:
                classifier.get_submodule(name).weight += subspace.delta_weight(task, name)
        features, _ = pooled(classifier.eval(), tokenizer, [readme_text])
        sign = -1.0 if flip else 1.0
        rows = [-sign * features[0], sign * features[0]] + [torch.zeros(HIDDEN)] * (len(names) - 2)
        subspace.tasks[task].head["head.weight"] = torch.stack(rows) * 10
        submitted = {
            "builder": DEFAULT_BUILDER,
            "model_name_or_path": str(model),
            "dtype": "float32",
            "max_length": 16,
            "label_names": names,
        }
        subspace.tasks[task].metadata["submission"] = {"id": f"0-{task}", "base_version": None, "metadata": submitted}
    return subspace


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def health(port: int) -> dict | None:
    """``GET /health``'s JSON, or None while nothing (or not yet the app) answers."""
    import requests

    try:
        response = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def tail(log: Path, n: int = 40) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    return "\n".join(lines[-n:])


@pytest.mark.slow
def test_readme_serve_block_runs_as_written(tmp_path: Path, redis_server: str, namespace: str) -> None:
    serve_line, curl_line = serve_block()
    serve_argv, curl_argv = shlex.split(serve_line), shlex.split(curl_line)
    assert serve_argv[0] == "sharecl" and curl_argv[0] == "curl", (serve_line, curl_line)
    assert f"127.0.0.1:{PORT}/predict" in curl_line, curl_line  # the port the server must listen on
    body = json.loads(curl_argv[curl_argv.index("-d") + 1])
    assert body["task"] == "wn_things" and len(body["inputs"]) == 1, body

    # The store after the job journey: `prod` tags v1 (the head is v2, its wn_things head reversed).
    model = tiny_bert(tmp_path / "bert")
    client = redis.Redis.from_url(redis_server)
    store = SubspaceStore(client, namespace)
    assert store.publish(subspace_of(model, body["inputs"][0], flip=False), None) == "v1"
    assert store.publish(subspace_of(model, body["inputs"][0], flip=True), "v1") == "v2"
    store.tag("v1", "prod")
    client.close()

    if port_in_use(PORT):
        pytest.fail(
            f"port {PORT} is taken (another server listens on 127.0.0.1:{PORT}; `ss -ltnp | grep :{PORT}` names it): "
            "the README's `sharecl serve` needs it. Stop that server and run this test again."
        )

    env = {
        **os.environ,
        "SHARECL_REDIS_URL": redis_server,
        "SHARECL_NAMESPACE": namespace,
        "SHARECL_HOME": str(tmp_path / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "serve.log"
    with log.open("w", encoding="utf-8") as out:
        server = subprocess.Popen(
            [str(SHARECL), *serve_argv[1:]],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a failed test can stop all it started
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (stats := health(PORT)) is None:
            assert server.poll() is None, f"sharecl serve exited with {server.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no answer on /health after {START_TIMEOUT_S:g}s:\n{tail(log)}"
            time.sleep(0.5)
        assert stats["status"] == "ok" and stats["version"] == "v1" and stats["tag"] == "prod", stats
        assert stats["namespace"] == namespace and stats["tasks"] == len(LABELS), stats

        answer = subprocess.run(curl_argv, capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, (answer.returncode, answer.stderr)
        assert json.loads(answer.stdout) == {
            "task": "wn_things",
            "predictions": [1],
            "labels": ["noun.animal"],
            "version": "v1",
        }, (answer.stdout, tail(log))

        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sharecl serve still runs {STOP_TIMEOUT_S:g}s after SIGTERM:\n{tail(log)}")
        assert code == 0, f"sharecl serve exited with {code} after SIGTERM:\n{tail(log)}"
        assert "[serve] stopping" in log.read_text(encoding="utf-8"), tail(log)
        deadline = time.monotonic() + 30
        while port_in_use(PORT):
            assert time.monotonic() < deadline, f"port {PORT} still answers 30s after sharecl serve exited"
            time.sleep(0.5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
