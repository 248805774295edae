"""PNG plots of logged metrics over optimizer steps, one line per run (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ipo_lightning.analysis.run_logs import RunMetrics


def plot_metrics_over_steps(
    runs: Mapping[str, RunMetrics],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    title: str | None = None,
    reference_lines: Mapping[str, Sequence[tuple[float, str]]] | None = None,
    log_scale: Sequence[str] = (),
) -> Path:
    """Write one panel per metric, each with one line per run, to ``path`` (PNG).

    Args:
        runs: legend label -> run.
        panels: ``(metric name, y-axis label)`` per panel, left to right.
        path: output file; its folder is created.
        title: figure title.
        reference_lines: metric name -> horizontal lines ``(y, label)`` drawn in that panel
            (e.g. IPO's target margin).
        log_scale: metrics drawn on a symmetric log axis (linear near 0), for values that span
            orders of magnitude across runs.
    """
    # The object API (Figure, not pyplot) draws with the Agg canvas: no display, no global state.
    figure = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (metric, label) in zip(axes, panels, strict=True):
        lowest = 0.0
        for run_label, run in runs.items():
            steps, values = run.series(metric)
            if steps:
                axis.plot(steps, values, marker="o", markersize=2.5, linewidth=1.4, label=run_label)
                lowest = min(lowest, *values)
        for y, line_label in (reference_lines or {}).get(metric, []):
            axis.axhline(y, color="grey", linestyle="--", linewidth=1.0, label=line_label)
        if metric in log_scale:
            axis.set_yscale("symlog", linthresh=0.01)
            if lowest >= 0:
                axis.set_ylim(bottom=0)  # no empty negative decades
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


def scatter_runs(
    points: Mapping[str, tuple[float, float]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    diagonal: bool = False,
) -> Path:
    """One labelled point per run (e.g. held-out accuracy against KL), written to ``path`` (PNG).

    Args:
        points: legend label -> (x, y); NaN points are left out.
        path: output file; its folder is created.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
        diagonal: draw y = x (for in-distribution vs out-of-distribution comparisons).
    """
    figure = Figure(figsize=(5.6, 4.4), layout="constrained")
    axis = figure.subplots()
    shown = {label: xy for label, xy in points.items() if all(value == value for value in xy)}
    for label, (x, y) in shown.items():
        axis.scatter([x], [y], s=36, label=label)
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if diagonal and shown:
        values = [value for xy in shown.values() for value in xy]
        low, high = min(values), max(values)
        axis.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1.0, label="y = x")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_xy_lines(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    ylabels: Sequence[str],
    path: str | Path,
    *,
    xlabel: str,
    title: str | None = None,
    groups: Mapping[str, str] | None = None,
) -> Path:
    """One panel per metric, each with one line per run through its (x, y) points, written to ``path``.

    Args:
        panels: panel title (a metric name) -> run label -> (xs, ys) in drawing order (e.g. by step).
        ylabels: y-axis label per panel, in the order of ``panels``.
        path: output file; its folder is created.
        xlabel: x-axis label, shared by the panels.
        title: figure title.
        groups: run label -> group label. Runs of a group share a colour and one legend entry (a
            study's sizes and seeds of one method), so many runs stay readable; default: each run
            its own group.
    """
    groups = groups or {}
    order = list(dict.fromkeys(groups.get(label, label) for lines in panels.values() for label in lines))
    colours = {group: f"C{index % 10}" for index, group in enumerate(order)}
    figure = Figure(figsize=(5.2 * len(panels) + 1.6, 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (metric, lines), ylabel in zip(axes, panels.items(), ylabels, strict=True):
        shown: set[str] = set()
        for label, (xs, ys) in lines.items():
            group = groups.get(label, label)
            axis.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                linewidth=1.0,
                alpha=0.8,
                color=colours[group],
                label=group if group not in shown else None,
            )
            shown.add(group)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(metric, fontsize=10)
        axis.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_errorbar_lines(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float, float]]]],
    path: str | Path,
    *,
    xlabel: str,
    title: str | None = None,
) -> Path:
    """One panel per metric, one line per series through (x, mean) with bars from low to high (PNG).

    Args:
        panels: y-axis label -> series label -> ``(x, mean, low, high)`` points, x increasing; a point
            with low == high gets no bar. The x axis is logarithmic (data sizes grow by factors).
        path: output file; its folder is created.
        xlabel: x-axis label, shared by the panels.
        title: figure title.
    """
    figure = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (ylabel, series) in zip(axes, panels.items(), strict=True):
        for label, points in series.items():
            xs, means, lows, highs = (list(values) for values in zip(*points, strict=True))
            below = [mean - low for mean, low in zip(means, lows, strict=True)]
            above = [high - mean for mean, high in zip(means, highs, strict=True)]
            axis.errorbar(
                xs,
                means,
                yerr=[below, above],
                marker="o",
                markersize=4,
                capsize=3,
                linewidth=1.3,
                label=label,
            )
        axis.set_xscale("log")
        sizes = sorted({point[0] for points in series.values() for point in points})
        axis.set_xticks(sizes, [f"{size:g}" for size in sizes])  # the sizes themselves, not decades
        axis.minorticks_off()
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
