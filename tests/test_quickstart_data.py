"""The quickstart data: generated deterministically by ``scripts/make_quickstart_data.py``, well-formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "make_quickstart_data.py"
SHIPPED = REPO / "ipo_lightning" / "quickstart"
SPLITS = ("train", "val", "ood")
KEYS = ["prompt", "chosen", "rejected"]


def _generate(out: Path) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True, text=True
    )


def _load(directory: Path, split: str) -> list[dict[str, str]]:
    with (directory / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quickstart_a")
    _generate(out)
    return out


def test_generator_is_deterministic(generated: Path, tmp_path: Path) -> None:
    _generate(tmp_path)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (generated / f"{split}.jsonl").read_bytes(), (
            split
        )


def test_shipped_files_match_generator(generated: Path) -> None:
    for split in SPLITS:
        shipped = SHIPPED / f"{split}.jsonl"
        assert shipped.is_file(), f"missing {shipped}; run python {SCRIPT.relative_to(REPO)}"
        assert shipped.read_bytes() == (generated / f"{split}.jsonl").read_bytes(), (
            f"{shipped.name} is out of date; rerun python {SCRIPT.relative_to(REPO)}"
        )


@pytest.mark.parametrize("split", SPLITS)
def test_records_are_well_formed(split: str) -> None:
    raw = (SHIPPED / f"{split}.jsonl").read_bytes()
    raw.decode("utf-8")
    assert raw.endswith(b"\n") and b"\r" not in raw
    records = _load(SHIPPED, split)
    assert 150 <= len(records) <= 2000
    for record in records:
        assert list(record) == KEYS
        assert all(isinstance(record[key], str) and record[key].strip() for key in KEYS), record
        assert record["chosen"] != record["rejected"], record
        assert all(len(record[key].split()) <= 30 for key in KEYS), record


def test_split_sizes_and_total_size() -> None:
    sizes = {split: len(_load(SHIPPED, split)) for split in SPLITS}
    assert 1200 <= sizes["train"] <= 1600
    assert 150 <= sizes["val"] <= 250
    assert 150 <= sizes["ood"] <= 250
    assert sum((SHIPPED / f"{split}.jsonl").stat().st_size for split in SPLITS) < 1_000_000


def test_splits_are_disjoint() -> None:
    pairs = {split: {(r["prompt"], r["chosen"]) for r in _load(SHIPPED, split)} for split in SPLITS}
    prompts = {split: {r["prompt"] for r in _load(SHIPPED, split)} for split in SPLITS}
    assert not pairs["train"] & pairs["val"]
    assert not pairs["train"] & pairs["ood"]
    assert not pairs["val"] & pairs["ood"]
    # Stronger than required: held-out prompts are never seen in training.
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["ood"]
