"""What a ``sharecl serve`` replica does, without Ray Serve: follow a tag, answer batches of queries.

``Engine`` owns a ``ServedModel`` and a ``subspace_store.deploy.TagFollower`` that installs every version
the tag moves to. ``answer(queries)`` holds one version (the follower's read lock) for a whole batch and
runs one mixed-task forward for all of its rows, so a swap happens between batches and every answer
names the version that computed it; should that forward fail, each request runs alone and only one that
fails by itself gets a 500 (with the reason; the traceback is logged). A version that fails to load is
logged once and skipped until the tag moves again; the old one keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from subspace_store import Loaded, SubspaceStore, TagFollower, VersionNotFoundError

from .model import ServedModel, ServeError, VersionLoadError
from .requests import Query

log = logging.getLogger("ray.serve")  # Serve keeps replica logs of this logger (and shows them on the driver)


@dataclass
class Answer:
    """One request's result: an HTTP status and the JSON body."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


class _Follower(TagFollower):
    """A ``TagFollower`` that does not pull a version again once it failed to install (until the tag moves)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.failed: dict[str, str] = {}  # version -> why it could not be installed
        super().__init__(*args, **kwargs)

    def poll(self) -> bool:
        version = self.store.resolve(self.tag)
        if version in self.failed:
            return False
        try:
            return super().poll()
        except VersionLoadError as err:
            self.failed[version] = str(err)
            raise VersionLoadError(f"version {version} (tag {self.tag!r}) cannot be served: {err}") from err


class Engine:
    def __init__(
        self,
        store: SubspaceStore,
        tag: str = "prod",
        *,
        poll_s: float = 2.0,
        device: str | None = None,
        max_length: int | None = None,
        chunk_rows: int = 256,
        on_swap: Callable[[Loaded], None] | None = None,
    ) -> None:
        self.store = store
        self.tag = tag
        self.model = ServedModel(device=device, max_length=max_length, chunk_rows=chunk_rows)
        self.swaps = 0
        self.batches = 0  # batches answered, requests in them, and batches that mixed several tasks
        self.requests = 0
        self.mixed_batches = 0
        self._on_swap = on_swap
        self._last_error: str | None = None
        try:
            self.follower = _Follower(
                store, tag, model=self.model, interval_s=poll_s, on_swap=self._swapped, on_error=self._failed
            )
        except VersionNotFoundError as err:
            raise ServeError(
                f"cannot serve tag {tag!r} of namespace {store.namespace!r}: {err}. Point the tag at a version "
                f"first: `sharecl tag head {tag} --namespace {store.namespace}`"
            ) from None
        except VersionLoadError as err:
            raise ServeError(f"cannot serve namespace {store.namespace!r}: {err}") from None

    # -- following -------------------------------------------------------------------------------
    def start(self) -> Engine:
        self.follower.start()
        return self

    def stop(self) -> None:
        self.follower.stop()

    @property
    def version(self) -> str | None:
        return self.follower.version

    def _swapped(self, loaded: Loaded) -> None:
        self.swaps += 1
        log.info(
            "sharecl serve: now serving %s (tag %r of namespace %r, %d tasks)",
            loaded.version,
            self.tag,
            self.store.namespace,
            len(loaded.subspace.tasks),
        )
        if self._on_swap is not None:
            self._on_swap(loaded)

    def _failed(self, err: Exception) -> None:
        message = f"{err}; still serving {self.version}"
        if message != self._last_error:  # a Redis outage is reported once, not every poll
            log.warning("sharecl serve: %s", message)
            self._last_error = message

    # -- answering -------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        current = self.follower.current
        body: dict[str, Any] = {
            "status": "ok",
            "version": current.version if current else None,
            "tag": self.tag,
            "namespace": self.store.namespace,
            "tasks": len(current.subspace.tasks) if current else 0,
            "batches": self.batches,
            "requests": self.requests,
            "mixed_batches": self.mixed_batches,
        }
        if self.follower.failed:
            body["not_served"] = dict(self.follower.failed)
        return body

    def known(self, task: str) -> Answer | None:
        """A 404 answer when the version being served has no task ``task`` (checked again at the forward)."""
        current = self.follower.current
        if current is not None and task in current.subspace.tasks:
            return None
        return self._unknown(task, current)

    def _unknown(self, task: str, loaded: Loaded | None) -> Answer:
        count = len(loaded.subspace.tasks) if loaded else 0
        version = loaded.version if loaded else None
        return Answer(
            404,
            {
                "error": f"unknown task {task!r}: version {version} (tag {self.tag!r}) serves {count} tasks; "
                "GET /tasks lists them",
                "known_tasks": count,
                "version": version,
            },
        )

    def tasks(self) -> dict[str, Any]:
        with self.follower.request() as loaded:
            return {"version": loaded.version, "tasks": {t: self.model.labels[t] for t in loaded.subspace.tasks}}

    def answer(self, queries: Sequence[Query]) -> list[Answer]:
        """Answer every query on one version, with one mixed-task forward over all their rows. If that forward
        fails, each query is run alone, so only a query that fails by itself gets an error (a 500)."""
        with self.follower.request() as loaded:
            served = [q for q in queries if q.task in loaded.subspace.tasks]
            started = time.perf_counter()
            results = iter(self._predict(served))
            elapsed = time.perf_counter() - started
            answers = [
                self._answered(q, next(results), loaded.version)
                if q.task in loaded.subspace.tasks
                else self._unknown(q.task, loaded)
                for q in queries
            ]
            self.batches += 1
            self.requests += len(queries)
            self.mixed_batches += len({q.task for q in served}) > 1
            rows = sum(len(q.inputs) for q in served)
            log.debug("sharecl serve: %d requests, %d rows in %.3fs on %s", len(queries), rows, elapsed, loaded.version)
        return answers

    def _predict(self, queries: Sequence[Query]) -> list[list[int] | Exception]:
        """Each query's class indices from one forward over all their rows; if it raises, each query's own
        forward (alone), and a query that fails alone gets its exception. Logged: the shared forward's failure
        once with its traceback, then one line per query that fails alone too (a lone query: its traceback)."""
        if not queries:
            return []
        try:
            return self._forward(queries)
        except Exception as err:
            if len(queries) == 1:
                log.exception("sharecl serve: a request for task %r failed in the model", queries[0].task)
                return [err]
            log.warning(
                "sharecl serve: the shared forward of %d requests failed in the model; running each alone",
                len(queries),
                exc_info=True,
            )
        out: list[list[int] | Exception] = []
        for q in queries:
            try:
                out.append(self._forward([q])[0])
            except Exception as err:
                log.warning(
                    "sharecl serve: a request for task %r failed alone too: %s: %s", q.task, type(err).__name__, err
                )
                out.append(err)
        return out

    def _forward(self, queries: Sequence[Query]) -> list[list[int]]:
        """Each query's class indices from one forward over all their rows (raises what the model raises)."""
        rows = self.model.predict([q.task for q in queries for _ in q.inputs], [t for q in queries for t in q.inputs])
        out: list[list[int]] = []
        at = 0
        for q in queries:
            out.append(rows[at : at + len(q.inputs)])
            at += len(q.inputs)
        return out

    def _answered(self, query: Query, result: list[int] | Exception, version: str) -> Answer:
        if isinstance(result, Exception):
            return Answer(
                500,
                {
                    "error": f"the model failed on this request ({type(result).__name__}: {result}); the server's "
                    "log has the traceback: please report it",
                    "version": version,
                },
            )
        names = self.model.labels[query.task]
        return Answer(
            200,
            {
                "task": query.task,
                "predictions": result,
                "labels": [names[p] if 0 <= p < len(names) else str(p) for p in result],
                "version": version,
            },
        )
