"""Per-sequence log-probabilities of completions under a causal LM.

``logp(y|x) = sum_t log pi(y_t | x, y_<t)`` over completion tokens only (prompt and padding masked
out), divided by the number of completion tokens when ``length_normalize`` is on.

Memory: the naive ``log_softmax(logits.float())`` keeps a float32 [N, T, V] tensor alive for the
backward pass (and another for its gradient). :func:`token_logprobs` computes ``logit[label] -
logsumexp(logits)`` a chunk of tokens at a time and recomputes the softmax chunk-wise in the backward
pass, so beyond the logits themselves only one float32 chunk exists at a time. The forward also asks
the model for logits from the first completion position on only (``logits_to_keep``), skipping the
vocabulary projection for the prompt.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


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


def reduce_sequence_logprobs(token_logps: Tensor, mask: Tensor, *, length_normalize: bool) -> Tensor:
    """Sum (or average, with ``length_normalize``) the token log-probs where ``mask`` is True.

    Args:
        token_logps: [N, T] per-token log-probs.
        mask: [N, T] bool, True at completion tokens.
        length_normalize: divide each sum by its number of completion tokens.

    Returns:
        [N] per-sequence log-probs.
    """
    mask = mask.to(token_logps.dtype)
    summed = (token_logps * mask).sum(dim=-1)
    if not length_normalize:
        return summed
    return summed / mask.sum(dim=-1).clamp(min=1.0)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class ScoringWindow:
    """Where a batch's completion tokens are scored from.

    ``logits`` come from :func:`window_logits`: ``logits[:, i]`` predicts ``labels[:, i]``. The last
    logit of every row predicts nothing; it gets a dummy label that ``mask`` excludes, rather than
    being sliced off (a non-contiguous view, which the chunked kernels would have to copy whole).
    """

    keep: int
    """How many trailing positions of logits are needed (``logits_to_keep``)."""
    labels: Tensor
    """[N, keep] the token each kept logit predicts."""
    mask: Tensor
    """[N, keep] bool, True where that token is a completion token."""


def scoring_window(input_ids: Tensor, completion_mask: Tensor) -> ScoringWindow:
    """The window from the batch's first completion token on: logits before it are never needed."""
    seq_len = input_ids.shape[1]
    has_completion = completion_mask.any(dim=1)
    first_positions = completion_mask.int().argmax(dim=1)[has_completion]
    first = int(first_positions.min()) if first_positions.numel() else seq_len - 1
    first = max(first, 1)  # token 0 has no preceding logit to predict it
    dummy = torch.zeros_like(input_ids[:, :1])
    return ScoringWindow(
        keep=seq_len - first + 1,
        labels=torch.cat([input_ids[:, first:], dummy], dim=1),
        mask=torch.cat([completion_mask[:, first:], dummy.bool()], dim=1),
    )


def window_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
    """[N, keep, V] logits of the last ``keep`` positions; the vocabulary projection skips the rest."""
    if _accepts_logits_to_keep(model):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
        ).logits
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[:, -keep:] if keep < logits.shape[1] else logits  # older models: a (copying) slice


def completion_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    length_normalize: bool,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` once on right-padded rows and score their completion tokens.

    Args:
        model: a Hugging Face causal LM.
        input_ids: [N, T] prompt + completion + padding.
        attention_mask: [N, T] 1 for real tokens.
        completion_mask: [N, T] bool, True at completion tokens (the ones scored).
        length_normalize: average instead of sum over completion tokens.
        chunk_size: see :func:`token_logprobs`.

    Returns:
        ``(sequence_logps [N], token_logps [N, T'])``: the per-sequence log-probs and the per-token
        log-probs of the scored window, where ``T'`` counts positions from the first completion token
        of the batch on (tokens outside ``completion_mask`` in it are not zeroed).
    """
    window = scoring_window(input_ids, completion_mask)
    logits = window_logits(model, input_ids, attention_mask, window.keep)
    token_logps = token_logprobs(logits, window.labels, chunk_size=chunk_size)
    sequence_logps = reduce_sequence_logprobs(token_logps, window.mask, length_normalize=length_normalize)
    return sequence_logps, token_logps[:, :-1]
