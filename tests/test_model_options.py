"""Shared ``model.`` option docs and defaults: filled into each method's docstring and read by the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from ipo_lightning.errors import ConfigError
from ipo_lightning.methods import METHODS
from ipo_lightning.model_options import OPTION_DOCS, shared_doc_lines, with_shared_docs


def test_shared_lines_are_filled_wrapped_and_indented() -> None:
    @with_shared_docs
    class Example:
        """Example.

        Args:
            warmup_steps: {shared}
            own: an option of its own, {shared} in mid-line is kept.
            attn_implementation: {shared}
        """

    doc = Example.__doc__ or ""
    assert "            warmup_steps: " + OPTION_DOCS["warmup_steps"] in doc
    assert "            attn_implementation: " + OPTION_DOCS["attn_implementation"] in doc
    assert "own: an option of its own, {shared} in mid-line is kept." in doc


def test_a_long_shared_doc_wraps_with_continuation_indent() -> None:
    lines = shared_doc_lines("reward", "        ").splitlines()
    assert len(lines) > 1 and all(len(line) <= 110 for line in lines)
    assert lines[0].startswith("        reward: ") and all(line.startswith(" " * 12) for line in lines[1:])
    assert re.sub(r"\s+", " ", " ".join(lines)).strip() == "reward: " + OPTION_DOCS["reward"]


def test_an_option_without_a_shared_doc_fails_at_class_creation() -> None:
    with pytest.raises(KeyError, match="no shared doc for option 'beta'"):

        @with_shared_docs
        class Broken:
            """Broken.

            Args:
                beta: {shared}
            """


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_documents_every_option_for_the_cli(method: str) -> None:
    """Each ``model.`` option of each method has a doc in --help, and no placeholder is left."""
    module_class = METHODS[method].module_class
    assert "{shared}" not in (module_class.__doc__ or "")
    parser = ArgumentParser()
    parser.add_class_arguments(module_class, "model")
    helps = {
        action.dest.removeprefix("model."): action.help or ""
        for action in parser._actions
        if action.dest.startswith("model.") and action.dest.count(".") == 1
    }
    assert {"optimizer", "lr_schedule", "dtype", "max_length"} <= set(helps)
    for name, text in helps.items():
        assert text.strip(), f"model.{name} of method {method} has no doc"
    # Filled from OPTION_DOCS in every method (a method may keep its own text for other shared names).
    for name in ("optimizer", "warmup_steps", "gradient_checkpointing"):
        assert re.sub(r"\s+", " ", helps[name]).startswith(OPTION_DOCS[name]), (method, name)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("warmup_steps", -1, "model.warmup_steps must be >= 0, got -1"),
        ("warmup_ratio", 1.0, r"model.warmup_ratio must be in \[0, 1\), got 1.0"),
        ("min_lr_ratio", 1.5, r"model.min_lr_ratio must be in \[0, 1\], got 1.5"),
    ],
)
def test_every_method_refuses_a_bad_schedule_option_at_start_up(
    tiny_model_dir: Path, method: str, option: str, value: float, message: str
) -> None:
    module_class = METHODS[method].module_class
    required = {"reward": "ipo_lightning.gold:gold_reward"} if method in ("rloo", "online") else {}
    with pytest.raises(ConfigError, match=f"^{message}$"):
        module_class(model_name_or_path=str(tiny_model_dir), **required, **{option: value})
