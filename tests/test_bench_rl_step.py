"""The on-policy step benchmark's code, run for one step of every method on a tiny model (no timings
are asserted: only that every number is produced, consistent and positive)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import ipo_lightning.rl.module as on_policy
from ipo_lightning.generation import generate_completions
from ipo_lightning.rl.rollout import score_rows
from tests.helpers import benchmark_module, polite_pairs, write_jsonl


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("rl_step") as module:
        yield module


def _setup(bench: ModuleType, model_dir: Path, tmp_path: Path, **overrides: object):
    data = write_jsonl(tmp_path / "pairs.jsonl", polite_pairs(12))
    options = {
        "model": str(model_dir),
        "data": str(data),
        "pairs": 2,
        "k": 4,
        "max_new_tokens": 4,
        "generation_batch_size": 8,
        "max_length": 48,
        "max_prompt_length": 24,
        "warmup": 0,
        "steps": 1,
        "repeats": 1,
        "cache_dir": str(tmp_path / "cache"),
    }
    return bench.Setup(**{**options, **overrides})


def test_every_method_gives_positive_numbers_on_equal_completions(
    bench: ModuleType, tiny_model_dir: Path, tmp_path: Path
) -> None:
    setup = _setup(bench, tiny_model_dir, tmp_path)
    summaries = {s["method"]: s for s in bench.run(setup)}
    assert list(summaries) == ["ipo", "rloo", "online_ipo"]  # the baseline first
    for method, s in summaries.items():
        # 2 pairs = 4 completions; RLOO 1 prompt x 4; online 2 prompts x 2.
        assert s["completions_per_step"] == 4 and s["steps"] == 1, method
        assert s["step_s"] > 0 and s["completions_per_s"] > 0 and s["step_vs_ipo"] > 0, method
        assert s["step_cpu_s"] > 0 and s["cpu_vs_ipo"] > 0 and s["rounds"] == 1, method
        assert 1 <= s["tokens_per_completion"] <= (4 if method != "ipo" else 48), method  # max_new_tokens 4
        for phase in ("forward", "backward", "optimizer", "scoring"):
            assert s[f"{phase}_s"] > 0, (method, phase)
        # The hooks split the step exactly; the rollout's calls happen inside training_step.
        parts = s["forward_share"] + s["backward_share"] + s["optimizer_share"]
        assert parts == pytest.approx(1.0, abs=1e-6), method
        assert s["generate_s"] + s["reward_s"] + s["scoring_s"] <= s["forward_s"] + 1e-9, method
        assert s["scoring_backward_share"] == pytest.approx(s["scoring_share"] + s["backward_share"])
    assert summaries["ipo"]["step_vs_ipo"] == 1.0 and summaries["ipo"]["generate_s"] == 0.0
    assert summaries["ipo"]["scoring_s"] == summaries["ipo"]["forward_s"]
    for method in ("rloo", "online_ipo"):
        assert summaries[method]["generate_s"] > 0 and summaries[method]["reward_s"] > 0, method
        assert 0 < summaries[method]["generate_share"] < 1
        ratio = summaries[method]["completions_per_s"] / summaries["ipo"]["completions_per_s"]
        assert summaries[method]["completions_per_s_vs_ipo"] == pytest.approx(ratio)
    # The wrapped names are the product's own again after the run.
    assert on_policy.generate_completions is generate_completions and on_policy.score_rows is score_rows
    table = bench.markdown(list(summaries.values()), setup).splitlines()
    offline_cells = [cell.strip() for cell in table[2].split("|")[1:-1]]
    assert len(offline_cells) == 10 and offline_cells[5:8] == ["1.00x", "1.00x", "-"]
    assert len(table) == 5 and table[2].startswith("| offline IPO, 2 pairs |")
    assert table[3].startswith("| RLOO, 1 prompts x 4 |") and table[4].startswith(
        "| online IPO, 2 prompts x 2 |"
    )


def test_summary_takes_medians_and_shares_of_the_summed_steps(bench: ModuleType) -> None:
    records = []
    for step, generate in ((1.0, 0.5), (3.0, 1.0), (2.0, 0.5)):
        record = bench.StepRecord(completions=8, step=step, cpu=step / 2)
        record.phases.update(
            forward=0.5 * step, backward=0.25 * step, optimizer=0.25 * step, generate=generate
        )
        records.append(record)
    s = bench.summarize("rloo", records)
    assert s["steps"] == 3 and s["step_s"] == 2.0 and s["completions_per_s"] == 4.0 and s["step_cpu_s"] == 1.0
    assert s["generate_s"] == 0.5 and s["generate_share"] == pytest.approx(2.0 / 6.0)
    assert s["forward_share"] == pytest.approx(0.5) and s["backward_s"] == 0.5


def test_ratios_are_medians_of_same_round_ratios(bench: ModuleType) -> None:
    # rloo / ipo step time per round: 2.0, 4.0, 2.5 -> median 2.5 (the ratio of the medians: 4.0).
    ipo, rloo = [1.0, 1.0, 2.0], [2.0, 4.0, 5.0]
    rounds = [
        {
            "ipo": {"step_s": i, "step_cpu_s": i / 2, "completions_per_s": 64 / i},
            "rloo": {"step_s": r, "step_cpu_s": r, "completions_per_s": 64 / r},
        }
        for i, r in zip(ipo, rloo, strict=True)
    ]
    out = bench.with_ratios(rounds, {"method": "rloo", "step_s": 4.0})
    assert out["step_vs_ipo"] == 2.5 and out["cpu_vs_ipo"] == 5.0 and out["rounds"] == 3
    assert out["completions_per_s_vs_ipo"] == pytest.approx(0.4) and out["step_s"] == 4.0
    assert bench.with_ratios(rounds, {"method": "ipo"})["step_vs_ipo"] == 1.0
    assert [bench.round_order(["a", "b", "c"], k) for k in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_bad_setups_name_the_flag(bench: ModuleType, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--k 3 must divide 2 x --pairs \(4\)"):
        bench.check_setup(_setup(bench, tiny_model_dir, tmp_path, k=3))
    with pytest.raises(ValueError, match="--dtype must be one of"):
        bench.check_setup(_setup(bench, tiny_model_dir, tmp_path, dtype="float64"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch finds no CUDA device"):
            bench.check_setup(_setup(bench, tiny_model_dir, tmp_path, device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_flags_parse_and_fail_clearly_without_cuda(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda", "--dtype", "bfloat16", "--precision", "bf16-mixed"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch finds no CUDA device here" in capsys.readouterr().err
