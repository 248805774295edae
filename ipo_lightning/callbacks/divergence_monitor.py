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
  completions sampled from the policy (:func:`~ipo_lightning.generation.generate_completions`:
  temperature 1, full softmax) for the first ``sample_prompts`` held-out prompts, each scored under
  both models by teacher forcing, with its standard error; ``divergence/gen_length``: their mean
  length (EOS included);
- ``divergence/retention/chosen``: capability retention, the per-token change in log-likelihood
  log pi - log ref pooled over every held-out chosen token (negative: the policy predicts the
  preferred answers worse than the reference did); ``divergence/retention/text`` the same over the
  texts of ``retention_file``, a plain-text set (e.g. pre-training or instruction text);
- a samples table (``divergence_samples.jsonl`` beside ``metrics.csv``, and ``divergence/samples`` in
  W&B): each prompt with the policy's and the reference's sampled completion and the log-ratio. A
  resumed run first cuts the file back to its checkpoint's step, so each step appears once
  (:mod:`~ipo_lightning.callbacks.samples_file`).

Under DDP every process measures a share of the held-out batches and prompts (round-robin by rank)
and the shares are gathered, so the logged numbers are those one process would compute; rank 0
writes the samples file, and the loggers write on rank 0 only. Under FSDP the same holds: the
policy's full weights are gathered once per measurement (every rank holds one unsharded copy of the
policy while it runs, see :func:`~ipo_lightning.distributed.full_weights_for_local_forwards`), so
each process's forwards and ``generate()`` calls are its own. DeepSpeed ZeRO-3 is not supported.

Metrics go straight to every logger at the exact optimizer step (``Logger.log_metrics``), so they are
not thinned out by ``log_every_n_steps``.

What is measured and how is :mod:`ipo_lightning.divergence.measure` (a pure function of the two
models and the data); this callback picks the data once, schedules the measurements, gathers the
processes' shares, logs and writes the samples. Each measurement also lands in
``trainer.callback_metrics`` (with ``divergence/step``, the step it was taken at), where the KL
budget (:class:`~ipo_lightning.callbacks.kl_budget.KLBudget`) watches ``divergence/kl``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ipo_lightning.callbacks.samples_file import SamplesFile
from ipo_lightning.callbacks.schedule import DEFAULT_EVERY_N_STEPS, MeasurementSchedule
from ipo_lightning.data.retention import read_texts, text_batches
from ipo_lightning.distributed import full_weights_for_local_forwards
from ipo_lightning.divergence.measure import HeldOut, MeasureOptions, Share, measure_share, merge_shares
from ipo_lightning.divergence.sampling import SequenceSample
from ipo_lightning.errors import ConfigError

PREFIX = "divergence/"
STEP_KEY = PREFIX + "step"
"""``trainer.callback_metrics`` key of the optimizer step of the latest measurement (not logged)."""


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
        retention_file: plain-text retention set (``.txt``, one text per line, or ``.jsonl`` with a
            ``text`` field) scored for ``divergence/retention/text``; null: none.
        retention_texts: texts of ``retention_file`` used (the first N), cut to ``data.max_length``.
    """

    def __init__(
        self,
        enabled: bool = True,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        num_pairs: int = 64,
        batch_size: int = 8,
        on_validation: bool = True,
        chunk_size: int = 1024,
        sample_prompts: int = 8,
        max_new_tokens: int = 64,
        samples_file: str = "divergence_samples.jsonl",
        retention_file: str | None = None,
        retention_texts: int = 64,
    ) -> None:
        super().__init__()
        if every_n_steps < 0 or num_pairs < 1 or batch_size < 1 or chunk_size < 1:
            raise ConfigError(
                "divergence: every_n_steps must be >= 0 and num_pairs, batch_size, chunk_size >= 1; got "
                f"{every_n_steps}, {num_pairs}, {batch_size}, {chunk_size}"
            )
        if sample_prompts < 0 or max_new_tokens < 1:
            raise ConfigError(
                f"divergence: sample_prompts must be >= 0 and max_new_tokens >= 1, got {sample_prompts}, "
                f"{max_new_tokens}"
            )
        if retention_texts < 1:
            raise ConfigError(f"divergence.retention_texts must be at least 1, got {retention_texts}")
        self.enabled = enabled
        self.schedule = MeasurementSchedule(every_n_steps, on_validation)
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.sample_prompts = sample_prompts
        self.max_new_tokens = max_new_tokens
        self.samples_file = SamplesFile(samples_file)
        self.retention_file = retention_file
        self.retention_texts = retention_texts
        self._held_out: HeldOut | None = None
        self.last_samples: list[dict[str, Any]] = []
        """Rows of the latest samples table: prompt, policy and reference completion, log-ratio."""
        self.no_reference = False
        """Set at fit start: the run holds no reference model (precomputed), so nothing is measured."""
        self.no_pairs = False
        """Set at fit start: the run's data holds no preference pairs (an on-policy method's prompts)."""

    # ------------------------------------------------------------------ when

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.no_reference = getattr(pl_module, "reference", None) is None
        if self.enabled and self.no_reference:
            # model.reference=precomputed: only per-sequence log-probs exist, not the full distribution.
            rank_zero_warn(
                "divergence: no reference model in memory (model.reference=precomputed), so the KL "
                "cannot be measured; divergence/* is not logged (set divergence.enabled false to hide this)"
            )

        self.no_pairs = not hasattr(trainer.datamodule, "collator")
        if self.enabled and self.no_pairs and not self.no_reference:
            rank_zero_warn(
                "divergence: the run's data holds prompts, not preference pairs, so the held-out KL is not "
                "measured (on-policy methods log train/kl of their samples; set divergence.enabled false "
                "to hide this)"
            )

    @property
    def every_n_steps(self) -> int:
        """Optimizer steps between measurements (0: only at step 0 and after validations)."""
        return self.schedule.every_n_steps

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.measuring:
            self.samples_file.start(trainer)
        if self.schedule.at_train_start(trainer):
            self._measure_and_log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule.at_train_batch_end(trainer):
            self._measure_and_log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.at_validation_end(trainer):
            self._measure_and_log(trainer, pl_module)

    @property
    def measuring(self) -> bool:
        """Whether this run measures at all: enabled, a reference model in memory, preference pairs."""
        return self.enabled and not self.no_reference and not self.no_pairs

    # ------------------------------------------------------------------ what

    def _measure_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.measuring:
            return
        metrics = {PREFIX + name: value for name, value in self.measure(trainer, pl_module).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        published = {name: torch.tensor(value) for name, value in metrics.items()}
        trainer.callback_metrics.update({**published, STEP_KEY: torch.tensor(step)})
        if self.last_samples:
            self._write_samples(trainer, step)

    def _write_samples(self, trainer: L.Trainer, step: int) -> None:
        """Append the samples to ``<run dir>/divergence_samples.jsonl`` and log a W&B table."""
        rows = [{"step": step, **row} for row in self.last_samples]
        self.samples_file.append(trainer, rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(rows[0])
                logger.log_table(
                    key=PREFIX + "samples", columns=columns, data=[list(r.values()) for r in rows]
                )

    def held_out(self, trainer: L.Trainer) -> HeldOut:
        """The fixed data, built once: the first ``num_pairs`` pairs of the primary val set (else of
        the training set) in batches, their first ``sample_prompts`` prompts, the retention texts."""
        if self._held_out is None:
            datamodule = trainer.datamodule
            if not hasattr(datamodule, "collator"):
                raise ConfigError("DivergenceMonitor needs the run's data as a PreferenceDataModule")
            names = list(getattr(datamodule, "val_set_names", []))
            dataset = datamodule.val_datasets[names[0]] if names else datamodule.train_dataset
            pairs = [dataset[i] for i in range(min(self.num_pairs, len(dataset)))]
            texts: list[dict[str, Tensor]] = []
            if self.retention_file:
                texts = text_batches(
                    read_texts(self.retention_file, self.retention_texts),
                    datamodule.tokenizer,
                    max_length=datamodule.max_length,
                    batch_size=self.batch_size,
                )
            self._held_out = HeldOut(
                batches=[
                    datamodule.collator(pairs[start : start + self.batch_size])
                    for start in range(0, len(pairs), self.batch_size)
                ],
                texts=texts,
                prompts=[torch.tensor(pair["prompt_ids"]) for pair in pairs[: self.sample_prompts]],
            )
        return self._held_out

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Divergence metrics of the current policy on the held-out subset (names without prefix).

        Under DDP each process measures its share (batches and prompts round-robin by rank) and the
        shares are gathered, so every process returns the numbers a single process would compute.
        """
        hparams = pl_module.hparams
        options = MeasureOptions(
            batching=hparams.batching,
            length_normalize=hparams.length_normalize,
            chunk_size=self.chunk_size,
            max_new_tokens=self.max_new_tokens,
        )
        held_out = self.held_out(trainer)
        # Under FSDP the policy's weights are gathered for the whole measurement (every rank enters
        # together here), after which each rank's forwards and samples are its own.
        with full_weights_for_local_forwards(trainer.strategy):
            share = measure_share(
                pl_module.policy,
                pl_module.reference.model,
                held_out,
                options,
                tokenizer=trainer.datamodule.tokenizer,
                rank=trainer.global_rank,
                world=trainer.world_size,
            )
        measurement = merge_shares(_all_gather_objects(trainer, share))
        if measurement.policy_samples:
            self.last_samples = _sample_rows(
                trainer, measurement.policy_samples, measurement.reference_completions
            )
        return measurement.metrics


def _all_gather_objects(trainer: L.Trainer, obj: Share) -> list[Share]:
    """Every process's ``obj`` (just ``[obj]`` in a single process)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _sample_rows(
    trainer: L.Trainer, policy_samples: list[SequenceSample], reference_completions: list[Tensor]
) -> list[dict[str, Any]]:
    """Decoded table rows: prompt, policy completion, reference completion, policy log-ratio."""
    tokenizer = trainer.datamodule.tokenizer
    return [
        {
            "prompt": tokenizer.decode(sample.prompt),
            "policy_completion": tokenizer.decode(sample.completion),
            "reference_completion": tokenizer.decode(reference_completion),
            "log_ratio": sample.log_ratio,
        }
        for sample, reference_completion in zip(policy_samples, reference_completions, strict=True)
    ]
