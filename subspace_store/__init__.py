"""Versioned Share subspaces in Redis: store, submission stream, deployment API.

client = connect()                      # --redis-url / $SHARECL_REDIS_URL / embedded server
store = SubspaceStore(client, "default")
v = store.publish(subspace, parent=store.head())
sub = store.get("prod", tasks=["sst2"])  # bases + that task only

Also the project's low-level shared names: ``home`` (the data folder), ``tracking`` (MLflow tag
names and plumbing that workers and the coordinator both write). The embedded server's management
(``embedded``) is for the CLI and tests.
"""

from .connection import connect, redact, resolve_url
from .deploy import Loaded, TagFollower, load_version
from .errors import (
    CorruptPayloadError,
    HeadConflictError,
    StoreConnectionError,
    StoreError,
    SubmissionError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from .evalspec import EvalSpec, EvalSpecError
from .outcomes import StreamSummary, SubmissionKind, SubmissionRow, SubmissionState, SubmissionStatus
from .plugins import PluginImportError, load_callable
from .retention import PruneResult
from .store import SubspaceStore, VersionInfo
from .stream import PendingEntry, Submission, SubmissionStream

__all__ = [
    "CorruptPayloadError",
    "EvalSpec",
    "EvalSpecError",
    "HeadConflictError",
    "Loaded",
    "PendingEntry",
    "PluginImportError",
    "PruneResult",
    "StoreConnectionError",
    "StoreError",
    "StreamSummary",
    "Submission",
    "SubmissionError",
    "SubmissionKind",
    "SubmissionRow",
    "SubmissionState",
    "SubmissionStatus",
    "SubmissionStream",
    "SubspaceStore",
    "TagFollower",
    "TaskNotFoundError",
    "VersionInfo",
    "VersionNotFoundError",
    "connect",
    "load_callable",
    "load_version",
    "redact",
    "resolve_url",
]
