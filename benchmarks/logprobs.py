"""Completion log-probs: the naive float32 log_softmax vs ipo_lightning's chunked version.

Both compute ``log softmax(logits)[labels]`` and backpropagate through it, from the same logits (the
model's output, here random). Peak memory is measured above the logits and their gradient, each mode in its
own fresh process on CPU (peak RSS) or with ``torch.cuda.max_memory_allocated`` on CUDA; time is the
median of ``--repeats`` forward+backward passes. One JSON line per mode, with ratios against the
naive mode measured in the same run:

    python benchmarks/logprobs.py                       # CPU: 8 rows x 512 tokens x 32k vocab, float32
    python benchmarks/logprobs.py --device cuda --dtype bfloat16 --rows 16 --length 2048 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("naive", "chunked")


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def _chunked(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    from ipo_lightning.logprobs import token_logprobs

    return token_logprobs(logits, labels, chunk_size=chunk_size)


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
    labels = torch.randint(0, args.vocab, shape[:2], generator=generator, device=args.device)
    weights = torch.randn(shape[:2], generator=generator, device=args.device)

    def step() -> None:
        if args.mode == "naive":
            token_logps = _naive(logits, labels)
        else:
            token_logps = _chunked(logits, labels, args.chunk_size)
        (token_logps * weights).sum().backward()
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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
