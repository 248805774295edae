"""The reference model, three ways: a frozen copy, the LoRA policy's base, or precomputed log-probs.

``model.reference`` picks the strategy (see README, "Reference strategies"):

- ``separate``: :class:`FrozenReference`, a second model in eval mode, no gradients, never trained,
  never checkpointed.
- ``lora``: :class:`AdapterReference`, the LoRA policy itself with its adapters switched off, so the
  base weights exist once.
- ``precomputed``: no reference model during training; one pass before it stores every pair's
  log-prob sums and token counts (:mod:`ipo_lightning.precompute`), which the collator puts in the
  batch and :func:`precomputed_logprobs` reads back.

Both model-backed strategies (:class:`ModelReference`) expose ``sequence_logprobs(...)`` for the loss,
scored like the policy, and ``model`` (a module callable like a causal LM) for the divergence monitor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ipo_lightning.batching import Batching, batch_scores, sequence_logps
from ipo_lightning.errors import ConfigError
from ipo_lightning.modeling import eval_mode

REFERENCE_ATTRIBUTE = "reference"
ReferenceStrategy = Literal["separate", "lora", "precomputed"]
REFERENCE_STRATEGIES: tuple[str, ...] = get_args(ReferenceStrategy)
# Batch keys of precomputed reference log-probs, one value per pair (see PairwiseCollator).
REF_CHOSEN_SUM, REF_CHOSEN_COUNT = "ref_chosen_logp_sum", "ref_chosen_token_count"
REF_REJECTED_SUM, REF_REJECTED_COUNT = "ref_rejected_logp_sum", "ref_rejected_token_count"
PRECOMPUTED_KEYS = (REF_CHOSEN_SUM, REF_CHOSEN_COUNT, REF_REJECTED_SUM, REF_REJECTED_COUNT)


def resolve_reference_strategy(reference: str | None, uses_lora: bool) -> ReferenceStrategy:
    """The strategy to use: ``reference`` if given, else ``lora`` for a LoRA policy, else ``separate``.

    Raises:
        ConfigError: an unknown strategy, or a LoRA policy with a separate reference copy (which
            would hold the base weights twice for no gain: its reference is its own base).
    """
    resolved = reference or ("lora" if uses_lora else "separate")
    if resolved not in REFERENCE_STRATEGIES:
        choices = ", ".join(REFERENCE_STRATEGIES)
        raise ConfigError(f"model.reference must be one of {choices}, got {resolved!r}")
    if resolved == "separate" and uses_lora:
        raise ConfigError(
            "model.reference=separate with model.lora set: a LoRA policy's reference is its own base "
            "with the adapters off; use model.reference lora (or precomputed)"
        )
    return resolved


class ModelReference:
    """What both model-backed references share: :attr:`model`, called like a causal LM, and the
    completion scoring of the training path (:func:`ipo_lightning.batching.batch_scores`) on it."""

    model: nn.Module
    """The reference as a causal LM (the divergence monitor runs it too)."""

    @torch.no_grad()
    def sequence_logprobs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_mask: Tensor,
        *,
        length_normalize: bool,
        chunk_size: int,
        batching: Batching = "padded",
    ) -> Tensor:
        """Per-sequence completion log-probs under the reference (no autograd graph), laid out as the
        policy's forward (``batching``, see :mod:`ipo_lightning.batching`)."""
        rows = (input_ids, attention_mask, completion_mask)
        scores = batch_scores(self.model, *rows, batching=batching, chunk_size=chunk_size)
        return scores.sequence_logps(length_normalize)


class FrozenReference(nn.Module, ModelReference):
    """Wraps a causal LM so that it stays frozen by construction.

    - ``train(True)`` is ignored (Lightning calls ``model.train()`` on the whole LightningModule at
      the start of fit and after every validation loop; dropout must stay off in the reference).
    - Parameters never require grad, so no optimizer built from ``requires_grad`` parameters sees them.
    - ``state_dict`` is empty: checkpoints hold the policy only; the reference is reloaded from its
      path on resume. The owning module tolerates its missing keys on load
      (:func:`ignore_missing_reference_keys`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        # `nn.Module.__init__` set training=True on the wrapper; keep the whole subtree consistent.
        self.training = False

    def train(self, mode: bool = True) -> FrozenReference:
        """Keep eval mode whatever Lightning asks for."""
        return super().train(False)

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        """Contribute nothing to checkpoints (see class docstring)."""
        return destination if destination is not None else OrderedDict()


class _AdaptersOff(nn.Module):
    """Calls the LoRA policy with its adapters disabled and every dropout off: the reference model.

    Not registered in the LightningModule (its holder, :class:`AdapterReference`, is a plain
    object), so the policy is not listed twice in parameters, state dicts or summaries.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    @property
    def config(self) -> Any:
        """The policy's config (batching reads the attention kernel from it)."""
        return self.policy.config

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """The base model's output (``logits_to_keep`` is explicit so callers see it is accepted)."""
        with torch.no_grad(), _adapters_off(self.policy):
            return self.policy(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )


@contextmanager
def generating_model(model: nn.Module) -> Iterator[nn.Module]:
    """A model that ``generate`` runs as ``model``: ``model`` itself, or for the LoRA reference (the
    adapters-off wrapper, which has no ``generate``) the policy with its adapters off for the context."""
    if isinstance(model, _AdaptersOff):
        with _adapters_off(model.policy):
            yield model.policy
    else:
        yield model


@contextmanager
def _adapters_off(policy: nn.Module) -> Iterator[None]:
    """Adapters disabled and every submodule in eval mode (base and LoRA dropout off), then restored.

    Each module's own mode is restored (:func:`~ipo_lightning.modeling.eval_mode`).
    """
    with eval_mode(policy), policy.disable_adapter():
        yield


class AdapterReference(ModelReference):
    """The reference of a LoRA policy: the same base weights with the adapters switched off.

    A plain object rather than an ``nn.Module``, so it adds no parameters, no state-dict keys and no
    memory: :attr:`model` calls the policy itself.
    """

    def __init__(self, policy: nn.Module) -> None:
        self.model = _AdaptersOff(policy)


def precomputed_logprobs(batch: dict[str, Tensor], *, length_normalize: bool) -> Tensor:
    """[2B] reference log-probs of a batch from its precomputed sums and counts: chosen, then rejected.

    Raises:
        ConfigError: the batch carries no precomputed values (data that bypassed the precompute pass).
    """
    missing = [key for key in PRECOMPUTED_KEYS if key not in batch]
    if missing:
        raise ConfigError(
            "model.reference=precomputed: the batch has no precomputed reference log-probs "
            f"({', '.join(missing)}); the data must come from a PreferenceDataModule set up by the Trainer"
        )
    sums = torch.cat([batch[REF_CHOSEN_SUM], batch[REF_REJECTED_SUM]])
    counts = torch.cat([batch[REF_CHOSEN_COUNT], batch[REF_REJECTED_COUNT]])
    return sequence_logps(sums, counts, length_normalize=length_normalize)


def ignore_missing_reference_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: a checkpoint without reference weights is complete."""
    prefix = f"{REFERENCE_ATTRIBUTE}."
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.startswith(prefix)]
