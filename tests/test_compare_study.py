"""compare's study axes: members x data size x label noise x seed, everything else still locked."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from ipo_lightning.analysis.compare import CompareSpec, check_members, load_spec, main, run_compare
from ipo_lightning.errors import ConfigError
from tests.helpers import REPO, cli_runs_in_process, fit_config, polite_pairs, write_config, write_jsonl


def _fit(tmp_path: Path, model_dir: Path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(6, offset=100))
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"in_dist": val},
        trainer={"max_steps": 2, "enable_checkpointing": False},
        divergence={"every_n_steps": 1, "sample_prompts": 0},
        export={"enabled": False},
        wandb={"enabled": False},
    )
    del config["trainer"]["default_root_dir"]
    return write_config(tmp_path / "fit.yaml", config)


def _spec_file(tmp_path: Path, fit: Path, **spec: object) -> Path:
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "fit_config": str(fit), **spec}, sort_keys=False))
    return path


def test_study_expands_members_times_axes_in_file_order(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = {"ipo": {"model.loss_type": "ipo"}, "dpo": {"model.loss_type": "dpo", "model.beta": 0.1}}
    study = {"data.train_size": [10, 20], "data.label_noise": [0, 0.2], "seed": [0, 1]}
    spec = load_spec(_spec_file(tmp_path, _fit(tmp_path, tiny_model_dir), members=members, study=study))
    expected = [
        f"{member}-n{size}-noise{noise}-seed{seed}"
        for member in ("ipo", "dpo")
        for size in (10, 20)
        for noise in ("0", "0.2")
        for seed in (0, 1)
    ]
    assert list(spec.runs) == expected

    command = spec.fit_command("dpo-n20-noise0.2-seed1")
    own = command[command.index("--model.loss_type") :]  # after the fit config
    options = dict(zip(own[::2], own[1::2], strict=True))
    assert options == {
        "--model.loss_type": "dpo",
        "--model.beta": "0.1",
        "--data.train_size": "20",
        "--data.label_noise": "0.2",
        "--seed_everything": "1",
        "--data.seed": "1",
        "--trainer.default_root_dir": str(Path("runs/compare/s/dpo-n20-noise0.2-seed1")),
    }
    # The point's options come after the member's: on the command line the later value wins.
    assert command.index("--data.train_size") > command.index("--model.beta")

    main(["--config", str(tmp_path / "compare.yaml"), "--print_commands"])
    printed = capsys.readouterr()
    assert printed.out.splitlines()[7].endswith("runs/compare/s/ipo-n20-noise0.2-seed1")
    assert len(printed.out.splitlines()) == 16
    assert printed.err.strip() == (
        "compare s: 16 runs (2 members x 2 data.train_size x 2 data.label_noise x 2 seed): "
        + ", ".join(expected)
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"members": {"a": {"data.train_size": 10}}},
            "member 'a' sets 'data.train_size', which all members must share",
        ),
        (
            {"members": {"a": {"data": {"train_size": 10}}}, "study": {"data.label_noise": [0, 0.1]}},
            "member 'a' sets 'data.train_size', which all members must share",
        ),
        (
            {"members": {"a": {"data.label_noise": 0.1}}, "study": {"data.label_noise": [0, 0.2]}},
            "member 'a' sets 'data.label_noise', which the study axis 'data.label_noise' sets per run",
        ),
        (
            {"members": {"a": {"data": {"seed": 2}}}, "study": {"seed": [0, 1]}},
            "member 'a' sets 'data.seed', which the study axis 'seed' sets per run",
        ),
        (
            {"members": {"a": {"trainer.max_steps": 9}}, "study": {"seed": [0, 1]}},
            "member 'a' sets 'trainer.max_steps', which all members must share",
        ),
        (
            {
                "members": {"a": {}},
                "options": {"data": {"label_noise": 0.1}},
                "study": {"data.label_noise": [0]},
            },
            "options set 'data.label_noise', which the study axis 'data.label_noise' sets per run",
        ),
        ({"members": {"a": {}}, "study": {"model.beta": [0.1]}}, "study axis 'model.beta' is not one of"),
        ({"members": {"a": {}}, "study": {"seed": []}}, "study axis 'seed' needs a non-empty list of values"),
        (
            {"members": {"a": {}}, "study": {"data.label_noise": [0, 0.0]}},
            "study axis 'data.label_noise' repeats",
        ),
        (
            {"members": {"a": {}}, "study": {"data.label_noise": [0.7]}},
            "study axis 'data.label_noise': data.label_noise must be in [0, 0.5], got 0.7",
        ),
        (
            {"members": {"a": {}}, "study": {"data.train_size": [0]}},
            "study axis 'data.train_size': data.train_size must be a positive number of pairs",
        ),
        (
            {"members": {"a": {}}, "study": {"seed": [1.5]}},
            "study axis 'seed': seed must be an integer, got 1.5",
        ),
    ],
    ids=[
        "size-without-study",
        "size-via-parent",
        "axis-option",
        "seed-axis-data-seed",
        "budget",
        "options-axis",
        "unknown-axis",
        "empty-axis",
        "repeated-value",
        "bad-noise",
        "bad-size",
        "bad-seed",
    ],
)
def test_study_files_that_would_unlock_anything_else_fail(
    tmp_path: Path, tiny_model_dir: Path, spec: dict, expected: str
) -> None:
    path = _spec_file(tmp_path, _fit(tmp_path, tiny_model_dir), **spec)
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: {expected}")


def test_a_study_member_is_compared_on_its_resolved_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Built directly, past load_spec's own checks: the resolved configs alone must catch it.
    spec = CompareSpec(
        name="s",
        fit_config=[_fit(tmp_path, tiny_model_dir)],
        members={"a": {}, "b": {"data.train_size": 8}},
        runs_dir=tmp_path / "runs",
        study={"seed": [3, 4]},
    )
    # The members' `fit --print_config` runs parse in this process: the resolved configs are the subject.
    with cli_runs_in_process() as parsed, pytest.raises(ConfigError) as caught:
        check_members(spec)
    assert str(caught.value) == (
        "compare member 'b': data.train_size resolves to 8, but member 'a' has null; all members must share "
        "seed, data and budget"
    )
    assert len(parsed) == 2


@pytest.mark.slow
def test_a_size_by_seed_study_of_the_quickstart_runs_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = {
        "trainer.max_steps": 3,
        "trainer.val_check_interval": 3,
        "trainer.check_val_every_n_epoch": None,
        "trainer.limit_val_batches": 1,  # the report reads what was logged, however much was scored
        "trainer.enable_progress_bar": False,
        "trainer.enable_checkpointing": False,
        "trainer.callbacks": [],
        "divergence.sample_prompts": 0,
        "divergence.num_pairs": 16,
        "export.enabled": False,
        "wandb.enabled": False,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "qs",
                "fit_config": str(REPO / "configs" / "quickstart.yaml"),
                "runs_dir": str(tmp_path / "runs"),
                "options": options,
                "members": {"ipo": {}},
                "study": {"data.train_size": [32, 64], "seed": [0, 1]},
            }
        )
    )
    # The fits run in child processes; the member's check parses in this process.
    with cli_runs_in_process() as parsed:
        report = run_compare(load_spec(path), jobs=2)
    assert len(parsed) == 1
    names = ["ipo-n32-seed0", "ipo-n32-seed1", "ipo-n64-seed0", "ipo-n64-seed1"]
    out = capsys.readouterr().out
    assert f"compare qs: 4 runs (1 members x 2 data.train_size x 2 seed): {', '.join(names)}" in out
    assert out.index("4 runs") < out.index("run 1/4: ipo-n32-seed0")

    for name in names:
        run_dir = tmp_path / "runs" / "qs" / name / "version_0"
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        size, seed = re.fullmatch(r"ipo-n(\d+)-seed(\d)", name).groups()
        assert config["data"]["train_size"] == int(size)
        assert config["seed_everything"] == config["data"]["seed"] == int(seed)
        with (run_dir / "metrics.csv").open() as handle:
            assert max(int(row["step"]) for row in csv.DictReader(handle) if row["step"]) == 3
        # Parallel fits log to their own files, not the terminal.
        assert "max_steps=3" in (run_dir.parent / "fit.log").read_text()
    summary = json.loads((report.parent / "summary.json").read_text())
    groups = {(g["label"], g["pairs"]): g for g in summary["by_pairs"]}
    assert sorted(pairs for _, pairs in groups) == [32, 64]
    for (_, pairs), group in groups.items():
        accuracies = [
            sum(r["accuracy"].values()) / len(r["accuracy"])
            for r in summary["runs"]
            if r["train_size"] == pairs
        ]
        assert group["seeds"] == [0, 1] and group["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)
    assert (report.parent / "metric_vs_pairs.png").is_file()

    # --report_only rewrites the report from the same runs, fitting nothing.
    summary_before = (report.parent / "summary.json").read_text()
    main(["--config", str(path), "--report_only"])
    assert (report.parent / "summary.json").read_text() == summary_before


def test_shipped_gold_data_size_study_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where users run it
    spec = load_spec("configs/compare/gold-data-size.yaml")
    runs = list(spec.runs)
    assert len(runs) == 24 and runs[0] == "ipo-n250-noise0-seed0" and runs[-1] == "dpo-n4000-noise0.2-seed1"
    command = spec.fit_command("dpo-n1000-noise0.2-seed1")
    given = dict(zip(command[4::2], command[5::2], strict=False))
    assert given["--data.train.path"] == "builtin:gold/train?pairs=10000&temperature=0"
    assert (given["--model.loss_type"], given["--model.beta"]) == ("dpo", "0.3")
    assert (given["--data.train_size"], given["--data.label_noise"], given["--data.seed"]) == (
        "1000",
        "0.2",
        "1",
    )


def test_compare_refuses_fewer_than_one_job(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--jobs must be at least 1, got 0"):
        main(["--config", str(tmp_path / "missing.yaml"), "--jobs", "0"])
