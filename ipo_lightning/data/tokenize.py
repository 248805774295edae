"""Turning a canonical example into token ids: prompt, chosen and rejected.

Plain text: the prompt is tokenised with the tokenizer's special tokens (BOS where it adds one) and each
completion without them, followed by EOS, so the model learns to stop. Chat messages: the prompt is the
chat template's rendering with the generation prompt (``<|im_start|>assistant\\n`` in ChatML), and a
completion is what the template adds after it when the assistant turn is appended, end-of-turn tokens
included; no extra EOS. ``prompt_ids + chosen_ids`` is then exactly the template's own tokenisation of
the whole conversation, the sequence the model sees at inference.

Truncation keeps the start of each completion, where the preference signal usually is: the prompt is cut
first, from the left (its end, next to the answer, matters most), then the completions from the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from transformers import PreTrainedTokenizerBase

from ipo_lightning.data.formats import Dropped, Message, PreferenceExample, Text
from ipo_lightning.errors import ConfigError, DataError

IDENTICAL_AFTER_TRUNCATION = "identical after truncation"
"""Drop reason: chosen and rejected have the same token ids (after truncation): no training signal."""


@dataclass(frozen=True)
class TokenisedPair:
    """Token ids of one pair; a training row is ``prompt_ids + chosen_ids`` (or ``+ rejected_ids``).

    Attributes:
        prompt_ids: The prompt, BOS or chat-template header included.
        chosen_ids: The preferred completion (EOS or end-of-turn included unless truncated away).
        rejected_ids: The other completion.
        preference_prob: Probability that chosen is preferred.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    preference_prob: float = 1.0


def check_lengths(max_length: int, max_prompt_length: int | None, prefix: str = "") -> None:
    """Raise a ConfigError unless every truncated pair keeps a prompt token and a completion token.

    Args:
        max_length: Most tokens of prompt + one completion.
        max_prompt_length: Most prompt tokens, or None.
        prefix: Put before the option names in messages, e.g. ``data.``.
    """
    if max_length < 2:
        raise ConfigError(
            f"{prefix}max_length must be at least 2 (a prompt and a completion), got {max_length}"
        )
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise ConfigError(
            f"{prefix}max_prompt_length ({max_prompt_length}) must be positive and smaller than "
            f"{prefix}max_length ({max_length}), so every completion keeps at least one token"
        )


@dataclass
class PairTokenizer:
    """Tokenises preference examples with a Hugging Face tokenizer, truncating to ``max_length``.

    Args:
        tokenizer: A transformers tokenizer; conversational data needs its ``chat_template``.
        max_length: Most tokens of prompt + one completion.
        max_prompt_length: Prompts longer than this keep their last tokens; None: never truncate a
            prompt (a prompt without room for a completion is then an error).
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512
    max_prompt_length: int | None = 256

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: completions could not be terminated")

    def __call__(self, example: PreferenceExample) -> TokenisedPair | Dropped:
        """Token ids of ``example``, or :class:`Dropped` if chosen and rejected end up identical.

        Raises:
            DataError: the prompt leaves no room for a completion (and ``max_prompt_length`` is None),
                the prompt is empty with no BOS token, the chat template raises (its message is kept), or
                it does not render the prompt as a prefix of the conversation. The message names the
                field, not the record.
        """
        if example.is_conversational:
            prompt_ids, chosen_ids, rejected_ids = self._chat_ids(example)
        else:
            prompt_ids, chosen_ids, rejected_ids = self._plain_ids(example)
        prompt_ids = self._cut_prompt(prompt_ids)
        room = self.max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            return Dropped(IDENTICAL_AFTER_TRUNCATION)
        return TokenisedPair(prompt_ids, chosen_ids, rejected_ids, example.preference_prob)

    def prompt_ids(self, prompt: Text) -> list[int]:
        """A prompt's token ids exactly as its training rows start: text with the tokenizer's special
        tokens, or messages rendered by the chat template with the generation prompt; cut to the last
        ``max_prompt_length`` tokens.

        Raises:
            DataError: as for :meth:`__call__`'s prompt (empty without BOS, too long, template errors).
        """
        if isinstance(prompt, list):
            return self._cut_prompt(self._chat_prompt(prompt)[1])
        return self._cut_prompt(self._plain_prompt(prompt))

    def _cut_prompt(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's ids cut from the left to ``max_prompt_length`` (see module docstring)."""
        if not prompt_ids:
            raise DataError(
                "field 'prompt': empty, and the tokenizer adds no BOS token, so the first completion token "
                "would have no context to be scored against"
            )
        if self.max_prompt_length is not None:
            return prompt_ids[-self.max_prompt_length :]
        if len(prompt_ids) >= self.max_length:
            raise DataError(
                f"field 'prompt': the prompt has {len(prompt_ids)} tokens >= max_length {self.max_length}, "
                "leaving no room for a completion; set max_prompt_length (e.g. "
                f"{self.max_length // 2}) to truncate long prompts from the left, or raise max_length"
            )
        return prompt_ids

    def _plain_prompt(self, prompt: str) -> list[int]:
        return self.encode(prompt, add_special_tokens=True)

    def _chat_prompt(self, prompt: list[Message]) -> tuple[str, list[int]]:
        """The rendered prompt (generation prompt added) and its ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                "field 'prompt': the record holds chat messages but the tokenizer has no chat_template; "
                "use a chat model's tokenizer or plain-text records"
            )
        prompt_text = self._render(prompt, add_generation_prompt=True, field="prompt")
        return prompt_text, self.encode(prompt_text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _plain_ids(self, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
        assert isinstance(example.chosen, str) and isinstance(example.rejected, str)
        eos = [self.tokenizer.eos_token_id]
        return (
            self._plain_prompt(str(example.prompt)),
            self.encode(example.chosen) + eos,
            self.encode(example.rejected) + eos,
        )

    def _chat_ids(self, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
        assert isinstance(example.prompt, list)
        prompt_text, prompt_ids = self._chat_prompt(example.prompt)
        completions = []
        for field, completion in (("chosen", example.chosen), ("rejected", example.rejected)):
            assert isinstance(completion, list)
            full_text = self._render(example.prompt + completion, add_generation_prompt=False, field=field)
            if not full_text.startswith(prompt_text):
                raise DataError(
                    f"field {field!r}: the chat template renders prompt + {field} so that it does not start "
                    "with the rendered prompt (plus generation prompt); this template cannot split a "
                    "conversation into prompt and completion"
                )
            full_ids = self.encode(full_text)
            if full_ids[: len(prompt_ids)] == prompt_ids:
                # Usual case: the template's own tokenisation of the whole conversation, split after
                # the prompt, so training rows equal what apply_chat_template(tokenize=True) gives.
                completions.append(full_ids[len(prompt_ids) :])
            else:
                # A token merges across the boundary: tokenise the completion text on its own, the
                # tokens the model would emit after the prompt.
                completions.append(self.encode(full_text[len(prompt_text) :]))
        return prompt_ids, completions[0], completions[1]

    def _render(self, messages: list[Message], add_generation_prompt: bool, field: str) -> str:
        """The template's text of ``messages``; ``field`` names what is rendered (prompt + it) in errors."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.TemplateError as error:
            # The template's own check (raise_exception) or a template bug: either way this record
            # cannot be rendered, and the template's message says why.
            what = "the prompt" if field == "prompt" else f"prompt + {field}"
            message = " ".join(str(error).split())
            raise DataError(
                f"field {field!r}: the chat template fails on {what}: {type(error).__name__}: {message}"
            ) from None
