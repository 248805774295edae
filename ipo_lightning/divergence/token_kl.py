"""Token-level divergence between the policy and the reference, computed exactly and memory-lean.

For every scored position t of a completion, with p = pi(. | x, y_<t) and q = ref(. | x, y_<t) over
the whole vocabulary:

    KL(pi || ref)_t = sum_v p_v (log p_v - log q_v)        (``kl``)
    KL(ref || pi)_t = sum_v q_v (log q_v - log p_v)        (``kl_reverse``)
    H(pi)_t         = -sum_v p_v log p_v                   (``entropy``)

The sums run in float32 over chunks of positions, so no float32 [rows, length, vocab] tensor exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class TokenDivergence:
    """Sums over scored positions of the per-token KL, reverse KL and entropy, plus their count."""

    kl: float = 0.0
    kl_reverse: float = 0.0
    entropy: float = 0.0
    tokens: int = 0

    def add(self, other: TokenDivergence) -> None:
        """Accumulate another batch's sums."""
        self.kl += other.kl
        self.kl_reverse += other.kl_reverse
        self.entropy += other.entropy
        self.tokens += other.tokens

    @torch.no_grad()
    def add_positions(self, policy_logits: Tensor, reference_logits: Tensor) -> None:
        """Accumulate the sums of a chunk of positions: ``[c, V]`` policy and reference logits."""
        log_p = torch.log_softmax(policy_logits.float(), dim=-1)
        log_q = torch.log_softmax(reference_logits.float(), dim=-1)
        p, q = log_p.exp(), log_q.exp()
        self.kl += float((p * (log_p - log_q)).sum())
        self.kl_reverse += float((q * (log_q - log_p)).sum())
        self.entropy += float(-(p * log_p).sum())
        self.tokens += policy_logits.shape[0]

    def means(self) -> dict[str, float]:
        """Per-token means (0 when nothing was scored)."""
        count = max(self.tokens, 1)
        return {"kl": self.kl / count, "kl_reverse": self.kl_reverse / count, "entropy": self.entropy / count}


@torch.no_grad()
def token_divergence(
    policy_logits: Tensor, reference_logits: Tensor, mask: Tensor, *, chunk_size: int = 1024
) -> TokenDivergence:
    """Sum KL(pi||ref), KL(ref||pi) and H(pi) over the positions where ``mask`` is True.

    Args:
        policy_logits: [N, T, V] policy logits; position t predicts token t + 1.
        reference_logits: [N, T, V] reference logits for the same rows.
        mask: [N, T] bool, True at the positions to score (those predicting a completion token).
        chunk_size: positions per float32 chunk.
    """
    vocab = policy_logits.shape[-1]
    flat_policy = policy_logits.reshape(-1, vocab)
    flat_reference = reference_logits.reshape(-1, vocab)
    flat_mask = mask.reshape(-1)

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        # Select inside the chunk, so at most one chunk of positions is ever copied.
        for start in range(0, flat_mask.numel(), chunk_size):
            keep = flat_mask[start : start + chunk_size]
            if bool(keep.any()):
                yield (
                    flat_policy[start : start + chunk_size][keep],
                    flat_reference[start : start + chunk_size][keep],
                )

    return chunked_token_divergence(chunks())


def chunked_token_divergence(chunks: Iterable[tuple[Tensor, Tensor]]) -> TokenDivergence:
    """Sum KL(pi||ref), KL(ref||pi) and H(pi) over chunks of aligned positions.

    Args:
        chunks: ``(policy [c, V], reference [c, V])`` logits of the same ``c`` positions, chunk by
            chunk (e.g. :meth:`ipo_lightning.batching.KeptLogits.scored_chunks` of both models).
    """
    total = TokenDivergence()
    for policy_chunk, reference_chunk in chunks:
        total.add_positions(policy_chunk, reference_chunk)
    return total


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
