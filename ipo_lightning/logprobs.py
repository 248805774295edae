"""The float32 log-softmax kernel behind every completion log-prob.

``logp(y|x) = sum_t log pi(y_t | x, y_<t)`` over completion tokens only; which positions are scored
and how rows are laid out is :mod:`ipo_lightning.batching`'s job, this module only turns logits into
picked log-probs.

Memory: the naive ``log_softmax(logits.float())`` keeps a float32 [N, T, V] tensor alive for the
backward pass (and another for its gradient). :func:`token_logprobs` computes ``logit[label] -
logsumexp(logits)`` a chunk of tokens at a time and recomputes the softmax chunk-wise in the backward
pass, so beyond the logits themselves only one float32 chunk exists at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """``log_softmax(logits)[labels]`` in float32, chunked over tokens in forward and backward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        out = torch.empty(flat_labels.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, flat_labels.numel(), chunk_size):
            chunk = flat_logits[start : start + chunk_size].float()
            picked = chunk.gather(-1, flat_labels[start : start + chunk_size, None]).squeeze(-1)
            out[start : start + chunk_size] = picked - torch.logsumexp(chunk, dim=-1)
        ctx.save_for_backward(logits, labels)
        ctx.chunk_size = chunk_size
        return out.view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        logits, labels = ctx.saved_tensors
        flat_logits = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        flat_grad_out = grad_output.reshape(-1).float()
        grad = torch.empty_like(flat_logits)
        for start in range(0, flat_labels.numel(), ctx.chunk_size):
            stop = start + ctx.chunk_size
            g_out = flat_grad_out[start:stop, None]
            # d logp / d logits = onehot(label) - softmax(logits); in place on the fresh softmax buffer.
            chunk_grad = torch.softmax(flat_logits[start:stop].float(), dim=-1).mul_(-g_out)
            chunk_grad.scatter_add_(-1, flat_labels[start:stop, None], g_out)
            grad[start:stop] = chunk_grad
        return grad.view(logits.shape), None, None


def token_logprobs(logits: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Exact ``log softmax(logits)[..., labels]`` in float32, memory-lean (see module docstring).

    Args:
        logits: [N, T, V] scores (any float dtype).
        labels: [N, T] token ids whose log-probs are wanted (already aligned with ``logits``).
        chunk_size: tokens per chunk; peak extra memory is ``chunk_size * V`` float32 values.

    Returns:
        [N, T] float32 log-probs.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedTokenLogProbs.apply(logits, labels, chunk_size)
