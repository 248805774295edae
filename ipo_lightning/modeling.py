"""Loading Hugging Face causal LMs by hub id or local folder, the way every model here is loaded."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: DType = "float32",
    attn_implementation: AttnImplementation | None = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load ``AutoModelForCausalLM`` from a hub id, a local folder or a ``builtin:`` name.

    Safetensors only (``use_safetensors=True``): pickled ``.bin`` checkpoints can run code on load.
    The model comes back in eval mode; callers switch the policy to train mode.
    """
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except OSError as error:
        raise ConfigError(f"cannot load model {name_or_path!r}: {error}") from error
    return model
