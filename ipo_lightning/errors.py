"""Errors caused by the user's input, as opposed to bugs, and a training run that diverged.

The CLI prints these as one clear line and exits non-zero, without a traceback wall. They live in this
dependency-free module so the entry point (:mod:`ipo_lightning.entry`) catches them without importing
Lightning.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a config value, a data file, a record. The message says where."""


class DataError(UserInputError):
    """A data source, record or field that cannot be used. The message names file, record and field."""


class ConfigError(UserInputError):
    """A configuration value that is inconsistent or unusable."""


DIVERGED_EXIT_CODE = 1
"""Exit code of a run stopped by the non-finite guard: a failed run, not bad input (that is 2)."""


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the message names the step and what.

    Raised by :class:`~ipo_lightning.callbacks.nonfinite.NonFiniteGuard`.
    """
