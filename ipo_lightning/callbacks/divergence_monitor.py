"""Track how far the policy has moved from the reference while training runs.

On a fixed held-out subset (the first ``num_pairs`` pairs of the primary validation set, or of the
training set when there is none), identical at every measurement so curves compare, the monitor
logs at step 0, every ``every_n_steps`` optimizer steps and after every validation:

- ``divergence/kl``: exact KL(pi || ref) over the full vocabulary, mean per completion token
  (teacher forcing on the held-out chosen and rejected completions);
- ``divergence/kl_reverse``: KL(ref || pi), same positions; ``divergence/entropy``: H(pi);
- ``divergence/logratio/{chosen,rejected,margin}_{mean,std}``: the per-sequence log-ratios
  log pi(y) - log ref(y) of the held-out pairs (length-normalised like the loss) and their margin h;
- ``divergence/seq_kl`` and ``divergence/seq_kl_stderr``: sequence-level KL(pi || ref) estimated from
  completions sampled from the policy (temperature 1, full softmax) for the first ``sample_prompts``
  held-out prompts, with its standard error; ``divergence/gen_length``: their mean length;
- ``divergence/retention/chosen``: capability retention, the per-token change in log-likelihood
  log pi - log ref pooled over every held-out chosen token (negative: the policy predicts the
  preferred answers worse than the reference did); ``divergence/retention/text`` the same over the
  texts of ``retention_file``, a plain-text set (e.g. pre-training or instruction text);
- a samples table (``divergence_samples.jsonl`` beside ``metrics.csv``, and ``divergence/samples`` in
  W&B): each prompt with the policy's and the reference's sampled completion and the log-ratio.

Under DDP every process measures a share of the held-out batches and prompts (round-robin by rank)
and the shares are gathered, so the logged numbers are those one process would compute; rank 0
writes the samples file, and the loggers write on rank 0 only.

Metrics go straight to every logger at the exact optimizer step (``Logger.log_metrics``), so they are
not thinned out by ``log_every_n_steps``.

KL budget: with ``max_kl`` set, a measurement whose ``divergence/kl`` exceeds it either warns
(``on_exceed: warn``) or stops training (``stop``): a checkpoint ``kl_budget_step<N>.ckpt`` is saved
in the run's checkpoint folder first, and the message names the metric, its value, the budget and
the step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ipo_lightning.batching import batch_logits, batch_scores
from ipo_lightning.data.retention import read_texts, text_batches
from ipo_lightning.divergence.token_kl import (
    SequenceSample,
    TokenDivergence,
    chunked_token_divergence,
    estimate_sequence_kl,
    sample_completions,
)
from ipo_lightning.errors import ConfigError

PREFIX = "divergence/"


class DivergenceMonitor(Callback):
    """Log the policy's divergence from the reference on a fixed held-out subset (module docstring).

    Args:
        enabled: measure at all (on by default).
        every_n_steps: measure every N optimizer steps (0: only at step 0 and after validations).
        num_pairs: held-out pairs measured each time (the first N of the primary val set).
        batch_size: pairs per forward pass during a measurement.
        on_validation: also measure after every validation run.
        chunk_size: positions per float32 chunk of the full-vocabulary sums.
        sample_prompts: held-out prompts to sample one completion each for ``seq_kl`` (0: off).
        max_new_tokens: longest sampled completion.
        samples_file: JSONL file in the run folder that collects the samples of every measurement
            (step, prompt, policy and reference completion, log-ratio); empty: none.
        max_kl: KL budget in nats per completion token on ``divergence/kl``; null: no budget.
        on_exceed: when the budget is exceeded: ``warn``, or ``stop`` (checkpoint, then stop training).
        retention_file: plain-text retention set (``.txt``, one text per line, or ``.jsonl`` with a
            ``text`` field) scored for ``divergence/retention/text``; null: none.
        retention_texts: texts of ``retention_file`` used (the first N), cut to ``data.max_length``.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_steps: int = 500,
        num_pairs: int = 64,
        batch_size: int = 8,
        on_validation: bool = True,
        chunk_size: int = 1024,
        sample_prompts: int = 8,
        max_new_tokens: int = 64,
        samples_file: str = "divergence_samples.jsonl",
        max_kl: float | None = None,
        on_exceed: Literal["warn", "stop"] = "warn",
        retention_file: str | None = None,
        retention_texts: int = 64,
    ) -> None:
        super().__init__()
        if every_n_steps < 0 or num_pairs < 1 or batch_size < 1 or chunk_size < 1:
            raise ConfigError(
                "divergence: every_n_steps must be >= 0 and num_pairs, batch_size, chunk_size >= 1; got "
                f"{every_n_steps}, {num_pairs}, {batch_size}, {chunk_size}"
            )
        self.enabled = enabled
        self.every_n_steps = every_n_steps
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.on_validation = on_validation
        self.chunk_size = chunk_size
        if sample_prompts < 0 or max_new_tokens < 1:
            raise ConfigError(
                f"divergence: sample_prompts must be >= 0 and max_new_tokens >= 1, got {sample_prompts}, "
                f"{max_new_tokens}"
            )
        self.sample_prompts = sample_prompts
        self.samples_file = samples_file
        self.max_new_tokens = max_new_tokens
        if max_kl is not None and max_kl <= 0:
            raise ConfigError(f"divergence.max_kl must be positive (or null for no budget), got {max_kl}")
        self.max_kl = max_kl
        self.on_exceed = on_exceed
        if retention_texts < 1:
            raise ConfigError(f"divergence.retention_texts must be at least 1, got {retention_texts}")
        self.retention_file = retention_file
        self.retention_texts = retention_texts
        self.budget_checkpoint: Path | None = None
        self._text_batches: list[dict[str, Tensor]] | None = None
        self._batches: list[dict[str, Tensor]] | None = None
        self._prompts: list[Tensor] = []
        self.last_samples: list[dict[str, Any]] = []
        """Rows of the latest samples table: prompt, policy and reference completion, log-ratio."""
        self._last_step: int | None = None
        self._no_reference = False

    # ------------------------------------------------------------------ when

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._no_reference = getattr(pl_module, "reference", None) is None
        if self.enabled and self._no_reference:
            # model.reference=precomputed: only per-sequence log-probs exist, not the full distribution.
            if self.max_kl is not None:
                raise ConfigError(
                    "divergence.max_kl needs a reference model, and model.reference=precomputed has none "
                    "during training; use model.reference separate or lora, or unset divergence.max_kl"
                )
            rank_zero_warn(
                "divergence: no reference model in memory (model.reference=precomputed), so the KL "
                "cannot be measured; divergence/* is not logged (set divergence.enabled false to hide this)"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure_and_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Called per micro-batch; global_step counts optimizer steps, so this fires once per step.
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._measure_and_log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._measure_and_log(trainer, pl_module)

    # ------------------------------------------------------------------ what

    def _measure_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once per optimizer step: a validation right after a scheduled measurement sees the same weights.
        step = trainer.global_step
        if not self.enabled or self._no_reference or step == self._last_step:
            return
        self._last_step = step
        metrics = {PREFIX + name: value for name, value in self.measure(trainer, pl_module).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.last_samples:
            self._write_samples(trainer, step)
        self._enforce_budget(trainer, metrics[PREFIX + "kl"], step)

    def _write_samples(self, trainer: L.Trainer, step: int) -> None:
        """Append the samples to ``<run dir>/divergence_samples.jsonl`` and log a W&B table."""
        rows = [{"step": step, **row} for row in self.last_samples]
        # trainer.log_dir is a broadcast under DDP: every process must ask for it, not just rank 0.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero and self.samples_file:
            path = run_dir / self.samples_file
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(
                    key=PREFIX + "samples", columns=columns, data=[list(r.values()) for r in rows]
                )

    def _enforce_budget(self, trainer: L.Trainer, kl: float, step: int) -> None:
        if self.max_kl is None or kl <= self.max_kl:
            return
        message = (
            f"divergence/kl = {kl:.4g} nats/token exceeds the KL budget divergence.max_kl = {self.max_kl:g} "
            f"at optimizer step {step}"
        )
        if self.on_exceed == "warn":
            rank_zero_warn(message)
            return
        folder = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None
        folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        self.budget_checkpoint = folder / f"kl_budget_step{step}.ckpt"
        trainer.save_checkpoint(self.budget_checkpoint)  # every rank calls it; the strategy writes once
        trainer.should_stop = True
        rank_zero_warn(f"{message}: stopping; checkpoint saved to {self.budget_checkpoint}")

    def held_out_batches(self, trainer: L.Trainer) -> list[dict[str, Tensor]]:
        """The fixed subset, collated once: the first ``num_pairs`` pairs of the primary val set."""
        if self._batches is None:
            datamodule = trainer.datamodule
            if not hasattr(datamodule, "collator"):
                raise ConfigError("DivergenceMonitor needs the run's data as a PreferenceDataModule")
            names = list(getattr(datamodule, "val_set_names", []))
            dataset = datamodule.val_datasets[names[0]] if names else datamodule.train_dataset
            pairs = [dataset[i] for i in range(min(self.num_pairs, len(dataset)))]
            self._prompts = [torch.tensor(pair["prompt_ids"]) for pair in pairs[: self.sample_prompts]]
            self._batches = [
                datamodule.collator(pairs[start : start + self.batch_size])
                for start in range(0, len(pairs), self.batch_size)
            ]
        return self._batches

    def retention_batches(self, trainer: L.Trainer) -> list[dict[str, Tensor]]:
        """The plain-text retention set as batches, built once (empty without ``retention_file``)."""
        if self._text_batches is None:
            self._text_batches = []
            if self.retention_file:
                datamodule = trainer.datamodule
                self._text_batches = text_batches(
                    read_texts(self.retention_file, self.retention_texts),
                    datamodule.tokenizer,
                    max_length=datamodule.max_length,
                    batch_size=self.batch_size,
                )
        return self._text_batches

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Divergence metrics of the current policy on the held-out subset (names without prefix).

        Under DDP each process measures its share (batches and prompts round-robin by rank) and the
        shares are gathered, so every process returns the numbers a single process would compute.
        """
        share = self._measure_share(trainer, pl_module)
        shares = _all_gather_objects(trainer, share)
        totals = TokenDivergence()
        chosen: list[float] = []
        rejected: list[float] = []
        retention = _TokenMean()
        # Merged in batch order, the sums run in the same order as in one process.
        for _, result in sorted(item for share in shares for item in share.batches.items()):
            totals.add(result.divergence)
            chosen += result.chosen
            rejected += result.rejected
            retention.add(result.chosen_delta)
        metrics = totals.means()
        metrics["retention/chosen"] = retention.mean()
        text_retention = _TokenMean()
        for _, delta in sorted(item for share in shares for item in share.texts.items()):
            text_retention.add(delta)
        if text_retention.tokens:
            metrics["retention/text"] = text_retention.mean()
        policy_samples = sorted((s for share in shares for s in share.policy_samples), key=_by_prompt)
        if policy_samples:
            estimate = estimate_sequence_kl(policy_samples)
            metrics.update(
                seq_kl=estimate.mean, seq_kl_stderr=estimate.stderr, gen_length=estimate.mean_length
            )
            reference_samples = sorted(
                (s for share in shares for s in share.reference_samples), key=_by_prompt
            )
            self.last_samples = _sample_rows(trainer, policy_samples, reference_samples)
        chosen_ratio = torch.tensor(chosen, dtype=torch.float64)
        rejected_ratio = torch.tensor(rejected, dtype=torch.float64)
        margin = chosen_ratio - rejected_ratio
        for name, values in (("chosen", chosen_ratio), ("rejected", rejected_ratio), ("margin", margin)):
            metrics[f"logratio/{name}_mean"] = float(values.mean())
            metrics[f"logratio/{name}_std"] = float(values.std(unbiased=False))
        return metrics

    def _measure_share(self, trainer: L.Trainer, pl_module: L.LightningModule) -> _Share:
        """This process's part of a measurement: every ``world_size``-th batch and prompt."""
        policy, reference = pl_module.policy, pl_module.reference.model
        length_normalize = pl_module.hparams.length_normalize
        batching = pl_module.hparams.batching
        rank, world = trainer.global_rank, trainer.world_size
        share = _Share()
        was_training = policy.training
        policy.eval()  # dropout off: measure the policy itself, not a noisy sample of it
        try:
            batches = self.held_out_batches(trainer)
            for index in range(rank, len(batches), world):
                batch = {key: value.to(pl_module.device) for key, value in batches[index].items()}
                rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                policy_kept = batch_logits(policy, *rows, batching=batching)
                reference_kept = batch_logits(reference, *rows, batching=batching)
                chunks = zip(
                    policy_kept.scored_chunks(self.chunk_size),
                    reference_kept.scored_chunks(self.chunk_size),
                    strict=True,
                )
                policy_scores = policy_kept.scores(chunk_size=self.chunk_size)
                reference_scores = reference_kept.scores(chunk_size=self.chunk_size)
                logratio = policy_scores.sequence_logps(length_normalize) - reference_scores.sequence_logps(
                    length_normalize
                )
                token_delta = policy_scores.token_logps - reference_scores.token_logps
                half = rows[0].shape[0] // 2
                share.batches[index] = _BatchResult(
                    divergence=chunked_token_divergence(chunks),
                    chosen=logratio[:half].tolist(),
                    rejected=logratio[half:].tolist(),
                    chosen_delta=_TokenMean.of(token_delta, policy_scores.sequence_ids < half),
                )
            texts = self.retention_batches(trainer)
            # Texts are not pairs: prefix_shared has no prompt to share, so they run as padded rows.
            text_batching = "padded" if batching == "prefix_shared" else batching
            for index in range(rank, len(texts), world):
                batch = {key: value.to(pl_module.device) for key, value in texts[index].items()}
                rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
                policy_scores = batch_scores(
                    policy, *rows, batching=text_batching, chunk_size=self.chunk_size
                )
                reference_scores = batch_scores(
                    reference, *rows, batching=text_batching, chunk_size=self.chunk_size
                )
                token_delta = policy_scores.token_logps - reference_scores.token_logps
                share.texts[index] = _TokenMean.of(
                    token_delta, torch.ones_like(token_delta, dtype=torch.bool)
                )
            indices = list(range(rank, len(self._prompts), world))
            if indices:
                sampling = {
                    "prompt_indices": indices,
                    "max_new_tokens": self.max_new_tokens,
                    "eos_token_id": _stop_tokens(policy, trainer),
                }
                prompts = [self._prompts[i] for i in indices]
                share.policy_samples = sample_completions(policy, reference, prompts, **sampling)
                # The reference's own samples, same seeds, for side-by-side reading in the samples table.
                share.reference_samples = sample_completions(reference, policy, prompts, **sampling)
        finally:
            policy.train(was_training)
        return share


@dataclass
class _TokenMean:
    """A sum over tokens and the token count, for per-token means pooled across batches."""

    total: float = 0.0
    tokens: int = 0

    @classmethod
    def of(cls, values: Tensor, mask: Tensor) -> _TokenMean:
        return cls(total=float(values[mask].double().sum()), tokens=int(mask.sum()))

    def add(self, other: _TokenMean) -> None:
        self.total += other.total
        self.tokens += other.tokens

    def mean(self) -> float:
        return self.total / max(self.tokens, 1)


@dataclass
class _BatchResult:
    """What one held-out batch contributes to a measurement."""

    divergence: TokenDivergence
    chosen: list[float]
    """Per-pair chosen log-ratios (normalised like the loss)."""
    rejected: list[float]
    chosen_delta: _TokenMean
    """log pi - log ref summed over the chosen completions' tokens (for ``retention/chosen``)."""


@dataclass
class _Share:
    """One process's part of a measurement, keyed so that the parts merge in a fixed order."""

    batches: dict[int, _BatchResult] = field(default_factory=dict)
    """Held-out batch index -> its results."""
    texts: dict[int, _TokenMean] = field(default_factory=dict)
    """Retention-text batch index -> log pi - log ref summed over its tokens."""
    policy_samples: list[SequenceSample] = field(default_factory=list)
    reference_samples: list[SequenceSample] = field(default_factory=list)


def _by_prompt(sample: SequenceSample) -> int:
    return sample.prompt_index


def _all_gather_objects(trainer: L.Trainer, obj: _Share) -> list[_Share]:
    """Every process's ``obj`` (just ``[obj]`` in a single process)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _stop_tokens(policy: torch.nn.Module, trainer: L.Trainer) -> int | list[int] | None:
    """The tokens that end a generation: the model's generation config, else the tokenizer's EOS."""
    config = getattr(policy, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        eos = getattr(tokenizer, "eos_token_id", None)
    return eos


def _sample_rows(
    trainer: L.Trainer, policy_samples: list[SequenceSample], reference_samples: list[SequenceSample]
) -> list[dict[str, Any]]:
    """Decoded table rows: prompt, policy completion, reference completion, policy log-ratio."""
    tokenizer = trainer.datamodule.tokenizer
    return [
        {
            "prompt": tokenizer.decode(sample.prompt),
            "policy_completion": tokenizer.decode(sample.completion),
            "reference_completion": tokenizer.decode(reference_sample.completion),
            "log_ratio": sample.log_ratio,
        }
        for sample, reference_sample in zip(policy_samples, reference_samples, strict=True)
    ]
