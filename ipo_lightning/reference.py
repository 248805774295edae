"""The frozen reference model: eval mode, no gradients, never trained, never checkpointed."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from ipo_lightning.batching import Batching, batch_scores

REFERENCE_ATTRIBUTE = "reference"


class FrozenReference(nn.Module):
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

    def train(self, mode: bool = True) -> FrozenReference:  # noqa: ARG002 - mode deliberately ignored
        """Keep eval mode whatever Lightning asks for."""
        return super().train(False)

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        """Contribute nothing to checkpoints (see class docstring)."""
        return destination if destination is not None else OrderedDict()

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
        """Per-sequence completion log-probs under the reference (no autograd graph).

        ``batching`` lays the rows out as the policy's forward does (see :mod:`ipo_lightning.batching`).
        """
        scores = batch_scores(
            self.model, input_ids, attention_mask, completion_mask, batching=batching, chunk_size=chunk_size
        )
        return scores.sequence_logps(length_normalize)


def ignore_missing_reference_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: a checkpoint without reference weights is complete."""
    prefix = f"{REFERENCE_ATTRIBUTE}."
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.startswith(prefix)]
