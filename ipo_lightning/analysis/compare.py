"""``python -m ipo_lightning compare --config configs/compare/X.yaml``: several methods, one budget.

A compare file names the fit config(s) every member starts from (a member may name its own, so
members can be different methods) and, per member, the options that make it different (loss type,
beta, label noise...). Members run one after another with the normal
``fit``, into ``<runs_dir>/<name>/<member>/version_N``; then ``report`` writes the comparison. Every
member is checked (``fit --print_config``) before the first one trains, so a typo fails in seconds.
``--print_commands`` prints the fit commands instead, e.g. to submit them as separate SLURM jobs.
A ``study:`` runs every member at every point of declared axes (data size, label noise, seed
replicates; :mod:`~ipo_lightning.analysis.study`), as runs ``<member>-n250-noise0.2-seed1``.

Seed, training data, judging (``generation``) and step budget are the same for every member by
construction: a member may not override them (``FIXED_OPTIONS``), so the members see the same pairs
in the same order; only a study's axes change the options they set, and then for every member alike.
With a ``budget:`` (:mod:`~ipo_lightning.analysis.budget`) compare sets every run's
``trainer.max_steps`` itself, from a number of steps or of training samples, and the batch size may
differ between members (``BUDGET_FIXED_OPTIONS``); the prompts and the judging stay shared.
That is checked twice: on the compare file (dotted keys, keys nested under a parent such as
``trainer:``, and the keys of a member's own ``config:`` file), and on every member's resolved
config (``fit --print_config``), which no way of setting an option gets around. The report is
written into a temporary folder and renamed into place only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from ipo_lightning.analysis.budget import Budget, StepSize, check_budget, layered_config, step_size
from ipo_lightning.analysis.report import write_report
from ipo_lightning.analysis.study import PlannedRun, axis_options, check_study, plan_runs
from ipo_lightning.errors import ConfigError, UserInputError

SHARED_OPTIONS = (
    "seed_everything",
    "data.seed",
    "data.train",
    "data.val",
    "data.val_fraction",
    "data.train_size",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.default_root_dir",
    "generation",
)
"""What every member shares with or without a budget: seed, data, order, length and judging (with a
budget compare sets the steps itself and checks them against its plan)."""

FIXED_OPTIONS = (*SHARED_OPTIONS, "data.batch_size", "trainer.accumulate_grad_batches")
"""Options (and everything under them) that members must share without a budget: also the step size."""

BUDGET_FIXED_OPTIONS = SHARED_OPTIONS
"""With a ``budget:``: what members share. The steps come from the budget (checked against the plan)."""

PER_MEMBER_OPTIONS = ("trainer.default_root_dir",)
"""Fixed options that ``fit_command`` itself sets to each member's own folder."""
MAX_PARSE_WORKERS = 4
"""At most this many members' configs are parsed (``fit --print_config``) at once."""
MAX_STEPS = "trainer.max_steps"
MAX_EPOCHS = "trainer.max_epochs"
REWARD_OPTIONS = ("model.reward", "generation.reward")
"""Options that may name a reward model folder (checked to exist before anything trains)."""
MEMBER_FIT_CONFIG = "fit_config"
"""A member's own key for the fit config(s) it starts from instead of the compare-wide ones."""

FILE_KEYS = {"name", "fit_config", "runs_dir", "options", "members", "study", "report_dir", "budget"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A comparison or member name: one folder name, so its runs stay inside ``runs_dir``."""
DEFAULT_REPORT_FOLDER = "report"


@dataclass
class CompareSpec:
    """A compare file, validated.

    Args:
        name: the comparison's name; runs go to ``<runs_dir>/<name>/<member>/``.
        fit_config: fit config file(s) every member starts from, applied in order, unless it has its own.
        members: member name -> options (dotted CLI names, e.g. ``model.beta: 0.5``).
        runs_dir: parent folder of the runs.
        options: options every member gets (after ``fit_config``, before its own).
        report_dir: where the report goes; default ``<runs_dir>/<name>/report``.
        study: axis -> values (see :mod:`~ipo_lightning.analysis.study`); every member runs at every
            point. Empty: each member is one run.
        member_fit_config: member -> the fit config file(s) it starts from instead of ``fit_config``.
        budget: steps or samples every run gets (compare sets ``trainer.max_steps``); None: the
            members share ``trainer.max_steps`` and ``data.batch_size`` from their configs.
    """

    name: str
    fit_config: list[Path]
    members: dict[str, dict[str, Any]]
    runs_dir: Path = Path("runs/compare")
    options: dict[str, Any] = field(default_factory=dict)
    report_dir: Path | None = None
    study: dict[str, list[Any]] = field(default_factory=dict)
    member_fit_config: dict[str, list[Path]] = field(default_factory=dict)
    budget: Budget | None = None

    @property
    def runs(self) -> dict[str, PlannedRun]:
        """Run name -> run, in running order: each member, at each point of the study."""
        return {run.name: run for run in plan_runs(self.members, self.study)}

    def member_dir(self, run: str) -> Path:
        """Root folder of the run ``run``'s folders (``version_N``); without a study a run is a member."""
        return self.runs_dir / self.name / run

    def fit_configs(self, member: str) -> list[Path]:
        """The fit config files ``member`` starts from: its own, else the compare-wide ones."""
        return self.member_fit_config.get(member, self.fit_config)

    def step_size(self, member: str) -> StepSize:
        """What one optimizer step of ``member`` trains on, read from its files and options."""
        config = layered_config(self.fit_configs(member), self.options, self.members[member])
        return step_size(config, f"compare member {member!r}")

    def budget_options(self, member: str) -> dict[str, Any]:
        """The options the budget sets for ``member``'s runs (none without a budget)."""
        if self.budget is None:
            return {}
        # The steps decide, whatever epochs a member's config states.
        return {MAX_STEPS: self.budget.max_steps(self.step_size(member)), MAX_EPOCHS: -1}

    def fit_command(self, run: str) -> list[str]:
        """The ``python -m ipo_lightning fit`` command line of the run ``run``.

        The budget's and the study point's options come after the member's, so nothing a member sets
        can override them.
        """
        planned = self.runs[run]
        command = [sys.executable, "-m", "ipo_lightning", "fit"]
        for config in self.fit_configs(planned.member):
            command += ["--config", str(config)]
        options = {
            **self.options,
            **self.members[planned.member],
            **self.budget_options(planned.member),
            **planned.axis_options(),
        }
        for key, value in options.items():
            command += [f"--{key}", _cli_value(value)]
        return command + ["--trainer.default_root_dir", str(self.member_dir(run))]


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
    for key in ("name", "members"):
        if not raw.get(key):
            raise ConfigError(f"{path}: '{key}' is required")
    members = raw["members"]
    if not isinstance(members, dict) or not all(isinstance(o, dict | None) for o in members.values()):
        raise ConfigError(f"{path}: 'members' maps each member name to its options")
    member_configs = {
        str(member): _config_files(path, f"member {member!r} fit_config", options.pop(MEMBER_FIT_CONFIG))
        for member, options in members.items()
        if options and MEMBER_FIT_CONFIG in options
    }
    if not raw.get("fit_config") and len(member_configs) < len(members):
        raise ConfigError(f"{path}: 'fit_config' is required (top-level, or in every member)")
    check_name(path, "comparison", raw["name"])
    study = check_study(path, raw.get("study"))
    budget = check_budget(path, raw.get("budget"))
    fixed = BUDGET_FIXED_OPTIONS if budget is not None else FIXED_OPTIONS
    by_axis = axis_options(study)
    for key, via in _set_options(raw.get("options") or {}):
        if (axis := _axis_of(key, by_axis)) is not None:
            raise ConfigError(f"{path}: options set {key!r}{via}, which the study axis {axis!r} sets per run")
        if budget is not None and (_overlaps(key, MAX_STEPS) or _overlaps(key, MAX_EPOCHS)):
            # Epochs would stop members of different batch sizes after different numbers of samples.
            raise ConfigError(f"{path}: options set {key!r}{via}, which the budget sets for every run")
    for member, options in members.items():
        check_name(path, "member", str(member) if isinstance(member, int) else member)
        for key, via in _set_options(options or {}):
            if (axis := _axis_of(key, by_axis)) is not None:
                raise ConfigError(
                    f"{path}: member {member!r} sets {key!r}{via}, which the study axis {axis!r} sets per run"
                )
            if _fixed_option(key, fixed) is not None:
                raise ConfigError(
                    f"{path}: member {member!r} sets {key!r}{via}, which all members must share (same "
                    "seed, data, budget and judging); set it in fit_config or options"
                )
    for run in plan_runs({str(member): None for member in members}, study):
        if run.name == DEFAULT_REPORT_FOLDER and not raw.get("report_dir"):
            raise ConfigError(
                f"{path}: member {run.name!r} would share its folder with the report; rename it or set "
                "report_dir"
            )
    configs = _config_files(path, "fit_config", raw.get("fit_config") or [])
    report_dir = raw.get("report_dir")
    spec = CompareSpec(
        name=str(raw["name"]),
        fit_config=configs,
        members={str(member): dict(options or {}) for member, options in members.items()},
        runs_dir=Path(raw.get("runs_dir", "runs/compare")),
        options=dict(raw.get("options") or {}),
        report_dir=Path(report_dir) if report_dir else None,
        study=study,
        member_fit_config=member_configs,
        budget=budget,
    )
    if budget is not None:
        _check_budget_fits(path, spec, budget)
    return spec


def _config_files(path: Path, key: str, value: object) -> list[Path]:
    """The fit config file(s) of ``key`` (one path or a list), each checked to exist."""
    configs = value if isinstance(value, list) else [value]
    for config in configs:
        if not isinstance(config, str) or not Path(config).is_file():
            raise ConfigError(f"{path}: {key} {config!r}: no such file")
    return [Path(config) for config in configs]


def _check_budget_fits(path: Path, spec: CompareSpec, budget: Budget) -> None:
    """Raise a ConfigError naming the member whose one optimizer step is more than the budget."""
    for member in spec.members:
        try:
            step = spec.step_size(member)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
        if budget.max_steps(step) < 1:
            raise ConfigError(
                f"{path}: budget samples {budget.amount} is less than one optimizer step of member "
                f"{member!r} ({step.describe()})"
            )


def check_name(path: Path, what: str, name: object) -> None:
    """Raise a ConfigError unless ``name`` is one safe folder name (no separator, no ``..``)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{path}: {what} name {name!r} is not a plain folder name: use letters, digits, '.', '_' and "
            "'-', starting with a letter or digit"
        )


def _fixed_option(key: str, fixed_options: tuple[str, ...] = FIXED_OPTIONS) -> str | None:
    """The fixed option that setting ``key`` changes (``key`` is it, below it or above it), if any."""
    return next((fixed for fixed in fixed_options if _overlaps(key, fixed)), None)


def _axis_of(key: str, by_axis: Mapping[str, str]) -> str | None:
    """The study axis whose options setting ``key`` changes, if any."""
    return next((axis for option, axis in by_axis.items() if _overlaps(key, option)), None)


def _overlaps(key: str, option: str) -> bool:
    """Setting ``key`` changes ``option``: it is the option, below it or above it."""
    return key == option or key.startswith(option + ".") or option.startswith(key + ".")


def _set_options(options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(dotted option, how it is set) for every option a member's options set.

    A mapping under a key sets the keys inside it (``trainer: {max_steps: 5}`` sets
    ``trainer.max_steps``); a ``config`` file (a path as the fit command gets it, so relative to the
    working directory) sets the options it holds. What this misses, the resolved check catches.
    """
    for key, value in options.items():
        if key == "config" and isinstance(value, str):
            file = Path(value).expanduser()
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) if file.is_file() else None
            for inner, _ in _set_options(loaded if isinstance(loaded, dict) else {}):
                yield inner, f" (in its config file {value})"
        elif isinstance(value, dict) and value:
            for inner, via in _set_options(value):
                yield f"{str(key)}.{inner}", via
        else:
            yield str(key), ""


def check_members(spec: CompareSpec) -> dict[str, dict[str, Any]]:
    """Parse every member's full config (``fit --print_config``) before anything trains.

    Then compare the resolved fixed options across members, whatever set them. With a study each
    member is parsed at the study's first point, where all members share the axis values: its other
    runs differ from it only in the axis options, which come last on their command lines (nothing
    the member sets overrides them) and whose values ``load_spec`` checked. With a budget, each
    member's resolved step size and ``trainer.max_steps`` must be the planned ones. A reward given as
    a local folder (``model.reward``, ``generation.reward``) must exist, so a missing reward model
    fails here rather than when its run starts.

    Returns:
        member -> its resolved config (at the study's first point).

    Raises:
        ConfigError: a member's options do not parse, resolve a fixed option to another value than
            the first member's, differ from the budget's plan or name a missing reward folder; the
            message names the member and the option.
    """
    resolved: dict[str, dict[str, Any]] = {}
    first_runs = {}
    for run in spec.runs.values():
        first_runs.setdefault(run.member, run)
    commands = [[*spec.fit_command(run.name), "--print_config"] for run in first_runs.values()]
    # Parsing is mostly start-up (imports), one process per member: a few at a time, in member order.
    workers = max(1, min(len(commands), os.cpu_count() or 1, MAX_PARSE_WORKERS))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            pool.map(
                lambda command: subprocess.run(command, capture_output=True, text=True, check=False), commands
            )
        )
    for member, result in zip(first_runs, results, strict=True):
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise ConfigError(f"compare member {member!r}: {lines[-1] if lines else 'invalid options'}")
        resolved[member] = yaml.safe_load(result.stdout) or {}
        check_reward_folders(member, resolved[member])
        if spec.budget is not None:
            check_budget_plan(spec, member, resolved[member])
    # With a budget the steps are per member, each checked against the plan above.
    shared = tuple(o for o in BUDGET_FIXED_OPTIONS if o != MAX_STEPS) if spec.budget else FIXED_OPTIONS
    check_shared_options(resolved, shared)
    return resolved


def check_budget_plan(spec: CompareSpec, member: str, resolved: Mapping[str, Any]) -> None:
    """Raise a ConfigError unless ``member``'s resolved config trains the budget's planned steps.

    The plan reads the member's files and options directly (:func:`~ipo_lightning.analysis.budget.
    layered_config`); the resolved config is what the fit will use, so any way of setting a step's
    size that the plan missed shows here.
    """
    where = f"compare member {member!r}"
    planned, actual = spec.step_size(member), step_size(resolved, where)
    if planned != actual:
        raise ConfigError(
            f"{where}: one optimizer step resolves to {actual.describe()}, but the budget planned "
            f"{planned.describe()}; set these options in the compare file or the fit config"
        )
    for option, planned_value in spec.budget_options(member).items():
        if _lookup(resolved, option) != planned_value:
            raise ConfigError(
                f"{where}: {option} resolves to {_lookup(resolved, option)}, but the budget plans "
                f"{planned_value}"
            )


def check_reward_folders(member: str, resolved: Mapping[str, Any]) -> None:
    """Raise a ConfigError if a reward option of ``member`` names a local folder that does not exist.

    A spec that can only be a path (it starts with ``.``, ``/`` or ``~``, or has more parts than a
    hub id's ``owner/name``) is a folder; ``module:function`` specs and hub ids are left to the fit.
    """
    for option in REWARD_OPTIONS:
        spec = _lookup(resolved, option)
        if not isinstance(spec, str) or ":" in spec:
            continue
        if (spec.startswith((".", "/", "~")) or spec.count("/") > 1) and not Path(spec).expanduser().is_dir():
            raise ConfigError(
                f"compare member {member!r}: {option} {spec!r}: no such folder; train and export that "
                "reward model first"
            )


def check_shared_options(
    resolved: Mapping[str, Mapping[str, Any]], fixed_options: tuple[str, ...] = FIXED_OPTIONS
) -> None:
    """Raise a ConfigError unless every member's resolved config has the same fixed options.

    Training and validation sets are compared by what selects their records (path, split, subset,
    limit; a ``builtin:gold`` set by its knobs, defaults filled in), so the preference and the prompt
    data modules, whose sources resolve with their own fields, compare alike.

    Args:
        resolved: member -> its full config as ``fit --print_config`` prints it, in member order.
        fixed_options: the options to compare.
    """
    members = list(resolved)
    for option in fixed_options:
        if option in PER_MEMBER_OPTIONS:
            continue
        first = _shared_value(option, _lookup(resolved[members[0]], option))
        for member in members[1:]:
            value = _shared_value(option, _lookup(resolved[member], option))
            if value != first:
                key, value, first_value = _first_difference(option, value, first)
                reason = (
                    "all members are judged alike"
                    if option == "generation"
                    else "all members must share seed, data and budget"
                )
                raise ConfigError(
                    f"compare member {member!r}: {key} resolves to {_short(value)}, but member "
                    f"{members[0]!r} has {_short(first_value)}; {reason}"
                )


RECORD_FIELDS = ("path", "split", "subset", "limit")
"""The fields of a data source that select its records."""


def _shared_value(option: str, value: Any) -> Any:
    """``value`` of a shared option as members are compared on it (see :func:`check_shared_options`)."""
    if option == "data.train":
        return _records(value)
    if option == "data.val":
        return {name: _records(source) for name, source in value.items()} if isinstance(value, dict) else None
    if option == "data.val_fraction":
        return value or 0.0  # the prompt data module has no split: as a fraction of 0
    return value


def _records(source: Any) -> Any:
    """What selects a data source's records; a built-in gold set by its knobs with defaults filled in."""
    if not isinstance(source, Mapping):
        return source
    records = {key: source.get(key) for key in RECORD_FIELDS}
    path = records["path"]
    if isinstance(path, str) and path.startswith("builtin:gold/"):
        from ipo_lightning.gold.pairs import parse_spec

        gold = parse_spec(path.removeprefix("builtin:"))
        records["path"] = f"builtin:gold/{gold.split}?pairs={gold.pairs}&temperature={gold.temperature:g}"
        records["path"] += f"&seed={gold.seed}"
    return records


def _first_difference(key: str, value: Any, first: Any) -> tuple[str, Any, Any]:
    """The deepest dotted key under ``key`` where two mappings differ, with both values there."""
    if isinstance(value, Mapping) and isinstance(first, Mapping):
        for inner in [*first, *(k for k in value if k not in first)]:
            if value.get(inner) != first.get(inner):
                return _first_difference(f"{key}.{inner}", value.get(inner), first.get(inner))
    return key, value, first


def _lookup(config: Mapping[str, Any], option: str) -> Any:
    value: Any = config
    for part in option.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def latest_run(folder: Path) -> Path:
    """The newest run folder (one holding ``metrics.csv``) under ``folder``.

    Usually ``version_N``; under SLURM or with ``--run.name`` the folder has another name.
    """
    children = folder.iterdir() if folder.is_dir() else []
    runs = [child for child in children if (child / "metrics.csv").is_file()]
    if not runs:
        raise UserInputError(f"{folder}: no run folder with a metrics.csv")
    return max(runs, key=lambda child: (child / "metrics.csv").stat().st_mtime)


def plan_summary(spec: CompareSpec) -> str:
    """One line: how many runs, how they come about, and their names in running order."""
    shape = " x ".join(
        [f"{len(spec.members)} members", *(f"{len(values)} {axis}" for axis, values in spec.study.items())]
    )
    names = list(spec.runs)
    summary = f"compare {spec.name}: {len(names)} runs ({shape}): {', '.join(names)}"
    if spec.budget is not None:
        steps = ", ".join(
            f"{member} {spec.budget_options(member)[MAX_STEPS]} x {spec.step_size(member).samples}"
            for member in spec.members
        )
        summary += f"; budget {spec.budget.amount} {spec.budget.kind}: steps x samples per step: {steps}"
    return summary


def run_compare(spec: CompareSpec, jobs: int = 1) -> Path:
    """Check, then fit every run (``jobs`` at a time), then write the report; returns the report path.

    With ``jobs > 1`` each fit's output goes to ``fit.log`` in its own runs folder instead of the
    terminal, so parallel runs do not interleave; a failed fit stops new ones from starting, waits for
    those already running and names every failure.
    """
    print(plan_summary(spec), flush=True)
    check_members(spec)
    runs = list(spec.runs)
    if jobs <= 1:
        for index, run in enumerate(runs, start=1):
            print(f"compare {spec.name}: run {index}/{len(runs)}: {run}", flush=True)
            result = subprocess.run(spec.fit_command(run), check=False)
            if result.returncode != 0:
                raise UserInputError(f"compare run {run!r}: fit failed (exit code {result.returncode})")
    else:
        _run_parallel(spec, runs, jobs)
    return write_compare_report(spec)


def _run_parallel(spec: CompareSpec, runs: list[str], jobs: int) -> None:
    """Fit ``runs`` with at most ``jobs`` processes at a time (see :func:`run_compare`)."""
    pending = list(enumerate(runs, start=1))
    running: list[tuple[str, subprocess.Popen[bytes], IO[str]]] = []
    failures: list[str] = []
    while pending or running:
        while pending and len(running) < jobs and not failures:
            index, run = pending.pop(0)
            log_path = spec.member_dir(run) / "fit.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            print(f"compare {spec.name}: run {index}/{len(runs)}: {run} (output: {log_path})", flush=True)
            log = log_path.open("w", encoding="utf-8")
            running.append((run, subprocess.Popen(spec.fit_command(run), stdout=log, stderr=log), log))
        if failures and not running:
            break
        time.sleep(0.5)
        for entry in list(running):
            run, process, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                failures.append(f"{run!r} (exit code {process.returncode}, see {log.name})")
    if failures:
        raise UserInputError(f"compare run(s) failed: {', '.join(failures)}")


def write_compare_report(spec: CompareSpec) -> Path:
    """Write the report of every run's newest run folder; returns the path of ``report.md``."""
    runs = [latest_run(spec.member_dir(run)) for run in spec.runs]
    report_dir = spec.report_dir or spec.runs_dir / spec.name / DEFAULT_REPORT_FOLDER
    return write_folder_atomically(
        report_dir, lambda folder: write_report(runs, folder, title=f"Comparison: {spec.name}")
    )


def write_folder_atomically(folder: Path, write: Callable[[Path], Path]) -> Path:
    """Run ``write`` on a fresh temporary folder beside ``folder``, then rename it to ``folder``.

    A ``write`` that fails leaves ``folder`` as it was (an older report stays whole) and no temporary
    folder behind. An existing ``folder`` is replaced only after the new one is complete.

    Args:
        folder: the final folder.
        write: fills the folder it is given and returns a path inside it.

    Returns:
        The path ``write`` returned, moved to inside ``folder``.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    old = folder.parent / f"{staging.name}-old"
    try:
        written = write(staging)
        if folder.exists():
            folder.rename(old)
        try:
            staging.rename(folder)
        except OSError:
            if old.exists():
                old.rename(folder)  # put the previous report back
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder / written.relative_to(staging)


def main(args: list[str] | None = None) -> None:
    """``python -m ipo_lightning compare --config FILE [--print_commands]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ipo_lightning compare",
        description="Train several methods on the same data, seed and budget, then write a report.",
    )
    parser.add_argument("--config", required=True, type=Path, help="compare file (see configs/compare/)")
    parser.add_argument("--print_commands", action="store_true", help="print each run's fit command and exit")
    parser.add_argument(
        "--jobs", type=int, default=1, help="fits run at a time (default 1; above 1 each logs to its fit.log)"
    )
    parser.add_argument(
        "--report_only", action="store_true", help="write the report from the runs already there, fit nothing"
    )
    options = parser.parse_args(args)
    if options.jobs < 1:
        raise ConfigError(f"compare --jobs must be at least 1, got {options.jobs}")
    spec = load_spec(options.config)
    if options.report_only:
        print(f"wrote {write_compare_report(spec)}")
        return
    if options.print_commands:
        print(plan_summary(spec), file=sys.stderr)  # stdout stays one command per line
        for run in spec.runs:
            print(shlex.join(spec.fit_command(run)))
        return
    print(f"wrote {run_compare(spec, options.jobs)}")
