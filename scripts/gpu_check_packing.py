"""GPU check of ``model.batching: padding_free`` against ``padded`` in bf16. One JSON line each.

On a random-init Qwen2 with Qwen2.5-0.5B's shapes in bf16 (``GPU_CHECK_SMALL=1``: a small Qwen2, for a
CPU dry run), 4 pairs (8 rows) of different lengths up to 1024 tokens are scored both ways, and
every completion token's log-prob must agree within a bound derived for bf16 (below):

- ``packing/sdpa``: packed rows with sdpa (first-fit-decreasing rows, block-diagonal masks);
- ``packing/flash_attention_2``: everything in one row with flash-attention's varlen kernel, against
  the sdpa padded scores; ``{"skipped": "flash_attn is not installed"}`` without the package.

Each line also gives ``leak_effect``: how far the same tokens' log-probs move when each sequence
instead sees the previous one before it (what packing without boundaries would do). A bound above
it could not catch a leak: ``can_fail`` says whether it is below.

Run by ``scripts/gpu_check.sh``; alone: ``PYTHONPATH=. python scripts/gpu_check_packing.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.gpu_check_scale import ACCELERATOR, BF16_UNIT_ROUNDOFF, OUT, SMALL, save_qwen_model  # noqa: E402


def make_rows(pairs: int, max_length: int, vocab: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """The collator's ``2 * pairs`` right-padded rows: lengths spread over [max_length / 4, max_length],
    a prompt of a third of each row (chosen rows first, then rejected ones)."""
    generator = torch.Generator().manual_seed(0)
    rows = 2 * pairs
    lengths = (
        torch.linspace(max_length // 4, max_length, rows)
        .round()
        .long()[torch.randperm(rows, generator=generator)]
    )
    input_ids = torch.full((rows, max_length), pad_id)
    attention = torch.zeros(rows, max_length, dtype=torch.long)
    completion = torch.zeros(rows, max_length, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, :length] = torch.randint(10, vocab, (length,), generator=generator)
        attention[row, :length] = 1
        completion[row, length // 3 : length] = True
    return input_ids, attention, completion


def leaked_rows(
    input_ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Each sequence with the previous sequence's tokens in front of it, attended to, not scored."""
    rows = input_ids.shape[0]
    lengths = attention.sum(-1).tolist()
    width = max(lengths[r - 1] + lengths[r] for r in range(rows))
    ids = torch.full((rows, width), int(input_ids[0, -1]))
    mask = torch.zeros(rows, width, dtype=torch.long)
    scored = torch.zeros(rows, width, dtype=torch.bool)
    for r in range(rows):
        before, own = lengths[r - 1], lengths[r]
        ids[r, : before + own] = torch.cat([input_ids[r - 1, :before], input_ids[r, :own]])
        mask[r, : before + own] = 1
        scored[r, before : before + own] = completion[r, :own]
    return ids, mask, scored


def token_bound(max_abs_logit: float, layers: int) -> float:
    """Largest expected gap between two bf16 forwards' log-prob of one token.

    The layouts run the same bf16 weights through differently shaped kernels, so every rounding to
    bf16 may land differently: the residual stream takes two per layer (attention and MLP outputs)
    plus the embedding and final norm, each off by up to u = 2^-8 relatively and independent, so the
    final hidden state is off by ~sqrt(2L + 2) u relatively; the logits z inherit that relative error
    and one more u of their own rounding; a token's log-prob z_y - logsumexp(z) moves by at most twice
    the largest logit change: 2 (sqrt(2L + 2) + 1) u max|z|.
    """
    return 2 * (math.sqrt(2 * layers + 2) + 1) * BF16_UNIT_ROUNDOFF * max_abs_logit


def compare(
    name: str, reference: Any, model: torch.nn.Module, rows: tuple, leak: float, bound: float
) -> dict:
    """Score ``rows`` padding-free with ``model``; compare token by token with ``reference`` (padded)."""
    from ipo_lightning.batching import batch_scores

    with torch.no_grad():
        packed = batch_scores(model, *rows, batching="padding_free")
    gap = (packed.token_logps - reference.token_logps).abs().max().item()
    mean_gap = (packed.sequence_logps(True) - reference.sequence_logps(True)).abs().max().item()
    return {
        "check": f"packing/{name}",
        "ok": math.isfinite(gap) and gap <= bound,
        "tokens": int(reference.token_logps.numel()),
        "max_token_logp_gap": gap,
        "max_sequence_mean_logp_gap": mean_gap,
        "token_bound": bound,
        "leak_effect": leak,
        "can_fail": leak > bound,
    }


def main() -> int:
    """Run the comparisons; print and append one JSON line each to ``$OUT/packing.jsonl``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipo_lightning.batching import batch_logits, batch_scores

    OUT.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if ACCELERATOR == "cpu" else "cuda")
    max_length = 128 if SMALL else 1024
    lines: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = save_qwen_model(Path(tmp) / "model", small=SMALL)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        rows = tuple(t.to(device) for t in make_rows(4, max_length, len(tokenizer), tokenizer.pad_token_id))

        def load(attention: str) -> torch.nn.Module:
            return (
                AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.bfloat16, attn_implementation=attention
                )
                .to(device)
                .eval()
            )

        sdpa = load("sdpa")
        layers = sdpa.config.num_hidden_layers
        with torch.no_grad():
            kept = batch_logits(sdpa, *rows, batching="padded")
            padded = kept.scores()
            max_abs_logit = kept.scored().float().abs().max().item()
            leaked = batch_scores(sdpa, *(t.to(device) for t in leaked_rows(*(r.cpu() for r in rows))))
        leak = (leaked.token_logps - padded.token_logps).abs().max().item()
        bound = token_bound(max_abs_logit, layers)
        info = {
            "layers": layers,
            "max_abs_logit": max_abs_logit,
            "max_length": max_length,
            "device": str(device),
        }
        lines.append({**compare("sdpa", padded, sdpa, rows, leak, bound), **info})
        if importlib.util.find_spec("flash_attn") is None:
            lines.append(
                {"check": "packing/flash_attention_2", "ok": True, "skipped": "flash_attn is not installed"}
            )
        elif device.type != "cuda":
            lines.append(
                {"check": "packing/flash_attention_2", "ok": True, "skipped": "flash-attention needs CUDA"}
            )
        else:
            del sdpa
            lines.append(
                {**compare("flash_attention_2", padded, load("flash_attention_2"), rows, leak, bound), **info}
            )
        lines[0]["seconds"] = round(time.perf_counter() - start, 1)
    with (OUT / "packing.jsonl").open("a") as handle:
        for line in lines:
            print(json.dumps(line), flush=True)
            handle.write(json.dumps(line) + "\n")
    return 0 if all(line["ok"] for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
