"""Online IPO / DPO (Calandriello et al. 2024; Guo et al. 2024), method ``online``.

For each prompt the current policy samples two completions y_1, y_2; the reward labels them. The
higher-reward sample is *chosen*, with the soft preference

    p = sigmoid(|r(y_1) - r(y_2)| / T)          (T = ``label_temperature``; T = 0: p = 1, a tie p = 0.5)

and the pair is trained with the offline loss, :func:`~ipo_lightning.losses.preference_loss`
(``loss_type`` ipo or dpo, with ``preference_prob = p``), on length-normalised or summed log-probs
with the same defaults as offline training (:func:`~ipo_lightning.module.default_length_normalize`,
:func:`~ipo_lightning.module.default_beta`). A tie makes IPO's target 0 (the two log-ratios equal).

With hard labels the population fixed point of online IPO on a bandit (one-token completions) is the
solution of ``log pi(y) - log ref(y) = c + tau * E_{y' ~ pi}[sign(r(y) - r(y'))]``, tau = 1/(2 beta)
(every sample's log-ratio moves to the target margin against the policy's own samples); with
T > 0 ``sign`` becomes ``2 sigmoid(./T) - 1``. tests/test_rl.py checks that the expected gradient
vanishes there.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ipo_lightning.batching import sequence_logps
from ipo_lightning.errors import ConfigError
from ipo_lightning.losses import PreferenceLossOutput, check_loss_options, preference_loss
from ipo_lightning.model_options import with_shared_docs
from ipo_lightning.module import default_beta, default_length_normalize
from ipo_lightning.rl.module import OnPolicyModule, default_label_temperature
from ipo_lightning.rl.rollout import Rollout

OnlineLossType = Literal["ipo", "dpo"]
ONLINE_SAMPLES = 2
"""Samples per prompt of online IPO/DPO: one pair, labelled by the reward."""


def online_preferences(rewards: Tensor, label_temperature: float) -> tuple[Tensor, Tensor]:
    """Which of two samples is chosen and how strongly, from their rewards ``[B, 2]``.

    Returns:
        ``(chosen [B] long, preference_prob [B])``: the index of the higher-reward sample (0 on a tie)
        and ``sigmoid(|r_1 - r_2| / T)``; for T = 0, 1 (0.5 on a tie).
    """
    if rewards.shape[-1] != ONLINE_SAMPLES:
        raise ValueError(
            f"online preferences need {ONLINE_SAMPLES} samples per prompt, got {rewards.shape[-1]}"
        )
    if label_temperature < 0:
        raise ValueError(f"label_temperature must be >= 0, got {label_temperature}")
    diff = rewards[:, 0] - rewards[:, 1]
    chosen = (diff < 0).long()
    if label_temperature == 0:
        prob = torch.where(diff == 0, 0.5, 1.0).to(rewards.dtype)
    else:
        prob = torch.sigmoid(diff.abs() / label_temperature)
    return chosen, prob


def online_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    rewards: Tensor,
    *,
    loss_type: OnlineLossType,
    beta: float,
    label_temperature: float,
) -> tuple[PreferenceLossOutput, Tensor]:
    """:func:`preference_loss` of each prompt's two samples labelled by :func:`online_preferences`.

    Args:
        policy_logps: ``[B, 2]`` log-probs of the samples under the policy (as the loss wants them:
            summed or length-normalised), with autograd.
        reference_logps: ``[B, 2]`` the same under the reference.
        rewards: ``[B, 2]`` their rewards.

    Returns:
        ``(the loss output, preference_prob [B])``.
    """
    chosen, prob = online_preferences(rewards, label_temperature)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rejected = 1 - chosen
    out = preference_loss(
        policy_logps[rows, chosen],
        policy_logps[rows, rejected],
        reference_logps[rows, chosen],
        reference_logps[rows, rejected],
        loss_type=loss_type,
        beta=beta,
        preference_prob=prob,
    )
    return out, prob


@with_shared_docs
class OnlineModule(OnPolicyModule):
    """Online IPO or DPO: preference pairs sampled from the current policy, labelled by the reward.

    The options after these are :class:`~ipo_lightning.rl.module.OnPolicyModule`'s (``**kwargs``).

    Args:
        model_name_or_path: {shared}
        reward: {shared}
        loss_type: ``ipo`` (regress the margin to (2p - 1)/(2 beta)) or ``dpo``.
        beta: as for offline training; default (null): 1.0 for ipo, 0.1 for dpo.
        length_normalize: average log-probs over completion tokens; default (null): true for ipo,
            false for dpo (as offline).
        label_temperature: T of the soft label p = sigmoid(|r_1 - r_2| / T) of the higher-reward
            sample; 0: hard labels (p = 1, a tie 0.5). Default (null): 1 when ``reward`` is a reward
            model (p is then its own Bradley-Terry probability), 0 for a reward function.
    """

    method_name = "online"
    method_metrics = ("online/preference_prob", "online/tie_rate", "logratio/margin")
    method_export_keys = ("loss_type", "beta", "length_normalize", "label_temperature")

    def __init__(
        self,
        model_name_or_path: str,
        reward: str,
        loss_type: OnlineLossType = "ipo",
        beta: float | None = None,
        length_normalize: bool | None = None,
        label_temperature: float | None = None,
        **kwargs: Any,
    ) -> None:
        if loss_type not in ("ipo", "dpo"):
            raise ConfigError(f"model.loss_type must be ipo or dpo for the online method, got {loss_type!r}")
        beta = default_beta(loss_type) if beta is None else beta
        try:
            check_loss_options(loss_type, beta)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None
        if label_temperature is None:
            label_temperature = default_label_temperature(reward)
        if label_temperature < 0:
            raise ConfigError(f"model.label_temperature must be >= 0, got {label_temperature}")
        if length_normalize is None:
            length_normalize = default_length_normalize(loss_type)
        method = {
            "loss_type": loss_type,
            "beta": beta,
            "length_normalize": length_normalize,
            "label_temperature": label_temperature,
        }
        super().__init__(
            model_name_or_path=model_name_or_path,
            reward=reward,
            samples_per_prompt=ONLINE_SAMPLES,
            method_options=method,
            **kwargs,
        )

    def rollout_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`online_loss` of the rollout's two samples per prompt."""
        hp = self.hparams

        def logps(sums: Tensor) -> Tensor:
            return sequence_logps(sums, rollout.lengths, length_normalize=hp.length_normalize)

        out, prob = online_loss(
            logps(rollout.policy_logps),
            logps(rollout.reference_logps),
            rollout.shaped_rewards,
            loss_type=hp.loss_type,
            beta=hp.beta,
            label_temperature=hp.label_temperature,
        )
        ties = (rollout.shaped_rewards[:, 0] == rollout.shaped_rewards[:, 1]).float()
        values = {
            "online/preference_prob": prob.float(),
            "online/tie_rate": ties,
            "logratio/margin": out.margins,
        }
        return out.losses.mean(), values
