"""The divergence monitor and the generation evaluation under configs/strategy/fsdp.yaml and fsdp2.yaml:
two CPU processes with a sharded policy (and, under FSDP2, a sharded reference) log what one process
without FSDP logs. (The generation evaluation under DDP: tests/test_generation_eval_ddp.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ipo_lightning.cli import main
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import REPO, polite_pairs, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun
from tests.test_generation_eval import SPLIT_GENERATION


def _divergence_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("divergence/kl")]


def _gen_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("gen/reward")]


def _generation_samples(run_dir: Path) -> list[dict]:
    lines = (run_dir / "generation_samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _samples(run_dir: Path) -> list[dict]:
    lines = (run_dir / "divergence_samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


STRATEGIES = ("fsdp.yaml", "fsdp2.yaml")


@pytest.fixture(scope="module")
def fits(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """One fit in one process and one on two processes (torchrun) per strategy config of
    :data:`STRATEGIES`, all at the same time: their run folders (``single`` and each config's name) and
    what failed (run -> its output's tail)."""
    tmp_path = tmp_path_factory.mktemp("divergence_fsdp")
    # A reference unlike the policy: every metric is non-zero at step 0, where both runs hold the same
    # weights. 6 pairs in batches of 2 and 3 prompts split unevenly over 2 ranks, so the ranks run
    # different numbers of forwards and generate() calls while the weights are sharded; the generation
    # evaluation's 3 prompts (2 samples each) split the same way.
    reference_dir = save_tiny_model(
        tmp_path / "reference", CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
        },
        "model": {
            "model_name_or_path": str(tiny_model_dir),
            "reference_name_or_path": str(reference_dir),
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            "warmup_ratio": 0.0,
        },
        "data": {"train": {"path": str(train)}, "max_length": 64, "max_prompt_length": 32, "batch_size": 2},
        "divergence": {
            "every_n_steps": 1,
            "num_pairs": 6,
            "batch_size": 2,
            "sample_prompts": 3,
            "max_new_tokens": 4,
        },
        "generation": SPLIT_GENERATION,
        "export": {"enabled": False},
        "wandb": {"enabled": False},
    }
    config_path = write_config(tmp_path / "config.yaml", config)
    fit = ["fit", "--config", str(config_path)]
    single = [*fit, "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    sharded = {
        name: [
            *(*fit, "--config", str(REPO / "configs" / "strategy" / name)),
            *("--trainer.accelerator", "cpu", "--trainer.devices", "2"),
            # One rank's batch of 1 pair: the global batch of 2 pairs, as in the single run.
            *("--data.batch_size", "1"),
        ]
        for name in STRATEGIES
    }
    commands = {
        name: [*args, "--trainer.default_root_dir", str(tmp_path / name)]
        for name, args in {"single": single, **sharded}.items()
    }
    runs = {name: Torchrun(commands[name]) for name in STRATEGIES}
    # The one-process fit runs in this process (the CLI's entry point) while the others run.
    results = run_clis(tmp_path, *runs.values(), meanwhile=lambda: main(commands["single"]))
    failed = {
        name: (result.stdout + result.stderr)[-3000:]
        for name, result in zip(STRATEGIES, results, strict=True)
        if result.returncode != 0
    }
    folders = {name: tmp_path / name / run.folder for name, run in runs.items()}
    return {"single": tmp_path / "single" / "version_0", **folders}, failed


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_run_measures_what_one_process_measures(
    fits: tuple[dict[str, Path], dict[str, str]], strategy: str
) -> None:
    run_dirs, failed = fits
    assert strategy not in failed, failed[strategy]
    single, fsdp = run_dirs["single"], run_dirs[strategy]
    single_rows, fsdp_rows = _divergence_rows(single), _divergence_rows(fsdp)
    assert [row["step"] for row in single_rows] == [row["step"] for row in fsdp_rows] == ["0", "1"]
    names = [name for name in single_rows[0] if name.startswith("divergence/") and single_rows[0][name]]
    assert {"divergence/kl", "divergence/seq_kl", "divergence/logratio/margin_std"} <= set(names)
    for name in names:  # step 0: the same weights, so the same numbers
        expected = float(single_rows[0][name])
        assert expected != 0.0, name
        assert float(fsdp_rows[0][name]) == pytest.approx(expected, rel=1e-5), name
    # Step 1: after one optimizer step on the sharded policy, the measurement sees the trained weights.
    assert float(fsdp_rows[1]["divergence/kl"]) != pytest.approx(
        float(fsdp_rows[0]["divergence/kl"]), rel=1e-3
    )
    for name in ("divergence/kl", "divergence/kl_reverse", "divergence/logratio/margin_mean"):
        assert float(fsdp_rows[1][name]) == pytest.approx(float(single_rows[1][name]), rel=1e-4), name
    # Rank 0 wrote the samples of all three prompts, the ones one process draws.
    assert _samples(fsdp)[:3] == _samples(single)[:3]

    # The generation evaluation at step 0: each rank generates and scores its prompts with the full
    # weights, gathered exactly, so the numbers and samples are one process's.
    single_gen, fsdp_gen = _gen_rows(single), _gen_rows(fsdp)
    assert [row["step"] for row in single_gen] == [row["step"] for row in fsdp_gen] == ["0", "1"]
    assert float(single_gen[0]["gen/win_rate"]) != 0.5  # policy and reference differ
    for name in [column for column in single_gen[0] if column.startswith("gen/") and single_gen[0][column]]:
        assert float(fsdp_gen[0][name]) == pytest.approx(float(single_gen[0][name]), rel=1e-9), name
    first = [[row for row in _generation_samples(run) if row["step"] == 0] for run in (single, fsdp)]
    assert len(first[0]) == 3 * 2 and first[1] == first[0]
