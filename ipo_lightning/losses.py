"""Pairwise preference losses on per-sequence log-probs: IPO, DPO (conservative), hinge.

Notation, for a pair (x, y_w, y_l) with y_w the chosen and y_l the rejected completion:

    logratio_w = logp_pi(y_w|x) - logp_ref(y_w|x)
    logratio_l = logp_pi(y_l|x) - logp_ref(y_l|x)
    h          = logratio_w - logratio_l                      (the log-ratio margin)

- ``ipo``:   (h - (2p - 1) / (2 beta))^2, p = P(y_w preferred), 1 by default, so the target is
             1/(2 beta); a tie (p = 0.5) targets 0 (Azar et al. 2023, eq. 17 with soft labels).
- ``dpo``:   -(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h), e = label smoothing (conservative
             DPO; e = 0 is plain DPO, Rafailov et al. 2023); with soft labels e = 1 - p per pair.
- ``hinge``: relu(1 - beta h) (SLiC-HF, Zhao et al. 2023).

Implicit rewards are ``beta * logratio`` from the same (possibly length-normalised) log-probs that
enter the loss, so the logged margin is on the scale of the IPO target.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

LossType = Literal["ipo", "dpo", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


class PreferenceLossOutput(NamedTuple):
    """Per-pair results of :func:`preference_loss`, each of shape [B]."""

    losses: Tensor
    """The loss of each pair; average it for the batch loss."""
    chosen_rewards: Tensor
    """``beta * (logp_pi(y_w) - logp_ref(y_w))``, detached."""
    rejected_rewards: Tensor
    """``beta * (logp_pi(y_l) - logp_ref(y_l))``, detached."""
    margins: Tensor
    """The log-ratio margin h, detached."""
    targets: Tensor
    """IPO's regression target for h (``(2p - 1)/(2 beta)``); NaN for the other losses."""


def ipo_target(beta: float, preference_prob: Tensor | float = 1.0) -> Tensor:
    """IPO's fixed point for the margin h: ``(2p - 1) / (2 beta)``; ``1/(2 beta)`` for hard labels."""
    p = torch.as_tensor(preference_prob, dtype=torch.float32)
    return (2.0 * p - 1.0) / (2.0 * beta)


def check_loss_options(loss_type: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Raise ValueError for options :func:`preference_loss` cannot use (callers can check up front)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type != "dpo" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type='dpo' only, got loss_type={loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def soft_labels_supported(loss_type: str, label_smoothing: float = 0.0) -> bool:
    """Whether pairs with preference_prob < 1 can be trained with these options."""
    return loss_type == "ipo" or (loss_type == "dpo" and label_smoothing == 0.0)


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: LossType,
    beta: float,
    label_smoothing: float = 0.0,
    preference_prob: Tensor | None = None,
) -> PreferenceLossOutput:
    """Compute a pairwise preference loss from per-sequence log-probs (all of shape [B]).

    Args:
        policy_chosen_logps: log pi(y_w|x) under the trained policy.
        policy_rejected_logps: log pi(y_l|x) under the trained policy.
        ref_chosen_logps: log ref(y_w|x) under the frozen reference.
        ref_rejected_logps: log ref(y_l|x) under the frozen reference.
        loss_type: ``ipo``, ``dpo`` or ``hinge`` (formulas in the module docstring).
        beta: strength of the pull towards the reference; IPO's target margin is 1/(2 beta).
        label_smoothing: DPO only: the assumed probability e that a label is flipped.
        preference_prob: per-pair P(y_w preferred) in [0, 1]; None means 1. IPO moves its target to
            (2p - 1)/(2 beta); DPO uses e = 1 - p as a per-pair label smoothing; hinge rejects p < 1.

    Returns:
        :class:`PreferenceLossOutput` (losses, chosen_rewards, rejected_rewards, margins, targets).
    """
    check_loss_options(loss_type, beta, label_smoothing)
    if preference_prob is not None and bool(torch.all(preference_prob == 1)):
        preference_prob = None  # hard labels: the plain formulas apply
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margins = chosen_logratios - rejected_logratios
    # Losses are computed in at least float32, even when the log-probs come from bf16 forwards.
    h = margins.to(torch.promote_types(margins.dtype, torch.float32))
    targets = torch.full_like(h, float("nan"))

    if loss_type == "ipo":
        prob = torch.ones_like(h) if preference_prob is None else preference_prob.to(h)
        targets = ipo_target(beta, prob).to(h)
        losses = (h - targets) ** 2
    elif loss_type == "dpo":
        # A soft label p is conservative DPO with a per-pair flip probability e = 1 - p.
        if preference_prob is None:
            flip = torch.full_like(h, label_smoothing)
        elif label_smoothing:
            raise ValueError("give either label_smoothing or preference_prob to DPO, not both")
        else:
            flip = 1.0 - preference_prob.to(h)
        losses = -(1.0 - flip) * F.logsigmoid(beta * h) - flip * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        if preference_prob is not None:
            raise ValueError("soft labels (preference_prob < 1) are not defined for loss_type='hinge'")
        losses = torch.relu(1.0 - beta * h)
    else:  # unreachable after check_loss_options
        raise ValueError(f"unknown loss_type {loss_type!r}")

    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        margins=margins.detach(),
        targets=targets.detach(),
    )
