"""Report sections for generation evaluations and studies, read from the runs' own files.

- **Reward-KL frontier**: the reward of the samples (``gen/reward``) and win rate (``gen/win_rate``) against
  the sampled sequence-level KL to the reference (``gen/kl``, of the judged samples themselves, when
  the run logged it, else ``divergence/seq_kl``), one point per step at which both were measured,
  per run, every method on one plot (``reward_vs_seq_kl.png`` and a table).
- **By number of pairs**: final win rate, reward and mean held-out accuracy against
  ``data.train_size``, one line per series (runs whose ``config.yaml`` differ only in the seed
  options and the size); the seed replicates of a point give its mean and, with two or more, an
  error bar from the lowest to the highest seed (``metric_vs_pairs.png`` and a table).
- **Degeneration** over training: ``gen/length``, ``gen/eos_rate``, ``gen/distinct_2`` and
  ``gen/repetition`` per run (``degeneration_vs_step.png``).

Each section appears only when its metrics or settings are there, so a report of runs without them
is the plain comparison.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipo_lightning.analysis.methods_report import GOLD_REWARD as REWARD
from ipo_lightning.analysis.methods_report import kl_metric, method_of
from ipo_lightning.analysis.plots import plot_errorbar_lines, plot_metrics_over_steps, plot_xy_lines
from ipo_lightning.analysis.run_logs import RunMetrics

WIN_RATE = "gen/win_rate"
GEN_METRICS = (
    "reward",
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "length",
    "eos_rate",
    "distinct_2",
    "repetition",
    "kl",
)
"""Primary-set generation metrics (``gen/<name>``) a run's summary keeps when logged."""
DEGENERATION = (
    ("gen/length", "mean generated tokens"),
    ("gen/eos_rate", "share ending with EOS"),
    ("gen/distinct_2", "distinct bigrams / bigrams"),
    ("gen/repetition", "repetition"),
)
REPLICATE_OPTIONS = ("seed_everything", "data.seed")
"""Options a seed replicate changes (``seed`` study axis); runs that differ only in these are replicates."""
PER_RUN_OPTIONS = ("trainer.default_root_dir",)
"""Options every run has its own value of (its folder), whatever the method."""
SIZE_OPTION = "data.train_size"
RUN_NAME_POINT = re.compile(r"-(n\d+|seed-?\d+)(?=-|$)")
"""The size and seed parts of a study run's name (``ipo-n250-noise0.2-seed1`` -> ``ipo-noise0.2``)."""


def final_gen_metrics(run: RunMetrics) -> dict[str, float]:
    """``gen/<name>`` -> its last logged value, for the :data:`GEN_METRICS` the run logged."""
    finals = {name: run.last(f"gen/{name}") for name in GEN_METRICS}
    return {name: value for name, value in finals.items() if not math.isnan(value)}


@dataclass
class FrontierPoint:
    """One measurement step of one run: sequence KL and the generation scores at that step."""

    run: str
    step: int
    seq_kl: float
    """Sequence-level KL to the reference (:func:`~ipo_lightning.analysis.methods_report.kl_metric`)."""
    reward: float
    win_rate: float | None


def frontier_points(runs: Mapping[str, RunMetrics]) -> list[FrontierPoint]:
    """Every step at which a run logged both its sequence KL and ``gen/reward``, in step order.

    The KL is ``gen/kl`` when the run logged it, else ``divergence/seq_kl``. A metric logged twice at
    one step (a periodic and a post-validation measurement) counts with its last value.
    """
    points = []
    for name, run in runs.items():
        kl, reward, win = (run.by_step(metric) for metric in (kl_metric(run), REWARD, WIN_RATE))
        for step in sorted(set(kl) & set(reward)):
            points.append(FrontierPoint(name, step, kl[step], reward[step], win.get(step)))
    return points


@dataclass
class SeedSpread:
    """A metric over the seed replicates of one point: mean, lowest and highest seed, count."""

    mean: float
    low: float
    high: float
    n: int


def seed_spread(values: Sequence[float]) -> SeedSpread | None:
    """The spread of the finite ``values`` (None when there are none)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return None
    return SeedSpread(sum(finite) / len(finite), min(finite), max(finite), len(finite))


@dataclass
class PairsPoint:
    """The replicates of one series at one training-set size."""

    label: str
    pairs: int
    runs: list[str]
    seeds: list[Any]
    win_rate: SeedSpread | None
    reward: SeedSpread | None
    accuracy: SeedSpread | None
    """Mean held-out preference accuracy over the val sets."""


@dataclass
class _Series:
    label: str
    points: dict[int, list[str]] = field(default_factory=dict)


def series_key(run: RunMetrics) -> str:
    """The run's ``config.yaml`` without the seed, size and per-run options: equal for replicates.

    A config without ``method`` counts as ``method: preference``, as resuming treats it.
    """
    config = copy.deepcopy(run.config)
    # A config.yaml written before methods existed states none: it is a preference run.
    config.setdefault("method", "preference")
    for dotted in (*REPLICATE_OPTIONS, SIZE_OPTION, *PER_RUN_OPTIONS):
        *parents, leaf = dotted.split(".")
        node: Any = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(config, sort_keys=True, default=str)


def pairs_points(runs: Mapping[str, RunMetrics], mean_accuracy: Mapping[str, float]) -> list[PairsPoint]:
    """The final metrics of runs with a ``data.train_size``, by series and size, over seed replicates.

    Args:
        runs: run name -> run, in report order (series and sizes keep their first appearance order,
            sizes then sorted).
        mean_accuracy: run name -> its final mean held-out accuracy.
    """
    series: dict[str, _Series] = {}
    for name, run in runs.items():
        size = run.setting(SIZE_OPTION)
        if size is None:
            continue
        key = series_key(run)
        if key not in series:
            label = RUN_NAME_POINT.sub("", name) or name
            taken = {s.label for s in series.values()}
            series[key] = _Series(label if label not in taken else f"{label} ({len(series) + 1})")
        series[key].points.setdefault(int(size), []).append(name)
    points = []
    for entry in series.values():
        for pairs in sorted(entry.points):
            names = entry.points[pairs]
            points.append(
                PairsPoint(
                    label=entry.label,
                    pairs=pairs,
                    runs=names,
                    seeds=[runs[name].setting("seed_everything") for name in names],
                    win_rate=seed_spread([runs[name].last(WIN_RATE) for name in names]),
                    reward=seed_spread([runs[name].last(REWARD) for name in names]),
                    accuracy=seed_spread([mean_accuracy[name] for name in names]),
                )
            )
    return points


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _spread_cell(spread: SeedSpread | None) -> str:
    if spread is None:
        return "–"
    if spread.n == 1:
        return _number(spread.mean)
    return f"{spread.mean:.3f} [{spread.low:.3f}, {spread.high:.3f}]"


def frontier_section(runs: Mapping[str, RunMetrics], out_dir: Path) -> tuple[list[str], list[FrontierPoint]]:
    """Markdown lines (table and plot) of the reward-KL frontier, and its points; none without points."""
    points = frontier_points(runs)
    if not points:
        return [], []
    with_win = any(point.win_rate is not None for point in points)
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {REWARD: {}, WIN_RATE: {}}
    for point in points:
        for metric, value in ((REWARD, point.reward), (WIN_RATE, point.win_rate)):
            if value is not None:
                xs, ys = curves[metric].setdefault(point.run, ([], []))
                xs.append(point.seq_kl)
                ys.append(value)
    panels = [(REWARD, "reward of the policy's samples")] + (
        [(WIN_RATE, "win rate vs reference")] if with_win else []
    )
    plot_xy_lines(
        {metric: curves[metric] for metric, _ in panels},
        [label for _, label in panels],
        out_dir / "reward_vs_seq_kl.png",
        xlabel="sequence KL to the reference (nats per sequence)",
        title="Reward bought per unit of drift, per measurement",
        # A study's sizes and seeds of one member and noise level share a colour; the legend names
        # each series' method, as runs of every method share the plot.
        groups={
            point.run: f"{RUN_NAME_POINT.sub('', point.run) or point.run} ({method_of(runs[point.run])})"
            for point in points
        },
    )
    header = ["run", "step", "seq KL", "gen reward"] + (["win rate"] if with_win else [])
    lines = [
        "## Reward-KL frontier",
        "",
        "Each measurement step at which a run logged both a sampled sequence-level KL to the reference "
        "and `gen/reward`: `gen/kl`, the KL of the judged samples themselves, when the run logged it, "
        "else `divergence/seq_kl` (the divergence monitor's samples).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for point in points:
        cells = [point.run, str(point.step), _number(point.seq_kl, 4), _number(point.reward)]
        cells += [_number(point.win_rate)] if with_win else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "![reward_vs_seq_kl](reward_vs_seq_kl.png)", ""], points


def pairs_section(
    runs: Mapping[str, RunMetrics], mean_accuracy: Mapping[str, float], out_dir: Path
) -> tuple[list[str], list[PairsPoint]]:
    """Markdown lines (table and plot) of the metrics against the number of pairs, and its points."""
    points = pairs_points(runs, mean_accuracy)
    if not points:
        return [], []
    metrics = [
        (attribute, label)
        for attribute, label in (
            ("win_rate", "gen/win_rate"),
            ("reward", REWARD),
            ("accuracy", "mean held-out accuracy"),
        )
        if any(getattr(point, attribute) is not None for point in points)
    ]
    lines_by_metric: dict[str, dict[str, list[tuple[int, SeedSpread]]]] = {}
    for attribute, label in metrics:
        per_series = lines_by_metric.setdefault(label, {})
        for point in points:
            spread = getattr(point, attribute)
            if spread is not None:
                per_series.setdefault(point.label, []).append((point.pairs, spread))
    plot_errorbar_lines(
        {
            label: {
                series: [(pairs, s.mean, s.low, s.high) for pairs, s in values]
                for series, values in per_series.items()
            }
            for label, per_series in lines_by_metric.items()
        },
        out_dir / "metric_vs_pairs.png",
        xlabel="training pairs (data.train_size)",
        title="Final metrics against the number of training pairs",
    )
    most = max(len(point.runs) for point in points)
    if most == 1:
        spread_note = "One seed per point: the numbers are single runs, without error bars."
    else:
        spread_note = (
            "Each cell is the mean over the point's seed replicates, with the lowest and highest seed in "
            "brackets (the plot's error bars); a single number is a point with one seed."
        )
    header = ["series", "pairs", "seeds"] + [label for _, label in metrics]
    lines = [
        "## By number of training pairs",
        "",
        f"Final values against `data.train_size`. {spread_note}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for point in points:
        cells = [point.label, str(point.pairs), ", ".join(str(seed) for seed in point.seeds)]
        cells += [_spread_cell(getattr(point, attribute)) for attribute, _ in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "![metric_vs_pairs](metric_vs_pairs.png)", ""], points


def degeneration_section(runs: Mapping[str, RunMetrics], out_dir: Path, title: str) -> list[str]:
    """Markdown lines with the plot of the degeneration metrics over steps (none if none was logged)."""
    panels = [
        (metric, label)
        for metric, label in DEGENERATION
        if any(run.series(metric)[0] for run in runs.values())
    ]
    if not panels:
        return []
    plot_metrics_over_steps(runs, panels, out_dir / "degeneration_vs_step.png", title=title)
    return [
        "## Degeneration over training",
        "",
        "Of the policy's samples at each generation evaluation: mean length in tokens, the share that "
        "ended with EOS, distinct bigrams over all bigrams, and `gen/repetition`.",
        "",
        "![degeneration_vs_step](degeneration_vs_step.png)",
        "",
    ]
