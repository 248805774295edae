"""Method selection: ``method`` picks the classes the CLI builds (ipo_lightning.methods)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import DEFAULT_METHOD, METHODS, method_from_argv
from ipo_lightning.module import PreferenceModule
from tests.helpers import REPO, run_main, write_config


def test_default_is_preference_and_loads_its_classes() -> None:
    assert method_from_argv(["fit", "--config", str(REPO / "configs" / "gold-ipo.yaml")]) == DEFAULT_METHOD
    assert DEFAULT_METHOD == "preference"
    method = METHODS["preference"]
    assert method.module_class is PreferenceModule and method.resolve is not None
    assert METHODS["preference"] is method  # loaded once


def test_unknown_method_names_where_it_came_from(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--method nope: unknown method 'nope'; choose one of preference, reward_model"
    ):
        method_from_argv(["fit", "--method", "nope"])
    config = write_config(tmp_path / "c.yaml", {"method": "nope"})
    with pytest.raises(ConfigError, match=rf"{config}: method: unknown method 'nope'"):
        method_from_argv(["fit", "--config", str(config)])
    with pytest.raises(ConfigError, match="unknown method 3"):
        method_from_argv(["fit", f"--config={write_config(tmp_path / 'd.yaml', {'method': 3})}"])


def test_unreadable_config_is_left_to_the_parser(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n", encoding="utf-8")
    assert method_from_argv(["fit", "--config", str(bad), "--config", str(tmp_path / "missing.yaml")]) == (
        DEFAULT_METHOD
    )


def test_unknown_method_on_the_command_line_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(
        ["fit", "--config", str(REPO / "configs" / "gold-ipo.yaml"), "--method", "nope"], capsys
    )
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: --method nope: unknown method 'nope'; choose one of {', '.join(METHODS)}"
    ]


def test_print_config_states_the_method(capsys: pytest.CaptureFixture[str]) -> None:
    from ipo_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "gold-ipo.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "preference"
    assert printed["model"]["loss_type"] == "ipo"


def test_a_saved_config_without_method_resumes_as_preference(tmp_path: Path) -> None:
    from ipo_lightning.resume import check_same_run

    write_config(tmp_path / "config.yaml", {"model": {"loss_type": "ipo"}})
    check_same_run(tmp_path, {"method": "preference", "model": {"loss_type": "ipo"}})
    with pytest.raises(ConfigError, match="with method='preference', this run has method='reward_model'"):
        check_same_run(tmp_path, {"method": "reward_model", "model": {"loss_type": "ipo"}})
