"""Judging what a model generates: sample held-out prompts, score the samples with a reward, compare.

The one code path of the generation evaluation during training
(:class:`~ipo_lightning.callbacks.generation_eval.GenerationEval`) and of
``python -m ipo_lightning evaluate`` on a finished run:

1. :func:`judge_prompts`: a model's ``k`` samples (and optionally its greedy completion) for some
   prompts of a set, each scored by the reward. Sample j of the prompt with index i is drawn from a
   generator seeded by ``(seed, i, j)`` (:func:`ipo_lightning.generation.generate_completions`), so the
   policy's and the reference's sample j of a prompt share a seed, and processes that split the prompts
   (:func:`share`) draw what one process would.
2. :func:`merge`: the processes' parts in prompt order.
3. :func:`set_result`: the metrics of the set (:mod:`ipo_lightning.generation_metrics`) and the rows of
   the samples file; or, for greedy completions only (``judge``), :func:`greedy_win_rate`.

The sampled sequence KL (``kl``): :func:`sample_logprobs` scores the policy's samples teacher-forced
under a model through the one scoring path of the divergence monitor's ``seq_kl``
(:func:`ipo_lightning.divergence.sampling.sequence_logprobs`), once under the policy and once under
the reference (one model in memory at a time is enough), and :func:`with_log_ratios` keeps their
differences; ``kl`` is their mean over every sample of the set.

Result files are written with :func:`write_atomically`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ipo_lightning.batching import Batching
from ipo_lightning.data.prompts import HeldOutPrompt, reward_conversations
from ipo_lightning.divergence.sampling import sequence_logprobs
from ipo_lightning.eval_options import EvalOptions
from ipo_lightning.generation import Completion, generate_completions, generate_with_greedy
from ipo_lightning.generation_metrics import WinRate, set_metrics, win_rate
from ipo_lightning.modeling import eval_mode
from ipo_lightning.rewards import RewardFunction

SAMPLE_FIELDS = (
    "step",
    "set",
    "prompt",
    "sample",
    "policy",
    "reference",
    "policy_reward",
    "reference_reward",
    "policy_tokens",
    "policy_ended",
    "policy_logratio",
)
"""The fields of every row of the samples file, in order (``policy_logratio``: log pi(y|x) - log ref(y|x)
of the policy sample, null when the samples were not scored)."""

KL = "kl"
"""Metric name of the sampled sequence KL(pi || ref): mean ``policy_logratio`` of the set's samples."""


@dataclass(frozen=True)
class PromptResult:
    """One model's completions of one prompt and their rewards.

    Attributes:
        index: the prompt's index in its set's prompt list.
        prompt: the prompt text (what the reward read).
        samples: the k sampled completions.
        rewards: their rewards.
        greedy: the greedy completion, when asked for.
        greedy_reward: its reward.
        log_ratios: log pi(y|x) - log ref(y|x) of each sample (:func:`with_log_ratios`); None: not scored.
    """

    index: int
    prompt: str
    samples: list[Completion]
    rewards: list[float]
    greedy: Completion | None = None
    greedy_reward: float | None = None
    log_ratios: list[float] | None = None


@dataclass(frozen=True)
class SetResult:
    """The metrics of one set (names without the ``gen/`` prefix) and its samples-file rows."""

    metrics: dict[str, float]
    rows: list[dict[str, Any]]


def share(count: int, rank: int, world: int) -> list[int]:
    """The prompt indices process ``rank`` of ``world`` judges: every ``world``-th from ``rank`` on."""
    return list(range(rank, count, world))


def _score(
    reward: RewardFunction, prompts: Sequence[HeldOutPrompt], completions: Sequence[Sequence[Completion]]
) -> list[list[float]]:
    """Reward of every completion, in one call; ``completions[i]`` are the completions of ``prompts[i]``."""
    flat_prompts = [prompt for prompt, row in zip(prompts, completions, strict=True) for _ in row]
    scores = reward(
        [prompt.text for prompt in flat_prompts],
        [completion.text for row in completions for completion in row],
        conversations=reward_conversations(flat_prompts),
    )
    rows, start = [], 0
    for row in completions:
        rows.append(scores[start : start + len(row)])
        start += len(row)
    return rows


@torch.no_grad()
def judge_prompts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[HeldOutPrompt],
    indices: Sequence[int],
    reward: RewardFunction,
    options: EvalOptions,
    *,
    greedy: bool | None = None,
) -> list[PromptResult]:
    """``model``'s samples (and greedy completions) of ``prompts`` (set indices ``indices``), scored.

    Args:
        greedy: override ``options.greedy`` (the reference's greedy completions are not needed).
    """
    if not prompts:
        return []
    ids = [prompt.ids for prompt in prompts]
    sampling = {
        "seed": options.seed,
        "max_new_tokens": options.max_new_tokens,
        "batch_size": options.batch_size,
        "prompt_indices": indices,
    }
    k = options.samples_per_prompt
    with_greedy = options.greedy if greedy is None else greedy
    if k == 0 and not with_greedy:
        raise ValueError("nothing to generate: no samples and no greedy completion")
    greedy_rows: list[list[Completion]] = [[] for _ in prompts]
    greedy_rewards: list[list[float]] = [[] for _ in prompts]
    samples: list[list[Completion]] = [[] for _ in prompts]
    if with_greedy and k == 0:
        greedy_rows = generate_completions(model, tokenizer, ids, k=1, greedy=True, **sampling)
    elif with_greedy:
        samples, greedy_completions = generate_with_greedy(model, tokenizer, ids, k=k, **sampling)
        greedy_rows = [[completion] for completion in greedy_completions]
    else:
        samples = generate_completions(model, tokenizer, ids, k=k, **sampling)
    if with_greedy:
        greedy_rewards = _score(reward, prompts, greedy_rows)
    rewards = _score(reward, prompts, samples) if k else [[] for _ in prompts]
    return [
        PromptResult(
            index=index,
            prompt=prompt.text,
            samples=row,
            rewards=row_rewards,
            greedy=greedy_row[0] if greedy_row else None,
            greedy_reward=greedy_reward[0] if greedy_reward else None,
        )
        for index, prompt, row, row_rewards, greedy_row, greedy_reward in zip(
            indices, prompts, samples, rewards, greedy_rows, greedy_rewards, strict=True
        )
    ]


@torch.no_grad()
def sample_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[HeldOutPrompt],
    results: Sequence[PromptResult],
    *,
    batching: Batching = "padded",
    batch_size: int = 64,
) -> list[list[float]]:
    """``log model(y | x)`` of every sampled completion y of ``results`` (``results[i]`` judged
    ``prompts[i]``), summed over its generated tokens, EOS included when generated.

    Teacher-forced through :func:`~ipo_lightning.divergence.sampling.sequence_logprobs` with every
    module of ``model`` in eval mode (no dropout), each put back in its mode afterwards.
    """
    rows = [
        (prompt.ids, completion.token_ids)
        for prompt, result in zip(prompts, results, strict=True)
        for completion in result.samples
    ]
    if not rows:
        return [[] for _ in results]
    with eval_mode(model):
        flat = sequence_logprobs(model, rows, batching=batching, batch_size=batch_size)
    per_prompt, start = [], 0
    for result in results:
        per_prompt.append(flat[start : start + len(result.samples)])
        start += len(result.samples)
    return per_prompt


def with_log_ratios(
    results: Sequence[PromptResult], policy_logps: list[list[float]], reference_logps: list[list[float]]
) -> list[PromptResult]:
    """``results`` with each sample's ``log pi - log ref`` (both from :func:`sample_logprobs`)."""
    return [
        replace(result, log_ratios=[a - b for a, b in zip(mine, theirs, strict=True)])
        for result, mine, theirs in zip(results, policy_logps, reference_logps, strict=True)
    ]


def merge(parts: Iterable[Sequence[PromptResult]]) -> list[PromptResult]:
    """All processes' results of one set in prompt order."""
    return sorted((result for part in parts for result in part), key=lambda result: result.index)


def set_result(
    set_name: str, step: int, policy: Sequence[PromptResult], reference: Sequence[PromptResult]
) -> SetResult:
    """Metrics and samples-file rows of one set (policy sample j of a prompt against reference sample j)."""
    if [r.index for r in policy] != [r.index for r in reference]:
        raise ValueError("policy and reference results cover different prompts")
    policy_rewards, reference_rewards, content, lengths, ended = [], [], [], [], []
    log_ratios: list[float] = []
    rows = []
    for mine, theirs in zip(policy, reference, strict=True):
        for sample, (completion, other) in enumerate(zip(mine.samples, theirs.samples, strict=True)):
            log_ratio = mine.log_ratios[sample] if mine.log_ratios is not None else None
            if log_ratio is not None:
                log_ratios.append(log_ratio)
            policy_rewards.append(mine.rewards[sample])
            reference_rewards.append(theirs.rewards[sample])
            tokens = completion.token_ids[:-1] if completion.ended else completion.token_ids
            content.append(tokens)
            lengths.append(len(completion.token_ids))
            ended.append(completion.ended)
            values = (
                step,
                set_name,
                mine.prompt,
                sample,
                completion.text,
                other.text,
                mine.rewards[sample],
                theirs.rewards[sample],
                len(completion.token_ids),
                completion.ended,
                log_ratio,
            )
            rows.append(dict(zip(SAMPLE_FIELDS, values, strict=True)))
    greedy = [r.greedy_reward for r in policy if r.greedy_reward is not None]
    k = len(policy[0].samples) if policy else 1
    metrics = set_metrics(
        policy_rewards, reference_rewards, content, lengths, ended, greedy, samples_per_prompt=k
    )
    # Every sample scored, or none (a partial mean would be another quantity).
    if log_ratios and len(log_ratios) == len(policy_rewards):
        metrics[KL] = statistics.fmean(log_ratios)
    return SetResult(metrics, rows)


def greedy_win_rate(policy: Sequence[PromptResult], reference: Sequence[PromptResult]) -> WinRate:
    """Win rate of the policy's greedy completions over the reference's, one pair per prompt."""
    if [r.index for r in policy] != [r.index for r in reference]:
        raise ValueError("policy and reference results cover different prompts")
    mine: list[float] = []
    theirs: list[float] = []
    for ours, other in zip(policy, reference, strict=True):
        if ours.greedy_reward is None or other.greedy_reward is None:
            raise ValueError(f"prompt {ours.index} lacks a greedy completion's reward")
        mine.append(ours.greedy_reward)
        theirs.append(other.greedy_reward)
    return win_rate(mine, theirs)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so the file
    is either the old one or the whole new one, never half-written (e.g. a command stopped mid-write)."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def metric_names(results: dict[str, SetResult], prefix: str = "gen/") -> dict[str, float]:
    """Logged names: each set as ``<prefix><set>/<metric>`` when there are several, and the first
    (primary) set also as plain ``<prefix><metric>`` (as ``val/`` metrics are named)."""
    named: dict[str, float] = {}
    for position, (set_name, result) in enumerate(results.items()):
        if position == 0:
            named.update({prefix + name: value for name, value in result.metrics.items()})
        if len(results) > 1:
            named.update({f"{prefix}{set_name}/{name}": value for name, value in result.metrics.items()})
    return named
