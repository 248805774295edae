"""``python -m ipo_lightning report RUN_DIR... --out DIR``: compare finished runs in Markdown and PNGs.

The report reads only what runs write (``metrics.csv``, ``config.yaml``, an optional ``judge.json``),
so it needs no W&B account and works on copied run folders. It writes ``DIR/report.md``, a
``DIR/summary.json`` with every number of the table, and the plots:

- ``kl_vs_step.png``: ``divergence/kl`` over optimizer steps, one line per run;
- ``accuracy_vs_kl.png``: final held-out accuracy against final KL, the trade-off frontier;
- ``accuracy_id_vs_ood.png``: accuracy on the first (in-distribution) val set against the second
  (out-of-distribution), when the runs have two or more val sets;
- with a generation evaluation (``gen/`` metrics) or a data-size study (``data.train_size``), the
  sections of :mod:`~ipo_lightning.analysis.study_report`: the reward-KL frontier, metrics against
  the number of pairs over seed replicates, and degeneration over training; the table then also
  has the final ``gen/`` values, the number of pairs and the seed;
- with runs of several methods (or ``gen/kl`` and ``perf/`` metrics), and runs trained against a
  proxy reward, the sections of :mod:`~ipo_lightning.analysis.methods_report`: one table across
  methods, and the proxy reward beside the gold reward over training.

Recommendation rule: among the runs trained on clean labels (``data.label_noise`` 0; all runs if
none is), the best score: the final generation win rate over the reference's samples
(``gen/win_rate`` of the primary set) when every candidate logged one, since that judges what the
policy writes, otherwise the mean held-out preference accuracy over all val sets. Runs within
``TIE_SCORE`` of the best count as tied and the one with the lowest KL to the reference wins, since
it bought the same score with less drift. Runs with label noise are robustness tests: the report
pairs each with the clean run of the same loss, beta and normalisation and shows how much accuracy
the noise cost.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipo_lightning.analysis.methods_report import methods_section, proxy_gold_section
from ipo_lightning.analysis.plots import plot_metrics_over_steps, scatter_runs
from ipo_lightning.analysis.run_logs import RunMetrics, load_run
from ipo_lightning.analysis.study_report import (
    degeneration_section,
    final_gen_metrics,
    frontier_section,
    pairs_section,
)
from ipo_lightning.errors import UserInputError

TIE_SCORE = 0.01
ACCURACY = "rewards/accuracy"
REWARD_MODEL = "reward_model"
"""The ``loss`` of a reward-model run (``method: reward_model``) in the table and summary.json."""
RM_METRICS = {"accuracy": "rm/accuracy", "margin": "rm/margin"}
"""A reward-model run's own accuracy and margin (its scores of chosen vs rejected, not a policy's)."""
RM_NOTE = (
    " For reward-model runs (loss `reward_model`) accuracy is the share of held-out pairs whose chosen "
    "completion the model scores higher (`rm/accuracy`) and margin the mean score difference "
    "(`val/rm/margin`); they train no policy, so they have no KL or retention and are recommended only "
    "when no policy run is given."
)


@dataclass
class RunSummary:
    """The final numbers of one run, as the report's table shows them."""

    name: str
    run_dir: str
    loss_type: str
    beta: float
    length_normalize: bool | None
    label_noise: float
    steps: int
    accuracy: dict[str, float]
    """Val set name -> last logged preference accuracy (implicit reward)."""
    margin: float
    """Last ``val/logratio/margin`` of the primary val set (the loss's own normalisation)."""
    kl: float
    """Last ``divergence/kl``, nats per completion token."""
    retention_chosen: float
    retention_text: float
    win_rate: float | None = None
    """Reward-model win rate against the reference, from ``judge.json`` when present."""
    train_size: int | None = None
    """``data.train_size``: the number of training pairs of a data-size study (None: all)."""
    seed: int | None = None
    """``seed_everything``."""
    gen: dict[str, float] = field(default_factory=dict)
    """``gen/<name>`` -> last logged value, for the generation metrics the run logged."""

    @property
    def mean_accuracy(self) -> float:
        """Mean accuracy over the val sets (NaN without any)."""
        values = list(self.accuracy.values())
        return sum(values) / len(values) if values else math.nan


def is_reward_model_run(run: RunMetrics) -> bool:
    """Whether ``run`` trained a reward model: its config says so, or (no config) it logged ``rm/``."""
    method = run.setting("method")
    if method is not None:
        return method == REWARD_MODEL
    return bool(run.rows) and f"val/{RM_METRICS['accuracy']}" in run.rows[0]


def val_set_names(run: RunMetrics, accuracy: str = ACCURACY) -> list[str]:
    """Named val sets in logging order (from ``val/<name>/<accuracy>``), else ``["val"]``."""
    columns = list(run.rows[0]) if run.rows else []
    named = [
        c[len("val/") : -len(accuracy) - 1] for c in columns if c.startswith("val/") and c.endswith(accuracy)
    ]
    named = [name for name in named if name]
    return named or ["val"]


def summarize(name: str, run: RunMetrics) -> RunSummary:
    """The table row of ``run``: last logged values, settings from its ``config.yaml``."""
    reward_model = is_reward_model_run(run)
    metric = RM_METRICS["accuracy"] if reward_model else ACCURACY
    sets = val_set_names(run, metric)
    accuracy = {
        set_name: run.last(f"val/{metric}" if sets == ["val"] else f"val/{set_name}/{metric}")
        for set_name in sets
    }
    if all(math.isnan(value) for value in accuracy.values()):
        accuracy = {}  # a method without preference accuracy (RLOO, online): no accuracy columns of its own
    judge_file = run.run_dir / "judge.json"
    win_rate = json.loads(judge_file.read_text())["win_rate"] if judge_file.is_file() else None
    steps = [int(row["step"]) for row in run.rows if row.get("step")]
    return RunSummary(
        name=name,
        run_dir=str(run.run_dir),
        loss_type=loss_label(run, reward_model),
        beta=float(run.setting("model.beta", math.nan)),
        length_normalize=run.setting("model.length_normalize"),
        label_noise=float(run.setting("data.label_noise", 0.0) or 0.0),
        steps=max(steps, default=0),
        accuracy=accuracy,
        margin=run.last(f"val/{RM_METRICS['margin']}" if reward_model else "val/logratio/margin"),
        kl=run.last("divergence/kl"),
        retention_chosen=run.last("divergence/retention/chosen"),
        retention_text=run.last("divergence/retention/text"),
        win_rate=win_rate,
        train_size=run.setting("data.train_size"),
        seed=run.setting("seed_everything"),
        gen=final_gen_metrics(run),
    )


def loss_label(run: RunMetrics, reward_model: bool) -> str:
    """The loss column: the loss type of a preference run (``ipo``), the method's name where it has
    none (``rloo``, ``reward_model``), both for online IPO/DPO (``online-ipo``), so runs of different
    methods never share a label (noise costs pair runs by it)."""
    if reward_model:
        return REWARD_MODEL
    method = run.setting("method", "preference")
    loss_type = run.setting("model.loss_type")
    if loss_type is None:
        return str(method)
    return str(loss_type) if method == "preference" else f"{method}-{loss_type}"


def recommendation_candidates(summaries: list[RunSummary]) -> list[RunSummary]:
    """The runs the recommendation chooses from: those with clean labels, or all runs if none is; reward
    models only when no policy run is given (their accuracy is not a policy's)."""
    pool = [s for s in summaries if s.loss_type != REWARD_MODEL] or list(summaries)
    return [s for s in pool if s.label_noise == 0] or pool


def recommend(summaries: list[RunSummary]) -> tuple[RunSummary, str]:
    """The recommended run and the reason, by the rule in the module docstring."""
    candidates = recommendation_candidates(summaries)
    by_win_rate = all("win_rate" in s.gen for s in candidates)
    if by_win_rate:
        what, score = "final generation win rate", lambda s: s.gen["win_rate"]
    else:
        what, score = "mean held-out accuracy", lambda s: s.mean_accuracy
    scored = [s for s in candidates if not math.isnan(score(s))]
    if not scored:
        raise UserInputError("no run logged a validation accuracy; the report needs val sets")
    best = max(score(s) for s in scored)
    tied = [s for s in scored if score(s) >= best - TIE_SCORE]
    drift = tie_break_drift(tied)
    if drift is None:
        choice = max(tied, key=score)
    else:
        choice = min(tied, key=lambda s: (drift[1](s), -score(s)))
    if len(tied) == 1:
        reason = f"it has the highest {what} ({score(choice):.3f})"
    else:
        others = ", ".join(s.name for s in tied if s is not choice)
        reason = (
            f"its {what} ({score(choice):.3f}) is within {TIE_SCORE} of the best ({best:.3f}), "
            f"tied with {others}"
        )
        if drift is not None:
            reason += f", and it drifted least from the reference ({drift[0]} {drift[1](choice):.4f})"
    return choice, reason


def tie_break_drift(tied: list[RunSummary]) -> tuple[str, Callable[[RunSummary], float]] | None:
    """The drift measure that breaks a tie, as (name, value of a run): one that every tied run has,
    so runs are compared in one unit. The sampled sequence KL of the judged samples (``gen/kl``, every
    method logs it) first, else the divergence monitor's ``divergence/kl``; None when neither is."""
    if all(not math.isnan(s.gen.get("kl", math.nan)) for s in tied):
        return "gen/kl", lambda s: s.gen["kl"]
    if all(not math.isnan(s.kl) for s in tied):
        return "divergence/kl", lambda s: s.kl
    return None


@dataclass
class NoiseCost:
    """What deliberate label noise cost one method: accuracy of the noisy run minus the clean one."""

    noisy: str
    clean: str
    label_noise: float
    accuracy_change: dict[str, float]
    """Val set name -> noisy accuracy minus clean accuracy (negative: the noise hurt)."""


def noise_costs(summaries: list[RunSummary]) -> list[NoiseCost]:
    """Pair every noisy run with the clean run of the same loss, beta, normalisation, size and seed."""

    def key(s: RunSummary) -> tuple:
        return (s.loss_type, s.beta, s.length_normalize, s.train_size, s.seed)

    costs = []
    for noisy in (s for s in summaries if s.label_noise > 0):
        clean = next((s for s in summaries if s.label_noise == 0 and key(s) == key(noisy)), None)
        if clean is not None:
            change = {
                name: noisy.accuracy[name] - clean.accuracy.get(name, math.nan) for name in noisy.accuracy
            }
            costs.append(NoiseCost(noisy.name, clean.name, noisy.label_noise, change))
    return costs


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short unique names: the folder above ``version_N`` (or the folder itself)."""
    names = []
    for run_dir in run_dirs:
        base = run_dir.parent.name if run_dir.name.startswith("version_") else run_dir.name
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names.append(name)
    return names


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


GEN_COLUMNS = (
    ("reward", "gen reward"),
    ("win_rate", "gen win rate"),
    ("length", "gen length"),
    ("eos_rate", "EOS rate"),
    ("distinct_2", "distinct-2"),
    ("repetition", "repetition"),
)
"""Final-table columns of the primary set's ``gen/`` metrics (each shown when a run logged it)."""
GEN_NOTE = (
    " The gen columns are the last generation evaluation on the primary held-out set: the reward of "
    "the policy's samples, their win rate against the reference's samples (95% interval in brackets), "
    "their mean length in tokens, the share that ended with EOS, distinct bigrams over all bigrams, and "
    "`gen/repetition`."
)


def _gen_cell(gen: dict[str, float], name: str) -> str:
    """A gen column's cell; the win rate with its confidence interval when that was logged."""
    cell = _number(gen.get(name, math.nan))
    if name == "win_rate" and "win_rate_ci_low" in gen and "win_rate_ci_high" in gen:
        cell += f" [{gen['win_rate_ci_low']:.3f}, {gen['win_rate_ci_high']:.3f}]"
    return cell


def write_report(run_dirs: list[Path], out_dir: Path, *, title: str = "Method comparison") -> Path:
    """Write ``report.md``, ``summary.json`` and the plots for ``run_dirs`` into ``out_dir``."""
    if not run_dirs:
        raise UserInputError("report: give at least one run folder")
    runs = {name: load_run(path) for name, path in zip(run_names(run_dirs), run_dirs, strict=True)}
    summaries = [summarize(name, run) for name, run in runs.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = list(dict.fromkeys(name for s in summaries for name in s.accuracy))
    # Runs of on-policy methods alone log no pair margin and no divergence monitor: their columns
    # and plots would be empty, so they are left out (the methods section has their KL).
    with_pairs = any(not (math.isnan(s.margin) and math.isnan(s.kl)) for s in summaries)

    images = []
    if with_pairs:
        plot_metrics_over_steps(
            runs,
            [("divergence/kl", "KL(pi || ref), nats per token")],
            out_dir / "kl_vs_step.png",
            title=title,
        )
        scatter_runs(
            {s.name: (s.kl, s.mean_accuracy) for s in summaries},
            out_dir / "accuracy_vs_kl.png",
            xlabel="final divergence/kl (nats per token)",
            ylabel="mean held-out accuracy",
            title="Accuracy bought per unit of drift",
        )
        images += ["kl_vs_step.png", "accuracy_vs_kl.png"]
    if len(sets) >= 2:
        scatter_runs(
            {
                s.name: (s.accuracy.get(sets[0], math.nan), s.accuracy.get(sets[1], math.nan))
                for s in summaries
            },
            out_dir / "accuracy_id_vs_ood.png",
            xlabel=f"accuracy on {sets[0]}",
            ylabel=f"accuracy on {sets[1]}",
            title="In-distribution vs out-of-distribution",
            diagonal=True,
        )
        images.append("accuracy_id_vs_ood.png")

    choice, reason = recommend(summaries)
    with_size = any(s.train_size is not None for s in summaries)
    with_seed = len({s.seed for s in summaries}) > 1
    header = ["run", "loss", "beta"] + (["norm"] if with_pairs else []) + ["label noise"]
    header += (["pairs"] if with_size else []) + (["seed"] if with_seed else []) + ["steps"]
    header += [f"acc {name}" for name in sets]
    header += ["margin", "KL/token", "retention chosen", "retention text"] if with_pairs else []
    with_judge = any(s.win_rate is not None for s in summaries)
    header += ["RM win rate"] if with_judge else []
    gen_columns = [(name, label) for name, label in GEN_COLUMNS if any(name in s.gen for s in summaries)]
    header += [label for _, label in gen_columns]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for s in summaries:
        norm = {True: "mean", False: "sum"}.get(s.length_normalize, "?")
        cells = [s.name, s.loss_type, _number(s.beta, 2)] + ([norm] if with_pairs else [])
        cells += [_number(s.label_noise, 2)]
        cells += [str(s.train_size) if s.train_size is not None else "all"] if with_size else []
        cells += ([str(s.seed)] if with_seed else []) + [str(s.steps)]
        cells += [_number(s.accuracy.get(name, math.nan)) for name in sets]
        if with_pairs:
            cells += [_number(s.margin), _number(s.kl, 4), _number(s.retention_chosen)]
            cells += [_number(s.retention_text)]
        cells += [_number(s.win_rate)] if with_judge else []
        cells += [_gen_cell(s.gen, name) for name, _ in gen_columns]
        lines.append("| " + " | ".join(cells) + " |")
    pool = recommendation_candidates(summaries)
    noisy_left_out = any(s.label_noise > 0 and s not in pool for s in summaries)
    candidates = "runs with clean labels" if noisy_left_out else "runs"
    lines += [
        "",
        f"**Recommended** (of the {candidates}): **{choice.name}** ({choice.loss_type}, beta "
        f"{choice.beta:g}): {reason}.",
        "",
    ]
    costs = noise_costs(summaries)
    if costs:
        lines += ["**Label-noise robustness** (accuracy with flipped training labels minus without):", ""]
        for cost in costs:
            changes = ", ".join(f"{name} {change:+.3f}" for name, change in cost.accuracy_change.items())
            lines.append(f"- {cost.noisy} ({cost.label_noise:.0%} flipped) vs {cost.clean}: {changes}")
        lines.append("")
    pair_note = (
        "Accuracy is the implicit-reward preference accuracy on each val set at the end of training; "
        "margin is the primary val set's log-ratio margin h in the loss's own normalisation; KL/token is "
        "the exact `divergence/kl` on the held-out subset; retention is the per-token change in "
        "log-likelihood, policy minus reference (negative: capability lost)."
    )
    lines += [
        (
            (pair_note if with_pairs else "")
            + (GEN_NOTE if gen_columns else "")
            + (RM_NOTE if any(s.loss_type == REWARD_MODEL for s in summaries) else "")
        ).strip(),
        "",
    ]
    lines += [f"![{Path(image).stem}]({image})" for image in images]
    methods, method_rows = methods_section(runs)
    frontier, frontier_points = frontier_section(runs, out_dir)
    proxy_gold, proxy_gold_points = proxy_gold_section(runs, out_dir, title)
    by_pairs, pairs_points = pairs_section(runs, {s.name: s.mean_accuracy for s in summaries}, out_dir)
    degeneration = degeneration_section(runs, out_dir, title)
    if methods or frontier or proxy_gold or by_pairs or degeneration:
        lines += ["", *methods, *frontier, *proxy_gold, *by_pairs, *degeneration]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {
        "recommended": choice.name,
        "runs": [_json_safe(asdict(s)) for s in summaries],
        "noise_costs": [_json_safe(asdict(cost)) for cost in costs],
    }
    if method_rows:
        summary["methods"] = [_json_safe(asdict(row)) for row in method_rows]
    if frontier_points:
        summary["frontier"] = [_json_safe(asdict(point)) for point in frontier_points]
    if proxy_gold_points:
        summary["proxy_gold"] = [_json_safe(asdict(point)) for point in proxy_gold_points]
    if pairs_points:
        summary["by_pairs"] = [_json_safe(asdict(point)) for point in pairs_points]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return report


def _json_safe(value: Any) -> Any:
    """NaN (never logged) and infinities (a diverged run's KL, say) as null: summary.json is strict JSON.

    report.md keeps the values as they are (``nan``, ``inf``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    return value


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning report RUN_DIR... [--out DIR] [--title TEXT]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning report",
        description="Compare finished runs: a Markdown report with a summary table and PNG plots.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (runs/<name>/version_N)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report)")
    parser.add_argument("--title", default="Method comparison", help="report title")
    options = parser.parse_args(args)
    report = write_report(options.run_dirs, options.out, title=options.title)
    print(f"wrote {report}")
