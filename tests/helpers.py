"""Plain helpers several test files share (fixtures live in ``conftest.py``). Import as ``from helpers import ...``
(pytest puts ``tests/`` on the path). Heavy imports stay inside the functions, so importing this is cheap."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from share import LoraAdapter
    from subspace_store import SubmissionStream

# The fuzz tests' bounds: 200 examples per test, no deadline, no example database (that would be a write).
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def json_strategy(words: list[str], max_leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON value (NaN, infinities and integers past 64 bits included), its strings and keys often from
    ``words`` (the keys a decoder looks for, so random documents often hit a field that matters)."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.sampled_from(words)
        | st.text(max_size=12)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.sampled_from(words) | st.text(max_size=6), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def servers_on(folder: Path) -> list[int]:
    """Pids of live (not zombie) redis-server processes whose working directory is ``folder`` (the server
    runs in its data folder), found by scanning ``/proc``: real processes, not what the launcher believes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
            if os.readlink(entry / "cwd") != str(folder.resolve()):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return sorted(found)


def peft_folder(folder: Path, r: int = 2, seed: int = 7, modules_to_save: list[str] | None = None) -> Path:
    """A real PEFT LoRA folder (``save_pretrained``) for the tiny model's query and value layers, with
    trained-looking (seeded, nonzero) ``lora_B`` weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from test_workers_task import tiny_builder

    model, _ = tiny_builder(None, 2, seed=seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts lora_B at zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


def write_tiny_job(
    folder: Path,
    tasks: list[dict[str, str]],
    redis_url: str,
    namespace: str,
    mlflow_uri: str,
    *,
    steps: int = 4,
    k_max: int = 8,
    max_retries: int = 0,
) -> Path:
    """``folder/job.yaml``: a job of the tiny model on ``tasks`` (``{"name", "train"[, "eval"]}`` entries)."""
    import yaml
    from test_workers_task import TINY_BUILDER

    job: dict[str, Any] = {
        "model": {"builder": TINY_BUILDER, "max_length": 8},
        "adapter": {"r": 2, "p": 2, "phi": 1, "k_max": k_max},
        "training": {"steps": steps, "batch_size": 8, "lr": 0.05, "log_every": 2},
        "tasks": tasks,
        "cluster": {"num_cpus_per_task": 1, "max_retries": max_retries},
        "store": {"redis_url": redis_url, "namespace": namespace},
        "tracking": {"mlflow_uri": mlflow_uri},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (keys and list indices), the root's ``()`` first."""
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += json_paths(child, (*prefix, i))
    return out


def edit_randomly(
    data: st.DataObject, document: Any, paths: list[tuple[Any, ...]], values: st.SearchStrategy[Any]
) -> Any:
    """1-3 random edits of ``document`` in place (delete the value at one of ``paths``, or replace it with one of
    ``values``); a path an earlier edit removed is skipped. Returns ``document``."""
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = document
        try:
            for part in path[:-1]:
                parent = parent[part]
            if data.draw(st.booleans()):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the path
    return document


def small_adapter(seed: int, rank: int | tuple[int, int] = 2) -> LoraAdapter:
    """A seeded random adapter on modules ``enc.q`` and ``enc.v`` (20 x 12 layers; ``rank`` for both, or one per
    module in that order) with a ``cls.weight`` head of 3 classes and ``{"seed": seed}`` as its metadata."""
    import torch

    from share import LoraAdapter

    ranks = (rank, rank) if isinstance(rank, int) else rank
    gen = torch.Generator().manual_seed(seed)
    factors = {
        m: (torch.randn(20, r, generator=gen), torch.randn(r, 12, generator=gen))
        for m, r in zip(("enc.q", "enc.v"), ranks, strict=True)
    }
    return LoraAdapter(factors=factors, head={"cls.weight": torch.randn(3, 12, generator=gen)}, metadata={"seed": seed})


def write_unchecked(stream: SubmissionStream, task: str, adapter: LoraAdapter) -> str:
    """``adapter`` as task ``task``, written straight into ``stream`` in the entry format ``submit`` writes but
    without any of its checks (what an older or hostile client could write). Returns the entry id."""
    from subspace_store.outcomes import SubmissionKind
    from subspace_store.payloads import encode_tensors, sha256

    tensors = {f"{part}:{m}": t for m, (B, A) in adapter.factors.items() for part, t in (("B", B), ("A", A))}
    tensors.update({f"head:{name}": t for name, t in adapter.head.items()})
    data = encode_tensors(tensors)
    payload_key = stream.keys.submission_payload(uuid.uuid4().hex)
    stream.client.set(payload_key, data)
    stream.ensure_group()
    entry = {
        "task": task,
        "base_version": "",
        "payload_key": payload_key,
        "sha256": sha256(data),
        "bytes": str(len(data)),
        "kind": SubmissionKind.ADAPTER.value,
        "scaling": json.dumps({m: adapter.scale(m) for m in adapter.factors}),
        "adapter_metadata": "{}",
        "metadata": "{}",
    }
    return stream.client.xadd(stream.keys.stream, entry).decode()
