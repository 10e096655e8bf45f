"""The submission stream: workers submit trained adapters; the coordinator consumes them.

A submission is a Redis Stream entry (task, base version, metadata, checksum) that references its
tensors in a separate key, as one Arrow IPC payload: either a full adapter (``B``, ``A`` per module
and the head: a cold start or an external LoRA) or a compact ``share.TaskUpdate`` (coefficients and
temporary directions relative to the base version: what coefficient-mode workers ship). Entry and
payload are written in one MULTI/EXEC, so neither exists without the other. The
coordinator reads through a consumer group; if Redis loses the group (a restart without its data), the
next call on it creates the group again and logs a warning. An entry that cannot be decoded (not
written by ``submit``) is rejected when it is read, so it never blocks the entries behind it; ``submit``
refuses names the store would not publish (``check_names``), which the coordinator checks again. An
entry is acknowledged only in the transaction that publishes the version containing it
(``SubspaceStore.publish(submission_ids=...)``) or that records its rejection (``reject``), so after
any crash it is still pending and ``recover`` hands it out again.

A submission may carry an ``attempt_key`` (one task of one job, the same for every retry of it): the
entry's id is recorded under that key in the same transaction as the entry (``attempts`` hash), so a
retried task finds what an earlier attempt submitted from Redis alone (``submitted``), and submitting
again under the same key returns the first id instead of adding a second entry.

A ``RemovalRequest`` (``submit_removal``) is an entry of the same stream without a payload: take
these tasks out of the head. Being in the stream, it is ordered with the submissions around it (the
coordinator merges what came before it, publishes the removal, then merges what came after), and it
is acknowledged, like a submission, only in the transaction that publishes the version without the
tasks (or that records its rejection). ``read`` and ``recover`` return both kinds, in stream order.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.exceptions import ResponseError, WatchError

from share import LoraAdapter, Subspace, TaskUpdate
from share.subspace import check_task_name

from .acks import DEFAULT_GROUP, REJECTED_PAYLOAD_TTL_S
from .errors import StoreError, SubmissionError
from .keys import Keys, check_module_name
from .outcomes import StreamSummary, SubmissionKind, SubmissionRow, SubmissionState, SubmissionStatus
from .payloads import PayloadFormatError, decode_tensors, encode_tensors, sha256
from .refs import server_time

if TYPE_CHECKING:
    from .store import SubspaceStore

log = logging.getLogger(__name__)
_KINDS = frozenset(kind.value for kind in SubmissionKind)
T = TypeVar("T")

DEFAULT_MAX_BYTES = 256 << 20  # Redis refuses values over 512 MB; a rank-16 7B q,v adapter is ~34 MB
_BLOCK_SLICE_MS = 1000
_FLAG = {"0": False, "1": True}

# Runs inside the MULTI that also SETs the payload: adds the entry and records it under its attempt
# key, or, when that key already names an entry, returns that entry's id and drops the new payload,
# unless that entry holds this very payload: the client resent the whole transaction (its reply was
# lost to a restart, a timeout or a network blip), and the committed entry still needs it.
# KEYS: payload, stream, attempts hash. ARGV: attempt key ("" for none), then the entry's field pairs.
_SUBMIT_LUA = """
if ARGV[1] ~= '' then
  local existing = redis.call('HGET', KEYS[3], ARGV[1])
  if existing then
    local resent = false
    local found = redis.call('XRANGE', KEYS[2], existing, existing)
    if #found > 0 then
      local fields = found[1][2]
      for i = 1, #fields - 1, 2 do
        if fields[i] == 'payload_key' and fields[i + 1] == KEYS[1] then resent = true end
      end
    end
    if not resent then redis.call('DEL', KEYS[1]) end
    return {0, existing}
  end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], id)
end
return {1, id}
"""


@dataclass
class Submission:
    """A task trained from ``base_version``: a full ``adapter`` or a compact ``update`` (exactly one)."""

    task: str
    adapter: LoraAdapter | None
    base_version: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # stream entry id, set by submit/read
    deliveries: int = 0  # how often it was handed out (>1 after a consumer died)
    update: TaskUpdate | None = None
    # The job accepts a merge that leaves some task over the merge policy's max_error (the
    # coordinator rejects such a merge otherwise; ``adapter.allow_over_bound`` of the job schema).
    allow_over_bound: bool = False
    # One task of one job, the same for every attempt (``<job_id>/<task>``): see ``submitted``.
    attempt_key: str | None = None

    def to_adapter(self, base: Subspace | None) -> LoraAdapter:
        """Full factors: the adapter itself, or the update rebuilt in ``base`` (its base version's subspace)."""
        if self.adapter is not None:
            return self.adapter
        if base is None:
            raise StoreError(f"submission {self.task!r} is a coefficient update; pass its base version's subspace")
        return self.update.to_adapter(base, self.task)


@dataclass
class RemovalRequest:
    """Take ``tasks`` out of the head: the coordinator publishes a version without them, with the bases
    refitted to the remaining tasks (``share.remove_tasks``). ``reason`` is recorded in that version."""

    tasks: list[str]
    reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # stream entry id, set by submit_removal/read
    deliveries: int = 0


StreamItem = Submission | RemovalRequest  # what read() and recover() hand out, in stream order


@dataclass(frozen=True)
class SubmissionEntry:
    """A stream entry's fields without its tensors (what ``entry`` and ``submitted`` return)."""

    id: str
    task: str
    base_version: str | None
    kind: SubmissionKind
    metadata: dict[str, Any]
    allow_over_bound: bool = False
    attempt_key: str | None = None


@dataclass
class PendingEntry:
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


class SubmissionStream:
    """Submissions of one namespace, consumed by consumer group ``group``."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "default",
        group: str = DEFAULT_GROUP,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.group = group
        self.max_bytes = max_bytes
        # hash: attempt key -> id of the entry submitted under it (the namespace's hash tag: same slot)
        self.attempts_key = self.keys.prefix + "attempts"
        self._group_ready = False

    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (from the start: no submission is skipped)."""
        if self._group_ready:
            return
        try:
            self.client.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._group_ready = True

    def _in_group(self, command: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``command(*args, **kwargs)``, a command on the consumer group. If Redis answers NOGROUP (it restarted
        without its data, or the group was destroyed), the group is created again and the command retried once."""
        self.ensure_group()
        try:
            return command(*args, **kwargs)
        except ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
        log.warning(
            "consumer group %r of %s was gone (Redis restarted without its data, or it was destroyed); created it "
            "again from the stream's first entry. Entries delivered but not acknowledged before are gone with the "
            "data, or, if the stream survived, every entry still in it is handed out again",
            self.group,
            self.keys.stream,
        )
        self._group_ready = False
        self.ensure_group()
        return command(*args, **kwargs)

    # -- producing -----------------------------------------------------------------------------
    def submit(self, submission: Submission) -> str:
        """Durably enqueue ``submission``; returns its id (the stream entry id).

        With an ``attempt_key`` that already names an entry, nothing is added and that entry's id is
        returned (a retried task never submits twice; also when a lost reply makes the client resend).
        """
        check_task_name(submission.task)
        if submission.attempt_key is not None and (
            not isinstance(submission.attempt_key, str) or not submission.attempt_key.strip()
        ):
            raise StoreError(
                f"submission {submission.task!r}: attempt_key must be a non-empty string (e.g. '<job_id>/<task>') "
                f"or None, got {submission.attempt_key!r}"
            )
        if not isinstance(submission.allow_over_bound, bool):
            raise StoreError(
                f"submission {submission.task!r}: allow_over_bound must be True or False, "
                f"got {submission.allow_over_bound!r}"
            )
        if (submission.adapter is None) == (submission.update is None):
            raise StoreError(f"submission {submission.task!r}: set exactly one of adapter and update")
        if submission.update is not None and submission.base_version is None:
            raise StoreError(f"submission {submission.task!r}: an update needs the base_version it was trained from")
        source = submission.adapter if submission.adapter is not None else submission.update
        modules = submission.adapter.factors if submission.adapter is not None else submission.update.parts
        check_names(submission.task, modules, source.head)  # what publishing would refuse, refused before writing
        _check_json_object(f"submission {submission.task!r}", "metadata", submission.metadata)
        _check_json_object(f"submission {submission.task!r}", "adapter metadata", source.metadata)
        tensors = {}
        if submission.adapter is not None:
            submission.adapter.validate(submission.task)
            for module, (B, A) in submission.adapter.factors.items():
                tensors[f"B:{module}"] = B
                tensors[f"A:{module}"] = A
            scaling = {m: submission.adapter.scale(m) for m in submission.adapter.factors}
        else:
            for module, parts in submission.update.parts.items():
                for part, value in parts.items():
                    tensors[f"{part}:{module}"] = value
            scaling = {m: 1.0 for m in submission.update.parts}
        for name, value in source.head.items():
            tensors[f"head:{name}"] = value
        data = encode_tensors(tensors)
        if len(data) > self.max_bytes:
            raise StoreError(
                f"submission {submission.task!r} is {len(data) / 2**20:.1f} MiB, over the {self.max_bytes / 2**20:.0f} "
                "MiB limit; lower the LoRA rank or the number of target modules, or raise max_bytes"
            )
        self.ensure_group()
        payload_key = self.keys.submission_payload(uuid.uuid4().hex)
        fields = {
            "task": submission.task,
            "base_version": submission.base_version or "",
            "payload_key": payload_key,
            "sha256": sha256(data),
            "bytes": str(len(data)),
            "kind": (SubmissionKind.ADAPTER if submission.adapter is not None else SubmissionKind.UPDATE).value,
            "scaling": json.dumps(scaling),
            "adapter_metadata": json.dumps(source.metadata),
            "metadata": json.dumps(submission.metadata),
            "allow_over_bound": "1" if submission.allow_over_bound else "0",
            "attempt_key": submission.attempt_key or "",
        }
        args = [submission.attempt_key or ""] + [item for pair in fields.items() for item in pair]
        pipe = self.client.pipeline(transaction=True)
        pipe.set(payload_key, data)
        # EVAL, not EVALSHA: a server restarted between loading a script and this MULTI has no cache.
        # Through execute_command: a cluster pipeline has no eval() of its own.
        pipe.execute_command("EVAL", _SUBMIT_LUA, 3, payload_key, self.keys.stream, self.attempts_key, *args)
        _, (_, entry_id) = pipe.execute()
        submission.id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return submission.id

    def submit_removal(self, request: RemovalRequest) -> str:
        """Durably enqueue a request to remove ``request.tasks`` from the head; returns its id.

        Only its form is checked here (names valid, none twice, JSON metadata); whether the head holds
        the tasks is decided by the coordinator when it reaches the request, after everything before it.
        """
        tasks = request.tasks
        if isinstance(tasks, str) or not isinstance(tasks, list | tuple) or not tasks:
            raise StoreError(f"removal request: tasks must be a non-empty list of task names, got {tasks!r}")
        for name in tasks:
            check_task_name(name)
        if len(set(tasks)) != len(tasks):
            raise StoreError(f"removal request: tasks {list(tasks)} name a task more than once; name each once")
        if request.reason is not None and not isinstance(request.reason, str):
            raise StoreError(f"removal request: reason must be a string or None, got {request.reason!r}")
        _check_json_object(f"removal request {list(tasks)}", "metadata", request.metadata)
        metadata = json.dumps(request.metadata)
        self.ensure_group()
        fields = {
            "task": ",".join(tasks),  # task names hold no comma: what status rows show
            "base_version": "",
            # No payload. A key that never exists, in the namespace's slot: acks and rejections expire it.
            "payload_key": self.keys.submission_payload("none"),
            "sha256": "",
            "bytes": "0",
            "kind": SubmissionKind.REMOVAL.value,
            "tasks": json.dumps(list(tasks)),
            "reason": request.reason or "",
            "metadata": metadata,
            "allow_over_bound": "0",
            "attempt_key": "",
        }
        entry_id = self.client.xadd(self.keys.stream, fields)
        request.id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return request.id

    def submitted(self, attempt_key: str) -> SubmissionEntry | None:
        """The entry submitted under ``attempt_key`` (by any earlier attempt), or None if none was."""
        found = self.client.hget(self.attempts_key, attempt_key)
        if found is None:
            return None
        sid = found.decode()
        entry = self.entry(sid)
        if entry is None:  # the stream was trimmed: the id is all that is left
            return SubmissionEntry(sid, "", None, SubmissionKind.ADAPTER, {}, attempt_key=attempt_key)
        return entry

    def entry(self, submission_id: str) -> SubmissionEntry | None:
        """The fields of entry ``submission_id`` (no tensors), or None if the stream has no such entry."""
        found = self.client.xrange(self.keys.stream, min=submission_id, max=submission_id, count=1)
        if not found:
            return None
        fields = {k.decode(): v.decode() for k, v in found[0][1].items()}
        return SubmissionEntry(
            id=submission_id,
            task=fields["task"],
            base_version=fields.get("base_version") or None,
            kind=SubmissionKind(fields.get("kind", SubmissionKind.ADAPTER)),
            metadata=json.loads(fields.get("metadata") or "{}"),
            allow_over_bound=_flag(fields),
            attempt_key=fields.get("attempt_key") or None,
        )

    # -- consuming -----------------------------------------------------------------------------
    def read(self, consumer: str, count: int = 16, block_ms: int | None = None) -> list[StreamItem]:
        """New submissions for ``consumer`` (waits up to ``block_ms`` for one; None or 0: do not wait).

        A submission whose payload is missing or corrupted, or whose entry cannot be decoded, is rejected on the
        spot with that reason.
        """
        remaining = block_ms or 0
        while True:
            # Block in short slices: a single long BLOCK would outlast the client's socket timeout.
            wait = min(remaining, _BLOCK_SLICE_MS)
            reply = self._in_group(
                self.client.xreadgroup,
                self.group,
                consumer,
                {self.keys.stream: ">"},
                count=count,
                block=wait if wait > 0 else None,
            )
            remaining -= wait
            if reply or remaining <= 0:
                break
        return self._load([entry for _, entries in reply or [] for entry in entries], default_deliveries=1)

    def recover(self, consumer: str, min_idle_ms: int = 60_000, count: int = 1000) -> list[StreamItem]:
        """After a restart: ``consumer``'s own unacknowledged submissions, plus those other consumers have
        held for ``min_idle_ms`` (claimed for ``consumer``, XAUTOCLAIM)."""
        reply = self._in_group(self.client.xreadgroup, self.group, consumer, {self.keys.stream: "0"}, count=count)
        entries = [entry for _, items in reply or [] for entry in items]
        start = "0-0"
        while len(entries) < count:
            result = self._in_group(
                self.client.xautoclaim,
                self.keys.stream,
                self.group,
                consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=count,
            )
            start, claimed = result[0], result[1]
            entries += [entry for entry in claimed if entry and entry[1]]
            if start in (b"0-0", "0-0"):
                break
        seen, unique = set(), []
        for entry in entries:
            if entry[0] not in seen:
                seen.add(entry[0])
                unique.append(entry)
        return self._load(unique, default_deliveries=0)

    def pending(self, count: int = 1000) -> list[PendingEntry]:
        """Delivered but not yet merged or rejected submissions."""
        rows = self._in_group(self.client.xpending_range, self.keys.stream, self.group, min="-", max="+", count=count)
        return [
            PendingEntry(
                id=r["message_id"].decode(),
                consumer=r["consumer"].decode(),
                idle_ms=int(r["time_since_delivered"]),
                deliveries=int(r["times_delivered"]),
            )
            for r in rows
        ]

    def _load(self, entries: list[Any], default_deliveries: int) -> list[StreamItem]:
        """The submissions and removal requests of ``entries``. An entry that cannot be decoded (not written by
        ``submit``: a field missing or malformed, its payload missing or corrupted) is rejected here with the
        reason, whatever its decoding raised: otherwise it would fail every read and block the stream."""
        deliveries = {}
        if entries:
            # One round trip: whether each entry is settled already (``_unsettled``) and how often it was delivered.
            ids = [raw_id for raw_id, _ in entries]
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.keys.merged, ids)
            pipe.hmget(self.keys.rejected, ids)
            for raw_id in ids:
                pipe.xpending_range(self.keys.stream, self.group, min=raw_id, max=raw_id, count=1)
            merged, rejected, *pending = pipe.execute()
            entries = self._unsettled(entries, merged, rejected)
            for rows in pending:
                for row in rows:
                    deliveries[row["message_id"].decode()] = int(row["times_delivered"])
        out = []
        for raw_id, raw_fields in entries:
            sid = raw_id.decode()
            count = deliveries.get(sid, default_deliveries)
            try:
                fields = {k.decode(): v.decode() for k, v in raw_fields.items()}
            except UnicodeDecodeError as err:
                self.reject(sid, f"unreadable entry: a field is not UTF-8 ({err}); resubmit the task")
                continue
            if fields.get("kind") == SubmissionKind.REMOVAL:
                try:
                    out.append(_to_removal(sid, fields, count))
                except Exception as err:
                    self.reject(sid, f"unreadable removal request ({type(err).__name__}: {err}); request it again")
                continue
            key = fields.get("payload_key", "")
            data = self.client.get(key) if key else None  # outside the try: Redis errors are no verdict on it
            if data is None:
                problem = f"payload {key!r} is missing"
            elif sha256(data) != fields.get("sha256"):
                problem = f"payload {key!r} does not match its sha256 checksum"
            else:
                try:
                    tensors, _ = decode_tensors(data)
                    out.append(_to_submission(sid, fields, tensors, count))
                    continue
                except PayloadFormatError as err:
                    problem = f"payload {key!r} {err}"
                except Exception as err:  # fields that do not match the payload, or are malformed themselves
                    problem = f"entry does not match its payload ({type(err).__name__}: {err})"
            self.reject(sid, f"unreadable submission: {problem}; resubmit the task")
        return out

    def _unsettled(self, entries: list[Any], merged: list[Any], rejected: list[Any]) -> list[Any]:
        """``entries`` without those already merged or rejected (``merged``/``rejected``: their records, None where
        there is none), which are acknowledged instead. A settled entry is handed out again only when its
        acknowledgement was lost (a consumer group recreated from the start of the stream, an append-only file cut
        short); merging or rejecting it again would fail, and left pending it would come back at every recover."""
        settled = [
            raw_id
            for (raw_id, _), m, r in zip(entries, merged, rejected, strict=True)
            if m is not None or r is not None
        ]
        if not settled:
            return entries
        self.client.xack(self.keys.stream, self.group, *settled)
        log.info("acknowledged %d submission(s) handed out again though already settled", len(settled))
        done = set(settled)
        return [entry for entry in entries if entry[0] not in done]

    # -- outcomes ------------------------------------------------------------------------------
    def reject(self, submission_id: str, reason: str) -> None:
        """Acknowledge ``submission_id`` without merging it; its reason stays in ``rejections()``.

        Rejecting an already-rejected submission is a no-op; a merged one raises SubmissionError.
        """
        keys = self.keys
        with self.client.pipeline(transaction=True) as pipe:  # explicit: a RedisCluster's default is False
            while True:
                try:
                    pipe.watch(keys.merged, keys.rejected)
                    into = pipe.hget(keys.merged, submission_id)
                    if into is not None:
                        raise SubmissionError(
                            f"submission {submission_id} was already merged into {into.decode()}; it cannot be rejected"
                        )
                    if pipe.hexists(keys.rejected, submission_id):
                        return
                    found = pipe.xrange(keys.stream, min=submission_id, max=submission_id, count=1)
                    if not found:
                        raise SubmissionError(
                            f"submission {submission_id} is not in stream {keys.stream}; check the id"
                        )
                    # Leniently: a malformed entry (a field missing or not UTF-8) must be rejectable too.
                    fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in found[0][1].items()}
                    record = {
                        "reason": reason,
                        "task": fields.get("task", ""),
                        "base_version": fields.get("base_version") or None,
                        "payload_key": fields.get("payload_key"),
                        "rejected": server_time(pipe),
                    }
                    pipe.multi()
                    pipe.hset(keys.rejected, submission_id, json.dumps(record))
                    pipe.xack(keys.stream, self.group, submission_id)
                    if fields.get("payload_key"):
                        pipe.expire(fields["payload_key"], REJECTED_PAYLOAD_TTL_S)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def rejections(self) -> dict[str, dict[str, Any]]:
        """Submission id -> {reason, task, base_version, payload_key, rejected (unix time)}."""
        return {k.decode(): json.loads(v) for k, v in self.client.hgetall(self.keys.rejected).items()}

    def status(self, submission_id: str) -> SubmissionState:
        """Merged (into which version), rejected (why), pending, queued or unknown."""
        into = self.client.hget(self.keys.merged, submission_id)
        if into is not None:
            return SubmissionState(SubmissionStatus.MERGED, version=into.decode())
        why = self.client.hget(self.keys.rejected, submission_id)
        if why is not None:
            return SubmissionState(SubmissionStatus.REJECTED, reason=json.loads(why)["reason"])
        if not self.client.xrange(self.keys.stream, min=submission_id, max=submission_id, count=1):
            return SubmissionState(SubmissionStatus.UNKNOWN)
        pending = self._in_group(
            self.client.xpending_range, self.keys.stream, self.group, min=submission_id, max=submission_id, count=1
        )
        return SubmissionState(SubmissionStatus.PENDING if pending else SubmissionStatus.QUEUED)

    def ack(self, submission_id: str) -> None:
        """Acknowledge ``submission_id`` without recording an outcome.

        Only for a submission that a published version already holds but that is still pending
        (publishing acknowledges in its own transaction, so this means Redis lost that ack, e.g. an
        append-only file cut short). Anything else is merged or rejected, never just acknowledged.
        """
        self.client.xack(self.keys.stream, self.group, submission_id)

    def latest_id(self) -> str | None:
        """The id of the newest submission, or None if there is none."""
        newest = self.client.xrevrange(self.keys.stream, count=1)
        return newest[0][0].decode() if newest else None

    def is_settled(self) -> bool:
        """No submission is waiting: none is delivered but open, and the newest is merged or rejected
        (entries are consumed in order, so nothing older is still queued)."""
        newest = self.latest_id()
        if newest is None:
            return True
        if self.pending(count=1):
            return False
        return self.status(newest).settled

    def summary(self, last: int = 10) -> StreamSummary:
        """Counts by state and the newest ``last`` submissions (what ``sharecl status`` shows)."""
        keys = self.keys
        total = int(self.client.xlen(keys.stream)) if self.client.exists(keys.stream) else 0
        newest = []
        for raw_id, fields in self.client.xrevrange(keys.stream, count=last) if total else []:
            sid = raw_id.decode()
            # Leniently: an entry not written by ``submit`` (rejected when read) must not break the summary.
            decoded = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            kind = decoded.get("kind", SubmissionKind.ADAPTER)
            newest.append(
                SubmissionRow(
                    id=sid,
                    task=decoded.get("task", "?"),
                    base_version=decoded.get("base_version") or None,
                    kind=SubmissionKind(kind) if kind in _KINDS else SubmissionKind.ADAPTER,
                    status=self.status(sid),
                )
            )
        return StreamSummary(
            total=total,
            merged=int(self.client.hlen(keys.merged)),
            rejected=int(self.client.hlen(keys.rejected)),
            pending=len(self.pending()) if total else 0,
            newest=newest,
        )

    def publish_with_ack(
        self,
        store: SubspaceStore,
        subspace: Subspace,
        parent: str | None,
        submissions: Sequence[StreamItem | str],
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Publish ``subspace`` and acknowledge ``submissions`` in the same transaction."""
        if store.namespace != self.namespace:
            raise StoreError(f"store namespace {store.namespace!r} differs from stream namespace {self.namespace!r}")
        ids = [s if isinstance(s, str) else s.id for s in submissions]
        if any(i is None for i in ids):
            raise SubmissionError("a submission has no id; pass submissions returned by read() or recover()")
        return store.publish(subspace, parent, metadata, submission_ids=ids, group=self.group, **kwargs)


def check_names(task: str, modules: Iterable[str], head: Iterable[str]) -> None:
    """Raise unless every name of a submission is one the store publishes: ``task`` (``check_task_name``), its
    ``modules`` and ``head`` tensors (``keys.check_module_name``), the checks ``codec`` applies when it writes a
    version. A submission with any other name could never be published: ``submit`` refuses it and the
    coordinator rejects it (it would otherwise fail every publish of its batch)."""
    check_task_name(task)
    try:
        for name in modules:
            check_module_name(name)
        for name in head:
            check_module_name(name, "head tensor")
    except StoreError as err:
        raise StoreError(
            f"task {task!r}: {err}; the store cannot publish it: rename the module in the model (or the adapter "
            "file) and submit it again"
        ) from None


def _to_submission(sid: str, fields: dict[str, str], tensors: dict[str, Any], deliveries: int) -> Submission:
    check_task_name(fields["task"])
    scaling = json.loads(fields["scaling"])
    meta = _json_object(fields, "adapter_metadata")
    split: dict[str, dict[str, Any]] = {}
    head = {}
    for name, value in tensors.items():
        part, _, rest = name.partition(":")
        if part == "head":
            head[rest] = value
        else:
            split.setdefault(rest, {})[part] = value
    adapter = update = None
    if SubmissionKind(fields.get("kind", SubmissionKind.ADAPTER)) is SubmissionKind.ADAPTER:
        factors = {m: (split[m]["B"], split[m]["A"]) for m in scaling}
        adapter = LoraAdapter(factors=factors, scaling=scaling, head=head, metadata=meta)
    else:
        update = TaskUpdate(parts={m: split[m] for m in scaling}, head=head, metadata=meta)
    return Submission(
        task=fields["task"],
        adapter=adapter,
        base_version=fields["base_version"] or None,
        metadata=_json_object(fields, "metadata"),
        id=sid,
        deliveries=deliveries,
        update=update,
        allow_over_bound=_flag(fields),
        attempt_key=fields.get("attempt_key") or None,
    )


def _to_removal(sid: str, fields: dict[str, str], deliveries: int) -> RemovalRequest:
    tasks = json.loads(fields["tasks"])
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks is {fields['tasks']!r}, expected a non-empty JSON list of task names")
    for name in tasks:
        check_task_name(name)
    metadata = _json_object(fields, "metadata", default="{}")
    return RemovalRequest(tasks, fields.get("reason") or None, metadata, id=sid, deliveries=deliveries)


def _check_json_object(what: str, name: str, value: Any) -> None:
    """StoreError unless ``value`` is a JSON object: a dict with string keys that ``json`` can write."""
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise StoreError(
            f"{what}: {name} must be a JSON object (a dict with string keys), got {type(value).__name__} {shown}; "
            "pass a dict, e.g. {'note': ...}"
        )
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what}: {name} is not JSON-serializable ({err})") from None


def _json_object(fields: dict[str, str], name: str, default: str | None = None) -> dict[str, Any]:
    """Entry field ``name``, which must hold a JSON object (KeyError when missing and no ``default``)."""
    text = fields[name] if default is None else fields.get(name) or default
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{name} is {text[:80]!r}, expected a JSON object")
    return value


def _flag(fields: dict[str, str]) -> bool:
    """``allow_over_bound`` of an entry: "1" or "0" (absent in entries written before it existed: False)."""
    value = fields.get("allow_over_bound", "0")
    if value not in _FLAG:
        raise ValueError(f"allow_over_bound is {value!r}, expected '0' or '1'")
    return _FLAG[value]
