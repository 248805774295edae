"""Option errors that used to end in a traceback or a hundred lines: one line each, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipo_lightning.cli import main
from ipo_lightning.cli_checks import check_checkpoint_file
from tests.helpers import polite_pairs, write_jsonl


def _run(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, list[str]]:
    """``fit`` on the tiny model with ``args``; the exit code and the non-empty stderr lines."""
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    base = ["fit", "--model.model_name_or_path", str(model_dir), "--data.train.path", str(train)]
    base += ["--trainer.default_root_dir", str(tmp_path / "runs"), "--wandb.enabled", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(exit_info.value.code), [line for line in err.splitlines() if line.strip()]


def _error_line(lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model.optimizer.init_args.lr", "-1"],
            "error: model.optimizer.init_args.lr=-1.0: torch.optim.AdamW rejects it: "
            "Invalid learning rate: -1.0",
        ),
        (
            ["--model.optimizer.init_args.betas", "[0.9, 2]"],
            "error: model.optimizer.init_args.betas=(0.9, 2.0): torch.optim.AdamW rejects it: "
            "Invalid beta parameter at index 1: 2.0",
        ),
    ],
    ids=["negative-lr", "beta-above-1"],
)
def test_optimizer_value_rejected_at_start_names_the_option(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, lines = _run(tmp_path, tiny_model_dir, capsys, *args)
    assert code == 2 and _error_line(lines) == expected
    assert not (tmp_path / "runs").exists()  # checked before anything is loaded or written


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model.optimizer.init_args.lr", "abc"],
            "model.optimizer.init_args.lr expects a number, got 'abc'",
        ),
        (["--model.loss_type", "ipo2"], "model.loss_type expects one of ipo, dpo, hinge, got 'ipo2'"),
        (["--data.batch_size", "1.5"], "data.batch_size expects an integer, got '1.5'"),
        (["--nonfinite.enabled", "maybe"], "nonfinite.enabled expects true or false, got 'maybe'"),
    ],
    ids=["lr-word", "literal", "int", "bool"],
)
def test_wrongly_typed_option_is_one_short_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, lines = _run(tmp_path, tiny_model_dir, capsys, *args)
    assert code == 2
    assert lines == [f"error: {expected} (options: python -m ipo_lightning fit --help)"]


class _WritesFile:
    """Unpickling this would create ``path``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (self.path.touch, ())


def _crafted(tmp_path: Path) -> Path:
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "payload": _WritesFile(tmp_path / "executed")}, path)
    return path


def _truncated(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.ones(10_000)}, "global_step": 3}, whole)
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "noise.ckpt"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _plain_tensor(tmp_path: Path) -> Path:
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_crafted, "is not a loadable checkpoint (UnpicklingError: "),
        (_truncated, "is not a loadable checkpoint ("),
        (_random_bytes, "is not a loadable checkpoint (UnpicklingError: "),
        (_plain_tensor, "is a torch file but not a Lightning checkpoint (no 'state_dict' entry)"),
    ],
    ids=["crafted", "truncated", "random-bytes", "not-lightning"],
)
def test_ckpt_path_that_is_no_checkpoint_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], make, expected: str
) -> None:
    path = make(tmp_path)
    code, lines = _run(tmp_path, tiny_model_dir, capsys, "--ckpt_path", str(path))
    line = _error_line(lines)
    assert code == 2 and line.startswith(f"error: ckpt_path {path} ") and expected in line, line
    if "loadable" in expected:
        assert line.endswith("it was read with weights_only=True, so nothing in it was executed")
    assert not (tmp_path / "executed").exists()
    assert not (tmp_path / "runs").exists()


def test_crafted_checkpoint_payload_is_real(tmp_path: Path) -> None:
    """The crafted file runs its code when loaded without weights_only: the test above means something."""
    torch.load(_crafted(tmp_path), weights_only=False)
    assert (tmp_path / "executed").exists()


def test_a_lightning_checkpoint_passes_the_check(tmp_path: Path) -> None:
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 3}, path)
    check_checkpoint_file(path)
    check_checkpoint_file("last")  # resolved by Lightning itself
