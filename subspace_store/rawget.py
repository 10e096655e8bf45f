"""GETs straight into writable buffers (one copy: kernel to that buffer).

redis-py returns ``bytes`` after buffering each reply twice (socket chunks into a BytesIO, then out
of it), and ``bytes`` cannot back a writable tensor, so decoding would copy a third time. For
multi-megabyte payloads that copying costs as much as the transfer; for many small ones, redis-py's
per-reply parsing does. Here the commands go out over a pooled redis-py connection (its handshake,
AUTH, TLS and health checks as usual) and bulk replies are read with ``recv_into``: one value at a
time (``RawGetter.__call__``), or many pipelined GETs whose sizes are known (``RawGetter.many``),
each value at an aligned place of one buffer. Tensors can then be views of the buffer. Anything
unexpected drops the connection (so its state cannot leak into later commands) and falls back to
redis-py's GET.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

_HEADER_READ = 64
_CHUNK = 4 << 20
_ALIGN = 64  # where each value of RawGetter.many starts (cache line; any dtype's alignment)


class _Unsupported(Exception):
    """The connection or reply is not one this reader handles; use redis-py's GET."""


def _read_reply(sock: Any) -> memoryview | None:
    head = bytearray()
    while b"\r\n" not in head:
        chunk = sock.recv(_HEADER_READ)
        if not chunk:
            raise redis.ConnectionError("connection closed while reading a reply")
        head += chunk
    end = head.index(b"\r\n")
    line, rest = bytes(head[:end]), head[end + 2 :]
    if line[:1] == b"-":
        raise redis.ResponseError(line[1:].decode(errors="replace"))
    if line in (b"$-1", b"_"):  # nil in RESP2 / RESP3
        return None
    if line[:1] != b"$":
        raise _Unsupported(f"unexpected reply type {line[:1]!r}")
    size = int(line[1:])
    buf = bytearray(size + 2)  # the value and its trailing CRLF
    if len(rest) > len(buf):
        raise _Unsupported("more data than one reply")
    buf[: len(rest)] = rest
    view = memoryview(buf)
    got = len(rest)
    while got < len(buf):
        n = sock.recv_into(view[got:], min(len(buf) - got, _CHUNK))
        if n == 0:
            raise redis.ConnectionError("connection closed while reading a value")
        got += n
    if buf[-2:] != b"\r\n":
        raise _Unsupported("reply does not end with CRLF")
    return view[:size]  # writable, and no copy to drop the CRLF


def _slots(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each reply (``$<size>\\r\\n<value>\\r\\n``) goes in one buffer so that its value starts aligned."""
    starts, end = [], 0
    for size in sizes:
        head = len(b"$%d\r\n" % size)
        value = -(-(end + head) // _ALIGN) * _ALIGN
        starts.append(value - head)
        end = value + size + 2
    return starts, end


def _read_expected(sock: Any, view: memoryview, head: bytes) -> None:
    """Fill ``view`` with one reply expected to be ``head`` + value + CRLF; ``_Unsupported`` at any other.

    The received start is compared with ``head`` after every read: any other reply (nil, an error,
    another size) differs from it within its own first line, so a shorter reply never leaves this
    waiting for bytes that will not come.
    """
    got, checked = 0, 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, _CHUNK))
        if n == 0:
            raise redis.ConnectionError("connection closed while reading a reply")
        got += n
        if checked < len(head):
            have = min(got, len(head))
            if view[checked:have] != head[checked:have]:
                raise _Unsupported("a reply other than the expected value")
            checked = have
    if view[-2:] != b"\r\n":
        raise _Unsupported("reply does not end with CRLF")


def _pack_gets(conn: Any, keys: Sequence[str]) -> bytes:
    """``GET key`` for every key, as one RESP buffer (what ``pack_commands`` makes, at a tenth of its cost)."""
    encode = conn.encoder.encode
    parts = []
    for key in keys:
        name = encode(key)
        parts.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(name), name))
    return b"".join(parts)


class RawGetter:
    """Borrow one pooled connection for a series of GETs (``with RawGetter(client) as get: get(key)``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pool = None if isinstance(client, RedisCluster) else client.connection_pool
        self.conn: Any = None

    def __enter__(self) -> RawGetter:
        if self.pool is not None:  # a cluster has no one pool: each GET borrows from the key's node
            self.conn = self.pool.get_connection()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.pool.release(self.conn)
            self.conn = None

    def __call__(self, key: str) -> memoryview | bytes | None:
        if self.pool is None:  # a cluster: the node that owns the key's slot, else the client's own GET
            try:
                with RawGetter(self.client.get_redis_connection(self.client.get_node_from_key(key))) as get:
                    return get(key)
            except (redis.ResponseError, redis.ConnectionError):  # MOVED/ASK, a failover: the client follows
                return self.client.get(key)
        conn = self.conn
        try:
            conn.send_command("GET", key)
            sock = getattr(conn, "_sock", None)
            if sock is None:
                raise _Unsupported("connection exposes no socket")
            return _read_reply(sock)
        except redis.ResponseError:
            raise
        except _Unsupported:
            conn.disconnect()  # a half-read reply must not reach the next command
            return self.client.get(key)
        except BaseException:
            conn.disconnect()
            raise

    def many(self, keys: Sequence[str], sizes: Sequence[int]) -> Iterator[tuple[int, memoryview | bytes | None]]:
        """GET ``keys`` in one pipelined round trip; yields ``(i, value)`` as each value arrives, in order.

        ``sizes``: the sizes the values should have (a version's manifest says). Those are read into
        one writable buffer, each value starting 64-byte aligned. From the first reply that is not
        such a value (missing key, other size, error) or a lost connection on, the connection is
        dropped and the rest are read with redis-py's pipeline (what the server holds: ``None``,
        other bytes, or its error). Exhaust or ``close()`` the iterator inside the ``with`` block:
        one left half-read drops the connection when it is closed, which must happen before the
        connection goes back to the pool.
        """
        conn, i = self.conn, 0
        if conn is None:  # a cluster: its pipeline sends each GET to the node that owns the key
            yield from self._pipelined(keys, 0)
            return
        try:
            starts, total = _slots(sizes)
            buf = bytearray(total + _ALIGN)
            view = memoryview(buf)
            shift = -np.frombuffer(buf, np.uint8, 1).ctypes.data % _ALIGN  # absolute alignment
            conn.send_packed_command([_pack_gets(conn, keys)])
            sock = getattr(conn, "_sock", None)
            if sock is None:
                raise _Unsupported("connection exposes no socket")
            for i, (size, start) in enumerate(zip(sizes, starts, strict=True)):
                head = b"$%d\r\n" % size
                at = shift + start
                _read_expected(sock, view[at : at + len(head) + size + 2], head)
                yield i, view[at + len(head) : at + len(head) + size]
            return
        except (_Unsupported, redis.ConnectionError, redis.TimeoutError, OSError):
            # The rest of the replies must not reach the next command; redis-py's pipeline then reads
            # the rest (and retries a lost connection as the client is configured to).
            conn.disconnect()
        except BaseException:
            conn.disconnect()
            raise
        yield from self._pipelined(keys, i)

    def _pipelined(self, keys: Sequence[str], first: int) -> Iterator[tuple[int, bytes | None]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys[first:]:
            pipe.get(key)
        yield from enumerate(pipe.execute(raise_on_error=True), start=first)
