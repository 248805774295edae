"""One divergence measurement: policy, reference and held-out data in, metric values out.

No Trainer, logger or process group here: :func:`measure` is a pure function of the two models and
the data. Under DDP the caller runs :func:`measure_share` on every process (each takes every
``world``-th batch and prompt) and :func:`merge_shares` on the gathered shares; the parts merge in
batch and prompt order, so the numbers are those one process measuring everything computes.

The metrics (names without the ``divergence/`` prefix the monitor logs them under):

- ``kl``, ``kl_reverse``, ``entropy``: exact per-token KL(pi || ref), KL(ref || pi) and H(pi) over the
  full vocabulary at every scored completion position (:mod:`ipo_lightning.divergence.token_kl`);
- ``logratio/{chosen,rejected,margin}_{mean,std}``: per-sequence log pi(y) - log ref(y) of the pairs
  (length-normalised like the loss) and their margin h;
- ``retention/chosen``: log pi - log ref per token, pooled over every chosen completion token;
  ``retention/text`` the same over the retention texts (when there are any);
- ``seq_kl``, ``seq_kl_stderr``, ``gen_length``: the sampled sequence KL (when there are prompts,
  :mod:`ipo_lightning.divergence.sampling`: drawn with the project's sampler,
  :func:`ipo_lightning.generation.generate_completions`, then scored by teacher forcing).

Every completion score goes through the training path (:func:`ipo_lightning.batching.batch_logits`
in the run's ``model.batching`` mode): one forward per model and batch gives both the full-vocabulary
logits of the token KL and the log-probs of the log-ratios, so the log-ratios are the training
step's own. Rows that are not pairs (retention texts, sampled completions) run ``padded`` under
``prefix_shared``, which has no shared prompt to lay out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ipo_lightning.batching import Batching, batch_logits, batch_scores, single_row_layout
from ipo_lightning.divergence.sampling import (
    SequenceSample,
    draw_completions,
    estimate_sequence_kl,
    sample_completions,
)
from ipo_lightning.divergence.token_kl import TokenDivergence, chunked_token_divergence
from ipo_lightning.reference import generating_model


@dataclass(frozen=True)
class MeasureOptions:
    """How a measurement scores and samples.

    Attributes:
        batching: the run's ``model.batching`` (rows that are not pairs run ``padded`` under
            ``prefix_shared``).
        length_normalize: the loss's setting, for the per-sequence log-ratios.
        chunk_size: positions per float32 chunk of the full-vocabulary sums.
        max_new_tokens: longest sampled completion (a completion also ends at the model's EOS).
        sample_batch_size: sampled rows per ``generate`` call and per scoring forward.
    """

    batching: Batching = "padded"
    length_normalize: bool = False
    chunk_size: int = 1024
    max_new_tokens: int = 64
    sample_batch_size: int = 64

    @property
    def single_batching(self) -> Batching:
        """The layout of rows that are not pairs (:func:`~ipo_lightning.batching.single_row_layout`)."""
        return single_row_layout(self.batching)


@dataclass(frozen=True)
class HeldOut:
    """The data a measurement runs on, fixed for a whole run so that its curves compare.

    Attributes:
        batches: collated pairwise batches (chosen rows, then rejected rows).
        texts: retention-text batches (``input_ids``, ``attention_mask``, ``completion_mask``).
        prompts: 1-D prompt token ids to sample one completion each from.
    """

    batches: Sequence[dict[str, Tensor]]
    texts: Sequence[dict[str, Tensor]] = ()
    prompts: Sequence[Tensor] = ()


@dataclass
class TokenMean:
    """A sum over tokens and the token count, for per-token means pooled across batches."""

    total: float = 0.0
    tokens: int = 0

    @classmethod
    def of(cls, values: Tensor) -> TokenMean:
        """The float64 sum and count of ``values``."""
        return cls(total=float(values.double().sum()), tokens=values.numel())

    def add(self, other: TokenMean) -> None:
        """Accumulate another part."""
        self.total += other.total
        self.tokens += other.tokens

    def mean(self) -> float:
        """The pooled mean (0 with no tokens)."""
        return self.total / max(self.tokens, 1)


@dataclass
class BatchResult:
    """What one held-out batch contributes to a measurement."""

    divergence: TokenDivergence
    chosen: list[float]
    """Per-pair chosen log-ratios (normalised like the loss)."""
    rejected: list[float]
    chosen_delta: TokenMean
    """log pi - log ref summed over the chosen completions' tokens (for ``retention/chosen``)."""


@dataclass
class Share:
    """One process's part of a measurement, keyed so that the parts merge in a fixed order."""

    batches: dict[int, BatchResult] = field(default_factory=dict)
    """Held-out batch index -> its results."""
    texts: dict[int, TokenMean] = field(default_factory=dict)
    """Retention-text batch index -> log pi - log ref summed over its tokens."""
    policy_samples: list[SequenceSample] = field(default_factory=list)
    reference_completions: list[tuple[int, Tensor]] = field(default_factory=list)
    """(prompt index, completion) of the reference's own samples of the same prompts and seeds (for
    the samples table)."""


@dataclass
class Measurement:
    """A merged measurement: metric values and the samples they were estimated from."""

    metrics: dict[str, float]
    policy_samples: list[SequenceSample]
    reference_completions: list[Tensor]
    """The reference's sample of each policy sample's prompt and seed, in the same order."""


def _rows(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(batch[key].to(device) for key in ("input_ids", "attention_mask", "completion_mask"))


def _batch_result(
    policy: nn.Module, reference: nn.Module, rows: tuple[Tensor, Tensor, Tensor], options: MeasureOptions
) -> BatchResult:
    """Token KL, log-ratios and chosen-token deltas of one pairwise batch: one forward per model."""
    policy_kept = batch_logits(policy, *rows, batching=options.batching)
    reference_kept = batch_logits(reference, *rows, batching=options.batching)
    chunk = options.chunk_size
    divergence = chunked_token_divergence(
        zip(policy_kept.scored_chunks(chunk), reference_kept.scored_chunks(chunk), strict=True)
    )
    policy_scores = policy_kept.scores(chunk_size=chunk)
    reference_scores = reference_kept.scores(chunk_size=chunk)
    normalize = options.length_normalize
    logratio = policy_scores.sequence_logps(normalize) - reference_scores.sequence_logps(normalize)
    token_delta = policy_scores.token_logps - reference_scores.token_logps
    half = rows[0].shape[0] // 2
    return BatchResult(
        divergence=divergence,
        chosen=logratio[:half].tolist(),
        rejected=logratio[half:].tolist(),
        chosen_delta=TokenMean.of(token_delta[policy_scores.sequence_ids < half]),
    )


def _text_delta(
    policy: nn.Module, reference: nn.Module, rows: tuple[Tensor, Tensor, Tensor], options: MeasureOptions
) -> TokenMean:
    """log pi - log ref summed over a retention batch's scored tokens."""
    batching = options.single_batching
    chunk = options.chunk_size
    policy_scores = batch_scores(policy, *rows, batching=batching, chunk_size=chunk)
    reference_scores = batch_scores(reference, *rows, batching=batching, chunk_size=chunk)
    return TokenMean.of(policy_scores.token_logps - reference_scores.token_logps)


@torch.no_grad()
def measure_share(
    policy: nn.Module,
    reference: nn.Module,
    held_out: HeldOut,
    options: MeasureOptions,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rank: int = 0,
    world: int = 1,
) -> Share:
    """Process ``rank`` of ``world``'s part of a measurement: every ``world``-th batch, text batch and
    prompt, from index ``rank`` on. The policy runs in eval mode (its dropout off: the policy itself,
    not a noisy sample of it) and is put back in its mode afterwards. ``tokenizer`` (padding id, EOS
    fallback of the sampler) is needed when ``held_out`` has prompts."""
    if held_out.prompts and tokenizer is None:
        raise ValueError("sampling the held-out prompts needs the models' tokenizer")
    device = next(policy.parameters()).device
    share = Share()
    was_training = policy.training
    policy.eval()
    try:
        for index in range(rank, len(held_out.batches), world):
            rows = _rows(held_out.batches[index], device)
            share.batches[index] = _batch_result(policy, reference, rows, options)
        for index in range(rank, len(held_out.texts), world):
            share.texts[index] = _text_delta(policy, reference, _rows(held_out.texts[index], device), options)
        indices = list(range(rank, len(held_out.prompts), world))
        if indices:
            assert tokenizer is not None
            drawing = {
                "prompt_indices": indices,
                "max_new_tokens": options.max_new_tokens,
                "batch_size": options.sample_batch_size,
            }
            prompts = [held_out.prompts[i] for i in indices]
            share.policy_samples = sample_completions(
                policy,
                reference,
                tokenizer,
                prompts,
                batching=options.single_batching,
                chunk_size=options.chunk_size,
                **drawing,
            )
            # The reference's own samples, same seeds, for side-by-side reading in the samples table.
            with generating_model(reference) as sampler:
                drawn = draw_completions(sampler, tokenizer, prompts, **drawing)
            share.reference_completions = [
                (index, completion)
                for index, per_prompt in zip(indices, drawn, strict=True)
                for completion in per_prompt
            ]
    finally:
        policy.train(was_training)
    return share


def _by_prompt(sample: SequenceSample) -> int:
    return sample.prompt_index


def merge_shares(shares: Sequence[Share]) -> Measurement:
    """The metrics of all processes' shares (module docstring), merged in batch and prompt order."""
    totals = TokenDivergence()
    chosen: list[float] = []
    rejected: list[float] = []
    retention = TokenMean()
    # Merged in batch order, the sums run in the same order as in one process.
    for _, result in sorted(item for share in shares for item in share.batches.items()):
        totals.add(result.divergence)
        chosen += result.chosen
        rejected += result.rejected
        retention.add(result.chosen_delta)
    metrics = totals.means()
    metrics["retention/chosen"] = retention.mean()
    text_retention = TokenMean()
    for _, delta in sorted(item for share in shares for item in share.texts.items()):
        text_retention.add(delta)
    if text_retention.tokens:
        metrics["retention/text"] = text_retention.mean()
    policy_samples = sorted((s for share in shares for s in share.policy_samples), key=_by_prompt)
    # Stable sorts: a prompt's samples stay in sample order, as each share lists them.
    reference_completions = [
        completion
        for _, completion in sorted(
            (item for share in shares for item in share.reference_completions), key=lambda item: item[0]
        )
    ]
    if policy_samples:
        estimate = estimate_sequence_kl(policy_samples)
        metrics.update(seq_kl=estimate.mean, seq_kl_stderr=estimate.stderr, gen_length=estimate.mean_length)
    chosen_ratio = torch.tensor(chosen, dtype=torch.float64)
    rejected_ratio = torch.tensor(rejected, dtype=torch.float64)
    margin = chosen_ratio - rejected_ratio
    for name, values in (("chosen", chosen_ratio), ("rejected", rejected_ratio), ("margin", margin)):
        metrics[f"logratio/{name}_mean"] = float(values.mean())
        metrics[f"logratio/{name}_std"] = float(values.std(unbiased=False))
    return Measurement(metrics, policy_samples, reference_completions)


def measure(
    policy: nn.Module,
    reference: nn.Module,
    held_out: HeldOut,
    options: MeasureOptions | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, float]:
    """The divergence metrics of ``policy`` from ``reference`` on ``held_out`` (module docstring)."""
    share = measure_share(policy, reference, held_out, options or MeasureOptions(), tokenizer=tokenizer)
    return merge_shares([share]).metrics
