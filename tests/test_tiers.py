"""The two test tiers: ``make test`` runs every test, ``make test-fast`` a strict subset, both timed."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO


class _Selected:
    """pytest plugin: the ids of the tests a session selects (what ``--collect-only -q`` lists)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.ids = {item.nodeid for item in session.items}


def _collected(monkeypatch: pytest.MonkeyPatch, *selections: tuple[str, ...]) -> list[set[str]]:
    """The test ids ``pytest --collect-only`` selects from the repository root with each of
    ``selections`` (extra arguments).

    Each collection is a pytest session in this process: the test modules it imports are mostly
    imported already, where a child process would import torch, transformers and every test module again.
    """
    monkeypatch.chdir(REPO)
    collected = []
    for args in selections:
        selected = _Selected()
        # No fault handler of its own: its teardown would switch off this session's.
        options = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:faulthandler"]
        code = pytest.main([*options, *args], plugins=[selected])
        assert code == pytest.ExitCode.OK, (args, code)
        collected.append(selected.ids)
    return collected


def _make_recipe(target: str) -> str:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert match, f"no {target} target in the Makefile"
    return match.group(1)


@pytest.mark.slow
def test_the_fast_tier_is_a_strict_subset_of_the_full_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    full_recipe, fast_recipe = _make_recipe("test"), _make_recipe("test-fast")
    pytest_args = full_recipe.split("pytest", 1)[1].split()
    assert "-m" not in pytest_args and "--durations=15" in pytest_args  # everything, timed
    assert '-m "not slow"' in fast_recipe and "--durations" in fast_recipe
    full, fast = _collected(monkeypatch, (), ("-m", "not slow"))
    assert fast < full  # a strict subset: the slow tests are only in the full suite
    slow = full - fast
    assert any("test_distributed.py" in test for test in slow)
    assert any("test_tiers.py" in test for test in slow)
