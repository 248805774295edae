"""Reading finished (or running) runs back: the metrics and the resolved config of a run folder.

A run folder is what ``fit`` writes (``runs/<name>/version_N/``): ``metrics.csv`` from the CSV logger,
one row per logging call, and ``config.yaml`` with the resolved configuration. Plots and reports are
built from these files only, so they need no W&B account and work on copies of run folders.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipo_lightning.errors import UserInputError

VAL_PREFIX = "val/"
"""Names of the validation metrics (one row per validation, per set)."""


@dataclass
class RunMetrics:
    """The logged metrics and resolved config of one run folder."""

    run_dir: Path
    rows: list[dict[str, str]]
    """``metrics.csv`` rows as read: column name -> value, empty where a row did not log a column."""
    config: dict[str, Any] = field(default_factory=dict)
    """``config.yaml`` of the run (empty when the folder has none)."""

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of metric ``name``, in logging order (empty lists if never logged).

        A ``val/`` metric's step is the optimizer steps taken at its validation
        (:meth:`validation_steps`), so it lines up with the ``gen/`` and ``divergence/`` values of that
        validation in every folder layout; other metrics keep the step of their row.
        """
        steps: list[int] = []
        values: list[float] = []
        for row in self.rows:
            value = row.get(name)
            if value not in (None, ""):
                steps.append(int(row["step"]))
                values.append(float(value))
        if name.startswith(VAL_PREFIX):
            taken = self.validation_steps()
            steps = [taken[step] for step in steps]
        return steps, values

    def by_step(self, name: str) -> dict[int, float]:
        """Step -> value of metric ``name``; a step logged more than once keeps its last value."""
        return dict(zip(*self.series(name), strict=True))

    def validation_steps(self) -> dict[int, int]:
        """Step of each ``val/`` row -> the optimizer steps taken at that validation.

        Equal for run folders of this version, whose validation rows share the step of the generation
        evaluation's and divergence monitor's rows of the same validation; one more for earlier ones,
        where Lightning stepped them one less. Told apart row by row, by those measurements (which
        follow every validation by default), so a folder an earlier version started and this one
        resumed reads right in both parts: a val step that is a measured step is of this version, one
        whose next step is measured (and itself is not) is of an earlier one. A row with neither
        takes the layout most rows of the run show (this version's when none tells).
        """
        val_steps = sorted({int(row["step"]) for row in self.rows if logs_prefix(row, VAL_PREFIX)})
        measured = {int(row["step"]) for row in self.rows if logs_prefix(row, ("gen/", "divergence/"))}
        told = {step: 0 if step in measured else 1 for step in val_steps if {step, step + 1} & measured}
        earlier = sum(told.values())
        default = 1 if earlier > len(told) - earlier else 0
        return {step: step + told.get(step, default) for step in val_steps}

    def last(self, name: str) -> float:
        """The last logged value of ``name`` (NaN if it was never logged)."""
        _, values = self.series(name)
        return values[-1] if values else math.nan

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by dotted path, e.g. ``model.loss_type``."""
        node: Any = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node


def logs_prefix(row: dict[str, str], prefix: str | tuple[str, ...]) -> bool:
    """Whether ``row`` holds a value of a column starting with ``prefix``."""
    return bool(row.get("step")) and any(value and name.startswith(prefix) for name, value in row.items())


def load_run(run_dir: str | Path) -> RunMetrics:
    """Read ``metrics.csv`` (required) and ``config.yaml`` (optional) of a run folder."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.csv"
    if not metrics_file.is_file():
        raise UserInputError(f"{run_dir}: no metrics.csv here; pass a run folder such as runs/x/version_0")
    with metrics_file.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    config_file = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except yaml.YAMLError as error:
        reason = str(error).strip().splitlines()[0]
        raise UserInputError(f"{config_file}: not valid YAML ({reason})") from None
    if config is not None and not isinstance(config, dict):
        raise UserInputError(f"{config_file}: not a mapping of settings (it holds a {type(config).__name__})")
    return RunMetrics(run_dir=run_dir, rows=rows, config=config or {})
