"""Label noise on purpose: swap chosen and rejected for a fixed fraction of the training pairs.

IPO is chosen for noisy preference data; flipping a known share of labels lets a user test that
claim on their own data (train with and without, compare held-out accuracy on clean val sets).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ipo_lightning.errors import ConfigError

if TYPE_CHECKING:
    import datasets

FLIPPED_COLUMN = "label_flipped"
MAX_LABEL_NOISE = 0.5


def check_label_noise(fraction: float) -> None:
    """``data.label_noise`` must be in [0, 0.5]: beyond a half the labels mean the opposite."""
    if not 0.0 <= fraction <= MAX_LABEL_NOISE:
        raise ConfigError(f"data.label_noise must be in [0, {MAX_LABEL_NOISE}], got {fraction}")


def flipped_rows(num_pairs: int, fraction: float, seed: int) -> list[int]:
    """The ``round(fraction * num_pairs)`` row numbers to flip, sorted, drawn from ``seed``.

    ``random.Random`` with a string seed gives the same draw on every Python version and machine.
    """
    count = round(fraction * num_pairs)
    return sorted(random.Random(f"label-noise-{seed}").sample(range(num_pairs), count))


def flip_labels(dataset: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    """Swap ``chosen_ids`` and ``rejected_ids`` on :func:`flipped_rows`; mark them in ``label_flipped``.

    A soft label (``preference_prob``) is kept as it is: the noisy record now claims the other
    completion is preferred with that probability.
    """
    rows = set(flipped_rows(len(dataset), fraction, seed))

    def swap(pair: dict, index: int) -> dict:
        flipped = index in rows
        chosen, rejected = pair["chosen_ids"], pair["rejected_ids"]
        return {
            "chosen_ids": rejected if flipped else chosen,
            "rejected_ids": chosen if flipped else rejected,
            FLIPPED_COLUMN: flipped,
        }

    return dataset.map(
        swap,
        with_indices=True,
        desc="flipping labels",
        # datasets fingerprints a closure by pickling it; name the result explicitly instead.
        new_fingerprint=f"{dataset._fingerprint}-label-noise-{fraction}-{seed}",
    )
