"""Learning-rate schedules: linear warm-up, then cosine, linear or constant (transformers' own)."""

from __future__ import annotations

from typing import Literal, get_args

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from ipo_lightning.errors import ConfigError

LRSchedule = Literal["cosine", "linear", "constant"]
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)


def check_schedule_options(
    *, warmup_ratio: float, min_lr_ratio: float, warmup_steps: int | None = None
) -> None:
    """Raise ConfigError for schedule options outside their ranges."""
    if warmup_steps is not None and warmup_steps < 0:
        raise ConfigError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def build_scheduler(
    optimizer: Optimizer,
    *,
    schedule: LRSchedule,
    total_steps: int,
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """A per-optimizer-step scheduler: ``warmup_steps`` (or ``warmup_ratio * total_steps``) of
    linear warm-up from 0, then ``schedule`` down to ``min_lr_ratio`` of the peak (cosine) or 0
    (linear), or flat (constant)."""
    check_schedule_options(warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    total_steps = max(total_steps, 1)
    warmup = warmup_steps if warmup_steps is not None else int(round(warmup_ratio * total_steps))
    if schedule == "cosine":
        return get_scheduler(
            "cosine_with_min_lr",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
        )
    if schedule == "linear":
        return get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    raise ConfigError(f"model.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
