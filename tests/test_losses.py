"""Every loss against its formula computed independently (plain Python math on floats)."""

from __future__ import annotations

import math

import pytest
import torch

from ipo_lightning.losses import ipo_target, preference_loss

# Four pairs with hand-picked log-probs: policy chosen, policy rejected, ref chosen, ref rejected.
PAIRS = [
    (-1.0, -2.0, -1.5, -1.5),
    (-3.0, -1.0, -2.0, -2.5),
    (-0.5, -0.5, -0.5, -0.5),
    (-2.0, -4.0, -1.0, -1.0),
]


def _tensors() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(col, dtype=torch.float64) for col in zip(*PAIRS, strict=True))


def _margin(pc: float, pr: float, rc: float, rr: float) -> float:
    return (pc - rc) - (pr - rr)


def _logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_matches_formula(beta: float) -> None:
    out = preference_loss(*_tensors(), loss_type="ipo", beta=beta)
    expected = [(_margin(*p) - 1 / (2 * beta)) ** 2 for p in PAIRS]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.margins.tolist() == pytest.approx([_margin(*p) for p in PAIRS])
    assert out.chosen_rewards.tolist() == pytest.approx([beta * (p[0] - p[2]) for p in PAIRS])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * (p[1] - p[3]) for p in PAIRS])
    assert out.targets.tolist() == pytest.approx([1 / (2 * beta)] * 4)


def test_ipo_soft_labels_and_ties() -> None:
    beta = 0.25
    probs = [1.0, 0.75, 0.5, 0.0]
    out = preference_loss(*_tensors(), loss_type="ipo", beta=beta, preference_prob=torch.tensor(probs))
    targets = [(2 * p - 1) / (2 * beta) for p in probs]
    assert targets[2] == 0.0  # a tie targets a zero margin
    expected = [(_margin(*pair) - t) ** 2 for pair, t in zip(PAIRS, targets, strict=True)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.targets.tolist() == pytest.approx(targets)
    assert float(ipo_target(beta)) == pytest.approx(2.0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_dpo_and_conservative_dpo_match_formula(smoothing: float) -> None:
    beta = 0.5
    out = preference_loss(*_tensors(), loss_type="dpo", beta=beta, label_smoothing=smoothing)
    expected = [
        -(1 - smoothing) * _logsigmoid(beta * _margin(*p)) - smoothing * _logsigmoid(-beta * _margin(*p))
        for p in PAIRS
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert math.isnan(out.targets[0].item())


def test_dpo_soft_label_is_per_pair_smoothing() -> None:
    beta = 1.0
    probs = [0.9, 0.6, 0.5, 1.0]
    out = preference_loss(*_tensors(), loss_type="dpo", beta=beta, preference_prob=torch.tensor(probs))
    expected = [
        -p * _logsigmoid(beta * _margin(*pair)) - (1 - p) * _logsigmoid(-beta * _margin(*pair))
        for pair, p in zip(PAIRS, probs, strict=True)
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)


def test_hinge_matches_formula() -> None:
    beta = 0.8
    out = preference_loss(*_tensors(), loss_type="hinge", beta=beta)
    assert out.losses.tolist() == pytest.approx([max(0.0, 1 - beta * _margin(*p)) for p in PAIRS])


def test_gradients_flow_to_policy_only() -> None:
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in _tensors())
    out = preference_loss(pc, pr, rc.detach(), rr.detach(), loss_type="ipo", beta=0.5)
    out.losses.sum().backward()
    # d/dpc (h - 1)^2 = 2 (h - 1); d/dpr = -2 (h - 1)
    expected = [2 * (_margin(*p) - 1.0) for p in PAIRS]
    assert pc.grad.tolist() == pytest.approx(expected)
    assert pr.grad.tolist() == pytest.approx([-g for g in expected])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "ipo", "beta": 0.0}, "beta must be positive"),
        ({"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.1}, "label_smoothing applies"),
        ({"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.6}, "label_smoothing must be"),
        ({"loss_type": "kto", "beta": 0.1}, "unknown loss_type"),
        ({"loss_type": "hinge", "beta": 0.1, "preference_prob": torch.full((4,), 0.5)}, "not defined"),
    ],
)
def test_invalid_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preference_loss(*_tensors(), **kwargs)
