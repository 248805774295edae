"""Training speed and memory: ``perf/step_time`` and ``perf/peak_memory_gb``.

- ``perf/step_time``: mean wall seconds per optimizer step since the previous log, the sum of the
  step's micro-batches from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
  optimizer; for on-policy methods the in-step generation too). Data loading between batches,
  validation, and the measurements that run in later ``on_train_batch_end`` hooks (divergence
  monitor, generation evaluation) fall outside, as long as this callback comes first in the
  trainer's list (the CLI puts it there). On CUDA the device is synchronized before each clock read,
  so the time is that of the work, not of queueing it.
- ``perf/peak_memory_gb``: the process's peak memory so far in GiB: ``torch.cuda.max_memory_allocated``
  on CUDA, else the peak resident set size: ``VmHWM`` of ``/proc/self/status`` on Linux (exact; the
  kernel's ``ru_maxrss`` reads approximate per-CPU counters and can lag the current ``VmRSS``), else
  ``getrusage(RUSAGE_SELF).ru_maxrss``.

Both are logged through ``LightningModule.log`` at the optimizer steps that are multiples of
``trainer.log_every_n_steps``, where the trainer writes its other ``train/`` values, so they land in
``metrics.csv`` and W&B; each process logs its own numbers and rank 0's are written.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ipo_lightning.perf_metrics import PEAK_MEMORY, STEP_TIME

_GIB = 2**30


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far in GiB: allocated CUDA memory on a CUDA ``device``, else the
    peak resident set size (``VmHWM`` where ``/proc`` has it, else ``ru_maxrss``: KiB on Linux, bytes
    on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _GIB
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):  # "VmHWM:   123456 kB"
                return int(line.split()[1]) * 1024 / _GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _GIB if sys.platform == "darwin" else peak * 1024 / _GIB


class StepPerformance(Callback):
    """Log the mean time per optimizer step and the peak memory (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._batch_start: float | None = None
        self._step_at_batch_start = 0
        self._open_step = 0.0
        """Seconds of the micro-batches of the optimizer step under way."""
        self._window: list[float] = []
        """Seconds of each optimizer step finished since the last log."""

    def _clock(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        self._batch_start = self._clock(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_start is None:
            return
        self._open_step += self._clock(pl_module) - self._batch_start
        self._batch_start = None
        # An optimizer step finished in this batch when the step count moved: the last micro-batch of
        # an accumulation (a step the grad scaler or the non-finite guard skips still moves it).
        if trainer.global_step == self._step_at_batch_start:
            return
        self._window.append(self._open_step)
        self._open_step = 0.0
        every = trainer.log_every_n_steps
        if every > 0 and trainer.global_step % every == 0:
            metrics = {
                STEP_TIME: sum(self._window) / len(self._window),
                PEAK_MEMORY: peak_memory_gb(pl_module.device),
            }
            self._window = []
            for name, value in metrics.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)
