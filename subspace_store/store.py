"""``SubspaceStore``: immutable, versioned Share subspaces in Redis.

A version ``vN`` is a JSON manifest plus one payload per module basis and one per task, all under
version-scoped keys. Publishing writes the payloads first, then, in one WATCH/MULTI/EXEC
transaction, the manifest, the head and (if given) the acknowledgement of the submissions it merges.
Readers find versions only through the head, the tags and the committed-versions set, all of which
change in that transaction, so they never see a half-written version.

A delta version (``publish(..., delta=True)``, ``chains.py``) writes its bases, its rotations from the
parent's bases and only the tasks that are new or changed; old tasks keep the payload of the version
they were written in and are read through the rotations since. ``compact`` rewrites the head in full.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from redis.exceptions import WatchError

from share import Subspace, cyclic_gc

from . import chains, fetch, manifest_cache, retention, shared_entries
from .acks import DEFAULT_GROUP, check_open, queue_acks
from .codec import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    CheckedManifest,
    EncodedSubspace,
    assemble,
    build_manifest,
    decode_basis,
    decode_task,
    encode_manifest,
    encode_subspace,
    json_copy,
    read_manifest,
)
from .errors import CorruptPayloadError, HeadConflictError, StoreError, TaskNotFoundError, VersionNotFoundError
from .keys import Keys, check_namespace, check_version
from .refs import resolve as _resolve
from .refs import resolve_and_read, server_time
from .tags import check_tag_name

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "SubspaceStore",
    "VersionInfo",
    "build_manifest",
    "list_namespaces",
]
_UNSET: Any = object()
log = logging.getLogger(__name__)
COMPACTION_KEY = "compaction"  # version metadata of a compaction: {"of": version, "longest_chain": n}
_VERIFY_SAMPLE = 4  # old tasks whose rotated stored coefficients a delta publish compares with the new ones
_WRITE_CHUNK = 32 << 20  # bytes per pipeline round-trip when writing payloads


@dataclass
class VersionInfo:
    """One row of ``list_versions``."""

    version: str
    parent: str | None
    created: float
    tasks: list[str]
    k: dict[str, tuple[int, int]]
    bytes: int
    submissions: list[str]
    metadata: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)
    is_head: bool = False


class SubspaceStore:
    """Versions of one namespace in one Redis. ``client`` must return bytes (no ``decode_responses``).

    ``shared_entries_from``: a version written in full with this many tasks or more uses manifest format 4 (each
    task's entry written once; ``shared_entries``), and so do the delta versions that follow it."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "default",
        *,
        shared_entries_from: int = shared_entries.SHARED_ENTRIES_FROM,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise StoreError("the Redis client decodes responses; create it without decode_responses=True")
        if type(shared_entries_from) is not int or shared_entries_from < 1:
            raise StoreError(f"shared_entries_from must be an integer >= 1 (got {shared_entries_from!r})")
        self.shared_entries_from = shared_entries_from
        self.client = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self._server = manifest_cache.server_identity(client)

    # -- reading -------------------------------------------------------------------------------
    def head(self) -> str | None:
        value = self.client.get(self.keys.head)
        return _version(value, f"the head of namespace {self.namespace!r}") if value is not None else None

    def resolve(self, ref: str = "head") -> str:
        """A version id, a tag, or ``head``/``latest`` -> the committed version id it names."""
        return check_version(_resolve(self.client, self.keys, ref), f"{ref!r} names")

    def manifest(self, ref: str = "head") -> dict[str, Any]:
        """The manifest of the version ``ref`` names, every field checked (``decode_manifest``); the caller's copy."""
        return json_copy(self._checked(ref).full())

    def _checked(self, ref: str, tasks: Sequence[str] | None = None) -> CheckedManifest:
        """The manifest ``ref`` names as this process checked it (``manifest_cache``): the ref and the manifest
        read in one round trip when the ref names the version it named last, parsed and checked only if its
        bytes differ from the cached ones. Shared: never modify it."""
        guess = manifest_cache.REFS.guess(self._cache_key(ref))
        version, raw = resolve_and_read(self.client, self.keys, ref, guess)
        if raw is None:
            raise VersionNotFoundError(
                f"version {version} of namespace {self.namespace!r} was pruned; list versions with `sharecl versions`"
            )
        if version != guess and version != ref:  # a version id names itself: nothing to remember
            manifest_cache.REFS.remember(self._cache_key(ref), version)
        return self._with_entries(self._decoded(version, raw), tasks)

    def _with_entries(self, checked: CheckedManifest, tasks: Sequence[str] | None = None) -> CheckedManifest:
        """``checked`` with what the entries of ``tasks`` (None: every task) are joined from fetched (format 4: its
        entries payload parts and numbers; nothing for older formats)."""
        needs = checked.needs(tasks)
        if needs:
            items = [fetch.Item(key, digest, size, bytes) for key, digest, size in needs]
            checked.provide(
                dict(
                    zip([key for key, _, _ in needs], fetch.fetch_all(self.client, checked.version, items), strict=True)
                )
            )
        return checked

    def _cache_key(self, name: str) -> tuple[Any, ...]:
        """What names a ref or version of this namespace on this server in ``manifest_cache``."""
        return (self._server, self.namespace, name)

    def _decoded(self, version: str, raw: bytes) -> CheckedManifest:
        key = self._cache_key(version)
        checked = manifest_cache.MANIFESTS.lookup(key, raw)
        if checked is None:
            checked = read_manifest(raw, self.keys, version)
            manifest_cache.MANIFESTS.put(key, raw, checked, checked.held_bytes(raw))
        return checked

    def get(self, ref: str = "head", tasks: Sequence[str] | None = None, *, verify: bool = True) -> Subspace:
        """Read a version (all tasks, or only ``tasks``); verifies every payload's sha256.

        Only the bases and the requested tasks' payloads are transferred. ``verify=False`` skips the
        sha256 (sizes and Arrow structure are still checked): about a third faster on large versions,
        for callers that trust the network and the server's memory.
        """
        checked = self._checked(ref, None if tasks is None else list(tasks))  # format 4: only their entries fetched
        manifest = checked.full() if tasks is None else checked.top
        version = manifest["version"]
        wanted = list(manifest["tasks"]) if tasks is None else list(tasks)
        for name in wanted:
            if name not in manifest["tasks"]:
                held = ", ".join(checked.names()) or "none"  # checked; format 4: no entries part fetched
                raise TaskNotFoundError(f"version {version} has no task {name!r}; it holds: {held}")
        checked.tasks(wanted)  # only the entries used are checked: a one-task pull does no per-task work for the rest
        bases, task_entries = self._read(manifest, wanted, verify, with_bases=True)
        return assemble(manifest, bases, task_entries)

    def _read(
        self, manifest: dict[str, Any], wanted: list[str], verify: bool, with_bases: bool
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(module -> basis, task -> coefficients in this version's bases) of ``wanted`` tasks of a checked manifest."""
        version = manifest["version"]
        modules = list(manifest["modules"]) if with_bases else []
        chain = manifest["rotations"]
        origin = {e["parent"]: i for i, e in enumerate(chain)}
        starts = [
            origin[manifest["tasks"][t]["written_in"]] for t in wanted if manifest["tasks"][t]["written_in"] != version
        ]
        # Rotation payloads the wanted tasks need and this process has not decoded yet: fetched with the rest.
        rotation_items: dict[str, fetch.Item] = {}
        known: dict[str, chains.Rotation] = {}
        for element in chain[min(starts) :] if starts else []:
            for e in element["rotations"].values():
                cached = chains.cached_rotation(e["sha256"])
                if cached is not None:
                    known[e["sha256"]] = cached
                elif e["sha256"] not in rotation_items:
                    to, frm = tuple(e["to"]), tuple(e["from"])
                    rotation_items[e["sha256"]] = fetch.Item(
                        e["key"],
                        e["sha256"],
                        e["bytes"],
                        lambda data, to=to, frm=frm: chains.decode_rotation(data, to, frm),
                    )
        items = [
            fetch.Item(
                manifest["modules"][m]["key"],
                manifest["modules"][m]["sha256"],
                manifest["modules"][m]["bytes"],
                decode_basis,
            )
            for m in modules
        ] + [
            fetch.Item(
                manifest["tasks"][t]["key"],
                manifest["tasks"][t]["sha256"],
                manifest["tasks"][t]["bytes"],
                lambda data, t=t: decode_task(data, list(manifest["modules"]), manifest["tasks"][t]),
            )
            for t in wanted
        ]
        decoded = fetch.fetch_all(self.client, version, items + list(rotation_items.values()), verify)
        bases = dict(zip(modules, decoded[: len(modules)], strict=True))
        task_entries = dict(zip(wanted, decoded[len(modules) : len(items)], strict=True))
        for digest, rotation in zip(rotation_items, decoded[len(items) :], strict=True):
            known[digest] = rotation
            if verify:  # only checked bytes are remembered under their checksum
                chains.remember_rotation(digest, rotation)
        for t in wanted:
            entry = manifest["tasks"][t]
            if entry["written_in"] != version:
                start = origin[entry["written_in"]]
                task_entries[t] = _carry(manifest, t, task_entries[t], chain[start:], known, verify)
        return bases, task_entries

    def chain_lengths(self, ref: str = "head") -> dict[str, int]:
        """Task -> how many versions' rotations reading it applies (0: written in that version)."""
        return chain_lengths(self._checked(ref).full())

    def version_count(self) -> int:
        """How many committed versions the namespace holds (pruned ones not counted)."""
        return int(self.client.zcard(self.keys.versions))

    def tags(self) -> dict[str, str]:
        """Tag -> version id; a tag or target that share-cl could not have written raises ``StoreError``."""
        out = {}
        for raw_tag, raw_version in self.client.hgetall(self.keys.tags).items():
            tag = check_tag_name(raw_tag.decode(errors="replace"))
            out[tag] = _version(raw_version, f"tag {tag!r} points at")
        return out

    def list_versions(self) -> list[VersionInfo]:
        """Committed versions, oldest first, with their tags and live pins."""
        where = f"the committed versions of namespace {self.namespace!r} hold"
        names = [_version(v, where) for v in self.client.zrange(self.keys.versions, 0, -1)]
        raws = self.client.mget([self.keys.manifest(v) for v in names]) if names else []
        by_version: dict[str, list[str]] = {}
        for tag, version in sorted(self.tags().items()):
            by_version.setdefault(version, []).append(tag)
        pins = self.pins()
        head = self.head()
        out = []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:  # pruned between the two reads
                continue
            checked = self._decoded(name, raw)
            m = checked.top  # what is read below is checked; the task names by ``names`` (format 4: no entry fetched)
            out.append(
                VersionInfo(
                    version=name,
                    parent=m["parent"],
                    created=m["created"],
                    tasks=checked.names(),
                    k={mod: (e["k_A"], e["k_B"]) for mod, e in m["modules"].items()},
                    bytes=m["bytes"],
                    submissions=list(m["submissions"]),
                    metadata=json_copy(m["metadata"]),
                    tags=by_version.get(name, []),
                    pins=pins.get(name, []),
                    is_head=name == head,
                )
            )
        return out

    # -- publishing ----------------------------------------------------------------------------
    @cyclic_gc.paused()  # a manifest entry (a few dicts) per task, no cycles
    def publish(
        self,
        subspace: Subspace,
        parent: str | None,
        metadata: dict[str, Any] | None = None,
        *,
        submission_ids: Sequence[str] = (),
        group: str = DEFAULT_GROUP,
        expected_head: str | None = _UNSET,
        reconstruction_error: dict[str, float] | None = None,
        delta: bool = False,
        rotations: dict[str, chains.Rotation] | None = None,
        max_chain: int = chains.DEFAULT_MAX_CHAIN,
    ) -> str:
        """Publish ``subspace`` as a new version and move the head to it; returns its id (``vN``).

        ``parent`` is the version it was derived from (None for the first). The head moves only if
        it still equals ``expected_head`` (default: ``parent``); otherwise ``HeadConflictError`` and
        nothing is visible. ``submission_ids`` (stream entry ids read by consumer group ``group``)
        are acknowledged and recorded as merged in the same transaction. ``metadata`` is free-form
        JSON (e.g. ``{"mlflow_run_id": ...}``). Per-task reconstruction errors default to each
        task's ``metadata["reconstruction_error"]`` (set by ``share.merge``).

        ``delta=True``: ``subspace`` is ``parent`` merged (every old task's coefficients are the parent's
        rotated into the new bases, its head unchanged). Only the new tasks' payloads, the bases and the
        rotations (``rotations``: module -> ``(R_A, R_B)`` float64 from ``MergeReport.rotations``; default
        ``U_new.T @ U_parent``) are written; old tasks point at the payloads they were written in. Checked on
        a sample of old tasks (rotated stored coefficients within 1e-6 relative, heads equal); where that
        fails, or the parent has other modules, the version is written in full. A task whose chain would
        grow past ``max_chain`` is written in full.

        Manifest format 4 (``shared_entries``): a version written in full with the store's ``shared_entries_from``
        tasks or more, and a delta version of a format-4 parent, store each task's entry once (with the version that
        writes its payload) and per version only the numbers a merge changes; else format 3 (every entry in the
        manifest).
        """
        expected = parent if expected_head is _UNSET else expected_head
        if max_chain < 1 or max_chain > chains.MAX_CHAIN:
            raise StoreError(f"max_chain must be between 1 and {chains.MAX_CHAIN} (got {max_chain})")
        plan = self._delta_plan(subspace, parent, rotations, max_chain) if delta and parent is not None else {}
        inherited: shared_entries.Inherited | None = plan.pop("inherited", None)
        meta = _jsonable(metadata or {}, "metadata")
        _jsonable(subspace.metadata, "subspace.metadata")
        # Before anything is written as JSON. A task a format-4 delta keeps from its parent is left out: its other
        # metadata equals what was stored (JSON) and its numbers go in as floats, unless they cannot (format 3).
        kept = set(plan.get("reuse", ())) if inherited is not None else set()
        _check_task_metadata(subspace, [t for t in subspace.tasks if t not in kept])
        encoded = encode_subspace(subspace, reconstruction_error, **plan)
        if inherited is not None:
            shared = encoded.share_entries(inherited)
        else:
            shared = not plan and len(subspace.tasks) >= self.shared_entries_from and encoded.share_entries()
        if kept and not shared:  # written in format 3 after all: every entry goes into the manifest's JSON
            _check_task_metadata(subspace, list(kept))
        actual = self.head()
        if actual != expected:  # fail before writing megabytes; the commit checks again
            raise HeadConflictError(self.namespace, expected, actual)
        publication = _Publication(self, encoded)
        publication.begin()
        try:
            publication.write_payloads()
            return publication.commit(subspace, parent, expected, meta, list(submission_ids), group)
        except BaseException:
            publication.abort()
            raise

    def _delta_plan(
        self, subspace: Subspace, parent: str, rotations: dict[str, chains.Rotation] | None, max_chain: int
    ) -> dict[str, Any]:
        """``encode_subspace``'s delta arguments (reuse, rotations, chain), or {} to write in full."""
        # The parent is usually what this process just published (a coordinator): cached as built (commit).
        checked = self._checked(parent)
        before = checked.full()
        if list(before["modules"]) != list(subspace.modules):
            return {}
        shared = checked.positions is not None  # format 4
        chain = before["rotations"]
        origin = {e["parent"]: i for i, e in enumerate(chain)}
        reuse: dict[str, dict[str, Any]] = {}
        for name, task in subspace.tasks.items():
            entry = before["tasks"].get(name)
            if entry is None or entry["head"] != list(task.head):
                continue
            if entry["p"] != task.widths():
                continue
            if shared and not shared_entries.same_static(task.metadata, entry["metadata"]):
                continue  # its entry is kept once, in the version that wrote it: write both again
            length = 0 if entry["written_in"] == parent else len(chain) - origin[entry["written_in"]]
            if length + 1 <= max_chain:
                reuse[name] = entry
        if not reuse:
            return {}
        names = list(reuse)
        step = max(1, len(names) // _VERIFY_SAMPLE)
        sample = names[::step][:_VERIFY_SAMPLE]
        old_bases, old = self._read(before, sample, True, with_bases=rotations is None)
        if rotations is None:
            rotations = chains.basis_rotations(old_bases, subspace.modules)
        for m, basis in subspace.modules.items():
            ra, rb = rotations.get(m, (None, None)) if isinstance(rotations, dict) else (None, None)
            k_before = before["modules"][m]
            want = ((basis.k_A, k_before["k_A"]), (basis.k_B, k_before["k_B"]))
            if ra is None or rb is None or (tuple(ra.shape), tuple(rb.shape)) != want:
                raise StoreError(
                    f"rotations for module {m!r} must be (R_A, R_B) of shapes {want} (new k x parent k); "
                    "pass MergeReport.rotations of the merge that made this subspace"
                )
        rotations = {m: (ra.to(torch.float64), rb.to(torch.float64)) for m, (ra, rb) in rotations.items()}
        for name in sample:
            carried = chains.rotate(old[name], rotations, {})
            diff = chains.relative_difference(carried, subspace.tasks[name])
            heads = subspace.tasks[name].head
            same_head = all(
                torch.equal(value, heads[h]) and value.dtype == heads[h].dtype for h, value in old[name].head.items()
            )
            if not diff <= chains.DELTA_TOLERANCE or not same_head:
                log.warning(
                    "task %r is not %s's coefficients rotated into the new bases (relative difference %.3g%s); "
                    "publishing in full",
                    name,
                    parent,
                    diff,
                    "" if same_head else ", head changed",
                )
                return {}
        starts = [origin[e["written_in"]] for e in reuse.values() if e["written_in"] != parent]
        plan = {"reuse": reuse, "rotations": rotations, "chain": chain[min(starts) :] if starts else []}
        if shared:  # where the parent keeps the reused tasks' entries
            assert checked.positions is not None
            plan["inherited"] = shared_entries.Inherited(before["entries"], checked.positions, reuse)
        return plan

    def compact(self, *, min_chain: int = 1, metadata: dict[str, Any] | None = None) -> str | None:
        """Rewrite the head in full (every task's coefficients in its own bases, no chains) as a new version.

        Returns the new version, or None when no task of the head has a chain of ``min_chain`` or more.
        Raises ``HeadConflictError`` if the head moves meanwhile (nothing is visible then). The version's
        metadata says ``compaction`` (``{"of": head, "longest_chain": n}``).
        """
        head = self.head()
        if head is None:
            return None
        manifest = self._checked(head).full()
        longest = max(chain_lengths(manifest).values(), default=0)
        if longest < max(min_chain, 1):
            return None
        subspace = self.get(head)
        meta = {**(metadata or {}), COMPACTION_KEY: {"of": head, "longest_chain": longest}}
        errors = {t: e["reconstruction_error"] for t, e in manifest["tasks"].items()}
        return self.publish(
            subspace, head, meta, reconstruction_error={t: e for t, e in errors.items() if e is not None}
        )

    # -- tags, pins, retention -----------------------------------------------------------------
    def tag(self, ref: str, name: str) -> str:
        """Point tag ``name`` at the version ``ref`` names (moving it if it exists); returns the version."""
        check_tag_name(name)
        with self.client.pipeline(transaction=True) as pipe:  # explicit: a RedisCluster's default is False
            while True:
                try:
                    pipe.watch(self.keys.versions, self.keys.head, self.keys.tags)
                    version = _resolve(pipe, self.keys, ref)
                    pipe.multi()
                    pipe.hset(self.keys.tags, name, version)
                    pipe.execute()
                    return version
                except WatchError:
                    continue

    def untag(self, name: str) -> bool:
        return bool(self.client.hdel(self.keys.tags, name))

    def pin(self, ref: str, job_id: str, ttl_s: float = 24 * 3600) -> str:
        """Protect the version ``ref`` names from pruning while job ``job_id`` runs; returns the version."""
        return retention.pin(self, ref, job_id, ttl_s)

    def unpin(self, version: str, job_id: str) -> None:
        retention.unpin(self, version, job_id)

    def release_pins(self, job_id: str, *, keep: Collection[str] = ()) -> list[str]:
        """Unpin every version held by ``job_id`` or by ``<job_id>/<anything>`` (a job's tasks pin as
        ``<job_id>/<task>``), including pins of tasks whose worker died, except pins of the holders in ``keep``;
        returns ``version:holder`` each."""
        return retention.release_pins(self, job_id, keep=keep)

    def pins(self) -> dict[str, list[str]]:
        """Live pins: version -> job ids."""
        return retention.live_pins(self)

    def prune(self, keep: int, *, dry_run: bool = False, orphan_grace_s: float = 3600.0) -> retention.PruneResult:
        """Delete all but the newest ``keep`` versions, never the head, a tagged or a pinned one.

        Also removes payloads of publishes that died before committing, ``orphan_grace_s`` after
        they started.
        """
        return retention.prune(self, keep, dry_run=dry_run, orphan_grace_s=orphan_grace_s)


# Keys whose presence makes a namespace exist: its head (a version was committed) or its submission stream.
_NAMESPACE_MARKERS = ("head", "submissions")


def list_namespaces(client: redis.Redis) -> list[str]:
    """Every namespace of this Redis that holds a committed version or a submission, sorted.

    Found by SCAN over the keys that mark a namespace (``sharecl:{<namespace>}:head`` and
    ``...:submissions``), never KEYS, so a large database is not blocked. A name read back is kept
    only if it is a valid namespace (``keys.check_namespace``): share-cl could not have written any
    other, and such a key (another program's, or ``{`` and ``}`` inside the braces) is skipped.
    """
    found: set[str] = set()
    for marker in _NAMESPACE_MARKERS:
        start, end = b"sharecl:{", f"}}:{marker}".encode()
        for raw in client.scan_iter(match=f"sharecl:{{*}}:{marker}", count=1000):
            key = raw if isinstance(raw, bytes) else str(raw).encode()
            if not (key.startswith(start) and key.endswith(end)):
                continue
            name = key[len(start) : -len(end)].decode(errors="replace")
            try:
                found.add(check_namespace(name))
            except StoreError:
                continue
    return sorted(found)


def chain_lengths(manifest: dict[str, Any]) -> dict[str, int]:
    """Task -> the number of rotations reading it applies, from a (checked) manifest."""
    chain = manifest["rotations"]
    origin = {e["parent"]: i for i, e in enumerate(chain)}
    version = manifest["version"]
    return {
        t: 0 if e["written_in"] == version else len(chain) - origin[e["written_in"]]
        for t, e in manifest["tasks"].items()
    }


def _carry(
    manifest: dict[str, Any],
    name: str,
    task: Any,
    chain: list[dict[str, Any]],
    known: dict[str, chains.Rotation],
    remember: bool,
) -> Any:
    """``task`` (decoded from the payload of the version it was written in) in ``manifest``'s bases."""
    entry = manifest["tasks"][name]
    product = {}
    for m in manifest["modules"]:
        first = chain[0]["rotations"][m]["from"]
        ea, eb = task.E[m]
        if (tuple(ea.shape), tuple(eb.shape)) != ((first[0], entry["p"][m]), (first[1], entry["p"][m])):
            raise CorruptPayloadError(
                manifest["version"],
                entry["key"],
                f"holds module {m!r} coefficients of shapes {tuple(ea.shape)}, {tuple(eb.shape)}; the basis of "
                f"{entry['written_in']} has k {tuple(first)} (p {entry['p'][m]})",
            )
        for element in chain:  # a checksum names content: the same bytes under other declared shapes are refused
            r = element["rotations"][m]
            ra, rb = known[r["sha256"]]
            if (tuple(ra.shape), tuple(rb.shape)) != ((r["to"][0], r["from"][0]), (r["to"][1], r["from"][1])):
                raise CorruptPayloadError(
                    manifest["version"], r["key"], "holds rotations of other shapes than recorded"
                )
        product[m] = chains.product([e["rotations"][m]["sha256"] for e in chain], known, remember)
    return chains.rotate(task, product, task.metadata)


def _version(raw: bytes, where: str) -> str:
    """A version id read from Redis, checked (it names keys and may reach messages and paths)."""
    return check_version(raw.decode(errors="replace"), where)


_JSON_LEAVES = frozenset({str, float, bool, type(None)})
_JSON_KEYS = frozenset({str})
_JSON_INT = 1 << 63  # ints below this in magnitude: json.dumps writes them (a huge one hits Python's digit limit)


def _plain_json(value: Any) -> bool:
    """True only where ``json.dumps(value)`` surely succeeds, checked without writing it: a dict with str keys
    whose values are str, float, bool, None, small ints, or lists or str-keyed dicts of those (what
    ``share.merge`` puts in task metadata). False says nothing: ``_jsonable`` then decides."""
    if type(value) is not dict or not set(map(type, value)) <= _JSON_KEYS:
        return False
    if set(map(type, value.values())) <= _JSON_LEAVES:
        return True
    for item in value.values():
        kind = type(item)
        if kind is dict:
            if not (set(map(type, item)) <= _JSON_KEYS and _json_leaves(item.values())):
                return False
        elif kind is list:
            if not _json_leaves(item):
                return False
        elif kind is int:
            if not -_JSON_INT < item < _JSON_INT:
                return False
        elif kind not in _JSON_LEAVES:
            return False
    return True


def _json_leaves(values: Any) -> bool:
    kinds = set(map(type, values))
    if kinds <= _JSON_LEAVES:
        return True
    return kinds <= _JSON_LEAVES | {int} and all(-_JSON_INT < v < _JSON_INT for v in values if type(v) is int)


def _check_task_metadata(subspace: Subspace, names: list[str]) -> None:
    """``StoreError`` naming the first of ``names`` whose metadata ``json.dumps`` would refuse."""
    for name in names:
        metadata = subspace.tasks[name].metadata
        if not _plain_json(metadata):
            _jsonable(metadata, f"task {name!r} metadata")


def _jsonable(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} is not JSON-serializable ({err}); store only str/number/bool/list/dict") from None
    return value


class _Publication:
    """One publish, in phases (begin, write_payloads, commit | abort).

    Phases are separate so that crash tests can stop a publisher between them; ``publish`` is the
    only normal caller.
    """

    def __init__(self, store: SubspaceStore, encoded: EncodedSubspace) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.encoded = encoded
        self.number = 0
        self.version = ""
        self.payload_keys: list[str] = []
        self.format_version = MANIFEST_FORMAT_VERSION  # 1: the layout before delta versions (tests of old stores)

    def begin(self) -> str:
        """Allocate the version id and register the unfinished publish (for the orphan sweep)."""
        self.number = int(self.client.incr(self.keys.seq))
        self.version = f"v{self.number}"
        v = self.version
        self.payload_keys = [key for key, _ in self._blobs()]
        record = {"started": server_time(self.client), "keys": self.payload_keys}
        self.client.hset(self.keys.writing, v, json.dumps(record))
        return v

    def _blobs(self) -> list[tuple[str, bytes]]:
        """(key, bytes) of every payload this publish writes."""
        v, encoded = self.version, self.encoded
        blobs = [(self.keys.basis(v, m), d) for m, d in encoded.bases.items()]
        blobs += [(self.keys.task(v, t), d) for t, d in encoded.tasks.items()]
        blobs += [(self.keys.rotation(v, m), d) for m, d in encoded.rotations.items()]
        blobs += [(self.keys.entries(v, i), data) for i, data in enumerate(encoded.entries)]
        if encoded.numbers is not None:
            blobs.append((self.keys.numbers(v), encoded.numbers))
        return blobs

    def write_payloads(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pending = 0
        for key, data in self._blobs():
            pipe.set(key, data)
            pending += len(data)
            if pending >= _WRITE_CHUNK:
                pipe.execute()
                pending = 0
        pipe.execute()

    def commit(
        self,
        subspace: Subspace,
        parent: str | None,
        expected: str | None,
        metadata: dict[str, Any],
        submission_ids: list[str],
        group: str,
    ) -> str:
        keys, v = self.keys, self.version
        for _ in range(16):
            try:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(keys.head, keys.merged, keys.rejected)
                    raw = pipe.get(keys.head)
                    actual = raw.decode() if raw is not None else None
                    if actual != expected:
                        raise HeadConflictError(keys.namespace, expected, actual, attempted=v)
                    entries = check_open(pipe, keys, group, submission_ids)
                    manifest = build_manifest(
                        keys,
                        v,
                        subspace,
                        self.encoded,
                        parent,
                        metadata,
                        submission_ids,
                        server_time(pipe),
                        self.format_version,
                    )
                    pipe.multi()
                    stored = encode_manifest(manifest, self.encoded.positions)
                    pipe.set(keys.manifest(v), stored)
                    pipe.set(keys.head, v)
                    pipe.zadd(keys.versions, {v: self.number})
                    pipe.hdel(keys.writing, v)
                    queue_acks(pipe, keys, group, entries, v)
                    pipe.execute()
                    if manifest["format_version"] in (MANIFEST_FORMAT_VERSION, shared_entries.SHARED_FORMAT_VERSION):
                        # Readers in this process (the coordinator's record of the merge, the next delta's
                        # plan) find it as built while the stored bytes are these: nothing parsed back.
                        written = CheckedManifest.written(
                            manifest,
                            keys,
                            v,
                            self.encoded.parents,
                            # format 4 even with no task (positions {}): what a reader of the bytes gets
                            self.encoded.positions
                            if manifest["format_version"] == shared_entries.SHARED_FORMAT_VERSION
                            else None,
                        )
                        manifest_cache.MANIFESTS.put(
                            self.store._cache_key(v), stored, written, written.held_bytes(stored)
                        )
                    return v
            except WatchError:
                # Either the head moved (the loop reports the conflict) or a submission changed
                # state (the loop re-checks it). A dropped connection also lands here: see below.
                if self.client.exists(keys.manifest(v)):
                    return v  # our EXEC went through before the connection dropped
                continue
        raise StoreError(f"could not publish {v}: submissions kept changing concurrently; retry")

    def abort(self) -> None:
        """Delete this publish's payloads unless it committed. Best effort: if Redis is unreachable,
        the payloads stay invisible (no manifest) and ``prune`` sweeps them later."""
        if not self.version:
            return
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(self.keys.writing)
                if not pipe.hexists(self.keys.writing, self.version):
                    return  # committed: the commit removes the record in its transaction
                if self.payload_keys:  # outside MULTI: on a cluster they lie in other slots than the record
                    self.client.delete(*self.payload_keys)
                pipe.multi()
                pipe.hdel(self.keys.writing, self.version)
                pipe.execute()
        except (redis.RedisError, OSError):
            pass
