"""Normalising raw records: the formats, implicit prompt extraction, column mapping, bad records."""

from __future__ import annotations

import pickle

import pytest

from ipo_lightning.data.formats import (
    EMPTY_COMPLETION,
    Dropped,
    PreferenceExample,
    detect_format,
    normalise,
    split_common_prefix,
    validate_columns,
)
from ipo_lightning.errors import ConfigError, DataError

USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"role": "assistant", "content": "Paris."}
BAD = {"role": "assistant", "content": "Figure it out yourself."}


def detect(*records: dict, columns: dict | None = None) -> str:
    """detect_format on records given as a dataset: its columns are every key of every record."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return detect_format(names, [{name: record.get(name) for name in names} for record in records], columns)


def test_plain_record() -> None:
    record = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "extra": 1}
    assert detect(record) == "plain"
    assert normalise(record, "plain") == PreferenceExample("Q: 2+2?", " 4", " 5", 1.0)


def test_conversational_record() -> None:
    record = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    assert detect(record) == "conversational"
    example = normalise(record, "conversational")
    assert example == PreferenceExample([USER], [GOOD], [BAD], 1.0)
    assert example.is_conversational


def test_conversational_completions_repeating_the_prompt_are_cut_after_it() -> None:
    record = {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]}
    assert normalise(record, "conversational") == PreferenceExample([USER], [GOOD], [BAD])


def test_conversational_string_completion_is_one_assistant_message() -> None:
    record = {"prompt": [USER], "chosen": "Paris.", "rejected": "Figure it out yourself."}
    assert detect(record) == "conversational"
    assert normalise(record, "conversational") == PreferenceExample([USER], [GOOD], [BAD])


def test_arrow_null_keys_are_removed_from_messages() -> None:
    # Arrow structs give every message every key seen in the column, null where absent.
    record = {"prompt": [{**USER, "name": None}], "chosen": [GOOD], "rejected": [BAD]}
    assert normalise(record, "conversational").prompt == [USER]


def test_implicit_strings_split_at_the_word_where_they_differ() -> None:
    record = {
        "chosen": "\n\nHuman: is it safe?\n\nAssistant: I think so",
        "rejected": "\n\nHuman: is it safe?\n\nAssistant: I don't",
    }
    assert detect(record) == "implicit"
    example = normalise(record, "implicit")
    assert example == PreferenceExample("\n\nHuman: is it safe?\n\nAssistant: I", " think so", " don't")
    # Nothing is lost: prompt + completion gives back the source text.
    assert example.prompt + example.chosen == record["chosen"]
    assert example.prompt + example.rejected == record["rejected"]


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("A: I think", "A: I thought", ("A: I", " think", " thought")),  # differ inside a word
        ("A: yes  ok", "A: yes\tno", ("A: yes", "  ok", "\tno")),  # differ in whitespace
        ("A: the sea", "A: thesaurus", ("A:", " the sea", " thesaurus")),  # a word of one text goes on
        ("Yes", "No", ("", "Yes", "No")),  # nothing shared
    ],
)
def test_split_common_prefix_word_boundary(
    chosen: str, rejected: str, expected: tuple[str, str, str]
) -> None:
    assert split_common_prefix(chosen, rejected) == expected


@pytest.mark.parametrize(
    ("chosen", "rejected"),
    [("H: hi A: hello", "H: hi A: hello"), ("H: hi A: hello", "H: hi A: hello there")],
)
def test_implicit_strings_with_an_empty_completion_are_dropped(chosen: str, rejected: str) -> None:
    assert normalise({"chosen": chosen, "rejected": rejected}, "implicit") == Dropped(EMPTY_COMPLETION)
    assert normalise({"chosen": rejected, "rejected": chosen}, "implicit") == Dropped(EMPTY_COMPLETION)


def test_implicit_messages_share_the_leading_messages() -> None:
    follow_up = {"role": "user", "content": "And of Spain?"}
    chosen = [USER, GOOD, follow_up, {"role": "assistant", "content": "Madrid."}]
    rejected = [USER, GOOD, follow_up, {"role": "assistant", "content": "No."}]
    record = {"chosen": chosen, "rejected": rejected, "messages": chosen}
    assert detect(record) == "implicit"
    assert normalise(record, "implicit") == PreferenceExample(chosen[:3], chosen[3:], rejected[3:])


def test_string_prompt_beside_conversations_is_implicit() -> None:
    # HuggingFaceH4/ultrafeedback_binarized: prompt is the user text, chosen/rejected whole conversations.
    record = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]}
    assert detect(record) == "implicit"
    assert normalise(record, "implicit") == PreferenceExample([USER], [GOOD], [BAD])


def test_implicit_messages_prefix_is_dropped_and_no_shared_prompt_is_an_error() -> None:
    assert normalise({"chosen": [USER, GOOD], "rejected": [USER]}, "implicit") == Dropped(EMPTY_COMPLETION)
    with pytest.raises(DataError, match="share no leading message"):
        normalise({"chosen": [USER, GOOD], "rejected": [{**USER, "content": "hi"}, BAD]}, "implicit")


SYSTEM = {"role": "system", "content": "Be brief."}
TOOL_CALL = {"role": "assistant", "content": "Looking it up.", "tool_calls": [{"name": "search"}]}
TOOL_RESULT = {"role": "tool", "content": "Paris"}


def test_valid_role_orders_are_accepted() -> None:
    # A prompt may end with a tool result; a completion may hold several assistant turns, tool calls too.
    record = {
        "prompt": [SYSTEM, USER, TOOL_CALL, TOOL_RESULT],
        "chosen": [GOOD],
        "rejected": [TOOL_CALL, BAD],
    }
    assert normalise(record, "conversational") == PreferenceExample(
        record["prompt"], [GOOD], [TOOL_CALL, BAD]
    )


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        (
            {"prompt": [USER], "chosen": [GOOD, USER], "rejected": [BAD]},
            "conversational",
            "field 'chosen', message 1: role 'user' in a completion; a completion holds only the assistant's "
            "reply (assistant messages): put user, system and tool turns into the prompt",
        ),
        (
            {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD, SYSTEM, BAD]},
            "conversational",
            "field 'rejected', message 1: role 'system' in a completion",
        ),
        (
            {"prompt": [USER], "chosen": [TOOL_CALL, TOOL_RESULT, GOOD], "rejected": [BAD]},
            "conversational",
            "field 'chosen', message 1: role 'tool' in a completion",
        ),
        (
            # Positions count in the record's field, before the repeated prompt is cut off.
            {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD, USER]},
            "conversational",
            "field 'rejected', message 2: role 'user' in a completion",
        ),
        (
            {"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},
            "conversational",
            "field 'prompt', message 1: the prompt ends with an assistant turn; the prompt must end before "
            "the assistant's reply (move that message into both completions)",
        ),
        (
            {"question": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},
            "conversational",
            "field 'question' (prompt), message 1: the prompt ends with an assistant turn",
        ),
        (
            {"chosen": [USER, GOOD, GOOD], "rejected": [USER, GOOD, BAD]},
            "implicit",
            "the prompt shared by field 'chosen' and field 'rejected', message 1: the prompt ends with an "
            "assistant turn",
        ),
        (
            {"chosen": [USER, GOOD], "rejected": [USER, BAD, USER]},
            "implicit",
            "field 'rejected', message 2: role 'user' in a completion",
        ),
    ],
    ids=[
        "user-after",
        "system-after",
        "tool-result",
        "repeated-prompt",
        "prompt-ends-assistant",
        "mapped-prompt",
        "implicit-prompt",
        "implicit-completion",
    ],
)
def test_role_order_errors_name_the_field_and_message(record: dict, fmt: str, expected: str) -> None:
    columns = {"prompt": "question"} if "question" in record else None
    with pytest.raises(DataError) as caught:
        normalise(record, fmt, columns)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_format_is_detected_from_the_columns_not_the_first_record() -> None:
    plain = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    no_prompt = {"chosen": " a", "rejected": " b"}
    # A prompt column makes a dataset plain, even if its first record has no prompt value.
    assert detect(no_prompt, plain) == "plain"
    assert detect({**no_prompt, "prompt": None}, plain) == "plain"
    assert detect(no_prompt) == "implicit"  # no prompt column at all
    # The first non-null values decide whether values are message lists.
    chat = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    assert detect({"prompt": None, "chosen": None, "rejected": None}, chat) == "conversational"
    h4 = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD]}
    assert detect({**h4, "chosen": None}, h4) == "implicit"
    assert detect({"prompt": [USER], "chosen": None, "rejected": [BAD]}) == "conversational"
    # Mapped columns: a column named like a canonical field but not mapped to it does not count.
    columns = {"prompt": "question"}
    assert detect({"prompt": "Q", "chosen": " a", "rejected": " b"}, columns=columns) == "implicit"
    assert detect({"question": None, "chosen": " a", "rejected": " b"}, columns=columns) == "plain"


def test_detection_reads_records_only_until_it_has_both_values() -> None:
    def records():
        yield {"prompt": "Q", "chosen": " a"}
        raise AssertionError("read past the first record")

    assert detect_format(["prompt", "chosen", "rejected"], records()) == "plain"


def test_implicit_texts_without_a_common_prefix_are_an_error() -> None:
    for chosen, rejected in [("Yes", "No"), ("Hello there", "Help me"), (" Sure", " No")]:
        with pytest.raises(DataError) as caught:
            normalise({"chosen": chosen, "rejected": rejected}, "implicit")
        assert str(caught.value) == (
            "field 'chosen' and field 'rejected': the texts share no common prefix, so there is no prompt "
            "to extract (implicit format)"
        )
    # A shared word is enough.
    assert normalise({"chosen": "Hi yes", "rejected": "Hi no"}, "implicit") == PreferenceExample(
        "Hi", " yes", " no"
    )


def test_column_mapping() -> None:
    columns = validate_columns({"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    record = {"question": "Q?", "response_j": " yes", "response_k": " no", "prompt": 7}
    assert detect(record, columns=columns) == "plain"
    assert normalise(record, "plain", columns) == PreferenceExample("Q?", " yes", " no")
    with pytest.raises(ConfigError, match="'answer'"):
        validate_columns({"answer": "x"})


def test_preference_prob() -> None:
    base = {"prompt": "Q", "chosen": " a", "rejected": " b"}
    assert normalise(base, "plain").preference_prob == 1.0
    assert normalise({**base, "preference_prob": 0.75}, "plain").preference_prob == 0.75
    assert normalise({**base, "preference_prob": None}, "plain").preference_prob == 1.0
    mapped = normalise({**base, "p": 0}, "plain", {"preference_prob": "p"})
    assert mapped.preference_prob == 0.0
    for bad, message in [(1.5, r"within \[0, 1\]"), (-0.1, "within"), (float("nan"), "within")]:
        with pytest.raises(DataError, match=f"'preference_prob': must be {message}"):
            normalise({**base, "preference_prob": bad}, "plain")
    for bad in ["0.5", True]:
        with pytest.raises(DataError, match="'preference_prob': expected a number"):
            normalise({**base, "preference_prob": bad}, "plain")


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        ({"prompt": "Q", "rejected": " b"}, "plain", "field 'chosen': missing"),
        ({"prompt": "Q", "chosen": None, "rejected": " b"}, "plain", "field 'chosen': missing"),
        (
            {"prompt": "Q", "chosen": 5, "rejected": " b"},
            "plain",
            "field 'chosen': expected a string, got int",
        ),
        ({"prompt": "Q", "chosen": " a", "rejected": " \n"}, "plain", "field 'rejected': empty completion"),
        ({"prompt": ["Q"], "chosen": [GOOD], "rejected": [BAD]}, "conversational", "'prompt', message 0"),
        (
            {"prompt": [{"content": "Q"}], "chosen": [GOOD], "rejected": [BAD]},
            "conversational",
            "field 'prompt', message 0: 'role' is missing",
        ),
        (
            {"prompt": [USER], "chosen": [{"role": "assistant", "content": 3}], "rejected": [BAD]},
            "conversational",
            "field 'chosen', message 0: 'content' is not a string",
        ),
        (
            {"prompt": [USER], "chosen": [GOOD], "rejected": [{"role": "assistant", "content": " "}]},
            "conversational",
            "field 'rejected': empty completion",
        ),
        ({"prompt": [USER], "chosen": [], "rejected": [BAD]}, "conversational", "field 'chosen': empty list"),
        ({"prompt": [USER], "chosen": [USER], "rejected": [BAD]}, "conversational", "assistant message"),
        ({"chosen": "", "rejected": "b"}, "implicit", "field 'chosen': empty completion"),
        ({"chosen": "a b", "rejected": [GOOD]}, "implicit", "field 'rejected': expected a string, got list"),
    ],
)
def test_bad_records_name_the_field(record: dict, fmt: str, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        normalise(record, fmt)
    assert expected in str(caught.value)


def test_mapped_field_errors_name_the_source_column() -> None:
    with pytest.raises(DataError, match=r"field 'response_j' \(chosen\): expected a string"):
        normalise({"prompt": "Q", "response_j": 1, "rejected": " b"}, "plain", {"chosen": "response_j"})


def test_data_error_survives_pickling() -> None:
    # datasets' map(num_proc>1) sends exceptions from worker processes through pickle.
    error = DataError("train.jsonl:3: record 2: field 'chosen': missing")
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is DataError and str(restored) == str(error)
