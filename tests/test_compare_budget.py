"""compare's members as methods: per-member fit_config, a budget of steps or samples, shared judging."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipo_lightning.analysis.budget import layered_config, step_size
from ipo_lightning.analysis.compare import (
    check_members,
    check_reward_folders,
    check_shared_options,
    load_spec,
    run_compare,
)
from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import METHODS
from tests.helpers import (
    REPO,
    cli_runs_in_process,
    fit_config,
    polite_pairs,
    save_tiny_reward_model,
    write_config,
    write_jsonl,
)

GOLD_JUDGE = {"reward": "ipo_lightning.gold:gold_reward", "prompts": 8, "samples_per_prompt": 2}


def _configs(tmp_path: Path) -> dict[str, Path]:
    """Two fit configs of different methods and step sizes (files only; nothing here trains)."""
    data = {"train": {"path": "builtin:gold/train"}, "val": {"in_dist": {"path": "builtin:gold/val"}}}
    preference = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "accumulate_grad_batches": 2},
        "model": {"loss_type": "ipo", "beta": 0.5},
        "data": {**data, "batch_size": 8},
        "generation": GOLD_JUDGE,
    }
    rloo = {
        "method": "rloo",
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": [0, 1], "max_steps": 100},
        "model": {"reward": "ipo_lightning.gold:gold_reward", "samples_per_prompt": 3},
        "data": {**data, "batch_size": 4},
        "generation": GOLD_JUDGE,
    }
    return {
        "preference": write_config(tmp_path / "pref.yaml", preference),
        "rloo": write_config(tmp_path / "rloo.yaml", rloo),
    }


def _spec_file(tmp_path: Path, **spec: Any) -> Path:
    configs = _configs(tmp_path)
    members = {
        "ipo": {"fit_config": str(configs["preference"])},
        "rloo": {"fit_config": str(configs["rloo"]), "model.beta": 0.1},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "members": members, **spec}, sort_keys=False))
    return path


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_completions_per_example_come_from_the_method() -> None:
    assert METHODS["preference"].completions_per_example({}) == 2
    assert METHODS["reward_model"].completions_per_example({"loss_type": "ipo"}) == 2
    assert METHODS["online"].completions_per_example({}) == 2
    assert METHODS["rloo"].completions_per_example({"samples_per_prompt": 6}) == 6
    assert METHODS["rloo"].completions_per_example({}) == 4  # the module's default k


def test_a_samples_budget_gives_each_member_its_own_steps(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, budget={"samples": 1000}))
    # preference: 8 pairs x 2 accumulated x 1 device x 2 completions = 32; rloo: 4 x 1 x 2 devices x 3 = 24
    assert (spec.step_size("ipo").samples, spec.step_size("rloo").samples) == (32, 24)
    ipo, rloo = spec.fit_command("ipo"), spec.fit_command("rloo")
    assert _option(ipo, "--trainer.max_steps") == str(1000 // 32)
    assert _option(rloo, "--trainer.max_steps") == str(1000 // 24)
    assert _option(ipo, "--trainer.max_epochs") == _option(rloo, "--trainer.max_epochs") == "-1"
    # Each member starts from its own fit config only.
    assert [ipo[i + 1] for i, part in enumerate(ipo) if part == "--config"] == [str(tmp_path / "pref.yaml")]
    assert [rloo[i + 1] for i, part in enumerate(rloo) if part == "--config"] == [str(tmp_path / "rloo.yaml")]
    assert rloo[-2:] == ["--trainer.default_root_dir", "runs/compare/m/rloo"]


def test_a_steps_budget_sets_the_steps_and_leaves_epochs_out(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, budget={"steps": 7}))
    for member in ("ipo", "rloo"):
        command = spec.fit_command(member)
        assert _option(command, "--trainer.max_steps") == "7"
        assert command.count("--trainer.max_epochs") == 1 and _option(command, "--trainer.max_epochs") == "-1"
    # Epochs would stop members of different batch sizes after different numbers of samples.
    path = _spec_file(tmp_path, budget={"steps": 7}, options={"trainer.max_epochs": 3})
    with pytest.raises(ConfigError, match="options set 'trainer.max_epochs', which the budget sets"):
        load_spec(path)


def test_without_a_budget_the_old_rules_hold(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path))
    assert "--trainer.max_steps" not in spec.fit_command("rloo")
    path = _spec_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["members"]["rloo"]["data.batch_size"] = 2
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match="member 'rloo' sets 'data.batch_size', which all members must share"
    ):
        load_spec(path)
    raw["budget"] = {"samples": 1000}  # with a budget the batch size may differ
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(path).step_size("rloo").batch_size == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"budget": {"sampels": 10}}, "unknown budget key(s) ['sampels']; use steps or samples"),
        ({"budget": {"steps": 10, "samples": 10}}, "budget sets both steps and samples; give one of them"),
        ({"budget": {"samples": 0}}, "budget samples must be a positive integer, got 0"),
        ({"budget": {"steps": -3}}, "budget steps must be a positive integer, got -3"),
        ({"budget": {"steps": True}}, "budget steps must be a positive integer, got True"),
        ({"budget": 100}, "'budget' is {steps: N} or {samples: N}"),
        (
            {"budget": {"samples": 30}},
            "budget samples 30 is less than one optimizer step of member 'ipo' (data.batch_size 8 x "
            "accumulate_grad_batches 2 x 1 device(s) x 1 node(s) x 2 completions per example (preference) "
            "= 32 samples)",
        ),
        (
            {"budget": {"steps": 5}, "member": {"trainer.max_steps": 5}},
            "member 'rloo' sets 'trainer.max_steps', which all members must share",
        ),
        (
            {"budget": {"steps": 5}, "member": {"trainer": {"max_epochs": 1}}},
            "member 'rloo' sets 'trainer.max_epochs', which all members must share",
        ),
        (
            {"budget": {"steps": 5}, "options": {"trainer.max_steps": 9}},
            "options set 'trainer.max_steps', which the budget sets for every run",
        ),
        ({"member": {"generation.prompts": 4}}, "member 'rloo' sets 'generation.prompts', which all members"),
        (
            {"budget": {"steps": 5}, "member": {"data.train.path": "x.jsonl"}},
            "member 'rloo' sets 'data.train.path', which all members must share",
        ),
        ({"member": {"fit_config": "missing.yaml"}}, "member 'rloo' fit_config 'missing.yaml': no such file"),
        ({"fit_config": "missing.yaml"}, "fit_config 'missing.yaml': no such file"),
        ({"member": {"fit_config": None}}, "member 'rloo' fit_config None: no such file"),
    ],
    ids=[
        "unknown-key",
        "both",
        "zero",
        "negative",
        "bool",
        "not-a-mapping",
        "samples-below-one-step",
        "member-max-steps",
        "member-max-epochs",
        "options-max-steps",
        "member-generation",
        "member-prompts",
        "member-fit-config-missing",
        "top-fit-config-missing",
        "member-fit-config-null",
    ],
)
def test_budget_and_member_errors_name_the_file_and_key(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    path = _spec_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["members"]["rloo"].update(change.pop("member", {}))
    path.write_text(yaml.safe_dump({**raw, **change}))
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(caught.value)


def test_fit_config_is_required_unless_every_member_has_one(tmp_path: Path) -> None:
    path = _spec_file(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["members"]["plain"] = {"model.beta": 0.2}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"'fit_config' is required \(top-level, or in every member\)"):
        load_spec(path)
    raw["fit_config"] = str(tmp_path / "pref.yaml")
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    assert spec.fit_configs("plain") == [tmp_path / "pref.yaml"]
    assert spec.fit_configs("rloo") == [tmp_path / "rloo.yaml"]


def test_a_device_count_left_to_the_machine_cannot_be_budgeted(tmp_path: Path) -> None:
    config = {"trainer": {"accelerator": "gpu", "devices": "auto"}, "data": {"batch_size": 4}}
    with pytest.raises(ConfigError, match=r"^member x: trainer.devices 'auto' leaves the number of devices"):
        step_size(config, "member x")
    assert step_size({"trainer": {"accelerator": "cpu"}}, "x").devices == 1
    assert step_size({"trainer": {"devices": "0,1,2"}}, "x").devices == 3
    assert step_size({"trainer": {"devices": "2", "num_nodes": 2}}, "x").samples == 8 * 2 * 2 * 2


def _resolved(train: str, **generation: Any) -> dict[str, Any]:
    source = {"path": train, "split": "train", "subset": None, "limit": None}
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": -1},
        "data": {"seed": 0, "train": source, "val": {"v": {**source, "path": "builtin:gold/val"}}},
        "generation": {**GOLD_JUDGE, **generation},
    }


def test_shared_prompts_compare_by_the_records_they_select() -> None:
    # The on-policy config's default gold set is the same records as the spelled-out one.
    default, spelled = (
        _resolved("builtin:gold/train"),
        _resolved("builtin:gold/train?pairs=2000&temperature=0.5"),
    )
    spelled["data"]["val_fraction"] = 0.0  # the preference data module has it, the prompt one does not
    check_shared_options({"ipo": spelled, "rloo": default})
    other = _resolved("builtin:gold/train?pairs=1000")
    with pytest.raises(ConfigError) as caught:
        check_shared_options({"ipo": spelled, "rloo": other})
    assert str(caught.value) == (
        "compare member 'rloo': data.train.path resolves to \"builtin:gold/train?pairs=1000&temperature=0.5"
        '&seed=0", but member \'ipo\' has "builtin:gold/train?pairs=2000&temperature=0.5&seed=0"; all '
        "members must share seed, data and budget"
    )
    with pytest.raises(ConfigError) as caught:
        check_shared_options({"ipo": default, "rloo": _resolved("builtin:gold/train", prompts=4)})
    assert str(caught.value) == (
        "compare member 'rloo': generation.prompts resolves to 4, but member 'ipo' has 8; all members are "
        "judged alike"
    )


def test_a_missing_reward_folder_is_named_before_training(tmp_path: Path) -> None:
    missing = tmp_path / "rm" / "hf_model"
    resolved = {"model": {"reward": str(missing)}, "generation": {"reward": "ipo_lightning.gold:gold_reward"}}
    with pytest.raises(ConfigError) as caught:
        check_reward_folders("rloo-rm", resolved)
    assert str(caught.value) == (
        f"compare member 'rloo-rm': model.reward {str(missing)!r}: no such folder; train and export that "
        "reward model first"
    )
    missing.mkdir(parents=True)
    check_reward_folders("rloo-rm", resolved)
    check_reward_folders("x", {"model": {"reward": "owner/reward-model"}})  # a hub id: left to the fit


def test_shipped_gold_methods_compare_plans_200_steps_of_64_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where users run it
    spec = load_spec("configs/compare/gold-methods.yaml")
    assert list(spec.members) == ["ipo", "dpo", "rloo", "online-ipo", "rloo-rm", "online-ipo-rm"]
    for member in spec.members:
        assert spec.step_size(member).samples == 64
    assert [run.name for run in spec.runs.values()][:2] == ["ipo-seed0", "ipo-seed1"]
    for run in spec.runs.values():  # every member at two seeds
        command = spec.fit_command(run.name)
        assert _option(command, "--trainer.max_steps") == "200"
        assert _option(command, "--data.train.path") == "builtin:gold/train?pairs=2000&temperature=0.5"
        assert _option(command, "--seed_everything") == run.name[-1]
    assert len(spec.runs) == 12
    assert spec.step_size("rloo").method == "rloo" and spec.step_size("online-ipo").method == "online"
    reward = spec.members["rloo-rm"]["model.reward"]
    assert reward == spec.members["online-ipo-rm"]["model.reward"] == "runs/gold-rm/gold-methods/hf_model"
    # The rm members' reward folder is a path: without it, compare stops before training.
    config = layered_config(spec.fit_configs("rloo-rm"), spec.options, spec.members["rloo-rm"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'rloo-rm': model.reward 'runs/gold-rm/gold-methods/hf_model': no"):
        check_reward_folders("rloo-rm", config)


@pytest.mark.slow
def test_shipped_gold_methods_resolve_to_the_planned_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    spec = load_spec("configs/compare/gold-methods.yaml")
    reward = tmp_path / "hf_model"
    reward.mkdir()  # stands in for the reward model's export: --print_config does not load it
    for member in ("rloo-rm", "online-ipo-rm"):
        spec.members[member]["model.reward"] = str(reward)
    # The members' `fit --print_config` runs parse in this process: the configs are the subject here.
    with cli_runs_in_process() as parsed:
        resolved = check_members(spec)
    assert len(parsed) == len(spec.members)
    for member, config in resolved.items():
        # Independently of the plan: one step's completions from the resolved options.
        k = {"preference": 2, "rloo": config["model"].get("samples_per_prompt"), "online": 2}[
            config["method"]
        ]
        assert config["data"]["batch_size"] * k * config["trainer"]["accumulate_grad_batches"] == 64, member
        assert config["trainer"]["max_steps"] == 200 and config["trainer"]["max_epochs"] == -1, member
        assert config["trainer"]["val_check_interval"] == 50 and config["export"]["enabled"] is False
    assert resolved["rloo-rm"]["model"]["reward"] == str(reward)
    assert resolved["rloo-rm"]["generation"]["reward"] == "ipo_lightning.gold:gold_reward"


@pytest.mark.slow
def test_a_preference_and_on_policy_members_train_on_one_samples_budget(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=100))
    judge = {"reward": "tests.reward_fixtures:length_reward", "prompts": 2, "samples_per_prompt": 2}
    common = {
        "trainer": {"enable_checkpointing": False, "limit_val_batches": 1},
        "generation": {**judge, "max_new_tokens": 6, "every_n_steps": 0},
        "export": {"enabled": False},
        "wandb": {"enabled": False},
    }
    preference = fit_config(
        tmp_path, tiny_model_dir, train, {"in_dist": val}, data={"batch_size": 4}, **common
    )
    rloo = fit_config(
        tmp_path,
        tiny_model_dir,
        train,
        {"in_dist": val},
        model={"reward": judge["reward"], "samples_per_prompt": 3, "max_new_tokens": 6},
        data={"batch_size": 2, "val_batch_size": 2},
        divergence={"enabled": False},
        **common,
    )
    rloo["method"] = "rloo"
    for config in (preference, rloo):
        del config["trainer"]["default_root_dir"]
    proxy = save_tiny_reward_model(tmp_path / "proxy_rm", tiny_model_dir)
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "methods",
                "runs_dir": str(tmp_path / "runs"),
                "budget": {"samples": 26},  # preference 4 x 2 = 8 a step: 3 steps; rloo 2 x 3 = 6: 4 steps
                "options": {"trainer.val_check_interval": 2, "trainer.check_val_every_n_epoch": None},
                "members": {
                    "ipo": {"fit_config": str(write_config(tmp_path / "pref.yaml", preference))},
                    "rloo": {"fit_config": str(write_config(tmp_path / "rloo.yaml", rloo))},
                    "rloo-rm": {"fit_config": str(tmp_path / "rloo.yaml"), "model.reward": str(proxy)},
                },
            },
            sort_keys=False,
        )
    )
    # The fits run side by side, each into its fit.log; the members' checks parse in this process.
    with cli_runs_in_process() as parsed:
        report = run_compare(load_spec(spec_file), jobs=2)
    assert len(parsed) == 3
    summary = json.loads((report.parent / "summary.json").read_text())
    rows = {row["run"]: row for row in summary["methods"]}
    for member, (method, per_step, steps) in {
        "ipo": ("preference", 8, 3),
        "rloo": ("rloo", 6, 4),
        "rloo-rm": ("rloo", 6, 4),
    }.items():
        run_dir = tmp_path / "runs" / "methods" / member / "version_0"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["trainer"]["max_steps"] == steps and saved["trainer"]["max_epochs"] == -1
        with (run_dir / "metrics.csv").open() as handle:
            # Lightning's training row of step s (1-based) has step s - 1.
            train_rows = [
                row for row in csv.DictReader(handle) if any(row[c] for c in row if c.startswith("train/"))
            ]
        assert len(train_rows) == steps and int(train_rows[-1]["step"]) == steps - 1
        assert (rows[member]["method"], rows[member]["samples_per_step"]) == (method, per_step)
        assert rows[member]["steps"] == steps and rows[member]["samples_seen"] == steps * per_step
    # Only the run trained on the reward model is set against the judge's reward.
    assert {point["run"] for point in summary["proxy_gold"]} == {"rloo-rm"}
    assert any(point["proxy"] is not None and point["gold"] is not None for point in summary["proxy_gold"])
    assert "## Methods" in report.read_text() and (report.parent / "proxy_vs_gold.png").is_file()
