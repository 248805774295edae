"""``metrics.csv`` that a resumed run continues instead of starting over.

Lightning's ``CSVLogger`` deletes a run folder's ``metrics.csv`` when it opens the folder, so resuming a
run (a requeued job, a rerun after a crash) would keep only the rows logged after the resume. Here:

- :class:`MetricsHistory` (a callback) records, for each checkpointed step, how many rows ``metrics.csv``
  held when training moved past that checkpoint's state: at the next batch start (or the end of
  training), the rows flushed to disk first. The batch that a checkpoint is saved in still logs its
  training metrics and runs a due validation after the save, and a resume does not redo them, so
  these rows belong to the history. The counts go to ``metrics_resume_points.txt`` in the run
  folder; a checkpoint also carries the count at its own save, for a run killed before the next batch;
- on resume from a checkpoint inside the run folder, :class:`HistoryCSVLogger` keeps exactly those rows
  and appends the resumed run's rows after them. Rows the earlier attempt logged later are dropped:
  the resumed run logs those steps again, so no step appears twice;
- a run that does not resume (no checkpoint, ``run.resume false``, a checkpoint from elsewhere)
  starts a new file, as Lightning does.

The header stays the union of all columns. When new columns appear, the whole file is rewritten
(as in Lightning), here through a temporary file and ``os.replace``, so a kill mid-rewrite leaves the
previous file whole.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

RESUME_POINTS_FILE = "metrics_resume_points.txt"
"""Lines ``<global step> <rows>``: rows of metrics.csv that a resume from that step's checkpoint keeps."""


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV experiment writer that decides at its first write what to keep of the old file."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.keep_rows: int | None = None  # rows of the existing file to continue after; None: start over
        self.rows_written = 0
        self._started = False

    def _check_log_dir_exists(self) -> None:
        """Nothing is removed when the folder is opened (Lightning deletes metrics.csv here)."""

    def save(self) -> None:
        """Write the pending rows: the first write replaces the file with the kept history plus them."""
        if not self.metrics and (self._started or self.keep_rows is None):
            return
        if not self._started:
            header, history = self._read() if self.keep_rows else ([], [])
            history = history[: self.keep_rows or 0]
            self.metrics_keys = sorted(set(header).union(*history, *self.metrics))
            self._write_all(history + self.metrics)
            self._forget_resume_points_beyond(len(history))
            self.rows_written = len(history) + len(self.metrics)
            self._started = True
        elif set().union(*self.metrics) - set(self.metrics_keys):
            _, rows = self._read()
            self.metrics_keys = sorted(set(self.metrics_keys).union(*self.metrics))
            self._write_all(rows + self.metrics)
            self.rows_written += len(self.metrics)
        else:
            with open(self.metrics_file_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self.metrics_keys).writerows(self.metrics)
            self.rows_written += len(self.metrics)
        self.metrics = []

    def _forget_resume_points_beyond(self, rows: int) -> None:
        """Drop resume points that count rows no longer in the file (the earlier attempt's later ones)."""
        path = Path(self.log_dir) / RESUME_POINTS_FILE
        if not path.is_file():
            return
        points = [(step, count) for step, count in read_resume_points(path) if count <= rows]
        path.write_text("".join(f"{step} {count}\n" for step, count in points))

    def _read(self) -> tuple[list[str], list[dict[str, Any]]]:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return [], []
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        path = Path(self.metrics_file_path)
        staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with staging.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(staging, path)


def read_resume_points(path: Path) -> list[tuple[int, int]]:
    """The ``(global step, rows)`` lines of a resume points file, oldest first ([] if there is none)."""
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and all(field.isdigit() for field in fields):  # a torn last line is skipped
            points.append((int(fields[0]), int(fields[1])))
    return points


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` a resumed run continues (module docstring); rank 0 writes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        """The writer of ``metrics.csv`` and ``hparams.yaml`` (created on first use, rank 0 only)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def rows_logged(self) -> int:
        """Rows of ``metrics.csv`` so far, written or pending (0 on ranks other than 0)."""
        writer = self._experiment
        return 0 if writer is None else writer.rows_written + len(writer.metrics)

    def continue_history(self, rows: int) -> None:
        """Keep the first ``rows`` rows of the existing ``metrics.csv``; must precede the first write."""
        writer = self._experiment
        if writer is not None:
            writer.keep_rows = rows

    def mark_resume_point(self, step: int) -> None:
        """Flush, then record that a resume from step ``step``'s checkpoint keeps every row so far."""
        writer = self._experiment
        if writer is None:
            return
        self.save()
        with (Path(self.log_dir) / RESUME_POINTS_FILE).open("a") as handle:
            handle.write(f"{step} {writer.rows_written}\n")

    def resume_point(self, step: int) -> int | None:
        """The rows recorded for step ``step`` (the latest record), or None."""
        points = read_resume_points(Path(self.log_dir) / RESUME_POINTS_FILE)
        return next((rows for point, rows in reversed(points) if point == step), None)


class MetricsHistory(Callback):
    """Record where each checkpoint's history ends; on resume, tell the logger to continue it there.

    Only a checkpoint inside the run folder continues the folder's history: one from another run
    (``ckpt_path`` pointing elsewhere) starts a new file.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._saved_step: int | None = None  # step of a checkpoint saved since the last resume point

    @property
    def state_key(self) -> str:
        return "MetricsHistory"

    def _logger(self) -> HistoryCSVLogger | None:
        loggers = self._trainer.loggers if self._trainer is not None else []
        return next((logger for logger in loggers if isinstance(logger, HistoryCSVLogger)), None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def _mark(self) -> None:
        logger = self._logger()
        if self._saved_step is not None and logger is not None:
            logger.mark_resume_point(self._saved_step)
        self._saved_step = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._mark()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, error: BaseException) -> None:
        # A stop raised at a batch start (the SLURM requeue's exit) may come before this callback's own
        # on_train_batch_start: the saving batch is over, so its rows belong to the history all the same.
        self._mark()

    def state_dict(self) -> dict[str, Any]:
        # Called only while a checkpoint is being written. Flushed first: the rows the checkpoint counts
        # are on disk before it is (a kill right after it finds them), and a resumed run's first write
        # (which puts the kept history back) has happened, so the count includes that history.
        logger = self._logger()
        if logger is not None:
            logger.save()
        step = self._trainer.global_step if self._trainer is not None else 0
        return {"global_step": step, "metrics_rows": logger.rows_logged if logger is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        logger = self._logger()
        if logger is None or self._trainer is None or self._trainer.ckpt_path is None:
            return
        run_dir = Path(logger.log_dir).resolve()
        if run_dir not in Path(self._trainer.ckpt_path).resolve().parents:
            return
        at_save = int(state_dict["metrics_rows"])
        point = logger.resume_point(int(state_dict["global_step"]))
        logger.continue_history(at_save if point is None else max(point, at_save))
