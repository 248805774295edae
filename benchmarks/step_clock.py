"""Step clocks for the throughput benchmark: a Lightning callback and a ``transformers`` TrainerCallback.

Both mark the end of every optimizer step (wall and process CPU time; on a CUDA device after
synchronising it, so the mark follows the step's kernels) and, when training ends, write the marks,
the process's peak resident memory and, on a CUDA device, its name and peak CUDA memory to a JSON
file. The benchmark adds the Lightning one to ``python -m ipo_lightning fit`` as a user adds any
callback (``trainer.callbacks`` in the config), and the TRL one to ``DPOTrainer(callbacks=[...])``:
neither changes what runs.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import TrainerCallback


class StepClock:
    """The end time of every optimizer step, written to ``out`` as JSON when training ends.

    Args:
        out: file to write ``{"marks": [[wall, cpu], ...], "peak_rss_mb": ...}`` to.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        """One optimizer step has ended (its batch fetched, collated, forward, backward, step)."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # kernels run asynchronously: the step ends when they have
        self.marks.append((time.perf_counter(), time.process_time()))

    def write(self) -> None:
        """Write the marks and the peak RSS of this process so far (Linux ``ru_maxrss`` is KiB)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out: dict[str, Any] = {"marks": self.marks, "peak_rss_mb": peak}
        if torch.cuda.is_initialized():
            out["device"] = torch.cuda.get_device_name()
            out["peak_cuda_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        Path(self.out).write_text(json.dumps(out))


class LightningStepClock(L.Callback):
    """:class:`StepClock` as a Lightning callback (``trainer.callbacks`` of the CLI config)."""

    def __init__(self, out: str) -> None:
        self.clock = StepClock(out)

    def on_train_batch_end(self, *args: Any) -> None:
        self.clock.mark()

    def on_train_end(self, *args: Any) -> None:
        self.clock.write()


class TrainerStepClock(TrainerCallback):
    """:class:`StepClock` as a ``transformers`` callback (TRL's trainers take these)."""

    def __init__(self, out: str) -> None:
        self.clock = StepClock(out)

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.clock.mark()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.clock.write()
