"""``--generation.*`` through the CLI and ``python -m ipo_lightning evaluate`` on the finished run: the
same code path gives the same samples, and bad input is one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipo_lightning.cli import main
from ipo_lightning.evaluation import write_atomically
from tests.helpers import fit_config, polite_pairs, run_main, write_config, write_jsonl

REWARD = "tests.test_generation_eval:distinct_tokens"


def _config(tmp_path: Path, model_dir: Path, **generation: object) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    val_a = write_jsonl(tmp_path / "val_a.jsonl", polite_pairs(6, offset=100))
    val_b = write_jsonl(tmp_path / "val_b.jsonl", polite_pairs(6, offset=200))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"in_dist": val_a, "ood": val_b},
        trainer={"max_steps": 4, "val_check_interval": 2},
        model={"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02}}},
        data={"batch_size": 4},
        divergence={"sample_prompts": 1, "max_new_tokens": 4},
        generation={
            "reward": REWARD,
            "prompts": 3,
            "samples_per_prompt": 2,
            "max_new_tokens": 6,
            **generation,
        },
        wandb={"enabled": False},
    )
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.slow
def test_evaluate_on_the_finished_run_repeats_the_last_measurement(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["fit", "--config", str(_config(tmp_path, tiny_model_dir))])
    run_dir = tmp_path / "runs" / "version_0"
    during = [json.loads(line) for line in (run_dir / "generation_samples.jsonl").open()]
    assert sorted({row["step"] for row in during}) == [0, 2, 4]  # divergence's schedule: 0, validations
    capsys.readouterr()

    main(["evaluate", str(run_dir)])
    out = capsys.readouterr().out
    assert "tests.test_generation_eval:distinct_tokens: 2 samples x 3 prompts per set" in out
    record = json.loads((run_dir / "generation_eval.json").read_text())
    after = [json.loads(line) for line in (run_dir / "generation_eval_samples.jsonl").open()]
    # The export is the policy of the last measurement (step 4, after the last validation), the reference
    # and the seeds are the same: the command draws exactly the samples the callback drew at step 4.
    assert after == [row for row in during if row["step"] == 4]
    assert record["step"] == 4 and set(record["sets"]) == {"in_dist", "ood"}
    policy = [row["policy_reward"] for row in after if row["set"] == "ood"]
    assert record["metrics"]["gen/ood/reward"] == pytest.approx(sum(policy) / len(policy))
    assert record["metrics"]["gen/reward"] == record["sets"]["in_dist"]["reward"]
    ratios = [row["policy_logratio"] for row in after if row["set"] == "ood"]
    assert record["metrics"]["gen/ood/kl"] == pytest.approx(sum(ratios) / len(ratios)) != 0.0

    # The policy of the last checkpoint (saved after the last validation) is the export's.
    (checkpoint,) = (run_dir / "checkpoints").glob("*.ckpt")
    main(["evaluate", str(run_dir), "--checkpoint", str(checkpoint)])
    assert [json.loads(line) for line in (run_dir / "generation_eval_samples.jsonl").open()] == after

    # Options override the run's: another seed draws other samples, and one set only.
    main(["evaluate", str(run_dir), "--seed", "1", "--sets", "ood", "--no-greedy"])
    other = json.loads((run_dir / "generation_eval.json").read_text())
    assert set(other["sets"]) == {"ood"} and "greedy_reward" not in other["sets"]["ood"]
    rows = [json.loads(line) for line in (run_dir / "generation_eval_samples.jsonl").open()]
    assert [r["policy"] for r in rows] != [r["policy"] for r in after if r["set"] == "ood"]

    code, err = run_main(["evaluate", str(run_dir), "--sets", "test"], capsys)
    assert (
        code == 2
        and err.strip().splitlines()[-1] == "error: --sets: no set 'test' in the run; it has in_dist, ood"
    )
    code, err = run_main(["evaluate", str(run_dir), "--reward", "tests.test_generation_eval:nope"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: --reward 'tests.test_generation_eval:nope': "
        "'tests.test_generation_eval' has no attribute 'nope'"
    )
    code, err = run_main(["evaluate", str(tmp_path / "missing")], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {tmp_path / 'missing'}: no such run folder"


def test_a_bad_reward_stops_the_cli_at_start_up_with_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, tiny_model_dir, reward="tests.test_generation_eval:wrong_length")
    code, err = run_main(["fit", "--config", str(config)], capsys)  # the CLI's entry point, in this process
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "error: --generation.reward 'tests.test_generation_eval:wrong_length': "
        "returned 1 values for 2 prompts"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "version_0").exists()  # no run folder that looks started


@pytest.mark.slow
def test_evaluate_judges_the_prompts_the_callback_judged_without_a_val_set(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # No val set: the callback draws from the training set as the run kept it (train_size of 9 pairs
    # drawn from 24, then label noise), and evaluate must rebuild that set, not the whole file.
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    config = fit_config(
        tmp_path,
        tiny_model_dir,
        train,
        trainer={"max_steps": 2},
        data={"batch_size": 4, "train_size": 9, "label_noise": 0.25, "seed": 3},
        divergence={"sample_prompts": 1, "max_new_tokens": 4},
        generation={
            "reward": REWARD,
            "prompts": 4,
            "samples_per_prompt": 1,
            "max_new_tokens": 4,
            "every_n_steps": 2,
            "on_validation": False,
        },
        wandb={"enabled": False},
    )
    main(["fit", "--config", str(write_config(tmp_path / "config.yaml", config))])
    run_dir = tmp_path / "runs" / "version_0"
    during = [json.loads(line) for line in (run_dir / "generation_samples.jsonl").open()]
    main(["evaluate", str(run_dir)])
    after = [json.loads(line) for line in (run_dir / "generation_eval_samples.jsonl").open()]
    assert {row["set"] for row in after} == {"train"}
    assert [row["prompt"] for row in after] == [row["prompt"] for row in during if row["step"] == 2]
    assert after == [row for row in during if row["step"] == 2]
    first_prompts = list(dict.fromkeys(record["prompt"] for record in polite_pairs(24)))[:4]
    assert [row["prompt"] for row in after] != first_prompts  # the subset's prompts, not the file's


def test_a_result_file_is_whole_or_untouched(tmp_path: Path) -> None:
    target = tmp_path / "judge.json"
    write_atomically(target, '{"win_rate": 0.5}\n')
    assert target.read_text() == '{"win_rate": 0.5}\n'
    with pytest.raises(TypeError):
        write_atomically(target, None)  # type: ignore[arg-type]  # fails after the staging file exists
    assert target.read_text() == '{"win_rate": 0.5}\n'  # the old file, not a half-written one
    assert [path.name for path in tmp_path.iterdir()] == ["judge.json"]  # no staging file left
