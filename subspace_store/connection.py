"""Connecting to Redis with errors a user can act on (and never a password in them).

The one place that decides which Redis a process uses (``resolve_url``): ``url``, else
``$SHARECL_REDIS_URL``, else the embedded server of the data folder (started if needed).
``connect(url)`` resolves the same way.

A Redis Cluster is named by ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS): any one
node; the client learns the others from it. ``connect`` then returns a ``redis.cluster.RedisCluster``.
A plain ``redis://`` URL that reaches a cluster node is refused with that fix (its commands would
fail with MOVED as soon as a key lives on another node).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .embedded import ensure_running
from .errors import StoreConnectionError

REDIS_URL_ENV = "SHARECL_REDIS_URL"
# URL scheme -> the scheme redis-py's RedisCluster reads (a cluster is marked by the URL, never guessed).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
REDIS_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
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


def cluster_target(url: str) -> str | None:
    """For a ``redis+cluster://`` (``rediss+cluster://``) URL, the same URL with the plain scheme that
    ``RedisCluster.from_url`` reads; None for any other URL."""
    scheme, sep, rest = url.partition("://")
    plain = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    return f"{plain}://{rest}" if plain else None


def _scrub(text: str, url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


def connect(
    url: str | None = None, *, folder: str | os.PathLike[str] | None = None, timeout_s: float = 5.0
) -> redis.Redis | RedisCluster:
    """A checked client (PING answered). ``redis://``, ``rediss://`` (TLS) and ``unix://`` URLs give a
    ``redis.Redis``; ``redis+cluster://`` and ``rediss+cluster://`` a ``RedisCluster``.

    ``timeout_s`` bounds connecting and each socket read (not a whole transfer).
    """
    url = resolve_url(url, folder)
    shown = redact(url)
    fix = f"fix --redis-url / ${REDIS_URL_ENV}, or unset both to use the embedded server (`sharecl store start`)"
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,  # per read; SubmissionStream.read blocks in shorter slices
        "socket_keepalive": True,
        "socket_read_size": _READ_SIZE,
    }
    target = cluster_target(url)
    try:
        if target is None:
            client: redis.Redis | RedisCluster = redis.Redis.from_url(url, health_check_interval=30, **options)
        else:
            # Connects at once: it reads the slot map from the node the URL names.
            client = RedisCluster.from_url(target, **options)
    except (ValueError, TypeError) as err:
        raise StoreConnectionError(
            f"invalid Redis URL {shown!r}: {_scrub(str(err), url)}. Expected "
            "redis://[[user]:password@]host[:port][/db], rediss://... for TLS, or "
            f"redis+cluster://[[user]:password@]host:port for a Redis Cluster; {fix}"
        ) from None
    except (RedisClusterException, redis.RedisError, OSError) as err:
        _refuse(err, url, shown, fix, cluster=target is not None)
    if client.get_connection_kwargs().get("decode_responses"):
        raise StoreConnectionError(f"Redis URL {shown!r} sets decode_responses; remove it (payloads are binary)")
    try:
        client.ping()
        if target is None and _is_cluster_node(client):
            raise StoreConnectionError(
                f"Redis at {shown} is a node of a Redis Cluster: a plain URL reaches only the keys of its own "
                f"slots; use {shown.replace('://', '+cluster://', 1)} instead"
            )
    except (RedisClusterException, redis.RedisError, OSError) as err:
        _refuse(err, url, shown, fix, cluster=target is not None)
    return client


def _is_cluster_node(client: redis.Redis) -> bool:
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:  # INFO refused (a restricted proxy): not a cluster node share-cl can see
        return False


def _refuse(err: BaseException, url: str, shown: str, fix: str, *, cluster: bool) -> NoReturn:
    """Raise the ``StoreConnectionError`` that says why ``url`` could not be used and how to fix it."""
    text = _scrub(str(err), url)
    example = "redis+cluster://:PASSWORD@host:port" if cluster else "redis://:PASSWORD@host:port/0"
    if isinstance(err, redis.AuthenticationError):
        raise StoreConnectionError(
            f"Redis at {shown} rejected the credentials ({text}); put the right password in the URL ({example}); {fix}"
        ) from None
    if isinstance(err, redis.ResponseError) and ("NOAUTH" in text or "WRONGPASS" in text or "auth" in text.lower()):
        raise StoreConnectionError(
            f"Redis at {shown} requires a password ({text}); put it in the URL ({example}); {fix}"
        ) from None
    if cluster and "cluster mode is not enabled" in text.lower():
        raise StoreConnectionError(
            f"Redis at {shown} is not a Redis Cluster node ({text}); use {shown.replace('+cluster://', '://', 1)} "
            f"for a single server; {fix}"
        ) from None
    if isinstance(err, redis.ResponseError):
        raise StoreConnectionError(f"Redis at {shown} refused PING ({text}); {fix}") from None
    unreachable = isinstance(err, redis.ConnectionError) or "reachable node" in text
    if isinstance(err, RedisClusterException) and not unreachable:
        raise StoreConnectionError(f"Redis Cluster at {shown} cannot be used ({text}); {fix}") from None
    tls = " (rediss:// needs a server with TLS enabled; use redis:// for one without)" if "rediss" in url[:16] else ""
    raise StoreConnectionError(
        f"cannot reach Redis at {shown} ({text}){tls}. Is it running and is the URL right? {fix}"
    ) from None


def outlast_restarts(client: redis.Redis | RedisCluster, retries: int = 35) -> redis.Redis | RedisCluster:
    """Let ``client`` retry a command whose connection was lost or refused (a server restarting) with
    backoff up to 2 s, ``retries`` times (35: about a minute), instead of failing at once. For the
    long-running processes: the coordinator, the workers and a job's driver; CLI commands fail fast.
    WATCHed transactions still raise WatchError after a reconnect, so compare-and-set stays safe.
    """
    client.set_retry(Retry(ExponentialBackoff(cap=2.0, base=0.1), retries))
    return client
