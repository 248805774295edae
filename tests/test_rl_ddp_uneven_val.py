"""The on-policy methods under DDP with 7 validation prompts over two CPU processes (gloo): the share of
one rank ends with a weight-0 repeat of prompt 0, which samples and is rewarded like any prompt and counts
for nothing. ``val/*`` and ``gen/*`` (the generation evaluation of the same prompts) equal one process's."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import fit_config, logged_values, run_clis, write_config, write_jsonl
from tests.ranks import Torchrun
from tests.reward_fixtures import RECORD_DIR_VAR

METHODS = {"rloo": 4, "online": 2}
"""Each method and its samples per prompt (k)."""
VAL_PROMPTS = [f"Human: say {word}. Assistant:" for word in "abcdefg"]
RUNS = {"single": 1, "ddp": 2}
"""Each run of a method and its processes."""
RUN_FOLDER = Torchrun([]).folder
"""Each run's folder in ``<method>/<run>/`` (torchrun's)."""


def _config(root: Path, model_dir: Path, name: str, devices: int) -> Path:
    """The fit config of run ``name`` on ``devices`` processes: one optimizer step of 4 prompts, then
    validation; the generation evaluation measures at step 0 and after the validation."""
    prompts = [{"prompt": f"Human: tell me about {topic}. Assistant:"} for topic in range(4)]
    train = write_jsonl(root / "train.jsonl", prompts)
    val = write_jsonl(root / "val.jsonl", [{"prompt": prompt} for prompt in VAL_PROMPTS])
    config = fit_config(
        root,
        model_dir,
        train,
        val={"held_out": val},
        trainer={
            "default_root_dir": str(root / name),
            "devices": devices,
            "max_steps": 1,
            "val_check_interval": 1,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            **({"strategy": "ddp"} if devices > 1 else {}),
        },
        model={
            "reward": "tests.reward_fixtures:recorded_length_reward",
            "max_new_tokens": 6,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.02}},
            "warmup_ratio": 0.0,
        },
        # 7 prompts in batches of 2: rank 0 gets a c e g, rank 1 b d f and the repeat of a.
        data={"max_length": 48, "max_prompt_length": 24, "batch_size": 4 // devices, "val_batch_size": 2},
        generation={
            "reward": "tests.test_generation_eval:distinct_tokens",
            "prompts": len(VAL_PROMPTS),
            "samples_per_prompt": 2,
            "max_new_tokens": 6,
            "batch_size": 4,
            "every_n_steps": 0,
        },
        divergence={"enabled": False},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    return write_config(root / f"{name}.yaml", config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Every method's runs of :data:`RUNS`, all at the same time under torchrun: the folder holding
    ``<method>/<run>/`` (its run folder :data:`RUN_FOLDER` and each process's reward calls in
    ``records/``)."""
    root = tmp_path_factory.mktemp("rl_uneven_val")
    commands, envs = [], []
    for method in METHODS:
        for name, devices in RUNS.items():
            records = root / method / name / "records"
            records.mkdir(parents=True)
            config = _config(root / method, tiny_model_dir, name, devices)
            commands.append(Torchrun(["fit", "--config", str(config), "--method", method], nproc=devices))
            envs.append({RECORD_DIR_VAR: str(records)})
    results = run_clis(root, *commands, envs=envs, timeout=600)
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 0, (" ".join(command.args), (result.stdout + result.stderr)[-4000:])
    return root


def _validation_rows(run: Path) -> list[list]:
    """The ``[prompt, completion, reward]`` rows of every validation reward call of every process (each
    process's first call is the training step's), sorted."""
    rows = []
    for path in (run / "records").glob("*.jsonl"):
        calls = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        rows += [row for call in calls[1:] for row in call]
    return sorted(rows)


def _logged(run: Path) -> dict[tuple[int, str], float]:
    """Every logged ``val/`` and ``gen/`` value by (step, name)."""
    return logged_values(run / RUN_FOLDER / "metrics.csv", ("val/", "gen/"))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_uneven_validation_prompts_under_ddp_count_once(runs: Path, method: str) -> None:
    k = METHODS[method]
    single, ddp = runs / method / "single", runs / method / "ddp"
    assert len(list((ddp / "records").glob("*.jsonl"))) == 2

    # The processes sampled 8 prompts: the 7, and prompt a again (its seed is its index: the same
    # completions and rewards). One process sampled each of the 7 once.
    single_rows, ddp_rows = _validation_rows(single), _validation_rows(ddp)
    first = [row for row in ddp_rows if row[0] == VAL_PROMPTS[0]]
    assert len(ddp_rows) == 8 * k and len(first) == 2 * k and first[0::2] == first[1::2]
    assert sorted(ddp_rows) == sorted(single_rows + first[0::2])
    assert {row[0] for row in single_rows} == set(VAL_PROMPTS) and len(single_rows) == 7 * k

    # val/reward is the mean over the 7 prompts' samples, computed here in float64; the float32
    # mean of 7k rewards of magnitude <= 20 is within 1e-5 of it. Counting the repeat would move it:
    # the repeated prompt's mean reward is more than 8e-3 from the 7 prompts' mean on this data, so an
    # 8-prompt mean differs by more than 1e-3 (a property of these prompts, checked by the assert).
    expected_reward = statistics.fmean(row[2] for row in single_rows)
    with_repeat = statistics.fmean(row[2] for row in ddp_rows)
    assert abs(with_repeat - expected_reward) > 1e-3
    single_logged, ddp_logged = _logged(single), _logged(ddp)
    assert single_logged[1, "val/reward"] == pytest.approx(expected_reward, abs=1e-5)

    # Every val/ and gen/ value of both runs. Rewards are exact (same samples); values from log-probs
    # (val/kl, gen/kl) come from forwards over batches of other shapes and float32 sums in another
    # order: a few ulp of log-probs up to ~30 (measured: at most 5.4e-7 apart), so 1e-5, below the
    # repeat's share (1 of 8 prompts, not of 7).
    assert single_logged.keys() == ddp_logged.keys()
    names = {name for _, name in single_logged}
    assert {"val/reward", "val/kl", "val/entropy", "gen/reward", "gen/kl", "gen/win_rate"} <= names
    for key, value in single_logged.items():
        assert ddp_logged[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key

    # The generation evaluation judged each of the 7 prompts once per measurement (step 0 and after the
    # validation), with one process's samples.
    samples = {}
    for run in (single, ddp):
        lines = (run / RUN_FOLDER / "generation_samples.jsonl").read_text(encoding="utf-8").splitlines()
        samples[run] = sorted(
            (row["step"], row["prompt"], row["sample"], row["policy"], row["policy_reward"])
            for row in map(json.loads, lines)
        )
    assert len(samples[ddp]) == len(set(samples[ddp])) == 2 * len(VAL_PROMPTS) * 2
    assert samples[ddp] == samples[single]
