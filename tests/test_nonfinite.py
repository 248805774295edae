"""NonFiniteGuard on real training runs: stop at a non-finite step, skip up to N, warn on a loss jump."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ipo_lightning.callbacks.export import HFExport
from ipo_lightning.callbacks.nonfinite import NonFiniteGuard, TrainingDiverged
from ipo_lightning.cli import main
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from tests.helpers import (
    ScaleLogits,
    fit_config,
    polite_pairs,
    quiet_trainer,
    run_clis,
    write_config,
    write_jsonl,
)
from tests.ranks import Torchrun


def _module(tiny_model_dir: Path, optimizer=None) -> PreferenceModule:
    optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-2))
    return PreferenceModule(str(tiny_model_dir), beta=0.5, optimizer=optimizer, lr_schedule="constant")


def _datamodule(tmp_path: Path, tiny_model_dir: Path) -> PreferenceDataModule:
    return PreferenceDataModule(
        train=DataSource(path=str(write_jsonl(tmp_path / "train.jsonl", polite_pairs(32)))),
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
    )


class PolicySnapshots(Callback):
    """The policy's weights before and after every training batch, by optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _copy(self, pl_module: PreferenceModule) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in pl_module.policy.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.before[trainer.global_step] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step - 1] = self._copy(pl_module)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_stops_at_the_first_nonfinite_step_and_saves_nothing_after_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    module = _module(tiny_model_dir)
    snapshots = PolicySnapshots()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    trainer = quiet_trainer(
        tmp_path,
        max_steps=5,
        enable_checkpointing=True,
        callbacks=[NonFiniteGuard(), ScaleLogits(steps=[2]), snapshots, checkpoints],
    )
    with pytest.raises(
        TrainingDiverged, match=r"^training diverged at step 2: train/loss is nan and the gradi"
    ):
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    # The bad update was never applied: the weights are those after step 1, finite.
    assert trainer.global_step == 2
    current = {name: p.detach() for name, p in module.policy.named_parameters()}
    assert _equal(current, snapshots.after[1]) and _finite(current)
    # The checkpoints on disk are of steps 1 and 2 (global_step 1, 2), all finite; none after.
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    steps = {torch.load(path, weights_only=True)["global_step"] for path in saved}
    assert steps == {1, 2}
    for path in saved:
        assert _finite(torch.load(path, weights_only=True)["state_dict"])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2


@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-batch", "two-micro-batches"])
def test_skip_mode_skips_exactly_the_bad_steps(tmp_path: Path, tiny_model_dir: Path, accumulate: int) -> None:
    module = _module(tiny_model_dir)
    snapshots = PolicySnapshots()
    guard = NonFiniteGuard(max_skipped_steps=2)
    callbacks = [guard, ScaleLogits(steps=[1, 3]), snapshots]
    trainer = quiet_trainer(tmp_path, max_steps=5, accumulate_grad_batches=accumulate, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    assert trainer.global_step == 5 and guard.skipped_steps == [1, 3]
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == 2 and skipped[0].startswith("non-finite step 1 skipped: train/loss is nan")
    for step in range(5):
        moved = not _equal(snapshots.before[step], snapshots.after[step])
        assert moved == (step not in (1, 3)), step
        assert _finite(snapshots.after[step])
    # The optimizer itself skipped them: Adam counted 3 steps for every weight, not 5.
    optimizer = trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in module.policy.parameters()} == {3}


def test_skip_mode_stops_after_its_budget(tmp_path: Path, tiny_model_dir: Path) -> None:
    module = _module(tiny_model_dir)
    trainer = quiet_trainer(
        tmp_path, max_steps=5, callbacks=[NonFiniteGuard(max_skipped_steps=1), ScaleLogits(steps=[1, 2])]
    )
    with pytest.raises(TrainingDiverged, match=r"at step 2: .* after skipping 1 non-finite step\(s\) \(1\)"):
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_nonfinite_weights_stop_the_run_before_they_are_saved(tmp_path: Path, tiny_model_dir: Path) -> None:
    # SGD with lr 1e38 on gradients above 3.4 (logits scaled up 1000x): finite loss and gradients, but
    # the update overflows float32 weights to inf.
    module = _module(tiny_model_dir, optimizer=lambda params: torch.optim.SGD(params, lr=1e38))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    callbacks = [NonFiniteGuard(), ScaleLogits(steps=[0], factor=1000.0), checkpoints]
    trainer = quiet_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=callbacks)
    with pytest.raises(TrainingDiverged, match=r"at step 0: \d+ trained weight tensor\(s\) are not finite"):
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    assert not all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_loss_jump_is_warned_about_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    module = _module(tiny_model_dir, optimizer=lambda params: torch.optim.Adam(params, lr=1e-4))
    # Logits 1000x larger at steps 3 and 5: the loss grows by orders of magnitude, stays finite.
    guard = NonFiniteGuard(loss_jump_factor=100.0)
    trainer = quiet_trainer(
        tmp_path, max_steps=6, callbacks=[guard, ScaleLogits(steps=[3, 5], factor=1000.0)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    jumps = [str(w.message) for w in caught if "jumped" in str(w.message)]
    assert len(jumps) == 1 and jumps[0].startswith("train/loss jumped at step 3: "), jumps
    assert "nonfinite.loss_jump_factor=100" in jumps[0] and trainer.global_step == 6


def _fit_config(tmp_path: Path, model_dir: Path, lr: float, **trainer: object) -> Path:
    """A quickstart-like run (best/last checkpoints on val/loss, export) on the tiny model."""
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(32))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=100))
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/loss", "mode": "min", "filename": "best", "save_last": True},
    }
    config = fit_config(
        tmp_path,
        model_dir,
        train,
        {"held_out": val},
        trainer={
            "max_steps": 30,
            "val_check_interval": 0.125,  # every batch (32 pairs in batches of 4)
            "callbacks": [checkpoint],
            **trainer,
        },
        model={
            "beta": 0.5,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr, "weight_decay": 0.0}},
            "lr_schedule": "cosine",
            "warmup_ratio": 0.05,
        },
        data={"batch_size": 4},
        divergence={"enabled": False},
        wandb={"enabled": False},
    )
    return write_config(tmp_path / "config.yaml", config)


@pytest.mark.slow
def test_diverging_cli_run_exits_1_without_export_and_keeps_finite_checkpoints(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_fit_config(tmp_path, tiny_model_dir, lr=1e6))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    match = re.match(
        r"error: training diverged at step (\d+): (train/loss is nan|the gradients are not finite)", errors[0]
    )
    assert match, errors[0]
    step = int(match.group(1))
    run_dir = tmp_path / "runs" / "version_0"
    assert not (run_dir / "hf_model").exists()
    # best and last: written by the validations before the diverged step, finite.
    saved = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert {path.name for path in saved} == {"best.ckpt", "last.ckpt"}, (errors, list(run_dir.rglob("*")))
    for path in saved:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] <= step and _finite(checkpoint["state_dict"]), path
    with (run_dir / "metrics.csv").open() as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == step and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow
def test_ddp_every_process_stops_at_the_step_one_process_diverged(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Only rank 1's loss is NaN: both processes stop at that step (none waits forever), exit 1."""
    config = _fit_config(tmp_path, tiny_model_dir, lr=1e-3, max_steps=4, strategy="ddp", devices=2)
    callbacks = [{"class_path": "tests.helpers.ScaleLogits", "init_args": {"steps": [2], "ranks": [1]}}]
    run = Torchrun(["fit", "--config", str(config), "--trainer.callbacks+", json.dumps(callbacks[0])])
    (result,) = run_clis(tmp_path, run)
    err = result.stderr  # a hang fails the test in run_clis
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, err[-3000:]
    assert errors == [
        "error: training diverged at step 2: train/loss is nan on 1 of 2 processes and the gradients are "
        "not finite on 2 of 2 processes; stopped before saving it, nothing exported, checkpoints on disk "
        "are from earlier steps (lower the learning rate, or skip such steps with "
        "--nonfinite.max_skipped_steps N)"
    ], err[-3000:]
    run_dir = tmp_path / "runs" / run.folder
    assert (run_dir / "metrics.csv").is_file() and not (run_dir / "hf_model").exists()


def test_export_refuses_nonfinite_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With the guard off, a step of NaN gradients makes Adam write NaN weights: nothing is exported."""
    module = _module(tiny_model_dir)
    export = HFExport()
    callbacks = [NonFiniteGuard(enabled=False), ScaleLogits(steps=[0]), export]
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=_datamodule(tmp_path, tiny_model_dir))
    assert not all(torch.isfinite(p).all() for p in module.policy.parameters())
    refusals = [str(w.message) for w in caught if str(w.message).startswith("not exporting")]
    assert len(refusals) == 1 and "weight tensors of the policy are not finite" in refusals[0]
    assert not (tmp_path / "hf_model").exists() and export.export_dir is None
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".hf_model")]
