"""TRL's preference dataset layouts load unchanged, from the files a hub download or ``save_to_disk`` leaves.

Each layout holds the same pairs as an explicit conversational JSONL file (or plain, for the standard
layouts); loaded, every layout must give exactly that file's token rows, and the hub-style folders
train a few steps with the CLI's split names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.module import PreferenceModule
from tests.helpers import polite_pairs, quiet_trainer, write_jsonl

USER_TEMPLATE = "tell me about {}"


def _chat_pairs(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Explicit-prompt conversational pairs: TRL's ``{"prompt": [user], "chosen": [assistant], ...}``."""
    pairs = []
    for record in polite_pairs(count, offset):
        question = record["prompt"].removeprefix("Human: ").removesuffix(" Assistant:")
        pairs.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": record["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": record["rejected"].strip()}],
            }
        )
    return pairs


def _implicit_chat(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL's conversational implicit-prompt layout: ``chosen``/``rejected`` are whole conversations."""
    return [
        {"chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]}
        for pair in pairs
    ]


def _ultrafeedback(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trl-lib/ultrafeedback_binarized layout: whole conversations and their scores, no prompt."""
    return [
        {**record, "score_chosen": 8.0 + index % 3, "score_rejected": 3.5}
        for index, record in enumerate(_implicit_chat(pairs))
    ]


def _h4_ultrafeedback(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HuggingFaceH4/ultrafeedback_binarized: the trl-lib layout plus the prompt text, its id and messages."""
    return [
        {
            "prompt": pair["prompt"][0]["content"],
            "prompt_id": f"id-{index}",
            **record,
            "messages": record["chosen"],
        }
        for index, (pair, record) in enumerate(zip(pairs, _ultrafeedback(pairs), strict=True))
    ]


def _implicit_text(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """TRL's standard implicit-prompt layout: whole texts sharing the prompt as a prefix."""
    return [
        {"chosen": record["prompt"] + record["chosen"], "rejected": record["prompt"] + record["rejected"]}
        for record in records
    ]


CHAT_LAYOUTS = {
    "conversational": lambda pairs: pairs,
    "conversational_implicit": _implicit_chat,
    "trl_ultrafeedback": _ultrafeedback,
    "h4_ultrafeedback": _h4_ultrafeedback,
}


HUB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# A preference dataset
"""


def _save_every_way(records: list[dict[str, Any]], held_out: list[dict[str, Any]], root: Path) -> dict:
    """The same records as a hub download (``data/{split}-*.parquet``/jsonl), and saved with datasets."""
    root.mkdir(parents=True)
    train, test = datasets.Dataset.from_list(records), datasets.Dataset.from_list(held_out)
    (root / "hub_parquet" / "data").mkdir(parents=True)
    train.to_parquet(str(root / "hub_parquet" / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(root / "hub_parquet" / "data" / "test-00000-of-00001.parquet"))
    (root / "hub_parquet" / "README.md").write_text(HUB_CARD)  # a hub download's dataset card
    (root / "hub_jsonl" / "data").mkdir(parents=True)
    write_jsonl(root / "hub_jsonl" / "data" / "train-00000-of-00001.jsonl", records)
    write_jsonl(root / "hub_jsonl" / "data" / "test-00000-of-00001.jsonl", held_out)
    train.save_to_disk(str(root / "saved_dataset"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved_dict"))
    return {
        "hub_parquet": DataSource(str(root / "hub_parquet")),
        "hub_jsonl": DataSource(str(root / "hub_jsonl")),
        "saved_dataset": DataSource(str(root / "saved_dataset")),
        "saved_dict": DataSource(str(root / "saved_dict"), split="train"),
    }


def _datamodule(tiny_model_dir: Path, tmp_path: Path, **kwargs: Any) -> PreferenceDataModule:
    return PreferenceDataModule(
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=96,
        max_prompt_length=48,
        batch_size=4,
        cache_dir=str(tmp_path / "hf_cache"),
        **kwargs,
    )


TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _token_rows(dataset: datasets.Dataset) -> list[tuple]:
    present = [column for column in TOKEN_COLUMNS if column in dataset.column_names]
    assert present, dataset.column_names
    return [tuple(tuple(row[column]) for column in present) for row in dataset]


@pytest.mark.parametrize("layout", list(CHAT_LAYOUTS))
def test_trl_chat_layouts_give_the_rows_of_explicit_conversational_records(
    tiny_model_dir: Path, tmp_path: Path, layout: str
) -> None:
    pairs, held_out = _chat_pairs(6), _chat_pairs(3, offset=50)
    canonical = write_jsonl(tmp_path / "canonical.jsonl", pairs)
    transform = CHAT_LAYOUTS[layout]
    sources = _save_every_way(transform(pairs), transform(held_out), tmp_path / layout)
    module = _datamodule(tiny_model_dir, tmp_path, test={"canonical": DataSource(str(canonical)), **sources})
    module.setup("test")
    expected = _token_rows(module.test_datasets["canonical"])
    assert len(expected) == 6
    for name in sources:
        assert _token_rows(module.test_datasets[name]) == expected, name
    # The prompt really is the chat-template rendering of the user turn (not an empty or whole text).
    first = module.test_datasets["hub_parquet"][0]
    assert module.tokenizer.decode(first["prompt_ids"]).count("tell me about") == 1


def test_trl_standard_layouts_give_the_rows_of_plain_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = polite_pairs(6)
    canonical = write_jsonl(tmp_path / "canonical.jsonl", records)
    explicit = _save_every_way(records, polite_pairs(3, offset=50), tmp_path / "explicit")
    implicit = _save_every_way(
        _implicit_text(records), _implicit_text(polite_pairs(3, 50)), tmp_path / "implicit"
    )
    test = {"canonical": DataSource(str(canonical))}
    test.update({f"explicit_{name}": source for name, source in explicit.items()})
    test.update({f"implicit_{name}": source for name, source in implicit.items()})
    module = _datamodule(tiny_model_dir, tmp_path, test=test)
    module.setup("test")
    expected = _token_rows(module.test_datasets["canonical"])
    for name in test:
        assert _token_rows(module.test_datasets[name]) == expected, name


@pytest.mark.parametrize("layout", ["trl_ultrafeedback", "h4_ultrafeedback"])
def test_ultrafeedback_layout_from_a_hub_folder_trains_unchanged(
    tiny_model_dir: Path, tmp_path: Path, layout: str
) -> None:
    transform = CHAT_LAYOUTS[layout]
    sources = _save_every_way(transform(_chat_pairs(8)), transform(_chat_pairs(4, 50)), tmp_path / layout)
    folder = sources["hub_parquet"].path
    datamodule = _datamodule(
        tiny_model_dir,
        tmp_path,
        train=DataSource(folder, split="train"),
        val={"test": DataSource(folder, split="test")},
    )
    module = PreferenceModule(str(tiny_model_dir), lr_schedule="constant")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert len(datamodule.train_dataset) == 8 and datamodule.dropped == {"train": {}, "test": {}}
    assert float(trainer.callback_metrics["val/rewards/accuracy"]) >= 0.0
