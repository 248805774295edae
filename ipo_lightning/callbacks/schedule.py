"""When the monitors measure: step 0, every N optimizer steps, after every validation, once per step.

The divergence monitor and the generation evaluation share this schedule, so their rows of
``metrics.csv`` share steps. The hooks are a callback's; each returns whether to measure now:

- :meth:`MeasurementSchedule.at_train_start`: at optimizer step 0, before the first batch, unless the
  fit resumes from a checkpoint (its history has the measurements up to the checkpoint's step);
- :meth:`MeasurementSchedule.at_train_batch_end`: every ``every_n_steps`` optimizer steps (0: never).
  Lightning calls the hook after every micro-batch, and ``trainer.global_step`` counts optimizer
  steps, so under gradient accumulation the micro-batch that completes step N sees N and the
  following ones of the next step see it too: the once-per-step rule keeps the first;
- :meth:`MeasurementSchedule.at_validation_end`: after every validation run of a fit (not the
  sanity check, not ``trainer.validate``), with ``on_validation``.

At most one measurement per optimizer step: a validation right after a scheduled measurement sees
the same weights.
"""

from __future__ import annotations

import lightning as L

DEFAULT_EVERY_N_STEPS = 500
"""Optimizer steps between measurements unless configured."""


class MeasurementSchedule:
    """The shared schedule (module docstring); one instance per monitor, it remembers the last step.

    Args:
        every_n_steps: measure every N optimizer steps (0: only at step 0 and after validations).
        on_validation: also measure after every validation run.
    """

    def __init__(self, every_n_steps: int = DEFAULT_EVERY_N_STEPS, on_validation: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation
        self.last_step: int | None = None
        """The optimizer step of the latest measurement this schedule called for."""

    def _once(self, step: int) -> bool:
        if step == self.last_step:
            return False
        self.last_step = step
        return True

    def at_train_start(self, trainer: L.Trainer) -> bool:
        """``on_train_start``: measure at step 0 of a fit that does not resume."""
        return trainer.global_step == 0 and trainer.ckpt_path is None and self._once(0)

    def at_train_batch_end(self, trainer: L.Trainer) -> bool:
        """``on_train_batch_end``: measure at every ``every_n_steps``-th optimizer step, once."""
        step = trainer.global_step
        return bool(self.every_n_steps) and step % self.every_n_steps == 0 and self._once(step)

    def at_validation_end(self, trainer: L.Trainer) -> bool:
        """``on_validation_epoch_end``: measure after a fit's validation (not the sanity check), once."""
        due = self.on_validation and not trainer.sanity_checking and trainer.state.fn == "fit"
        return due and self._once(trainer.global_step)
