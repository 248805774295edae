"""The GPU benchmark's largest-batch search and ratio lines (its timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    benchmarks = str(REPO / "benchmarks")
    sys.path.insert(0, benchmarks)  # it imports its sibling throughput.py, as its workers do
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("throughput", None)
        sys.path.remove(benchmarks)


def _search(gpu: ModuleType, largest: int, *, start: int, cap: int, resolution: float) -> list[int]:
    """The batches a search tries against a device that fits at most ``largest`` pairs."""
    probes: list[dict] = []
    while (
        batch := gpu.next_probe(*gpu.search_state(probes), start=start, cap=cap, resolution=resolution)
    ) is not None:
        assert batch not in [p["batch"] for p in probes]  # never the same probe twice
        probes.append({"batch": batch, "fits": batch <= largest, "oom": batch > largest})
    return [p["batch"] for p in probes]


@pytest.mark.parametrize("largest", [1, 5, 25, 37, 100, 255])
def test_search_brackets_the_largest_batch_within_the_resolution(gpu: ModuleType, largest: int) -> None:
    tried = _search(gpu, largest, start=16, cap=256, resolution=0.25)
    probes = [{"batch": b, "fits": b <= largest, "oom": b > largest} for b in tried]
    lo, hi = gpu.search_state(probes)
    assert lo <= largest < hi and hi - lo <= max(1, int(lo * 0.25))
    assert len(tried) <= 10


def test_search_doubles_then_bisects_and_stops_at_the_cap(gpu: ModuleType) -> None:
    assert _search(gpu, 25, start=16, cap=256, resolution=0.25) == [16, 32, 24, 28]  # 24 fits, 28 does not
    assert _search(gpu, 25, start=16, cap=256, resolution=0.0) == [16, 32, 24, 28, 26, 25]
    assert _search(gpu, 5, start=16, cap=256, resolution=0.0) == [
        16,
        8,
        4,
        6,
        5,
    ]  # halving from a failing start
    assert _search(gpu, 1000, start=16, cap=100, resolution=0.25) == [16, 32, 64, 100]
    assert _search(gpu, 0, start=4, cap=256, resolution=0.25) == [4, 2, 1]  # nothing fits: max_batch 0
    assert _search(gpu, 1000, start=1, cap=2, resolution=0.25) == [1, 2]  # the CPU dry run's cap
    # An error is neither a fit nor an OOM: it never moves the bracket.
    assert gpu.search_state([{"batch": 8, "fits": False, "error": "x"}]) == (0, None)


def test_max_batch_ratios_name_their_baseline_and_mark_bounds(gpu: ModuleType) -> None:
    def result(mode: str, seq_len: int, max_batch: int, conclusive: bool = True) -> dict:
        return {"mode": mode, "seq_len": seq_len, "max_batch": max_batch, "conclusive": conclusive}

    lines = gpu.max_batch_lines(
        [
            result("default", 2048, 30),
            result("trl_ipo", 2048, 20),
            result("default", 4096, 12, conclusive=False),
            result("trl_ipo", 4096, 8),
            result("trl_ipo_liger", 4096, 0),
        ]
    )
    by_key = {(line["mode"], line["seq_len"]): line for line in lines}
    assert (
        by_key[("default", 2048)]["batch_vs_trl_ipo"] == 1.5
        and by_key[("trl_ipo", 2048)]["batch_vs_trl_ipo"] == 1
    )
    assert "batch_vs_trl_ipo_bound" not in by_key[("default", 2048)]
    assert (
        by_key[("default", 4096)]["batch_vs_trl_ipo"] == 1.5
        and by_key[("default", 4096)]["batch_vs_trl_ipo_bound"]
    )
    assert "batch_vs_trl_ipo_liger" not in by_key[("default", 4096)]  # nothing fitted there: no ratio


def test_a_probe_workload_has_whole_sequences_of_the_length(gpu: ModuleType) -> None:
    work = gpu.search_work(gpu.H200, 4096, 12)
    assert (work.prompt_max, work.completion_max, work.jitter) == (2048, 2048, 0.0)
    assert work.batch_size == 12 and work.warmup + work.steps == 2 and work.num_pairs == 24
    assert work.model == "qwen2.5-0.5b" and work.precision == "bf16" and work.unique_pairs == gpu.UNIQUE_PAIRS


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "trl_ipo"])
def test_a_probe_trains_two_steps_in_process(gpu: ModuleType, mode: str, tmp_path: Path) -> None:
    if mode == "trl_ipo":
        pytest.importorskip("trl")
    base = {**gpu.SMALL, "precision": "32"}
    work = gpu.search_work(base, 48, 2)
    _, unique = gpu.tp.prepare(gpu.search_work(base, 48, gpu.UNIQUE_PAIRS), tmp_path / "cache")
    model = gpu.tp.prepare_model(work, tmp_path / "cache")
    scratch = tmp_path / "probe"
    scratch.mkdir()
    out = gpu._probe(mode, work, model, unique, scratch)
    assert out["fits"] is True and "error" not in out and out["batch"] == 2, out
    assert len(json.loads((scratch / "clock.json").read_text())["marks"]) == 2
    lines = (scratch / "pairs.jsonl").read_text().splitlines()  # the unique pairs, repeated to 2 steps
    assert len(lines) == 4 and lines == (unique / "pairs.jsonl").read_text().splitlines()[:4]


def test_a_search_result_says_why_it_stopped(gpu: ModuleType) -> None:
    def probe(batch: int, fits: bool, **extra: object) -> dict:
        return {"batch": batch, "fits": fits, "oom": not fits and "error" not in extra, **extra}

    options = {"start": 16, "cap": 256, "resolution": 0.25}
    probes = [probe(16, True), probe(32, False), probe(24, True, peak_cuda_alloc_mb=9.0), probe(28, False)]
    done = gpu.search_result("default", 2048, probes, **options)
    assert (done["max_batch"], done["oom_at"], done["stopped"], done["conclusive"]) == (24, 28, None, True)
    assert done["peak_cuda_alloc_mb"] == 9.0 and not done["cap_reached"] and done["kind"] == "max_batch"
    cut = gpu.search_result("default", 2048, probes[:3], **options)  # 24 fits, 32 did not: 28 was next
    assert cut["stopped"] == "time budget" and not cut["conclusive"] and cut["max_batch"] == 24
    killed = gpu.search_result("default", 2048, probes[:3], **options, failure="search process failed")
    assert killed["stopped"] == "search process failed"
    failed = gpu.search_result("default", 2048, [probe(16, False, error="ValueError: x")], **options)
    assert failed["stopped"] == "probe failed: ValueError: x" and failed["max_batch"] == 0
    capped = gpu.search_result(
        "trl_ipo", 64, [probe(1, True), probe(2, True)], start=1, cap=2, resolution=0.25
    )
    assert capped["cap_reached"] and capped["conclusive"] and capped["oom_at"] is None
