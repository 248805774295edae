"""The two test tiers: ``make test`` runs every test, ``make test-fast`` a strict subset, both timed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, subprocess_env


def _collected(tmp_path: Path, *selections: tuple[str, ...]) -> list[set[str]]:
    """The test ids ``pytest --collect-only`` lists with each of ``selections`` (extra arguments); the
    collections are independent, so they run at the same time."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    processes = [
        subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            env=subprocess_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in selections
    ]
    collected = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stdout[-2000:] + stderr[-2000:]
            collected.append({line for line in stdout.splitlines() if "::" in line})
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return collected


def _make_recipe(target: str) -> str:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    return match.group(1)


@pytest.mark.slow
def test_the_fast_tier_is_a_strict_subset_of_the_full_suite(tmp_path: Path) -> None:
    full_recipe, fast_recipe = _make_recipe("test"), _make_recipe("test-fast")
    pytest_args = full_recipe.split("pytest", 1)[1].split()
    assert "-m" not in pytest_args and "--durations=15" in pytest_args  # everything, timed
    assert '-m "not slow"' in fast_recipe and "--durations" in fast_recipe
    full, fast = _collected(tmp_path, (), ("-m", "not slow"))
    assert fast < full  # a strict subset: the slow tests are only in the full suite
    slow = full - fast
    assert any("test_distributed.py" in test for test in slow)
    assert any("test_tiers.py" in test for test in slow)
