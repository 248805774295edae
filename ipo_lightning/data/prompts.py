"""Held-out prompts of a built data set, in the forms generation and rewards need.

Generation continues the prompt's token ids exactly as training tokenises them (``prompt_ids``, cut to
the last ``max_prompt_length`` tokens); a reward reads the prompt as text, and a reward model with a
chat template reads it as messages. Every built set keeps its normalised prompt (the ``prompt_json``
column), so all three forms come from the same record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ipo_lightning.data.preprocess import PROMPT_COLUMN
from ipo_lightning.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ipo_lightning.data.datamodule import PreferenceDataModule


@dataclass(frozen=True)
class HeldOutPrompt:
    """One distinct prompt of a data set.

    Attributes:
        text: The plain prompt text, or for chat data the prompt messages rendered by the policy
            tokenizer's chat template with the generation prompt added (the untruncated prompt).
        ids: The prompt's token ids exactly as training tokenises them (``prompt_ids``).
        messages: Chat data: the prompt messages; plain data: None.
    """

    text: str
    ids: list[int]
    messages: list[dict[str, Any]] | None


def held_out_prompts(datamodule: PreferenceDataModule, set_name: str, limit: int) -> list[HeldOutPrompt]:
    """The first ``limit`` distinct prompts of a built set, in record order (kept pairs only).

    Args:
        datamodule: A data module whose set ``set_name`` is built (``setup`` has run).
        set_name: A validation set name (``val_set_names``) or ``train``.
        limit: Most prompts returned; a set with fewer distinct prompts gives all of them.

    Raises:
        ConfigError: no built set has this name, or the set has no kept pairs.
        ValueError: ``limit`` is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if set_name == "train" and datamodule.train_dataset is not None:
        dataset = datamodule.train_dataset
    elif set_name in datamodule.val_datasets:
        dataset = datamodule.val_datasets[set_name]
    else:
        built = (["train"] if datamodule.train_dataset is not None else []) + list(datamodule.val_datasets)
        raise ConfigError(
            f"no built data set {set_name!r} to draw prompts from; built: {', '.join(built) or 'none'}"
        )
    tokenizer = datamodule.tokenizer
    assert tokenizer is not None  # a built set was tokenised with it
    prompts: list[HeldOutPrompt] = []
    seen: set[str] = set()
    for row in dataset.select_columns(["prompt_ids", PROMPT_COLUMN]):
        raw = row[PROMPT_COLUMN]
        if raw in seen:
            continue
        seen.add(raw)
        prompts.append(held_out_prompt(tokenizer, raw, row["prompt_ids"]))
        if len(prompts) == limit:
            break
    if not prompts:
        raise ConfigError(f"data set {set_name!r} has no kept pairs to draw prompts from")
    return prompts


def held_out_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt_json: str, ids: Sequence[int]
) -> HeldOutPrompt:
    """The :class:`HeldOutPrompt` of a normalised prompt (``prompt_json``, as built sets store it) and its
    training token ids; chat prompts are rendered as text by ``tokenizer``'s chat template."""
    prompt = json.loads(prompt_json)
    if isinstance(prompt, str):
        return HeldOutPrompt(prompt, list(ids), None)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return HeldOutPrompt(text, list(ids), prompt)


def reward_conversations(prompts: Sequence[HeldOutPrompt]) -> list[list[dict[str, Any]]] | None:
    """The prompts as chat messages for a reward when they are chat prompts, else None (plain data).

    The one test of "is this chat data": every prompt has messages. A set mixing plain and chat
    prompts goes to the reward as text only, so no prompt is read as an empty conversation.
    """
    if prompts and all(prompt.messages is not None for prompt in prompts):
        return [list(prompt.messages or []) for prompt in prompts]
    return None
