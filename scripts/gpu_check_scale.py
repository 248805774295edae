"""CUDA checks of the scale-out strategies (needs 1+ GPUs; 2 make the sharding real). One JSON line each.

For each of ``configs/strategy/{ddp,fsdp,fsdp2,deepspeed_zero2,deepspeed_zero3}.yaml`` (DeepSpeed ones skipped
with a reason when the package is missing, or on CPU, where Lightning refuses it): a few optimizer
steps of IPO through the real CLI, on ``min(2, GPUs)`` devices, then:

- the reference is frozen: eval mode, no gradients, on the policy's device, and its log-probs on a fixed
  batch are the same after training as before (:class:`ReferenceFrozenCheck`, run inside the job);
- the export ``hf_model/`` loads with ``AutoModelForCausalLM`` and holds trained (changed) weights;
- the loss curve matches the DDP run's (same global batch) within the tolerance of the model's precision;
- the divergence monitor's numbers (FSDP gathers the full weights for it) equal DDP's: at every
  measurement for ``tiny``, at step 0 for ``qwen`` (after bf16 steps the policies themselves differ);
- ``perf/step_time`` and ``perf/peak_memory_gb`` as the run logged them.

Two models (``--model``), one code path:

- ``tiny`` (``scale.jsonl``): a tiny Llama in float32, so the strategies must agree to float32 rounding.
- ``qwen`` (``qwen.jsonl``): a random-init Qwen2 with Qwen2.5-0.5B's shapes (0.49B parameters, vocabulary
  151936, tied embeddings) saved in bf16, trained in ``bf16-mixed`` on ~1024-token pairs. On one GPU
  this exercises each strategy's wrapping, mixed precision and gathered export, not real sharding.
  ``GPU_CHECK_SMALL=1`` swaps in a small Qwen2 config (for a CPU dry run).

``GPU_CHECK_ACCELERATOR=cpu`` dry-runs the script on a CPU machine (2 gloo processes).
Run by ``scripts/gpu_check.sh``; alone: ``PYTHONPATH=. python scripts/gpu_check_scale.py --model tiny``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "gpu_check_out"))
STRATEGIES = ("ddp", "fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
# GPU_CHECK_ACCELERATOR=cpu dry-runs this script on a CPU machine (2 gloo processes), to check the script.
ACCELERATOR = os.environ.get("GPU_CHECK_ACCELERATOR", "gpu")
SMALL = os.environ.get("GPU_CHECK_SMALL", "0") == "1"
# One run's limit: a hung run (a collective that never returns) costs this much, and the others still run.
RUN_TIMEOUT = int(os.environ.get("GPU_CHECK_RUN_TIMEOUT", 900 if ACCELERATOR == "cpu" else 150))
BF16_UNIT_ROUNDOFF = 2.0**-8
"""bf16 keeps 8 significant bits: a value rounded to bf16 is off by at most this much, relatively."""


class ReferenceFrozenCheck(Callback):
    """Inside the job: checks the reference stays frozen, writes ``<report>.rank<R>.json``.

    Args:
        report: path prefix of the per-rank JSON reports.
    """

    def __init__(self, report: str) -> None:
        self.report = report
        self.batch: dict[str, torch.Tensor] | None = None
        self.before: torch.Tensor | None = None
        self.problems: list[str] = []

    def _reference_logps(self, module: L.LightningModule) -> torch.Tensor:
        rows = (self.batch["input_ids"], self.batch["attention_mask"], self.batch["completion_mask"])
        return module.reference.sequence_logprobs(*rows, length_normalize=True, chunk_size=64).float().cpu()

    def _check_state(self, module: L.LightningModule, when: str) -> None:
        reference = module.reference
        if any(sub.training for sub in reference.modules()):
            self.problems.append(f"{when}: reference (or a submodule) in train mode")
        if any(p.requires_grad for p in reference.parameters()):
            self.problems.append(f"{when}: a reference parameter requires grad")
        devices = {p.device.type for p in reference.parameters()} | {module.device.type}
        if len(devices) != 1:
            self.problems.append(f"{when}: reference and policy on different devices {sorted(devices)}")

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        if self.batch is None:
            self.batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            self._check_state(module, "start")
            with torch.no_grad():
                self.before = self._reference_logps(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._check_state(module, "end")
        with torch.no_grad():
            after = self._reference_logps(module)
        # The same frozen weights on the same batch run the same kernels: any change is a real one.
        change = (after - self.before).abs().max().item()
        if change > 1e-5:
            self.problems.append(f"reference log-probs changed by {change:.3g} during training")
        Path(f"{self.report}.rank{trainer.global_rank}.json").write_text(
            json.dumps({"problems": self.problems, "reference_logp_change": change})
        )


@dataclass(frozen=True)
class Setup:
    """What one model's strategy runs share: files, training options and the tolerances that judge them.

    ``loss_rtol``: largest gap of a strategy's loss from DDP's at the same step, relative to the larger
    of DDP's loss there and its starting loss.
    ``divergence_rtol``/``divergence_atol``: the same for the monitor's numbers, at step 0 only or at
    every measurement (``divergence_all_steps``).
    """

    name: str
    model: Path
    train: Path
    steps: int
    precision: str
    optimizer: str
    lr: float
    max_length: int
    max_prompt_length: int
    pairs_per_step: int
    loss_rtol: float
    divergence_rtol: float
    divergence_atol: float
    divergence_all_steps: bool


def tiny_setup(work: Path) -> Setup:
    """A tiny Llama in float32 on short pairs."""
    from ipo_lightning.tiny import save_tiny_model
    from tests.conftest import CORPUS
    from tests.helpers import polite_pairs, write_jsonl

    model = save_tiny_model(work / "model", CORPUS, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4)
    train = write_jsonl(work / "train.jsonl", polite_pairs(32))
    # float32 everywhere: the strategies reorder sums (bucketed all-reduce, flat parameters), which
    # moves a float32 loss by ~1e-6 relative per step; 1e-3 leaves room for a few steps of that.
    # The monitor's numbers at every measurement (steps 0, 3, 6; KL is 0 only at step 0) likewise.
    return Setup(
        "tiny", model, train, 6, "32-true", "torch.optim.SGD", 0.5, 48, 24, 8, 1e-3, 1e-3, 1e-6, True
    )


def save_qwen_model(folder: Path, *, small: bool) -> Path:
    """A random-init Qwen2 with Qwen2.5-0.5B's shapes (``small``: a few-million-parameter one), in bf16,
    with a small byte-level BPE tokenizer trained offline (the model's vocabulary stays 151936)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ipo_lightning.tiny import build_tokenizer
    from tests.conftest import CORPUS

    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    shapes = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=4096)
        if small
        else dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936)
    )  # fmt: skip
    config = Qwen2Config(
        **shapes,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def long_pairs(count: int, words: int) -> list[dict[str, str]]:
    """``count`` pairs of ~``words`` words each part: a long prompt, a polite and a rude completion."""
    from tests.conftest import CORPUS
    from tests.helpers import BAD, GOOD

    rng = random.Random(0)

    def text(sentences: list[str]) -> str:
        out: list[str] = []
        while sum(len(s.split()) for s in out) < words:
            out.append(rng.choice(sentences))
        return " " + " ".join(out)

    return [
        {
            "prompt": "Human:" + text(CORPUS) + " Assistant:",
            "chosen": text([f"{g}, happy to help." for g in GOOD]),
            "rejected": text([f"{b}, go away." for b in BAD]),
        }
        for _ in range(count)
    ]


def qwen_setup(work: Path) -> Setup:
    """Qwen2.5-0.5B's shapes (random init) in bf16-mixed on ~1024-token pairs."""
    from tests.helpers import write_jsonl

    model = save_qwen_model(work / "model", small=SMALL)
    max_length = 128 if SMALL else 1024
    # Each part is longer than its share of max_length: truncation makes every row max_length long.
    train = write_jsonl(work / "train.jsonl", long_pairs(64, words=max_length // 2))
    # Loss tolerance in bf16. Every strategy rounds to bf16 in different places: DDP's autocast rounds
    # each matmul's inputs; FSDP's mixed precision also keeps the weights it gathers and the gradients
    # it reduces in bf16; DeepSpeed's bf16 mode holds the model's weights (policy and reference) and
    # activations in bf16, with fp32 master weights. A rounding is off by u = 2^-8 relatively. A
    # gradient off by a few u relatively gives an update off by about as much (SGD is linear in it;
    # Adam's g / sqrt(v) too, where |g| is above the rounding, and the elements where it is not move
    # the loss to second order only), so a step's update differs by a few u relatively, and
    # over k steps (too few for the differences to grow chaotically) the loss's change departs by
    # ~k * u of itself; the forward at one step adds ~u of the loss. With k = 8: (k + 1) * u ~ 3.5%
    # of the loss, which is ~1; we allow 2 * (k + 1) * u for the forwards' differing rounding of the
    # residual stream. A strategy that trains wrongly (no step, a reference that moves, a scaled
    # learning rate) moves the loss by its whole change over the run, which the check requires to be
    # several times the tolerance (else it could not fail).
    steps = 8
    loss_rtol = 2 * (steps + 1) * BF16_UNIT_ROUNDOFF
    # Step 0 (policy = reference): KL is ~0 both ways; the entropy, log-ratios (~0) and KL of two bf16
    # forwards agree to the rounding of the logits, a few u of their size: rtol 4u, atol 4u. Later
    # measurements carry the runs' bf16 training differences: logged, not compared.
    # Adam's step is ~lr per weight whatever the gradients' scale, so one lr suits both shapes;
    # GPU_CHECK_QWEN_LR overrides it (if the loss moves too little for the comparison to mean much).
    lr = float(os.environ.get("GPU_CHECK_QWEN_LR", 1e-3 if SMALL else 1e-4))
    return Setup(
        "qwen", model, train, steps, "bf16-mixed", "torch.optim.Adam", lr, max_length, max_length // 2,
        8, loss_rtol, 4 * BF16_UNIT_ROUNDOFF, 4 * BF16_UNIT_ROUNDOFF, False,
    )  # fmt: skip


def _skip_reason(strategy: str) -> str | None:
    if not strategy.startswith("deepspeed"):
        return None
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if ACCELERATOR == "cpu":
        return "Lightning runs DeepSpeed on CUDA only"
    return None


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def log_tail(name: str, result: subprocess.CompletedProcess[str], lines: int = 40) -> None:
    """The last ``lines`` of a child's output on stderr (``gpu_check.sh`` collects it in one log)."""
    tail = (result.stdout + result.stderr).splitlines()[-lines:]
    print(f"----- {name}: exit {result.returncode}, last {len(tail)} lines", *tail, sep="\n", file=sys.stderr)


def run_strategy(strategy: str, setup: Setup, work: Path, devices: int) -> dict[str, Any]:
    """Train ``setup`` with ``strategy`` through the CLI; the checks that need only this run."""
    check = f"{setup.name}/{strategy}"
    reason = _skip_reason(strategy)
    if reason:
        return {"check": check, "ok": True, "skipped": reason}
    folder = work / strategy
    report = folder / "reference"
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(folder / "runs"),
            "max_steps": setup.steps,
            "max_epochs": 4,
            "log_every_n_steps": 1,
            "precision": setup.precision,
            # No checkpoint: the 0.5B policy's with Adam's state is ~6 GB to write, per strategy.
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "scripts.gpu_check_scale.ReferenceFrozenCheck",
                    "init_args": {"report": str(report)},
                }
            ],
        },
        "model": {
            "model_name_or_path": str(setup.model),
            "beta": 0.5,
            # A torch optimizer: DeepSpeed then builds none of its own (its fused Adam is a CUDA op
            # compiled on first use).
            "optimizer": {"class_path": setup.optimizer, "init_args": {"lr": setup.lr}},
            "warmup_ratio": 0.0,
        },
        "data": {
            "train": {"path": str(setup.train)},
            "max_length": setup.max_length,
            "max_prompt_length": setup.max_prompt_length,
            "batch_size": setup.pairs_per_step // devices,
        },
        "divergence": {"every_n_steps": setup.steps // 2, "sample_prompts": 0, "num_pairs": 8},
        "wandb": {"enabled": False},
    }
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    strategy_config = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    command = [
        sys.executable, "-m", "ipo_lightning", "fit", "--config", str(folder / "config.yaml"),
        "--config", strategy_config, "--trainer.devices", str(devices), "--trainer.accelerator", ACCELERATOR,
    ]  # fmt: skip
    start = time.perf_counter()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"check": check, "ok": False, "problems": [f"no result within {RUN_TIMEOUT} s (killed)"]}
    log_tail(check, result)
    out: dict[str, Any] = {
        "check": check,
        "devices": devices,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        return {**out, "ok": False, "returncode": result.returncode, "stderr_tail": tail}
    problems = []
    reports = sorted(folder.glob("reference.rank*.json"))
    for path in reports:
        problems += json.loads(path.read_text())["problems"]
    if not reports:
        problems.append("no reference report written")
    (run_dir,) = (folder / "runs").iterdir()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    start_model = AutoModelForCausalLM.from_pretrained(setup.model)
    if torch.equal(exported.lm_head.weight.float(), start_model.lm_head.weight.float()):
        problems.append("export holds the starting weights")
    rows = _read_metrics(run_dir)
    step_times = _column(rows, "perf/step_time")
    divergence_keys = sorted(k for k in (rows[0] if rows else {}) if k.startswith("divergence/"))
    measured = {
        int(r["step"]): {k: float(r[k]) for k in divergence_keys if r.get(k)}
        for r in rows
        if r.get("divergence/kl")
    }
    return {
        **out,
        "ok": not problems,
        "problems": problems,
        "losses": _column(rows, "train/loss"),
        # the first step includes compiling and allocator warm-up: the median of the rest
        "step_time_s": sorted(step_times[1:])[len(step_times[1:]) // 2] if len(step_times) > 1 else None,
        "peak_memory_gb": max(_column(rows, "perf/peak_memory_gb"), default=None),
        # {step: {metric: value}}; JSON keys are strings
        "divergence": {str(step): values for step, values in sorted(measured.items())} or None,
    }


def compare_with_ddp(results: dict[str, dict[str, Any]], setup: Setup) -> None:
    """Loss curves and the monitor's step-0 numbers of every strategy against DDP's, in place."""
    ddp = results["ddp"]
    ddp_losses = ddp.get("losses")
    if ddp_losses:
        moved = abs(ddp_losses[0] - ddp_losses[-1]) / max(abs(ddp_losses[0]), 1e-6)
        ddp["loss_moved_rel"] = moved
        if moved < 3 * setup.loss_rtol:
            ddp["ok"] = False
            ddp["problems"].append(
                f"the loss moved by {moved:.3g} (relative), under 3x the tolerance {setup.loss_rtol:.3g}: "
                "the comparison of loss curves could not fail"
            )
    for name, result in results.items():
        if name == "ddp" or not result.get("losses") or not ddp_losses:
            continue
        if len(result["losses"]) != len(ddp_losses):
            result["ok"] = False
            result["problems"].append(f"{len(result['losses'])} losses logged, DDP logged {len(ddp_losses)}")
        # Relative to the larger of the step's loss and the starting loss: the rounding differences
        # scale with the loss's size over the run, and stay put when the loss itself nears 0.
        scale = abs(ddp_losses[0])
        gap = max(
            abs(a - b) / max(abs(b), scale, 1e-6) for a, b in zip(result["losses"], ddp_losses, strict=False)
        )
        result["max_rel_loss_gap_vs_ddp"] = gap
        result["loss_rtol"] = setup.loss_rtol
        if gap > setup.loss_rtol:
            result["ok"] = False
            result["problems"].append(
                f"loss curve departs from DDP's (rel {gap:.3g} > {setup.loss_rtol:.3g})"
            )
        ours, theirs = result.get("divergence"), ddp.get("divergence")
        if ours is None or theirs is None:
            continue  # ZeRO-3 turns the monitor off (configs/strategy/deepspeed_zero3.yaml)
        worst = 0.0
        steps = sorted(theirs, key=int)[: None if setup.divergence_all_steps else 1]
        for step in steps:
            for key, value in theirs[step].items():
                mine = ours.get(step, {}).get(key)
                if mine is None:
                    result["problems"].append(f"{key} not logged at step {step}")
                    continue
                gap = abs(mine - value)
                bound = setup.divergence_atol + setup.divergence_rtol * abs(value)
                worst = max(worst, gap / bound)
                if not math.isfinite(mine) or gap > bound:
                    result["problems"].append(f"step-{step} {key} {mine:.6g} vs DDP's {value:.6g}")
        result["divergence_steps_compared"] = [int(step) for step in steps]
        result["divergence_gap_over_bound"] = worst
        result["ok"] = not result["problems"]


def main(argv: list[str] | None = None) -> int:
    """Run every strategy on the chosen model; print and append one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "qwen"], default="tiny")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    OUT.mkdir(parents=True, exist_ok=True)
    devices = 2 if ACCELERATOR == "cpu" else min(2, torch.cuda.device_count())
    output = OUT / ("scale.jsonl" if args.model == "tiny" else "qwen.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        setup = tiny_setup(work) if args.model == "tiny" else qwen_setup(work)
        header = {
            "check": f"{setup.name}/setup",
            "ok": True,
            "devices": devices,
            "accelerator": ACCELERATOR,
            "precision": setup.precision,
            "parameters": _count_parameters(setup.model),
            "max_length": setup.max_length,
            "steps": setup.steps,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if devices == 1:
            header["note"] = (
                "one device: wrapping, mixed precision and the gathered export, not real sharding"
            )
        results = {name: run_strategy(name, setup, work, devices) for name in STRATEGIES}
    compare_with_ddp(results, setup)
    lines = [header, *results.values()]
    with output.open("a") as handle:
        for line in lines:
            print(json.dumps(line), flush=True)
            handle.write(json.dumps(line) + "\n")
    return 0 if all(line["ok"] for line in lines) else 1


def _count_parameters(folder: Path) -> int:
    """Parameters stored in a saved model folder (tied weights once), from its safetensors header."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
