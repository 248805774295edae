"""On-policy runs (RLOO, online IPO) through the CLI under a simulated SLURM job: the requeue signal
mid-epoch or at an epoch's last step, the requeued relaunch resumes, and the run ends as an
uninterrupted one does."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from ipo_lightning.callbacks.slurm import REQUEUE_EXIT_CODE
from ipo_lightning.errors import ConfigError
from ipo_lightning.resume import check_same_run
from tests.helpers import (
    csv_rows,
    fit_config,
    run_cli_in_process,
    run_clis,
    without_timings,
    write_config,
    write_jsonl,
)

REWARD = "tests.reward_fixtures:length_reward"
PROMPTS, BATCH, MAX_STEPS = 6, 2, 5  # 3 steps per epoch: the run crosses an epoch boundary
# The step whose end sees the signal: RLOO's checkpoint is of step 2, mid-epoch, where a validation is
# due; online IPO's of step 3, the first epoch's last, so the epoch ends between save and exit.
SIGNALLED_STEP = {"rloo": 1, "online": 2}
JOB_ID = "4242"
METHODS = {
    "rloo": {"samples_per_prompt": 2},
    "online": {"loss_type": "ipo"},
}


def _config(tmp_path: Path, model_dir: Path, method: str, name: str, *, signal: bool) -> Path:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": f"Human: tell me about {i}. Assistant:"} for i in range(PROMPTS)],
    )
    callbacks = []
    if signal:
        signal_step = {"step": SIGNALLED_STEP[method]}
        callbacks.append({"class_path": "tests.helpers.SignalAtStep", "init_args": signal_step})
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
def test_on_policy_runs_requeued_mid_epoch_or_at_its_end_finish_as_uninterrupted_ones(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """SIGUSR1 under SLURM: checkpoint at the step's end, ``scontrol requeue``, exit 3; the relaunch of
    the same command resumes. Weights and every logged value (but timings) equal the uninterrupted
    run's, bitwise: on one CPU process in float32 the resumed run does the very same operations."""
    slurm = [_slurm_env(tmp_path)] * len(METHODS)

    def command(method: str, name: str, signal: bool) -> list[str]:
        return ["fit", "--config", str(_config(tmp_path, tiny_model_dir, method, name, signal=signal))]

    straight = [command(method, f"{method}-straight", False) for method in METHODS]
    requeued = [command(method, f"{method}-requeued", True) for method in METHODS]

    def fit_straight() -> None:
        """The uninterrupted runs, outside SLURM: the CLI's entry point in this process."""
        for args in straight:
            result = run_cli_in_process(args)
            assert result.returncode == 0, result.stderr[-3000:]

    first = run_clis(tmp_path, *requeued, envs=slurm, meanwhile=fit_straight)
    for result in first:
        assert result.returncode == REQUEUE_EXIT_CODE, result.stderr[-3000:]
    assert (tmp_path / "scontrol_calls.txt").read_text().split() == ["requeue", JOB_ID] * len(METHODS)

    second = run_clis(tmp_path, *requeued, envs=slurm)
    for method, result in zip(METHODS, second, strict=True):
        assert result.returncode == 0, result.stderr[-3000:]
        run_dir = tmp_path / f"{method}-requeued" / "run"
        (checkpoint,) = run_dir.glob("hpc_ckpt_*.ckpt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert state["global_step"] == SIGNALLED_STEP[method] + 1, method
        assert f"Resuming from {checkpoint}" in result.stdout + result.stderr

        straight = tmp_path / f"{method}-straight" / "run"
        header, rows = csv_rows(run_dir / "metrics.csv")
        straight_header, straight_rows = csv_rows(straight / "metrics.csv")
        assert header == straight_header, method
        assert without_timings(rows) == without_timings(straight_rows), method
        logged = [int(row["step"]) for row in rows if row["train/reward"]]
        assert logged == list(range(MAX_STEPS)), method  # every step once, the signalled one included
        assert len({row["train/kl"] for row in rows if row["train/kl"]}) > 1  # the policy moved
        # The validation due at the checkpoint's step ran before the exit; its val/ and gen/ share a step.
        assert [int(row["step"]) for row in rows if row["val/reward"]] == [2, 4], method
        assert {2, 4} <= {int(row["step"]) for row in rows if row["gen/reward"]}, method
        weights = (run_dir / "hf_model" / "model.safetensors").read_bytes()
        assert weights == (straight / "hf_model" / "model.safetensors").read_bytes(), method


# ------------------------------------------------------------------ run folders of earlier versions


def test_saved_configs_of_earlier_versions_are_read_in_todays_terms(tmp_path: Path) -> None:
    """``model.seed`` (renamed) is read as ``model.sampling_seed`` with a warning; a folder predating
    ``model.disable_dropout`` ran with dropout, so it resumes only with it off; other gaps are named."""
    on_policy = {"method": "rloo", "model": {"seed": 3, "beta": 0.05}}
    write_config(tmp_path / "config.yaml", on_policy)
    warnings: list[str] = []
    check_same_run(tmp_path, {"method": "rloo", "model": {"sampling_seed": 3, "beta": 0.05}}, warnings.append)
    assert warnings == [
        f"{tmp_path / 'config.yaml'}: model.seed is now model.sampling_seed; read as model.sampling_seed=3"
    ]
    with pytest.raises(ConfigError) as error:
        check_same_run(tmp_path, {"method": "rloo", "model": {"sampling_seed": 0, "beta": 0.05}})
    assert str(error.value) == (
        f"run folder {tmp_path} holds checkpoints of a run with model.sampling_seed=3 (written as "
        "model.seed, its earlier name), this run has model.sampling_seed=0: pass --model.sampling_seed 3 "
        "to resume it as it was, use another run.name (or --run.resume false to start over there)"
    )

    write_config(tmp_path / "config.yaml", {"model": {"loss_type": "ipo"}})  # before disable_dropout
    check_same_run(tmp_path, {"model": {"loss_type": "ipo", "disable_dropout": False}})
    with pytest.raises(ConfigError, match=r"model.disable_dropout=False \(its config.yaml predates "):
        check_same_run(tmp_path, {"model": {"loss_type": "ipo", "disable_dropout": True}})
    with pytest.raises(ConfigError, match=r"pass --model.disable_dropout false to resume it as it was"):
        check_same_run(tmp_path, {"model": {"loss_type": "ipo", "disable_dropout": True}})
    with pytest.raises(
        ConfigError, match=r"model.beta=None \(its config.yaml, of an earlier version, has no "
    ):
        check_same_run(tmp_path, {"model": {"loss_type": "ipo", "disable_dropout": False, "beta": 0.5}})


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI in this process: its exit code (0 for a fit that returns) and stderr."""
    from ipo_lightning.cli import main

    try:
        main(args)
    except SystemExit as exit_info:
        return int(exit_info.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.slow
def test_rerun_into_a_folder_of_an_earlier_version(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI resumes an on-policy folder whose config.yaml says ``model.seed`` (one warning line), and
    refuses with one line and exit 2 when the seeds differ or the folder predates disable_dropout."""
    config = yaml.safe_load(_config(tmp_path, tiny_model_dir, "rloo", "earlier", signal=False).read_text())
    checkpoint = {"every_n_train_steps": 1, "save_last": True}
    config["trainer"] |= {"max_steps": 1, "limit_val_batches": 0, "enable_checkpointing": True}
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint}
    ]
    config["generation"] = {"reward": None}
    args = ["fit", "--config", str(write_config(tmp_path / "earlier.yaml", config))]
    code, _ = _run_main(args, capsys)
    assert code == 0
    run_dir = tmp_path / "earlier" / "run"
    saved_path = run_dir / "config.yaml"
    current = yaml.safe_load(saved_path.read_text())
    earlier = copy.deepcopy(current)  # what an earlier version wrote: model.seed
    earlier["model"]["seed"] = earlier["model"].pop("sampling_seed")
    write_config(saved_path, earlier)
    weights = (run_dir / "hf_model" / "model.safetensors").read_bytes()

    code, err = _run_main(args, capsys)
    assert code == 0, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {saved_path}: model.seed is now model.sampling_seed; read as model.sampling_seed=0"
    ]
    assert (run_dir / "hf_model" / "model.safetensors").read_bytes() == weights  # resumed at its end

    earlier["model"]["seed"] = 5
    write_config(saved_path, earlier)
    code, err = _run_main(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "model.sampling_seed=5 (written as model.seed" in errors[0]
    assert "pass --model.sampling_seed 5 to resume it as it was" in errors[0]

    del current["model"]["disable_dropout"]
    write_config(saved_path, current)
    code, err = _run_main(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "pass --model.disable_dropout false to resume it as it was" in errors[0]
    code, err = _run_main([*args, "--model.disable_dropout", "false"], capsys)
    assert code == 0, err[-3000:]


def test_a_renamed_option_on_the_command_line_or_in_a_config_names_its_new_name() -> None:
    from ipo_lightning.cli_errors import short_parser_error

    hint = "; model.seed is now model.sampling_seed"
    assert short_parser_error("unrecognized arguments: --model.seed 3") == (
        "unrecognized arguments: --model.seed 3" + hint
    )
    assert short_parser_error("Group 'model' does not accept option 'seed'.") == (
        "Group 'model' does not accept option 'seed'." + hint
    )
    assert (
        short_parser_error("unrecognized arguments: --model.seeds 3")
        == "unrecognized arguments: --model.seeds 3"
    )
