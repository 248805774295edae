"""Sampling speed of the generation evaluation against plain per-prompt ``model.generate``.

Both sample ``--k`` completions (temperature 1, full softmax) for each of the first ``--prompts``
held-out prompts of the gold task (``builtin:gold`` model, ``val`` prompts), in the same process on
the same prompts:

- ``batched``: :func:`ipo_lightning.generation.generate_completions`, every (prompt, sample) row
  left-padded into batches of ``--batch_size`` with the KV cache (what ``--generation.*`` and
  ``evaluate`` run);
- ``per_prompt``: one ``model.generate(do_sample=True, top_k=0, num_return_sequences=k)`` call per
  prompt, the way a user would write it.

Prints one JSON line per mode (samples/s, median of ``--repeats`` rounds) and the ratio::

    OMP_NUM_THREADS=1 python benchmarks/generation.py                 # CPU, one thread
    python benchmarks/generation.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.generation import generate_completions
from ipo_lightning.gold.language import split_requests
from ipo_lightning.gold.pairs import MAX_NEW_TOKENS
from ipo_lightning.modeling import load_causal_lm


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batched(model, tokenizer, prompt_ids: list[list[int]], args: argparse.Namespace) -> int:
    """The evaluation's generation; returns the number of generated tokens."""
    drawn = generate_completions(
        model, tokenizer, prompt_ids, k=args.k, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    return sum(len(c.token_ids) for row in drawn for c in row)


def per_prompt(model, tokenizer, prompt_ids: list[list[int]], args: argparse.Namespace) -> int:
    """One ``generate`` call per prompt with ``num_return_sequences=k``; returns the generated tokens."""
    tokens = 0
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], device=model.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            num_return_sequences=args.k,
            max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        generated = output[:, input_ids.shape[1] :]
        tokens += int((generated != tokenizer.pad_token_id).sum())
    return tokens


def main() -> None:
    """Time both modes and print their samples/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_causal_lm("builtin:gold").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:gold"))
    prompt_ids = [tokenizer(r.text)["input_ids"] for r in split_requests("val")[: args.prompts]]
    samples = args.prompts * args.k
    rates = {}
    for name, run in (("batched", batched), ("per_prompt", per_prompt)):
        seconds, tokens = [], 0
        with torch.inference_mode():
            run(model, tokenizer, prompt_ids[:2], args)  # warm-up
            for _ in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                tokens = run(model, tokenizer, prompt_ids, args)
                _sync(args.device)
                seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        rates[name] = samples / median
        record = {
            "mode": name,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "samples": samples,
            "mean_tokens": tokens / samples,
            "seconds": round(median, 3),
            "samples_per_s": round(rates[name], 1),
        }
        print(json.dumps(record), flush=True)
    print(json.dumps({"batched_over_per_prompt": round(rates["batched"] / rates["per_prompt"], 2)}))


if __name__ == "__main__":
    main()
