"""Naming versions: ``vN`` ids, tags, ``head``; and Redis's clock."""

from __future__ import annotations

from typing import Any

from redis.cluster import RedisCluster

from .errors import VersionNotFoundError
from .keys import Keys, check_version, version_number

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
        return head.decode(errors="replace")
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
    return target.decode(errors="replace")


def resolve_and_read(client: Any, keys: Keys, ref: str, guess: str | None) -> tuple[str, bytes | None]:
    """(the version ``ref`` names, its raw manifest or None if it is gone), in one round trip when possible.

    One transaction reads the ref (the head, a tag, or whether a version id is committed) and the
    manifest of ``guess``, the version the caller expects (for a version id: itself). Where the ref names
    another version, a second round trip GETs that manifest. Every key here is a commit key, in the
    namespace's slot, so a cluster runs the transaction too. The version read back is checked
    (``check_version``) before it names a key.
    """
    kind = "head" if ref in HEAD_ALIASES else "version" if version_number(ref) is not None else "tag"
    if kind == "version":
        guess = ref
    with client.pipeline(transaction=True) as pipe:  # explicit: a RedisCluster's default is False
        if kind == "head":
            pipe.get(keys.head)
        elif kind == "version":
            pipe.zscore(keys.versions, ref)
        else:
            pipe.hget(keys.tags, ref)
        if guess is not None:
            pipe.get(keys.manifest(guess))
        replies = pipe.execute()
    named = replies[0]
    if named is None:  # raises VersionNotFoundError with its message, unless the ref appeared meanwhile
        version = check_version(resolve(client, keys, ref), f"{ref!r} names")
    else:
        version = ref if kind == "version" else check_version(named.decode(errors="replace"), f"{ref!r} names")
    if guess is not None and version == guess:
        return version, replies[1]
    return version, client.get(keys.manifest(version))
