"""Whether a model keeps the sequences of a packed row apart, decided from its config alone.

``padding_free`` and ``prefix_shared`` put several sequences in one row and keep them apart only
through the attention mask (built from ``position_ids`` or passed in 4D) and flash-attention's
sequence boundaries. Layers that mix tokens any other way carry state from one sequence into the
next: linear attention and state-space layers (Gated DeltaNet, Mamba, RG-LRU, RWKV, xLSTM, MiniMax's
lightning attention) and short causal convolutions (LFM2). Such a model would silently score each
sequence as the continuation of the one before it, so those layouts are refused for it.

transformers 5.x names every layer's kind in ``layer_types`` (``layers_block_type`` and
``block_types`` in some families); only the kinds known to honour the mask are accepted, and any
other kind (a new one included) counts as unsafe. Configs that name no layer kinds are judged by
their model type and, for remote-code configs, by state-space fields.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PretrainedConfig

SAFE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
"""Attention layers whose masks transformers builds from the restarting positions (masking_utils)."""
TOKENWISE_LAYER_TYPES = frozenset({"mlp", "moe"})
"""Layers that see one token at a time (NemotronH's MLP and MoE blocks): nothing crosses sequences."""
_ACCEPTED_LAYER_TYPES = SAFE_LAYER_TYPES | TOKENWISE_LAYER_TYPES
LAYER_KIND_NAMES = {
    "linear_attention": "linear-attention / state-space",
    "conv": "short-convolution",
    "hybrid": "attention combined with state-space or convolution",
    "hybrid_sliding": "sliding attention combined with state-space or convolution",
    "recurrent": "recurrent",
    "mamba": "Mamba state-space",
}
LAYER_TYPE_FIELDS = ("layer_types", "layers_block_type", "block_types")
"""Config fields that list each layer's kind (the latter two in Jamba, FalconH1, RecurrentGemma, ...)."""
RECURRENT_MODEL_TYPES = {
    "mamba": "Mamba state-space layers",
    "mamba2": "Mamba-2 state-space layers",
    "falcon_mamba": "Mamba state-space layers",
    "rwkv": "RWKV time-mixing (recurrent) layers",
    "xlstm": "xLSTM recurrent layers",
    "recurrent_gemma": "RG-LRU recurrent layers",
    "lfm2": "short-convolution layers",
    "lfm2_moe": "short-convolution layers",
}
"""Model types whose layers mix tokens outside attention, for configs that list no layer kinds."""
STATE_SPACE_FIELD_PREFIXES = ("mamba_", "ssm_", "linear_attn", "linear_conv")
"""Config field prefixes of state-space and linear-attention layers (remote-code hybrids among them)."""


def _layer_kinds(config: PretrainedConfig) -> tuple[str, list[str]] | None:
    """The first field of ``LAYER_TYPE_FIELDS`` the config sets, and the layer kinds it lists."""
    for field in LAYER_TYPE_FIELDS:
        try:
            kinds = getattr(config, field, None)
        except (AttributeError, TypeError, ValueError):  # a derived property on an incomplete config
            continue
        if isinstance(kinds, str):
            kinds = [kinds]
        if isinstance(kinds, Iterable) and not isinstance(kinds, dict):
            kinds = [str(kind) for kind in kinds]
            if kinds:
                return field, kinds
    return None


def _configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """The config and its decoder's text config (a composite model's language part), each once."""
    try:
        text = config.get_text_config(decoder=True)
    except ValueError:  # several text configs: judge the outer one (and what it says itself)
        text = config
    return [config] if text is config else [text, config]


def packing_unsafe_reason(config: PretrainedConfig) -> str | None:
    """Why packed rows would leak between sequences in this model, or None when they cannot.

    The reason names the layer kind found and where (``layer_types``, the model type or a config
    field), in words that complete "cannot run packed rows: ...".
    """
    for part in _configs(config):
        listed = _layer_kinds(part)
        if listed is not None:
            field, kinds = listed
            unknown = [kind for kind in dict.fromkeys(kinds) if kind not in _ACCEPTED_LAYER_TYPES]
            if not unknown:
                continue
            kind = unknown[0]
            if kind not in LAYER_KIND_NAMES:
                return f"its config's {field} lists {kind!r}, a layer kind not known to keep sequences apart"
            return (
                f"its config's {field} lists {kind!r} ({LAYER_KIND_NAMES[kind]} layers), which carry state "
                "from one packed sequence into the next"
            )
        model_type = getattr(part, "model_type", None)
        if model_type in RECURRENT_MODEL_TYPES:
            return (
                f"model type {model_type!r} has {RECURRENT_MODEL_TYPES[model_type]}, which carry state "
                "from one packed sequence into the next"
            )
        fields = [name for name in part.to_dict() if name.startswith(STATE_SPACE_FIELD_PREFIXES)]
        if fields:
            return (
                f"its config has state-space / linear-attention fields ({fields[0]}), whose layers carry "
                "state from one packed sequence into the next"
            )
    return None
