"""Tokenising pairs: plain text, chat templates, truncation and identical pairs."""

from __future__ import annotations

import copy

import pytest
from transformers import PreTrainedTokenizerBase

from ipo_lightning.data.formats import Dropped, PreferenceExample
from ipo_lightning.data.tokenize import IDENTICAL_AFTER_TRUNCATION, PairTokenizer, TokenisedPair
from ipo_lightning.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "Please answer the question politely and helpfully."}
USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"role": "assistant", "content": "Paris is the capital of France."}
BAD = {"role": "assistant", "content": "No. Figure it out yourself, that is a stupid question."}


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], **kwargs: object) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def test_plain_pair_adds_special_tokens_to_the_prompt_and_eos_to_completions(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    example = PreferenceExample("Human: how do I bake bread?", " Mix flour and water.", " No.", 0.8)
    pair = PairTokenizer(tiny_tokenizer, max_length=64, max_prompt_length=None)(example)
    eos = tiny_tokenizer.eos_token_id
    assert pair == TokenisedPair(
        tiny_tokenizer(example.prompt, add_special_tokens=True)["input_ids"],
        tiny_tokenizer(example.chosen, add_special_tokens=False)["input_ids"] + [eos],
        tiny_tokenizer(example.rejected, add_special_tokens=False)["input_ids"] + [eos],
        0.8,
    )
    assert (
        tiny_tokenizer.decode(pair.prompt_ids + pair.chosen_ids)
        == example.prompt + example.chosen + "<|endoftext|>"
    )


@pytest.mark.parametrize(
    "prompt", [[USER], [SYSTEM, USER], [USER, GOOD, {"role": "user", "content": "Sure?"}]]
)
def test_chat_pair_equals_the_templates_own_tokenisation(
    tiny_tokenizer: PreTrainedTokenizerBase, prompt: list[dict]
) -> None:
    chosen = [GOOD]
    rejected = [BAD, {"role": "user", "content": "Rude."}, {"role": "assistant", "content": "Sorry."}]
    pair = PairTokenizer(tiny_tokenizer, max_length=512, max_prompt_length=None)(
        PreferenceExample(prompt, chosen, rejected)
    )
    assert pair.prompt_ids == chat_ids(tiny_tokenizer, prompt, add_generation_prompt=True)
    assert pair.prompt_ids + pair.chosen_ids == chat_ids(tiny_tokenizer, prompt + chosen)
    assert pair.prompt_ids + pair.rejected_ids == chat_ids(tiny_tokenizer, prompt + rejected)
    # The template closes the turn; no EOS is appended on top of it.
    assert tiny_tokenizer.decode(pair.chosen_ids) == GOOD["content"] + "<|im_end|>\n"
    assert tiny_tokenizer.eos_token_id not in pair.chosen_ids


def test_truncation_cuts_the_prompt_from_the_left_then_completions_from_the_right(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    chosen = " The sea is blue, the sky is wide, the wind is calm tonight."
    rejected = " No."
    full = PairTokenizer(tiny_tokenizer, max_length=1000, max_prompt_length=None)(
        PreferenceExample(prompt, chosen, rejected)
    )
    assert len(full.prompt_ids) > 10 and len(full.chosen_ids) > 6
    cut = PairTokenizer(tiny_tokenizer, max_length=16, max_prompt_length=10)(
        PreferenceExample(prompt, chosen, rejected)
    )
    assert cut.prompt_ids == full.prompt_ids[-10:]  # the end of the prompt, next to the answer, is kept
    assert cut.chosen_ids == full.chosen_ids[:6]  # the completion keeps its start
    assert cut.rejected_ids == full.rejected_ids  # short enough already
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == 16


def test_chat_truncation_keeps_completion_start(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    example = PreferenceExample([SYSTEM, USER], [GOOD], [BAD])
    full = PairTokenizer(tiny_tokenizer, max_length=1000, max_prompt_length=None)(example)
    cut = PairTokenizer(tiny_tokenizer, max_length=20, max_prompt_length=8)(example)
    assert cut.prompt_ids == full.prompt_ids[-8:]
    assert cut.chosen_ids == full.chosen_ids[:12] and cut.rejected_ids == full.rejected_ids[:12]
    assert max(len(cut.prompt_ids) + len(c) for c in (cut.chosen_ids, cut.rejected_ids)) <= 20


def test_prompt_without_room_for_a_completion_is_an_error_when_prompts_are_not_truncated(
    tiny_tokenizer,
) -> None:
    prompt = "Please answer the question politely and helpfully. " * 3
    n_tokens = len(tiny_tokenizer(prompt)["input_ids"])
    with pytest.raises(DataError) as caught:
        PairTokenizer(tiny_tokenizer, max_length=n_tokens, max_prompt_length=None)(
            PreferenceExample(prompt, " a", " b")
        )
    message = str(caught.value)
    assert f"has {n_tokens} tokens >= max_length {n_tokens}" in message
    assert "'prompt'" in message and "max_prompt_length" in message


def test_pairs_identical_after_truncation_are_dropped(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    example = PreferenceExample(
        "Q:", " The sea is blue, the sky is wide.", " The sea is blue, the sky is calm."
    )
    tokenizer = PairTokenizer(tiny_tokenizer, max_length=6, max_prompt_length=2)
    assert tokenizer(example) == Dropped(IDENTICAL_AFTER_TRUNCATION)
    assert isinstance(
        PairTokenizer(tiny_tokenizer, max_length=64, max_prompt_length=2)(example), TokenisedPair
    )


def test_empty_prompt_without_bos_is_an_error(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(DataError, match="'prompt': empty, and the tokenizer adds no BOS"):
        PairTokenizer(tiny_tokenizer, max_length=64, max_prompt_length=None)(
            PreferenceExample("", "Yes", "No")
        )


def test_template_that_does_not_extend_the_prompt_is_an_error(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Like templates that render the last turn differently once an answer follows it.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant (thinking): {% endif %}"
    )
    with pytest.raises(DataError, match="'chosen': the chat template renders prompt \\+ chosen"):
        PairTokenizer(tokenizer, max_length=64, max_prompt_length=32)(
            PreferenceExample([USER], [GOOD], [BAD])
        )


ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""A template that refuses conversations whose roles do not alternate, as Llama 2 and Mistral do."""


def test_template_that_raises_names_the_field_and_keeps_its_message(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    pairs = PairTokenizer(tokenizer, max_length=64, max_prompt_length=32)
    assert isinstance(pairs(PreferenceExample([USER], [GOOD], [BAD])), TokenisedPair)
    with pytest.raises(DataError) as caught:
        pairs(PreferenceExample([USER, USER], [GOOD], [BAD]))
    assert str(caught.value) == (
        "field 'prompt': the chat template fails on the prompt: TemplateError: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    with pytest.raises(DataError, match=r"^field 'rejected': the chat template fails on prompt \+ rejected"):
        pairs(PreferenceExample([USER], [GOOD], [BAD, BAD]))


def test_settings_are_validated(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ConfigError, match="smaller than max_length"):
        PairTokenizer(tiny_tokenizer, max_length=16, max_prompt_length=16)
    with pytest.raises(ConfigError, match="at least 2"):
        PairTokenizer(tiny_tokenizer, max_length=1, max_prompt_length=None)
