"""MLflow merge runs (real sqlite store), accuracy after every merge through a plug-in evaluator, the
accuracy matrix artifacts, completing a run that a crashed coordinator left open, and a heatmap that
stays readable from 2 to 200 tasks."""

from __future__ import annotations

import csv
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from coordinator import Coordinator, CoordinatorConfig, Evaluation, MergeTracker, build
from coordinator.crash import EXIT_CODE
from coordinator.matrix import ANNOTATE_MAX_TASKS, DARK_TEXT, HEATMAP_MAX_PX, LIGHT_TEXT, AccuracyMatrix
from share import KPolicy, LoraAdapter, Subspace
from subspace_store import EvalSpec, Submission, SubmissionStream, SubspaceStore

MODULE, N, D, CLASSES = "layer.0.query", 40, 32, 3


def task_adapter(seed: int, r: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        factors={MODULE: (torch.randn(N, r, generator=g), torch.randn(r, D, generator=g))},
        head={"classifier.weight": torch.randn(CLASSES, N, generator=g)},
    )


def write_eval_split(folder: Path, task: str, adapter: LoraAdapter, rows: int = 200) -> str:
    """Inputs labelled by the task's own, unmerged model, so accuracy measures what the merge kept."""
    g = torch.Generator().manual_seed(1000 + len(task))
    x = torch.randn(rows, D, generator=g)
    labels = (x @ adapter.delta_weight(MODULE).T @ adapter.head["classifier.weight"].T).argmax(dim=1)
    path = folder / f"{task}.parquet"
    table = pa.table({"x": pa.array(x.tolist(), pa.list_(pa.float32())), "label": pa.array(labels.tolist())})
    pq.write_table(table, path)
    return str(path)


def probe_spec(path: str, **extra: str) -> dict:
    """A submission's eval metadata for ``probe_accuracy`` (which reads only ``eval_path``)."""
    spec = EvalSpec(eval_path=path, builder="probe", target_modules=(MODULE,), max_length=1, batch_size=200, **extra)
    return {"eval": spec.to_dict()}


def probe_accuracy(subspace: Subspace, specs: dict[str, EvalSpec]) -> dict[str, float]:
    """An evaluator: the task's merged ``dW`` and head, run on its eval Parquet."""
    out = {}
    for task, spec in specs.items():
        table = pq.read_table(spec.eval_path)
        x = torch.tensor(table.column("x").to_pylist())
        y = torch.tensor(table.column("label").to_pylist())
        logits = x @ subspace.delta_weight(task, MODULE).T @ subspace.tasks[task].head["classifier.weight"].T
        out[task] = float((logits.argmax(dim=1) == y).float().mean())
    return out


def merge_runs(uri: str, experiment: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`sharecl.kind` = 'merge'")
    return {run.data.tags.get("sharecl.version", run.info.run_id): run for run in runs}


@pytest.mark.slow  # with the sqlite store's creation, ~12 s here
def test_merge_runs_hold_metrics_accuracy_and_matrix(redis_client, namespace, mlflow_uri, tmp_path) -> None:
    store, stream = SubspaceStore(redis_client, namespace), SubmissionStream(redis_client, namespace)
    tracker = MergeTracker(mlflow_uri, namespace, namespace)
    coordinator = Coordinator(store, stream, KPolicy(k=8), tracker, Evaluation(default=probe_accuracy))
    adapters = {f"t{i}": task_adapter(i) for i in range(4)}
    paths = {name: write_eval_split(tmp_path, name, a) for name, a in adapters.items()}
    eval_of = {name: probe_spec(path) for name, path in paths.items()}

    for name in ("t0", "t1"):
        stream.submit(Submission(name, adapters[name], None, eval_of[name]))
    first = coordinator.step(max_batch=8, block_ms=None)
    assert first.version == "v1" and first.accuracy == {"t0": 1.0, "t1": 1.0}  # k=8 holds two rank-4 tasks exactly
    # t2 is evaluated; t3 names an evaluator that is not installed; "noeval" has no eval data at all.
    stream.submit(Submission("t2", adapters["t2"], "v1", eval_of["t2"]))
    stream.submit(
        Submission(
            "t3",
            adapters["t3"],
            "v1",
            probe_spec(paths["t3"], evaluator="no_such_package.evals:accuracy"),
        )
    )
    stream.submit(Submission("noeval", task_adapter(9), "v1"))
    second = coordinator.step(max_batch=8, block_ms=None)
    assert second.version == "v2" and set(second.accuracy) == {"t0", "t1", "t2"}
    assert min(second.accuracy.values()) < 1.0  # k=8 for five rank-4 tasks: something is forgotten

    runs = merge_runs(mlflow_uri, namespace)
    assert set(runs) == {"v1", "v2"}
    run = runs["v2"]
    assert run.info.status == "FINISHED" and store.manifest("v2")["metadata"]["mlflow_run_id"] == run.info.run_id
    metrics, manifest = run.data.metrics, store.manifest("v2")
    assert run.data.params["version"] == "v2" and run.data.params["parent"] == "v1"
    assert run.data.params["new_tasks"] == "t2 t3 noeval"
    assert metrics[f"k_A/{MODULE}"] == 8 and metrics[f"k_B/{MODULE}"] == 8
    assert 0 < metrics[f"explained_variance_A/{MODULE}"] < 1 and 0 < metrics[f"explained_variance_B/{MODULE}"] < 1
    assert metrics["merge_seconds"] > 0 and metrics["publish_seconds"] > 0 and metrics["num_tasks"] == 5
    assert metrics["submit_to_published_s_max"] >= 0
    for task in ("t0", "t1", "t2", "t3", "noeval"):
        entry = manifest["tasks"][task]
        assert metrics[f"reconstruction_error/{task}"] == pytest.approx(entry["reconstruction_error"])
        assert metrics[f"energy_kept/{task}"] == pytest.approx(entry["metadata"]["energy_kept"])
        assert metrics[f"drift_bound/{task}"] == pytest.approx(entry["metadata"]["drift_bound"])
    for task in ("t0", "t1", "t2"):
        assert metrics[f"accuracy/{task}"] == pytest.approx(second.accuracy[task])
    assert "accuracy/t3" not in metrics and "could not be imported" in run.data.tags["eval_error/t3"]

    folder = Path(MlflowClient(mlflow_uri).download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    with open(folder / "accuracy_matrix.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["version", "new_tasks", "t0", "t1", "t2"]
    assert rows[1][:2] == ["v1", "t0 t1"] and rows[1][4] == ""  # t2 had not entered yet
    assert rows[2][:2] == ["v2", "t2 t3 noeval"] and float(rows[2][4]) == pytest.approx(second.accuracy["t2"])
    assert (folder / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A new incarnation rebuilds the matrix from the finished runs.
    again = Coordinator(store, stream, KPolicy(k=8), MergeTracker(mlflow_uri, namespace, namespace))
    again.start()
    assert [r.version for r in again.matrix.rows] == ["v1", "v2"] and again.matrix.columns() == ["t0", "t1", "t2"]


# Runs in a child process: the coordinator publishes v1 and dies at the crash point after_publish,
# before its MLflow run is finished.
_CRASHING = textwrap.dedent(
    """
    import sys, torch
    from coordinator import CoordinatorConfig, build
    from share import KPolicy, LoraAdapter
    from subspace_store import Submission

    url, namespace, uri, markers = sys.argv[1:5]
    config = CoordinatorConfig(namespace=namespace, redis_url=url, mlflow_uri=uri, policy=KPolicy(k=4),
                               crash_at=["after_publish"], crash_marker_dir=markers)
    coordinator = build(config)
    g = torch.Generator().manual_seed(0)
    adapter = LoraAdapter({"m": (torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g))})
    coordinator.stream.submit(Submission("a", adapter, None))
    coordinator.step(block_ms=None)
    """
)


@pytest.mark.slow
def test_run_left_open_by_a_crash_is_completed_on_restart(redis_server, namespace, mlflow_uri, tmp_path) -> None:
    markers = tmp_path / "markers"
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING, redis_server, namespace, mlflow_uri, str(markers)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == EXIT_CODE, child.stderr
    assert (markers / "crashed-after_publish").exists()
    config = CoordinatorConfig(namespace=namespace, redis_url=redis_server, mlflow_uri=mlflow_uri)
    coordinator = build(config)
    assert coordinator.store.head() == "v1" and coordinator.stream.pending() == []  # published and acknowledged
    (open_run,) = merge_runs(mlflow_uri, namespace).values()
    assert open_run.info.status == "RUNNING"
    assert coordinator.store.manifest("v1")["metadata"]["mlflow_run_id"] == open_run.info.run_id
    # A run opened for a merge that never got published (the process died before the commit).
    orphan = coordinator.tracking.start("v1", ["never"])

    coordinator.start()  # what every new incarnation does first
    runs = merge_runs(mlflow_uri, namespace)
    done = runs["v1"]
    assert done.info.run_id == open_run.info.run_id and done.info.status == "FINISHED"
    assert done.data.metrics["reconstruction_error/a"] == pytest.approx(0.0, abs=1e-5)
    assert done.data.metrics["k_A/m"] == 2 and done.data.tags["sharecl.status"] == "published"
    assert runs[orphan].info.status == "FAILED" and "not published" in runs[orphan].data.tags["sharecl.status"]
    # The published merge is not redone: nothing is pending, and an idle step publishes nothing.
    assert coordinator.stream.pending() == [] and coordinator.step(block_ms=None).version is None


def _matrix(tasks: int) -> AccuracyMatrix:
    """``tasks`` tasks entering one per version, accuracies spread over [0, 1] (both ends included)."""
    matrix = AccuracyMatrix()
    names = [f"relation_task_{i:03d}" for i in range(tasks)]
    for v in range(tasks):
        accuracy = {names[j]: ((v * 7 + j * 3) % 11) / 10.0 for j in range(v + 1)}
        matrix.add(f"v{v + 1}", [names[v]], accuracy)
    return matrix


@pytest.mark.parametrize("tasks", [2, 6, 60, 200])
def test_heatmap_stays_readable_from_2_to_200_tasks(tasks: int, tmp_path: Path) -> None:
    matrix = _matrix(tasks)
    title = f"demo-20260101-120000 ({tasks} tasks): accuracy after each merge"
    png = matrix.write_heatmap(tmp_path / "m.png", title=title).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert 300 <= width <= HEATMAP_MAX_PX and 300 <= height <= HEATMAP_MAX_PX, (width, height)

    fig = matrix.heatmap_figure(title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    (suptitle,) = fig.texts
    inside = [suptitle, *fig.axes[0].get_xticklabels(), *fig.axes[0].get_yticklabels()]
    for text in (t for t in inside if t.get_visible() and t.get_text()):
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, (
            text.get_text(),
            extent,
            box,
        )
    assert suptitle.get_text().replace("\n", " ") == title
    # Tick labels never overlap: at most one per label height along each axis.
    ax = fig.axes[0]
    for labels, along in ((ax.get_xticklabels(), "x"), (ax.get_yticklabels(), "y")):
        spans = sorted(
            (e.x0, e.x1) if along == "x" else (e.y0, e.y1)
            for e in (t.get_window_extent(renderer) for t in labels if t.get_text())
        )
        assert all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:], strict=False)), along

    cells = [t for t in ax.texts if t.get_text()]
    if tasks <= ANNOTATE_MAX_TASKS:
        assert len(cells) == tasks * (tasks + 1) // 2  # every evaluated cell, none of the empty ones
        for cell in cells:
            value = float(cell.get_text())
            background = ax.images[0].cmap(ax.images[0].norm(value))
            other = LIGHT_TEXT if cell.get_color() == DARK_TEXT else DARK_TEXT
            assert _contrast(cell.get_color(), background) > _contrast(other, background)
        by_value = {float(c.get_text()): c.get_color() for c in cells}
        assert by_value[1.0] == DARK_TEXT and by_value[0.0] == LIGHT_TEXT  # viridis: yellow top, purple bottom
    else:
        assert cells == []


def _contrast(color: str, background: tuple[float, ...]) -> float:
    """WCAG contrast ratio, computed independently of the code under test."""
    from matplotlib.colors import to_rgb

    def lum(rgb: tuple[float, ...]) -> float:
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    a, b = sorted((lum(to_rgb(color)), lum(background)), reverse=True)
    return (a + 0.05) / (b + 0.05)
