"""A reward module whose own import fails: it needs a package that is not installed."""

import ipo_lightning_no_such_dependency  # noqa: F401


def reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Never reached."""
    return [0.0] * len(prompts)
