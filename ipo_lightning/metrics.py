"""Torchmetrics aggregation of the preference metrics (their names and meaning: docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
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


def log_eval_values(
    module: L.LightningModule, values: Mapping[str, Tensor], prog_bar: Collection[str]
) -> None:
    """Log one evaluation's values (full names, e.g. ``val/loss``) with ``module.log``, named in
    ``prog_bar`` on the progress bar.

    A validation during ``fit`` goes to the loggers at ``trainer.global_step``, the optimizer steps
    taken, where the generation evaluation and the divergence monitor log their measurements of the
    same validation: Lightning's own step for it would be one less (validation runs before its step
    counter advances). ``module.log`` still puts the values where checkpoint monitors and the
    progress bar read them. Elsewhere (``validate``, ``test``) Lightning logs them itself.
    """
    trainer = module.trainer
    # The same arguments for the whole fit, sanity check included: Lightning refuses a name logged
    # with different ones. Loggers get nothing of a sanity check (nor would they from Lightning).
    direct = trainer.state.fn == TrainerFn.FITTING
    for name, value in values.items():
        module.log(name, value, prog_bar=name in prog_bar, logger=not direct, sync_dist=False)
    if direct and values and not trainer.sanity_checking:
        row = {name: float(value) for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics({**row, "epoch": trainer.current_epoch}, step=trainer.global_step)
            logger.save()  # as Lightning saves after each of its own log calls: on disk at once


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

    def update(self, values: dict[str, Tensor], weights: Mapping[str, Tensor] | None = None) -> None:
        """Accumulate ``values`` for an epoch-level mean.

        ``weights``: per metric name, one weight per value (shaped like it); a name without weights
        weighs its values 1. Evaluation passes 0 for the repeats that pad a rank's share
        (:mod:`ipo_lightning.data.eval_shards`), so they count for nothing.
        """
        weights = weights or {}
        for name in self.names:
            self.means[self._key(name)].update(values[name].float(), weights.get(name))

    def compute(self) -> dict[str, Tensor]:
        """Means since the last reset, reduced across processes."""
        return {name: self.means[self._key(name)].compute() for name in self.names}

    def reset(self) -> None:
        """Forget everything accumulated."""
        for metric in self.means.values():
            metric.reset()

    def __iter__(self) -> Iterator[tuple[str, MeanMetric]]:
        return ((name, self.means[self._key(name)]) for name in self.names)

    @property
    def update_count(self) -> int:
        """Batches accumulated since the last reset (0: nothing to log)."""
        return max((int(metric.update_count) for metric in self.means.values()), default=0)


class EvalSetMetrics:
    """Per-set validation and test metrics of a LightningModule, logged the project's one way.

    The module keeps ``val_metrics`` and ``test_metrics`` (``nn.ModuleDict``: set name -> a metrics
    object with ``update``, ``compute``, ``reset`` and ``update_count``), built by
    :meth:`new_eval_metrics` for every set of the data module. At the end of an epoch every set is
    logged as ``<split>/<set>/<metric>`` and the first (primary) set also as ``<split>/<metric>``:
    its plain names are what checkpointing and the progress bar watch, and with a single set they are
    the only names. ``PROGRESS_BAR`` names the metrics shown on the bar during validation.
    """

    PROGRESS_BAR: frozenset[str] = frozenset({"loss"})

    def new_eval_metrics(self) -> nn.Module:
        """A fresh metrics object for one set."""
        raise NotImplementedError

    def _set_names(self, split: str) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, f"{split}_set_names", None)
        return list(names) if names else [split]

    def _ensure_metrics(self, split: str) -> nn.ModuleDict:
        store: nn.ModuleDict = getattr(self, f"{split}_metrics")
        for name in self._set_names(split):
            if name not in store:
                store[name] = self.new_eval_metrics().to(self.device)
        return store

    def on_validation_epoch_start(self) -> None:
        self._ensure_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._ensure_metrics("test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def _log_eval_metrics(self, split: str) -> None:
        names = self._set_names(split)
        store = self._ensure_metrics(split)
        values: dict[str, Tensor] = {}
        for index, set_name in enumerate(names):
            metrics = store[set_name]
            if metrics.update_count == 0:
                continue  # e.g. a sanity check that did not reach this set
            for metric_name, value in metrics.compute().items():
                if len(names) > 1:
                    values[f"{split}/{set_name}/{metric_name}"] = value
                if index == 0:
                    values[f"{split}/{metric_name}"] = value
            metrics.reset()
        shown = {f"val/{name}" for name in self.PROGRESS_BAR} if split == "val" else set()
        log_eval_values(self, values, shown)  # type: ignore[arg-type]
