"""The Ray Serve application of ``sharecl serve``: one deployment that answers for every task of a tag.

build_app(namespace, redis_url, tag="prod", **options) -> serve.Application   # serve.run(app, route_prefix=...)

Routes (FastAPI ingress):

- ``POST /predict`` ``{"task": "...", "inputs": ["text", ...]}`` -> ``{"task", "predictions": [int],
  "labels": [name], "version": "vN"}``; 404 for a task the version being served lacks, 400/413/422 for
  a bad body, each with ``{"error": reason}``. A body over 4 MiB is refused by its Content-Length, else
  as soon as that much is read (``read_body``), before the rest arrives.
- ``GET /health`` -> ``{"status": "ok", "version", "tag", "namespace", "tasks": N}``.
- ``GET /tasks`` -> ``{"version", "tasks": {task: [label names]}}``.

Requests are batched across tasks by ``@serve.batch`` (``max_batch_size`` requests, waiting at most
``batch_wait_ms``); a batch is answered by one mixed-task forward on one version (``engine.Engine``).
Options (keywords of ``build_app``, all optional): ``poll_s`` (how often the tag is read, 2.0),
``max_batch_size`` (32), ``batch_wait_ms`` (10), ``max_inputs`` (texts per request, 64), ``max_chars``
(characters per text, 20000), ``max_length`` (tokens per text; default the jobs' model.max_length),
``chunk_rows`` (rows per forward, 256), ``device`` (default: cuda on a replica given GPUs, else cpu),
``num_replicas`` (1), ``num_cpus`` (1), ``num_gpus`` (0), ``threads`` (torch threads per replica;
default torch's).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations (``Request``) as
# objects; as strings, Serve's ingress leaves them unresolved and every request gets a 422.
import asyncio
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from .engine import Answer, Engine
from .requests import Limits, Query, RequestError, check_size, parse_predict

DEFAULTS: dict[str, Any] = {
    "poll_s": 2.0,
    "max_batch_size": 32,
    "batch_wait_ms": 10.0,
    "max_inputs": Limits.max_inputs,
    "max_chars": Limits.max_chars,
    "max_length": None,
    "chunk_rows": 256,
    "device": None,
    "num_replicas": 1,
    "num_cpus": 1.0,
    "num_gpus": 0.0,
    "threads": None,
}
DEPLOYMENT_NAME = "sharecl-serve"

api = FastAPI(title="sharecl serve", description="Every task of a Share subspace version, from one model.")


def _json(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body; a 413 ``RequestError`` when its Content-Length is over ``limits.max_body_bytes``,
    or as soon as the bytes read are (the rest is not read, so a large body never sits in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit():
        check_size(int(declared), limits)
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            check_size(len(body), limits, so_far=True)
    return bytes(body)


@serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=1)
@serve.ingress(api)
class ShareServer:
    def __init__(self, namespace: str, redis_url: str, tag: str, options: dict[str, Any]) -> None:
        import torch

        from subspace_store import SubspaceStore, connect
        from subspace_store.connection import outlast_restarts
        from workers.run_task import quiet_hugging_face

        quiet_hugging_face()  # no "Loading weights" bars in the replica's log

        if options["threads"]:
            torch.set_num_threads(int(options["threads"]))
        self.limits = Limits(max_inputs=int(options["max_inputs"]), max_chars=int(options["max_chars"]))
        store = SubspaceStore(outlast_restarts(connect(redis_url)), namespace)
        self.engine = Engine(
            store,
            tag,
            poll_s=float(options["poll_s"]),
            device=options["device"],
            max_length=options["max_length"],
            chunk_rows=int(options["chunk_rows"]),
        ).start()
        self._batched.set_max_batch_size(int(options["max_batch_size"]))
        self._batched.set_batch_wait_timeout_s(float(options["batch_wait_ms"]) / 1000.0)

    @serve.batch(max_batch_size=DEFAULTS["max_batch_size"], batch_wait_timeout_s=DEFAULTS["batch_wait_ms"] / 1000.0)
    async def _batched(self, queries: list[Query]) -> list[Answer]:
        # The forward runs in a thread: the replica's event loop keeps accepting (and batching) requests.
        return await asyncio.to_thread(self.engine.answer, queries)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        try:
            query = parse_predict(await read_body(request, self.limits), self.limits)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        unknown = self.engine.known(query.task)
        if unknown is not None:
            return _json(unknown)
        return _json(await self._batched(query))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse(self.engine.health())

    @api.get("/tasks")
    async def tasks(self) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(self.engine.tasks))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def build_app(namespace: str, redis_url: str, tag: str = "prod", **options: Any) -> serve.Application:
    """The ``sharecl serve`` application for ``tag`` of ``namespace`` (options: see the module docstring).

    ``redis_url`` must be reachable from the replicas (``subspace_store.resolve_url`` gives the embedded
    server's). Run it with ``serve.run(app, route_prefix="/")``.
    """
    settings = _settings(options)
    batch = int(settings["max_batch_size"])
    deployment = ShareServer.options(
        num_replicas=int(settings["num_replicas"]),
        # Enough requests in flight per replica to fill a batch while the previous one runs.
        max_ongoing_requests=max(2 * batch, 8),
        ray_actor_options={"num_cpus": float(settings["num_cpus"]), "num_gpus": float(settings["num_gpus"])},
    )
    return deployment.bind(namespace, redis_url, tag, settings)


_AT_LEAST = {  # option -> smallest value it takes
    "poll_s": 0.01,
    "max_batch_size": 1,
    "batch_wait_ms": 0,
    "max_inputs": 1,
    "max_chars": 1,
    "max_length": 1,
    "chunk_rows": 1,
    "num_replicas": 1,
    "num_cpus": 0,
    "num_gpus": 0,
    "threads": 1,
}


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` updated with ``options``; a ``ServeError`` naming every unknown or out-of-range one."""
    from .model import ServeError

    problems = [f"unknown option {k!r}" for k in sorted(set(options) - set(DEFAULTS))]
    for key, low in _AT_LEAST.items():
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            problems.append(f"{key} must be a number >= {low}, got {value!r}")
    if options.get("device") is not None and not isinstance(options["device"], str):
        problems.append(f"device must be a torch device name such as 'cpu' or 'cuda', got {options['device']!r}")
    if problems:
        raise ServeError(f"build_app: {'; '.join(problems)} (options: {', '.join(sorted(DEFAULTS))})")
    return {**DEFAULTS, **options}
