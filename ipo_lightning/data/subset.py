"""Training-set size on purpose: the first N pairs of one fixed shuffle, so smaller sets nest in larger ones.

A data-size study trains on N pairs for several N. Taking the first N rows of a source would follow
its order (often sorted by topic or source), and ``DataSource.limit`` cuts raw records before pairs
are dropped, so the count trained on would differ from N. ``data.train_size`` instead keeps the
first N of the kept training pairs in an order drawn once from a fixed seed, independent of
``data.seed`` and ``seed_everything``: every size and every replicate sees a prefix of the same
order, and the pairs of a smaller set are exactly the first pairs of every larger one.
"""

from __future__ import annotations

import random

from ipo_lightning.errors import ConfigError

SHUFFLE_SEED = "train-size"
"""Seed of the fixed order; a string seed gives the same draw on every Python version and machine."""


def check_train_size(size: int | None) -> None:
    """``data.train_size`` is None (all pairs) or a positive number of pairs."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"data.train_size must be a positive number of pairs or null, got {size!r}")


def subset_rows(num_pairs: int, size: int, *, source: str = "data.train") -> list[int]:
    """Row numbers of the ``size`` pairs kept out of ``num_pairs``, in the fixed order (not sorted).

    The result for ``size`` is a prefix of the result for any larger size over the same pairs.
    ``source`` names the training data in the error.

    Raises:
        ConfigError: ``size`` is more than ``num_pairs``.
    """
    if size > num_pairs:
        raise ConfigError(
            f"data.train_size {size} is more than the {num_pairs} training pairs of {source} (counted "
            "after the source's limit, the val_fraction split and dropped pairs)"
        )
    order = list(range(num_pairs))
    random.Random(SHUFFLE_SEED).shuffle(order)
    return order[:size]
