"""RLOO (REINFORCE leave-one-out; Ahmadian et al. 2024), method ``rloo``.

For each prompt, k samples y_1..y_k of the policy, their rewards r_i, and their sampled KL to the
reference ``kl_i = log pi(y_i) - log ref(y_i)`` (summed over completion tokens):

    r'_i = r_i - beta * kl_i                       (detached: the KL penalty is part of the reward)
    A_i  = r'_i - mean_{j != i} r'_j               (leave-one-out baseline over the prompt's samples)
    loss = -mean_i(A_i * log pi(y_i))              (log pi summed over the completion tokens)

The expected gradient of this loss is exactly ``-grad(E_pi[r] - beta * KL(pi || ref))``: the baseline
of sample i does not depend on y_i, so it adds no bias (tests/test_rl.py checks this by enumeration),
and the fixed point is ``pi*(y) ∝ ref(y) exp(r(y) / beta)``. Defaults follow TRL's ``RLOOConfig``
(beta 0.05, the KL summed per sequence and folded into the reward), except k: 4 here (TRL: 2), as in the
RLOO paper's best setting. No advantage normalisation or clipping (one gradient step per sample).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ipo_lightning.errors import ConfigError
from ipo_lightning.model_options import with_shared_docs
from ipo_lightning.rl.module import OnPolicyModule
from ipo_lightning.rl.rollout import Rollout

RLOO_DEFAULT_BETA = 0.05
"""TRL's ``RLOOConfig.beta``."""
RLOO_DEFAULT_SAMPLES = 4


def rloo_advantages(rewards: Tensor, kl: Tensor, beta: float) -> Tensor:
    """``A_i = r'_i - mean_{j != i} r'_j`` with ``r' = rewards - beta * kl``; all ``[B, k]``, k >= 2."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    shaped = rewards - beta * kl
    baseline = (shaped.sum(dim=-1, keepdim=True) - shaped) / (k - 1)
    return shaped - baseline


def rloo_loss(
    policy_logps: Tensor, reference_logps: Tensor, rewards: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """The RLOO loss of ``[B, k]`` summed log-probs (policy with autograd) and rewards; also the advantages.

    Returns:
        ``(loss, advantages)``: ``-mean(A * log pi)`` and ``A`` (detached), see the module docstring.
    """
    kl = (policy_logps - reference_logps).detach()
    advantages = rloo_advantages(rewards.to(kl.dtype), kl, beta).detach()
    return -(advantages * policy_logps).mean(), advantages


@with_shared_docs
class RLOOModule(OnPolicyModule):
    """RLOO against a frozen reference, with a pluggable reward (module docstring).

    The options after these are :class:`~ipo_lightning.rl.module.OnPolicyModule`'s (``**kwargs``).

    Args:
        model_name_or_path: {shared}
        reward: {shared}
        samples_per_prompt: k, samples per prompt (>= 2: the baseline of each is the others' mean).
        beta: weight of the per-sequence KL penalty ``log pi(y) - log ref(y)`` in the reward.
    """

    method_name = "rloo"
    method_metrics = ("rloo/shaped_reward", "rloo/advantage_abs")
    method_export_keys = ("beta",)

    def __init__(
        self,
        model_name_or_path: str,
        reward: str,
        samples_per_prompt: int = RLOO_DEFAULT_SAMPLES,
        beta: float = RLOO_DEFAULT_BETA,
        **kwargs: Any,
    ) -> None:
        if samples_per_prompt < 2:
            raise ConfigError(
                f"model.samples_per_prompt must be >= 2 for RLOO (each sample's baseline is the mean of the "
                f"others), got {samples_per_prompt}"
            )
        if beta < 0:
            raise ConfigError(f"model.beta must be >= 0, got {beta}")
        super().__init__(
            model_name_or_path=model_name_or_path,
            reward=reward,
            samples_per_prompt=samples_per_prompt,
            method_options={"beta": beta, "samples_per_prompt": samples_per_prompt},
            **kwargs,
        )

    def export_info(self) -> dict[str, Any]:
        """:meth:`OnPolicyModule.export_info`; RLOO's log-probs are always summed over the completion."""
        return {**super().export_info(), "length_normalize": False}

    def rollout_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """:func:`rloo_loss` of the rollout, on the rewards with ``missing_eos_penalty`` applied."""
        beta = self.hparams.beta
        loss, advantages = rloo_loss(
            rollout.policy_logps, rollout.reference_logps, rollout.shaped_rewards, beta
        )
        shaped = rollout.shaped_rewards - beta * rollout.kl
        return loss, {
            "rloo/shaped_reward": shaped.flatten(),
            "rloo/advantage_abs": advantages.abs().flatten(),
        }
