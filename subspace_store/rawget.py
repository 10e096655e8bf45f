"""GET of large values straight into a writable buffer (one copy: kernel to that buffer).

redis-py returns ``bytes`` after buffering each reply twice (socket chunks into a BytesIO, then out
of it), and ``bytes`` cannot back a writable tensor, so decoding would copy a third time. For
multi-megabyte payloads that copying costs as much as the transfer. Here the command goes out over
a pooled redis-py connection (its handshake, AUTH, TLS and health checks as usual) and the bulk
reply is read with ``recv_into``; tensors can then be views of the buffer. Anything unexpected
drops the connection (so its state cannot leak into later commands) and falls back to a plain GET.
"""

from __future__ import annotations

from typing import Any

import redis

_HEADER_READ = 64
_CHUNK = 4 << 20


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


class RawGetter:
    """Borrow one pooled connection for a series of GETs (``with RawGetter(client) as get: get(key)``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.conn: Any = None

    def __enter__(self) -> RawGetter:
        self.conn = self.pool.get_connection()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.pool.release(self.conn)
            self.conn = None

    def __call__(self, key: str) -> memoryview | bytes | None:
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
