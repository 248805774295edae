"""Start-up time of the command line: how long a command takes before it does any work.

Each command runs in a fresh Python process, ``--repeats`` times, the commands taking turns (round
``r`` runs every command once, so load from other processes falls on all of them alike). Measured per
run: the wall seconds until the process exits, and the CPU seconds (user + system) of the process and
its threads, which load from other processes changes less than wall time. Printed: one JSON line per
command (medians over the runs), then a Markdown table with each command's ratio to the floor,
``python -c "import lightning"``: the part of every training command that is Lightning's own.

The commands (``--commands`` picks some of them, by name)::

    floor          python -c "import lightning"
    help           python -m ipo_lightning --help
    fit_help       python -m ipo_lightning fit --help
    report_help    python -m ipo_lightning report --help
    print_config   python -m ipo_lightning fit --config configs/quickstart.yaml --print_config

``--repo`` times another checkout of the project with the same script (its ``ipo_lightning`` is
imported and its ``configs/quickstart.yaml`` read), e.g. a worktree of an older commit; given twice,
both are timed in one run, their runs taking turns, so the two versions meet the same machine state.
``--save NAME`` also writes the JSON lines to ``benchmarks/results/NAME.jsonl``::

    python benchmarks/startup.py                                         # this checkout, 3 runs each
    python benchmarks/startup.py --repo ../main --repo . --repeats 5     # before and after
    python benchmarks/startup.py --save startup_cpu_2cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FLOOR = "floor"


@dataclass(frozen=True)
class Command:
    """One timed command: a name and the arguments after ``python``."""

    name: str
    args: tuple[str, ...]

    def shown(self) -> str:
        """The command as a user types it."""
        return "python " + " ".join(f'"{a}"' if " " in a else a for a in self.args)


COMMANDS = (
    Command(FLOOR, ("-c", "import lightning")),
    Command("help", ("-m", "ipo_lightning", "--help")),
    Command("fit_help", ("-m", "ipo_lightning", "fit", "--help")),
    Command("report_help", ("-m", "ipo_lightning", "report", "--help")),
    Command(
        "print_config",
        ("-m", "ipo_lightning", "fit", "--config", "configs/quickstart.yaml", "--print_config"),
    ),
)


@dataclass(frozen=True)
class Timing:
    """One run of a command."""

    wall: float
    """Seconds from start to exit."""
    cpu: float
    """User + system CPU seconds of the process (all its threads)."""


def time_once(command: Command, python: str, repo: Path) -> Timing:
    """Run ``command`` once in ``repo`` with ``repo`` first on the import path; its wall and CPU time.

    Raises:
        RuntimeError: the command exited non-zero (its stderr's last line is in the message).
    """
    path = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    with tempfile.TemporaryFile(mode="w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            [python, *command.args], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        # wait4, not wait: it also returns the child's resource usage (microsecond CPU times).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            lines = stderr.read().strip().splitlines()
            raise RuntimeError(
                f"{command.shown()} exited {process.returncode} in {repo}: {lines[-1] if lines else ''}"
            )
    return Timing(wall=wall, cpu=usage.ru_utime + usage.ru_stime)


def measure(commands: list[Command], repeats: int, python: str, repos: list[Path]) -> list[dict[str, Any]]:
    """Time every command in every checkout ``repeats`` times, taking turns; one summary per checkout and
    command, in that order.

    Round ``r`` runs every (checkout, command) pair once, starting at a different pair each round, so
    a change in the machine's load falls on all of them alike. Each summary: ``repo``, ``command`` (its
    name), ``runs``, median ``wall_s`` and ``cpu_s``, and, when the floor is among the commands,
    ``wall_vs_floor`` and ``cpu_vs_floor``: the medians' ratios to the same checkout's floor.
    """
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    pairs = [(repo, command) for repo in repos for command in commands]
    timings: dict[tuple[Path, str], list[Timing]] = {(repo, command.name): [] for repo, command in pairs}
    for round_index in range(repeats):
        shift = round_index % len(pairs)
        for repo, command in pairs[shift:] + pairs[:shift]:
            timings[repo, command.name].append(time_once(command, python, repo))
    summaries = []
    for repo in repos:
        rows = [
            {
                "repo": str(repo),
                "command": command.name,
                "runs": len(timings[repo, command.name]),
                "wall_s": statistics.median(t.wall for t in timings[repo, command.name]),
                "cpu_s": statistics.median(t.cpu for t in timings[repo, command.name]),
            }
            for command in commands
        ]
        floor = next((row for row in rows if row["command"] == FLOOR), None)
        if floor is not None:
            for row in rows:
                row["wall_vs_floor"] = row["wall_s"] / floor["wall_s"]
                row["cpu_vs_floor"] = row["cpu_s"] / floor["cpu_s"] if floor["cpu_s"] else None
        summaries += rows
    return summaries


def markdown(summaries: list[dict[str, Any]], commands: list[Command]) -> str:
    """The summaries as a Markdown table, a command's checkouts side by side in consecutive rows (the
    checkout column only for several, the ratio columns only when the floor was timed)."""
    repos = list(dict.fromkeys(s["repo"] for s in summaries))
    ratios = all("wall_vs_floor" in s for s in summaries)
    header = ["command", *(["checkout"] if len(repos) > 1 else []), "wall s", "CPU s"]
    header += ["wall vs floor", "CPU vs floor"] if ratios else []
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    by_key = {(s["repo"], s["command"]): s for s in summaries}
    for command in commands:
        for repo in repos:
            s = by_key[repo, command.name]
            row = [f"`{command.shown()}`", *([Path(repo).name] if len(repos) > 1 else [])]
            row += [f"{s['wall_s']:.2f}", f"{s['cpu_s']:.2f}"]
            if ratios:
                cpu = "-" if s["cpu_vs_floor"] is None else f"{s['cpu_vs_floor']:.2f}x"
                row += [f"{s['wall_vs_floor']:.2f}x", cpu]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def context(repo: Path) -> dict[str, Any]:
    """What the numbers depend on besides the code: the checkout's commit, the machine, the versions."""
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    versions = {name: _version(name) for name in ("torch", "lightning", "transformers")}
    return {"repo_commit": commit or None, "cpus": os.cpu_count(), "machine": platform.machine(), **versions}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    """Parse flags, time the commands, print JSON lines and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [command.name for command in COMMANDS]
    parser.add_argument("--repeats", type=int, default=3, help="runs of every command (default 3)")
    parser.add_argument(
        "--commands", default=",".join(names), help=f"comma-separated, from {', '.join(names)}"
    )
    parser.add_argument(
        "--repo",
        type=Path,
        action="append",
        help="a checkout to time; give it twice to compare two in one run (default: this one)",
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter (default: this one)")
    parser.add_argument(
        "--save", metavar="NAME", help="also write the JSON lines to benchmarks/results/NAME.jsonl"
    )
    args = parser.parse_args(argv)
    chosen = [name for name in args.commands.split(",") if name]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        parser.error(f"--commands: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    repos = [repo.resolve() for repo in args.repo or [REPO]]
    for repo in repos:
        if not (repo / "ipo_lightning").is_dir():
            parser.error(f"--repo {repo}: no ipo_lightning package there")
    commands = [command for command in COMMANDS if command.name in chosen]
    try:
        summaries = measure(commands, args.repeats, args.python, repos)
    except ValueError as error:
        parser.error(str(error))
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    about = {str(repo): context(repo) for repo in repos}
    lines = [
        json.dumps(
            {**{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}, **about[s["repo"]]}
        )
        for s in summaries
    ]
    print("\n".join(lines), flush=True)
    print()
    print(markdown(summaries, commands))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.save}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
