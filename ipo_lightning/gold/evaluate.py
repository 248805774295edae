"""Gold reward of a model's samples on the gold task's own prompt lists (no run, no data module).

For a tuned run, ``python -m ipo_lightning evaluate RUN_DIR`` judges the policy against the reference
on the run's held-out sets (:mod:`ipo_lightning.analysis.evaluate`); this is the bare version for a
single model, e.g. to check the reference itself. Both sample through
:func:`ipo_lightning.generation.generate_completions`.
"""

from __future__ import annotations

from ipo_lightning.generation import sample_completions
from ipo_lightning.gold.language import split_requests
from ipo_lightning.gold.pairs import MAX_NEW_TOKENS
from ipo_lightning.gold.reward import gold_reward


def sampled_rewards(
    model, tokenizer, split: str, *, prompts: int, k: int, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[float]:
    """Gold rewards of ``k`` samples for each of the first ``prompts`` prompts of ``split``, prompt-major."""
    texts = [request.text for request in split_requests(split)[:prompts]]
    completions = sample_completions(model, tokenizer, texts, k, seed, max_new_tokens)
    return gold_reward([t for t in texts for _ in range(k)], [c for row in completions for c in row])
