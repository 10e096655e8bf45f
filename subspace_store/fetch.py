"""Reading a version's payloads fast: checksum and decode overlapped with the transfer.

Large payloads (bases) are read one by one into writable buffers (``rawget``); while the next one
arrives, worker threads verify the previous ones' sha256 and decode them in place (hashlib and
``recv_into`` release the GIL, so on two cores both run at once). Small payloads (task
coefficients, small bases) are fetched in pipelined batches, a few round-trips in all, into one
writable buffer per batch (``RawGetter.many``), and each is checked and decoded in place as it
arrives, on this thread: handing payloads of a few KiB to threads costs more than hashing them (on
two busy cores, a third more CPU and wall time). Checks come in item order: present, its size, its
sha256, then its decoding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from .errors import CorruptPayloadError, VersionNotFoundError
from .payloads import PayloadFormatError, sha256
from .rawget import RawGetter

_BATCH_BYTES = 2 << 20  # small-payload bytes per pipelined round-trip
_INLINE_BYTES = 256 << 10  # payloads from this size on take the large-payload path
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


@dataclass
class Item:
    key: str
    sha256: str
    size: int
    decode: Callable[[bytes], Any]


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked child does not inherit the threads
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sharecl-decode")
            _pool_pid = os.getpid()
        return _pool


def check_and_decode(version: str, item: Item, data: bytes | memoryview | None, verify: bool = True) -> Any:
    if data is None:
        raise VersionNotFoundError(
            f"version {version}: payload {item.key!r} is gone (the version was pruned while reading); "
            "pin versions you read with SubspaceStore.pin, or read another version"
        )
    if len(data) != item.size:
        raise CorruptPayloadError(version, item.key, f"has {len(data)} bytes, the manifest records {item.size}")
    if verify and sha256(data) != item.sha256:
        raise CorruptPayloadError(version, item.key, "does not match its sha256 checksum")
    try:
        return item.decode(data)
    except (PayloadFormatError, KeyError) as err:
        raise CorruptPayloadError(version, item.key, f"cannot be decoded ({err})") from None


def _batches(items: list[Item], indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = [[]]
    size = 0
    for i in indices:
        if out[-1] and size + items[i].size > _BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(i)
        size += items[i].size
    return [batch for batch in out if batch]


def _small_batch(get: RawGetter, version: str, items: list[Item], batch: list[int], verify: bool) -> list[Any]:
    """One pipelined round trip; each value checked and decoded in place as it arrives."""
    replies = get.many([items[i].key for i in batch], [items[i].size for i in batch])
    try:
        return [check_and_decode(version, items[batch[j]], value, verify) for j, value in replies]
    finally:
        replies.close()  # before the connection goes back to the pool (it drops the connection if half-read)


def fetch_all(client: redis.Redis, version: str, items: list[Item], verify: bool = True) -> list[Any]:
    """GET every item's key, verify (sha256, unless ``verify=False``) and decode it; results in ``items`` order."""
    results: list[Any] = [None] * len(items)
    futures: list[tuple[int, Future[Any]]] = []
    pool = _executor()
    large = [i for i, item in enumerate(items) if item.size >= _INLINE_BYTES]
    small = [i for i, item in enumerate(items) if item.size < _INLINE_BYTES]
    try:
        with RawGetter(client) as get:
            # Large payloads: read into writable buffers; threads hash and decode one while the next arrives.
            for i in large:
                data = get(items[i].key)
                futures.append((i, pool.submit(check_and_decode, version, items[i], data, verify)))
            # Small payloads: a few pipelined round-trips, decoded here (a thread hop would cost more).
            for batch in _batches(items, small):
                for i, outcome in zip(batch, _small_batch(get, version, items, batch, verify), strict=True):
                    results[i] = outcome
        for i, future in futures:
            results[i] = future.result()
    finally:
        for _, future in futures:
            future.cancel()
    return results
