"""GPU training throughput, peak CUDA memory and largest batch: ipo_lightning's ``fit`` against TRL (IPO).

Everything runs through :mod:`throughput`'s workload, modes and fresh-process runs (its docstring
lists how each framework runs and every changed default), on a random-init Qwen2 with Qwen2.5-0.5B's
shapes (``--model``; hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary
151936, tied embeddings; float32 weights, sdpa) and a BPE tokenizer trained offline (4096 tokens:
only the embedding's size costs anything). Both frameworks train with float32 weights under bf16
autocast (``trainer.precision: bf16-mixed``; TRL ``bf16=True``), fused AdamW, the same pairs and
the same pairs per step, and no end-of-run saving (``lean``: no checkpoint, export or W&B logger for
ipo_lightning; ``save_strategy="no"`` and TRL's ``report_to="none"`` default). ``max_length`` on
both sides holds every pair whole.

1. Throughput (``--modes``, ``--length`` tokens per sequence, prompt and completion half each,
   lengths drawn from the top quarter): ``tokens_per_s`` counts the real (non-pad) tokens of the
   chosen and rejected sequences, prompt in both, from the end of the warm-up steps to the end of the
   last step (the step clock synchronises the device at each mark); ``peak_cuda_alloc_mb`` and
   ``peak_cuda_reserved_mb`` are ``torch.cuda.max_memory_allocated``/``max_memory_reserved`` over
   the whole run. Summary lines add ``vs_trl_ipo`` (tokens/s ratio) and ``mem_vs_trl_ipo`` (peak
   allocated ratio) against TRL measured in the same call.
2. Largest batch (``--search-modes`` at each of ``--search-lengths``, every sequence that long, the
   same 16 pairs repeated): the most pairs per optimizer step that train 2 steps without running out
   of CUDA memory, found by doubling from ``--search-start`` pairs (at the first length; halved for
   each doubling of the length) and then bisecting until the gap to the smallest batch that ran out
   is at most ``--resolution`` of the batch (``max_batch`` fits, ``oom_at`` did not). Each mode's
   searches run in one fresh process that probes in-process (a new ``fit`` or ``DPOTrainer`` each
   probe, as a user retrying would), frees the memory after an out-of-memory error and checks that
   less than 1 GiB is left allocated; if not, a fresh process goes on with the same searches.
   ``--cap`` bounds a search (``cap_reached``). ``batch_vs_trl_ipo`` is the ratio of largest batches
   at the same length. A CPU has no out-of-memory signal: there (``--small``) the cap is 2 pairs,
   which checks the machinery, not memory.

``--budget-s`` caps the whole call (default 210 s): the throughput runs get at most half of what is
left after the preparation, each search process an equal share of the rest (each length within it
an equal share of that), and every process is killed at the end of its share. A run or search cut
short says so in its line (``failed``, ``stopped``, ``conclusive: false``).

    python benchmarks/gpu_throughput.py --out bench.jsonl           # H200 defaults
    python benchmarks/gpu_throughput.py --small --out small.jsonl   # tiny shapes on a CPU: a dry run

Output: one JSON line per event (``env``, ``run``, ``skipped``, ``failed``, ``probe``, ``max_batch``,
``summary``), printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the sibling module, importable as the workers import it)

H200 = {
    "model": "qwen2.5-0.5b",
    "vocab": 4096,
    "precision": "bf16",
    "lean": 1,
    "threads": 8,
    "batch_size": 8,
    "warmup": 2,
    "steps": 5,
    "lr": 1e-5,
}
"""The GPU workload: Qwen2.5-0.5B's shapes, bf16 mixed precision, 8 pairs per step, 2 warm-up and 5
timed steps (``--length`` sets the sequence length)."""
SMALL = {
    **H200,
    "model": "qwen2-small",
    "vocab": 1000,
    "threads": 2,
    "batch_size": 2,
    "warmup": 1,
    "steps": 2,
}
"""The same in miniature for a CPU dry run."""

UNIQUE_PAIRS = 16
"""Distinct pairs of a probe's data, repeated to its batch: every sequence is as long, so memory
does not depend on which pairs a step draws."""
LEAK_LIMIT_MB = 1024
"""CUDA memory still allocated after a probe and its clean-up that makes a fresh process continue."""
DIRTY_EXIT = 3
"""A search process's exit code when memory was not freed: the search goes on in a new process."""
BASELINES = ("trl_ipo", "trl_ipo_liger")
"""The modes every ratio line is against (``vs_<base>``, ``mem_vs_<base>``, ``batch_vs_<base>``)."""


# ---------------------------------------------------------------------------------- the search


def search_state(probes: list[dict[str, Any]]) -> tuple[int, int | None]:
    """The largest batch that fitted (0: none yet) and the smallest that ran out of memory (None: none)."""
    fits = [p["batch"] for p in probes if p["fits"]]
    ooms = [p["batch"] for p in probes if p.get("oom")]
    return max(fits, default=0), min(ooms, default=None)


def next_probe(lo: int, hi: int | None, *, start: int, cap: int, resolution: float) -> int | None:
    """The batch to try next, or None when the search is over.

    Doubling from ``start`` (halving when ``start`` fails) until a batch runs out of memory or
    ``cap`` fits, then bisecting until ``hi - lo <= max(1, lo * resolution)``.
    """
    if hi is None:
        if lo >= cap:
            return None
        return min(cap, 2 * lo) if lo else min(start, cap)
    if hi - lo <= max(1, int(lo * resolution)):
        return None
    return (lo + hi) // 2


def search_work(base: dict[str, Any], length: int, batch: int) -> tp.Workload:
    """A probe's workload: ``batch`` pairs per step, 2 optimizer steps, every sequence ``length`` tokens."""
    half = length // 2
    shape = {"prompt_max": half, "completion_max": length - half, "jitter": 0.0}
    return tp.Workload(
        **{**base, **shape, "batch_size": batch, "warmup": 1, "steps": 1, "unique_pairs": UNIQUE_PAIRS}
    )


def _is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # Kernels outside the caching allocator (cuBLAS workspaces, Triton) report it as a RuntimeError.
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "alloc_failed" in message)


def _fit_in_process(work: tp.Workload, run: tp.Run, batching: str | None) -> None:
    """``ipo_lightning fit`` with the benchmark's config, in this process (the CLI's own entry point)."""
    import yaml

    from ipo_lightning.cli import main

    config = run.scratch / "run.yaml"
    config.write_text(yaml.safe_dump(tp.cli_config(work, run, batching=batching, precomputed=False)))
    main(["fit", "--config", str(config)])


PROBES: dict[str, Callable[[tp.Workload, tp.Run], None]] = {
    "default": lambda work, run: _fit_in_process(work, run, batching=None),
    "padded": lambda work, run: _fit_in_process(work, run, batching="padded"),
    "trl_ipo": lambda work, run: tp._trl_worker(work, run, precompute=False),
    "trl_ipo_liger": lambda work, run: tp._trl_worker(work, run, precompute=False, liger=True),
}
"""The modes a search can probe: the same code as their :data:`throughput.MODES` runs, in-process."""


def _probe(mode: str, work: tp.Workload, model: Path, unique: Path, scratch: Path) -> dict[str, Any]:
    """Train ``work`` once in this process; whether it fitted, its peak memory, and the memory left after."""
    import torch

    lines = (unique / "pairs.jsonl").read_text().splitlines()
    pairs = scratch / "pairs.jsonl"
    pairs.write_text("".join(lines[i % len(lines)] + "\n" for i in range(work.num_pairs)))
    run = tp.Run(model=model, pairs=pairs, scratch=scratch)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out: dict[str, Any] = {"kind": "probe", "mode": mode, "batch": work.batch_size}
    try:
        PROBES[mode](work, run)
        marks = json.loads(run.clock.read_text())["marks"] if run.clock.exists() else []
        out["fits"] = len(marks) == work.warmup + work.steps
        if not out["fits"]:
            out["error"] = f"{len(marks)} of {work.warmup + work.steps} steps ran"
    except (Exception, SystemExit) as error:  # SystemExit: the CLI's exit on a bad config
        out["fits"] = False
        if _is_oom(error):
            out["oom"] = True
        else:
            out["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
    out["seconds"] = round(time.perf_counter() - start, 2)
    gc.collect()  # the trainer, model and optimizer of the probe (and an error's traceback) form cycles
    if torch.cuda.is_available():
        out["peak_cuda_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        torch.cuda.empty_cache()
        out["left_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    return out


def search_worker(args: argparse.Namespace) -> None:
    """Run the searches of ``args.plan`` (one per length) for mode ``args.search_worker``, in turn.

    Each gets an equal share of the time left before ``args.deadline`` (what one leaves goes to the
    next) and ends when :func:`next_probe` says so, a probe fails otherwise than by running out of
    memory, or its share is spent. The probes so far are read from (and each new one appended to)
    the search's ``probes`` file, so a fresh process started after a leak (exit :data:`DIRTY_EXIT`)
    goes on where this one stopped.
    """
    import torch

    base = json.loads(args.base)
    torch.manual_seed(base.get("seed", 0))
    plan = json.loads(args.plan)
    for index, search in enumerate(plan):
        probes_file = Path(search["probes"])
        deadline = time.time() + (args.deadline - time.time()) / (len(plan) - index)
        last_seconds = 0.0
        # No probe starts that would likely not end in the share (the parent kills at args.deadline).
        while time.time() + 1.5 * last_seconds < deadline:
            done = _read_lines(probes_file)
            lo, hi = search_state(done)
            batch = next_probe(lo, hi, start=search["start"], cap=args.cap, resolution=args.resolution)
            if batch is None or any("error" in p for p in done):
                break
            work = search_work(base, search["length"], batch)
            with tempfile.TemporaryDirectory(prefix=f"probe-{args.search_worker}-") as scratch:
                result = _probe(
                    args.search_worker, work, Path(args.model), Path(search["unique"]), Path(scratch)
                )
            result["seq_len"] = search["length"]
            last_seconds = result["seconds"]
            with probes_file.open("a") as file:
                file.write(json.dumps(result) + "\n")
            if result.get("left_allocated_mb", 0) > LEAK_LIMIT_MB:
                sys.exit(DIRTY_EXIT)


# ------------------------------------------------------------------------------------ driver


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Output:
    """JSON lines, printed and appended to ``path`` as they come (a run cut short keeps what it has)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, line: dict[str, Any]) -> None:
        """Print ``line`` and append it to the file."""
        text = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in line.items()})
        print(text, flush=True)
        with self.path.open("a") as file:
            file.write(text + "\n")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "accelerate", "trl", "liger-kernel", "datasets"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _gpu() -> str:
    """The GPU as nvidia-smi names it (no CUDA context in this process: the runs get all the memory)."""
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or "none"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def max_batch_lines(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``batch_vs_<base>``: each search's largest batch over the baseline's at the same length.

    Left out where either search has no batch that fitted; ``bound`` marks a ratio where a side hit
    the cap or stopped before its resolution (then the ratio is a bound, not a measurement).
    """
    by_key = {(r["mode"], r["seq_len"]): r for r in results}
    out = []
    for result in results:
        line = dict(result)
        for base in BASELINES:
            other = by_key.get((base, result["seq_len"]))
            if other is None or not other["max_batch"] or not result["max_batch"]:
                continue
            line[f"batch_vs_{base}"] = round(result["max_batch"] / other["max_batch"], 3)
            if not (result["conclusive"] and other["conclusive"]):
                line[f"batch_vs_{base}_bound"] = True
        out.append(line)
    return out


def _search(
    mode: str, lengths: list[int], args: argparse.Namespace, base: dict[str, Any], model: Path, seconds: float
) -> list[dict[str, Any]]:
    """The largest-batch searches of ``mode`` at each length, in one fresh process (a new one after a
    leak), within ``seconds``; one ``max_batch`` line per length."""
    deadline = time.time() + seconds
    with tempfile.TemporaryDirectory(prefix=f"search-{mode}-") as scratch:
        plan = []
        for length in lengths:
            unique_work = dataclasses.replace(search_work(base, length, UNIQUE_PAIRS), warmup=0, steps=1)
            _, unique = tp.prepare(unique_work, args.cache)
            start = max(1, args.search_start * lengths[0] // length)
            plan.append(
                {
                    "length": length,
                    "unique": str(unique),
                    "start": start,
                    "probes": f"{scratch}/{length}.jsonl",
                }
            )
        failure = None
        for _ in range(4):  # fresh processes: at most 3 after a leak
            command = [
                sys.executable, __file__, "--search-worker", mode, "--plan", json.dumps(plan),
                "--model", str(model), "--base", json.dumps(base), "--deadline", str(deadline),
                "--cap", str(args.cap), "--resolution", str(args.resolution),
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    command,
                    env=tp.run_environment(search_work(base, lengths[0], 1), Path(scratch)),
                    cwd=scratch,
                    capture_output=True,
                    text=True,
                    timeout=max(1.0, deadline - time.time()),
                )
            except subprocess.TimeoutExpired:
                failure = "time budget (a probe was cut)"
                break
            if result.returncode == DIRTY_EXIT:
                continue
            if result.returncode != 0:
                failure = f"search process failed (exit {result.returncode}): {result.stderr[-1500:]}"
            break
        found = [_read_lines(Path(search["probes"])) for search in plan]
    return [
        search_result(
            mode,
            search["length"],
            probes,
            start=search["start"],
            cap=args.cap,
            resolution=args.resolution,
            failure=failure,
        )
        for search, probes in zip(plan, found, strict=True)
    ]


def search_result(
    mode: str,
    length: int,
    probes: list[dict[str, Any]],
    *,
    start: int,
    cap: int,
    resolution: float,
    failure: str | None = None,
) -> dict[str, Any]:
    """The ``max_batch`` line of one search from its probes.

    ``stopped`` says why a search ended before :func:`next_probe` would have (a probe's error, the
    search process's ``failure``, the time budget); ``conclusive`` is true when it did not and a batch
    ran out of memory or the cap fitted.
    """
    lo, hi = search_state(probes)
    errors = [p["error"] for p in probes if "error" in p]
    stopped = None
    if errors:
        stopped = f"probe failed: {errors[0]}"
    elif next_probe(lo, hi, start=start, cap=cap, resolution=resolution) is not None:
        stopped = failure or "time budget"
    fitted = [p for p in probes if p["fits"] and p["batch"] == lo]
    return {
        "kind": "max_batch",
        "mode": mode,
        "seq_len": length,
        "max_batch": lo,
        "oom_at": hi,
        "cap": cap,
        "cap_reached": lo >= cap,
        "conclusive": stopped is None and (hi is not None or lo >= cap),
        "peak_cuda_alloc_mb": fitted[0].get("peak_cuda_alloc_mb") if fitted else None,
        "probes": probes,
        "stopped": stopped,
        "leaks": sum(1 for p in probes if p.get("left_allocated_mb", 0) > LEAK_LIMIT_MB),
    }


def main(argv: list[str] | None = None) -> None:
    """Throughput runs, then largest-batch searches, within ``--budget-s``; JSON lines to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.jsonl"))
    parser.add_argument("--small", action="store_true", help="tiny shapes and lengths: a CPU dry run")
    parser.add_argument("--budget-s", type=float, help="wall-clock cap of the call (default 210; 900 small)")
    parser.add_argument("--modes", default="default,trl_ipo,trl_ipo_liger", help="throughput modes")
    parser.add_argument("--length", type=int, help="tokens per sequence of the throughput runs (2048)")
    parser.add_argument("--search-modes", default="default,trl_ipo", help="modes of the batch search")
    parser.add_argument("--search-lengths", help="comma-separated tokens per sequence (2048,4096)")
    parser.add_argument(
        "--search-start", type=int, help="first probe at the first search length, scaled by length (16)"
    )
    parser.add_argument("--cap", type=int, help="most pairs a search tries (256; 2 small)")
    parser.add_argument("--resolution", type=float, default=0.25, help="stop when the gap <= this x batch")
    parser.add_argument("--precision", help="32 or bf16 (default bf16)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ipo_lightning_gpu_bench")
    for hidden in ("--search-worker", "--model", "--plan", "--base"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.search_worker:
        search_worker(args)
        return
    started = time.time()
    small = args.small
    base = dict(SMALL if small else H200)
    if args.precision:
        base["precision"] = args.precision
    budget = args.budget_s or (900.0 if small else 210.0)
    length = args.length or (128 if small else 2048)
    lengths = [int(x) for x in (args.search_lengths or ("64,128" if small else "2048,4096")).split(",") if x]
    args.cap = args.cap or (2 if small else 256)
    args.search_start = args.search_start or (1 if small else 16)
    out = Output(args.out)
    out.write(
        {"kind": "env", "date": time.strftime("%Y-%m-%d"), "gpu": _gpu(), **_versions(), "small": small}
    )

    half = length // 2
    work = tp.Workload(**base, prompt_max=half, completion_max=length - half)
    model, data = tp.prepare(work, args.cache)
    out.write({"kind": "prepared", "model": work.model, "seconds": round(time.time() - started, 1)})

    # Throughput: each mode once, in a fresh process; at most half of what is left goes to them.
    modes = [m for m in args.modes.split(",") if m]
    throughput_end = time.time() + (budget - (time.time() - started)) / 2
    runs: list[dict[str, Any]] = []
    for index, mode in enumerate(modes):
        reason = tp.unavailable(mode)
        if reason:
            out.write({"kind": "skipped", "mode": mode, "reason": reason})
            continue
        left = throughput_end - time.time()
        if left < 10:
            out.write({"kind": "skipped", "mode": mode, "reason": "time budget"})
            continue
        # A run that hangs leaves 25 s to each one after it (or an equal share, if more).
        later = len(modes) - index - 1
        timeout = max(left - 25 * later, left / (later + 1))
        try:
            result = tp.run_once(mode, work, model, data, timeout=timeout)
        except tp.RunFailed as error:
            out.write({"kind": "failed", "mode": mode, "error": str(error)[-3000:]})
            continue
        result.update(kind="run", round=0, seq_len=length, batch_size=work.batch_size)
        runs.append(result)
        out.write(result)

    # Largest batch: each mode at every length, one process per mode, an equal share of what is left each.
    search_modes = [m for m in args.search_modes.split(",") if m]
    results = []
    for index, mode in enumerate(search_modes):
        reason = tp.unavailable(mode) or (None if mode in PROBES else f"no probe for mode {mode}")
        share = (budget - (time.time() - started)) / (len(search_modes) - index)
        if reason or share < 10:
            out.write(
                {"kind": "skipped", "mode": mode, "seq_len": lengths, "reason": reason or "time budget"}
            )
            continue
        results.extend(_search(mode, lengths, args, base, model, share))
    for line in max_batch_lines(results):
        out.write(line)
    for summary in tp._summaries(runs, [r["mode"] for r in runs], 1, baselines=BASELINES):
        out.write(summary)
    out.write({"kind": "done", "seconds": round(time.time() - started, 1), "budget_s": budget})


if __name__ == "__main__":
    main()
