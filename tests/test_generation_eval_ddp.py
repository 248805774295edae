"""The generation evaluation under DDP: two CPU processes, each judging a share of the prompts, log and
write what one process does. (Under FSDP and FSDP2: tests/test_divergence_fsdp.py.)"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from ipo_lightning.tiny import save_tiny_model
from tests.conftest import CORPUS
from tests.helpers import polite_pairs, run_cli_in_process, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun
from tests.test_generation_eval import SPLIT_GENERATION

TWO_PROCESSES = {"ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"]}


def _gen_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [row for row in csv.DictReader(handle) if row.get("gen/reward")]


@pytest.fixture(scope="module")
def fits(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """The fits the cases compare, one process and two (torchrun) per strategy of :data:`TWO_PROCESSES`,
    all at the same time: their run folders (``single``, ``ddp``) and what failed (run -> its output's
    tail)."""
    tmp_path = tmp_path_factory.mktemp("generation_fits")
    # A reference other than the policy: wins and losses at step 0, not only ties. Three prompts split
    # unevenly (two and one) over two ranks, so the ranks make different numbers of generate() calls
    # (rank 0 two policy calls, of 4 and 2 rows; rank 1 one, of 3 rows).
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
        "divergence": {"enabled": False},
        "generation": SPLIT_GENERATION,
        "export": {"enabled": False},
    }
    config_path = write_config(tmp_path / "config.yaml", config)
    runs = {"single": ["--trainer.devices", "1"], **TWO_PROCESSES}
    fit = ["fit", "--config", str(config_path)]
    commands = {
        name: [*fit, *extra, "--trainer.default_root_dir", str(tmp_path / name)]
        for name, extra in runs.items()
    }
    two = {name: Torchrun(commands[name]) for name in TWO_PROCESSES}
    # The one-process fit runs in this process (the CLI's entry point) while the others run.
    single: list[subprocess.CompletedProcess[str]] = []
    results = run_clis(
        tmp_path, *two.values(), meanwhile=lambda: single.append(run_cli_in_process(commands["single"]))
    )
    failed = {
        name: (result.stdout + result.stderr)[-3000:]
        for name, result in zip(runs, [*single, *results], strict=True)
        if result.returncode != 0
    }
    folders = {name: tmp_path / name / run.folder for name, run in two.items()}
    return {"single": tmp_path / "single" / "version_0", **folders}, failed


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(TWO_PROCESSES))
def test_two_processes_split_the_prompts_and_log_what_one_process_logs(
    fits: tuple[dict[str, Path], dict[str, str]], strategy: str
) -> None:
    run_dirs, failed = fits
    for name in ("single", strategy):
        assert name not in failed, failed[name]

    single, two = _gen_rows(run_dirs["single"]), _gen_rows(run_dirs[strategy])
    assert [row["step"] for row in single] == [row["step"] for row in two] == ["0", "1"]
    assert float(single[0]["gen/win_rate"]) != 0.5  # policy and reference differ
    assert float(single[0]["gen/kl"]) != 0.0  # and the KL of the split-scored samples is compared below
    # Step 0 holds the same weights in all runs (after it, DDP has trained on twice the pairs).
    for name in [column for column in single[0] if column.startswith("gen/")]:
        assert float(two[0][name]) == pytest.approx(float(single[0][name]), rel=1e-9), name

    def samples(run: str) -> list[dict]:
        path = run_dirs[run] / "generation_samples.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert len(samples("single")) == len(samples(strategy)) == 2 * 3 * 2  # measurements x prompts x samples
    # The rows also went to the (offline) W&B run as the gen/samples table, from rank 0.
    for run in ("single", strategy):
        (wandb_file,) = (run_dirs[run] / "wandb").glob("offline-run-*/run-*.wandb")
        assert list(wandb_file.parent.glob("files/media/table/gen/samples_*.table.json"))
    first = {run: [r for r in samples(run) if r["step"] == 0] for run in ("single", strategy)}
    assert first[strategy] == first["single"]
