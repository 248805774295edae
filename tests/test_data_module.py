"""The DataModule end to end on local files: sources, errors, held-out split, named sets, drops, cache."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import datasets
import pytest
from transformers import PreTrainedTokenizerBase

from ipo_lightning.data import DataSource, PairTokenizer, PreferenceDataModule
from ipo_lightning.data.sources import check_utf8
from ipo_lightning.errors import ConfigError, DataError

QUESTIONS = [f"Question {i}: what is the capital of France?" for i in range(20)]


def plain_records(n: int = 20) -> list[dict]:
    return [
        {"prompt": QUESTIONS[i], "chosen": " Paris is the capital.", "rejected": f" No idea {i}."}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list, blank_lines_after: tuple[int, ...] = ()) -> Path:
    lines = []
    for i, record in enumerate(records):
        lines.append(record if isinstance(record, str) else json.dumps(record))
        if i in blank_lines_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_module(tiny_model_dir: Path, tmp_path: Path, **kwargs: object) -> PreferenceDataModule:
    kwargs.setdefault("max_length", 64)
    kwargs.setdefault("max_prompt_length", 32)
    kwargs.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    return PreferenceDataModule(tokenizer_name_or_path=str(tiny_model_dir), **kwargs)


def prompts_of(module: PreferenceDataModule, dataset: datasets.Dataset) -> list[str]:
    return [module.tokenizer.decode(ids) for ids in dataset["prompt_ids"]]


def test_jsonl_to_batches(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", plain_records(5))
    module = make_module(tiny_model_dir, tmp_path, train=DataSource(str(file)), batch_size=2)
    module.setup("fit")
    assert len(module.train_dataset) == 5 and module.dropped == {"train": {}}
    loader = module.train_dataloader()
    batches = list(loader)
    assert [b["preference_prob"].shape[0] for b in batches] == [2, 2, 1]
    # Each row is the record tokenised independently: prompt with special tokens, completion + EOS.
    seen = set()
    for batch in batches:
        size = batch["preference_prob"].shape[0]
        for row in range(size):
            chosen = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            rejected = batch["input_ids"][size + row][batch["attention_mask"][size + row].bool()].tolist()
            prompt_length = int((~batch["completion_mask"][row])[batch["attention_mask"][row].bool()].sum())
            record = plain_records(5)[QUESTIONS.index(tiny_tokenizer.decode(chosen[:prompt_length]))]
            eos = [tiny_tokenizer.eos_token_id]
            assert (
                chosen
                == tiny_tokenizer(record["prompt"])["input_ids"]
                + tiny_tokenizer(record["chosen"], add_special_tokens=False)["input_ids"]
                + eos
            )
            assert (
                rejected[prompt_length:]
                == tiny_tokenizer(record["rejected"], add_special_tokens=False)["input_ids"] + eos
            )
            seen.add(record["prompt"])
    assert len(seen) == 5
    # Shuffled, in an order fixed by the seed.
    order = [
        row for batch in batches for row in batch["input_ids"][: batch["preference_prob"].shape[0]].tolist()
    ]

    def first_rows(seed: int) -> list[list[int]]:
        other = make_module(tiny_model_dir, tmp_path, train=DataSource(str(file)), batch_size=2, seed=seed)
        other.setup("fit")
        return [
            row
            for b in other.train_dataloader()
            for row in b["input_ids"][: b["preference_prob"].shape[0]].tolist()
        ]

    assert first_rows(0) == order
    assert first_rows(1) != order
    assert sorted(order) == sorted(first_rows(1))


def test_conversational_rows_match_the_chat_template(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    user = {"role": "user", "content": "Write a short poem about the sea."}
    good = {"role": "assistant", "content": "The sea is blue, the sky is wide."}
    bad = {"role": "assistant", "content": "No."}
    file = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [user], "chosen": [good], "rejected": [bad]}])
    module = make_module(
        tiny_model_dir, tmp_path, train=DataSource(str(file)), max_length=256, max_prompt_length=128
    )
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    for row, completion in ((0, good), (1, bad)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == tiny_tokenizer.apply_chat_template([user, completion], tokenize=True, return_dict=False)
        completion_ids = batch["input_ids"][row][batch["completion_mask"][row]].tolist()
        assert tiny_tokenizer.decode(completion_ids) == completion["content"] + "<|im_end|>\n"


def test_parquet_save_to_disk_and_folder_sources_agree_with_jsonl(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = plain_records(6)
    jsonl = write_jsonl(tmp_path / "train.jsonl", records)
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "array.json").write_text(json.dumps(records, indent=2))
    table.save_to_disk(str(tmp_path / "saved_dataset"))
    datasets.DatasetDict({"train": table.select(range(3)), "dev": table}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "test.jsonl", records)  # file names give splits
    sources = {
        "jsonl": DataSource(str(jsonl)),
        "parquet": DataSource(str(tmp_path / "train.parquet")),
        "json_array": DataSource(str(tmp_path / "array.json")),
        "saved": DataSource(str(tmp_path / "saved_dataset")),
        "saved_dict": DataSource(str(tmp_path / "saved_dict"), split="dev"),
        "folder": DataSource(str(tmp_path / "folder"), split="test"),
    }
    module = make_module(tiny_model_dir, tmp_path, test=sources)
    module.setup("test")
    assert module.test_set_names == list(sources)
    expected = module.test_datasets["jsonl"].to_list()
    assert len(expected) == 6
    for name in sources:
        assert module.test_datasets[name].to_list() == expected, name
    assert [len(loader.dataset) for loader in module.test_dataloader()] == [6] * len(sources)


def test_limit_and_builtin_names(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ipo_lightning.builtin as builtin

    monkeypatch.setattr(builtin, "QUICKSTART_DIR", tmp_path)
    write_jsonl(tmp_path / "train.jsonl", plain_records(8))
    module = make_module(tiny_model_dir, tmp_path, train=DataSource("builtin:quickstart/train", limit=3))
    module.setup("fit")
    assert prompts_of(module, module.train_dataset) == QUESTIONS[:3]
    with pytest.raises(ConfigError, match="unknown built-in data source 'builtin:quickstart/nope'"):
        make_module(tiny_model_dir, tmp_path, train=DataSource("builtin:quickstart/nope")).setup("fit")


def test_val_fraction_is_deterministic_and_disjoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", plain_records(20))

    def split(seed: int) -> tuple[list[str], list[str]]:
        module = make_module(
            tiny_model_dir, tmp_path, train=DataSource(str(file)), val_fraction=0.25, seed=seed
        )
        module.setup("fit")
        assert module.val_set_names == ["val"]
        return prompts_of(module, module.train_dataset), prompts_of(module, module.val_datasets["val"])

    train, held_out = split(0)
    assert len(held_out) == 5 and len(train) == 15
    assert sorted(train + held_out) == sorted(QUESTIONS)
    assert split(0) == (train, held_out)
    assert split(1)[1] != held_out


def test_named_val_sets_keep_their_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", plain_records(10))
    ood = write_jsonl(tmp_path / "ood.jsonl", plain_records(3))
    in_dist = write_jsonl(tmp_path / "in_dist.jsonl", plain_records(4))
    module = make_module(
        tiny_model_dir,
        tmp_path,
        train=DataSource(str(train)),
        val={"ood": DataSource(str(ood)), "in_dist": DataSource(str(in_dist))},
        val_fraction=0.2,
        val_batch_size=16,
    )
    module.setup("validate")
    assert module.val_set_names == ["val", "ood", "in_dist"]
    loaders = module.val_dataloader()
    assert isinstance(loaders, list)
    assert [len(loader.dataset) for loader in loaders] == [2, 3, 4]
    assert [next(iter(loader))["preference_prob"].shape[0] for loader in loaders] == [2, 3, 4]

    single = make_module(tiny_model_dir, tmp_path, val={"ood": DataSource(str(ood))})
    single.setup("validate")
    assert isinstance(single.val_dataloader(), list) and len(single.val_dataloader()) == 1


def test_dropped_pairs_are_counted_and_reported(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [
        {
            "chosen": f"Human: question {i}? Assistant: I think so",
            "rejected": f"Human: question {i}? Assistant: No",
        }
        for i in range(5)
    ]
    records += [
        {"chosen": "Human: hi? Assistant: hello", "rejected": "Human: hi? Assistant: hello"},  # equal
        {"chosen": "Human: hi? Assistant: hello", "rejected": "Human: hi? Assistant: hello there"},  # prefix
        # Completions " the sea" / " thesaurus" share their first token, the only one there is room for.
        {"chosen": "Human: hi? Assistant: the sea", "rejected": "Human: hi? Assistant: thesaurus"},
    ]
    file = write_jsonl(tmp_path / "hh.jsonl", records)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)  # Lightning's logger may not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            module = make_module(
                tiny_model_dir, tmp_path, train=DataSource(str(file)), max_length=9, max_prompt_length=8
            )
            module.setup("fit")
    finally:
        logger.removeHandler(caplog.handler)
    assert module.dropped == {
        "train": {"empty completion after prompt extraction": 2, "identical after truncation": 1}
    }
    assert len(module.train_dataset) == 5
    assert {len(ids) for ids in module.train_dataset["chosen_ids"]} == {1}
    assert (
        "train: dropped 3 of 8 pairs: 2 empty completion after prompt extraction, "
        "1 identical after truncation" in caplog.text
    )

    all_dropped = write_jsonl(tmp_path / "all_dropped.jsonl", records[5:7])
    with pytest.raises(DataError, match="train: no pairs left"):
        make_module(tiny_model_dir, tmp_path, train=DataSource(str(all_dropped))).setup("fit")


def test_second_setup_reuses_the_tokenised_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "train.jsonl", plain_records(10))

    def tokenised_files(**kwargs: object) -> list[str]:
        module = make_module(
            tiny_model_dir, tmp_path, train=DataSource(str(file)), val_fraction=0.2, **kwargs
        )
        module.setup("fit")
        return [entry["filename"] for entry in module.train_dataset.cache_files]

    first = tokenised_files()
    assert len(first) == 1 and Path(first[0]).name.startswith("cache-")
    before = os.stat(first[0])
    # A second module loads its own tokenizer: the fingerprint must not depend on object identity.
    # (Checked by hand across processes too; a subprocess here would double this file's run time.)
    assert tokenised_files() == first
    after = os.stat(first[0])
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)  # not rewritten
    # A setting that changes the token ids must not hit the same cache entry.
    assert tokenised_files(max_length=48) != first


def test_tokenizer_without_pad_token_pads_with_eos(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no_pad")
    module = make_module(tmp_path / "no_pad", tmp_path)
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id
    assert module.collator.pad_token_id == tiny_tokenizer.eos_token_id


# --- bad input: one DataError naming file, record/line and field ---------------------------------


def bad_jsonl(tmp_path: Path, bad: dict | str, blank_line: bool = True) -> Path:
    # Record 3 is bad; a blank line after record 1 makes its line number 5, not 4.
    records = plain_records(3) + [bad] + plain_records(2)
    return write_jsonl(tmp_path / "bad.jsonl", records, blank_lines_after=(1,) if blank_line else ())


def setup_error(tiny_model_dir: Path, tmp_path: Path, file: Path, **kwargs: object) -> str:
    module = make_module(tiny_model_dir, tmp_path, train=DataSource(str(file)), **kwargs)
    with pytest.raises(DataError) as caught:
        module.setup("fit")
    return str(caught.value)


def test_plain_file_whose_first_record_has_no_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The prompt column makes the file plain: the first record is a bad plain record, not a sign
    # that the whole file is implicit.
    for first in ({"chosen": " a", "rejected": " b"}, {"prompt": None, "chosen": " a", "rejected": " b"}):
        file = write_jsonl(tmp_path / "bad.jsonl", [first, *plain_records(3)])
        message = setup_error(tiny_model_dir, tmp_path, file)
        assert message == f"{file}:1: record 0: field 'prompt': missing (absent or null)"


def test_implicit_texts_without_a_common_prefix(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = [{"chosen": "Human: hi? Assistant: hello", "rejected": "Human: hi? Assistant: go away"}] * 2
    file = write_jsonl(tmp_path / "hh.jsonl", [*records, {"chosen": "Sure.", "rejected": "No."}])
    message = setup_error(tiny_model_dir, tmp_path, file)
    assert message.startswith(f"{file}:3: record 2: field 'chosen' and field 'rejected': the texts share no")


def test_malformed_json_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = bad_jsonl(tmp_path, '{"prompt": "Q", "chosen": " a", "rejected": " b",')
    message = setup_error(tiny_model_dir, tmp_path, file)
    assert message.startswith(f"{file}:5: malformed JSON: ")
    # A JSON array file: the line comes from the parser.
    array = tmp_path / "bad.json"
    array.write_text(
        '[\n  {"prompt": "Q", "chosen": " a", "rejected": " b"},\n  {"prompt": "Q" "chosen": " a"}\n]\n'
    )
    assert setup_error(tiny_model_dir, tmp_path, array).startswith(f"{array}:3: malformed JSON: ")


def latin1_jsonl(tmp_path: Path, name: str = "latin1.jsonl") -> tuple[Path, int]:
    """Record 3 (line 5, after a blank line) holds a Latin-1 byte; returns the file and its offset."""
    file = bad_jsonl(tmp_path, {"prompt": "Q", "chosen": " cafe", "rejected": " b"}).rename(tmp_path / name)
    data = file.read_bytes().replace(b"cafe", b"caf\xe9")
    file.write_bytes(data)
    return file, data.index(b"\xe9")


def test_non_utf8_file_names_the_line_and_byte_offset(tiny_model_dir: Path, tmp_path: Path) -> None:
    file, offset = latin1_jsonl(tmp_path)
    assert setup_error(tiny_model_dir, tmp_path, file) == (
        f"{file}:5: not valid UTF-8 (byte offset {offset}, byte 0xe9: invalid continuation byte); "
        "save the file as UTF-8"
    )
    # The same inside a folder of data files.
    folder = tmp_path / "folder"
    folder.mkdir()
    moved = file.rename(folder / "train.jsonl")
    message = setup_error(tiny_model_dir, tmp_path, folder)
    assert message.startswith(f"{moved}:5: not valid UTF-8 (byte offset")


@pytest.mark.parametrize("block_size", [1, 7, 64, 1 << 20])
def test_utf8_check_reads_blocks_without_losing_the_position(tmp_path: Path, block_size: int) -> None:
    text = "".join(f'{{"n": {i}, "text": "\u00e9t\u00e9 \u2014 \U0001f600"}}\n' for i in range(30))
    data = text.encode("utf-8")
    good = tmp_path / "good.jsonl"
    good.write_bytes(data)
    check_utf8(good, block_size=block_size)  # multi-byte characters cut by block edges are fine
    bad_at = data.index(b"\n", len(data) // 2) + 4  # inside line 17
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(data[:bad_at] + b"\xff" + data[bad_at:])
    line = data[:bad_at].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:{line}: .*byte offset {bad_at}, byte 0xff"):
        check_utf8(bad, block_size=block_size)
    # A character cut off by the end of the file.
    bad.write_bytes(data + "\u00e9".encode()[:1])
    expected = rf"^{re.escape(str(bad))}:31: not valid UTF-8 \(byte offset {len(data)}, byte 0xc3"
    with pytest.raises(DataError, match=expected):
        check_utf8(bad, block_size=block_size)


@pytest.mark.parametrize(
    ("bad", "field_message"),
    [
        ({"prompt": "Q", "rejected": " b"}, "field 'chosen': missing"),
        ({"prompt": "Q", "chosen": 5, "rejected": " b"}, "field 'chosen': expected a string, got int"),
        ({"prompt": "Q", "chosen": " a", "rejected": "   "}, "field 'rejected': empty completion"),
        ({"prompt": "Q", "chosen": " a", "rejected": " b", "preference_prob": 2}, "field 'preference_prob'"),
    ],
)
def test_bad_record_names_file_line_record_and_field(
    tiny_model_dir: Path, tmp_path: Path, bad: dict, field_message: str
) -> None:
    # With a blank line, datasets 5.2 cannot read a column mixing strings and numbers; without one it
    # can. Both paths must end in the same record-level message.
    for blank_line, line in ((True, 5), (False, 4)):
        message = setup_error(tiny_model_dir, tmp_path, bad_jsonl(tmp_path, bad, blank_line))
        assert message.startswith(f"{tmp_path / 'bad.jsonl'}:{line}: record 3: {field_message}")


def test_prompt_longer_than_max_length(tiny_model_dir: Path, tmp_path: Path) -> None:
    long = {"prompt": "The quick brown fox jumps over the lazy dog. " * 10, "chosen": " a", "rejected": " b"}
    message = setup_error(
        tiny_model_dir, tmp_path, bad_jsonl(tmp_path, long), max_length=32, max_prompt_length=None
    )
    assert message.startswith(f"{tmp_path / 'bad.jsonl'}:5: record 3: field 'prompt': the prompt has ")
    assert "tokens >= max_length 32" in message and "max_prompt_length" in message


def test_bad_record_in_parquet_names_the_record(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = plain_records(4)
    records[2]["chosen"] = ""
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "bad.parquet"))
    message = setup_error(tiny_model_dir, tmp_path, tmp_path / "bad.parquet")
    assert message == f"{tmp_path / 'bad.parquet'}: record 2: field 'chosen': empty completion"


def test_bad_record_with_several_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    records = plain_records(20)
    records[15]["rejected"] = None
    message = setup_error(tiny_model_dir, tmp_path, write_jsonl(tmp_path / "bad.jsonl", records), num_proc=2)
    assert f"{tmp_path / 'bad.jsonl'}:16: record 15: field 'rejected': missing" in message


def test_missing_column_and_missing_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "cols.jsonl", [{"question": "Q", "good": " a", "bad": " b"}])
    message = setup_error(tiny_model_dir, tmp_path, file)
    assert message.startswith(f"{file}: no column 'chosen'") and "question, good, bad" in message
    mapped = make_module(
        tiny_model_dir,
        tmp_path,
        train=DataSource(str(file)),
        columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
    )
    mapped.setup("fit")
    assert len(mapped.train_dataset) == 1
    missing = tmp_path / "nowhere" / "train.jsonl"
    assert setup_error(tiny_model_dir, tmp_path, missing) == f"{missing}: data file not found"


def test_invalid_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = DataSource(str(tmp_path / "train.jsonl"))
    with pytest.raises(ConfigError, match="max_prompt_length"):
        make_module(tiny_model_dir, tmp_path, max_length=64, max_prompt_length=64)
    with pytest.raises(ConfigError, match="named 'val'"):
        make_module(tiny_model_dir, tmp_path, train=source, val={"val": source}, val_fraction=0.1)
    with pytest.raises(ConfigError, match="val_fraction needs data.train"):
        make_module(tiny_model_dir, tmp_path, val_fraction=0.1)
    with pytest.raises(ConfigError, match="'answer'"):
        make_module(tiny_model_dir, tmp_path, columns={"answer": "x"})


def test_length_checks_give_the_pair_tokenizers_message_with_option_names(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    for max_length, max_prompt_length in ((1, None), (16, 16), (16, 0)):
        with pytest.raises(ConfigError) as from_module:
            make_module(tiny_model_dir, tmp_path, max_length=max_length, max_prompt_length=max_prompt_length)
        with pytest.raises(ConfigError) as from_tokenizer:
            PairTokenizer(tiny_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        assert str(from_module.value) == str(from_tokenizer.value).replace("max_", "data.max_")


def test_limit_below_one_is_one_clean_error(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    from ipo_lightning.data.sources import load_source

    file = write_jsonl(tmp_path / "train.jsonl", plain_records(2))
    expected = f"data source {str(file)!r}: limit must be a positive number, got 0"
    source = DataSource(str(file), limit=0)  # a config value: accepted as typed, checked on use
    with pytest.raises(ConfigError) as caught:
        load_source(source)
    assert str(caught.value) == expected
    # Through jsonargparse, as the CLI parses it: not buried in a report on every accepted type.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PreferenceDataModule, "data")
    config = parser.parse_args([f"--data.train.path={file}", "--data.train.limit=0"])
    with pytest.raises(ConfigError) as caught:
        parser.instantiate(config)
    assert str(caught.value) == expected


def test_unloadable_tokenizer_is_one_config_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    cases = {
        str(tmp_path / "nowhere"): "no such folder",
        str(not_a_model): "the folder holds no tokenizer_config.json or tokenizer.json",
        "someorg/no-such-model": "",  # a hub id, offline in tests
    }
    for name, reason in cases.items():
        with pytest.raises(ConfigError) as caught:
            PreferenceDataModule(tokenizer_name_or_path=name)
        message = str(caught.value)
        assert message.startswith(f"cannot load the tokenizer of {name!r}: {reason}")
        assert "\n" not in message and len(message) - len(name) < 400


def test_soft_label_sets(tiny_model_dir: Path, tmp_path: Path) -> None:
    soft = plain_records(4)
    soft[2]["preference_prob"] = 0.75
    hard = write_jsonl(tmp_path / "hard.jsonl", plain_records(3))
    soft = write_jsonl(tmp_path / "soft.jsonl", soft)
    module = make_module(
        tiny_model_dir,
        tmp_path,
        train=DataSource(str(soft)),
        val={"in_dist": DataSource(str(hard)), "ood": DataSource(str(soft))},
        test={"hard": DataSource(str(hard)), "soft": DataSource(str(soft))},
    )
    assert module.soft_label_sets() == []  # nothing built yet
    module.setup("fit")
    assert module.soft_label_sets() == ["train", "val/ood"]
    module.setup("test")
    assert module.soft_label_sets() == ["train", "val/ood", "test/soft"]
    # A held-out split: only the part that got the soft pair counts.
    held_out = make_module(tiny_model_dir, tmp_path, train=DataSource(str(soft)), val_fraction=0.5, seed=0)
    held_out.setup("fit")
    expected = [
        name
        for name, rows in (("train", held_out.train_dataset), ("val/val", held_out.val_datasets["val"]))
        if min(rows["preference_prob"]) < 1
    ]
    assert held_out.soft_label_sets() == expected and len(expected) == 1


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1 (no network in tests)")
def test_unloadable_hub_id_names_the_dataset_and_split(tmp_path: Path) -> None:
    from ipo_lightning.data.sources import load_source

    with pytest.raises(DataError, match=r"^someorg/no-such-dataset \(split dev\): not a local file"):
        load_source(DataSource("someorg/no-such-dataset", split="dev"), cache_dir=str(tmp_path))


def test_attach_columns_adds_per_pair_values_that_reach_the_batches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from ipo_lightning.reference import PRECOMPUTED_KEYS

    train = write_jsonl(tmp_path / "train.jsonl", plain_records(3))
    val = write_jsonl(tmp_path / "val.jsonl", plain_records(2))
    module = make_module(
        tiny_model_dir,
        tmp_path,
        train=DataSource(str(train)),
        val={"ood": DataSource(str(val))},
        batch_size=3,
    )
    module.setup("fit")
    assert list(module.stage_sets("fit")) == ["train", "val/ood"]
    assert list(module.stage_sets("validate")) == ["val/ood"] and module.stage_sets("test") == {}
    module.attach_columns("train", {"ref_chosen_logp_sum": [1.0, 2.0, 3.0]})
    module.attach_columns("train", {"ref_chosen_logp_sum": [4.0, 5.0, 6.0]})  # replaced, not duplicated
    assert module.train_dataset["ref_chosen_logp_sum"] == [4.0, 5.0, 6.0]
    # The collator passes the reference columns once all four are there.
    module.attach_columns(
        "val/ood", {key: [float(i), float(i + 10)] for i, key in enumerate(PRECOMPUTED_KEYS)}
    )
    (batch,) = module.val_dataloader()[0]
    assert [batch[key].tolist() for key in PRECOMPUTED_KEYS] == [
        [0.0, 10.0],
        [1.0, 11.0],
        [2.0, 12.0],
        [3.0, 13.0],
    ]
    with pytest.raises(KeyError, match="no built data set 'test/x'; built: train, val/ood"):
        module.attach_columns("test/x", {"ref_chosen_logp_sum": [1.0]})
    with pytest.raises(ValueError, match="train: column 'c' has 2 values for 3 pairs"):
        module.attach_columns("train", {"c": [1.0, 2.0]})
