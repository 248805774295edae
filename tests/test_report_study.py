"""report's study sections from hand-written run folders: reward-KL frontier, by pairs, degeneration."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from ipo_lightning.analysis.report import write_report

GEN = ("length", "eos_rate", "distinct_2", "repetition")


def _study_run(root: Path, loss: str, size: int, seed: int) -> Path:
    """A run folder as fit writes it (CSV logger rows, config.yaml) with divergence and gen/ metrics.

    As in a real run the divergence monitor and the generation evaluation log in separate rows at the
    same steps, and step 20 is measured twice (periodic, then after validation). A first row holds
    generation metrics without a sequence KL.
    """
    name = f"{loss}-n{size}-seed{seed}"
    draw = random.Random(name)
    logger = CSVLogger(root / name, name="")
    logger.log_metrics({"gen/reward": 9.0, "gen/win_rate": 0.99}, step=5)  # a first row without a KL
    for step in (0, 10, 20, 20):
        logger.log_metrics({"divergence/kl": draw.random() / 10, "divergence/seq_kl": draw.random()}, step)
        win = draw.random()
        gen = {"gen/reward": draw.uniform(1, 4), "gen/win_rate": win}
        gen |= {"gen/win_rate_ci_low": win - 0.05, "gen/win_rate_ci_high": win + 0.05}
        gen |= {f"gen/{metric}": draw.random() for metric in GEN}
        logger.log_metrics(gen, step)
    logger.log_metrics({"val/in_dist/rewards/accuracy": draw.random(), "val/ood/rewards/accuracy": 0.5}, 20)
    logger.save()
    config = {
        "seed_everything": seed,
        "trainer": {"default_root_dir": str(root / name), "max_epochs": 2},
        "model": {
            "loss_type": loss,
            "beta": 0.5 if loss == "ipo" else 0.1,
            "length_normalize": loss == "ipo",
        },
        "data": {"seed": seed, "train_size": size, "label_noise": 0.0},
    }
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    return Path(logger.log_dir)


def _read(run_dir: Path) -> tuple[list[dict[str, str]], dict]:
    """Independent reading: metrics.csv rows and config.yaml."""
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return rows, yaml.safe_load((run_dir / "config.yaml").read_text())


def _by_step(rows: list[dict[str, str]], column: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for row in rows:
        if row.get(column):
            values[int(row["step"])] = float(row[column])  # a later row of the same step wins
    return values


def test_study_sections_hold_the_runs_own_numbers(tmp_path: Path) -> None:
    points = [("ipo", 100, 0), ("ipo", 100, 1), ("ipo", 400, 0), ("ipo", 400, 1)]
    points += [("dpo", 100, 0), ("dpo", 100, 1), ("dpo", 400, 0)]  # one seed at dpo n400
    run_dirs = [_study_run(tmp_path / "runs", *point) for point in points]
    report = write_report(run_dirs, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    markdown = report.read_text()
    read = {run_dir.parent.name: _read(run_dir) for run_dir in run_dirs}

    expected_frontier = []
    for name, (rows, _) in read.items():
        kl, reward, win = (_by_step(rows, c) for c in ("divergence/seq_kl", "gen/reward", "gen/win_rate"))
        for step in sorted(set(kl) & set(reward)):
            expected_frontier.append(
                {"run": name, "step": step, "seq_kl": kl[step], "reward": reward[step], "win_rate": win[step]}
            )
    assert summary["frontier"] == expected_frontier
    assert [p["step"] for p in summary["frontier"] if p["run"] == "ipo-n100-seed0"] == [0, 10, 20]
    first = expected_frontier[0]
    assert (
        f"| ipo-n100-seed0 | 0 | {first['seq_kl']:.4f} | {first['reward']:.3f} | {first['win_rate']:.3f} |"
        in markdown
    )

    groups: dict[tuple[str, int], list[str]] = {}
    for name, (_, config) in read.items():
        groups.setdefault((config["model"]["loss_type"], config["data"]["train_size"]), []).append(name)
    by_pairs = {(point["label"], point["pairs"]): point for point in summary["by_pairs"]}
    assert list(by_pairs) == list(groups)  # series in run order, sizes ascending
    for key, names in groups.items():
        wins = [_by_step(read[name][0], "gen/win_rate")[20] for name in names]
        spread = by_pairs[key]["win_rate"]
        assert spread["mean"] == pytest.approx(sum(wins) / len(wins))
        assert (spread["low"], spread["high"], spread["n"]) == (min(wins), max(wins), len(wins))
        assert by_pairs[key]["seeds"] == [read[name][1]["seed_everything"] for name in names]
    ipo = by_pairs[("ipo", 100)]["win_rate"]
    assert f"| ipo | 100 | 0, 1 | {ipo['mean']:.3f} [{ipo['low']:.3f}, {ipo['high']:.3f}] |" in markdown
    single = by_pairs[("dpo", 400)]["win_rate"]
    assert f"| dpo | 400 | 0 | {single['mean']:.3f} |" in markdown  # one seed: no bracket

    # The final table: pairs, seed and the gen columns, the win rate with its interval.
    rows, _ = read["dpo-n400-seed0"]
    last = {metric: _by_step(rows, f"gen/{metric}")[20] for metric in ("reward", "win_rate", *GEN)}
    header = next(line for line in markdown.splitlines() if line.startswith("| run |"))
    assert header.endswith(
        "| label noise | pairs | seed | steps | acc in_dist | acc ood | margin | KL/token | retention chosen "
        "| retention text | gen reward | gen win rate | gen length | EOS rate | distinct-2 | repetition |"
    )
    row = next(line for line in markdown.splitlines() if line.startswith("| dpo-n400-seed0 |"))
    win = last["win_rate"]
    assert row.startswith("| dpo-n400-seed0 | dpo | 0.10 | sum | 0.00 | 400 | 0 | 20 |")
    assert row.endswith(
        f"| {last['reward']:.3f} | {win:.3f} [{win - 0.05:.3f}, {win + 0.05:.3f}] | "
        + " | ".join(f"{last[m]:.3f}" for m in GEN)
        + " |"
    )
    for image in ("reward_vs_seq_kl.png", "metric_vs_pairs.png", "degeneration_vs_step.png"):
        assert f"]({image})" in markdown and imread(tmp_path / "report" / image).shape[0] > 100


def test_runs_without_gen_metrics_or_sizes_get_no_study_sections(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path / "runs" / "ipo", name="")
    logger.log_metrics({"divergence/kl": 0.1, "divergence/seq_kl": 1.0, "val/rewards/accuracy": 0.8}, step=10)
    logger.save()
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump({"model": {"loss_type": "ipo"}}))
    report = write_report([Path(logger.log_dir)], tmp_path / "report").read_text()
    assert "## " not in report and "gen reward" not in report and "| pairs |" not in report
    assert sorted(json.loads((tmp_path / "report" / "summary.json").read_text())) == [
        "noise_costs",
        "recommended",
        "runs",
    ]
    assert sorted(path.name for path in (tmp_path / "report").glob("*.png")) == [
        "accuracy_vs_kl.png",
        "kl_vs_step.png",
    ]


def test_a_config_without_a_method_is_in_the_same_series_as_method_preference(tmp_path: Path) -> None:
    from ipo_lightning.analysis.run_logs import load_run
    from ipo_lightning.analysis.study_report import series_key

    old, new = _study_run(tmp_path, "ipo", 250, 0), _study_run(tmp_path, "ipo", 1000, 1)
    config = yaml.safe_load((new / "config.yaml").read_text())
    (new / "config.yaml").write_text(yaml.safe_dump({**config, "method": "preference"}))
    assert series_key(load_run(old)) == series_key(load_run(new))
    (new / "config.yaml").write_text(yaml.safe_dump({**config, "method": "reward_model"}))
    assert series_key(load_run(old)) != series_key(load_run(new))
