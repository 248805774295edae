"""The start-up benchmark's code, on commands that take milliseconds (no timings are asserted: only that
every number is produced and consistent, and the table shows them)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, benchmark_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("startup") as module:
        yield module


def test_table_shows_each_checkout_and_the_ratio_to_its_floor(bench: ModuleType) -> None:
    commands = [bench.Command("floor", ("-c", "pass")), bench.Command("help", ("-m", "x", "--help"))]
    summaries = [
        {"repo": "/a/old", "command": "floor", "wall_s": 2.0, "cpu_s": 0.0, "wall_vs_floor": 1.0},
        {"repo": "/a/old", "command": "help", "wall_s": 3.0, "cpu_s": 1.5, "wall_vs_floor": 1.5},
        {"repo": "/a/new", "command": "floor", "wall_s": 2.0, "cpu_s": 1.0, "wall_vs_floor": 1.0},
        {"repo": "/a/new", "command": "help", "wall_s": 2.5, "cpu_s": 1.25, "wall_vs_floor": 1.25},
    ]
    for s in summaries:
        floor_cpu = 0.0 if s["repo"] == "/a/old" else 1.0
        s["cpu_vs_floor"] = s["cpu_s"] / floor_cpu if floor_cpu else None
    lines = bench.markdown(summaries, commands).splitlines()
    assert lines[0] == "| command | checkout | wall s | CPU s | wall vs floor | CPU vs floor |"
    assert lines[2:] == [
        "| `python -c pass` | old | 2.00 | 0.00 | 1.00x | - |",  # a floor of 0 CPU seconds: no ratio
        "| `python -c pass` | new | 2.00 | 1.00 | 1.00x | 1.00x |",
        "| `python -m x --help` | old | 3.00 | 1.50 | 1.50x | - |",
        "| `python -m x --help` | new | 2.50 | 1.25 | 1.25x | 1.25x |",
    ]
    one = bench.markdown(summaries[2:], commands).splitlines()
    assert one[0] == "| command | wall s | CPU s | wall vs floor | CPU vs floor |"


@pytest.mark.slow
def test_measure_times_every_command_in_every_checkout(bench: ModuleType, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "ipo_lightning").mkdir(parents=True)
    # Fails unless it runs in the checkout with the checkout first on the import path.
    probe = "import os; assert os.environ['PYTHONPATH'].split(os.pathsep)[0] == os.getcwd()"
    commands = [bench.Command("floor", ("-c", "pass")), bench.Command("probe", ("-c", probe))]
    summaries = bench.measure(commands, 2, sys.executable, [REPO, other])
    assert [(s["repo"], s["command"]) for s in summaries] == [
        (str(REPO), "floor"),
        (str(REPO), "probe"),
        (str(other), "floor"),
        (str(other), "probe"),
    ]
    floors = {s["repo"]: s for s in summaries if s["command"] == "floor"}
    for s in summaries:
        assert s["runs"] == 2 and s["wall_s"] > 0 and s["cpu_s"] > 0
        assert s["wall_vs_floor"] == pytest.approx(s["wall_s"] / floors[s["repo"]]["wall_s"])
        assert s["cpu_vs_floor"] == pytest.approx(s["cpu_s"] / floors[s["repo"]]["cpu_s"])
    assert [s["wall_vs_floor"] for s in summaries if s["command"] == "floor"] == [1.0, 1.0]


@pytest.mark.slow
def test_a_failing_command_names_itself_and_its_last_error_line(bench: ModuleType) -> None:
    failing = bench.Command("bad", ("-c", "import sys; sys.exit('no such thing')"))
    with pytest.raises(RuntimeError, match=r"^python -c .* exited 1 in .*: no such thing$"):
        bench.time_once(failing, sys.executable, REPO)


def test_bad_flags_are_refused_before_anything_runs(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--commands", "help,nope"])
    assert exit_info.value.code == 2 and "--commands: unknown nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--repo", str(tmp_path)])
    assert f"--repo {tmp_path}: no ipo_lightning package there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0", "--commands", "floor"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
