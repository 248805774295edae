"""The entry point of ``python -m ipo_lightning`` and the ``ipo-lightning`` script.

It picks the subcommand before importing anything heavy: ``compare``, ``report``, ``judge`` and
``evaluate`` (the tools, :mod:`ipo_lightning.analysis`) run without Lightning's import (about five
CPU-seconds of torch, torchmetrics and torch._dynamo) unless they use it; ``fit``, ``validate``,
``test`` and ``--help`` go to :class:`~ipo_lightning.cli.PreferenceCLI`. Either way bad input ends
with one line on stderr and exit code 2, and a run stopped by the non-finite guard with exit code 1.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable

from ipo_lightning.errors import DIVERGED_EXIT_CODE, TrainingDiverged, UserInputError

USER_ERROR_EXIT_CODE = 2

TOOLS = ("compare", "report", "judge", "evaluate")
"""Subcommands beside Lightning's (modules of :mod:`ipo_lightning.analysis`): they read runs or launch
fits, so they are not Trainer methods."""


def _quiet_expected_warnings() -> None:
    """Silence Lightning warnings that are expected here and would only alarm CLI users."""
    # The frozen reference is in eval mode on purpose (the policy is put in train mode explicitly).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def _tool(name: str | None) -> Callable[[list[str]], None] | None:
    """The ``main`` of subcommand ``name``, or None for Lightning's own (``fit``, ...). Imported only
    when named: ``fit`` then needs none of their packages (the reports' matplotlib), and a tool none
    of Lightning's."""
    if name not in TOOLS:
        return None
    return importlib.import_module(f"ipo_lightning.analysis.{name}").main


def main(args: list[str] | None = None) -> None:
    """Run the command line ``args`` (default: ``sys.argv[1:]``)."""
    _quiet_expected_warnings()
    argv = sys.argv[1:] if args is None else list(args)
    try:
        tool = _tool(argv[0] if argv else None)
        if tool is not None:
            tool(argv[1:])
            return
        # Lightning and the training code, only for the subcommands that train or validate.
        from ipo_lightning.cli import PreferenceCLI

        PreferenceCLI(args=args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except TrainingDiverged as error:
        # A failed run, not bad input: its own exit code, one line (every process stops alike, rank 0
        # says so) and no traceback (it is not a bug).
        from lightning.pytorch.utilities.rank_zero import rank_zero_only  # loaded by the run that raised

        if getattr(rank_zero_only, "rank", 0) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(DIVERGED_EXIT_CODE)
