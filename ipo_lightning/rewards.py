"""Rewards that score generated completions: a Python function, the gold reward, or a reward model.

``load_reward(spec, option=...)`` turns a spec into a :class:`RewardFunction`, checked at load time:

- ``module:function`` (dotted attribute paths allowed, e.g. ``my_pkg.rewards:Judge.score``): any callable
  ``(prompts: list[str], completions: list[str]) -> list[float]``, e.g. ``ipo_lightning.gold:gold_reward``.
- ``builtin:gold``: the gold reward of the built-in gold task (``ipo_lightning.gold:gold_reward``).
- anything else: a local folder or hub id of a transformers sequence-classification model with one
  output (``num_labels == 1``), loaded from safetensors only; the score is logit 0.

Every call validates what the reward returns (one finite number per prompt), so a broken reward fails
at the first call with one line instead of turning into NaN metrics later.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.errors import ConfigError
from ipo_lightning.modeling import context_size, position_offset

GOLD_SPEC = "builtin:gold"
"""The spec of the gold reward (``ipo_lightning.gold:gold_reward``); not the ``builtin:gold`` model."""
DEFAULT_BATCH_SIZE = 16
"""Texts per reward-model forward pass."""

Conversation = list[dict[str, Any]]
"""Chat messages ``{"role", "content", ...}``: a prompt as the data gives it."""
ScoreFn = Callable[[list[str], list[str], "list[Conversation] | None"], Any]

# A Python name path on each side of the colon; a hub id has no colon and a folder rarely has one.
_CALLABLE_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class RewardError(ConfigError):
    """A reward returned something that is not one finite number per prompt, or could not score."""


class RewardFunction:
    """A loaded reward: ``reward(prompts, completions, conversations=None) -> list[float]``.

    Attributes:
        name: The spec as given, e.g. ``ipo_lightning.gold:gold_reward``.
        option: Where the spec came from (e.g. ``--generation.reward``), named in every error.
        score: The unvalidated scorer ``(prompts, completions, conversations)``; for a reward model a
            :class:`RewardModelScorer` (its ``model``, ``tokenizer`` and ``batch_size``).
    """

    def __init__(self, name: str, option: str, score: ScoreFn) -> None:
        self.name = name
        self.option = option
        self.score = score

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        *,
        conversations: list[Conversation] | None = None,
    ) -> list[float]:
        """Score each completion of its prompt; one plain float per prompt.

        Args:
            prompts: The prompt texts (as the policy saw them).
            completions: One completion per prompt.
            conversations: The prompts as chat messages, one list per prompt, or None for plain data.
                A reward model with a chat template scores the conversation with the completion
                appended as the assistant turn; ``module:function`` rewards never see it.

        Raises:
            ValueError: the argument lists differ in length (a caller bug).
            RewardError: the result is not a sequence of ``len(prompts)`` finite numbers; the message
                names the reward and the first bad index and value.
        """
        if len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if conversations is not None and len(conversations) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(conversations)} conversations")
        return self._validated(self.score(list(prompts), list(completions), conversations), len(prompts))

    def _where(self) -> str:
        return f"{self.option} {self.name!r}"

    def _validated(self, values: Any, count: int) -> list[float]:
        if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
            values = values.tolist()  # numpy arrays and tensors: plain Python numbers
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
            raise RewardError(
                f"{self._where()}: returned {type(values).__name__}, not a list of {count} numbers"
            )
        if len(values) != count:
            raise RewardError(f"{self._where()}: returned {len(values)} values for {count} prompts")
        scores = []
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RewardError(
                    f"{self._where()}: value {index} is {value!r:.60} ({type(value).__name__}), not a number"
                )
            if not math.isfinite(value):
                raise RewardError(f"{self._where()}: value {index} is {value}, not a finite number")
            scores.append(float(value))
        return scores


def load_reward(
    spec: str,
    *,
    option: str,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RewardFunction:
    """Load the reward named by ``spec`` (see the module docstring for the three kinds).

    Args:
        spec: ``module:function``, ``builtin:gold``, or a reward model's folder or hub id.
        option: Where the spec came from (``--generation.reward``), named in every error.
        device: Where a reward model runs; None: CUDA when available, else CPU. Unused by functions.
        batch_size: Texts per reward-model forward pass. Unused by functions.

    Raises:
        ConfigError: one line naming ``option`` and ``spec``: the module is not found or fails to
            import, the attribute is missing or not callable, its signature cannot take two positional
            lists, or the model is not a single-output sequence-classification model with safetensors
            weights.
    """
    if spec == GOLD_SPEC:
        from ipo_lightning.gold import gold_reward

        return RewardFunction(spec, option, _ignore_conversations(gold_reward))
    if not names_reward_model(spec):
        return RewardFunction(spec, option, _ignore_conversations(_load_callable(spec, option)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return RewardFunction(spec, option, RewardModelScorer.load(spec, option, device, batch_size))


def names_reward_model(spec: str) -> bool:
    """Whether :func:`load_reward` reads ``spec`` as a reward model's folder or hub id (not the gold
    reward, not a ``module:function``; an existing path wins over a ``module:function`` reading)."""
    if spec == GOLD_SPEC:
        return False
    return not _CALLABLE_SPEC.match(spec) or Path(spec).expanduser().exists()


def _ignore_conversations(function: Callable[..., Any]) -> ScoreFn:
    return lambda prompts, completions, conversations: function(prompts, completions)


def _load_callable(spec: str, option: str) -> Callable[..., Any]:
    """The callable ``module:attr.path``, checked to accept ``(prompts, completions)``."""
    where = f"{option} {spec!r}"
    module_name, attribute_path = spec.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ConfigError(f"{where}: no module named {missing!r}") from None
        raise ConfigError(f"{where}: importing {module_name!r} failed: {_one_line(error)}") from None
    except Exception as error:  # the module's own code failed; its message is the whole story
        raise ConfigError(f"{where}: importing {module_name!r} failed: {_one_line(error)}") from None
    for depth, part in enumerate(attribute_path.split(".")):
        if not hasattr(target, part):
            owner = ".".join([module_name, *attribute_path.split(".")[:depth]])
            raise ConfigError(f"{where}: {owner!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {attribute_path!r} is a {type(target).__name__}, not callable")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return target  # some builtins have no signature to check; the first call shows
    try:
        signature.bind([], [])
    except TypeError as error:
        bare = signature.replace(  # the parameters as written, without annotations
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        raise ConfigError(
            f"{where}: cannot be called as {attribute_path}(prompts, completions); it takes {bare}: {error}"
        ) from None
    return target


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:300]}"


def reward_model_inputs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    conversations: list[Conversation] | None = None,
    *,
    max_length: int | None = None,
) -> list[list[int]]:
    """The token ids a reward model scores for each (prompt, completion), before padding.

    With ``conversations`` given and a tokenizer that has a chat template: the template's rendering
    (``apply_chat_template(tokenize=False)``) of ``conversation + [{"role": "assistant", "content":
    completion}]``, tokenised without adding special tokens (the template writes its own, so the ids
    equal ``apply_chat_template(tokenize=True)``). Otherwise: the text ``prompt + completion`` with the
    tokenizer's normal special tokens.

    A text longer than ``max_length`` tokens loses tokens from its start, so what is scored always ends
    with the completion (all of it when it fits; else as much of its end as fits): the prompt's start
    is dropped first. The tokenizer's own special tokens around a plain text (``[CLS]`` ... ``[SEP]``)
    and the BOS token that starts a chat rendering are kept.

    Raises:
        RewardError: the chat template fails on a conversation (its message is kept).
    """
    if conversations is None or not getattr(tokenizer, "chat_template", None):
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        if max_length is None:
            return [list(ids) for ids in tokenizer(texts)["input_ids"]]
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"  # the tokenizer cuts the text and keeps its special tokens
        try:
            return [
                list(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            ]
        finally:
            tokenizer.truncation_side = side
    rows = []
    for index, (conversation, completion) in enumerate(zip(conversations, completions, strict=True)):
        messages = [*conversation, {"role": "assistant", "content": completion}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except jinja2.TemplateError as error:
            raise RewardError(
                f"the reward model's chat template fails on conversation {index}: {_one_line(error)}"
            ) from None
        rows.append(
            _keep_the_end(list(tokenizer(text, add_special_tokens=False)["input_ids"]), tokenizer, max_length)
        )
    return rows


def _keep_the_end(ids: list[int], tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> list[int]:
    """The last ``max_length`` tokens of a chat rendering, after its leading BOS token when it has one."""
    if max_length is None or len(ids) <= max_length:
        return ids
    head = ids[:1] if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []
    return head + ids[len(ids) - (max_length - len(head)) :]


def longest_input(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens the reward model scores at once: the tokenizer's ``model_max_length`` and the
    model's :func:`~ipo_lightning.modeling.context_size`, the smaller; ``None`` (no cut) when neither is
    known."""
    limits = [tokenizer.model_max_length, context_size(model.config, position_offset(model))]
    # Tokenizers without a limit report a huge model_max_length.
    known = [limit for limit in limits if isinstance(limit, int) and limit < 1_000_000_000]
    return min(known) if known else None


class RewardModelScorer:
    """Scores texts with a sequence-classification reward model: logit 0 at each text's last token.

    Texts are built by :func:`reward_model_inputs`, sorted by length and run in batches of
    ``batch_size``, padded on the right with an attention mask, whatever the tokenizer's
    ``padding_side``: every row's real tokens then sit at positions 0, 1, ... as when the text is scored
    alone, and the model numbers positions itself (RoBERTa-style models count from ``padding_idx + 1``,
    so position ids given from outside would shift theirs). A batched score thus equals the score of the
    text alone up to float rounding. The model pools as it was built to: a decoder (Llama, GPT-2, ...)
    scores each row's last real token, which transformers finds from ``config.pad_token_id`` (set from
    the tokenizer when the checkpoint has none); an encoder (BERT, RoBERTa, DeBERTa) its first token.

    Args:
        model: The reward model, in eval mode, on its device.
        tokenizer: The reward model's tokenizer (with a pad token).
        batch_size: Texts per forward pass.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = longest_input(model, tokenizer)

    @classmethod
    def load(
        cls, spec: str, option: str, device: torch.device | str, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> RewardModelScorer:
        """Load the reward model ``spec`` (folder or hub id) and its tokenizer onto ``device``."""
        model = load_reward_model(spec, option=option)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec))
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"{option} {spec!r}: the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # Without it transformers refuses batches: it finds each row's last token by the pad id.
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device), tokenizer, batch_size)

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completions: list[str], conversations: list[Conversation] | None
    ) -> list[float]:
        """Logit 0 of the reward model for every (prompt, completion), in the input order."""
        rows = reward_model_inputs(
            self.tokenizer, prompts, completions, conversations, max_length=self.max_length
        )
        order = sorted(range(len(rows)), key=lambda row: len(rows[row]))  # less padding per batch
        scores = [0.0] * len(rows)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            input_ids, attention_mask = self._pad([rows[row] for row in chunk])
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            logits = self.model(**inputs).logits
            for row, score in zip(chunk, logits[:, 0].float().tolist(), strict=True):
                scores[row] = score
        return scores

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


def load_reward_model(name_or_path: str, *, option: str = "--reward") -> torch.nn.Module:
    """The single-output sequence-classification reward model, in eval mode, from safetensors only.

    Pickled ``.bin`` weights can run code when loaded, so they are refused, as for every model here.
    A checkpoint of another kind (e.g. a causal LM) is refused too: transformers would load it with a
    randomly initialised classification head.

    Raises:
        ConfigError: one line naming ``option`` and the model: no such folder, only ``.bin`` weights,
            not a sequence-classification model, ``num_labels`` other than 1, weights missing, or
            transformers cannot load it.
    """
    where = f"{option} {name_or_path!r}"
    try:
        path = resolve_model_path(name_or_path)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    folder = Path(path).expanduser()
    if not folder.exists() and path.startswith((".", "/", "~")):
        raise ConfigError(
            f"{where}: no such folder (a reward is a model folder, a hub id or module:function)"
        )
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ConfigError(
            f"{where}: the folder holds only pickled .bin weights; the reward model "
            "is loaded from safetensors only (re-save it with save_pretrained, which writes .safetensors)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise ConfigError(
                f"{where}: a {architectures[0]} checkpoint is not a sequence-classification reward model "
                "(loading it would add a randomly initialised score head)"
            )
        if config.num_labels != 1:
            raise ConfigError(
                f"{where}: the model has num_labels {config.num_labels}; a reward model has one output "
                "(its logit 0 is the score)"
            )
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"{where}: cannot load it: {_one_line(error)}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConfigError(
            f"{where}: the checkpoint lacks {len(missing)} weight(s) (e.g. {missing[0]!r}), which would be "
            "randomly initialised; it is not a trained sequence-classification model"
        )
    return model.eval()
