"""The accuracy matrix: one row per merge (after which version, which tasks entered), one column per task.

Entry ``[i, j]`` is task ``j``'s accuracy evaluated on the subspace published by merge ``i``; a task
that had not entered yet (or has no eval data) is empty. Reading down a column shows that task's
forgetting. Written as CSV and as a heatmap PNG (matplotlib's Agg canvas: no display, no global backend).
"""

from __future__ import annotations

import csv
import math
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

    def columns(self) -> list[str]:
        """Tasks in the order they first appear (entry order)."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for task in row.new_tasks:
                if task in row.accuracy:
                    seen.setdefault(task, None)
            for task in row.accuracy:
                seen.setdefault(task, None)
        return list(seen)

    def values(self) -> list[list[float]]:
        cols = self.columns()
        return [[row.accuracy.get(c, math.nan) for c in cols] for row in self.rows]

    def write_csv(self, path: Path) -> Path:
        cols = self.columns()
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["version", "new_tasks", *cols])
            for row in self.rows:
                cells = [f"{row.accuracy[c]:.6f}" if c in row.accuracy else "" for c in cols]
                writer.writerow([row.version, " ".join(row.new_tasks), *cells])
        return path

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
