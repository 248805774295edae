"""``report`` on a real reward-model run beside a real preference run: the reward model's own metrics
(``val/rm/*``) fill its row, and the recommendation stays among the policies."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from ipo_lightning.cli import main
from tests.helpers import fit_config, polite_pairs, write_config, write_jsonl


def _last_logged(metrics_csv: Path, column: str) -> float:
    """Independent reading of metrics.csv: the last non-empty value of ``column``."""
    with metrics_csv.open() as handle:
        values = [row[column] for row in csv.DictReader(handle) if row.get(column)]
    return float(values[-1]) if values else math.nan


def _fit(tmp_path: Path, model_dir: Path, name: str, method: str) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    val = {
        "in_dist": write_jsonl(tmp_path / "in_dist.jsonl", polite_pairs(6, offset=100)),
        "ood": write_jsonl(tmp_path / "ood.jsonl", polite_pairs(4, offset=200)),
    }
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        val,
        method=method,
        trainer={
            "default_root_dir": str(tmp_path / name),
            "max_steps": 4,
            "val_check_interval": 2,
            "enable_checkpointing": False,
        },
        model={"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}},
        data={"batch_size": 4},
        divergence={"every_n_steps": 2, "sample_prompts": 0},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    main(["fit", "--config", str(write_config(tmp_path / f"{name}.yaml", config))])
    return tmp_path / name / "version_0"


@pytest.mark.slow
def test_report_reads_a_reward_model_run_beside_a_preference_run(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = _fit(tmp_path, tiny_model_dir, "ipo", "preference")
    reward_model = _fit(tmp_path, tiny_model_dir, "rm", "reward_model")
    out = tmp_path / "report"
    main(["report", str(policy), str(reward_model), "--out", str(out)])
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    rows = {run["name"]: run for run in summary["runs"]}
    rm, ipo = rows["rm"], rows["ipo"]
    metrics = reward_model / "metrics.csv"
    with metrics.open() as handle:
        last_step = max(int(row["step"]) for row in csv.DictReader(handle))
    assert rm["loss_type"] == "reward_model" and rm["steps"] == last_step
    assert rm["accuracy"] == {
        "in_dist": _last_logged(metrics, "val/in_dist/rm/accuracy"),
        "ood": _last_logged(metrics, "val/ood/rm/accuracy"),
    }
    assert rm["margin"] == _last_logged(metrics, "val/rm/margin") != 0
    assert rm["kl"] is None and rm["beta"] is None  # no policy, no reference: nothing to show
    # The preference run's row is read as before, and it is the one recommended.
    assert ipo["accuracy"]["in_dist"] == _last_logged(policy / "metrics.csv", "val/in_dist/rewards/accuracy")
    assert ipo["kl"] == _last_logged(policy / "metrics.csv", "divergence/kl")
    assert summary["recommended"] == "ipo"
    markdown = (out / "report.md").read_text()
    in_dist, ood = rm["accuracy"]["in_dist"], rm["accuracy"]["ood"]
    assert (
        f"| rm | reward_model | – | ? | 0.00 | {last_step} | {in_dist:.3f} | {ood:.3f} | {rm['margin']:.3f} |"
        in markdown
    )
    assert "**Recommended** (of the runs): **ipo**" in markdown and "`val/rm/margin`" in markdown

    # A reward model alone is reported too (before, it stopped: "no run logged a validation accuracy").
    alone = tmp_path / "alone"
    main(["report", str(reward_model), "--out", str(alone)])
    assert json.loads((alone / "summary.json").read_text())["recommended"] == "rm"
