"""Completion log-probs: the naive float32 log_softmax vs ipo_lightning's chunked version.

Both turn the same logits (the model's output, here random) into per-sequence completion log-probs
and backpropagate through them; the chunked mode goes through ``batch_scores``, the function
training uses, with a stand-in model that returns the logits. Peak memory is measured above the
logits and their gradient, each mode in its own fresh process on CPU (peak RSS) or with
``torch.cuda.max_memory_allocated`` on CUDA; time is the median of ``--repeats`` forward+backward
passes. One JSON line per mode, with ratios against the naive mode measured in the same run:

    python benchmarks/logprobs.py                       # CPU: 8 rows x 512 tokens x 32k vocab, float32
    python benchmarks/logprobs.py --device cuda --dtype bfloat16 --rows 8 --length 2048 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import get_args

import torch

from ipo_lightning.modeling import DType

MODES = ("naive", "chunked")


class _FixedLogits(torch.nn.Module):
    """Stands in for a causal LM: returns the given logits (honouring ``logits_to_keep``)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object
    ) -> SimpleNamespace:
        # A real model slices its hidden states, not the logits; the benchmark scores every position,
        # so the logits go out as they are (slicing would add a full-size gradient copy).
        assert int(kwargs.get("logits_to_keep", self.logits.shape[1])) == self.logits.shape[1]
        return SimpleNamespace(logits=self.logits)


def _naive(logits: torch.Tensor, input_ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-probs the usual way: a float32 log_softmax over every position."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logps * completion[:, 1:]).sum(-1)


def _chunked(
    logits: torch.Tensor, input_ids: torch.Tensor, completion: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Per-sequence log-probs through ipo_lightning's own path, exactly as training calls it."""
    from ipo_lightning.batching import batch_scores

    attention = torch.ones_like(input_ids)
    return batch_scores(_FixedLogits(logits), input_ids, attention, completion, chunk_size=chunk).sums


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args: argparse.Namespace) -> dict[str, float | str]:
    """Run one mode in this process and return its numbers."""
    torch.set_num_threads(args.threads)
    generator = torch.Generator(device=args.device).manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.rows, args.length, args.vocab)
    logits = torch.randn(shape, generator=generator, device=args.device, dtype=dtype).requires_grad_(True)
    input_ids = torch.randint(0, args.vocab, shape[:2], generator=generator, device=args.device)
    completion = torch.ones(shape[:2], dtype=torch.bool, device=args.device)
    completion[:, 0] = False  # a one-token prompt: every later position is scored

    def step() -> None:
        if args.mode == "naive":
            logps = _naive(logits, input_ids, completion)
        else:
            logps = _chunked(logits, input_ids, completion, args.chunk_size)
        logps.sum().backward()
        logits.grad = None

    # The floor every mode pays: the logits plus their gradient. Touch a gradient-sized buffer once
    # so the high-water mark includes it, then measure what each mode needs beyond that.
    floor = torch.ones_like(logits)
    del floor
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(args.device)
    if args.device == "cuda":  # the peak was reset: add the gradient both modes will allocate
        baseline += logits.numel() * logits.element_size()
    step()  # warm-up (allocator, kernels); its peak counts, as it is the same work
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    extra = _peak_bytes(args.device) - baseline
    return {
        "mode": args.mode,
        "seconds": statistics.median(times),
        "peak_extra_mb": extra / 2**20,
        "logits_mb": logits.numel() * logits.element_size() / 2**20,
    }


def main() -> None:
    """Parse flags; run each mode (in subprocesses on CPU) and print JSON lines with ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=get_args(DType))
    parser.add_argument("--rows", type=int, default=8, help="sequences (2 x pairs)")
    parser.add_argument("--length", type=int, default=512, help="scored tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk (chunked mode)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:  # child process: one mode
        print(json.dumps(measure(args)))
        return

    results = {}
    for mode in MODES:
        if args.device == "cuda":
            args.mode = mode
            results[mode] = measure(args)
            torch.cuda.empty_cache()
            continue
        # CPU: a fresh process per mode, so one mode's peak RSS cannot hide the other's.
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    naive = results["naive"]
    naive_extra = naive["peak_extra_mb"]
    for mode in MODES:
        row = dict(results[mode])
        row.update(
            device=args.device,
            dtype=args.dtype,
            shape=[args.rows, args.length, args.vocab],
            time_vs_naive=row["seconds"] / naive["seconds"],
            peak_extra_vs_naive=row["peak_extra_mb"] / naive_extra if naive_extra else None,
        )
        print(json.dumps(row))


if __name__ == "__main__":
    main()
