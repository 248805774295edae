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
- a samples table (``divergence_samples.jsonl`` beside ``metrics.csv``, and ``divergence/samples`` in
  W&B): each prompt with the policy's and the reference's sampled completion and the log-ratio.

Metrics go straight to every logger at the exact optimizer step (``Logger.log_metrics``), so they are
not thinned out by ``log_every_n_steps``.

KL budget: with ``max_kl`` set, a measurement whose ``divergence/kl`` exceeds it either warns
(``on_exceed: warn``) or stops training (``stop``): a checkpoint ``kl_budget_step<N>.ckpt`` is saved
in the run's checkpoint folder first, and the message names the metric, its value, the budget and
the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ipo_lightning.divergence import TokenDivergence, sampled_sequence_kl, token_divergence
from ipo_lightning.errors import ConfigError
from ipo_lightning.logprobs import reduce_sequence_logprobs, scoring_window, token_logprobs, window_logits

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
        self.budget_checkpoint: Path | None = None
        self._batches: list[dict[str, Tensor]] | None = None
        self._prompts: list[Tensor] = []
        self.last_samples: list[dict[str, Any]] = []
        """Rows of the latest samples table: prompt, policy and reference completion, log-ratio."""
        self._last_step: int | None = None
        self._no_reference = False

    # ------------------------------------------------------------------ when

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._measure_and_log(trainer, pl_module)

    def on_train_batch_end(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Called per micro-batch; global_step counts optimizer steps, so this fires once per step.
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._measure_and_log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
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
        if trainer.is_global_zero and self.samples_file:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.samples_file
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

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Divergence metrics of the current policy on the held-out subset (names without prefix)."""
        policy, reference = pl_module.policy, pl_module.reference.model
        length_normalize = pl_module.hparams.length_normalize
        was_training = policy.training
        policy.eval()  # dropout off: measure the policy itself, not a noisy sample of it
        totals = TokenDivergence()
        chosen, rejected = [], []
        try:
            for batch in self.held_out_batches(trainer):
                batch = {key: value.to(pl_module.device) for key, value in batch.items()}
                ids, attention = batch["input_ids"], batch["attention_mask"]
                window = scoring_window(ids, batch["completion_mask"])
                policy_logits = window_logits(policy, ids, attention, window.keep)
                reference_logits = window_logits(reference, ids, attention, window.keep)
                totals.add(
                    token_divergence(policy_logits, reference_logits, window.mask, chunk_size=self.chunk_size)
                )
                logratio = reduce_sequence_logprobs(
                    token_logprobs(policy_logits, window.labels, chunk_size=self.chunk_size)
                    - token_logprobs(reference_logits, window.labels, chunk_size=self.chunk_size),
                    window.mask,
                    length_normalize=length_normalize,
                )
                half = ids.shape[0] // 2
                chosen.append(logratio[:half])
                rejected.append(logratio[half:])
            estimate = None
            if self._prompts:
                sampling = {
                    "max_new_tokens": self.max_new_tokens,
                    "eos_token_id": _stop_tokens(policy, trainer),
                }
                estimate, policy_samples = sampled_sequence_kl(policy, reference, self._prompts, **sampling)
                # The reference's own samples, same seed, for side-by-side reading in the samples table.
                _, reference_samples = sampled_sequence_kl(reference, policy, self._prompts, **sampling)
                self.last_samples = _sample_rows(trainer, policy_samples, reference_samples)
        finally:
            policy.train(was_training)
        chosen_ratio, rejected_ratio = torch.cat(chosen), torch.cat(rejected)
        margin = chosen_ratio - rejected_ratio
        metrics = totals.means()
        if estimate is not None:
            metrics.update(
                seq_kl=estimate.mean, seq_kl_stderr=estimate.stderr, gen_length=estimate.mean_length
            )
        for name, values in (("chosen", chosen_ratio), ("rejected", rejected_ratio), ("margin", margin)):
            metrics[f"logratio/{name}_mean"] = float(values.mean())
            metrics[f"logratio/{name}_std"] = float(values.std(unbiased=False))
        return metrics


def _stop_tokens(policy: torch.nn.Module, trainer: L.Trainer) -> int | list[int] | None:
    """The tokens that end a generation: the model's generation config, else the tokenizer's EOS."""
    config = getattr(policy, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        eos = getattr(tokenizer, "eos_token_id", None)
    return eos


def _sample_rows(
    trainer: L.Trainer,
    policy_samples: list[tuple[Tensor, Tensor, float]],
    reference_samples: list[tuple[Tensor, Tensor, float]],
) -> list[dict[str, Any]]:
    """Decoded table rows: prompt, policy completion, reference completion, policy log-ratio."""
    tokenizer = trainer.datamodule.tokenizer
    rows = []
    for (prompt, completion, log_ratio), (_, reference_completion, _) in zip(
        policy_samples, reference_samples, strict=True
    ):
        rows.append(
            {
                "prompt": tokenizer.decode(prompt),
                "policy_completion": tokenizer.decode(completion),
                "reference_completion": tokenizer.decode(reference_completion),
                "log_ratio": log_ratio,
            }
        )
    return rows
