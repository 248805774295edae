"""The options of the generation evaluation and their defaults (:mod:`ipo_lightning.evaluation`).

Their own module, free of torch and transformers, so ``judge`` and ``evaluate`` build their
``--help`` and check their arguments without importing the models' packages.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PROMPTS = 64
"""Held-out prompts judged per set when none is given (the first N distinct prompts)."""


@dataclass(frozen=True)
class EvalOptions:
    """How each model generates; the defaults are those of every command and of ``--generation.*``.

    Attributes:
        samples_per_prompt: sampled completions per prompt (k); 0: none, the greedy completion only.
        greedy: also one greedy completion per prompt (``greedy_reward``).
        max_new_tokens: longest completion.
        batch_size: rows (prompt x sample) per ``generate`` call.
        seed: base seed of the per-sample generators.
    """

    samples_per_prompt: int = 4
    greedy: bool = True
    max_new_tokens: int = 64
    batch_size: int = 64
    seed: int = 0
