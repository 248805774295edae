"""report's sections for runs of several methods from hand-written run folders: methods, frontier, proxy."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from ipo_lightning.analysis.methods_report import method_options, steps_trained
from ipo_lightning.analysis.report import write_report
from ipo_lightning.analysis.run_logs import RunMetrics, load_run

JUDGE = {"reward": "ipo_lightning.gold:gold_reward", "prompts": 32}
GEN = ("reward", "win_rate", "length", "eos_rate", "repetition")


def _run(
    root: Path, name: str, config: dict[str, Any], *, gen_kl: bool, proxy: str = "flat", val_lag: int = 1
) -> Path:
    """A run folder as fit writes it: measurements at steps 0, 50, 100 in separate rows, as the
    generation evaluation, validation, the divergence monitor and the perf callback log them.
    Lightning's own rows (train/) carry the steps taken before theirs, as in a real run; val/ rows
    are ``val_lag`` steps before their validation's measurements (1: earlier versions, 0: this one)."""
    draw = random.Random(name)
    logger = CSVLogger(root / name, name="")
    for step in (0, 50, 100):
        win = draw.random()
        gen = {f"gen/{metric}": draw.uniform(0, 3) for metric in GEN} | {"gen/win_rate": win}
        gen |= {"gen/win_rate_ci_low": win - 0.1, "gen/win_rate_ci_high": win + 0.1}
        if gen_kl:
            gen["gen/kl"] = draw.uniform(0, 5)
        else:
            logger.log_metrics({"divergence/seq_kl": draw.uniform(0, 5), "divergence/kl": 0.01}, step)
        logger.log_metrics(gen, step)
        if step:
            logger.log_metrics({"val/reward": {"up": step / 10, "flat": 1.0}[proxy]}, step - val_lag)
            logger.log_metrics({"val/rewards/accuracy": 0.6}, step - val_lag)
    logger.log_metrics({"train/loss": 0.5}, 99)  # the 100th step's training row
    for step in (10, 60, 90):
        logger.log_metrics(
            {"perf/step_time": draw.uniform(0.1, 1), "perf/peak_memory_gb": draw.uniform(1, 9)}, step
        )
    logger.save()
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    return Path(logger.log_dir)


def _configs() -> dict[str, dict[str, Any]]:
    trainer = {"accelerator": "cpu", "devices": 1, "accumulate_grad_batches": 1}
    return {
        "ipo": {  # written before methods existed: no method key
            "trainer": trainer,
            "model": {"loss_type": "ipo", "beta": 0.5},
            "data": {"batch_size": 32},
            "generation": JUDGE,
        },
        "rloo": {
            "method": "rloo",
            "trainer": trainer,
            "model": {
                "reward": "builtin:gold",
                "beta": 0.05,
                "samples_per_prompt": 4,
            },  # the judge, spelled so
            "data": {"batch_size": 16},
            "generation": JUDGE,
        },
        "rloo-rm": {
            "method": "rloo",
            "trainer": {**trainer, "accumulate_grad_batches": 2},
            "model": {"reward": "runs/gold-rm/x/hf_model", "beta": 0.05, "samples_per_prompt": 4},
            "data": {"batch_size": 8},
            "generation": JUDGE,
        },
    }


def _read(run_dir: Path) -> dict[str, dict[int, float]]:
    """Independent reading of metrics.csv: column -> step -> value (a later row of a step wins)."""
    columns: dict[str, dict[int, float]] = {}
    with (run_dir / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            for column, value in row.items():
                if column != "step" and value:
                    columns.setdefault(column, {})[int(row["step"])] = float(value)
    return columns


def _runs(tmp_path: Path) -> dict[str, Path]:
    configs = _configs()
    return {
        "ipo": _run(tmp_path / "runs", "ipo", configs["ipo"], gen_kl=False),
        "rloo": _run(tmp_path / "runs", "rloo", configs["rloo"], gen_kl=True),
        "rloo-rm": _run(tmp_path / "runs", "rloo-rm", configs["rloo-rm"], gen_kl=True, proxy="up"),
    }


def test_methods_table_holds_each_runs_method_budget_and_final_numbers(tmp_path: Path) -> None:
    run_dirs = _runs(tmp_path)
    report = write_report(list(run_dirs.values()), tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    markdown = report.read_text()
    rows = {row["run"]: row for row in summary["methods"]}
    assert list(rows) == ["ipo", "rloo", "rloo-rm"]
    expected = {"ipo": ("preference", 64), "rloo": ("rloo", 64), "rloo-rm": ("rloo", 64)}  # 32x2, 16x4, 8x2x4
    for name, run_dir in run_dirs.items():
        read, row = _read(run_dir), rows[name]
        assert (row["method"], row["samples_per_step"]) == expected[name]
        assert row["steps"] == 100 and row["samples_seen"] == 6400
        kl = "gen/kl" if name != "ipo" else "divergence/seq_kl"
        assert row["kl_metric"] == kl and row["kl"] == read[kl][100]
        for metric in GEN:
            assert row[metric] == read[f"gen/{metric}"][100]
        times = list(read["perf/step_time"].values())
        assert row["step_time"] == sum(times) / len(times)
        assert row["peak_memory_gb"] == max(read["perf/peak_memory_gb"].values())
    assert rows["ipo"]["options"] == "loss ipo, beta 0.5"
    assert rows["rloo"]["options"] == "beta 0.05, k 4"  # builtin:gold is the judge's reward
    assert rows["rloo-rm"]["options"] == "beta 0.05, k 4, reward runs/gold-rm/x/hf_model"
    online = {"method": "online", "model": {"loss_type": "ipo", "beta": 0.5, "label_temperature": 0.0}}
    assert method_options(RunMetrics(tmp_path, [], online)) == "loss ipo, beta 0.5"  # hard labels
    online["model"]["label_temperature"] = 1.0
    assert method_options(RunMetrics(tmp_path, [], online)) == "loss ipo, beta 0.5, label temperature 1"
    ipo = rows["ipo"]
    line = next(line for line in markdown.splitlines() if line.startswith("| ipo | preference |"))
    assert line.startswith(
        f"| ipo | preference | loss ipo, beta 0.5 | 64 | 100 | 6400 | {ipo['reward']:.3f} | "
        f"{ipo['win_rate']:.3f} [{ipo['win_rate_ci_low']:.3f}, {ipo['win_rate_ci_high']:.3f}] | "
        f"{ipo['kl']:.2f}* |"
    )
    assert line.endswith(f"| {ipo['step_time']:.2f} | {ipo['peak_memory_gb']:.2f} |")

    # The frontier: gen/kl where a run logged it, else divergence/seq_kl, all methods on one plot.
    expected_frontier = []
    for name, run_dir in run_dirs.items():
        read = _read(run_dir)
        kl = read["gen/kl" if name != "ipo" else "divergence/seq_kl"]
        for step in sorted(set(kl) & set(read["gen/reward"])):
            expected_frontier.append(
                {
                    "run": name,
                    "step": step,
                    "seq_kl": kl[step],
                    "reward": read["gen/reward"][step],
                    "win_rate": read["gen/win_rate"][step],
                }
            )
    assert summary["frontier"] == expected_frontier
    assert imread(tmp_path / "report" / "reward_vs_seq_kl.png").shape[0] > 100


def test_proxy_vs_gold_section_shows_runs_trained_on_another_reward(tmp_path: Path) -> None:
    run_dirs = _runs(tmp_path)
    report = write_report(list(run_dirs.values()), tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    markdown = report.read_text()
    read = _read(run_dirs["rloo-rm"])
    proxy = {step + 1: value for step, value in read["val/reward"].items()}  # Lightning's row: one before
    gold = read["gen/reward"]
    assert summary["proxy_gold"] == [
        {"run": "rloo-rm", "step": step, "proxy": proxy.get(step), "gold": gold[step]}
        for step in (0, 50, 100)
    ]
    assert "## Proxy vs gold reward" in markdown
    assert "proxy reward still rising while the gold reward stays flat or falls" in markdown
    assert f"| rloo-rm | runs/gold-rm/x/hf_model | 0 | – | {gold[0]:.3f} |" in markdown
    assert f"| rloo-rm | runs/gold-rm/x/hf_model | 100 | {proxy[100]:.3f} | {gold[100]:.3f} |" in markdown
    assert "| rloo | " not in markdown.split("## Proxy vs gold reward")[1].split("\n## ")[0]
    assert imread(tmp_path / "report" / "proxy_vs_gold.png").shape[0] > 100


def test_run_folders_of_earlier_versions_read_as_this_versions(tmp_path: Path) -> None:
    """val/ rows one step before their validation's gen/ rows (earlier versions) or at the same step
    (this version): the same report either way."""
    summaries = []
    for lag in (1, 0):
        root = tmp_path / f"lag{lag}"
        runs = [
            _run(root / "runs", name, _configs()[name], gen_kl=True, proxy="up", val_lag=lag)
            for name in ("rloo", "rloo-rm")
        ]
        write_report(runs, root / "report")
        text = (root / "report" / "summary.json").read_text()
        summaries.append(json.loads(text.replace(str(root), "ROOT")))  # the run folders' own paths aside
        for run in runs:
            validations = load_run(run).validation_steps()
            assert validations and all(taken == step + lag for step, taken in validations.items())
    assert summaries[0] == summaries[1]
    assert [point["step"] for point in summaries[1]["proxy_gold"]] == [0, 50, 100]
    assert summaries[1]["proxy_gold"][2]["proxy"] == 10.0  # val/reward of the step-100 validation

    # The steps taken: a train/ row at s is the (s + 1)-th step; a val/ row as its layout says.
    earlier = [
        {"step": "49", "train/loss": "1"},
        {"step": "50", "gen/reward": "1"},
        {"step": "59", "val/loss": "1"},
    ]
    now = [
        {"step": "49", "train/loss": "1"},
        {"step": "50", "gen/reward": "1"},
        {"step": "50", "val/loss": "1"},
    ]
    now.append({"step": "60", "val/loss": "1"})
    earlier.insert(1, {"step": "49", "val/loss": "1"})
    assert steps_trained(RunMetrics(tmp_path, earlier)) == 60
    assert steps_trained(RunMetrics(tmp_path, now)) == 60

    # A folder an earlier version started and this one resumed: each row read in its own layout; a
    # row that no measurement places takes the run's majority layout.
    resumed = [
        {"step": "49", "val/loss": "1"},
        {"step": "50", "gen/reward": "1"},
        {"step": "99", "val/loss": "1"},
        {"step": "100", "divergence/kl": "1"},
        {"step": "150", "val/loss": "1"},
        {"step": "150", "gen/reward": "1"},
        {"step": "170", "val/loss": "1"},
    ]
    assert RunMetrics(tmp_path, resumed).validation_steps() == {49: 50, 99: 100, 150: 150, 170: 171}


def test_one_method_without_new_metrics_gets_no_methods_or_proxy_section(tmp_path: Path) -> None:
    config = _configs()["ipo"]
    logger = CSVLogger(tmp_path / "runs" / "ipo", name="")
    logger.log_metrics({"gen/reward": 1.0, "gen/win_rate": 0.5, "divergence/seq_kl": 1.0}, step=10)
    logger.log_metrics({"val/rewards/accuracy": 0.8, "divergence/kl": 0.1}, step=10)
    logger.save()
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    report = write_report([Path(logger.log_dir)], tmp_path / "report").read_text()
    assert (
        "## Methods" not in report and "## Proxy vs gold" not in report and "## Reward-KL frontier" in report
    )
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "methods" not in summary and "proxy_gold" not in summary


def test_on_policy_runs_alone_get_no_pair_columns_or_divergence_plots(tmp_path: Path) -> None:
    """Runs that log no pair margin and no divergence monitor: those columns and plots are left out,
    and come back as soon as one run has them."""
    run_dirs = _runs(tmp_path)
    on_policy = [run_dirs["rloo"], run_dirs["rloo-rm"]]
    header = write_report(on_policy, tmp_path / "alone").read_text().splitlines()[2]
    assert header.startswith("| run | loss | beta | label noise | steps |")
    assert "KL/token" not in header and "margin" not in header and "norm" not in header
    assert not (tmp_path / "alone" / "kl_vs_step.png").exists()
    assert not (tmp_path / "alone" / "accuracy_vs_kl.png").exists()
    assert (tmp_path / "alone" / "reward_vs_seq_kl.png").is_file()  # the frontier has their KL
    mixed = write_report(list(run_dirs.values()), tmp_path / "mixed").read_text().splitlines()[2]
    assert "| norm |" in mixed and "| KL/token |" in mixed
    assert (tmp_path / "mixed" / "kl_vs_step.png").is_file()


def test_a_tie_is_broken_by_one_kl_every_tied_run_has() -> None:
    """On-policy runs log no divergence/kl; a tie between them goes to the lower gen/kl, and a tie
    between runs without a common KL names no drift at all."""
    from ipo_lightning.analysis.report import RunSummary, recommend

    def summary(name: str, win_rate: float, gen_kl: float | None, kl: float = math.nan) -> RunSummary:
        gen = {"win_rate": win_rate} | ({"kl": gen_kl} if gen_kl is not None else {})
        return RunSummary(
            name, name, "rloo", 0.05, None, 0.0, 200, {}, math.nan, kl, math.nan, math.nan, gen=gen
        )

    choice, reason = recommend([summary("a", 0.996, 12.7), summary("b", 0.990, 11.4)])
    assert choice.name == "b" and "drifted least from the reference (gen/kl 11.4000)" in reason
    choice, reason = recommend([summary("a", 0.996, None, kl=0.3), summary("b", 0.990, 11.4)])
    assert choice.name == "a" and "drifted" not in reason  # no KL in one unit: the higher score
    choice, reason = recommend([summary("a", 0.996, None, kl=0.3), summary("b", 0.990, None, kl=0.1)])
    assert choice.name == "b" and "(divergence/kl 0.1000)" in reason
