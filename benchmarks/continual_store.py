"""One result per (method, seed), saved as it finishes, so a rerun resumes and processes can share a run.

Layout under ``<out>/continual-<label>/``: ``<method>-seed<seed>.json`` per finished pair and
``.claims/<job>-seed<seed>`` while a process works on one. Every result carries a ``key``: a digest of
the data and of everything that decides the method's training (its hyperparameters, merge policy).
A stored result with another key is never mixed in: the run stops and names the file. A pair missing
here is copied from a sibling run folder that holds it under the same key (the sweep reuses the full
run's ``share``, ``lora-per-task``, ...). Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from benchmarks.cl_metrics import backward_transfer, final_accuracy, merge_loss
from share.errors import ShareClError


@dataclass
class MethodResult:
    method: str
    seed: int
    tasks: list[str]
    R: list[list[float]]  # R[i][j]: accuracy on task j after task i (NaN for j > i)
    just_trained: list[float]  # accuracy on task j right after training it (before any merge)
    key: str = ""
    acc: float = 0.0
    bwt: float = 0.0
    merge_loss: float = 0.0
    trained_params_per_task: list[int] = field(default_factory=list)
    stored_params: int = 0
    stored_params_without_heads: int = 0
    stored_bytes: int = 0
    wall_time_s: float = 0.0
    hyper: dict[str, Any] = field(default_factory=dict)  # every hyperparameter that decided the result
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific numbers (k, errors, chosen lr, ...)

    def finish(self) -> MethodResult:
        self.acc = final_accuracy(self.R)
        self.bwt = backward_transfer(self.R, self.just_trained)
        self.merge_loss = merge_loss(self.R, self.just_trained)
        return self

    def to_json(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodResult:
        known = {f.name for f in fields(cls)}
        result = cls(**{k: v for k, v in data.items() if k in known})
        result.R = [[math.nan if v is None else v for v in row] for row in result.R]
        return result


def _nan_to_none(value: Any) -> Any:
    """Strict JSON (no NaN literal): NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def result_key(data_fingerprint: str, method: dict[str, Any], hyper: dict[str, Any]) -> str:
    """The digest that decides whether a stored result may stand in for a run: data, method, hyperparameters."""
    blob = json.dumps({"data": data_fingerprint, "method": method, "hyper": hyper}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)

    def path(self, method: str, seed: int) -> Path:
        return self.run_dir / f"{method}-seed{seed}.json"

    def load(self, method: str, seed: int, key: str) -> MethodResult | None:
        """The stored result of (method, seed) under ``key``, copied from a sibling run if need be; else None."""
        path = self.path(method, seed)
        if path.is_file():
            result = MethodResult.from_json(json.loads(path.read_text(encoding="utf-8")))
            if result.key != key:
                raise ShareClError(
                    f"{path} holds {method} seed {seed} from other data or settings (key {result.key}, this run "
                    f"{key}); delete that file to recompute it, or give this run another --label or --out"
                )
            return result
        for sibling in sorted(self.run_dir.parent.glob(f"*/{path.name}")):
            if sibling == path:
                continue
            try:
                data = json.loads(sibling.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("key") == key:
                result = MethodResult.from_json(data)
                result.extra = {**result.extra, "reused_from": str(sibling)}
                self.save(result)
                return result
        return None

    def save(self, result: MethodResult) -> Path:
        path = self.path(result.method, result.seed)
        write_json_atomic(path, result.to_json())
        return path

    def all(self) -> list[MethodResult]:
        """Every stored result of this run (any process's)."""
        results = []
        for path in sorted(self.run_dir.glob("*-seed*.json")):
            results.append(MethodResult.from_json(json.loads(path.read_text(encoding="utf-8"))))
        return results

    @contextmanager
    def claim(self, job: str, seed: int) -> Iterator[bool]:
        """Yields True when this process may run (job, seed): no live process holds it. Released after."""
        claims = self.run_dir / ".claims"
        claims.mkdir(exist_ok=True)
        path = claims / f"{job}-seed{seed}"
        owner = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if _claim_is_live(path):
                    yield False
                    return
                path.unlink(missing_ok=True)  # its process is gone: take the pair over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(owner)
            try:
                yield True
            finally:
                path.unlink(missing_ok=True)
            return
        yield False


def _claim_is_live(path: Path) -> bool:
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # another machine's process: assume it is alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
