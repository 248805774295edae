"""LoRA policies: options, wrapping a causal LM with peft adapters, and merging them for export.

With a LoRA policy only the small adapter matrices train; the base weights stay frozen. That makes
the reference free: it is the same base with the adapters switched off (see
:class:`ipo_lightning.reference.AdapterReference`), so one copy of the base weights serves both.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from ipo_lightning.errors import ConfigError

ALL_LINEAR = "all-linear"


@dataclass
class LoraOptions:
    """Low-rank adapters on the policy (peft LoRA); the base weights stay frozen.

    Args:
        rank: Rank r of each adapter: trainable parameters per adapted matrix are r * (in + out).
        alpha: Scaling numerator: the update is (alpha / rank) * B @ A.
        dropout: Dropout on the adapter's input during training (off in every reference pass).
        target_modules: Module names to adapt, e.g. [q_proj, v_proj]; ``all-linear`` for every linear
            layer but the output head; null: peft's default for the architecture.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None


def as_lora_options(value: LoraOptions | dict[str, Any] | None) -> LoraOptions | None:
    """Accept the dataclass (CLI, Python) or its dict form (hyperparameters of a saved checkpoint)."""
    if value is None or isinstance(value, LoraOptions):
        return value
    if isinstance(value, dict):
        return LoraOptions(**value)
    raise ConfigError(f"model.lora must be a mapping of LoRA options, got {type(value).__name__}")


def check_lora_options(options: LoraOptions) -> None:
    """Raise one ConfigError naming the first unusable option."""
    if options.rank < 1:
        raise ConfigError(f"model.lora.rank must be at least 1, got {options.rank}")
    if options.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be positive, got {options.alpha}")
    if not 0.0 <= options.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {options.dropout}")
    targets = options.target_modules
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise ConfigError(
            f"model.lora.target_modules must be a list of module names or {ALL_LINEAR!r}, got {targets!r}"
        )
    if isinstance(targets, list) and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"model.lora.target_modules must list module names, got {targets!r}")


def lora_options_dict(options: LoraOptions | None) -> dict[str, Any] | None:
    """Plain-dict form for hyperparameters (keeps hparams.yaml loadable with ``yaml.safe_load``)."""
    return None if options is None else asdict(options)


LoraTask = Literal["CAUSAL_LM", "SEQ_CLS"]


def apply_lora(
    model: PreTrainedModel,
    options: LoraOptions,
    *,
    gradient_checkpointing: bool,
    task_type: LoraTask = "CAUSAL_LM",
) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters; every base weight is frozen by peft.

    ``task_type``: ``CAUSAL_LM`` for a policy; ``SEQ_CLS`` for a reward model, whose classification
    head (new, so it must learn in full) is also in ``modules_to_save``: a trained full copy of it,
    which the merged export carries.

    Raises:
        ConfigError: ``target_modules`` names no module of the model, or peft knows no default for it.
    """
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        bias="none",
        task_type=task_type,
        modules_to_save=_head_names(model) if task_type == "SEQ_CLS" else None,
    )
    try:
        policy = get_peft_model(model, config)
    except ValueError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.lora.target_modules={options.target_modules!r}: {first_line}") from None
    if gradient_checkpointing:
        # Checkpointed blocks whose inputs do not require grad return outputs without a graph under
        # reentrant checkpointing, and the embeddings are frozen here: make their output require grad.
        policy.enable_input_require_grads()
    return policy


SEQ_CLS_HEADS = ("score", "classifier")
"""Attribute names of Hugging Face's sequence-classification heads (decoders: score; encoders: classifier)."""


def _head_names(model: nn.Module) -> list[str]:
    """The classification head of a sequence-classification model, as ``modules_to_save`` names it."""
    names = [name for name in SEQ_CLS_HEADS if isinstance(getattr(model, name, None), nn.Module)]
    if not names:
        raise ConfigError(
            f"model.lora: {type(model).__name__} has no classification head named "
            f"{' or '.join(SEQ_CLS_HEADS)} to keep trainable"
        )
    return names


def is_lora(model: nn.Module | None) -> bool:
    """Whether ``model`` is a peft model (a LoRA policy)."""
    return isinstance(model, PeftModel)


def merged_copy(policy: PeftModel) -> PreTrainedModel:
    """A plain Hugging Face model with the adapters merged into its weights; ``policy`` is untouched.

    The copy (not an in-place merge and unmerge) keeps the training weights bit-exact: ``W + BA - BA``
    is not ``W`` in floating point. It costs a second copy of the model for the duration of the export.

    The copy carries no forward or backward hooks. A hook left on the policy by a callback (an
    activation logger, say) is often a bound method, and deep-copying it would copy its owner, the
    callback, and whatever that holds (the trainer, a process group): that can fail, and an export
    never wants it.
    """
    no_hooks = {id(hooks): type(hooks)() for module in policy.modules() for hooks in _hook_dicts(module)}
    merged = copy.deepcopy(policy, memo=no_hooks).merge_and_unload()
    merged.eval()
    return merged


def merged_from_state_dict(policy: PeftModel, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """As :func:`merged_copy`, for a policy whose modules cannot be copied (FSDP2 shards them in place):
    a twin of ``policy`` is built on the meta device, takes the tensors of ``state_dict`` (the policy's
    full state dict, on the CPU) and the policy's non-persistent buffers (rotary tables), then merges.

    Raises:
        RuntimeError: a tensor of the twin was in neither, so the merge would read uninitialised memory.
    """
    base = policy.get_base_model()
    with torch.device("meta"):
        twin = get_peft_model(
            _plain_class(base)._from_config(base.config), copy.deepcopy(policy.active_peft_config)
        )
    twin.load_state_dict(state_dict, strict=True, assign=True)
    buffers = dict(policy.named_buffers())
    for name, buffer in list(twin.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, attribute = name.rpartition(".")
            twin.get_submodule(owner)._buffers[attribute] = buffers[name].detach().to("cpu", copy=True)
    twin.get_base_model().tie_weights()
    empty = [name for name, tensor in [*twin.named_parameters(), *twin.named_buffers()] if tensor.is_meta]
    if empty:
        raise RuntimeError(
            f"merging the adapters: {len(empty)} tensors of the policy were not filled, e.g. {empty[0]}"
        )
    merged = twin.merge_and_unload()
    merged.eval()
    return merged


def _plain_class(model: nn.Module) -> type[PreTrainedModel]:
    """The Hugging Face class of ``model``, under the subclass FSDP2 makes of it in place."""
    from torch.distributed.fsdp import FSDPModule

    return next(
        cls
        for cls in type(model).__mro__
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule)
    )


# The tables nn.Module keeps its forward and backward hooks in (state-dict hooks stay: saving may use them).
_CALL_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _hook_dicts(module: nn.Module) -> list[dict[int, Any]]:
    """The module's forward and backward hook tables that it has (``_CALL_HOOK_TABLES``)."""
    return [table for name in _CALL_HOOK_TABLES if isinstance(table := vars(module).get(name), dict)]
