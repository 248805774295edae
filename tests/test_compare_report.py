"""compare (several members, one budget), report (table + plots from run folders), judge, sweep file."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from ipo_lightning.analysis.compare import (
    CompareSpec,
    check_members,
    load_spec,
    run_compare,
    write_compare_report,
    write_folder_atomically,
)
from ipo_lightning.analysis.judge import judge_run
from ipo_lightning.analysis.report import recommend, summarize, write_report
from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.cli import main
from ipo_lightning.errors import ConfigError
from tests.helpers import (
    REPO,
    cli_runs_in_process,
    fit_config,
    polite_pairs,
    run_main,
    write_config,
    write_jsonl,
)


def _last_logged(metrics_csv: Path, column: str) -> float:
    """Independent reading of metrics.csv: the last non-empty value of ``column``."""
    with metrics_csv.open() as handle:
        values = [row[column] for row in csv.DictReader(handle) if row.get(column)]
    return float(values[-1]) if values else math.nan


def _fit_config(tmp_path: Path, model_dir: Path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    val_a = write_jsonl(tmp_path / "val_a.jsonl", polite_pairs(6, offset=100))
    val_b = write_jsonl(tmp_path / "val_b.jsonl", polite_pairs(4, offset=200))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"in_dist": val_a, "ood": val_b},
        trainer={"max_steps": 4, "val_check_interval": 2, "enable_checkpointing": False},
        model={"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}}},
        data={"batch_size": 4},
        divergence={"every_n_steps": 2, "sample_prompts": 0},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    del config["trainer"]["default_root_dir"]  # compare gives every member its own
    return write_config(tmp_path / "fit.yaml", config)


@pytest.mark.slow
def test_compare_runs_every_member_on_the_same_data_and_reports_their_numbers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "fit_config": str(_fit_config(tmp_path, tiny_model_dir)),
                "runs_dir": str(tmp_path / "runs"),
                "members": {
                    "ipo": {"model.loss_type": "ipo", "model.beta": 0.5},
                    "dpo-mean": {"model.loss_type": "dpo", "model.length_normalize": True},
                },
            },
            sort_keys=False,
        )
    )
    # The members' checks and then the fits, one after another, run the CLI in this process.
    with cli_runs_in_process(fits=True) as ran:
        report = run_compare(load_spec(spec_file))
    assert [command[3] for command in ran] == ["fit"] * 4
    assert ["--print_config" in command for command in ran] == [True, True, False, False]

    run_dirs = {m: tmp_path / "runs" / "tiny" / m / "version_0" for m in ("ipo", "dpo-mean")}
    configs = {m: yaml.safe_load((d / "config.yaml").read_text()) for m, d in run_dirs.items()}
    assert configs["ipo"]["model"]["beta"] == 0.5 and configs["dpo-mean"]["model"]["loss_type"] == "dpo"
    for config in configs.values():  # same seed, data and budget
        assert config["seed_everything"] == 0 and config["trainer"]["max_steps"] == 4
        assert config["data"] == configs["ipo"]["data"]
    # Same data order, from the logs: before the first update the policy is the same in every member,
    # so the first step's policy log-probs are equal exactly when the first batch is.
    first = {}
    for member, run_dir in run_dirs.items():
        with (run_dir / "metrics.csv").open() as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("train/logps/chosen")]
        first[member] = (rows[0]["train/logps/chosen"], rows[0]["train/logps/rejected"])
    assert first["ipo"] == first["dpo-mean"]

    # The report's numbers are the runs' metrics.csv values.
    summary = json.loads((report.parent / "summary.json").read_text())
    assert [run["name"] for run in summary["runs"]] == ["ipo", "dpo-mean"]
    for run in summary["runs"]:
        metrics = run_dirs[run["name"]] / "metrics.csv"
        assert run["kl"] == _last_logged(metrics, "divergence/kl")
        assert run["margin"] == _last_logged(metrics, "val/logratio/margin")
        assert run["accuracy"] == {
            "in_dist": _last_logged(metrics, "val/in_dist/rewards/accuracy"),
            "ood": _last_logged(metrics, "val/ood/rewards/accuracy"),
        }
        assert run["steps"] == 4
    markdown = report.read_text()
    ipo = summary["runs"][0]
    assert f"| ipo | ipo | 0.50 | mean | 0.00 | 4 | {ipo['accuracy']['in_dist']:.3f} |" in markdown
    assert f"**Recommended** (of the runs): **{summary['recommended']}**" in markdown
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert images == ["kl_vs_step.png", "accuracy_vs_kl.png", "accuracy_id_vs_ood.png"]
    for image in images:
        assert imread(report.parent / image).shape[0] > 100  # a real PNG, linked where it lies


def _run_with(
    root: Path, name: str, accuracy: float, kl: float, win_rate: float | None = None, label_noise: float = 0.0
) -> Path:
    logger = CSVLogger(root / name, name="")
    logger.log_metrics({"divergence/kl": kl}, step=10)
    logger.log_metrics({"val/rewards/accuracy": accuracy}, step=10)
    if win_rate is not None:
        logger.log_metrics({"gen/win_rate": win_rate, "gen/reward": 1.0}, step=10)
    logger.save()
    config = {"model": {"loss_type": "ipo", "beta": 0.5, "length_normalize": True}}
    if label_noise:
        config["data"] = {"label_noise": label_noise}
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    return Path(logger.log_dir)


def test_recommendation_prefers_less_drift_among_tied_accuracies(tmp_path: Path) -> None:
    runs = [
        _run_with(tmp_path, "drifty", 0.900, 0.30),
        _run_with(tmp_path, "steady", 0.895, 0.05),
        _run_with(tmp_path, "weak", 0.700, 0.01),
    ]
    summaries = [summarize(d.parent.name, load_run(d)) for d in runs]
    choice, reason = recommend(summaries)
    assert choice.name == "steady" and "tied with drifty" in reason
    choice, reason = recommend([summaries[0], summaries[2]])
    assert choice.name == "drifty" and "highest mean held-out accuracy" in reason
    report = write_report(runs, tmp_path / "report")
    assert "accuracy_id_vs_ood.png" not in report.read_text()  # one val set: no ID-vs-OOD plot


def test_recommendation_judges_generations_when_every_run_has_a_win_rate(tmp_path: Path) -> None:
    # The most accurate run on pairs writes the worst samples: the win rate decides.
    runs = [
        _run_with(tmp_path, "accurate", 0.95, 0.30, win_rate=0.55, label_noise=0.2),
        _run_with(tmp_path, "writer", 0.80, 0.20, win_rate=0.70, label_noise=0.2),
        _run_with(tmp_path, "close", 0.70, 0.10, win_rate=0.695, label_noise=0.2),
    ]
    summaries = [summarize(d.parent.name, load_run(d)) for d in runs]
    choice, reason = recommend(summaries[:2])
    assert choice.name == "writer" and "highest final generation win rate (0.700)" in reason
    choice, reason = recommend(summaries)
    assert choice.name == "close" and "tied with writer" in reason
    # Every run is noisy, so all of them are candidates and the report does not claim clean labels.
    report = write_report(runs, tmp_path / "report").read_text()
    assert "**Recommended** (of the runs): **close**" in report
    # Without a win rate for every candidate, accuracy decides as before.
    no_gen = _run_with(tmp_path / "plain", "plain", 0.99, 0.5)
    choice, _ = recommend([*summaries, summarize("plain", load_run(no_gen))])
    assert choice.name == "plain"


def test_noisy_runs_are_paired_with_their_clean_run_and_not_recommended(tmp_path: Path) -> None:
    runs = [_run_with(tmp_path, "ipo", 0.90, 0.05), _run_with(tmp_path, "ipo-noise", 0.95, 0.04)]
    config = yaml.safe_load((runs[1] / "config.yaml").read_text())
    config["data"] = {"label_noise": 0.2}
    (runs[1] / "config.yaml").write_text(yaml.safe_dump(config))
    report = write_report(runs, tmp_path / "report").read_text()
    assert "**Recommended** (of the runs with clean labels): **ipo**" in report
    assert "- ipo-noise (20% flipped) vs ipo: val +0.050" in report
    costs = json.loads((tmp_path / "report" / "summary.json").read_text())["noise_costs"]
    assert costs[0]["accuracy_change"]["val"] == pytest.approx(0.05)
    assert (tmp_path / "report" / "accuracy_vs_kl.png").is_file()


def test_compare_file_errors_name_the_member_and_option(tmp_path: Path, tiny_model_dir: Path) -> None:
    fit = _fit_config(tmp_path, tiny_model_dir)
    spec_file = tmp_path / "compare.yaml"

    def write(**spec: object) -> Path:
        spec_file.write_text(yaml.safe_dump({"name": "x", "fit_config": str(fit), **spec}))
        return spec_file

    with pytest.raises(ConfigError, match=r"member 'b' sets 'data.seed', which all members must share"):
        load_spec(write(members={"a": {}, "b": {"data.seed": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['memebrs'\]"):
        load_spec(write(memebrs={"a": {}}))
    with pytest.raises(ConfigError, match="'members' is required"):
        load_spec(write())


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"b": {"trainer": {"max_steps": 5000}}}, "member 'b' sets 'trainer.max_steps', which all members"),
        ({"b": {"data": {"batch_size": 2}}}, "member 'b' sets 'data.batch_size', which all members"),
        ({"b": {"data": {"train": {"path": "x.jsonl"}}}}, "member 'b' sets 'data.train.path', which"),
        ({"b": {"trainer": None}}, "member 'b' sets 'trainer', which all members must share"),
        (
            {"b": {"config": "{other}"}},
            "member 'b' sets 'seed_everything' (in its config file {other}), which",
        ),
        ({"../../x": {}}, "member name '../../x' is not a plain folder name"),
        ({"a/b": {}}, "member name 'a/b' is not a plain folder name"),
        ({"..": {}}, "member name '..' is not a plain folder name"),
        ({"report": {}}, "member 'report' would share its folder with the report"),
    ],
    ids=[
        "trainer-parent",
        "data-parent",
        "nested-deeper",
        "parent-null",
        "config-file",
        "dotdot-path",
        "slash",
        "dotdot",
        "report-folder",
    ],
)
def test_members_cannot_reach_the_shared_options_or_leave_runs_dir(
    tmp_path: Path, tiny_model_dir: Path, members: dict, expected: str
) -> None:
    fit = _fit_config(tmp_path, tiny_model_dir)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"seed_everything": 3, "model": {"beta": 0.1}}))
    members = {
        "a": {},
        **{
            name: {k: str(other) if v == "{other}" else v for k, v in (options or {}).items()}
            for name, options in members.items()
        },
    }
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "x", "fit_config": str(fit), "members": members}))
    with pytest.raises(ConfigError) as caught:
        load_spec(spec_file)
    assert str(caught.value).startswith(f"{spec_file}: " + expected.replace("{other}", str(other)))


def test_allowed_member_options_and_names_load(tmp_path: Path, tiny_model_dir: Path) -> None:
    fit = _fit_config(tmp_path, tiny_model_dir)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"beta": 0.1}}))
    members = {"ipo_v1.2": {"data": {"label_noise": 0.2}}, "dpo-2": {"config": str(other)}}
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(
        yaml.safe_dump({"name": "x", "fit_config": str(fit), "members": members}, sort_keys=False)
    )
    assert list(load_spec(spec_file).members) == ["ipo_v1.2", "dpo-2"]
    spec_file.write_text(yaml.safe_dump({"name": "../up", "fit_config": str(fit), "members": members}))
    with pytest.raises(ConfigError, match=r"comparison name '../up' is not a plain folder name"):
        load_spec(spec_file)


def test_members_are_compared_on_their_resolved_shared_options(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Built directly, past load_spec's own checks: the resolved configs alone must catch it.
    fit = _fit_config(tmp_path, tiny_model_dir)
    different, same = (
        CompareSpec(
            name="x",
            fit_config=[fit],
            members={"a": {"model.beta": 0.2}, "b": b_options},
            runs_dir=tmp_path / "runs",
        )
        for b_options in ({"trainer": {"max_steps": 7}}, {"model.beta": 0.3})
    )
    # The members' `fit --print_config` runs parse in this process: the resolved configs are the subject.
    with cli_runs_in_process() as parsed:
        with pytest.raises(ConfigError) as caught:
            check_members(different)
        assert str(caught.value) == (
            "compare member 'b': trainer.max_steps resolves to 7, but member 'a' has 4; all members must "
            "share seed, data and budget"
        )
        check_members(same)  # b's own default_root_dir is not a difference
    assert len(parsed) == 4


def _member_run(spec: CompareSpec, member: str, kl: float) -> None:
    logger = CSVLogger(spec.member_dir(member), name="")
    logger.log_metrics({"divergence/kl": kl, "val/rewards/accuracy": 0.8}, step=10)
    logger.save()
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump({"model": {"loss_type": "ipo"}}))


def test_a_failed_report_leaves_the_previous_report_whole(tmp_path: Path) -> None:
    spec = CompareSpec(name="x", fit_config=[], members={"a": {}, "b": {}}, runs_dir=tmp_path / "runs")
    report_dir = tmp_path / "runs" / "x" / "report"
    _member_run(spec, "a", 0.1)
    _member_run(spec, "b", 0.2)
    first = write_compare_report(spec)
    assert first == report_dir / "report.md" and "| b |" in first.read_text()
    before = {path.name: path.read_bytes() for path in report_dir.iterdir()}

    def half_then_fail(folder: Path) -> Path:
        (folder / "report.md").write_text("half")
        raise OSError("disk full")

    # A writer that fails half-way over an existing report: the previous one stays whole.
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(report_dir, half_then_fail)
    assert {path.name: path.read_bytes() for path in report_dir.iterdir()} == before
    assert sorted(path.name for path in report_dir.parent.iterdir()) == ["a", "b", "report"]

    # A newer run of b whose KL is infinite: summary.json (strict JSON) holds null, report.md inf.
    time.sleep(0.01)
    _member_run(spec, "b", math.inf)
    write_compare_report(spec)
    runs = {run["name"]: run for run in json.loads((report_dir / "summary.json").read_text())["runs"]}
    assert runs["b"]["kl"] is None and "inf" in (report_dir / "report.md").read_text()

    # A writer that fails on a first report: no report folder at all.
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(fresh, half_then_fail)
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]


def test_compare_checks_every_member_before_training(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "compare.yaml"
    spec = {
        "name": "x",
        "fit_config": str(_fit_config(tmp_path, tiny_model_dir)),
        "runs_dir": str(tmp_path / "runs"),
        "members": {"good": {"model.beta": 0.5}, "typo": {"model.betta": 0.5}},
    }
    spec_file.write_text(yaml.safe_dump(spec))
    # The CLI's entry point in this process, and the members' checks parse in it too.
    with cli_runs_in_process() as parsed:
        code, stderr = run_main(["compare", "--config", str(spec_file)], capsys)
    assert code == 2 and len(parsed) == 2
    assert "error: compare member 'typo'" in stderr and "betta" in stderr
    assert not (tmp_path / "runs").exists()  # nothing trained


def _judge_setup(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A run folder whose exported policy is the reference itself, and a tiny reward model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    reward_dir = tmp_path / "reward"
    scorer.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)

    run_dir = tmp_path / "run" / "version_0"
    shutil.copytree(tiny_model_dir, run_dir / "hf_model")  # the exported policy: the reference itself
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(6))
    config = {
        "model": {"model_name_or_path": str(tiny_model_dir)},
        "data": {"val": {"held_out": {"path": str(val)}}, "max_length": 64, "max_prompt_length": 32},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.csv").write_text("step\n0\n")
    return run_dir, reward_dir


def test_judge_gives_one_half_when_the_policy_is_the_reference(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir, reward_dir = _judge_setup(tmp_path, tiny_model_dir)
    result = judge_run(run_dir, str(reward_dir), prompts=5, max_new_tokens=6)
    assert (result.win_rate, result.ci_low, result.ci_high) == (0.5, 0.5, 0.5)
    assert result.ties == result.prompts == 5
    assert json.loads((run_dir / "judge.json").read_text())["win_rate"] == 0.5


def test_judge_refuses_a_reward_model_with_only_pickled_weights(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    run_dir, reward_dir = _judge_setup(tmp_path, tiny_model_dir)
    weights = reward_dir / "model.safetensors"
    torch.save(load_file(weights), reward_dir / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["judge", str(run_dir), "--reward_model", str(reward_dir)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: --reward {str(reward_dir)!r}: the folder holds only pickled .bin weights; the reward "
        "model is loaded from safetensors only (re-save it with save_pretrained, which writes .safetensors)"
    ]
    assert not (run_dir / "judge.json").exists()


@pytest.mark.slow
def test_sweep_file_parameters_are_fit_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "quickstart-beta.yaml").read_text())
    assert sweep["command"][-1] == "${args}"
    point = [f"--{name}={spec['values'][0]}" for name, spec in sweep["parameters"].items()]  # W&B's form
    assert sweep["command"][1:4] == ["python", "-m", "ipo_lightning"]
    fixed = sweep["command"][4:-1]
    # The CLI's entry point in this process, from the repository root as the agent runs it.
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:  # the config printed, the CLI exits
        main([*fixed, *point, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err[-2000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["loss_type"] == "ipo" and printed["model"]["beta"] == 0.1


def test_shipped_compare_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where users run it
    spec = load_spec("configs/compare/quickstart-noise.yaml")
    assert list(spec.members) == ["ipo", "dpo", "ipo-noise20", "dpo-noise20"]
    command = spec.fit_command("ipo-noise20")
    assert command[-2:] == ["--trainer.default_root_dir", "runs/compare/quickstart-noise/ipo-noise20"]
    assert ["--data.label_noise", "0.2"] == command[command.index("--data.label_noise") :][:2]
