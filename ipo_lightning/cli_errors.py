"""Option errors of the argument parser as one line: the option, what it expects, what it got.

jsonargparse explains a rejected value by every alternative of every nested type it tried: a word
given for ``--model.optimizer.init_args.lr`` takes over a hundred lines, usage included. The parser
here prints ``error: model.optimizer.init_args.lr expects a number, got 'abc'`` instead, and exits
with code 2 like any option error.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from ipo_lightning.resume import RENAMED_OPTIONS

_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"Expected a (<class '[\w.]+'>|typing\.Literal\[.*?\])(?:\. Got|\n|$)", re.MULTILINE)
_GIVEN = re.compile(r"(?:Given|Got) value: (.*?)(?:\. Got value:|\n|$)", re.MULTILINE)
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
_IGNORED_TYPES = {"NoneType", "torch.Tensor"}  # the null alternative; a tensor is never typed in


def short_parser_error(message: str) -> str:
    """One line for jsonargparse's (possibly nested, multi-line) error ``message``.

    ``<option> expects <types or choices>, got <value>`` when the message is about a rejected value;
    other messages (an unknown option, say) are one line already, or are cut to their first line.
    """
    keys = _KEY.findall(message)
    if not keys:
        line = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
        return line + _renamed_hint(line)
    # A class-typed option (class_path + init_args) reports its argument as a nested key.
    joiner = ".init_args." if "init_args=Namespace(" in message else "."
    option = joiner.join(keys[:2])
    types: list[str] = []
    choices: list[str] = []
    for found in _EXPECTED.findall(message):
        if found.startswith("typing.Literal"):
            choices.extend(str(choice) for choice in ast.literal_eval(found[len("typing.Literal") :]))
        elif (name := found[len("<class '") : -2]) not in _IGNORED_TYPES:
            types.append(_TYPE_WORDS.get(name, name))
    expected = list(dict.fromkeys(types))
    if choices:
        expected.append("one of " + ", ".join(dict.fromkeys(choices)))
    given = [value for value in _GIVEN.findall(message) if not value.startswith(("Namespace(", "NestedArg("))]
    line = f"{option} expects {' or '.join(expected)}" if expected else f"{option} has an invalid value"
    return line + (f", got {given[0]!r}" if given else "")


def _renamed_hint(line: str) -> str:
    """``; <old> is now <new>`` when ``line`` rejects an option an earlier version had (else empty)."""
    for old, new in RENAMED_OPTIONS.items():
        group, option = old.rsplit(".", 1)
        if re.search(rf"--{re.escape(old)}(?=[\s=]|$)", line) or (
            f"Group '{group}' does not accept option '{option}'" in line
        ):
            return f"; {old} is now {new}"
    return ""


def _debugging() -> bool:
    """jsonargparse's debug mode (``JSONARGPARSE_DEBUG``): its full errors and tracebacks are wanted."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() in {"true", "yes", "on"}


class OneLineErrorParser(LightningArgumentParser):
    """Lightning's parser, printing option errors as one line (module docstring) before exiting with 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or _debugging():
            super().error(message, ex)  # raises: a nested parser, a caller catching it, or debugging
        self._logger.error(message)
        prog = self.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short_parser_error(message)} (options: {prog} --help)\n")
        self.exit(2)
