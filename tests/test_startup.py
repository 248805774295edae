"""What a command imports before it does any work: the heavy optional packages load where they are used.

Each check runs in a fresh interpreter (this test process has imported everything already) and reads
``sys.modules`` once the command has returned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, subprocess_env

LAZY_FOR_FIT = ("datasets", "pandas", "pyarrow")
"""Not imported to build and parse ``fit``'s options: datasets (with pandas and pyarrow) loads when a run
loads its data."""
LAZY_FOR_TOOLS = ("lightning", "torch", "transformers", "jsonargparse", "peft", *LAZY_FOR_FIT)
"""Not imported by the tools' ``--help`` and argument checks: only what a tool's work needs loads."""


def _loaded_after(tmp_path: Path, code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` are in ``sys.modules`` after ``code`` ran in a fresh interpreter."""
    report = f"import json, sys\nprint(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    script = f"{code}\n{report}"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run_main(*args: str) -> str:
    """Code that runs ``python -m ipo_lightning ARGS`` and keeps going after its exit (help, errors)."""
    return (
        "import contextlib, io\n"
        "from ipo_lightning.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        f"        main({list(args)!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
    )


@pytest.mark.slow
def test_fit_options_load_without_datasets(tmp_path: Path) -> None:
    # The whole parser of a plain run: every option class (module, data, callbacks) and the config read.
    code = _run_main("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert _loaded_after(tmp_path, code, LAZY_FOR_FIT) == []


@pytest.mark.slow
def test_the_tools_check_their_arguments_without_lightning(tmp_path: Path) -> None:
    code = "".join(
        _run_main(*args)
        for args in (
            ("report", "--help"),
            ("compare", "--help"),
            ("compare",),  # no --config: an argument error
            ("judge", "--help"),
            ("judge", str(tmp_path)),  # no --reward
            ("evaluate", "--help"),
            ("evaluate", str(tmp_path / "missing")),  # no such run folder
        )
    )
    assert _loaded_after(tmp_path, code, LAZY_FOR_TOOLS) == []


@pytest.mark.slow
def test_the_check_sees_a_package_that_is_imported(tmp_path: Path) -> None:
    # The checks above would pass if nothing were ever seen: a module that is imported is reported.
    assert _loaded_after(tmp_path, "import ipo_lightning.data.sources\nimport datasets", LAZY_FOR_FIT) == [
        "datasets",
        "pandas",
        "pyarrow",
    ]
