"""Versioned Share subspaces in Redis: store, submission stream, embedded server, deployment API.

client = connect()                      # --redis-url / $SHARECL_REDIS_URL / embedded server
store = SubspaceStore(client, "default")
v = store.publish(subspace, parent=store.head())
sub = store.get("prod", tasks=["sst2"])  # bases + that task only
"""

from .acks import DEFAULT_GROUP
from .connection import connect, redact, resolve_url
from .deploy import Loaded, TagFollower, load_version
from .embedded import RedisServer, default_folder, ensure_running, find_redis_server, start_redis, stop_embedded
from .errors import (
    CorruptPayloadError,
    HeadConflictError,
    StoreConnectionError,
    StoreError,
    SubmissionError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from .retention import PruneResult
from .store import SubspaceStore, VersionInfo
from .stream import PendingEntry, Submission, SubmissionStream

__all__ = [
    "DEFAULT_GROUP",
    "CorruptPayloadError",
    "HeadConflictError",
    "Loaded",
    "PendingEntry",
    "PruneResult",
    "RedisServer",
    "StoreConnectionError",
    "StoreError",
    "Submission",
    "SubmissionError",
    "SubmissionStream",
    "SubspaceStore",
    "TagFollower",
    "TaskNotFoundError",
    "VersionInfo",
    "VersionNotFoundError",
    "connect",
    "default_folder",
    "ensure_running",
    "find_redis_server",
    "load_version",
    "redact",
    "resolve_url",
    "start_redis",
    "stop_embedded",
]
