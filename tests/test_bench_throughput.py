"""The throughput benchmark's workload and bookkeeping (not its timings: those are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ipo_lightning.data.collator import PairwiseCollator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_registry_holds_the_issue_modes(bench) -> None:
    assert {"sft", "padded", "padding_free", "prefix_shared", "trl_ipo", "trl_ipo_precompute"} <= set(
        bench.MODES
    )
    assert bench.MODES["trl_ipo"].needs == "trl" and bench.MODES["padded"].needs is None


def test_workload_pairs_have_the_requested_lengths(bench, tmp_path: Path) -> None:
    work = bench.Workload(hidden=32, layers=1, heads=2, vocab=600, prompt_max=12, completion_max=20, steps=1)
    folder = bench.prepare(work, tmp_path)
    config = json.loads((folder / "model" / "config.json").read_text())
    pairs = json.loads((folder / "pairs.json").read_text())
    assert config["vocab_size"] == 600 and config["hidden_size"] == 32
    assert len(pairs) == work.batch_size * (work.warmup + work.steps)
    eos = config["eos_token_id"]
    for pair in pairs:
        assert 9 <= len(pair["prompt_ids"]) <= 12  # 25% jitter below the maximum
        for key in ("chosen_ids", "rejected_ids"):
            assert 15 <= len(pair[key]) <= 20 and pair[key][-1] == eos
    assert bench.prepare(work, tmp_path) == folder  # cached by the workload's key
    # tokens_per_s counts the 2B sequences' real tokens: what the padded batch's attention mask holds.
    batch = PairwiseCollator(pad_token_id=0)(pairs[:3])
    assert bench._real_tokens(pairs[:3]) == int(batch["attention_mask"].sum())


def test_summary_ratios_are_medians_of_step_by_step_ratios(bench) -> None:
    # Two rounds of two timed steps; padded's step k runs beside sft's step k on the same batch.
    sft_steps = [[1.0, 2.0], [4.0, 1.0]]
    padded_steps = [[2.0, 2.0], [2.0, 4.0]]  # step-time ratios sft/padded: 0.5, 1.0, 2.0, 0.25
    runs = []
    for round_index in range(2):
        for mode, steps in (("sft", sft_steps[round_index]), ("padded", padded_steps[round_index])):
            wall = sum(steps)
            runs.append(
                {
                    "mode": mode,
                    "round": round_index,
                    "pairs_per_s": 16 / wall,
                    "tokens_per_s": 1600 / wall,
                    "pairs_per_cpu_s": 8 / wall,
                    "peak_rss_mb": 100.0 * wall,
                    "steps": 2,
                    "step_wall_s": steps,
                    "step_cpu_s": [2 * t for t in steps],
                }
            )
    summary = {s["mode"]: s for s in bench._summaries(runs, ["sft", "padded"], repeats=2)}
    assert summary["padded"]["vs_sft"] == 0.75  # median of 0.25, 0.5, 1.0, 2.0
    assert summary["padded"]["cpu_vs_sft"] == 0.75
    assert summary["sft"]["vs_sft"] == 1.0 and summary["padded"]["steps"] == 4
    assert summary["padded"]["pairs_per_s"] == round((16 / 4 + 16 / 6) / 2, 2)  # median over rounds
    assert summary["padded"]["rss_vs_sft"] == round((4 / 3 + 6 / 5) / 2, 3)
