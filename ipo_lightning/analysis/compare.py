"""``python -m ipo_lightning compare --config configs/compare/X.yaml``: several methods, one budget.

A compare file names the fit config(s) every member shares and, per member, the options that make
it different (loss type, beta, label noise...). Members run one after another with the normal
``fit``, into ``<runs_dir>/<name>/<member>/version_N``; then ``report`` writes the comparison. Every
member is checked (``fit --print_config``) before the first one trains, so a typo fails in seconds.
``--print_commands`` prints the fit commands instead, e.g. to submit them as separate SLURM jobs.

Seed, training data and step budget are the same for every member by construction: a member may
not override them (``FIXED_OPTIONS``), so the members see the same pairs in the same order.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipo_lightning.analysis.report import write_report
from ipo_lightning.errors import ConfigError, UserInputError

FIXED_OPTIONS = (
    "seed_everything",
    "data.seed",
    "data.train",
    "data.val",
    "data.val_fraction",
    "data.batch_size",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
    "trainer.default_root_dir",
)
"""Options (and everything under them) that members must share: same data, order and budget."""

FILE_KEYS = {"name", "fit_config", "runs_dir", "options", "members", "report_dir"}


@dataclass
class CompareSpec:
    """A compare file, validated.

    Args:
        name: the comparison's name; runs go to ``<runs_dir>/<name>/<member>/``.
        fit_config: fit config file(s) every member starts from, applied in order.
        members: member name -> options (dotted CLI names, e.g. ``model.beta: 0.5``).
        runs_dir: parent folder of the runs.
        options: options every member gets (after ``fit_config``, before its own).
        report_dir: where the report goes; default ``<runs_dir>/<name>/report``.
    """

    name: str
    fit_config: list[Path]
    members: dict[str, dict[str, Any]]
    runs_dir: Path = Path("runs/compare")
    options: dict[str, Any] = field(default_factory=dict)
    report_dir: Path | None = None

    def member_dir(self, member: str) -> Path:
        """Root folder of ``member``'s runs."""
        return self.runs_dir / self.name / member

    def fit_command(self, member: str) -> list[str]:
        """The ``python -m ipo_lightning fit`` command line of ``member``."""
        command = [sys.executable, "-m", "ipo_lightning", "fit"]
        for config in self.fit_config:
            command += ["--config", str(config)]
        for key, value in {**self.options, **self.members[member]}.items():
            command += [f"--{key}", _cli_value(value)]
        return command + ["--trainer.default_root_dir", str(self.member_dir(member))]


def _cli_value(value: Any) -> str:
    """A YAML value as one command-line argument (jsonargparse parses it back)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers, true/false/null, lists and dicts


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a compare file; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compare: no such file {str(path)!r}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {sorted(FILE_KEYS)}")
    unknown = sorted(set(raw) - FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected {sorted(FILE_KEYS)}")
    for key in ("name", "fit_config", "members"):
        if not raw.get(key):
            raise ConfigError(f"{path}: '{key}' is required")
    members = raw["members"]
    if not isinstance(members, dict) or not all(isinstance(o, dict | None) for o in members.values()):
        raise ConfigError(f"{path}: 'members' maps each member name to its options")
    for member, options in members.items():
        for key in options or {}:
            if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_OPTIONS):
                raise ConfigError(
                    f"{path}: member {member!r} sets {key!r}, which all members must share (same seed, "
                    "data and budget); set it in fit_config or options"
                )
    configs = raw["fit_config"] if isinstance(raw["fit_config"], list) else [raw["fit_config"]]
    for config in configs:
        if not Path(config).is_file():
            raise ConfigError(f"{path}: fit_config {config!r}: no such file")
    report_dir = raw.get("report_dir")
    return CompareSpec(
        name=str(raw["name"]),
        fit_config=[Path(config) for config in configs],
        members={str(member): dict(options or {}) for member, options in members.items()},
        runs_dir=Path(raw.get("runs_dir", "runs/compare")),
        options=dict(raw.get("options") or {}),
        report_dir=Path(report_dir) if report_dir else None,
    )


def check_members(spec: CompareSpec) -> None:
    """Parse every member's full config (``fit --print_config``) before anything trains."""
    for member in spec.members:
        result = subprocess.run(
            [*spec.fit_command(member), "--print_config"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise ConfigError(f"compare member {member!r}: {lines[-1] if lines else 'invalid options'}")


def latest_run(folder: Path) -> Path:
    """The newest run folder (one holding ``metrics.csv``) under ``folder``.

    Usually ``version_N``; under SLURM or with ``--run.name`` the folder has another name.
    """
    children = folder.iterdir() if folder.is_dir() else []
    runs = [child for child in children if (child / "metrics.csv").is_file()]
    if not runs:
        raise UserInputError(f"{folder}: no run folder with a metrics.csv")
    return max(runs, key=lambda child: (child / "metrics.csv").stat().st_mtime)


def run_compare(spec: CompareSpec) -> Path:
    """Check, then fit every member in turn, then write the report; returns the report path."""
    check_members(spec)
    for index, member in enumerate(spec.members, start=1):
        print(f"compare {spec.name}: member {index}/{len(spec.members)}: {member}", flush=True)
        result = subprocess.run(spec.fit_command(member), check=False)
        if result.returncode != 0:
            raise UserInputError(f"compare member {member!r}: fit failed (exit code {result.returncode})")
    runs = [latest_run(spec.member_dir(member)) for member in spec.members]
    report_dir = spec.report_dir or spec.runs_dir / spec.name / "report"
    return write_report(runs, report_dir, title=f"Comparison: {spec.name}")


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning compare --config FILE [--print_commands]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning compare",
        description="Train several methods on the same data, seed and budget, then write a report.",
    )
    parser.add_argument("--config", required=True, type=Path, help="compare file (see configs/compare/)")
    parser.add_argument(
        "--print_commands", action="store_true", help="print each member's fit command and exit"
    )
    options = parser.parse_args(args)
    spec = load_spec(options.config)
    if options.print_commands:
        for member in spec.members:
            print(shlex.join(spec.fit_command(member)))
        return
    print(f"wrote {run_compare(spec)}")
