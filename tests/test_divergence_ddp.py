"""The divergence monitor under DDP: two processes, each measuring a share, log what one process logs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ipo_lightning.cli import main
from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import polite_pairs, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun


def _divergence_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("divergence/kl")]


@pytest.mark.slow
def test_ddp_shards_the_measurement_and_logs_what_one_process_logs(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # A reference that differs from the policy makes every metric non-zero at step 0, where both
    # runs hold the same weights; 6 pairs in batches of 2 split unevenly (2 batches and 1) over 2 ranks.
    reference_dir = save_tiny_model(
        tmp_path / "reference", CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4, seed=1
    )
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 1,
            "limit_val_batches": 0,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
        },
        "model": {"model_name_or_path": str(tiny_model_dir), "reference_name_or_path": str(reference_dir)},
        "data": {"train": {"path": str(train)}, "max_length": 64, "max_prompt_length": 32, "batch_size": 2},
        "divergence": {
            "every_n_steps": 1,
            "num_pairs": 6,
            "batch_size": 2,
            "sample_prompts": 3,
            "max_new_tokens": 4,
        },
        "export": {"enabled": False},
    }
    config_path = write_config(tmp_path / "config.yaml", config)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single_args = ["--trainer.default_root_dir", str(single), "--trainer.devices", "1"]
    ddp_args = ["--trainer.default_root_dir", str(ddp), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    two = Torchrun(["fit", "--config", str(config_path), *ddp_args])
    # Independent fits, both at once: the one-process fit in this process (the CLI's entry point)
    # while the two-process one runs.
    results = run_clis(
        tmp_path,
        two,
        meanwhile=lambda: main(["fit", "--config", str(config_path), *single_args]),
    )
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    single_rows, ddp_rows = _divergence_rows(single / "version_0"), _divergence_rows(ddp / two.folder)
    assert [row["step"] for row in single_rows] == [row["step"] for row in ddp_rows] == ["0", "1"]
    names = [name for name in single_rows[0] if name.startswith("divergence/")]
    assert {"divergence/kl", "divergence/seq_kl", "divergence/logratio/margin_std"} <= set(names)
    for name in names:
        expected = float(single_rows[0][name])
        assert expected != 0.0, name
        assert float(ddp_rows[0][name]) == pytest.approx(expected, rel=1e-6), name

    # Rank 0 wrote the samples of all three prompts, the same ones one process draws.
    def samples(run_dir: Path) -> list[dict]:
        lines = (run_dir / "divergence_samples.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    single_samples, ddp_samples = samples(single / "version_0"), samples(ddp / two.folder)
    assert [row["step"] for row in ddp_samples] == [0, 0, 0, 1, 1, 1]
    assert ddp_samples[:3] == single_samples[:3]
