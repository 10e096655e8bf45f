"""Reading a version's payloads fast: pipelined GETs, checksum and decode overlapped in threads.

Payloads are fetched in pipelined batches of a few megabytes (one round-trip each); while the next
batch is on the wire, worker threads verify the previous ones' sha256 and decode them (hashlib,
numpy and torch copies release the GIL).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from .errors import CorruptPayloadError, VersionNotFoundError
from .payloads import PayloadFormatError, sha256

_BATCH_BYTES = 8 << 20  # payload bytes per pipelined round-trip
_INLINE_BYTES = 256 << 10  # smaller payloads are decoded inline: a thread hop would cost more
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass
class Item:
    key: str
    sha256: str
    size: int
    decode: Callable[[bytes], Any]


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sharecl-decode")
        return _pool


def check_and_decode(version: str, item: Item, data: bytes | None) -> Any:
    if data is None:
        raise VersionNotFoundError(
            f"version {version}: payload {item.key!r} is gone (the version was pruned while reading); "
            "pin versions you read with SubspaceStore.pin, or read another version"
        )
    if len(data) != item.size:
        raise CorruptPayloadError(version, item.key, f"has {len(data)} bytes, the manifest records {item.size}")
    if sha256(data) != item.sha256:
        raise CorruptPayloadError(version, item.key, "does not match its sha256 checksum")
    try:
        return item.decode(data)
    except (PayloadFormatError, KeyError) as err:
        raise CorruptPayloadError(version, item.key, f"cannot be decoded ({err})") from None


def _batches(items: list[Item]) -> list[list[int]]:
    out: list[list[int]] = [[]]
    size = 0
    for i, item in enumerate(items):
        if out[-1] and size + item.size > _BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += item.size
    return out


def fetch_all(client: redis.Redis, version: str, items: list[Item]) -> list[Any]:
    """GET every item's key, verify and decode it; results in ``items`` order."""
    results: list[Any] = [None] * len(items)
    futures: list[tuple[int, Future[Any]]] = []
    pool = _executor()
    try:
        for batch in _batches(items):
            pipe = client.pipeline(transaction=False)
            for i in batch:
                pipe.get(items[i].key)
            for i, data in zip(batch, pipe.execute(), strict=True):
                if data is not None and len(data) >= _INLINE_BYTES:
                    futures.append((i, pool.submit(check_and_decode, version, items[i], data)))
                else:
                    results[i] = check_and_decode(version, items[i], data)
        for i, future in futures:
            results[i] = future.result()
    finally:
        for _, future in futures:
            future.cancel()
    return results
