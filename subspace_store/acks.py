"""Acknowledging submissions inside the transaction that publishes (or rejects) them.

Shared by ``store.publish`` and ``stream.reject``. The caller has WATCHed ``keys.merged`` and
``keys.rejected``, so a concurrent merge or rejection of the same submission aborts the transaction:
a submission ends up merged exactly once or rejected, never both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from redis.client import Pipeline

from .errors import SubmissionError
from .keys import Keys

DEFAULT_GROUP = "coordinator"
# Merged submissions' raw payloads stay this long (for inspection), then Redis drops them: the
# version that contains them is the durable record.
MERGED_PAYLOAD_TTL_S = 24 * 3600
REJECTED_PAYLOAD_TTL_S = 7 * 24 * 3600


def check_open(pipe: Pipeline, keys: Keys, group: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Verify every id is delivered, unacknowledged, and neither merged nor rejected (immediate mode).

    Returns id -> stream entry fields (decoded), for the payload keys. Raises SubmissionError naming
    the first offending id and why.
    """
    if not ids:
        return {}
    if len(set(ids)) != len(ids):
        raise SubmissionError(f"submission ids repeat in {list(ids)}; pass each submission once")
    merged = pipe.hmget(keys.merged, list(ids))
    rejected = pipe.hmget(keys.rejected, list(ids))
    entries = {}
    for sid, into, why in zip(ids, merged, rejected, strict=True):
        if into is not None:
            raise SubmissionError(f"submission {sid} was already merged into {into.decode()}; drop it from this merge")
        if why is not None:
            reason = json.loads(why).get("reason", "")
            raise SubmissionError(f"submission {sid} was rejected ({reason}); drop it from this merge")
        found = pipe.xrange(keys.stream, min=sid, max=sid, count=1)
        if not found:
            raise SubmissionError(f"submission {sid} is not in stream {keys.stream}; check the id")
        pending = pipe.xpending_range(keys.stream, group, min=sid, max=sid, count=1)
        if not pending:
            raise SubmissionError(
                f"submission {sid} is not pending in consumer group {group!r}: read it with "
                "SubmissionStream.read before merging it"
            )
        entries[sid] = {k.decode(): v.decode() for k, v in found[0][1].items()}
    return entries


def queue_acks(pipe: Pipeline, keys: Keys, group: str, entries: dict[str, dict[str, Any]], version: str) -> None:
    """Inside MULTI: record each submission as merged into ``version`` and acknowledge it."""
    if not entries:
        return
    pipe.hset(keys.merged, mapping={sid: version for sid in entries})
    pipe.xack(keys.stream, group, *entries)
    for fields in entries.values():
        pipe.expire(fields["payload_key"], MERGED_PAYLOAD_TTL_S)
