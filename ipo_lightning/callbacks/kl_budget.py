"""A KL budget on the divergence monitor's ``divergence/kl``: warn, or checkpoint and stop.

Like Lightning's ``EarlyStopping`` it watches a metric in ``trainer.callback_metrics``: the
:class:`~ipo_lightning.callbacks.divergence_monitor.DivergenceMonitor` publishes every measurement
there, and this callback checks each new one right after it (in the same hooks, so it must come after
the monitor in the trainer's callbacks, as the CLI puts it). A measurement over ``max_kl`` either
warns (``on_exceed: warn``) or stops training (``stop``): a checkpoint ``kl_budget_step<N>.ckpt`` is
saved in the run's checkpoint folder first. The message names the metric, its value, the budget and
the optimizer step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ipo_lightning.callbacks.divergence_monitor import STEP_KEY, DivergenceMonitor
from ipo_lightning.errors import ConfigError

MONITOR = "divergence/kl"
OnExceed = Literal["warn", "stop"]
ON_EXCEED_CHOICES: tuple[str, ...] = get_args(OnExceed)


class KLBudget(Callback):
    """Warn or checkpoint-and-stop when ``divergence/kl`` exceeds ``max_kl`` (module docstring).

    Args:
        max_kl: KL budget in nats per completion token on ``divergence/kl``; null: no budget.
        on_exceed: when the budget is exceeded: ``warn``, or ``stop`` (checkpoint, then stop training).
    """

    def __init__(self, max_kl: float | None = None, on_exceed: OnExceed = "warn") -> None:
        super().__init__()
        if max_kl is not None and max_kl <= 0:
            raise ConfigError(f"kl_budget.max_kl must be positive (or null for no budget), got {max_kl}")
        if on_exceed not in ON_EXCEED_CHOICES:
            raise ConfigError(
                f"kl_budget.on_exceed must be one of {', '.join(ON_EXCEED_CHOICES)}, got {on_exceed!r}"
            )
        self.max_kl = max_kl
        self.on_exceed = on_exceed
        self.checkpoint: Path | None = None
        """The checkpoint saved before stopping (``on_exceed: stop``), else None."""
        self._checked_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a budget that can never be checked (no reference model, or no monitor measuring)."""
        if self.max_kl is None:
            return
        if getattr(pl_module, "reference", None) is None:
            raise ConfigError(
                "kl_budget.max_kl needs a reference model, and model.reference=precomputed has none "
                "during training; use model.reference separate or lora, or unset kl_budget.max_kl"
            )
        if not hasattr(trainer.datamodule, "collator"):
            raise ConfigError(
                f"kl_budget.max_kl watches {MONITOR}, measured on held-out preference pairs, and this run's "
                "data holds prompts only; unset kl_budget.max_kl (train/kl and val/kl are the samples' KL)"
            )
        monitors = [callback for callback in trainer.callbacks if isinstance(callback, DivergenceMonitor)]
        if not any(monitor.enabled for monitor in monitors):
            raise ConfigError(
                f"kl_budget.max_kl watches {MONITOR}, which only the divergence monitor logs; "
                "set divergence.enabled true or unset kl_budget.max_kl"
            )
        if trainer.callbacks.index(self) < trainer.callbacks.index(monitors[0]):
            raise ConfigError("KLBudget must come after the DivergenceMonitor in the trainer's callbacks")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        """Check a measurement taken at this very step, once."""
        metrics = trainer.callback_metrics
        step = trainer.global_step
        if self.max_kl is None or MONITOR not in metrics or STEP_KEY not in metrics:
            return
        if int(metrics[STEP_KEY]) != step or self._checked_step == step:
            return  # no measurement at this step (the value is an earlier one), or already checked
        self._checked_step = step
        kl = float(metrics[MONITOR])
        if kl <= self.max_kl:
            return
        message = (
            f"{MONITOR} = {kl:.4g} nats/token exceeds the KL budget kl_budget.max_kl = {self.max_kl:g} "
            f"at optimizer step {step}"
        )
        if self.on_exceed == "warn":
            rank_zero_warn(message)
            return
        folder = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None
        folder = folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        self.checkpoint = folder / f"kl_budget_step{step}.ckpt"
        trainer.save_checkpoint(self.checkpoint)  # every rank calls it; the strategy writes once
        trainer.should_stop = True
        rank_zero_warn(f"{message}: stopping; checkpoint saved to {self.checkpoint}")
