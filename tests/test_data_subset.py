"""data.train_size: the first N pairs of one fixed shuffle, read back from the built training sets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.noise import FLIPPED_COLUMN
from ipo_lightning.errors import ConfigError
from tests.helpers import polite_pairs, write_jsonl


def _numbered_pairs(count: int) -> list[dict[str, str]]:
    """Pairs whose prompts are all different, so a built row names its source record."""
    return [
        {**pair, "prompt": pair["prompt"].replace("Assistant:", f"number {i}. Assistant:")}
        for i, pair in enumerate(polite_pairs(count))
    ]


def _train_set(tmp_path: Path, model_dir: Path, train: Path, limit: int | None = None, **kwargs: object):
    module = PreferenceDataModule(
        train=DataSource(str(train), limit=limit),
        tokenizer_name_or_path=str(model_dir),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "hf_cache"),
        **kwargs,
    )
    module.setup("fit")
    return module.train_dataset


def test_a_smaller_train_size_is_a_prefix_of_a_larger_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _numbered_pairs(40))
    full = _train_set(tmp_path, tiny_model_dir, train)
    record_of = {tuple(row["prompt_ids"]): index for index, row in enumerate(full)}
    assert len(record_of) == 40  # every prompt tokenises differently

    def records(dataset) -> list[int]:
        return [record_of[tuple(ids)] for ids in dataset["prompt_ids"]]

    small = _train_set(tmp_path, tiny_model_dir, train, train_size=10)
    large = _train_set(tmp_path, tiny_model_dir, train, train_size=25)
    assert len(small) == 10 and len(large) == 25
    assert records(small) == records(large)[:10]
    assert len(set(records(large))) == 25
    assert records(large) != list(range(25))  # a shuffle, not the source's first records
    for row in small:  # whole pairs, unchanged
        assert row["chosen_ids"] == full[record_of[tuple(row["prompt_ids"])]]["chosen_ids"]

    # The order does not follow the data seed (replicates train on the same pairs).
    assert records(_train_set(tmp_path, tiny_model_dir, train, train_size=25, seed=7)) == records(large)


def test_label_noise_flips_its_share_of_exactly_the_kept_pairs(tmp_path: Path, tiny_model_dir: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _numbered_pairs(40))
    clean = _train_set(tmp_path, tiny_model_dir, train, train_size=20)
    noisy = _train_set(tmp_path, tiny_model_dir, train, train_size=20, label_noise=0.25, seed=3)
    assert noisy["prompt_ids"] == clean["prompt_ids"]  # size first, then noise: the same 20 pairs
    swapped = [
        row
        for row in range(20)
        if (noisy[row]["chosen_ids"], noisy[row]["rejected_ids"])
        == (clean[row]["rejected_ids"], clean[row]["chosen_ids"])
    ]
    assert len(swapped) == 5 and [row for row in range(20) if noisy[row][FLIPPED_COLUMN]] == swapped


def test_train_size_beyond_the_pairs_there_are_is_one_config_error(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _numbered_pairs(40))
    expected = f"data.train_size 31 is more than the 30 training pairs of {train}"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        _train_set(tmp_path, tiny_model_dir, train, limit=30, train_size=31)
    assert len(_train_set(tmp_path, tiny_model_dir, train, limit=30, train_size=30)) == 30
    with pytest.raises(
        ConfigError, match=r"data.train_size must be a positive number of pairs or null, got 0$"
    ):
        _train_set(tmp_path, tiny_model_dir, train, train_size=0)
