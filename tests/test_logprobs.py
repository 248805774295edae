"""Completion log-probs (the padded layout of the training path) against a naive full-vocabulary
log_softmax on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ipo_lightning.batching import batch_scores, sequence_logps
from ipo_lightning.logprobs import token_logprobs

PAD = 0


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Right-padded rows of (prompt length, completion length); the last one as if truncated."""
    spans = [(3, 5), (7, 2), (1, 9), (5, 1), (10, 6)]
    width = max(p + c for p, c in spans) + 2  # extra padding columns on every row
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.full((len(spans), width), PAD, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (p, c) in enumerate(spans):
        input_ids[row, : p + c] = torch.randint(5, vocab, (p + c,), generator=generator)
        attention[row, : p + c] = 1
        completion[row, p : p + c] = True
    return input_ids, attention, completion, spans


def _naive(
    model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, spans
) -> list[list[float]]:
    """Per-row lists of completion-token log-probs from a full float32 log_softmax, one row at a time."""
    rows = []
    for row, (p, c) in enumerate(spans):
        ids = input_ids[row : row + 1, : p + c]
        logits = model(input_ids=ids, attention_mask=attention[row : row + 1, : p + c]).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        rows.append([logp[t - 1, ids[0, t]].item() for t in range(p, p + c)])
    return rows


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_sequence_logprobs_match_naive(
    model: torch.nn.Module, length_normalize: bool, chunk_size: int
) -> None:
    input_ids, attention, completion, spans = _batch(model.config.vocab_size)
    with torch.no_grad():
        scores = batch_scores(model, input_ids, attention, completion, chunk_size=chunk_size)
        got = scores.sequence_logps(length_normalize)
        naive = _naive(model, input_ids, attention, spans)
    expected = [sum(r) / (len(r) if length_normalize else 1) for r in naive]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_padding_does_not_change_logprobs(model: torch.nn.Module) -> None:
    input_ids, attention, completion, _ = _batch(model.config.vocab_size)
    wider = torch.nn.functional.pad(input_ids, (0, 9), value=PAD)
    with torch.no_grad():
        narrow = batch_scores(model, input_ids, attention, completion).sums
        wide = batch_scores(
            model,
            wider,
            torch.nn.functional.pad(attention, (0, 9)),
            torch.nn.functional.pad(completion, (0, 9)),
        ).sums
    assert torch.allclose(narrow, wide, atol=1e-5)


def test_chunked_gradient_matches_log_softmax() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    weights = torch.randn(3, 5, generator=generator, dtype=torch.float64)

    ours = logits.clone().requires_grad_(True)
    (token_logprobs(ours, labels, chunk_size=4) * weights).sum().backward()
    reference = logits.clone().requires_grad_(True)
    picked = torch.log_softmax(reference, -1).gather(-1, labels[..., None]).squeeze(-1)
    (picked * weights).sum().backward()
    assert torch.allclose(ours.grad, reference.grad, atol=1e-6)
    assert torch.allclose(token_logprobs(logits, labels, chunk_size=2).double(), picked.detach(), atol=1e-6)


def test_model_gradients_match_naive(model: torch.nn.Module) -> None:
    input_ids, attention, completion, spans = _batch(model.config.vocab_size)
    ours = batch_scores(model, input_ids, attention, completion, chunk_size=5).sequence_logps(True)
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion[:, 1:].float()
    ((logp * mask).sum(-1) / mask.sum(-1)).sum().backward()
    for mine, theirs in zip(ours_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    model.zero_grad()


def test_sequence_logps_sum_and_mean() -> None:
    sums, counts = torch.tensor([-5.0, -4.0, 0.0]), torch.tensor([2, 1, 0])
    assert sequence_logps(sums, counts, length_normalize=False).tolist() == [-5.0, -4.0, 0.0]
    assert sequence_logps(sums, counts, length_normalize=True).tolist() == [-2.5, -4.0, 0.0]
