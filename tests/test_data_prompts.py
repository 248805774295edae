"""held_out_prompts: the distinct prompts of a built set as text, training's token ids, and messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.data.prompts import HeldOutPrompt, held_out_prompts, reward_conversations
from ipo_lightning.errors import ConfigError
from tests.helpers import polite_pairs, write_jsonl


def _module(tiny_model_dir: Path, tmp_path: Path, **sets: Path) -> PreferenceDataModule:
    module = PreferenceDataModule(
        val={name: DataSource(str(path)) for name, path in sets.items()},
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    module.setup("validate")
    return module


def test_plain_prompts_are_distinct_in_record_order_with_trainings_ids(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    records = polite_pairs(10)  # 6 topics: records 6..9 repeat the prompts of records 0..3
    module = _module(tiny_model_dir, tmp_path, plain=write_jsonl(tmp_path / "plain.jsonl", records))
    prompts = held_out_prompts(module, "plain", limit=100)
    assert [p.text for p in prompts] == [r["prompt"] for r in records[:6]]
    assert all(p.messages is None for p in prompts)
    assert [p.ids for p in prompts] == [list(ids) for ids in module.val_datasets["plain"]["prompt_ids"][:6]]
    assert prompts[1].ids == tiny_tokenizer(records[1]["prompt"])["input_ids"]  # independent tokenisation
    assert [p.text for p in held_out_prompts(module, "plain", limit=4)] == [r["prompt"] for r in records[:4]]


def test_long_prompts_keep_the_full_text_and_the_truncated_ids(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompt = "Human: " + "tell me about the sea and the sky " * 10 + "Assistant:"
    file = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": " yes", "rejected": " no"}])
    module = _module(tiny_model_dir, tmp_path, long=file)
    (held,) = held_out_prompts(module, "long", limit=1)
    assert held.text == prompt
    assert held.ids == list(module.val_datasets["long"]["prompt_ids"][0]) and len(held.ids) == 32


def test_chat_prompts_are_the_policy_templates_rendering_and_the_messages(
    tiny_model_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    conversations = [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "tell me about bread"}],
        [{"role": "user", "content": "tell me about the sea"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "tell me about bread"}],
    ]
    records = [
        {"prompt": prompt, "chosen": f"thank you {i}", "rejected": "go away"}
        for i, prompt in enumerate(conversations)
    ]
    module = _module(tiny_model_dir, tmp_path, chat=write_jsonl(tmp_path / "chat.jsonl", records))
    prompts = held_out_prompts(module, "chat", limit=10)
    assert [p.messages for p in prompts] == conversations[:2]  # the third repeats the first
    texts = [
        tiny_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    assert [p.text for p in prompts] == texts[:2]
    assert prompts[1].text == "<|im_start|>user\ntell me about the sea<|im_end|>\n<|im_start|>assistant\n"
    assert [p.ids for p in prompts] == [list(ids) for ids in module.val_datasets["chat"]["prompt_ids"][:2]]
    assert prompts[1].ids == tiny_tokenizer(texts[1], add_special_tokens=False)["input_ids"]


def test_train_prompts_and_an_unknown_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4, offset=10))
    module = PreferenceDataModule(
        train=DataSource(str(train)),
        val={"held_out": DataSource(str(write_jsonl(tmp_path / "val.jsonl", polite_pairs(2))))},
        tokenizer_name_or_path=str(tiny_model_dir),
        max_length=64,
        max_prompt_length=32,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    module.setup("fit")
    assert [p.text for p in held_out_prompts(module, "train", 2)] == [
        r["prompt"] for r in polite_pairs(2, offset=10)
    ]
    with pytest.raises(
        ConfigError, match=r"^no built data set 'ood' to draw prompts from; built: train, held_out$"
    ):
        held_out_prompts(module, "ood", 2)


def test_a_set_without_kept_pairs_is_one_config_error_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = _module(tiny_model_dir, tmp_path, plain=write_jsonl(tmp_path / "plain.jsonl", polite_pairs(4)))
    module.val_datasets["plain"] = module.val_datasets["plain"].select([])  # a built set left empty
    with pytest.raises(ConfigError, match="^data set 'plain' has no kept pairs to draw prompts from$"):
        held_out_prompts(module, "plain", limit=2)


def test_reward_conversations_only_when_every_prompt_is_chat() -> None:
    chat = HeldOutPrompt("<rendered>", [1, 2], [{"role": "user", "content": "hi"}])
    plain = HeldOutPrompt("hi", [1, 2], None)
    assert reward_conversations([chat, chat]) == [chat.messages, chat.messages]
    assert reward_conversations([plain, plain]) is None
    assert reward_conversations([chat, plain]) is None and reward_conversations([plain, chat]) is None
    assert reward_conversations([]) is None
