"""The on-policy methods (RLOO, online IPO) under DDP and FSDP2: two CPU processes (gloo) through the
CLI, under torchrun, sample, reward, log and train exactly what one process does with the same global
batch of prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import fit_config, logged_values, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun
from tests.reward_fixtures import RECORD_DIR_VAR

REWARD = "tests.reward_fixtures:recorded_length_reward"
GLOBAL_BATCH, STEPS = 4, 3  # 8 prompts: 2 steps per epoch, so the third step starts a new shuffle


STRATEGIES = {
    "single": None,
    "ddp": "ddp",
    "fsdp2": {"class_path": "ipo_lightning.fsdp2.PreferenceFSDP2Strategy"},
}
"""Each run's ``trainer.strategy`` (one process: Lightning's default)."""


def _fit(
    tmp_path: Path, model_dir: Path, method: str, name: str, devices: int
) -> tuple[list[str], dict[str, str]]:
    """The CLI arguments and extra environment of one fit of ``method`` on ``devices`` processes
    (per-rank batch ``GLOBAL_BATCH / devices``) with the strategy of run ``name`` (:data:`STRATEGIES`)
    into ``tmp_path/name``; each process's reward calls land in ``tmp_path/name/records``."""
    prompts = [{"prompt": f"Human: tell me about {topic}. Assistant:"} for topic in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", prompts)
    val = write_jsonl(
        tmp_path / "val.jsonl", [{"prompt": f"Human: say {word}. Assistant:"} for word in "abcd"]
    )
    per_rank = GLOBAL_BATCH // devices
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        val={"held_out": val},
        trainer={
            "default_root_dir": str(tmp_path / name),
            "devices": devices,
            "max_steps": STEPS,
            "max_epochs": 2,
            "val_check_interval": STEPS,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            **({"strategy": STRATEGIES[name]} if STRATEGIES[name] else {}),
        },
        model={
            "reward": REWARD,
            "max_new_tokens": 6,
            # Plain SGD: Adam's normalisation would blow float noise in near-zero gradients up to lr.
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.02}},
            "warmup_ratio": 0.0,
        },
        # 4 validation prompts: an even split, so Lightning's validation sampler repeats none.
        data={"max_length": 48, "max_prompt_length": 24, "batch_size": per_rank, "val_batch_size": 2},
        divergence={"enabled": False},
        wandb={"enabled": False},
    )
    records = tmp_path / name / "records"
    records.mkdir(parents=True)
    config_path = write_config(tmp_path / f"{name}.yaml", config)
    return ["fit", "--config", str(config_path), "--method", method], {RECORD_DIR_VAR: str(records)}


def _calls(run_dir: Path) -> list[list[list]]:
    """Reward call i of every process, merged: the sorted ``[prompt, completion, reward]`` rows."""
    per_process = [
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for path in sorted((run_dir.parent / "records").glob("*.jsonl"))
    ]
    assert len({len(calls) for calls in per_process}) == 1, "every process makes the same calls"
    return [sorted(row for calls in per_process for row in calls[i]) for i in range(len(per_process[0]))]


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    """Every logged ``train/`` and ``val/`` value by (step, name)."""
    return logged_values(run_dir / "metrics.csv", ("train/", "val/"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "online"])
def test_two_processes_sample_log_and_train_what_one_process_does(
    method: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Under FSDP2 the policy is gathered for sampling and sharded for the loss's forward and backward.
    runs = {"single": 1, "ddp": 2, "fsdp2": 2}
    fits = [_fit(tmp_path, tiny_model_dir, method, name, devices=devices) for name, devices in runs.items()]
    # Side by side, under torchrun (the one-process run as its one process).
    commands = [Torchrun(args, nproc=devices) for (args, _), devices in zip(fits, runs.values(), strict=True)]
    results = run_clis(tmp_path, *commands, envs=[env for _, env in fits])
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    single = tmp_path / "single" / commands[0].folder
    for name in [name for name in runs if name != "single"]:
        _assert_same_run(tmp_path / name / commands[0].folder, single, tiny_model_dir, method)


def _assert_same_run(two: Path, single: Path, tiny_model_dir: Path, method: str) -> None:
    """A two-process run ``two`` sampled, logged and trained what the one-process run ``single`` did."""
    assert len(list((two.parent / "records").glob("*.jsonl"))) == 2

    # The same samples and rewards, call by call: 3 training steps of 4 prompts, then validation
    # (1 call per rank, 2 per single process over its 2 batches of 2 prompts).
    single_calls, two_calls = _calls(single), _calls(two)
    k = 4 if method == "rloo" else 2
    assert [len(call) for call in two_calls] == [GLOBAL_BATCH * k] * STEPS + [4 * k]
    assert two_calls[:STEPS] == single_calls[:STEPS]
    assert two_calls[STEPS] == sorted(single_calls[STEPS] + single_calls[STEPS + 1])
    assert len({json.dumps(call) for call in two_calls[:STEPS]}) == STEPS  # each step draws anew

    # train/* per step is the mean over both ranks' samples (torchmetrics sums values and counts over
    # the ranks), val/* over both ranks' prompts. Rewards are exact. Log-prob values (kl, loss, ...) come
    # from forwards over batches of other shapes and float32 sums in another order: a few ulp of values
    # up to ~30 (measured: at most 2e-6 apart), so 1e-5; a wrong split or seed moves them by ~0.1.
    single_metrics, two_metrics = _metrics(single), _metrics(two)
    assert single_metrics.keys() == two_metrics.keys()
    assert {name for _, name in single_metrics} >= {"train/loss", "train/reward", "train/kl", "val/reward"}
    assert len({step for step, name in single_metrics if name == "train/loss"}) == STEPS
    for key, value in single_metrics.items():
        assert two_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key

    # The trained weights: DDP's all-reduce (FSDP2's reduce-scatter) averages the two ranks' gradients
    # of their per-rank mean losses, which is the gradient of the global mean (equal per-rank batches);
    # only the float32 summation order differs, by ~1e-7 of a gradient, times lr 0.02 over 3 steps
    # (measured under DDP: at most 1e-8 apart, while training moved weights by 8e-3 to 6e-2).
    start = load_file(tiny_model_dir / "model.safetensors")
    single_weights = load_file(single / "hf_model" / "model.safetensors")
    two_weights = load_file(two / "hf_model" / "model.safetensors")
    assert single_weights.keys() == two_weights.keys()
    moved = max(float((single_weights[name] - start[name]).abs().max()) for name in start)
    assert moved > 1e-3  # training changed the weights far beyond the tolerance below
    for name, value in single_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=0, atol=1e-6, msg=name)
