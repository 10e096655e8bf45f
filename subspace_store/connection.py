"""Connecting to Redis with errors a user can act on (and never a password in them).

The one place that decides which Redis a process uses (``resolve_url``): ``url``, else
``$SHARECL_REDIS_URL``, else the embedded server of the data folder (started if needed).
``connect(url)`` resolves the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .embedded import ensure_running
from .errors import StoreConnectionError

REDIS_URL_ENV = "SHARECL_REDIS_URL"
# redis-py reads replies in chunks of this many bytes; its 64 KiB default makes multi-megabyte
# payloads cost one Python-level round of buffering per 64 KiB.
_READ_SIZE = 1 << 20


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def configured_url(url: str | None = None) -> str | None:
    """The Redis URL the user configured: ``url``, else ``$SHARECL_REDIS_URL``; None means the embedded
    server (``resolve_url`` starts it; ``sharecl store start|stop`` manages it)."""
    if url:
        return url
    return os.environ.get(REDIS_URL_ENV, "").strip() or None


def resolve_url(url: str | None = None, folder: str | os.PathLike[str] | None = None) -> str:
    """The URL to use: ``configured_url(url)``, else the embedded server in ``folder`` (default
    ``<data folder>/redis``), started if it is not running."""
    return configured_url(url) or ensure_running(Path(folder) if folder is not None else None).url


def _scrub(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def connect(
    url: str | None = None, *, folder: str | os.PathLike[str] | None = None, timeout_s: float = 5.0
) -> redis.Redis:
    """A checked client (PING answered). ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs work.

    ``timeout_s`` bounds connecting and each socket read (not a whole transfer).
    """
    url = resolve_url(url, folder)
    shown = redact(url)
    fix = f"fix --redis-url / ${REDIS_URL_ENV}, or unset both to use the embedded server (`sharecl store start`)"
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,  # per read; SubmissionStream.read blocks in shorter slices
            socket_keepalive=True,
            socket_read_size=_READ_SIZE,
            health_check_interval=30,
        )
    except (ValueError, TypeError) as err:
        raise StoreConnectionError(
            f"invalid Redis URL {shown!r}: {_scrub(str(err), url)}. "
            f"Expected redis://[[user]:password@]host[:port][/db] or rediss://... for TLS; {fix}"
        ) from None
    if client.get_connection_kwargs().get("decode_responses"):
        raise StoreConnectionError(f"Redis URL {shown!r} sets decode_responses; remove it (payloads are binary)")
    try:
        client.ping()
    except redis.AuthenticationError as err:
        raise StoreConnectionError(
            f"Redis at {shown} rejected the credentials ({_scrub(str(err), url)}); put the right password in the "
            f"URL (redis://:PASSWORD@host:port/0); {fix}"
        ) from None
    except redis.ResponseError as err:
        text = _scrub(str(err), url)
        if "NOAUTH" in text or "WRONGPASS" in text or "auth" in text.lower():
            raise StoreConnectionError(
                f"Redis at {shown} requires a password ({text}); put it in the URL (redis://:PASSWORD@host:port/0); "
                f"{fix}"
            ) from None
        raise StoreConnectionError(f"Redis at {shown} refused PING ({text}); {fix}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
        tls = (
            " (rediss:// needs a server with TLS enabled; use redis:// for one without)"
            if url.startswith("rediss:")
            else ""
        )
        raise StoreConnectionError(
            f"cannot reach Redis at {shown} ({_scrub(str(err), url)}){tls}. Is it running and is the URL right? {fix}"
        ) from None
    return client


def outlast_restarts(client: redis.Redis, retries: int = 35) -> redis.Redis:
    """Let ``client`` retry a command whose connection was lost or refused (a server restarting) with
    backoff up to 2 s, ``retries`` times (35: about a minute), instead of failing at once. For the
    long-running processes: the coordinator, the workers and a job's driver; CLI commands fail fast.
    WATCHed transactions still raise WatchError after a reconnect, so compare-and-set stays safe.
    """
    client.set_retry(Retry(ExponentialBackoff(cap=2.0, base=0.1), retries))
    return client
