"""Run folders: reserved once per run, never shared by two runs, removed when a run never started."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from ipo_lightning.run_folder import RUN_NAME_ENV, discard_run_folder, reserve_run_folder

RACERS, TRIALS = 4, 25


def _race(roots: list[str], barrier, results) -> None:  # noqa: ANN001 (multiprocessing proxies)
    """One racer: for each root, wait until every racer is ready, then reserve a folder in it."""
    for trial, root in enumerate(roots):
        barrier.wait(timeout=60)
        results.put((trial, reserve_run_folder(root, None).name))


@pytest.mark.slow
def test_runs_started_together_reserve_distinct_folders(tmp_path: Path) -> None:
    """Several processes released at once from a barrier, many times: never two in one folder."""
    context = multiprocessing.get_context("fork")  # cheap starts; the racers only touch the disk
    barrier, results = context.Barrier(RACERS), context.Queue()
    roots = [str(tmp_path / f"trial{trial}") for trial in range(TRIALS)]
    racers = [context.Process(target=_race, args=(roots, barrier, results)) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    try:
        got = [results.get(timeout=120) for _ in range(RACERS * TRIALS)]
    finally:
        for racer in racers:
            racer.join(timeout=60)
            if racer.is_alive():
                racer.kill()
    assert all(racer.exitcode == 0 for racer in racers)
    for trial, root in enumerate(roots):
        names = sorted(name for t, name in got if t == trial)
        assert names == [f"version_{n}" for n in range(RACERS)], (trial, names)
        assert sorted(p.name for p in Path(root).iterdir()) == names


def test_reservation_takes_the_next_free_number_and_keeps_named_folders(tmp_path: Path) -> None:
    (tmp_path / "version_3").mkdir()
    (tmp_path / "other").mkdir()
    first = reserve_run_folder(tmp_path, None)
    assert (first.name, first.fresh, first.path.is_dir()) == ("version_4", True, True)
    assert reserve_run_folder(tmp_path, None).name == "version_5"

    named = reserve_run_folder(tmp_path, "mine")  # a new name: created, fresh
    assert named.fresh and named.path.is_dir()
    (named.path / "metrics.csv").write_text("step\n0\n")
    again = reserve_run_folder(tmp_path, "mine")  # the same name again continues that run
    assert again.path == named.path and not again.fresh

    # Only a folder this start created and left without a run is removed.
    assert not discard_run_folder(again) and (named.path / "metrics.csv").is_file()
    assert discard_run_folder(first) and not first.path.exists()


def test_a_ddp_child_reuses_its_parents_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's launcher starts children with LOCAL_RANK set and the parent's choice in the env."""
    parent = reserve_run_folder(tmp_path, None)
    monkeypatch.setenv(RUN_NAME_ENV, f"{os.getppid()}:{parent.name}")  # as if our parent had chosen
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = reserve_run_folder(tmp_path, None)
    assert child.path == parent.path and not child.fresh  # only the launching process may remove it
    assert sorted(p.name for p in tmp_path.iterdir()) == [parent.name]
    monkeypatch.setenv(RUN_NAME_ENV, f"{os.getpid()}:{parent.name}")  # chosen by some other process
    assert reserve_run_folder(tmp_path, None).name == "version_1"
