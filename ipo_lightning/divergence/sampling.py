"""Sequence-level KL(pi || ref) estimated from completions sampled from the policy.

For a prompt x and y ~ pi(. | x), ``log pi(y|x) - log ref(y|x)`` is an unbiased sample of the
sequence KL. :func:`sample_completions` draws y with the project's one sampler
(:func:`ipo_lightning.generation.generate_completions`: ancestral, temperature 1, full softmax, one
generator per (seed, prompt, sample), batched with the KV cache), then scores exactly the drawn
tokens under both models with one teacher-forced forward per model and batch through the training
path (:func:`ipo_lightning.batching.batch_scores`); :func:`estimate_sequence_kl` averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ipo_lightning.batching import Batching, batch_scores
from ipo_lightning.generation import generate_completions


@dataclass
class SampledKL:
    """Monte-Carlo estimate of the sequence-level KL(pi || ref) from samples y ~ pi(. | x)."""

    mean: float
    """Mean of log pi(y|x) - log ref(y|x) over the samples: an unbiased estimate of the KL."""
    stderr: float
    """Standard error of that mean."""
    mean_length: float
    """Mean number of generated tokens (EOS included)."""
    samples: int


@dataclass
class SequenceSample:
    """One completion sampled from the policy, with its sequence log-ratio."""

    prompt_index: int
    """Position of the prompt in the caller's full prompt list (what seeded its generator)."""
    prompt: Tensor
    completion: Tensor
    """Sampled tokens, EOS included when one was drawn."""
    log_ratio: float
    """log pi(completion | prompt) - log ref(completion | prompt)."""


def _scoring_batch(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(input_ids, attention_mask, completion_mask)`` of (prompt, completion) rows, as
    the collator lays out a completion to score (the padding value is never attended to or scored)."""
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, :end] = 1
        completion_mask[row, len(prompt) : end] = True
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batching: Batching = "padded",
    batch_size: int = 64,
    chunk_size: int = 1024,
) -> list[float]:
    """``log model(completion | prompt)`` of each (prompt, completion) row, summed in float64.

    Teacher forcing through :func:`~ipo_lightning.batching.batch_scores`, ``batch_size`` rows per
    forward. Scoring each model on its own lets a caller hold one model in memory at a time.
    """
    device = next(model.parameters()).device
    sums: list[float] = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        tensors = tuple(t.to(device) for t in _scoring_batch(part))
        scores = batch_scores(model, *tensors, batching=batching, chunk_size=chunk_size)
        logps = scores.token_logps.double()
        sums += logps.new_zeros(len(part)).index_add(0, scores.sequence_ids, logps).tolist()
    return sums


def sequence_log_ratios(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batching: Batching = "padded",
    batch_size: int = 64,
    chunk_size: int = 1024,
) -> list[float]:
    """``log pi(completion | prompt) - log ref(completion | prompt)`` of each (prompt, completion) row
    (:func:`sequence_logprobs` of both models)."""
    scoring = {"batching": batching, "batch_size": batch_size, "chunk_size": chunk_size}
    mine = sequence_logprobs(policy, rows, **scoring)
    theirs = sequence_logprobs(reference, rows, **scoring)
    return [a - b for a, b in zip(mine, theirs, strict=True)]


def draw_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Tensor],
    *,
    prompt_indices: Sequence[int] | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[Tensor]]:
    """``samples_per_prompt`` completions of each prompt drawn from ``model`` (token ids, EOS included).

    :func:`~ipo_lightning.generation.generate_completions`: ancestral sampling from the full softmax at
    temperature 1 (whatever the model's generation config says); a completion ends at the model's EOS
    (see :func:`~ipo_lightning.generation.stop_token_ids`) or after ``max_new_tokens``. Sample j of
    prompt i draws from its own generator seeded by ``(seed, prompt_indices[i], j)``, so a prompt's
    samples do not depend on the other prompts drawn with it, and two models drawing with the same
    seed pair their samples up. The global RNG is never drawn from, so measuring does not change
    training.
    """
    drawn = generate_completions(
        model,
        tokenizer,
        [prompt.tolist() for prompt in prompts],
        k=samples_per_prompt,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        prompt_indices=prompt_indices,
    )
    return [[torch.tensor(c.token_ids, dtype=torch.long) for c in per_prompt] for per_prompt in drawn]


def sample_completions(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Tensor],
    *,
    prompt_indices: Sequence[int] | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    batching: Batching = "padded",
    chunk_size: int = 1024,
) -> list[SequenceSample]:
    """Completions drawn from the policy (:func:`draw_completions`), each scored under both models.

    The samples come from the policy's full softmax at temperature 1, so their log-ratios give an
    unbiased estimate of the sequence KL; processes that split the prompts between them (each
    passing its ``prompt_indices``) draw what one process drawing them all would.

    Args:
        policy: causal LM to sample from.
        reference: causal LM to compare with (only scored, never sampled from).
        tokenizer: the models' tokenizer (padding id and EOS fallback of the sampler).
        prompts: 1-D token id tensors, one per prompt.
        prompt_indices: each prompt's index in the full list (default ``0..len(prompts)-1``).
        samples_per_prompt: completions drawn per prompt.
        max_new_tokens: longest completion.
        seed: base seed of the per-sample generators.
        batch_size: rows per ``generate`` call and per scoring forward.
        batching: layout of the scoring forwards (``padded`` or ``padding_free``).
        chunk_size: positions per float32 chunk of the log-softmax.

    Returns:
        The samples, prompt by prompt, ``samples_per_prompt`` each.
    """
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    drawn = draw_completions(
        policy,
        tokenizer,
        prompts,
        prompt_indices=indices,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    owned = [
        (index, prompt.cpu(), completion)
        for index, prompt, per_prompt in zip(indices, prompts, drawn, strict=True)
        for completion in per_prompt
    ]
    rows = [(prompt.tolist(), completion.tolist()) for _, prompt, completion in owned]
    ratios = sequence_log_ratios(
        policy, reference, rows, batching=batching, batch_size=batch_size, chunk_size=chunk_size
    )
    return [
        SequenceSample(index, prompt, completion, ratio)
        for (index, prompt, completion), ratio in zip(owned, ratios, strict=True)
    ]


def estimate_sequence_kl(samples: list[SequenceSample]) -> SampledKL:
    """The sequence-KL estimate of ``samples``: mean log-ratio, its standard error, mean length."""
    if not samples:
        raise ValueError("no samples to estimate the sequence KL from")
    values = torch.tensor([sample.log_ratio for sample in samples], dtype=torch.float64)
    stderr = float(values.std(unbiased=True) / len(values) ** 0.5) if len(values) > 1 else float("nan")
    mean_length = sum(sample.completion.numel() for sample in samples) / len(samples)
    return SampledKL(mean=float(values.mean()), stderr=stderr, mean_length=mean_length, samples=len(samples))


def sampled_sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Tensor],
    **sampling: Any,
) -> tuple[SampledKL, list[SequenceSample]]:
    """:func:`sample_completions` (same keyword arguments) and the estimate from its samples."""
    samples = sample_completions(policy, reference, tokenizer, prompts, **sampling)
    return estimate_sequence_kl(samples), samples
