"""The judging logic of the GPU check scripts (the runs themselves need a GPU or minutes of CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from scripts.gpu_check_packing import leaked_rows, make_rows, token_bound
from scripts.gpu_check_scale import BF16_UNIT_ROUNDOFF, Setup, compare_with_ddp


def _setup(loss_rtol: float) -> Setup:
    return Setup(
        "qwen", Path("m"), Path("t"), 4, "bf16-mixed", "torch.optim.Adam", 1e-4, 64, 32, 8,
        loss_rtol, 4 * BF16_UNIT_ROUNDOFF, 4 * BF16_UNIT_ROUNDOFF, False,
    )  # fmt: skip


def _result(losses: list[float], kl0: float = 0.0, entropy0: float = 8.0) -> dict:
    steps = {"0": {"divergence/kl": kl0, "divergence/entropy": entropy0}, "4": {"divergence/kl": 0.5}}
    return {"ok": True, "problems": [], "losses": losses, "divergence": steps}


def test_loss_gap_is_judged_against_the_starting_loss_once_the_loss_nears_zero() -> None:
    ddp = [1.0, 0.4, 0.02, 0.002]
    close = [1.0, 0.41, 0.03, 0.004]  # 0.004 vs 0.002 is 100% of the step's loss, 0.2% of the start
    far = [1.0, 0.6, 0.02, 0.002]
    results = {"ddp": _result(ddp), "fsdp": _result(close), "deepspeed_zero2": _result(far)}
    compare_with_ddp(results, _setup(0.07))
    assert results["ddp"]["ok"] and results["fsdp"]["ok"], results["fsdp"]["problems"]
    assert math.isclose(results["fsdp"]["max_rel_loss_gap_vs_ddp"], 0.01)
    assert not results["deepspeed_zero2"]["ok"]
    assert "departs from DDP's" in results["deepspeed_zero2"]["problems"][0]


def test_a_loss_that_barely_moves_fails_ddp_and_step0_divergence_is_compared_only() -> None:
    results = {
        "ddp": _result([1.0, 0.95, 0.9]),
        "fsdp": _result([1.0, 0.95, 0.9], kl0=0.1),
        "deepspeed_zero3": {**_result([1.0, 0.95, 0.9]), "divergence": None},
    }
    results["fsdp"]["divergence"]["4"]["divergence/kl"] = 9.0  # later steps: logged, not compared
    compare_with_ddp(results, _setup(0.07))
    assert not results["ddp"]["ok"] and "could not fail" in results["ddp"]["problems"][0]
    assert results["fsdp"]["problems"] == ["step-0 divergence/kl 0.1 vs DDP's 0"]
    assert results["fsdp"]["divergence_steps_compared"] == [0]
    assert results["deepspeed_zero3"]["ok"]  # the monitor is off under ZeRO-3


def test_leaked_rows_put_the_previous_sequence_before_each_one_unscored() -> None:
    ids, attention, completion = make_rows(2, 40, 100, pad_id=0)
    leaked, mask, scored = leaked_rows(ids, attention, completion)
    lengths = attention.sum(-1).tolist()
    for row in range(4):
        before, own = lengths[row - 1], lengths[row]
        assert torch.equal(leaked[row, :before], ids[row - 1, :before])
        assert torch.equal(leaked[row, before : before + own], ids[row, :own])
        assert mask[row].sum() == before + own
        assert torch.equal(scored[row, before : before + own], completion[row, :own])
        assert not scored[row, :before].any()
    assert sorted(lengths) == [10, 20, 30, 40]


def test_token_bound_grows_with_depth_and_logits() -> None:
    # 24 layers: 2 (sqrt(50) + 1) u ~ 0.063 per unit of the largest logit
    assert math.isclose(token_bound(1.0, 24), 2 * (math.sqrt(50) + 1) / 256)
    assert token_bound(2.0, 24) == 2 * token_bound(1.0, 24)
