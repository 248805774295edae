"""CUDA checks of the scale-out strategies (needs 1+ GPUs; 2 make the sharding real). One JSON line each.

For each of ``configs/strategy/{ddp,fsdp,deepspeed_zero2,deepspeed_zero3}.yaml`` (DeepSpeed ones skipped
with a reason when the package is missing): a few optimizer steps of IPO on a tiny saved Llama through
the real CLI, on ``min(2, GPUs)`` devices, then:

- the reference is frozen: eval mode, no gradients, on the policy's device, and its log-probs on a fixed
  batch are the same after training as before (:class:`ReferenceFrozenCheck`, run inside the job);
- the export ``hf_model/`` loads with ``AutoModelForCausalLM`` and holds trained (changed) weights;
- the loss curve matches the DDP run's (same global batch) within bf16-free float tolerance.

Run by ``scripts/gpu_check.sh``; alone: ``PYTHONPATH=. python scripts/gpu_check_scale.py``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "gpu_check_out"))
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
STEPS = 6
# GPU_CHECK_ACCELERATOR=cpu dry-runs this script on a CPU machine (2 gloo processes), to check the script.
ACCELERATOR = os.environ.get("GPU_CHECK_ACCELERATOR", "gpu")


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
        change = (after - self.before).abs().max().item()
        if change > 1e-5:
            self.problems.append(f"reference log-probs changed by {change:.3g} during training")
        Path(f"{self.report}.rank{trainer.global_rank}.json").write_text(
            json.dumps({"problems": self.problems, "reference_logp_change": change})
        )


def _setup(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    from ipo_lightning.tiny import save_tiny_model
    from tests.conftest import CORPUS
    from tests.helpers import polite_pairs, write_jsonl

    model = save_tiny_model(work / "model", CORPUS, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4)
    train = write_jsonl(work / "train.jsonl", polite_pairs(32))
    return model, train


def _run(strategy: str, model: Path, train: Path, work: Path, devices: int) -> dict[str, Any]:
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return {"check": f"scale/{strategy}", "ok": True, "skipped": "deepspeed is not installed"}
    folder = work / strategy
    report = folder / "reference"
    config = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(folder / "runs"),
            "max_steps": STEPS,
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "scripts.gpu_check_scale.ReferenceFrozenCheck",
                    "init_args": {"report": str(report)},
                }
            ],
        },
        "model": {
            "model_name_or_path": str(model),
            "beta": 0.5,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
            "warmup_ratio": 0.0,
        },
        "data": {
            "train": {"path": str(train)},
            "max_length": 48,
            "max_prompt_length": 24,
            "batch_size": 8 // devices,
        },
        "divergence": {"every_n_steps": 3, "sample_prompts": 0},
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
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    (OUT / f"scale_{strategy}.log").write_text(result.stdout[-20000:] + result.stderr[-20000:])
    out: dict[str, Any] = {
        "check": f"scale/{strategy}",
        "devices": devices,
        "seconds": time.perf_counter() - start,
    }
    if result.returncode != 0:
        return {**out, "ok": False, "returncode": result.returncode}
    problems = []
    for path in sorted(folder.glob("reference.rank*.json")):
        problems += json.loads(path.read_text())["problems"]
    if not list(folder.glob("reference.rank*.json")):
        problems.append("no reference report written")
    (run_dir,) = (folder / "runs").iterdir()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    start_model = AutoModelForCausalLM.from_pretrained(model)
    if torch.equal(exported.lm_head.weight, start_model.lm_head.weight):
        problems.append("export holds the starting weights")
    with (run_dir / "metrics.csv").open() as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    return {**out, "ok": not problems, "problems": problems, "losses": losses}


def main() -> int:
    """Run every strategy; print one JSON line each; compare loss curves with DDP's."""
    OUT.mkdir(parents=True, exist_ok=True)
    devices = 2 if ACCELERATOR == "cpu" else min(2, torch.cuda.device_count())
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, train = _setup(work)
        results = {name: _run(name, model, train, work, devices) for name in STRATEGIES}
    ddp_losses = results["ddp"].get("losses")
    for name, result in results.items():
        losses = result.get("losses")
        if ddp_losses and losses and name != "ddp":
            gap = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, ddp_losses, strict=False))
            result["max_rel_loss_gap_vs_ddp"] = gap
            if gap > 1e-3:
                result["ok"] = False
                result.setdefault("problems", []).append(f"loss curve departs from DDP's (rel {gap:.3g})")
        failed |= not result["ok"]
        print(json.dumps(result))
        with (OUT / "scale.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
