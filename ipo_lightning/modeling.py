"""Loading Hugging Face causal LMs by hub id or local folder, the way every model here is loaded."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _resolve(name_or_path: str) -> str:
    """Resolve ``builtin:`` names; a local-looking path that does not exist is a clear error."""
    path = resolve_model_path(name_or_path)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        # Otherwise transformers treats it as a hub id and complains about its form.
        raise ConfigError(f"cannot load model {name_or_path!r}: no such folder")
    return path


def load_model_config(name_or_path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's ``config.json`` (cheap: no weights), or one clear ConfigError."""
    path = _resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None


def causal_lm_class(
    config: PretrainedConfig, *, trust_remote_code: bool = False
) -> type[PreTrainedModel] | None:
    """The class ``AutoModelForCausalLM.from_pretrained`` builds for ``config`` (no weights read), or None.

    Remote code (``auto_map``) is only looked at with ``trust_remote_code``, as when loading; its module
    is fetched and imported just as loading would.
    """
    class_ref = (getattr(config, "auto_map", None) or {}).get(AutoModelForCausalLM.__name__)
    if class_ref is not None and trust_remote_code:
        try:
            return get_class_from_dynamic_module(class_ref, config._name_or_path)
        except (OSError, ValueError, ImportError):
            return None
    mapping = AutoModelForCausalLM._model_mapping  # the registry from_pretrained itself reads
    if type(config) not in mapping:
        return None
    classes = mapping[type(config)]
    if not isinstance(classes, (list, tuple)):
        return classes
    # Several classes for one config: from_pretrained picks by config.architectures, else the first.
    by_name = {model_class.__name__: model_class for model_class in classes}
    named = [by_name[name] for name in getattr(config, "architectures", None) or [] if name in by_name]
    return named[0] if named else classes[0]


def position_offset(model: torch.nn.Module) -> int:
    """How many rows of the model's learned position table come before the first token's: 0 for most
    models, ``padding_idx + 1`` for RoBERTa-style ones (RoBERTa, XLM-R, CamemBERT, ESM, MPNet, ...).

    transformers numbers those models' positions with ``create_position_ids_from_input_ids`` (a method
    of the embeddings module, or a function of its modeling file): positions start at
    ``padding_idx + 1``, so a table of ``max_position_embeddings`` rows holds that many fewer tokens.
    """
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if not isinstance(padding_idx, int) or not isinstance(
            getattr(module, "position_embeddings", None), torch.nn.Embedding
        ):
            continue
        modeling_file = sys.modules.get(type(module).__module__)
        if hasattr(module, "create_position_ids_from_input_ids") or hasattr(
            modeling_file, "create_position_ids_from_input_ids"
        ):
            return padding_idx + 1
    return 0


def config_position_offset(config: PretrainedConfig) -> int:
    """:func:`position_offset` of the model ``config`` describes, read from its base model built on the
    meta device (modules only: no weights, no memory; a fraction of a second even for 70B configs).

    0 for a config whose base model transformers does not know, or cannot build from this config
    alone: the check is advisory, and loading the model reports what is wrong with it.
    """
    # Remote code is not run for a check; a remote config named like a built-in one (the registry
    # matches class names) must not get the built-in model built from it.
    if getattr(config, "auto_map", None) or not type(config).__module__.startswith("transformers."):
        return 0
    mapping = AutoModel._model_mapping  # the registry AutoModel.from_config itself reads
    if type(config) not in mapping:
        return 0
    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - some base models need settings or extras a config alone lacks
        return 0
    return position_offset(skeleton)


def context_size(config: PretrainedConfig, offset: int) -> int | None:
    """The most tokens one row may hold: ``max_position_embeddings`` less the position ``offset``
    (:func:`position_offset`); None when the config gives no position limit."""
    positions = getattr(config, "max_position_embeddings", None)
    return positions - offset if isinstance(positions, int) else None


def check_context_size(config: PretrainedConfig, max_length: int | None) -> None:
    """Raise ConfigError if rows of ``max_length`` tokens do not fit the model's context
    (:func:`context_size`, which RoBERTa-style position numbering makes smaller than the table)."""
    if max_length is None or getattr(config, "max_position_embeddings", None) is None:
        return
    offset = config_position_offset(config)
    limit = context_size(config, offset)
    if limit is not None and max_length > limit:
        rows = f"max_position_embeddings={config.max_position_embeddings}"
        if offset:
            rows += f" less the {offset} position rows before the first token's"
        raise ConfigError(
            f"data.max_length={max_length} exceeds the model's context size ({limit} tokens: {rows}); "
            "lower data.max_length"
        )


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
    path = _resolve(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None


def load_sequence_classifier(
    name_or_path: str,
    *,
    num_labels: int = 1,
    dtype: DType = "float32",
    attn_implementation: AttnImplementation | None = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load ``AutoModelForSequenceClassification`` with ``num_labels`` outputs, as :func:`load_causal_lm`
    loads a causal LM (safetensors only, ``builtin:`` names, one clear ConfigError).

    A causal LM checkpoint gets a new, randomly initialised score head on top of its body.
    """
    path = _resolve(name_or_path)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None


DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _is_dropout_setting(name: str, value: object) -> bool:
    """A positive dropout probability stored under a dropout name (``attention_dropout``, ``resid_pdrop``)."""
    named = "dropout" in name.lower() or name.lower().endswith("pdrop")
    return named and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def disable_dropout(model: torch.nn.Module) -> list[str]:
    """Set every dropout probability of a transformers model to 0; returns what was changed.

    Zeroing ``torch.nn.Dropout`` modules (all TRL's ``disable_dropout_in_model`` does) is not enough:
    Llama, Qwen2, Mistral and Gemma attention keep ``attention_dropout`` as a float attribute, and Falcon,
    GPT-Neo and Persimmon read it from the config at every forward. So three places are set to 0:
    dropout modules' ``p``, float attributes of modules named like a dropout, and the model config's
    (and sub-configs') dropout fields, which an export then saves as trained.
    """
    changed: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, DROPOUT_MODULES) and module.p > 0:
            module.p = 0.0
            changed.append(f"{module_name}.p")
        for name, value in list(vars(module).items()):
            if _is_dropout_setting(name, value):
                setattr(module, name, 0.0)
                changed.append(prefix + name)
    configs = [("config", getattr(model, "config", None))]
    while configs:
        label, config = configs.pop()
        if not isinstance(config, PretrainedConfig):
            continue
        for name, value in list(vars(config).items()):
            if isinstance(value, PretrainedConfig):
                configs.append((f"{label}.{name}", value))
            elif _is_dropout_setting(name, value):
                setattr(config, name, 0.0)
                changed.append(f"{label}.{name}")
    return changed


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode (no dropout) for the context, then each put back in its
    own mode: Lightning keeps per-module modes, so one global ``train(mode)`` would not restore them."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
