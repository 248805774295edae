"""Normalising one raw record into a canonical preference example.

Canonical fields: ``prompt``, ``chosen``, ``rejected`` (each a string or a list of chat messages
``{"role", "content"}``) and ``preference_prob`` (P(chosen is preferred), default 1.0). Record layouts:

- ``plain``: ``prompt``, ``chosen`` and ``rejected`` are strings.
- ``conversational``: ``prompt`` is a list of messages; ``chosen``/``rejected`` hold the assistant
  turn(s) as message lists (a bare string is taken as one assistant message). A completion that
  repeats the prompt messages first is a whole conversation: the repeated prompt is removed.
- ``implicit``: no prompt. ``chosen`` and ``rejected`` are whole texts or whole conversations sharing a
  prefix (Anthropic HH, trl-lib/ultrafeedback_binarized); the shared prefix is the prompt. A string
  ``prompt`` column beside conversation-valued completions (HuggingFaceH4/ultrafeedback_binarized) is a
  copy of the first user turn and is ignored.

``auto`` picks one of these per dataset from its columns and first values (:func:`detect_format`).
Errors raised here name the field only; the caller prefixes the source and record, which it alone knows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ipo_lightning.errors import ConfigError, DataError

DataFormat = Literal["auto", "plain", "conversational", "implicit"]
"""How records are laid out; ``auto`` detects it from the dataset's columns (:func:`detect_format`)."""
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)

Message = dict[str, Any]
"""A chat message: at least ``role`` and ``content`` (strings); other keys are passed to the template."""

Text = str | list[Message]
"""A prompt or completion: plain text or a list of chat messages."""

CANONICAL_FIELDS = ("prompt", "chosen", "rejected", "preference_prob")
EMPTY_COMPLETION = "empty completion after prompt extraction"
"""Drop reason: in an implicit-prompt pair one completion is a prefix of the other (or they are equal)."""


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair in canonical form.

    Attributes:
        prompt: The context both completions answer: a string, or messages.
        chosen: The preferred completion: a string, or the assistant message(s) after the prompt.
        rejected: The other completion, the same kind as ``chosen``.
        preference_prob: Probability that ``chosen`` is preferred, in [0, 1] (1.0: a hard label).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    preference_prob: float = 1.0

    @property
    def is_conversational(self) -> bool:
        """Whether prompt and completions are chat messages (rendered with the chat template)."""
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class Dropped:
    """A record that is valid but gives no training pair; ``reason`` is counted and reported."""

    reason: str


def validate_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Check a canonical-name -> source-column mapping and return it as a plain dict.

    Raises:
        ConfigError: a key is not a canonical field name, or a value is not a column name.
    """
    if not columns:
        return {}
    unknown = sorted(set(columns) - set(CANONICAL_FIELDS))
    if unknown:
        raise ConfigError(
            f"columns: unknown field(s) {', '.join(map(repr, unknown))}; keys are the canonical names "
            f"({', '.join(CANONICAL_FIELDS)}) and values the source's column names"
        )
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"columns: {key!r} must map to a column name, got {value!r}")
    return dict(columns)


def column_of(field: str, columns: Mapping[str, str] | None) -> str:
    """The source column that holds canonical ``field``."""
    return (columns or {}).get(field, field)


def detect_format(
    column_names: Collection[str],
    records: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
) -> str:
    """Guess ``plain``, ``conversational`` or ``implicit`` from a dataset's columns and values.

    A dataset without a prompt column is implicit. Otherwise the first non-null ``chosen`` and ``prompt``
    values decide: message-list completions are conversational beside a message-list prompt and
    implicit beside a string prompt (the prompt column is then ignored); string completions are
    conversational beside a message-list prompt (each one assistant message), else plain. A null in
    some record does not change the format: that record fails its own checks, by field.

    Args:
        column_names: The dataset's column names.
        records: The records, in order; read only until both values are found.
        columns: Canonical name -> source column.
    """
    prompt_column, chosen_column = column_of("prompt", columns), column_of("chosen", columns)
    if prompt_column not in column_names:
        return "implicit"
    prompt = chosen = None
    for record in records:
        if prompt is None:
            prompt = record.get(prompt_column)
        if chosen is None:
            chosen = record.get(chosen_column)
        if prompt is not None and chosen is not None:
            break
    if isinstance(chosen, list):
        return "conversational" if isinstance(prompt, list) else "implicit"
    return "conversational" if isinstance(prompt, list) else "plain"


def required_fields(fmt: str) -> tuple[str, ...]:
    """Canonical fields a dataset of format ``fmt`` must have as columns."""
    return ("chosen", "rejected") if fmt == "implicit" else ("prompt", "chosen", "rejected")


def check_columns(column_names: list[str], fmt: str, columns: Mapping[str, str] | None = None) -> None:
    """Raise a DataError if the dataset lacks a column that format ``fmt`` needs (message has no source)."""
    for field in required_fields(fmt):
        name = column_of(field, columns)
        if name not in column_names:
            raise DataError(
                f"no column {name!r} for the {field} field ({fmt} format); the columns are "
                f"{', '.join(column_names)}. Map yours with `columns`, e.g. {{{field!r}: 'your_column'}}"
            )


def normalise(
    record: Mapping[str, Any], fmt: str, columns: Mapping[str, str] | None = None
) -> PreferenceExample | Dropped:
    """Turn one raw record into a :class:`PreferenceExample`, or :class:`Dropped` if it has no pair.

    Args:
        record: The raw record (a row of the source dataset).
        fmt: ``plain``, ``conversational`` or ``implicit`` (resolve ``auto`` with :func:`detect_format`).
        columns: Canonical name -> source column, for sources with other column names.

    Raises:
        DataError: a field is missing, has the wrong type, is empty, or holds a malformed message;
            the message names the field.
    """
    fields = _Fields(record, columns or {})
    prob = fields.preference_prob()
    if fmt == "plain":
        prompt = fields.string("prompt", allow_empty=True)
        return PreferenceExample(prompt, fields.string("chosen"), fields.string("rejected"), prob)
    if fmt == "conversational":
        prompt_messages = fields.messages("prompt")
        completions = {}
        for field in ("chosen", "rejected"):
            whole = fields.completion_messages(field)
            completion = _strip_repeated_prompt(whole, prompt_messages)
            fields.check_completion(field, completion)
            completions[field] = (completion, len(whole) - len(completion))
        check_role_order(prompt_messages, completions, name=fields.name)
        return PreferenceExample(prompt_messages, completions["chosen"][0], completions["rejected"][0], prob)
    if fmt == "implicit":
        return _implicit(fields, prob)
    raise ConfigError(f"unknown data format {fmt!r}; use auto, plain, conversational or implicit")


def normalise_prompt(record: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> Text:
    """The prompt of a prompt-only record (no completions): its ``prompt`` field as a string or messages.

    Raises:
        DataError: the field is missing, neither a string nor a list of messages, or holds a malformed
            message; the message names the field.
    """
    fields = _Fields(record, columns or {})
    if isinstance(fields.raw("prompt"), list):
        return fields.messages("prompt")
    return fields.string("prompt", allow_empty=True)


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts into (prompt, chosen completion, rejected completion) at a word boundary.

    The cut is at the start of the word where the texts first differ (or where they differ, if both
    have whitespace there), moved before the whitespace preceding it, so the completions begin with
    it: ``"A: I think so"`` / ``"A: I don't"`` -> ``("A: I", " think so", " don't")``. Tokenisers
    attach a leading space to the next word, so this gives the same tokens the model sees when it
    generates after the prompt.
    """
    cut = 0
    limit = min(len(chosen), len(rejected))
    while cut < limit and chosen[cut] == rejected[cut]:
        cut += 1
    if cut == limit:
        # One text is a prefix of the other (or they are equal): one completion would be empty.
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if not (chosen[cut].isspace() and rejected[cut].isspace()):
        # They differ inside a word (of either text): the whole word belongs to the completions.
        while cut > 0 and not chosen[cut - 1].isspace():
            cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit(fields: _Fields, prob: float) -> PreferenceExample | Dropped:
    chosen_value, rejected_value = fields.raw("chosen"), fields.raw("rejected")
    if isinstance(chosen_value, str) or isinstance(rejected_value, str):
        chosen, rejected = fields.string("chosen"), fields.string("rejected")
        if chosen.startswith(rejected) or rejected.startswith(chosen):
            return Dropped(EMPTY_COMPLETION)
        prompt, chosen_tail, rejected_tail = split_common_prefix(chosen, rejected)
        if not prompt.strip():
            raise DataError(
                f"{fields.name('chosen')} and {fields.name('rejected')}: the texts share no common prefix, "
                "so there is no prompt to extract (implicit format)"
            )
        return PreferenceExample(prompt, chosen_tail, rejected_tail, prob)
    chosen_messages = fields.completion_messages("chosen")
    rejected_messages = fields.completion_messages("rejected")
    shared = 0
    while (
        shared < min(len(chosen_messages), len(rejected_messages))
        and chosen_messages[shared] == rejected_messages[shared]
    ):
        shared += 1
    if shared == len(chosen_messages) or shared == len(rejected_messages):
        return Dropped(EMPTY_COMPLETION)
    if shared == 0:
        raise DataError(
            f"{fields.name('chosen')} and {fields.name('rejected')}: the conversations share no leading "
            "message, so there is no prompt to extract (implicit format)"
        )
    chosen, rejected = chosen_messages[shared:], rejected_messages[shared:]
    fields.check_completion("chosen", chosen)
    fields.check_completion("rejected", rejected)
    check_role_order(
        chosen_messages[:shared],
        {"chosen": (chosen, shared), "rejected": (rejected, shared)},
        name=fields.name,
        prompt_name=f"the prompt shared by {fields.name('chosen')} and {fields.name('rejected')}",
    )
    return PreferenceExample(chosen_messages[:shared], chosen, rejected, prob)


ASSISTANT = "assistant"
"""The one role a completion may hold: the turns the model writes."""


def check_role_order(
    prompt: list[Message],
    completions: Mapping[str, tuple[list[Message], int]],
    *,
    name: Callable[[str], str] = lambda field: f"field {field!r}",
    prompt_name: str | None = None,
) -> None:
    """Raise a DataError unless the roles of a conversational pair fit what a preference pair means.

    The pair says: after this prompt, the model should rather write ``chosen`` than ``rejected``.
    So the rule is:

    - **The prompt ends before an assistant turn**: its last message is not from the assistant (it is
      usually a ``user`` turn; a ``tool`` result is fine too, the assistant answers it). A prompt that
      ends with an assistant message would make the completion a second assistant turn in a row,
      glued to the first; put that message into both completions instead.
    - **A completion is assistant turns only**: every message of ``chosen`` and ``rejected`` has role
      ``assistant``. Every completion token is scored as the model's own output, so a ``user`` or
      ``system`` turn there would train the model to write the user's lines. The same holds for
      tool results (role ``tool``): the environment writes them, not the model, so they are not allowed
      inside a completion, although TRL's conversational format allows them in a ``messages``
      conversation (where TRL can mask them out of the loss); here they belong in the prompt. An
      assistant message that *calls* a tool (extra keys such as ``tool_calls`` go to the chat template)
      is the model's output and is allowed.

    Roles are compared as written (``assistant``, not ``gpt`` or ``bot``).

    Args:
        prompt: The prompt messages.
        completions: Field name (``chosen``, ``rejected``) -> (its messages after the prompt, the
            position in the record's field of its first message), so errors count messages as the
            record stores them.
        name: How messages name a canonical field (the source column, if mapped).
        prompt_name: How messages name the prompt; default ``name("prompt")``.

    Raises:
        DataError: naming the field and the position and role of the offending message.
    """
    if prompt and prompt[-1]["role"] == ASSISTANT:
        where = prompt_name or name("prompt")
        raise DataError(
            f"{where}, message {len(prompt) - 1}: the prompt ends with an assistant turn; the prompt must "
            "end before the assistant's reply (move that message into both completions)"
        )
    for field, (messages, start) in completions.items():
        for position, message in enumerate(messages, start=start):
            if message["role"] != ASSISTANT:
                raise DataError(
                    f"{name(field)}, message {position}: role {message['role']!r} in a completion; a "
                    "completion holds only the assistant's reply (assistant messages): put user, system "
                    "and tool turns into the prompt"
                )


def _strip_repeated_prompt(completion: list[Message], prompt: list[Message]) -> list[Message]:
    # Some datasets store whole conversations in chosen/rejected next to the prompt.
    if len(completion) > len(prompt) and completion[: len(prompt)] == prompt:
        return completion[len(prompt) :]
    return completion


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Fields:
    """Typed access to the canonical fields of one record, with errors that name the field."""

    def __init__(self, record: Mapping[str, Any], columns: Mapping[str, str]) -> None:
        self.record = record
        self.columns = columns

    def name(self, field: str) -> str:
        column = column_of(field, self.columns)
        return f"field {column!r}" + (f" ({field})" if column != field else "")

    def raw(self, field: str) -> Any:
        return self.record.get(column_of(field, self.columns))

    def string(self, field: str, allow_empty: bool = False) -> str:
        value = self.raw(field)
        if value is None:
            raise DataError(f"{self.name(field)}: missing (absent or null)")
        if not isinstance(value, str):
            raise DataError(f"{self.name(field)}: expected a string, got {_type_name(value)} {value!r:.60}")
        if not allow_empty and not value.strip():
            raise DataError(f"{self.name(field)}: empty completion")
        return value

    def messages(self, field: str) -> list[Message]:
        value = self.raw(field)
        if value is None:
            raise DataError(f"{self.name(field)}: missing (absent or null)")
        if not isinstance(value, list):
            raise DataError(
                f"{self.name(field)}: expected a list of messages, got {_type_name(value)} {value!r:.60}"
            )
        if not value:
            raise DataError(f"{self.name(field)}: empty list of messages")
        return [self._message(field, position, message) for position, message in enumerate(value)]

    def completion_messages(self, field: str) -> list[Message]:
        if isinstance(self.raw(field), str):
            # A bare string beside a message-list prompt is the assistant's reply.
            return [{"role": "assistant", "content": self.string(field)}]
        return self.messages(field)

    def check_completion(self, field: str, messages: list[Message]) -> None:
        """A completion needs some text (its roles are checked by :func:`check_role_order`)."""
        if not any(message["content"].strip() for message in messages):
            raise DataError(f"{self.name(field)}: empty completion (every message content is blank)")

    def preference_prob(self) -> float:
        value = self.raw("preference_prob")
        if value is None:
            # Optional: absent (or null in a record of a source where other records set it) -> hard label.
            return 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{self.name('preference_prob')}: expected a number, got {_type_name(value)}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise DataError(f"{self.name('preference_prob')}: must be within [0, 1], got {value}")
        return float(value)

    def _message(self, field: str, position: int, message: Any) -> Message:
        where = f"{self.name(field)}, message {position}"
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: expected a {{'role', 'content'}} object, got {_type_name(message)}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = (
                    "missing" if message.get(key) is None else f"not a string ({_type_name(message[key])})"
                )
                raise DataError(f"{where}: {key!r} is {problem}")
        # Arrow structs fill keys absent from this message with None: drop them so templates see
        # the message as written.
        return {key: value for key, value in message.items() if value is not None}
