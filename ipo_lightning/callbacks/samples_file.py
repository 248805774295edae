"""The monitors' JSONL samples files in the run folder, appended at each measurement and cut on resume.

``divergence_samples.jsonl`` and ``generation_samples.jsonl`` hold one JSON object per sample, each
with the optimizer ``step`` of its measurement. A resumed run measures again every step after its
checkpoint's, so at the start of training the file keeps only the run's history, as ``metrics.csv``
does (:mod:`ipo_lightning.metrics_history`):

- a fit that resumes from a checkpoint at step s keeps the rows of steps up to s (those measured
  after the checkpoint was saved, by the attempt that went on past it, are measured again);
- a fit that does not resume starts the file over.

So every step appears once. The cut writes a temporary file and renames it over the old one
(``os.replace``), so a kill mid-cut leaves the previous file whole; a torn last line (a kill
mid-append) goes too. Rank 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L


def run_folder(trainer: L.Trainer) -> Path:
    """The folder the samples files go to; every process must ask (``log_dir`` is a broadcast under DDP)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def keep_rows_up_to(path: Path, step: int | None) -> None:
    """Rewrite ``path`` with only its rows whose ``step`` is at most ``step`` (None: no rows).

    Lines that do not parse as a JSON object with an integer ``step`` (a torn last line) are dropped.
    Nothing is written when every row is kept; no file is created when there is none.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if step is not None and _step(line) is not None and _step(line) <= step]
    if kept == lines:
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    staging.write_text("".join(kept), encoding="utf-8")
    os.replace(staging, path)


def _step(line: str) -> int | None:
    if not line.endswith("\n"):
        return None  # an append that was cut short
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None


class SamplesFile:
    """One monitor's samples file (module docstring).

    Args:
        name: file name in the run folder; empty: no file.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, trainer: L.Trainer) -> None:
        """At train start (every process): keep the rows of the run's history, drop the rest."""
        folder = run_folder(trainer)
        if trainer.is_global_zero and self.name:
            resumed = trainer.ckpt_path is not None
            keep_rows_up_to(folder / self.name, trainer.global_step if resumed else None)

    def append(self, trainer: L.Trainer, rows: Sequence[dict[str, Any]]) -> None:
        """Append one measurement's rows (every process calls; rank 0 writes)."""
        folder = run_folder(trainer)
        if trainer.is_global_zero and self.name and rows:
            path = folder / self.name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
