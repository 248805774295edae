"""The throughput benchmark's workload and bookkeeping (not its timings: those are never asserted)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from tests.helpers import REPO, benchmark_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with benchmark_module("throughput") as module:
        yield module


def test_registry_holds_every_mode_and_the_default_list(bench) -> None:
    expected = {"sft", "default", "padded", "padding_free", "prefix_shared", "precomputed"}
    assert expected | {"trl_ipo", "trl_ipo_precompute"} <= set(bench.MODES)
    assert set(bench.DEFAULT_MODES) <= set(bench.MODES) and set(bench.BASELINES) <= set(bench.DEFAULT_MODES)
    assert bench.MODES["trl_ipo"].needs == ("trl",) and bench.MODES["default"].needs == ()
    assert bench.MODES["trl_ipo_liger"].needs == ("trl", "liger_kernel") and bench.MODES["trl_ipo_liger"].cuda
    assert bench.unavailable("default") is None
    # What this machine lacks for the liger mode: its packages first (CI installs neither), then CUDA.
    missing = [name for name in ("trl", "liger_kernel") if importlib.util.find_spec(name) is None]
    if missing:
        expected = f"{', '.join(missing)} not installed"
    else:
        expected = None if torch.cuda.is_available() else "needs a CUDA device"
    assert bench.unavailable("trl_ipo_liger") == expected


def test_workload_pairs_are_text_of_the_requested_token_lengths(bench, tmp_path: Path) -> None:
    work = bench.Workload(hidden=32, layers=1, heads=2, vocab=600, prompt_max=12, completion_max=20, steps=1)
    model, folder = bench.prepare(work, tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert config["vocab_size"] == 600 and config["hidden_size"] == 32
    pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    lengths = json.loads((folder / "lengths.json").read_text())
    assert len(pairs) == len(lengths) == work.batch_size * (work.warmup + work.steps)
    tokenizer = AutoTokenizer.from_pretrained(model)
    for pair, (prompt, chosen, rejected) in zip(pairs, lengths, strict=True):
        encoded = [len(tokenizer(pair[k], add_special_tokens=False)["input_ids"]) for k in pair]
        assert encoded == [prompt, chosen - 1, rejected - 1]  # completions: + EOS, as ipo_lightning adds it
        # At most prompt_max / completion_max tokens; a whole word more can overshoot the lower bound.
        assert 1 <= prompt <= 12 and 2 <= chosen <= 20 and 2 <= rejected <= 20
        assert pair["chosen"].startswith(" ") and pair["rejected"].startswith(" ")
    assert sum(prompt >= 9 for prompt, _, _ in lengths) >= len(lengths) // 2  # mostly within the jitter
    assert bench.real_tokens(lengths[:2]) == sum(2 * p + c + r for p, c, r in lengths[:2])
    assert bench.prepare(work, tmp_path) == (model, folder)  # cached by the workload's key
    # Another length shares the model; repeated pairs are the first ones again.
    repeated = bench.Workload(**{**vars(work), "prompt_max": 10, "unique_pairs": 3})
    model_again, other = bench.prepare(repeated, tmp_path)
    assert model_again == model and other != folder
    lines = (other / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == repeated.num_pairs and len(set(lines)) == 3 and lines[3:6] == lines[:3]


def test_qwen2_shape_is_built_as_named(bench, tmp_path: Path) -> None:
    work = bench.Workload(model="qwen2-small", vocab=600, prompt_max=12, completion_max=20, steps=1)
    model, _ = bench.prepare(work, tmp_path)
    config = json.loads((model / "config.json").read_text())
    shape = bench.QWEN2_SHAPES["qwen2-small"]
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == shape["num_key_value_heads"] == 2
    assert config["vocab_size"] == shape["vocab_size"] > len(AutoTokenizer.from_pretrained(model)) == 600
    with pytest.raises(ValueError, match="--model 'gpt9'"):
        bench.prepare_model(bench.Workload(model="gpt9"), tmp_path)


def test_cli_config_is_a_valid_fit_config(
    bench, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipo_lightning.cli import main

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as run_environment's PYTHONPATH does

    run = bench.Run(model=tmp_path / "model", pairs=tmp_path / "pairs.jsonl", scratch=tmp_path / "scratch")
    for batching, precomputed, lean in ((None, False, 0), ("padded", True, 1)):
        work = bench.Workload(steps=5, lean=lean, precision="bf16" if lean else "32")
        config = bench.cli_config(work, run, batching=batching, precomputed=precomputed)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["batching"] == (batching or "auto")  # the default, unless a mode names one
        assert printed["model"]["reference"] == ("precomputed" if precomputed else None)
        assert printed["trainer"]["max_steps"] == 7 and printed["data"]["batch_size"] == 8
        assert printed["data"]["max_length"] == 48 + 80 and printed["data"]["max_prompt_length"] is None
        assert printed["trainer"]["precision"] == ("bf16-mixed" if lean else None)
        assert printed["trainer"]["enable_checkpointing"] is (False if lean else None)
        assert printed["export"]["enabled"] is (not lean) and printed["wandb"]["enabled"] is (not lean)
        (clock,) = printed["trainer"]["callbacks"]
        assert clock["class_path"] == "step_clock.LightningStepClock"
        assert clock["init_args"]["out"] == str(run.clock)


def test_a_run_is_timed_from_the_last_warm_up_step(bench) -> None:
    work = bench.Workload(batch_size=4, warmup=2, steps=3)
    lengths = [[10, 20, 30]] * 20  # 70 tokens per pair
    marks = [[1.0, 10.0], [2.0, 11.0], [4.0, 13.0], [5.0, 15.0], [8.0, 17.0]]  # (wall, cpu) step ends
    out = bench.summarize_run("m", work, lengths, {"marks": marks, "peak_rss_mb": 123.0})
    assert out["pairs_per_s"] == 12 / (8.0 - 2.0) and out["pairs_per_cpu_s"] == 12 / (17.0 - 11.0)
    assert out["tokens_per_s"] == 12 * 70 / 6.0 and out["peak_rss_mb"] == 123.0
    assert out["step_wall_s"] == [2.0, 1.0, 3.0] and out["steps"] == 3 and "peak_cuda_alloc_mb" not in out
    cuda = {"device": "GPU", "peak_cuda_alloc_mb": 5.0, "peak_cuda_reserved_mb": 6.0}
    out = bench.summarize_run("m", work, lengths, {"marks": marks, "peak_rss_mb": 1.0, **cuda})
    assert {k: out[k] for k in cuda} == cuda
    with pytest.raises(ValueError, match="m: 4 steps ran, expected 5"):
        bench.summarize_run("m", work, lengths, {"marks": marks[:4], "peak_rss_mb": 1.0})


def test_summary_ratios_are_medians_of_same_round_ratios(bench) -> None:
    # Three rounds; padded against sft in each: pairs/s ratios 0.5, 2.0, 0.8 -> median 0.8.
    speeds = {"sft": [4.0, 2.0, 5.0], "padded": [2.0, 4.0, 4.0]}
    runs = [
        {
            "mode": mode,
            "round": k,
            "pairs_per_s": speed,
            "tokens_per_s": 100 * speed,
            "pairs_per_cpu_s": speed / 2,
            "peak_rss_mb": 1000.0 + 100 * k + (50 if mode == "padded" else 0),
            "steps": 5,
        }
        for mode, by_round in speeds.items()
        for k, speed in enumerate(by_round)
    ]
    summary = {s["mode"]: s for s in bench._summaries(runs, ["sft", "padded"], repeats=3)}
    assert summary["padded"]["vs_sft"] == 0.8 and summary["padded"]["cpu_vs_sft"] == 0.8
    assert summary["padded"]["rss_vs_sft"] == round(
        1150 / 1100, 3
    )  # median of 1050/1000, 1150/1100, 1250/1200
    assert summary["padded"]["pairs_per_s"] == 4.0 and summary["padded"]["steps"] == 15
    assert summary["sft"]["vs_sft"] == 1.0 and "vs_trl_ipo" not in summary["padded"]
    assert "mem_vs_sft" not in summary["padded"]  # no CUDA numbers in these runs
    for r in runs:
        r["peak_cuda_alloc_mb"] = 300.0 if r["mode"] == "padded" else 100.0 * (r["round"] + 1)
    summary = {s["mode"]: s for s in bench._summaries(runs, ["sft", "padded"], 3, baselines=("sft",))}
    assert summary["padded"]["mem_vs_sft"] == 1.5  # median of 3, 1.5, 1
    assert summary["padded"]["peak_cuda_alloc_mb"] == 300.0 and "vs_padded" not in summary["sft"]
    # A round a mode did not finish is left out of its ratios.
    partial = [r for r in runs if (r["mode"], r["round"]) != ("padded", 2)]
    assert bench._summaries(partial, ["sft", "padded"], repeats=3)[1]["vs_sft"] == round((0.5 + 2.0) / 2, 3)


def test_rounds_run_every_mode_once_in_rotating_order(bench) -> None:
    modes = ["a", "b", "c"]
    assert [bench.round_order(modes, k) for k in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
