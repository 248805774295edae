"""CUDA checks that CPU CI cannot run. Prints one JSON line per check; exits non-zero on a failure.

1. ``logprobs``: chunked log-probs (custom autograd) equal a plain ``log_softmax`` on CUDA, values and
   gradients, in float32; and bf16 autocast stays close to float32 on the quickstart model.
2. ``quickstart``: ``configs/quickstart.yaml`` on the GPU with ``precision: bf16-mixed`` trains to a
   held-out reward accuracy >= 0.8.

Run by ``scripts/gpu_check.sh`` (its ``kernels`` part); appends them to ``$OUT/kernels.jsonl``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "gpu_check_out"))


def check_logprobs() -> dict:
    """Chunked vs plain log-softmax on CUDA, and bf16 autocast vs float32 on a real (tiny) model."""
    from transformers import AutoModelForCausalLM

    from ipo_lightning.batching import batch_scores
    from ipo_lightning.builtin import resolve_model_path
    from ipo_lightning.logprobs import token_logprobs

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 300, 5003, device="cuda", generator=generator, requires_grad=True)
    labels = torch.randint(0, 5003, (4, 300), device="cuda", generator=generator)
    weights = torch.randn(4, 300, device="cuda", generator=generator)
    (token_logprobs(logits, labels, chunk_size=257) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    plain = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    (plain * weights).sum().backward()
    value_error = (token_logprobs(logits, labels, chunk_size=257) - plain).abs().max().item()
    grad_error = (ours - logits.grad).abs().max().item()

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:quickstart")).cuda().eval()
    ids = torch.randint(10, model.config.vocab_size, (8, 64), device="cuda", generator=generator)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 20:] = True
    with torch.no_grad():
        fp32 = batch_scores(model, ids, attention, completion).sequence_logps(length_normalize=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = batch_scores(model, ids, attention, completion).sequence_logps(length_normalize=True)
    bf16_error = (fp32 - bf16).abs().max().item()
    ok = value_error < 1e-4 and grad_error < 1e-5 and bf16_error < 0.05
    return {
        "check": "logprobs",
        "ok": ok,
        "chunked_value_max_abs_err": value_error,
        "chunked_grad_max_abs_err": grad_error,
        "bf16_vs_fp32_max_abs_err_per_token_mean_logp": bf16_error,
    }


def check_quickstart() -> dict:
    """The quickstart on the GPU in bf16 mixed precision, through the real CLI."""
    root = Path(os.environ.get("GPU_CHECK_RUNS", OUT / "runs"))
    command = [
        sys.executable, "-m", "ipo_lightning", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--wandb.enabled", "false",  # the GPU machine has no wandb (nor network)
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (result.stdout + result.stderr).splitlines()[-40:]
    print(
        f"----- quickstart: exit {result.returncode}, last {len(tail)} lines",
        *tail,
        sep="\n",
        file=sys.stderr,
    )
    if result.returncode != 0:
        return {"check": "quickstart", "ok": False, "returncode": result.returncode, "seconds": seconds}
    metrics = next(root.glob("version_*/metrics.csv"))
    with metrics.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/loss")]
    first, last = rows[0], rows[-1]
    accuracy = float(last["val/in_dist/rewards/accuracy"])
    return {
        "check": "quickstart",
        "ok": accuracy >= 0.8 and (metrics.parent / "hf_model" / "config.json").is_file(),
        "seconds": seconds,
        "val_loss_first_last": [float(first["val/loss"]), float(last["val/loss"])],
        "val_in_dist_accuracy": accuracy,
        "val_ood_accuracy": float(last["val/ood/rewards/accuracy"]),
        "val_margin": float(last["val/logratio/margin"]),
    }


def main() -> None:
    """Run the checks, print and save their results."""
    OUT.mkdir(parents=True, exist_ok=True)
    device = {
        "check": "device",
        "ok": True,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    results = [device, check_logprobs(), check_quickstart()]
    for result in results:
        print(json.dumps(result))
    with (OUT / "kernels.jsonl").open("a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in results))
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
