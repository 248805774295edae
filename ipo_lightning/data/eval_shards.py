"""Validation and test sets split over ranks so that every item counts exactly once.

Under FSDP or DeepSpeed ZeRO-3 every forward is collective, so all ranks must run the same number of
batches of the same size. A set of N items over W ranks is therefore padded to ``ceil(N / W) * W``
positions by repeating its first items, as ``DistributedSampler`` pads, but each position carries a
weight: 1 for the N real items, 0 for the repeats. The collators pass the weights into the batch under
:data:`WEIGHT` and the evaluation metrics weigh each value by them, so the repeats run their forward
and count for nothing: the synced means equal those of one process over the N items.

The padding lives in the dataset view (:class:`PaddedEvalSet`) rather than the sampler, because a
sampler's indices never reach the collator; the view's length is a multiple of W, so the plain
``DistributedSampler`` of :func:`eval_shards` deals it out without padding again, and Lightning keeps
it (it replaces only samplers that are not a ``DistributedSampler``). :func:`eval_loaders` builds every
data module's val/test loaders this way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ipo_lightning.data.sampler import replicas
from ipo_lightning.errors import ConfigError

WEIGHT = "weight"
"""Batch key (and item field) of the per-item weights: 1.0 for a real item, 0.0 for a repeat."""


class MapSet(Protocol):
    """What :class:`PaddedEvalSet` reads of a set: its length and its items (mappings) by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def padded_size(num_items: int, num_replicas: int) -> int:
    """Positions of ``num_items`` padded to equal shares of ``num_replicas`` ranks."""
    return math.ceil(num_items / num_replicas) * num_replicas


class PaddedEvalSet(Dataset):
    """A set padded to a multiple of ``num_replicas`` positions; each item has a :data:`WEIGHT` field.

    Position ``p`` is item ``p % N`` of the set with weight 1.0 for ``p < N`` and 0.0 after (the
    repeats ``DistributedSampler`` would add). With one replica it is the set itself, weights all 1.

    Args:
        dataset: the set (N items, each a mapping of fields).
        num_replicas: number of ranks (world size).
    """

    def __init__(self, dataset: MapSet, num_replicas: int = 1) -> None:
        self.dataset = dataset
        self.num_items = len(dataset)
        self.total_size = padded_size(self.num_items, num_replicas)

    def __len__(self) -> int:
        return self.total_size

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < self.total_size:
            raise IndexError(f"position {position} out of range for {self.total_size} positions")
        item = dict(self.dataset[position % self.num_items])
        item[WEIGHT] = 1.0 if position < self.num_items else 0.0
        return item


def eval_shards(
    dataset: MapSet, num_replicas: int = 1, rank: int = 0
) -> tuple[PaddedEvalSet, DistributedSampler]:
    """The padded view of a val/test set and the in-order sampler of rank ``rank``'s share of it.

    Every rank gets ``ceil(N / num_replicas)`` positions (rank ``r``: ``r, r + W, ...``); the repeats
    fall in the last round and weigh 0.
    """
    padded = PaddedEvalSet(dataset, num_replicas)
    sampler = DistributedSampler(padded, num_replicas=num_replicas, rank=rank, shuffle=False)
    return padded, sampler


class MakeLoader(Protocol):
    """A data module's loader factory: ``(dataset, batch_size, sampler=...) -> DataLoader``."""

    def __call__(
        self, dataset: Dataset, batch_size: int, sampler: DistributedSampler | None = None
    ) -> DataLoader: ...


def eval_loaders(
    sets: Mapping[str, MapSet],
    names: Sequence[str],
    stage: str,
    trainer: L.Trainer | None,
    make_loader: MakeLoader,
    batch_size: int,
) -> list[DataLoader]:
    """One loader per set of ``names`` (in that order), each over this rank's :func:`eval_shards` share
    under ``trainer`` (one replica without a trainer), built by the data module's ``make_loader``.

    Raises:
        ConfigError: a set of ``names`` missing from ``sets``: ``setup(stage)`` has not built it.
    """
    loaders = []
    for name in names:
        if name not in sets:
            raise ConfigError(f"data set {name!r} is not built: call setup({stage!r}) first")
        padded, sampler = eval_shards(sets[name], **replicas(trainer))
        loaders.append(make_loader(padded, batch_size, sampler=sampler))
    return loaders
