"""The ``model.`` options several methods share: each default and each shared doc line written once.

The methods' LightningModules (:mod:`ipo_lightning.module`, :mod:`ipo_lightning.reward_model`,
:mod:`ipo_lightning.rl.module`) take these options as constructor arguments, which the CLI reads
(names, types, defaults, and the docs of the class docstring's ``Args:``). Their signatures use the
``DEFAULT_*`` constants below, and an ``Args:`` line written ``name: {shared}`` is filled from
:data:`OPTION_DOCS` by :func:`with_shared_docs`. An option whose doc differs between methods (it says
what that method does with it) keeps its own line in the class docstring.
"""

from __future__ import annotations

import re
import textwrap
from typing import TypeVar

from ipo_lightning.batching import BatchingOption
from ipo_lightning.modeling import AttnImplementation, DType
from ipo_lightning.schedule import LRSchedule

DEFAULT_LR_SCHEDULE: LRSchedule = "cosine"
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_MIN_LR_RATIO = 0.0
DEFAULT_DTYPE: DType = "float32"
DEFAULT_ATTN_IMPLEMENTATION: AttnImplementation = "sdpa"
DEFAULT_LOGPROB_CHUNK_SIZE = 1024
DEFAULT_BATCHING: BatchingOption = "auto"
DEFAULT_DISABLE_DROPOUT = True

OPTION_DOCS: dict[str, str] = {
    "model_name_or_path": "policy to train: a hub id, a local folder, ``builtin:quickstart`` or "
    "``builtin:gold``.",
    "reward": "reward of the samples (:func:`~ipo_lightning.rewards.load_reward`): ``module:function`` "
    "(e.g. ``ipo_lightning.gold:gold_reward``), ``builtin:gold``, or a sequence-classification reward "
    "model folder or hub id.",
    "reference_name_or_path": "frozen reference model; default: the same weights as the policy.",
    "lora": "train LoRA adapters instead of all weights (peft); null: full fine-tuning.",
    "optimizer": "optimizer factory; default AdamW(lr=1e-6, weight_decay=0), fused where supported.",
    "lr_schedule": "learning-rate shape after warm-up: ``cosine``, ``linear`` or ``constant``.",
    "warmup_ratio": "fraction of all optimizer steps spent warming up linearly from 0.",
    "warmup_steps": "warm-up length in optimizer steps; overrides ``warmup_ratio`` when set.",
    "min_lr_ratio": "cosine only: final learning rate as a fraction of the peak.",
    "attn_implementation": "attention kernel passed to ``from_pretrained``.",
    "trust_remote_code": "allow model code from the hub (off unless you trust the repository).",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory.",
}
"""The doc of each option that reads the same for every method that has it (``name: {shared}``)."""

DOC_WIDTH = 110
"""Line length of a filled-in doc line (the project's line length)."""
_SHARED_LINE = re.compile(r"^(?P<indent>[ \t]*)(?P<name>\w+): \{shared\}$", re.MULTILINE)

T = TypeVar("T", bound=type)


def shared_doc_lines(name: str, indent: str) -> str:
    """The ``Args:`` entry of option ``name`` from :data:`OPTION_DOCS`, wrapped, continuation lines
    indented one level deeper than ``indent`` (Google docstring style)."""
    if name not in OPTION_DOCS:
        raise KeyError(f"no shared doc for option {name!r}; write its doc in the docstring")
    return textwrap.fill(
        f"{name}: {OPTION_DOCS[name]}",
        width=DOC_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def with_shared_docs(cls: T) -> T:
    """Class decorator: fill every ``name: {shared}`` line of the docstring from :data:`OPTION_DOCS`.

    Done at class creation, so ``__doc__`` (what the CLI's ``--help`` and ``help()`` read) holds the
    text; a name without a shared doc fails at import.
    """
    if cls.__doc__:
        cls.__doc__ = _SHARED_LINE.sub(
            lambda match: shared_doc_lines(match["name"], match["indent"]), cls.__doc__
        )
    return cls
