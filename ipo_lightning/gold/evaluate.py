"""Judging what a model *generates* on the gold task: mean gold reward and win rate over the reference.

For held-out prompts (``val``: new prompts of the training families, ``ood``: new families) each
model samples ``k`` completions per prompt (temperature 1, the same seeds for both models); the
gold reward scores every sample. Sample j of the policy and sample j of the reference for the
same prompt form one paired comparison (a win, a tie counting half, or a loss).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from ipo_lightning.analysis.judge import win_rate
from ipo_lightning.generation import sample_completions
from ipo_lightning.gold.language import split_requests
from ipo_lightning.gold.pairs import MAX_NEW_TOKENS
from ipo_lightning.gold.reward import gold_reward


@dataclass
class GoldComparison:
    """Mean gold reward of policy and reference samples on one split, and the paired win rate."""

    split: str
    samples: int
    policy_reward: float
    reference_reward: float
    win_rate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain values, for JSON."""
        return asdict(self)


def sampled_rewards(
    model, tokenizer, split: str, *, prompts: int, k: int, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[float]:
    """Gold rewards of ``k`` samples for each of the first ``prompts`` prompts of ``split``, prompt-major."""
    texts = [request.text for request in split_requests(split)[:prompts]]
    completions = sample_completions(model, tokenizer, texts, k, seed, max_new_tokens)
    return gold_reward([t for t in texts for _ in range(k)], [c for row in completions for c in row])


def compare(
    policy, reference, tokenizer, split: str, *, prompts: int, k: int, seed: int = 0
) -> GoldComparison:
    """Sample from both models on ``split`` and compare their gold rewards pair by pair."""
    policy_rewards = sampled_rewards(policy, tokenizer, split, prompts=prompts, k=k, seed=seed)
    reference_rewards = sampled_rewards(reference, tokenizer, split, prompts=prompts, k=k, seed=seed)
    wins = win_rate(policy_rewards, reference_rewards)
    return GoldComparison(
        split=split,
        samples=len(policy_rewards),
        policy_reward=statistics.fmean(policy_rewards),
        reference_reward=statistics.fmean(reference_rewards),
        win_rate=wins.win_rate,
        ci_low=wins.ci_low,
        ci_high=wins.ci_high,
    )
