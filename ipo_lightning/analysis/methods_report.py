"""Report sections for runs of different methods: one table across methods, and proxy vs gold reward.

- **Methods** (when the runs are of more than one method, or any run logged ``gen/kl`` or ``perf/``
  metrics): per run its method (``method`` in ``config.yaml``, default ``preference``), the options
  that tell it apart (loss type, beta, RLOO's k, the training reward when it is not the judge's),
  samples per optimizer step (:func:`~ipo_lightning.analysis.budget.step_size`), steps and samples
  seen, the final generation scores, the sequence KL to the reference (:func:`kl_metric`),
  degeneration, mean seconds per optimizer step and peak memory.
- **Proxy vs gold reward** (on-policy runs trained against another reward than the judge's): the
  training reward of held-out samples (``val/reward``) beside the judge's reward of the policy's
  samples (``gen/reward``) at every measured step (``proxy_vs_gold.png`` and a table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ipo_lightning.analysis.budget import step_size
from ipo_lightning.analysis.plots import plot_metrics_over_steps
from ipo_lightning.analysis.run_logs import VAL_PREFIX, RunMetrics, logs_prefix
from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import DEFAULT_METHOD
from ipo_lightning.perf_metrics import PEAK_MEMORY, STEP_TIME

GEN_KL = "gen/kl"
SEQ_KL = "divergence/seq_kl"
PROXY_REWARD = "val/reward"
GOLD_REWARD = "gen/reward"
GOLD_SPECS = ("builtin:gold", "ipo_lightning.gold:gold_reward")
"""The two spellings of the gold reward."""
TRAIN_PREFIX = "train/"
"""A ``train/`` row at step ``s`` is of the step that ``s`` steps preceded: ``s + 1`` steps were taken.
(``val/`` rows: :meth:`~ipo_lightning.analysis.run_logs.RunMetrics.validation_steps`.)"""


def steps_trained(run: RunMetrics) -> int:
    """Optimizer steps the run took, from its rows (a ``train/`` row at ``s`` means ``s + 1``)."""
    validations = run.validation_steps()

    def taken(row: dict[str, str]) -> int:
        step = int(row["step"])
        if logs_prefix(row, TRAIN_PREFIX):
            return step + 1
        return validations[step] if logs_prefix(row, VAL_PREFIX) else step

    return max((taken(row) for row in run.rows if row.get("step")), default=0)


def method_of(run: RunMetrics) -> str:
    """The run's method; a ``config.yaml`` written before methods existed states none: preference."""
    return str(run.setting("method") or DEFAULT_METHOD)


def kl_metric(run: RunMetrics) -> str:
    """The sequence KL a run's generation scores are set against: ``gen/kl`` (the KL of the very
    samples ``gen/reward`` judges, logged for every method) when the run logged it, else
    ``divergence/seq_kl`` (the divergence monitor's own samples, preference runs only)."""
    return GEN_KL if run.series(GEN_KL)[0] else SEQ_KL


def same_reward(a: object, b: object) -> bool:
    """Whether two reward specs name the same reward (the gold reward has two spellings)."""
    return a == b or (a in GOLD_SPECS and b in GOLD_SPECS)


def trained_on_proxy(run: RunMetrics) -> bool:
    """An on-policy run (it has a training ``model.reward``) trained against another reward than the
    judge's (``generation.reward``)."""
    reward, judge = run.setting("model.reward"), run.setting("generation.reward")
    return reward is not None and judge is not None and not same_reward(reward, judge)


def method_options(run: RunMetrics) -> str:
    """The options that tell the run apart from other runs of other methods, e.g. ``loss ipo, beta 0.5``."""
    parts = []
    if (loss := run.setting("model.loss_type")) is not None:
        parts.append(f"loss {loss}")
    if isinstance(beta := run.setting("model.beta"), int | float):
        parts.append(f"beta {beta:g}")
    if method_of(run) == "rloo" and (k := run.setting("model.samples_per_prompt")) is not None:
        parts.append(f"k {k}")
    if method_of(run) == "online" and (temperature := run.setting("model.label_temperature")):
        parts.append(f"label temperature {temperature:g}")  # soft labels (0, the default: hard ones)
    if trained_on_proxy(run):
        parts.append(f"reward {run.setting('model.reward')}")
    return ", ".join(parts) or "–"


@dataclass
class MethodRow:
    """One run in the methods table; NaN: not logged, None: not known from the run's files."""

    run: str
    method: str
    options: str
    samples_per_step: int | None
    steps: int
    samples_seen: int | None
    reward: float
    win_rate: float
    win_rate_ci_low: float
    win_rate_ci_high: float
    kl: float
    kl_metric: str
    length: float
    eos_rate: float
    repetition: float
    step_time: float
    """Mean of ``perf/step_time`` over the run (seconds per optimizer step)."""
    peak_memory_gb: float
    """Largest ``perf/peak_memory_gb`` of the run."""


def method_row(name: str, run: RunMetrics) -> MethodRow:
    """The methods-table row of ``run``: last logged values, the step size from its ``config.yaml``."""
    try:
        per_step: int | None = step_size(run.config, str(run.run_dir)).samples
    except ConfigError:  # e.g. trainer.devices auto on an accelerator: the config does not tell
        per_step = None
    steps = steps_trained(run)
    times, memory = run.series(STEP_TIME)[1], run.series(PEAK_MEMORY)[1]
    metric = kl_metric(run)
    return MethodRow(
        run=name,
        method=method_of(run),
        options=method_options(run),
        samples_per_step=per_step,
        steps=steps,
        samples_seen=None if per_step is None else steps * per_step,
        reward=run.last(GOLD_REWARD),
        win_rate=run.last("gen/win_rate"),
        win_rate_ci_low=run.last("gen/win_rate_ci_low"),
        win_rate_ci_high=run.last("gen/win_rate_ci_high"),
        kl=run.last(metric),
        kl_metric=metric,
        length=run.last("gen/length"),
        eos_rate=run.last("gen/eos_rate"),
        repetition=run.last("gen/repetition"),
        step_time=sum(times) / len(times) if times else math.nan,
        peak_memory_gb=max(memory) if memory else math.nan,
    )


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _win_cell(row: MethodRow) -> str:
    cell = _number(row.win_rate)
    if not math.isnan(row.win_rate_ci_low) and not math.isnan(row.win_rate_ci_high):
        cell += f" [{row.win_rate_ci_low:.3f}, {row.win_rate_ci_high:.3f}]"
    return cell


def methods_section(runs: Mapping[str, RunMetrics]) -> tuple[list[str], list[MethodRow]]:
    """Markdown lines of the methods table and its rows; none unless the runs are of several methods
    or logged ``gen/kl`` or ``perf/`` metrics."""
    shown = len({method_of(run) for run in runs.values()}) > 1 or any(
        run.series(metric)[0] for run in runs.values() for metric in (GEN_KL, STEP_TIME, PEAK_MEMORY)
    )
    if not shown:
        return [], []
    rows = [method_row(name, run) for name, run in runs.items()]
    header = [
        "run",
        "method",
        "options",
        "samples/step",
        "steps trained",
        "samples seen",
        "gen reward",
        "gen win rate [95% CI]",
        "KL (nats/seq)",
        "gen length",
        "EOS rate",
        "repetition",
        "s/step",
        "peak memory (GiB)",
    ]
    lines = [
        "## Methods",
        "",
        "Each run's method, what one optimizer step trains on (completions: pairs x 2, prompts x samples "
        "per prompt) and the final generation evaluation, judged alike for every method. KL is the "
        f"sequence-level KL to the reference: `{GEN_KL}` (of the judged samples) when the run logged it, "
        f"else `{SEQ_KL}` (marked *); s/step is the mean `{STEP_TIME}` (training only) and peak memory "
        f"the largest `{PEAK_MEMORY}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for row in rows:
        kl = _number(row.kl, 2) + ("*" if row.kl_metric == SEQ_KL and not math.isnan(row.kl) else "")
        cells = [row.run, row.method, row.options, _number(row.samples_per_step), str(row.steps)]
        cells += [_number(row.samples_seen), _number(row.reward), _win_cell(row), kl]
        cells += [_number(row.length, 1), _number(row.eos_rate), _number(row.repetition)]
        cells += [_number(row.step_time, 2), _number(row.peak_memory_gb, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""], rows


@dataclass
class ProxyGoldPoint:
    """One measured step of a run trained on a proxy reward: proxy and gold reward there."""

    run: str
    step: int
    proxy: float | None
    """``val/reward``: the training reward of the policy's samples of the val prompts (its row is
    one step earlier in metrics.csv of earlier versions,
    :meth:`~ipo_lightning.analysis.run_logs.RunMetrics.validation_steps`)."""
    gold: float | None
    """``gen/reward``: the judge's reward of the policy's samples of the held-out prompts."""


def proxy_gold_points(runs: Mapping[str, RunMetrics]) -> list[ProxyGoldPoint]:
    """Every step at which a proxy-trained run (:func:`trained_on_proxy`) measured either reward."""
    points = []
    for name, run in runs.items():
        if not trained_on_proxy(run):
            continue
        proxy = run.by_step(PROXY_REWARD)  # at the steps taken, as the plot draws it
        gold = run.by_step(GOLD_REWARD)
        for step in sorted(set(proxy) | set(gold)):
            points.append(ProxyGoldPoint(name, step, proxy.get(step), gold.get(step)))
    return points


def proxy_gold_section(
    runs: Mapping[str, RunMetrics], out_dir: Path, title: str
) -> tuple[list[str], list[ProxyGoldPoint]]:
    """Markdown lines (plot and table) of proxy vs gold reward over steps, and the points; none
    without a run trained on a proxy reward."""
    points = proxy_gold_points(runs)
    if not points:
        return [], []
    proxied = {name: run for name, run in runs.items() if trained_on_proxy(run)}
    plot_metrics_over_steps(
        proxied,
        [
            (PROXY_REWARD, "proxy: training reward of held-out samples"),
            (GOLD_REWARD, "gold: the judge's reward of held-out samples"),
        ],
        out_dir / "proxy_vs_gold.png",
        title=f"{title}: proxy vs gold reward",
    )
    lines = [
        "## Proxy vs gold reward",
        "",
        "Runs trained against another reward (`model.reward`, the proxy) than the judge's "
        f"(`generation.reward`, the gold reward): `{PROXY_REWARD}` is the proxy's reward of the policy's "
        f"samples of the val prompts, `{GOLD_REWARD}` the gold reward of its samples of the held-out "
        "prompts, at each measured step. Over-optimisation looks like the proxy reward still rising "
        "while the gold reward stays flat or falls: the policy exploits what the proxy overrates.",
        "",
        "| run | reward | step | proxy (val/reward) | gold (gen/reward) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for point in points:
        reward = runs[point.run].setting("model.reward")
        lines.append(
            f"| {point.run} | {reward} | {point.step} | {_number(point.proxy)} | {_number(point.gold)} |"
        )
    return lines + ["", "![proxy_vs_gold](proxy_vs_gold.png)", ""], points
