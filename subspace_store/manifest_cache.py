"""A per-process cache of checked version manifests, and of which version a ref named last.

Reading a version parses and checks its JSON manifest (``codec.read_manifest``): at T=10000 tasks that
is megabytes of JSON and most of a one-task pull. Versions never change once committed, so a process
keeps what it checked, keyed by (Redis server, namespace, version), together with the raw bytes it
came from. A reader still GETs the manifest every time (one command in the round trip that resolves
the ref) and reuses the checked one only if the bytes are equal to the cached ones (compared in full:
a manifest rewritten in Redis after it was cached is parsed and checked again, a pruned one is not
found). What is checked depends only on the bytes, the namespace and the version, so the server in the
key only keeps servers from evicting each other.

Bounded by entries and by estimated memory (least recently used goes first), thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Generic, TypeVar

from redis.cluster import RedisCluster

V = TypeVar("V")
DEFAULT_MAX_ENTRIES = 64
DEFAULT_MAX_BYTES = 512 << 20
# Parsed JSON takes about 3.6x its text in Python objects (measured on a T=10000 manifest); with the raw copy, 5x.
MEMORY_PER_BYTE = 5
_MAX_REFS = 1024


class ManifestCache(Generic[V]):
    """(server, namespace, version) -> (raw manifest bytes, checked manifest); LRU within both bounds."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], tuple[bytes, V, int]] = OrderedDict()  # raw, value, cost
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def lookup(self, key: tuple[Any, ...], raw: bytes) -> V | None:
        """The value cached for ``key`` if it was made from exactly ``raw``; else None (a stale entry is dropped)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0] == raw:
                self._items.move_to_end(key)
                self.hits += 1
                return item[1]
            if item is not None:
                self._drop(key)
            self.misses += 1
            return None

    def put(self, key: tuple[Any, ...], raw: bytes, value: V, size: int | None = None) -> None:
        """Remember ``value`` (made from ``raw``); one larger than the whole budget is not kept. ``size``: the JSON
        bytes ``value`` holds when that is not ``raw`` (a format-4 manifest also holds what its payloads give)."""
        cost = (len(raw) if size is None else size) * MEMORY_PER_BYTE
        with self._lock:
            if key in self._items:
                self._drop(key)
            if cost > self.max_bytes or self.max_entries < 1:
                return
            self._items[key] = (bytes(raw), value, cost)
            self._bytes += cost
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def forget(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            if key in self._items:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Estimated memory held (``MEMORY_PER_BYTE`` per byte of manifest JSON held)."""
        return self._bytes

    def _drop(self, key: tuple[Any, ...]) -> None:
        _, _, cost = self._items.pop(key)
        self._bytes -= cost


class RefMemory:
    """(server, namespace, ref) -> the version that ref named last: a guess that lets a reader GET the
    ref and that version's manifest in one round trip (checked: a wrong guess costs one more)."""

    def __init__(self, size: int = _MAX_REFS) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def guess(self, key: tuple[Any, ...]) -> str | None:
        with self._lock:
            return self._items.get(key)

    def remember(self, key: tuple[Any, ...], version: str) -> None:
        with self._lock:
            self._items[key] = version
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def server_identity(client: Any) -> tuple[Any, ...]:
    """Which Redis ``client`` talks to, as a hashable key: host, port, db, socket path (a cluster: startup nodes)."""
    if isinstance(client, RedisCluster):
        nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None) or {}
        return ("cluster", *sorted(str(name) for name in nodes)) if nodes else ("client", id(client))
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return ("client", id(client))
    return ("redis", kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0), kwargs.get("path"))


MANIFESTS: ManifestCache[Any] = ManifestCache()  # the process's cache (values: codec.CheckedManifest)
REFS = RefMemory()


def clear() -> None:
    """Forget every cached manifest and ref (tests; a process that wants its memory back)."""
    MANIFESTS.clear()
    REFS.clear()
