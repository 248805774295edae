"""Errors caused by the user's input, as opposed to bugs.

The CLI prints these as one clear line and exits non-zero, without a traceback wall.
"""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a config value, a data file, a record. The message says where."""


class DataError(UserInputError):
    """A data source, record or field that cannot be used. The message names file, record and field."""


class ConfigError(UserInputError):
    """A configuration value that is inconsistent or unusable."""
