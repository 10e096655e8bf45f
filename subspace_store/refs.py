"""Naming versions: ``vN`` ids, tags, ``head``; and Redis's clock."""

from __future__ import annotations

from typing import Any

from redis.cluster import RedisCluster

from .errors import VersionNotFoundError
from .keys import Keys, version_number

HEAD_ALIASES = ("head", "HEAD", "latest")


def server_time(client: Any) -> float:
    """Redis's clock, so that every machine agrees on created times and pin expiries.

    On a cluster, TIME names no key, so a transaction (which must stay in one slot) cannot send it:
    one node of the cluster answers instead (``RedisCluster`` or a pipeline of one).
    """
    if isinstance(client, RedisCluster):  # ClusterPipeline is one too
        client = client.get_redis_connection(client.get_default_node())
    seconds, micros = client.time()
    return seconds + micros / 1e6


def resolve(client: Any, keys: Keys, ref: str) -> str:
    if ref in HEAD_ALIASES:
        head = client.get(keys.head)
        if head is None:
            raise VersionNotFoundError(
                f"namespace {keys.namespace!r} holds no version yet; publish one (`sharecl push DIR`) first"
            )
        return head.decode()
    if version_number(ref) is not None:
        if client.zscore(keys.versions, ref) is None:
            raise VersionNotFoundError(
                f"no version {ref} in namespace {keys.namespace!r} (never published or pruned); "
                "list versions with `sharecl versions`"
            )
        return ref
    target = client.hget(keys.tags, ref)
    if target is None:
        known = ", ".join(sorted(t.decode() for t in client.hkeys(keys.tags))) or "none"
        raise VersionNotFoundError(
            f"{ref!r} is neither a version id (v1, v2, ...), 'head', nor a tag of namespace "
            f"{keys.namespace!r} (tags: {known})"
        )
    return target.decode()
