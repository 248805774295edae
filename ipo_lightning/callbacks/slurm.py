"""SLURM auto-requeue at a step boundary: checkpoint, ``scontrol requeue``, exit; the next launch resumes.

Lightning's own SLURM handler saves the checkpoint inside the signal handler, i.e. wherever the main
thread happens to be, possibly in the middle of a collective (a gradient all-reduce, a metric sync):
the checkpoint's own barrier then pairs with the wrong collective on the other ranks and the job hangs
or corrupts state at save. Here the signal handler only raises a flag; after the next optimizer step
all ranks agree on the flag (one tiny all-reduce per step, only in SLURM jobs) and save the checkpoint
together, at the end of that step's batch, as ``ModelCheckpoint`` saves. The rest of that batch still
runs: Lightning logs the step's ``train/*`` row and runs a validation (and the measurements after it)
that is due at that step, and a resume from the checkpoint does neither again, so exiting earlier
would lose them. At the start of the next batch rank 0 requeues the job and every rank exits; a run
whose last step it was ends normally instead (nothing left to requeue for). The checkpoint is
Lightning's ``hpc_ckpt_<N>.ckpt`` in the run folder, which the requeued job (same job id, same run
folder) finds.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ipo_lightning.resume import HPC_CHECKPOINT_GLOB
from ipo_lightning.run_folder import slurm_job_id

REQUEUE_EXIT_CODE = 3
"""Exit status of a process that stopped for a requeue (0 is a finished run, 2 a user error)."""


class SlurmRequeue(Callback):
    """On the requeue signal, checkpoint at the next optimizer step, requeue the SLURM job and exit.

    Active only in a SLURM batch job (Lightning's ``SLURMEnvironment.detect()``), during ``fit``.
    Pair it with ``#SBATCH --signal=SIGUSR1@300`` (see ``scripts/slurm/``): SLURM sends the signal 5
    minutes before the time limit, leaving time for the step in flight, the checkpoint and a
    validation due at that step (with its measurements); the requeue waits for them, since
    ``scontrol requeue`` ends the running job.

    Args:
        auto_requeue: requeue the job on the signal (off: the signal is left to other handlers).
        requeue_signal: the signal that asks for a requeue (``--signal`` in the sbatch script).
    """

    def __init__(self, auto_requeue: bool = True, requeue_signal: Literal["SIGUSR1", "SIGUSR2"] = "SIGUSR1"):
        super().__init__()
        self.auto_requeue = auto_requeue
        self.requeue_signal = requeue_signal
        self.requested = False
        self.checkpoint_path: Path | None = None
        self._previous_handler: Any = None
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: nothing here may block or talk to other ranks (see the module docstring).
        self.requested = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.auto_requeue or not SLURMEnvironment.detect():
            return
        signum = getattr(signal, self.requeue_signal)
        self._previous_handler = signal.signal(signum, self._handle)
        self._active = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(getattr(signal, self.requeue_signal), self._previous_handler)
            self._active = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Mid-accumulation the summed gradients are in no checkpoint: wait for the optimizer step.
        if not self._active or self.checkpoint_path is not None or trainer.fit_loop._should_accumulate():
            return
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        folder = Path(trainer.default_root_dir)
        numbers = [int(p.stem.rsplit("_", 1)[1]) for p in folder.glob(HPC_CHECKPOINT_GLOB)]
        path = trainer.strategy.broadcast(str(folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"))
        trainer.save_checkpoint(path)  # every rank: sharded strategies gather or write their part
        self.checkpoint_path = Path(path)
        rank_zero_info(f"Requeue signal: checkpoint saved to {path}; the requeued job resumes from it.")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # The saving batch has logged its row and run its due validation (module docstring).
        if self._active and self.checkpoint_path is not None:
            if trainer.is_global_zero:
                requeue_job()
            raise SystemExit(REQUEUE_EXIT_CODE)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active and self.checkpoint_path is not None:
            rank_zero_info("Requeue signal in the last step: the run is complete, the job is not requeued.")


def requeue_job() -> bool:
    """``scontrol requeue <job id>``; True on success (a failure is a warning: the checkpoint is saved)."""
    job_id = slurm_job_id()
    if job_id is None or not re.fullmatch(r"[0-9_]+", job_id):
        rank_zero_warn(f"cannot requeue: SLURM job id {job_id!r} is missing or malformed")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(f"scontrol requeue {job_id} failed: {error}")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"Requeued SLURM job {job_id} (pid {os.getpid()}).")
    return True
