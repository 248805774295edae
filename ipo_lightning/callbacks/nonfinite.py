"""Stop a training run whose loss, gradients or weights stop being finite; warn when the loss jumps.

Without this, a run whose loss turns NaN trains on for hours, validates NaN, saves NaN checkpoints,
exports NaN weights and exits 0. :class:`NonFiniteGuard` checks every optimizer step:

- before the update (``on_before_optimizer_step``): the step's loss (the sum over its micro-batches,
  as handed to ``backward``) and every gradient the optimizer is about to apply;
- after the update (``on_train_batch_end``, before any checkpoint callback runs): the trained weights.

A non-finite step either stops the run (the default) or, with ``max_skipped_steps`` N, is skipped the
way mixed-precision grad scalers skip an overflow: the gradients are dropped, so the optimizer leaves
the weights and its own state untouched (the learning-rate schedule moves on), until the N+1-th such
step stops the run. Non-finite weights always stop it: skipping cannot undo an update. Stopping raises
:class:`TrainingDiverged` at that step, so nothing runs after it: no checkpoint, no validation and no
export; the checkpoints already on disk are from earlier, finite steps. The CLI prints its message as
one line and exits with code 1 (:data:`~ipo_lightning.errors.DIVERGED_EXIT_CODE`).

Every process of a multi-process run takes the same decision: the flags are summed across processes
(two small all-reduces per step, before the update and after it) before anyone acts, so no process
waits for another that stopped.

Under a grad scaler (``trainer.precision: 16-mixed``) an overflowing loss or gradient is the scaler's
business (it skips that step and lowers its scale), so only the weights are checked there, and the
loss-jump warning is off (the loss seen is the scaled one).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ipo_lightning.errors import ConfigError, TrainingDiverged

JUMP_MIN_HISTORY = 2
"""Steps seen before the loss-jump check starts (a too high learning rate blows up within a few steps);
the median is over the steps seen so far until ``loss_jump_window`` of them have been."""


class NonFiniteGuard(Callback):
    """Stop training at a non-finite loss, gradient or weight, or skip up to N such steps (module docstring).

    Args:
        enabled: check every optimizer step (under DDP: two all-reduces of a few numbers per step).
        max_skipped_steps: non-finite steps skipped (update not applied) before the run stops; 0: none.
        loss_jump_factor: warn once when a step's loss is this many times the recent median; null: never.
        loss_jump_window: recent optimizer steps whose median loss a jump is measured against.
    """

    def __init__(
        self,
        enabled: bool = True,
        max_skipped_steps: int = 0,
        loss_jump_factor: float | None = 100.0,
        loss_jump_window: int = 10,
    ) -> None:
        super().__init__()
        if max_skipped_steps < 0:
            raise ConfigError(f"nonfinite.max_skipped_steps must be >= 0, got {max_skipped_steps}")
        if loss_jump_factor is not None and not loss_jump_factor > 1:
            raise ConfigError(f"nonfinite.loss_jump_factor must be > 1 (or null), got {loss_jump_factor}")
        if loss_jump_window < 1:
            raise ConfigError(f"nonfinite.loss_jump_window must be >= 1, got {loss_jump_window}")
        self.enabled = enabled
        self.max_skipped_steps = max_skipped_steps
        self.loss_jump_factor = loss_jump_factor
        self.loss_jump_window = loss_jump_window
        self.skipped_steps: list[int] = []
        """Optimizer steps skipped so far (kept in checkpoints, so a resumed run keeps counting)."""
        self._step_loss: Tensor | None = None
        self._stepped = False
        self._recent_losses: deque[float] = deque(maxlen=loss_jump_window)
        self._jump_warned = False

    # ------------------------------------------------------------------ state in checkpoints

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = [int(step) for step in state_dict.get("skipped_steps", [])]

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.max_skipped_steps > 0 and _is_deepspeed(trainer):
            raise ConfigError(
                "nonfinite.max_skipped_steps needs the gradients, which DeepSpeed keeps to itself: use 0 "
                "(stop at the first non-finite step) with a DeepSpeed strategy"
            )

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # The micro-batch losses come divided by the accumulation count: their sum is the step's loss.
        loss = loss.detach().float()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=pl_module.device)
        self._step_loss = None
        self._stepped = True
        if not self.enabled:
            return
        scaled = _has_grad_scaler(trainer)  # a scaler handles overflow of the (scaled) loss and gradients
        grads = [] if scaled else [p.grad for p in _params(optimizer) if p.grad is not None]
        local = torch.stack(
            [
                loss.to(pl_module.device),
                torch.zeros((), device=pl_module.device) if scaled else (~torch.isfinite(loss)).float(),
                _count_nonfinite(grads, pl_module.device).clamp(max=1).float(),
            ]
        )
        loss_sum, bad_loss, bad_grads = reduce_sum(trainer, local).tolist()
        step = trainer.global_step  # the step being taken, as metrics.csv numbers it
        mean_loss = loss_sum / trainer.world_size
        if bad_loss or bad_grads:
            problem = _describe(mean_loss, int(bad_loss), int(bad_grads), trainer.world_size)
            if len(self.skipped_steps) >= self.max_skipped_steps:
                raise TrainingDiverged(self._stop_message(step, problem))
            for param in _params(optimizer):
                param.grad = None  # the optimizer skips parameters without a gradient: no update, no state
            self.skipped_steps.append(step)
            rank_zero_warn(
                f"non-finite step {step} skipped: {problem} ({len(self.skipped_steps)} of at most "
                f"{self.max_skipped_steps} skipped steps, nonfinite.max_skipped_steps)"
            )
            return
        if not scaled:  # a scaled loss moves with the scale, not with the training
            self._check_loss_jump(step, mean_loss)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs before every checkpoint callback (Lightning orders those last): a non-finite update
        # stops the run before it can be saved.
        if not (self.enabled and self._stepped):
            return
        self._stepped = False
        params = [p for optimizer in trainer.optimizers for p in _params(optimizer)]
        bad = reduce_sum(trainer, _count_nonfinite(params, pl_module.device).float().reshape(1)).item()
        if bad:
            step = trainer.global_step - 1  # the update that was just applied
            problem = f"{int(bad)} trained weight tensor(s) are not finite after the update"
            raise TrainingDiverged(self._stop_message(step, problem))

    # ------------------------------------------------------------------ helpers

    def _stop_message(self, step: int, problem: str) -> str:
        skipped = ""
        if self.skipped_steps:
            steps = ", ".join(map(str, self.skipped_steps))
            skipped = f" after skipping {len(self.skipped_steps)} non-finite step(s) ({steps})"
        return (
            f"training diverged at step {step}: {problem}{skipped}; stopped before saving it, nothing "
            "exported, checkpoints on disk are from earlier steps (lower the learning rate, or skip such "
            "steps with --nonfinite.max_skipped_steps N)"
        )

    def _check_loss_jump(self, step: int, loss: float) -> None:
        """Warn once when ``loss`` exceeds ``loss_jump_factor`` times the median of the recent steps."""
        if self.loss_jump_factor is not None and not self._jump_warned:
            if len(self._recent_losses) >= min(JUMP_MIN_HISTORY, self.loss_jump_window):
                median = statistics.median(self._recent_losses)
                if median > 0 and loss > self.loss_jump_factor * median:
                    self._jump_warned = True
                    rank_zero_warn(
                        f"train/loss jumped at step {step}: {loss:.4g}, {loss / median:.3g} times the "
                        f"median {median:.4g} of the previous {len(self._recent_losses)} steps (more than "
                        f"nonfinite.loss_jump_factor={self.loss_jump_factor:g}); the learning rate may be "
                        "too high. Warned once."
                    )
        self._recent_losses.append(loss)


def reduce_sum(trainer: L.Trainer, values: Tensor) -> Tensor:
    """``values`` summed over every process of the run (itself with one process)."""
    if trainer.world_size == 1:
        return values
    return trainer.strategy.reduce(values.clone(), reduce_op="sum")


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def _local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (FSDP2's DTensor); the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _count_nonfinite(tensors: list[Tensor], device: torch.device) -> Tensor:
    """How many of ``tensors`` hold a NaN or an infinity (a tensor on ``device``; no host sync).

    A tensor is finite when its minimum and maximum are: ``aminmax`` propagates NaN and is one pass
    without a temporary (``isfinite(t).all()`` writes a bool copy of every tensor, 10x slower on a CPU).
    """
    extremes = [torch.stack(torch.aminmax(_local(t))).to(device) for t in tensors if _local(t).numel()]
    if not extremes:
        return torch.zeros((), dtype=torch.long, device=device)
    return (~torch.isfinite(torch.stack(extremes)).all(dim=1)).sum()


def _has_grad_scaler(trainer: L.Trainer) -> bool:
    """Whether a loss scaler skips overflowing steps itself: torch's grad scaler (``16-mixed``), or
    DeepSpeed's own in 16-bit precision (its precision plugin then has no ``scaler``)."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return True
    return _is_deepspeed(trainer) and str(trainer.precision).startswith("16")


def _is_deepspeed(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


def _describe(loss: float, bad_loss: int, bad_grads: int, world_size: int) -> str:
    """``train/loss is nan`` and whether the gradients are finite, with process counts under DDP."""

    def where(count: int) -> str:
        return f" on {count} of {world_size} processes" if world_size > 1 else ""

    loss_text = f"train/loss is {_format(loss)}"
    if bad_loss and bad_grads:
        return f"{loss_text}{where(bad_loss)} and the gradients are not finite{where(bad_grads)}"
    if bad_loss:
        return f"{loss_text}{where(bad_loss)} (the gradients are finite)"
    return f"the gradients are not finite{where(bad_grads)} ({loss_text})"


def _format(value: float) -> str:
    return str(value) if not math.isfinite(value) else f"{value:.4g}"
