"""Pins and pruning.

A pin (``version|job`` in a sorted set scored by its expiry on Redis's clock) keeps the version an
in-flight job started from. ``prune`` runs in one WATCH/MULTI/EXEC over the versions, head, tags,
pins and unfinished publishes, so a version that gets tagged or pinned while prune plans is never
deleted (the transaction aborts and prune plans again).

Delta versions share payloads: a version's manifest may name task payloads and rotations written by
older versions. A pruned version's keys are deleted only where no retained version's manifest names
them, so every retained version stays readable, and a payload goes with the last version that names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import WatchError

from .codec import read_manifest
from .errors import CorruptPayloadError, StoreError
from .keys import Keys, check_version, version_number
from .refs import resolve, server_time

if TYPE_CHECKING:
    from .store import SubspaceStore

_SEP = "|"


@dataclass
class PruneResult:
    removed: list[str] = field(default_factory=list)  # versions deleted (or that would be, dry run)
    kept: dict[str, list[str]] = field(default_factory=dict)  # version -> why it stays
    orphans: list[str] = field(default_factory=list)  # unfinished publishes whose payloads were swept
    dry_run: bool = False


def _check_job(job_id: str) -> str:
    if not job_id or _SEP in job_id:
        raise StoreError(f"invalid job id {job_id!r}: use a non-empty id without '{_SEP}'")
    return job_id


def pin(store: SubspaceStore, ref: str, job_id: str, ttl_s: float) -> str:
    _check_job(job_id)
    if ttl_s <= 0:
        raise StoreError(f"pin ttl_s must be > 0 (got {ttl_s}); it bounds how long a crashed job holds a version")
    keys = store.keys
    with store.client.pipeline(transaction=True) as pipe:  # explicit: a RedisCluster's default is False
        while True:
            try:
                pipe.watch(keys.versions, keys.head, keys.tags)
                version = resolve(pipe, keys, ref)
                expiry = server_time(pipe) + ttl_s
                pipe.multi()
                pipe.zadd(keys.pins, {f"{version}{_SEP}{job_id}": expiry})
                pipe.execute()
                return version
            except WatchError:
                continue


def unpin(store: SubspaceStore, version: str, job_id: str) -> None:
    store.client.zrem(store.keys.pins, f"{version}{_SEP}{_check_job(job_id)}")


def release_pins(store: SubspaceStore, job_id: str, *, keep: Collection[str] = ()) -> list[str]:
    _check_job(job_id)
    released = []
    for version, holders in live_pins(store).items():
        for holder in holders:
            if (holder == job_id or holder.startswith(job_id + "/")) and holder not in keep:
                unpin(store, version, holder)
                released.append(f"{version}:{holder}")
    return released


def _version_keys(client: Any, keys: Keys, version: str, raw: bytes | None) -> list[str]:
    """Every key ``version`` needs: its manifest and the payload keys it names (its own, and those of older
    versions that a delta version reads through), or, if the manifest is damaged, the keys under the version's
    own prefixes. Only keys of this namespace's layout (``decode_manifest`` checks every one)."""
    out = [keys.manifest(version)]
    if raw is None:
        return out
    named = _named_keys(keys, version, raw)
    if named is None:
        # Namespace and version hold no glob character. Both payload key forms (``keys`` module docstring).
        for prefix in (keys.legacy_payload_prefix(version), keys.payload_prefix(version)):
            out += [k.decode() for k in client.scan_iter(match=prefix + "*", count=1000) if k.decode() not in out]
        return out
    return out + named


_named: dict[tuple[str, str, bytes], list[str]] = {}  # (namespace, version, manifest digest) -> payload keys


def _named_keys(keys: Keys, version: str, raw: bytes) -> list[str] | None:
    """The payload keys a manifest names (bases, tasks, rotations; format 4: entries and numbers), or None if it is
    damaged; cached per manifest content (they are immutable, and a coordinator prunes after every publish)."""
    cache_key = (keys.namespace, version, hashlib.blake2b(raw, digest_size=16).digest())
    hit = _named.get(cache_key)
    if hit is not None:
        return hit
    try:
        out = read_manifest(raw, keys, version).payload_keys()
    except CorruptPayloadError:
        return None
    if len(_named) >= 1024:
        _named.clear()
    _named[cache_key] = out
    return out


def _writing_record(keys: Keys, version: str, raw: bytes) -> tuple[float, list[str]]:
    """(start time, payload keys) of an unfinished publish, keeping only keys of that version's own."""
    try:
        record = json.loads(raw)
        started = float(record["started"])
        listed = record["keys"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return 0.0, []  # unreadable: swept at once, its listed keys ignored (their version is never committed)
    if version_number(version) is None:
        return started, []
    own = [k for k in listed if isinstance(k, str) and keys.owned_by(version, k)] if isinstance(listed, list) else []
    return started, own


def _deferred(keys: Keys, outside: list[str]) -> dict[str, list[str]]:
    """Version -> the doomed payload keys it wrote that lie outside the namespace's slot (a cluster's other slots).

    They cannot join prune's transaction, which files them as records of unfinished publishes of their
    version, started at 0; prune deletes them right after its commit and drops the records. A prune
    that dies in between leaves the records, and the next one sweeps them at once (their versions are
    no longer committed).
    """
    out: dict[str, list[str]] = {}
    for key in outside:
        out.setdefault(keys.payload_version(key) or "", []).append(key)
    if "" in out:  # no payload key of this namespace: share-cl never lists one
        raise StoreError(f"prune of namespace {keys.namespace!r} would delete foreign keys {out['']}; nothing deleted")
    return out


def live_pins(store: SubspaceStore, client=None) -> dict[str, list[str]]:
    client = client or store.client
    now = server_time(client)
    out: dict[str, list[str]] = {}
    for member in client.zrangebyscore(store.keys.pins, now, "+inf"):
        version, job = member.decode().split(_SEP, 1)
        out.setdefault(version, []).append(job)
    return out


def prune(store: SubspaceStore, keep: int, *, dry_run: bool, orphan_grace_s: float) -> PruneResult:
    if keep < 0:
        raise StoreError(f"keep must be >= 0 (got {keep}); the head, tagged and pinned versions are always kept")
    keys = store.keys
    for _ in range(32):
        try:
            with store.client.pipeline(transaction=True) as pipe:
                pipe.watch(keys.versions, keys.head, keys.tags, keys.pins, keys.writing)
                # Checked: a version name becomes a key prefix of what is deleted (``v*`` would match them all).
                versions = [
                    check_version(v.decode(errors="replace"), "a committed version")
                    for v in pipe.zrange(keys.versions, 0, -1)
                ]
                head = pipe.get(keys.head)
                kept: dict[str, list[str]] = {}
                if head is not None:
                    kept.setdefault(head.decode(), []).append("head")
                for tag, version in pipe.hgetall(keys.tags).items():
                    kept.setdefault(version.decode(), []).append(f"tag {tag.decode()}")
                for version, jobs in live_pins(store, pipe).items():
                    kept.setdefault(version, []).extend(f"pinned by {j}" for j in jobs)
                for version in versions[max(0, len(versions) - keep) :] if keep else []:
                    kept.setdefault(version, []).append(f"newest {keep}")
                removed = [v for v in versions if v not in kept]
                now = server_time(pipe)
                orphans: dict[str, list[str]] = {}
                orphan_fields: list[bytes] = []
                for field_name, raw in pipe.hgetall(keys.writing).items():
                    version = field_name.decode(errors="replace")
                    started, payload_keys = _writing_record(keys, version, raw)
                    if now - started >= orphan_grace_s:
                        # A committed version has no record (its commit removed it): never sweep its keys.
                        orphans[version] = [] if version in versions else payload_keys
                        orphan_fields.append(field_name)
                doomed: list[str] = []
                # Through the client: a cluster pipeline refuses MGET. Manifests never change; WATCH guards the plan.
                manifests = store.client.mget([keys.manifest(v) for v in removed]) if removed else []
                for version, raw in zip(removed, manifests, strict=True):
                    doomed += _version_keys(store.client, keys, version, raw)  # a SCAN cannot join a cluster MULTI
                if doomed:
                    # Payloads a retained (delta) version still reads stay. A retained manifest that cannot be
                    # decoded names nothing: its version cannot be read anyway.
                    retained = [v for v in versions if v in kept]
                    raws = store.client.mget([keys.manifest(v) for v in retained]) if retained else []
                    needed = {
                        k for v, raw in zip(retained, raws, strict=True) if raw for k in _named_keys(keys, v, raw) or []
                    }
                    doomed = list(dict.fromkeys(k for k in doomed if k not in needed))
                for payload_keys in orphans.values():
                    doomed += payload_keys
                result = PruneResult(
                    removed=removed,
                    kept={v: kept[v] for v in versions if v in kept},
                    orphans=sorted(orphans),
                    dry_run=dry_run,
                )
                if dry_run:
                    return result
                inside = [k for k in doomed if keys.in_namespace_slot(k)]
                later = _deferred(keys, [k for k in doomed if not keys.in_namespace_slot(k)])
                pipe.multi()
                if inside:
                    pipe.delete(*inside)
                if removed:
                    pipe.zrem(keys.versions, *removed)
                if done := [f for f in orphan_fields if f.decode(errors="replace") not in later]:
                    pipe.hdel(keys.writing, *done)
                for version, payload_keys in later.items():
                    pipe.hset(keys.writing, version, json.dumps({"started": 0, "keys": payload_keys}))
                pipe.zremrangebyscore(keys.pins, "-inf", f"({now}")  # expired pins
                pipe.execute()
                if later:
                    store.client.delete(*[k for payload_keys in later.values() for k in payload_keys])
                    store.client.hdel(keys.writing, *later)
                return result
        except WatchError:
            continue
    raise StoreError(f"prune of namespace {keys.namespace!r} kept conflicting with concurrent writers; retry")
