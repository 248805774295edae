"""Checkpoint files written atomically: a checkpoint path holds either a whole checkpoint or nothing new.

Lightning's own writer serialises to memory first but then writes the file in place, so a process
killed mid-write (SIGKILL, a node failure, a full disk) leaves a truncated ``last.ckpt`` where the
previous intact one was. Here the bytes go to a temporary file in the same folder, are flushed to
disk (``fsync``), and replace the target with ``os.replace``, a single rename on the same file system;
the folder is synced too so the rename itself survives a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"
"""Ends the temporary name of a checkpoint being written (not ``.ckpt``: never taken for a checkpoint)."""


def _is_local(path: _PATH) -> bool:
    return get_filesystem(path).protocol in ("file", "local", ("file", "local"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a synced temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with staging.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes (module docstring).

    Every checkpoint the trainer saves (``ModelCheckpoint``'s ``last.ckpt`` and best ones, SLURM requeue
    checkpoints, ``trainer.save_checkpoint``) goes through it. Remote paths (``s3://`` and the like)
    keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (remote paths: Lightning's writer)."""
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
