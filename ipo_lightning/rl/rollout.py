"""One on-policy rollout: sample completions of a batch of prompts, reward them, score them.

What every on-policy method shares (:class:`~ipo_lightning.rl.module.OnPolicyModule` calls these):

- :func:`completion_rows` lays the sampled completions out as the collator's right-padded rows
  (prompt + completion, ``completion_mask`` on the completion tokens, EOS included when one was
  generated), so policy and reference score them through the project's one scoring path,
  :func:`~ipo_lightning.batching.batch_logits` and :meth:`~ipo_lightning.batching.KeptLogits.scores`.
- :func:`score_rows` returns the per-sequence summed log-probs (with autograd for the policy) and,
  from the same forward's logits, the policy's per-token entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipo_lightning.batching import Batching, SequenceScores, batch_logits
from ipo_lightning.data.prompts import HeldOutPrompt
from ipo_lightning.generation import Completion


@dataclass(frozen=True)
class Rollout:
    """The samples of B prompts, k per prompt, and everything the losses and metrics need.

    Tensors are ``[B, k]`` (sample j of prompt i at ``[i, j]``) unless said otherwise.
    """

    prompts: list[HeldOutPrompt]
    """The B prompts (text and messages as the reward reads them, ids as the policy continued them)."""
    completions: list[list[Completion]]
    """``completions[i][j]``: sample j of prompt i."""
    rewards: Tensor
    """The reward's scores (float32), as the reward returned them."""
    shaped_rewards: Tensor
    """``rewards`` minus ``missing_eos_penalty`` for samples that did not end (equal without one)."""
    policy_logps: Tensor
    """Summed completion log-probs under the policy (with autograd in training)."""
    reference_logps: Tensor
    """Summed completion log-probs under the reference (no autograd)."""
    lengths: Tensor
    """Completion tokens (long), EOS included when one was generated."""
    ended: Tensor
    """Whether each sample ended with EOS (bool)."""
    entropy: Tensor
    """[M] the policy's entropy (nats) at every sampled completion token, detached."""

    @property
    def kl(self) -> Tensor:
        """Per-sequence ``log pi(y) - log ref(y)`` of the samples (detached): the sampled sequence KL."""
        return (self.policy_logps - self.reference_logps).detach()


def completion_rows(
    prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows ``prompt + completion``: ``(input_ids, attention_mask, completion_mask)``, [N, T].

    Row n is ``prompt_ids[n] + completions[n]``; ``completion_mask`` is True on the completion tokens.
    """
    if len(prompt_ids) != len(completions):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completions)} completions")
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completions, strict=True))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    completion_mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completions, strict=True)):
        ids = [*prompt, *completion]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, len(prompt) : len(ids)] = True
    return input_ids, attention_mask, completion_mask


def score_rows(
    model: nn.Module,
    rows: tuple[Tensor, Tensor, Tensor],
    *,
    batching: Batching,
    chunk_size: int,
    entropy: bool,
) -> tuple[SequenceScores, Tensor | None]:
    """Completion log-probs of ``rows`` under ``model`` (one forward) and, with ``entropy``, the per-token
    entropy ``-sum_v p_v log p_v`` of its full distribution at each scored position (detached).

    The entropy comes from the very logits the log-probs do, in the same canonical token order.
    """
    kept = batch_logits(model, *rows, batching=batching)
    scores = kept.scores(chunk_size=chunk_size)
    if not entropy:
        return scores, None
    with torch.no_grad():
        parts = []
        for chunk in kept.scored_chunks(chunk_size):
            logp = chunk.float().log_softmax(dim=-1)
            parts.append(-(logp.exp() * logp).sum(dim=-1))
        entropies = torch.cat(parts) if parts else scores.token_logps.new_zeros(0)
    return scores, entropies
