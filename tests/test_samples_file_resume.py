"""The monitors' samples files on resume: cut back to the checkpoint's step, so each step appears once
and the rows equal those of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ipo_lightning.callbacks import DivergenceMonitor, GenerationEval
from ipo_lightning.callbacks.samples_file import keep_rows_up_to
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from ipo_lightning.resume import RNGStateCheckpoint
from tests.helpers import polite_pairs, write_jsonl

REWARD = "tests.test_samples_file_resume:distinct_characters"
FILES = ("divergence_samples.jsonl", "generation_samples.jsonl")
STEPS = 6  # 12 pairs in batches of 2, one epoch


def distinct_characters(prompts: list[str], completions: list[str]) -> list[float]:
    """A tiny reward: the number of distinct characters of the completion."""
    return [float(len(set(completion))) for completion in completions]


class StopAtStep(Callback):
    """End fit cleanly after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(
    tiny_model_dir: Path, data: Path, root: Path, *, stop_at: int | None, ckpt_path: Path | None
) -> None:
    L.seed_everything(0)
    module = PreferenceModule(
        str(tiny_model_dir),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        lr_schedule="constant",
    )
    datamodule = PreferenceDataModule(
        train=DataSource(path=str(data / "train.jsonl")),
        val={"heldout": DataSource(path=str(data / "val.jsonl"))},
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
    )
    callbacks: list[Callback] = [
        DivergenceMonitor(every_n_steps=2, num_pairs=2, sample_prompts=2, max_new_tokens=6),
        GenerationEval(reward=REWARD, prompts=2, samples_per_prompt=2, greedy=False, max_new_tokens=6),
        ModelCheckpoint(
            dirpath=root / "checkpoints", every_n_train_steps=3, save_top_k=-1, filename="{step}"
        ),
        RNGStateCheckpoint(),
    ]
    if stop_at is not None:
        callbacks.append(StopAtStep(stop_at))
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_epochs=1,
        val_check_interval=3,  # validations at steps 3 and 6: measured after the step-3 checkpoint's save
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _steps(rows: list[dict]) -> list[int]:
    return sorted({row["step"] for row in rows})


@pytest.mark.slow
def test_resumed_run_samples_files_hold_each_step_once_as_an_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", polite_pairs(2 * STEPS))
    write_jsonl(data / "val.jsonl", polite_pairs(4, offset=40))
    _fit(tiny_model_dir, data, tmp_path / "straight", stop_at=None, ckpt_path=None)
    straight = {name: _rows(tmp_path / "straight" / name) for name in FILES}
    for rows in straight.values():
        assert _steps(rows) == [0, 2, 3, 4, 6]

    root = tmp_path / "stopped"
    _fit(tiny_model_dir, data, root, stop_at=5, ckpt_path=None)
    for name in FILES:  # the attempt went on past its last checkpoint (step 3): step 4, and 5 (its last
        assert _steps(_rows(root / name)) == [0, 2, 3, 4, 5]  # validation, when it stopped)
    _fit(tiny_model_dir, data, root, stop_at=None, ckpt_path=root / "checkpoints" / "step=3.ckpt")

    for name in FILES:
        rows = _rows(root / name)
        assert rows == straight[name], name  # each step once, in order, every value the same
    assert not list(root.glob(".*.partial"))  # the cut's temporary file was renamed away


def test_keep_rows_up_to_drops_later_steps_and_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    rows = [{"step": 0, "text": "zero"}, {"step": 2, "text": "två"}, {"step": 4, "text": "four"}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) + '{"step": 6, "te')
    keep_rows_up_to(path, 2)
    assert _rows(path) == rows[:2]
    keep_rows_up_to(path, None)  # a fit that does not resume starts over
    assert path.read_text() == ""
    keep_rows_up_to(tmp_path / "missing.jsonl", 3)  # no file: nothing created
    assert not (tmp_path / "missing.jsonl").exists()
