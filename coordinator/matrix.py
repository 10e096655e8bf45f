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
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subspace_store.keys import version_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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

    def heatmap_figure(self, title: str = "accuracy after each merge") -> Figure:
        """The matrix as a heatmap that stays readable from 2 to 200 tasks (and as many rows).

        The figure grows with the matrix up to ``HEATMAP_MAX_PX`` on each side; cells, fonts and the
        share of tick labels shown shrink with it. Cells carry their number only while there are at
        most ``ANNOTATE_MAX_TASKS`` columns and ``ANNOTATE_MAX_ROWS`` rows, in dark text on light cells
        and light text on dark ones (chosen from the colormap's luminance). The title is a figure title
        wrapped to the figure's width, and the layout is constrained, so nothing is clipped.
        """
        import numpy as np
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure

        cols, rows = self.columns(), self.rows
        data = np.ma.masked_invalid(np.array(self.values(), dtype=float).reshape(len(rows), len(cols)))
        x_axis = _Axis.of([_short(c) for c in cols], rotated=True)
        y_axis = _Axis.of([r.label for r in rows], rotated=False)
        width_px = _clamp(x_axis.extent_px + y_axis.label_px + _COLORBAR_PX, _MIN_PX, HEATMAP_MAX_PX)
        height_px = _clamp(y_axis.extent_px + x_axis.label_px + _TITLE_PX, _MIN_PX * 0.75, HEATMAP_MAX_PX)
        fig = Figure(figsize=(width_px / HEATMAP_DPI, height_px / HEATMAP_DPI), dpi=HEATMAP_DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        cmap = colormaps[_CMAP].with_extremes(bad=_EMPTY_CELL)
        norm = Normalize(vmin=0.0, vmax=1.0)
        image = ax.imshow(data, norm=norm, cmap=cmap, aspect="auto", interpolation="nearest")
        bar = _clamp(_COLORBAR_BAR_PX / x_axis.extent_px, 0.02, 0.08)  # about 24 px wide at any size
        fig.colorbar(image, ax=ax, label="accuracy", fraction=bar, pad=0.02, aspect=max(y_axis.extent_px / 24.0, 10.0))
        x_axis.apply(ax.set_xticks, len(cols), rotation=90 if len(cols) > ANNOTATE_MAX_TASKS else 60)
        y_axis.apply(ax.set_yticks, len(rows))
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after merge")
        title_pt = 12.0 if width_px < 1000 else 15.0
        title_chars = max(int(0.95 * width_px / (title_pt * _CHAR_EM * HEATMAP_DPI / 72)), 16)
        fig.suptitle(textwrap.fill(title, title_chars), fontsize=title_pt)
        if 0 < len(cols) <= ANNOTATE_MAX_TASKS and len(rows) <= ANNOTATE_MAX_ROWS:
            fontsize = _clamp(min(x_axis.cell_px, y_axis.cell_px) * 0.28, 6.0, 10.0)
            mask = np.ma.getmaskarray(data)
            for i in range(len(rows)):
                for j in range(len(cols)):
                    if not mask[i, j]:
                        value = float(data[i, j])
                        color = text_color(cmap(norm(value)))
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
        return fig

    def write_heatmap(self, path: Path, title: str = "accuracy after each merge") -> Path:
        """The heatmap (``heatmap_figure``) as a PNG of at most ``HEATMAP_MAX_PX`` pixels a side."""
        self.heatmap_figure(title).savefig(path, dpi=HEATMAP_DPI)
        return path


HEATMAP_DPI = 100
HEATMAP_MAX_PX = 2000  # the PNG's largest side, whatever the number of tasks
ANNOTATE_MAX_TASKS = 20  # cells carry their number up to this many columns...
ANNOTATE_MAX_ROWS = 40  # ...and this many rows
DARK_TEXT, LIGHT_TEXT = "#111111", "#ffffff"
_CMAP = "viridis"
_EMPTY_CELL = "#e6e6e6"  # a task that had not entered yet (or was not evaluated)
_MIN_PX = 520.0  # narrow matrices still leave room for the title and the colorbar
_MAX_CELL_PX, _MIN_CELL_PX = 64.0, 6.0
_COLORBAR_PX, _COLORBAR_BAR_PX, _TITLE_PX, _AXIS_TITLE_PX = 140.0, 24.0, 60.0, 30.0
_CHAR_EM = 0.62  # a character's mean width in ems (DejaVu Sans), for size estimates
_LABEL_CHARS = 28  # longer task names are shortened on the axis


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _short(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 1] + "\u2026"


def relative_luminance(rgba: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour (components in [0, 1])."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def text_color(background: Sequence[float]) -> str:
    """Dark or light text, whichever contrasts more with ``background`` (WCAG contrast ratio)."""
    lum = relative_luminance(background)
    return DARK_TEXT if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else LIGHT_TEXT


@dataclass
class _Axis:
    """One axis of the heatmap: how big its cells are, its tick labels' font, and which labels show."""

    labels: list[str]
    cell_px: float
    font_pt: float
    every: int  # every n-th tick label is shown (all of them when they fit)
    label_px: float  # room the tick labels and the axis title take across the axis

    @classmethod
    def of(cls, labels: list[str], *, rotated: bool) -> _Axis:
        n = max(len(labels), 1)
        room = HEATMAP_MAX_PX - 520.0  # what the other axis' labels, the title and the colorbar may need
        cell = _clamp(room / n, _MIN_CELL_PX, _MAX_CELL_PX)
        font = 9.0 if n <= 20 else 8.0 if n <= 60 else 7.0
        font_px = font * HEATMAP_DPI / 72
        every = max(1, math.ceil(font_px * 1.15 / cell))
        longest = max((len(label) for label in labels), default=1)
        text_px = longest * _CHAR_EM * font_px
        across = text_px * (0.9 if rotated else 1.0) + font_px + _AXIS_TITLE_PX
        return cls(labels, cell, font, every, across)

    @property
    def extent_px(self) -> float:
        return self.cell_px * max(len(self.labels), 1)

    def apply(self, set_ticks: Any, n: int, rotation: float = 0) -> None:
        shown = range(0, n, self.every)
        kwargs: dict[str, Any] = {"fontsize": self.font_pt}
        if rotation:
            kwargs.update(rotation=rotation, ha="right", va="center", rotation_mode="anchor")
        set_ticks(list(shown), labels=[self.labels[i] for i in shown], **kwargs)
