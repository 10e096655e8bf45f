"""The accuracy matrix: one row per merge (after which version, which tasks entered), one column per task.

Entry ``[i, j]`` is task ``j``'s accuracy evaluated on the subspace published by merge ``i``; a task
that had not entered yet (or has no eval data) is empty. Reading down a column shows that task's
forgetting. Written as CSV, as text, and as a heatmap PNG (matplotlib's Agg canvas: no display, no
global backend). The coordinator keeps it (and logs it with every merge run); the job driver reads it
back from those runs (``coordinator.tracking.load_matrix``) and reports the rows of its own tasks.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from subspace_store.keys import version_number


@dataclass
class Row:
    version: str
    new_tasks: list[str]
    accuracy: dict[str, float]

    @property
    def label(self) -> str:
        added = ", ".join(self.new_tasks)
        if len(added) > 40:
            added = added[:37] + "..."
        return f"{self.version} +{added}" if added else self.version


@dataclass
class AccuracyMatrix:
    rows: list[Row] = field(default_factory=list)

    def add(self, version: str, new_tasks: list[str], accuracy: dict[str, float]) -> None:
        """Add (or replace) the row of ``version``; rows stay in version order."""
        self.rows = [r for r in self.rows if r.version != version]
        self.rows.append(Row(version, list(new_tasks), dict(accuracy)))
        self.rows.sort(key=lambda r: version_number(r.version) or 0)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, version: str) -> dict[str, float] | None:
        """Accuracy per task after ``version``, or None if there is no row for it."""
        return next((dict(r.accuracy) for r in self.rows if r.version == version), None)

    def only(self, tasks: Sequence[str]) -> AccuracyMatrix:
        """The rows restricted to ``tasks`` (rows left empty are dropped)."""
        wanted = set(tasks)
        rows = []
        for r in self.rows:
            accuracy = {t: a for t, a in r.accuracy.items() if t in wanted}
            if accuracy:
                rows.append(Row(r.version, [t for t in r.new_tasks if t in wanted], accuracy))
        return AccuracyMatrix(rows)

    def columns(self, order: Sequence[str] | None = None) -> list[str]:
        """Tasks in the order they first appear (entry order), or those of ``order`` that have a value."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for task in row.new_tasks:
                if task in row.accuracy:
                    seen.setdefault(task, None)
            for task in row.accuracy:
                seen.setdefault(task, None)
        return list(seen) if order is None else [t for t in order if t in seen]

    def values(self) -> list[list[float]]:
        cols = self.columns()
        return [[row.accuracy.get(c, math.nan) for c in cols] for row in self.rows]

    def csv_text(self, order: Sequence[str] | None = None, *, new_tasks: bool = True) -> str:
        """``version[,new_tasks],<task>...`` per row; empty where a task had not entered yet."""
        cols = self.columns(order)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["version", *(["new_tasks"] if new_tasks else []), *cols])
        for row in self.rows:
            cells = [f"{row.accuracy[c]:.6f}" if c in row.accuracy else "" for c in cols]
            writer.writerow([row.version, *([" ".join(row.new_tasks)] if new_tasks else []), *cells])
        return out.getvalue()

    def write_csv(self, path: Path) -> Path:
        path.write_text(self.csv_text(), newline="")
        return path

    def text(self, order: Sequence[str] | None = None) -> str:
        """A table for people: one row per version (after which merge), one column per task."""
        columns = self.columns(order)
        width = max([len(t) for t in columns] + [8])
        lines = ["accuracy after each merge (rows: version; columns: task):"]
        lines.append(f"{'version':<9}" + "".join(f" {t:>{width}}" for t in columns))
        for row in self.rows:
            cells = "".join(
                f" {row.accuracy[t]:>{width}.3f}" if t in row.accuracy else f" {'-':>{width}}" for t in columns
            )
            lines.append(f"{row.version:<9}{cells}")
        return "\n".join(lines)

    def write_heatmap(self, path: Path, title: str = "accuracy after each merge") -> Path:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        cols = self.columns()
        data = np.ma.masked_invalid(np.array(self.values(), dtype=float).reshape(len(self.rows), len(cols)))
        width = min(2.0 + 0.6 * max(len(cols), 1), 40.0)
        height = min(1.5 + 0.4 * max(len(self.rows), 1), 40.0)
        fig = Figure(figsize=(width, height), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label="accuracy")
        ax.set_xticks(range(len(cols)), labels=cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(self.rows)), labels=[r.label for r in self.rows], fontsize=7)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after merge")
        ax.set_title(title)
        if len(cols) * len(self.rows) <= 400:  # numbers stay legible on small matrices only
            mask = np.ma.getmaskarray(data)
            for i in range(len(self.rows)):
                for j in range(len(cols)):
                    if not mask[i, j]:
                        ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.tight_layout()
        fig.savefig(path)
        return path
