"""Validation and test under DDP on a set that does not split evenly: two processes log what one logs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ipo_lightning.cli import main
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import fit_config, polite_pairs, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun

# Each method through another subcommand: the val and the test loaders both split over ranks.
SUBCOMMANDS = {"preference": "validate", "reward_model": "test"}


def _eval_metrics(run_dir: Path) -> dict[str, float]:
    """The one row of ``val/*`` or ``test/*`` values that ``validate`` or ``test`` logged in ``run_dir``."""
    with (run_dir / "metrics.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    return {name: float(value) for name, value in row.items() if name.startswith(("val/", "test/"))}


@pytest.mark.slow
def test_evaluation_of_an_uneven_set_under_ddp_counts_every_pair_once(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # 7 pairs in batches of 2 over 2 ranks: 4 positions each, the 8th a repeat of pair 0 that must
    # weigh nothing. A reference unlike the policy makes the preference metrics non-zero.
    reference_dir = save_tiny_model(
        tmp_path / "reference", CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(7, offset=100))
    configs = {}
    for method in SUBCOMMANDS:
        config = fit_config(
            tmp_path,
            tiny_model_dir,
            train,
            {"val": val},
            method=method,
            trainer={"default_root_dir": str(tmp_path / method / "ddp"), "devices": 2, "strategy": "ddp"},
            data={"val_batch_size": 2, "test": {"held_out": {"path": str(val)}}},
            wandb={"enabled": False},
            export={"enabled": False},
        )
        if method == "preference":
            config["model"]["reference_name_or_path"] = str(reference_dir)
            config["divergence"] = {"enabled": False}
        configs[method] = write_config(tmp_path / f"{method}.yaml", config)

    # Both DDP runs at once (torchrun); one process of each in this process meanwhile.
    commands = [[command, "--config", str(configs[method])] for method, command in SUBCOMMANDS.items()]
    two = [Torchrun(command) for command in commands]
    one_process = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.default_root_dir"]

    def evaluate_in_one_process() -> None:
        for method, command in zip(SUBCOMMANDS, commands, strict=True):
            main([*command, *one_process, str(tmp_path / method / "single")])

    for result in run_clis(tmp_path, *two, meanwhile=evaluate_in_one_process):
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    single = {method: tmp_path / method / "single" / "version_0" for method in SUBCOMMANDS}
    ddp = {method: tmp_path / method / "ddp" / two[0].folder for method in SUBCOMMANDS}

    preference, reward = (_eval_metrics(single[method]) for method in SUBCOMMANDS)
    assert {"val/loss", "val/rewards/margin", "val/logps/chosen"} <= set(preference)
    assert {"test/loss", "test/rm/accuracy", "test/rm/reward_std"} <= set(reward)
    assert preference["val/rewards/margin"] != 0.0
    for method in SUBCOMMANDS:
        expected, actual = _eval_metrics(single[method]), _eval_metrics(ddp[method])
        assert set(actual) == set(expected)
        # Same pairs, same weights: only float32 rounding differs (eps 1.2e-7), from a pair's forward in
        # a batch of another width and from the order the synced sums add. The values come from
        # log-probs and scores of magnitude <= 10 over <= 8 terms, a few ulps: 1e-6 of the value plus
        # 1e-6 absolute (for the margins and standard deviations, differences of near-equal numbers).
        # Counted twice, pair 0 moved every mean by 5e-4 or more (val/rewards/accuracy: 6/8, not 5/7).
        for name, value in expected.items():
            assert actual[name] == pytest.approx(value, rel=1e-6, abs=1e-6), f"{method}: {name}"
