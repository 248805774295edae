"""Token-level divergence between the policy and the reference, computed exactly and memory-lean.

For every scored position t of a completion, with p = pi(. | x, y_<t) and q = ref(. | x, y_<t) over
the whole vocabulary:

    KL(pi || ref)_t = sum_v p_v (log p_v - log q_v)        (``kl``)
    KL(ref || pi)_t = sum_v q_v (log q_v - log p_v)        (``kl_reverse``)
    H(pi)_t         = -sum_v p_v log p_v                   (``entropy``)

The sums run in float32 over chunks of positions, so no float32 [rows, length, vocab] tensor exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
