"""The metrics of a generation evaluation on one prompt set: pure functions of rewards and token ids.

Names (without the ``gen/`` prefix) and definitions, for ``k`` samples of each of ``P`` prompts:

- ``reward``: mean reward of all ``P * k`` policy samples; ``reference_reward``: the same for the
  reference's samples; ``greedy_reward``: mean reward of the policy's greedy completions (one per prompt).
- ``win_rate``: paired win rate: policy sample j of prompt i against reference sample j of prompt i
  (drawn with the same generator seed), a win 1, a tie 1/2, a loss 0, averaged over all ``P * k`` pairs;
  ``win_rate_ci_low``/``win_rate_ci_high``: its 95% normal-approximation interval
  ``rate +- 1.96 * sd(prompt means) / sqrt(P)``, clipped to [0, 1] (:func:`win_rate`). The ``k``
  outcomes of one prompt are correlated (a prompt the policy handles well tends to win all its
  samples), so the spread comes from the per-prompt mean outcomes, not from the ``P * k`` outcomes as if
  they were independent (which would make the interval too narrow); with ``k = 1`` the two agree.
- ``length``: mean number of generated tokens per sample, the EOS token included when generated.
- ``eos_rate``: share of samples that ended with an EOS token within ``max_new_tokens``.
- ``distinct_2``: distinct token bigrams / total token bigrams, pooled over all policy samples of the set
  (bigrams within each sample, on token ids, the EOS token left out); 0 when no sample has two tokens.
- ``repetition``: per sample, the share of its token trigrams that already occurred earlier in the same
  sample (``1 - distinct / total`` trigrams, EOS left out), averaged over the samples that have at least
  one trigram; 0 when none has.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

REPETITION_N = 3
"""The n of the n-grams whose repeats ``repetition`` counts."""
Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


@dataclass
class WinRate:
    """How often the policy's completion out-scores the reference's, with a 95% confidence interval.

    Attributes:
        win_rate: mean outcome (win 1, tie 1/2, loss 0) over all pairs.
        ci_low: lower end of the interval, at least 0.
        ci_high: upper end of the interval, at most 1.
        prompts: the number of prompts (P).
        wins: pairs the policy won.
        ties: pairs with equal scores.
        losses: pairs the policy lost.
    """

    win_rate: float
    ci_low: float
    ci_high: float
    prompts: int
    wins: int
    ties: int
    losses: int


def win_rate(
    policy_scores: Sequence[float],
    reference_scores: Sequence[float],
    *,
    samples_per_prompt: int = 1,
    z: float = Z_95,
) -> WinRate:
    """Paired win rate of ``policy_scores`` over ``reference_scores``, ties counting half.

    The scores are in (prompt, sample) order: pairs ``i * k`` to ``i * k + k - 1`` are the
    ``k = samples_per_prompt`` pairs of prompt ``i``. The interval is ``rate +- z * se`` with the
    cluster-robust standard error ``se = sd(per-prompt mean outcomes) / sqrt(P)``, so samples of one
    prompt are not counted as independent evidence; one prompt gives a zero-width interval.

    Raises:
        ValueError: the lists differ in length, are empty, or do not split into prompts of ``k`` pairs.
    """
    if len(policy_scores) != len(reference_scores) or not policy_scores:
        raise ValueError("need the same, non-zero number of policy and reference scores")
    k = samples_per_prompt
    if k < 1 or len(policy_scores) % k:
        raise ValueError(f"{len(policy_scores)} pairs do not split into prompts of {k} samples")
    pairs = zip(policy_scores, reference_scores, strict=True)
    outcomes = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in pairs]
    means = [statistics.fmean(outcomes[start : start + k]) for start in range(0, len(outcomes), k)]
    rate = statistics.fmean(outcomes)
    spread = statistics.stdev(means) if len(means) > 1 else 0.0
    half_width = z * spread / math.sqrt(len(means))
    return WinRate(
        win_rate=rate,
        ci_low=max(0.0, rate - half_width),
        ci_high=min(1.0, rate + half_width),
        prompts=len(means),
        wins=outcomes.count(1.0),
        ties=outcomes.count(0.5),
        losses=outcomes.count(0.0),
    )


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams of ``tokens`` in order (none when there are fewer than ``n`` tokens)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / total n-grams pooled over ``samples`` (0 when there are no n-grams)."""
    grams = [gram for tokens in samples for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(samples: Sequence[Sequence[int]], n: int = REPETITION_N) -> float:
    """Mean over samples with n-grams of the share of a sample's n-grams seen earlier in it (0 if none)."""
    shares = []
    for tokens in samples:
        grams = ngrams(tokens, n)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return statistics.fmean(shares) if shares else 0.0


def set_metrics(
    policy_rewards: Sequence[float],
    reference_rewards: Sequence[float],
    content_tokens: Sequence[Sequence[int]],
    lengths: Sequence[int],
    ended: Sequence[bool],
    greedy_rewards: Sequence[float] = (),
    *,
    samples_per_prompt: int,
) -> dict[str, float]:
    """The metrics of one set (module docstring), from per-sample values in the same (prompt, sample) order.

    Args:
        policy_rewards: reward of each policy sample.
        reference_rewards: reward of the reference sample paired with it.
        content_tokens: each policy sample's generated token ids without the EOS token.
        lengths: each policy sample's generated token count, EOS included.
        ended: whether each policy sample ended with EOS.
        greedy_rewards: rewards of the greedy completions (empty: no ``greedy_reward``).
        samples_per_prompt: k, the consecutive samples of each prompt (the win rate's clusters).
    """
    wins = win_rate(policy_rewards, reference_rewards, samples_per_prompt=samples_per_prompt)
    metrics = {
        "reward": statistics.fmean(policy_rewards),
        "win_rate": wins.win_rate,
        "win_rate_ci_low": wins.ci_low,
        "win_rate_ci_high": wins.ci_high,
        "reference_reward": statistics.fmean(reference_rewards),
        "length": statistics.fmean(lengths),
        "eos_rate": sum(ended) / len(ended),
        "distinct_2": distinct_n(content_tokens, 2),
        "repetition": repetition(content_tokens),
    }
    if greedy_rewards:
        metrics["greedy_reward"] = statistics.fmean(greedy_rewards)
    return metrics
