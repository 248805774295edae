"""On-policy runs (RLOO, online IPO) through the CLI under a simulated SLURM job: the requeue signal
mid-epoch, the requeued relaunch resumes, and the run ends as an uninterrupted one does."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from ipo_lightning.callbacks.slurm import REQUEUE_EXIT_CODE
from tests.helpers import fit_config, run_clis, write_config, write_jsonl

REWARD = "tests.reward_fixtures:length_reward"
PROMPTS, BATCH, MAX_STEPS = 6, 2, 5  # 3 steps per epoch: the run crosses an epoch boundary
SIGNALLED_STEP = 1  # the requeue checkpoint is of step 2, mid-epoch, where a validation is due
JOB_ID = "4242"
METHODS = {
    "rloo": {"samples_per_prompt": 2},
    "online": {"loss_type": "ipo"},
}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _without_timings(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without their ``perf/`` values, which measure the machine, not the run."""
    return [{name: value for name, value in row.items() if not name.startswith("perf/")} for row in rows]


def _config(tmp_path: Path, model_dir: Path, method: str, name: str, *, signal: bool) -> Path:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"Human: tell me about {i}. Assistant:"} for i in range(PROMPTS)],
    )
    callbacks = []
    if signal:
        callbacks.append({"class_path": "tests.helpers.SignalAtStep", "init_args": {"step": SIGNALLED_STEP}})
    config = fit_config(
        tmp_path,
        model_dir,
        prompts,
        val={"held_out": prompts},
        trainer={
            "default_root_dir": str(tmp_path / name),
            "max_steps": MAX_STEPS,
            "max_epochs": 2,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "enable_model_summary": False,
            "enable_checkpointing": False,  # the requeue checkpoint is the only one to resume from
            "callbacks": callbacks,
        },
        model={
            "reward": REWARD,
            "max_new_tokens": 6,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
            **METHODS[method],
        },
        data={"batch_size": BATCH, "max_length": 48, "max_prompt_length": 24},
        generation={"reward": REWARD, "prompts": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
        divergence={"enabled": False},
        wandb={"enabled": False},
        run={"name": "run"},
    )
    config["method"] = method
    return write_config(tmp_path / f"{name}.yaml", config)


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    """One SLURM task of job ``JOB_ID``, with a ``scontrol`` that records its arguments."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    script = fake_bin / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "scontrol_calls.txt"}"\n')
    script.chmod(0o755)
    return {
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NAME": "ipo-test",  # not "bash": Lightning treats that as an interactive session
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NODELIST": "localhost",
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.mark.slow
def test_on_policy_runs_requeued_mid_epoch_end_as_uninterrupted_ones(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """SIGUSR1 under SLURM: checkpoint at the step's end, ``scontrol requeue``, exit 3; the relaunch of
    the same command resumes. Weights and every logged value (but timings) equal the uninterrupted
    run's, bitwise: on one CPU process in float32 the resumed run does the very same operations."""
    slurm = _slurm_env(tmp_path)
    commands, envs = [], []
    for method in METHODS:
        for name, signal in ((f"{method}-straight", False), (f"{method}-requeued", True)):
            commands.append(
                ["fit", "--config", str(_config(tmp_path, tiny_model_dir, method, name, signal=signal))]
            )
            envs.append(slurm if signal else {})
    first = run_clis(tmp_path, *commands, envs=envs)
    for result, env in zip(first, envs, strict=True):
        assert result.returncode == (REQUEUE_EXIT_CODE if env else 0), result.stderr[-3000:]
    assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", JOB_ID] * len(METHODS)

    requeued = [(command, env) for command, env in zip(commands, envs, strict=True) if env]
    second = run_clis(tmp_path, *(command for command, _ in requeued), envs=[env for _, env in requeued])
    for method, result in zip(METHODS, second, strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tmp_path / f"{method}-requeued" / "run"
        (checkpoint,) = run_dir.glob("hpc_ckpt_*.ckpt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert state["global_step"] == SIGNALLED_STEP + 1, method
        assert f"Resuming from {checkpoint}" in result.stdout + result.stderr

        straight = tmp_path / f"{method}-straight" / "run"
        header, rows = _rows(run_dir / "metrics.csv")
        straight_header, straight_rows = _rows(straight / "metrics.csv")
        assert header == straight_header, method
        assert _without_timings(rows) == _without_timings(straight_rows), method
        logged = [int(row["step"]) for row in rows if row["train/reward"]]
        assert logged == list(range(MAX_STEPS)), method  # every step once, the signalled one included
        assert len({row["train/kl"] for row in rows if row["train/kl"]}) > 1  # the policy moved
        weights = (run_dir / "hf_model" / "model.safetensors").read_bytes()
        assert weights == (straight / "hf_model" / "model.safetensors").read_bytes(), method
