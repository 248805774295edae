"""Deliberate label noise: exactly the requested fraction of training pairs flipped, deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.noise import FLIPPED_COLUMN, flipped_rows
from ipo_lightning.errors import ConfigError
from tests.helpers import polite_pairs, write_jsonl


def _train_set(tmp_path: Path, model_dir: Path, train: Path, **kwargs: object):
    module = PreferenceDataModule(
        train=DataSource(str(train)),
        tokenizer_name_or_path=str(model_dir),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "hf_cache"),
        **kwargs,
    )
    module.setup("fit")
    return module.train_dataset


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_label_noise_flips_exactly_the_fraction_deterministically(
    tmp_path: Path, tiny_model_dir: Path, fraction: float
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(40))
    clean = _train_set(tmp_path, tiny_model_dir, train)
    noisy = _train_set(tmp_path, tiny_model_dir, train, label_noise=fraction, seed=3)

    swapped = [
        row
        for row in range(len(clean))
        if noisy[row]["chosen_ids"] == clean[row]["rejected_ids"]
        and noisy[row]["rejected_ids"] == clean[row]["chosen_ids"]
    ]
    unchanged = [row for row in range(len(clean)) if noisy[row]["chosen_ids"] == clean[row]["chosen_ids"]]
    assert len(swapped) == round(fraction * 40) and len(swapped) + len(unchanged) == 40
    assert [row for row in range(40) if noisy[row][FLIPPED_COLUMN]] == swapped
    assert noisy["prompt_ids"] == clean["prompt_ids"]

    # Same seed, same rows (a fresh module, from the cache or not); another seed, other rows.
    again = _train_set(tmp_path, tiny_model_dir, train, label_noise=fraction, seed=3)
    assert again[FLIPPED_COLUMN] == noisy[FLIPPED_COLUMN]
    assert flipped_rows(40, fraction, seed=4) != swapped


def test_label_noise_out_of_range_is_a_config_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    with pytest.raises(ConfigError, match=r"data.label_noise must be in \[0, 0.5\], got 0.7"):
        _train_set(tmp_path, tiny_model_dir, train, label_noise=0.7)
