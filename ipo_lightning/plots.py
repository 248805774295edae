"""PNG plots of logged metrics over optimizer steps, one line per run (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ipo_lightning.runs import RunMetrics


def plot_metrics_over_steps(
    runs: Mapping[str, RunMetrics],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    title: str | None = None,
    reference_lines: Mapping[str, Sequence[tuple[float, str]]] | None = None,
) -> Path:
    """Write one panel per metric, each with one line per run, to ``path`` (PNG).

    Args:
        runs: legend label -> run.
        panels: ``(metric name, y-axis label)`` per panel, left to right.
        path: output file; its folder is created.
        title: figure title.
        reference_lines: metric name -> horizontal lines ``(y, label)`` drawn in that panel
            (e.g. IPO's target margin).
    """
    # The object API (Figure, not pyplot) draws with the Agg canvas: no display, no global state.
    figure = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (metric, label) in zip(axes, panels, strict=True):
        for run_label, run in runs.items():
            steps, values = run.series(metric)
            if steps:
                axis.plot(steps, values, marker="o", markersize=2.5, linewidth=1.4, label=run_label)
        for y, line_label in (reference_lines or {}).get(metric, []):
            axis.axhline(y, color="grey", linestyle="--", linewidth=1.0, label=line_label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(label)
        axis.set_title(metric, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
