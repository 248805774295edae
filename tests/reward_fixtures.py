"""Rewards loaded by ``module:function`` specs in tests/test_rewards.py: one good, the others broken."""

from __future__ import annotations

import math

NOT_CALLABLE = 3.0


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Characters in each completion minus a tenth of the prompt's: depends on both arguments."""
    pairs = zip(prompts, completions, strict=True)
    return [len(completion) - len(prompt) / 10 for prompt, completion in pairs]


class Scorer:
    """Holds a reward as a static method, reached by a dotted attribute path."""

    @staticmethod
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        """Every completion scores 1."""
        return [1.0] * len(prompts)


def prompts_only(prompts: list[str]) -> list[float]:
    """Takes one list: cannot be called with prompts and completions."""
    return [0.0] * len(prompts)


def keyword_only(*, prompts: list[str], completions: list[str]) -> list[float]:
    """Takes keywords only: cannot be called with two positional lists."""
    return [0.0] * len(prompts)


def one_short(prompts: list[str], completions: list[str]) -> list[float]:
    """One value too few."""
    return [0.0] * (len(prompts) - 1)


def nan_at_last(prompts: list[str], completions: list[str]) -> list[float]:
    """The last value is NaN."""
    return [0.0] * (len(prompts) - 1) + [math.nan]


def inf_at_first(prompts: list[str], completions: list[str]) -> list[float]:
    """The first value is infinite."""
    return [math.inf] + [0.0] * (len(prompts) - 1)


def bool_at_second(prompts: list[str], completions: list[str]) -> list[object]:
    """A bool is not a score."""
    return [0.0, True] + [0.0] * (len(prompts) - 2)


def text_values(prompts: list[str], completions: list[str]) -> list[object]:
    """Numbers written as strings."""
    return ["1.0"] * len(prompts)


def none_value(prompts: list[str], completions: list[str]) -> list[object]:
    """A missing value."""
    return [None] * len(prompts)


def a_string(prompts: list[str], completions: list[str]) -> str:
    """Not a sequence of numbers at all."""
    return "1.0"


RECORD_DIR_VAR = "IPO_TEST_REWARD_RECORDS"
"""Environment variable naming the folder :func:`recorded_length_reward` writes its calls to."""


def recorded_length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """:func:`length_reward`, and one JSON line per call (its ``[prompt, completion, reward]`` rows)
    appended to ``$IPO_TEST_REWARD_RECORDS/<process id>.jsonl``: what each process sampled, in order."""
    import json
    import os

    scores = length_reward(prompts, completions)
    rows = [list(row) for row in zip(prompts, completions, scores, strict=True)]
    path = os.path.join(os.environ[RECORD_DIR_VAR], f"{os.getpid()}.jsonl")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(rows) + "\n")
    return scores
