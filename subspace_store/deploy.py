"""Deployment: load a version into a model, and follow a tag between requests.

``load_version`` pulls a version (or only some tasks) and installs it into a torch model through
``share.model.ShareModel`` (the adapter point: ``_install``). ``TagFollower`` polls a tag; when it
moves, the new version is pulled in the background and swapped in under a readers-writer lock:
requests hold the read side for their whole duration, the swap waits for them to finish and holds
new requests back only for the swap itself. A request never sees two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from share import Subspace

from .store import SubspaceStore


@dataclass
class Loaded:
    """What a deployment serves: the version id, its subspace, and the model it was installed into."""

    version: str
    subspace: Subspace
    model: Any = None


def head_modules(subspace: Subspace) -> list[str]:
    """Module names that own task heads (head tensors are named ``<module>.<parameter>``)."""
    names = {key.rsplit(".", 1)[0] for task in subspace.tasks.values() for key in task.head if "." in key}
    return sorted(names)


def _install(model: Any, subspace: Subspace, heads: Sequence[str] | None) -> Any:
    """Install ``subspace`` into ``model``; returns the model to serve with.

    A ``ShareModel`` (anything with ``load_subspace``) is updated in place. A plain ``nn.Module`` is
    wrapped once in ``ShareModel`` with the subspace's module names as target modules.
    """
    if hasattr(model, "load_subspace"):
        model.load_subspace(subspace)
        return model
    try:
        from share.model import ShareModel
    except ImportError as err:
        raise ImportError(
            f"share.model is not available ({err}); pass a model with a load_subspace(subspace) method"
        ) from None
    wrapped = ShareModel(
        model, target_modules=list(subspace.modules), heads=head_modules(subspace) if heads is None else heads
    )
    wrapped.load_subspace(subspace)
    return wrapped


def load_version(
    store: SubspaceStore,
    ref: str = "head",
    model: Any = None,
    *,
    tasks: Sequence[str] | None = None,
    heads: Sequence[str] | None = None,
) -> Loaded:
    """Pull ``ref`` (version, tag or ``head``; only ``tasks`` if given) and install it into ``model``.

    Without a model, only the subspace is returned. ``heads`` names the model's head modules
    (default: derived from the tasks' head tensor names).
    """
    version = store.resolve(ref)
    subspace = store.get(version, tasks=tasks)
    served = _install(model, subspace, heads) if model is not None else None
    return Loaded(version=version, subspace=subspace, model=served)


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (so a swap cannot starve)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class TagFollower:
    """Serve the version a tag names, swapping in new versions only between requests.

    with TagFollower(store, "prod", model=model, interval_s=5) as follower:
        with follower.request() as loaded:   # loaded.version / .subspace / .model stay fixed inside
            out = loaded.model(x, tasks=[...])

    ``on_swap(loaded)`` runs after each swap, still under the lock (e.g. to log the new version).
    """

    def __init__(
        self,
        store: SubspaceStore,
        tag: str,
        model: Any = None,
        *,
        tasks: Sequence[str] | None = None,
        heads: Sequence[str] | None = None,
        interval_s: float = 5.0,
        on_swap: Callable[[Loaded], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.store = store
        self.tag = tag
        self.tasks = tasks
        self.heads = heads
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.on_error = on_error
        self._model = model
        self._lock = _ReadWriteLock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: Loaded | None = None
        self.poll()

    @property
    def version(self) -> str | None:
        return self.current.version if self.current else None

    @contextmanager
    def request(self) -> Iterator[Loaded]:
        """Hold the current version for the duration of one request."""
        with self._lock.read():
            if self.current is None:
                raise RuntimeError(f"tag {self.tag!r} has no version loaded yet")
            yield self.current

    def poll(self) -> bool:
        """Check the tag now; if it moved, pull the new version and swap it in. True if swapped."""
        with self._poll_lock:
            version = self.store.resolve(self.tag)
            if self.current is not None and version == self.current.version:
                return False
            subspace = self.store.get(version, tasks=self.tasks)  # pulled outside the lock: requests go on
            with self._lock.write():
                served = _install(self._model, subspace, self.heads) if self._model is not None else None
                if served is not None:
                    self._model = served
                self.current = Loaded(version=version, subspace=subspace, model=served)
                if self.on_swap is not None:
                    self.on_swap(self.current)
            return True

    def start(self) -> TagFollower:
        """Poll every ``interval_s`` seconds in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"sharecl-follow-{self.tag}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as err:  # keep serving the current version; report and retry next tick
                if self.on_error is not None:
                    self.on_error(err)

    def __enter__(self) -> TagFollower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
