"""The throughput benchmark's workload and bookkeeping (not its timings: those are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ipo_lightning.data.collator import PairwiseCollator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201 - the benchmark script as a module
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


def test_summary_ratios_are_medians_of_same_round_ratios(bench) -> None:
    runs = []
    for round_index, (mine, base) in enumerate([(2.0, 1.0), (3.0, 1.0), (10.0, 8.0)]):
        for mode, rate in (("padded", mine), ("sft", base)):
            runs.append(
                {
                    "mode": mode,
                    "round": round_index,
                    "pairs_per_s": rate,
                    "tokens_per_s": rate,
                    "pairs_per_cpu_s": rate / 2,
                    "steps": 4,
                }
            )
            runs[-1]["peak_rss_mb"] = 100.0 * rate
    summary = {s["mode"]: s for s in bench._summaries(runs, ["sft", "padded"], repeats=3)}
    assert summary["padded"]["vs_sft"] == 2.0  # median of 2.0, 3.0 and 1.25
    assert summary["padded"]["pairs_per_s"] == 3.0 and summary["sft"]["vs_sft"] == 1.0
    assert summary["padded"]["cpu_vs_sft"] == 2.0 and summary["padded"]["rss_vs_sft"] == 2.0
