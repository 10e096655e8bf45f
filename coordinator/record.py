"""What one merge did, read back from its published version's manifest.

The coordinator writes everything a merge's tracking run needs into the version it publishes
(``metadata["coordinator"]``), so that the run can be logged, or completed after a crash, from the
store alone: the store is the durable record, MLflow a view of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .validation import SUBMISSION_KEY

COORDINATOR_KEY = "coordinator"  # version metadata written by the coordinator
RUN_ID_KEY = "mlflow_run_id"  # version metadata: the merge's MLflow run
# What a worker puts in a submission's metadata (kept in the task's metadata under SUBMISSION_KEY).
JOB_ID_KEY = "job_id"
TASK_RUN_KEY = "mlflow_run_id"  # the task's training run


def submitted_at(submission_id: str) -> float:
    """Unix time (Redis server clock) at which a stream entry was added: its id is ``<ms>-<seq>``."""
    return int(submission_id.split("-", 1)[0]) / 1000.0


@dataclass
class MergeRecord:
    version: str
    parent: str | None
    created: float  # unix seconds, Redis server clock
    tasks: list[str]  # every task of the version, in order
    new_tasks: list[str]
    submissions: dict[str, str]  # new task -> submission id
    k: dict[str, tuple[int, int]]  # module -> (k_A, k_B)
    explained_variance: dict[str, tuple[float, float]]
    merge_seconds: float
    reconstruction_error: dict[str, float]  # task -> relative error of this merge
    energy_kept: dict[str, float]  # task -> cumulative fraction of its entry energy still represented
    drift_bound: dict[str, float]  # task -> upper bound on its cumulative relative drift
    latency_s: dict[str, float] = field(default_factory=dict)  # submission id -> submit-to-published seconds
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the rest of metadata["coordinator"]
    jobs: dict[str, str] = field(default_factory=dict)  # task -> the sharecl job that trained it (tasks of jobs)
    task_runs: dict[str, str] = field(default_factory=dict)  # task -> the MLflow run of its training
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)  # the version's manifest, as read

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> MergeRecord:
        meta = manifest.get("metadata", {})
        info = dict(meta.get(COORDINATOR_KEY, {}))
        tasks = manifest["tasks"]
        submissions = dict(info.pop("submissions", {}))
        created = float(manifest["created"])

        def task_metric(key: str) -> dict[str, float]:
            out = {}
            for name, entry in tasks.items():
                value = entry.get("metadata", {}).get(key)
                if isinstance(value, int | float):
                    out[name] = float(value)
            return out

        def origin(key: str) -> dict[str, str]:
            """A value of each task's submission metadata (what its worker sent), where it is a string."""
            out = {}
            for name, entry in tasks.items():
                submitted = entry.get("metadata", {}).get(SUBMISSION_KEY, {})
                value = submitted.get("metadata", {}).get(key) if isinstance(submitted, dict) else None
                if isinstance(value, str) and value:
                    out[name] = value
            return out

        return cls(
            version=manifest["version"],
            parent=manifest.get("parent"),
            created=created,
            tasks=list(tasks),
            new_tasks=list(info.pop("new_tasks", list(submissions))),
            submissions=submissions,
            k={m: (int(e["k_A"]), int(e["k_B"])) for m, e in manifest["modules"].items()},
            explained_variance={m: (float(a), float(b)) for m, (a, b) in info.pop("explained_variance", {}).items()},
            merge_seconds=float(info.pop("merge_seconds", 0.0)),
            reconstruction_error={
                t: float(e["reconstruction_error"])
                for t, e in tasks.items()
                if e.get("reconstruction_error") is not None
            },
            energy_kept=task_metric("energy_kept"),
            drift_bound=task_metric("drift_bound"),
            latency_s={sid: max(created - submitted_at(sid), 0.0) for sid in submissions.values()},
            run_id=meta.get(RUN_ID_KEY),
            extra=info,
            jobs=origin(JOB_ID_KEY),
            task_runs=origin(TASK_RUN_KEY),
            manifest=manifest,
        )

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics (``name/key``), every number of the merge."""
        out: dict[str, float] = {
            "merge_seconds": self.merge_seconds,
            "num_tasks": float(len(self.tasks)),
            "num_new_tasks": float(len(self.new_tasks)),
        }
        for m, (a, b) in self.k.items():
            out[f"k_A/{m}"], out[f"k_B/{m}"] = float(a), float(b)
        for m, (a, b) in self.explained_variance.items():
            out[f"explained_variance_A/{m}"], out[f"explained_variance_B/{m}"] = a, b
        for prefix, values in (
            ("reconstruction_error", self.reconstruction_error),
            ("energy_kept", self.energy_kept),
            ("drift_bound", self.drift_bound),
        ):
            for task, value in values.items():
                out[f"{prefix}/{task}"] = value
        if self.reconstruction_error:
            out["reconstruction_error_max"] = max(self.reconstruction_error.values())
        if self.latency_s:
            latencies = list(self.latency_s.values())
            out["submit_to_published_s_max"] = max(latencies)
            out["submit_to_published_s_mean"] = sum(latencies) / len(latencies)
        for key in ("publish_seconds", "batch_size", "head_conflicts", "rejected"):
            if isinstance(self.extra.get(key), int | float):
                out[key] = float(self.extra[key])
        return out
