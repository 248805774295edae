"""``perf/step_time`` and ``perf/peak_memory_gb``: logged on the ``log_every_n_steps`` schedule, the step
time free of the measurements that run after a step, the peak memory at least the resident set size,
and the CLI putting the timer first in every fit."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from ipo_lightning.callbacks import DivergenceMonitor, GenerationEval
from ipo_lightning.callbacks.performance import PEAK_MEMORY, STEP_TIME, StepPerformance
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, write_jsonl

SLEEP = 0.5
"""Seconds every call of :func:`slow_reward` sleeps."""
CALLS: list[float] = []


def slow_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that sleeps ``SLEEP`` seconds per call (and counts its calls), scoring lengths."""
    CALLS.append(SLEEP)
    time.sleep(SLEEP)
    return [float(len(completion)) for completion in completions]


def _vm_rss_gib() -> float:
    """The resident set size of this process now, from ``/proc/self/status`` (``VmRSS``, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 2**30
    raise AssertionError("no VmRSS line in /proc/self/status")


class RssAtStepEnd(Callback):
    """Records the resident set size at the end of each optimizer step, before the timer reads memory."""

    def __init__(self) -> None:
        self.rss: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # The first batch end at a step count is that of the step's last micro-batch.
        self.rss.setdefault(trainer.global_step, _vm_rss_gib())


def _rows(log_dir: str, name: str) -> list[tuple[int, float]]:
    with (Path(log_dir) / "metrics.csv").open() as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle) if row.get(name)]


@pytest.mark.slow  # sleeps on purpose
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc")
def test_step_time_leaves_out_the_measurements_and_peak_memory_covers_the_rss(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    datamodule = _datamodule(tmp_path, tiny_model_dir)
    module = PreferenceModule(str(tiny_model_dir))
    logger = CSVLogger(tmp_path / "logs", name="")
    rss = RssAtStepEnd()
    # Measurements after every optimizer step, each with a reward that sleeps.
    evaluation = GenerationEval(
        reward="tests.test_performance:slow_reward", prompts=1, samples_per_prompt=1, greedy=False,
        max_new_tokens=4, every_n_steps=1,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        val_check_interval=4,
        logger=logger,
        callbacks=[rss, StepPerformance(), DivergenceMonitor(every_n_steps=1, num_pairs=2), evaluation],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    CALLS.clear()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    wall = time.perf_counter() - start

    step_times = _rows(logger.log_dir, STEP_TIME)
    peaks = _rows(logger.log_dir, PEAK_MEMORY)
    # Every log_every_n_steps=2 optimizer steps (of 2 micro-batches each), rows where train/loss is.
    assert [step for step, _ in step_times] == [step for step, _ in _rows(logger.log_dir, "train/loss")]
    assert len(step_times) == 2 == len(peaks)
    assert all(value > 0 for _, value in step_times)
    # Each row is the mean of the 2 steps since the previous one; the steps and the reward's sleeps
    # (measurements after every step) all fit in the fit's wall time only if no step counted a sleep.
    assert len(CALLS) >= 5  # the start-up probe, the reference once, the policy at steps 0..4
    assert 2 * sum(value for _, value in step_times) + sum(CALLS) < wall
    assert max(value for _, value in step_times) < SLEEP
    # The peak logged after optimizer steps 2 and 4 is at least the resident set read just before it.
    assert [step for step, _ in peaks] == [step for step, _ in step_times]
    for optimizer_step, (_, peak) in zip((2, 4), peaks, strict=True):
        assert rss.rss[optimizer_step] <= peak < 1024


def _datamodule(tmp_path: Path, model_dir: Path, **options: Any) -> PreferenceDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(24))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=30))
    return PreferenceDataModule(
        train=DataSource(path=str(train)),
        val={"a": DataSource(path=str(val))},
        tokenizer_name_or_path=str(model_dir),
        max_length=64,
        max_prompt_length=32,
        batch_size=2,
        **options,
    )


def test_a_fit_logs_step_time_and_peak_memory_every_log_interval(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    logger = CSVLogger(tmp_path / "logs", name="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[StepPerformance()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(PreferenceModule(str(tiny_model_dir)), datamodule=_datamodule(tmp_path, tiny_model_dir))
    wall = time.perf_counter() - start
    step_times = _rows(logger.log_dir, STEP_TIME)
    assert (
        [step for step, _ in step_times]
        == [0, 1, 2]
        == [step for step, _ in _rows(logger.log_dir, PEAK_MEMORY)]
    )
    assert all(value > 0 for _, value in step_times) and sum(value for _, value in step_times) < wall
    assert all(0 < peak < 1024 for _, peak in _rows(logger.log_dir, PEAK_MEMORY))


def test_peak_memory_on_cuda_keeps_the_peak_after_a_free() -> None:
    from ipo_lightning.callbacks.performance import peak_memory_gb

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    block = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    assert peak_memory_gb(device) >= 0.25
    del block
    torch.cuda.synchronize(device)
    assert torch.cuda.memory_allocated(device) < 2**28 and peak_memory_gb(device) >= 0.25  # the peak, not now


def test_the_cli_puts_the_timer_first_in_every_fit(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ipo_lightning.callbacks.nonfinite import NonFiniteGuard
    from ipo_lightning.cli import PreferenceCLI

    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    args = ["--model.model_name_or_path", str(tiny_model_dir), "--data.train.path", str(train)]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs")]
    args += ["--generation.reward", "tests.test_generation_eval:distinct_tokens"]
    cli = PreferenceCLI(args=args, run=False)
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert kinds[:2] == [StepPerformance, NonFiniteGuard] and kinds.count(StepPerformance) == 1
    assert DivergenceMonitor in kinds and GenerationEval in kinds  # both measure after the timer
