"""The training sampler: one shuffle shared by all ranks, resumable mid-epoch.

Why not ``RandomSampler`` or Lightning's injected ``DistributedSampler``: exact resume needs the
sampler to continue where a checkpoint left off (Lightning restores a loader's position only for
stateful loaders), and DDP must see the same pairs per optimizer step as one process with the same
global batch. Both follow from drawing one permutation per epoch and dealing it out round-robin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import lightning as L
import torch
from torch.utils.data import DistributedSampler


def replicas(trainer: L.Trainer | None) -> dict[str, int]:
    """The ``num_replicas`` and ``rank`` a sampler of ``trainer``'s data takes: its world size and this
    process's global rank, or one replica without a trainer (a data module used on its own)."""
    if trainer is None:
        return {"num_replicas": 1, "rank": 0}
    return {"num_replicas": trainer.world_size, "rank": trainer.global_rank}


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffle of epoch ``epoch``, exactly as ``DataLoader(shuffle=True, generator=G)`` draws it.

    ``G = torch.Generator().manual_seed(seed)``; each epoch such a loader draws a worker base seed,
    one permutation it uses and one it discards (``RandomSampler``'s empty remainder). Replaying that
    stream keeps one process on the very batches it trained on before this sampler existed (the
    quickstart numbers in the README stay valid); a test checks the equality.
    """
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        torch.randperm(num_items, generator=generator)
        torch.randperm(num_items, generator=generator)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(num_items, generator=generator).tolist()


class ResumableDistributedSampler(DistributedSampler):
    """Shuffled indices for one rank, dealt round-robin from a permutation shared by every rank.

    Rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...`` of the epoch's permutation, so with a
    per-rank batch of ``b`` the ranks' k-th batches together are positions ``[k*w*b, (k+1)*w*b)``: the
    k-th batch one process would see with batch size ``w*b``. As in ``DistributedSampler``, the last
    round is padded with the permutation's first items so that every rank gets the same number of
    pairs, hence the same number of batches (no rank waits at a collective another never reaches) and
    the same number of pairs per batch (DDP's gradient average is then the mean over all pairs).

    Subclassing ``DistributedSampler`` keeps Lightning from replacing it, and Lightning calls
    :meth:`set_epoch` before every epoch. :meth:`skip_batches` makes the next iteration of an epoch
    start after the batches a checkpoint had already trained on.

    Args:
        dataset: the training set (only its length is used).
        batch_size: pairs per batch on this rank (to turn skipped batches into skipped items).
        num_replicas: number of ranks (world size).
        rank: this process's global rank.
        seed: shuffle seed, the same on every rank.
    """

    def __init__(self, dataset: Sized, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self._skip: tuple[int, int] | None = None  # (epoch, batches) for the next iteration

    def skip_batches(self, epoch: int, batches: int) -> None:
        """Start the next iteration of epoch ``epoch`` after its first ``batches`` batches (once)."""
        self._skip = (epoch, batches) if batches > 0 else None

    def __iter__(self) -> Iterator[int]:
        indices = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        self.total_size = math.ceil(len(indices) / self.num_replicas) * self.num_replicas
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        mine = indices[self.rank : self.total_size : self.num_replicas]
        if self._skip is not None:
            epoch, batches = self._skip
            self._skip = None  # only the first iteration after a resume starts late
            if epoch == self.epoch:
                mine = mine[batches * self.batch_size :]
        return iter(mine)
