"""Sequence-level KL(pi || ref) estimated from completions sampled from the policy.

For a prompt x and y ~ pi(. | x), ``log pi(y|x) - log ref(y|x)`` is an unbiased sample of the
sequence KL. :func:`sample_completions` draws y by plain ancestral sampling (temperature 1, full
softmax) and scores every drawn token under both models; :func:`estimate_sequence_kl` averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
    """Position of the prompt in the caller's full prompt list (what seeded its RNG)."""
    prompt: Tensor
    completion: Tensor
    """Sampled tokens, EOS included when one was drawn."""
    log_ratio: float
    """log pi(completion | prompt) - log ref(completion | prompt)."""


@torch.no_grad()
def sample_completions(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompts: list[Tensor],
    *,
    prompt_indices: list[int] | None = None,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
) -> list[SequenceSample]:
    """Sample completions from the policy at temperature 1, scoring each under both models.

    Sampling is plain ancestral sampling from the policy's full softmax (no top-k, top-p or
    penalties, whatever the model's generation config says), so the log-ratios give an unbiased
    estimate of the sequence KL. A sequence ends at ``eos_token_id`` (included) or after
    ``max_new_tokens``; its log-probs under both models are those of exactly the tokens sampled.

    Prompt ``i`` draws from an RNG seeded with ``seed + i``, so a prompt's samples do not depend on
    which other prompts are sampled with it: processes that split the prompts between them (pass
    each its ``prompt_indices``) draw exactly what one process drawing them all would. The global RNG
    is left untouched (a forked one is used), so measuring does not change training.

    Args:
        policy: causal LM to sample from.
        reference: causal LM to compare with.
        prompts: 1-D token id tensors, one per prompt.
        prompt_indices: each prompt's index in the full list (default ``0..len(prompts)-1``).
        samples_per_prompt: completions drawn per prompt.
        max_new_tokens: longest completion.
        eos_token_id: token(s) that end a completion (None: always ``max_new_tokens`` tokens).
        seed: base seed of the sampling RNG.
    """
    device = next(policy.parameters()).device
    stop_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(indices)} prompt_indices")
    samples: list[SequenceSample] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, prompt in zip(indices, prompts, strict=True):
            torch.manual_seed(seed + index)
            for _ in range(samples_per_prompt):
                ids = prompt.to(device)[None]
                log_ratio = 0.0
                for _ in range(max_new_tokens):
                    # No KV cache: simple and exact; measurements use few, short samples.
                    log_p = torch.log_softmax(
                        policy(input_ids=ids, use_cache=False).logits[0, -1].float(), -1
                    )
                    log_q = torch.log_softmax(
                        reference(input_ids=ids, use_cache=False).logits[0, -1].float(), -1
                    )
                    token = torch.multinomial(log_p.exp(), 1)
                    log_ratio += float(log_p[token] - log_q[token])
                    ids = torch.cat([ids, token[None]], dim=1)
                    if int(token) in stop_ids:
                        break
                completion = ids[0, prompt.numel() :].cpu()
                samples.append(SequenceSample(index, prompt.cpu(), completion, log_ratio))
    return samples


def estimate_sequence_kl(samples: list[SequenceSample]) -> SampledKL:
    """The sequence-KL estimate of ``samples``: mean log-ratio, its standard error, mean length."""
    if not samples:
        raise ValueError("no samples to estimate the sequence KL from")
    values = torch.tensor([sample.log_ratio for sample in samples], dtype=torch.float64)
    stderr = float(values.std(unbiased=True) / len(values) ** 0.5) if len(values) > 1 else float("nan")
    mean_length = sum(sample.completion.numel() for sample in samples) / len(samples)
    return SampledKL(mean=float(values.mean()), stderr=stderr, mean_length=mean_length, samples=len(samples))


def sampled_sequence_kl(
    policy: torch.nn.Module, reference: torch.nn.Module, prompts: list[Tensor], **sampling: Any
) -> tuple[SampledKL, list[SequenceSample]]:
    """:func:`sample_completions` (same keyword arguments) and the estimate from its samples."""
    samples = sample_completions(policy, reference, prompts, **sampling)
    return estimate_sequence_kl(samples), samples
