"""Torchmetrics aggregation of the preference metrics (their names and meaning: docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn
from torchmetrics import MeanMetric

from ipo_lightning.losses import PreferenceLossOutput

BASE_METRICS: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "logps/chosen",
    "logps/rejected",
    "logratio/margin",
)
IPO_METRICS: tuple[str, ...] = ("ipo/target_gap",)


def metric_names(loss_type: str) -> tuple[str, ...]:
    """The metric names logged for ``loss_type`` (without the ``train/``/``val/`` prefix)."""
    return BASE_METRICS + (IPO_METRICS if loss_type == "ipo" else ())


def batch_values(
    out: PreferenceLossOutput, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, *, ipo: bool
) -> dict[str, Tensor]:
    """Per-pair values ([B] each) of every metric, ready to be averaged (``ipo``: add the target gap)."""
    values = {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margin": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
        "logratio/margin": out.margins,
    }
    if ipo:
        values["ipo/target_gap"] = out.margins - out.targets
    return values


class PreferenceMetrics(nn.Module):
    """One :class:`~torchmetrics.MeanMetric` per metric name: per-pair means, synced across ranks."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        # ModuleDict keys may not contain "/" or ".".
        self.means = nn.ModuleDict({self._key(name): MeanMetric() for name in names})

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")

    def forward(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accumulate ``values`` and return this batch's means (for step-level logging)."""
        return {name: self.means[self._key(name)](values[name].float()) for name in self.names}

    def update(self, values: dict[str, Tensor]) -> None:
        """Accumulate ``values`` for an epoch-level mean."""
        for name in self.names:
            self.means[self._key(name)].update(values[name].float())

    def compute(self) -> dict[str, Tensor]:
        """Means since the last reset, reduced across processes."""
        return {name: self.means[self._key(name)].compute() for name in self.names}

    def reset(self) -> None:
        """Forget everything accumulated."""
        for metric in self.means.values():
            metric.reset()

    def __iter__(self) -> Iterator[tuple[str, MeanMetric]]:
        return ((name, self.means[self._key(name)]) for name in self.names)
