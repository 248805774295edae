"""The monitors' shared measurement schedule, hooked into real fits (gradient accumulation, validation,
resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from ipo_lightning.callbacks.schedule import MeasurementSchedule


class Recorder(Callback):
    """Records each (hook, optimizer step) at which the schedule calls for a measurement."""

    def __init__(self, schedule: MeasurementSchedule) -> None:
        self.schedule = schedule
        self.measured: list[tuple[str, int]] = []
        self.batch_ends: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_train_start(trainer):
            self.measured.append(("start", trainer.global_step))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batch_ends.append(trainer.global_step)
        if self.schedule.at_train_batch_end(trainer):
            self.measured.append(("batch", trainer.global_step))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_validation_end(trainer):
            self.measured.append(("validation", trainer.global_step))


def _fit(root: Path, schedule: MeasurementSchedule, max_steps: int, ckpt_path: str | None = None) -> Recorder:
    recorder = Recorder(schedule)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=2,
        val_check_interval=8,  # micro-batches: a validation after every 4th optimizer step
        limit_val_batches=1,
        num_sanity_val_steps=1,  # a sanity check runs, and must not count
        logger=False,
        callbacks=[recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    trainer.validate(BoringModel(), verbose=False)  # not a fit: no measurement
    return recorder


@pytest.mark.parametrize(
    ("every_n_steps", "on_validation", "expected"),
    [
        (
            3,
            True,
            [("start", 0), ("batch", 3), ("validation", 4), ("batch", 6), ("validation", 8), ("batch", 9)],
        ),
        # A validation at a step already measured after its batch: once per step.
        (4, True, [("start", 0), ("batch", 4), ("batch", 8)]),
        (0, True, [("start", 0), ("validation", 4), ("validation", 8)]),
        (3, False, [("start", 0), ("batch", 3), ("batch", 6), ("batch", 9)]),
    ],
)
def test_schedule_measures_once_per_optimizer_step_under_gradient_accumulation(
    tmp_path: Path, every_n_steps: int, on_validation: bool, expected: list[tuple[str, int]]
) -> None:
    recorder = _fit(tmp_path, MeasurementSchedule(every_n_steps, on_validation), max_steps=9)
    # Two micro-batches per optimizer step: the one that completes step N and the next one both see N.
    assert recorder.batch_ends == [0, *(step for step in range(1, 9) for _ in range(2)), 9]
    assert recorder.measured == expected


def test_a_resumed_fit_does_not_measure_step_zero_again(tmp_path: Path) -> None:
    _fit(tmp_path, MeasurementSchedule(3), max_steps=4)
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed = _fit(tmp_path / "again", MeasurementSchedule(3), max_steps=7, ckpt_path=str(checkpoint))
    assert resumed.measured == [("batch", 6)]


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be >= 0, got -1"):
        MeasurementSchedule(-1)
