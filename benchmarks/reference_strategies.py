"""Memory and speed of the three reference strategies (separate, lora, precomputed), in one run.

For each strategy a fresh PreferenceModule trains a randomly initialised Llama (built and saved to a
temporary folder, no download) on the quickstart pairs, and the script prints:

- weights held during training: bytes of distinct parameter storage of policy plus reference (the
  LoRA reference shares the policy's storage, a precomputed one holds none);
- trainable parameters;
- the precompute pass (precomputed only): pairs per second, first run (cache miss) and second (hit);
- mean optimizer-step time after warm-up, and on CUDA the peak allocated memory.

    python benchmarks/reference_strategies.py                          # 2 CPU cores: minutes
    python benchmarks/reference_strategies.py --device cuda --precision bf16-mixed --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from ipo_lightning.builtin import quickstart_corpus
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.lora import LoraOptions
from ipo_lightning.module import PreferenceModule
from ipo_lightning.reference import REFERENCE_STRATEGIES
from ipo_lightning.tiny import save_tiny_model


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def _weight_bytes(module: PreferenceModule) -> int:
    tensors = list(module.parameters())
    reference = getattr(module.reference, "model", None)
    if reference is not None:
        tensors += list(reference.parameters())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def run(strategy: str, model_dir: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.steps`` steps with one strategy; return its measurements."""
    lora = (
        LoraOptions(rank=16, alpha=32, dropout=0.0, target_modules="all-linear")
        if strategy == "lora"
        else None
    )
    module = PreferenceModule(
        str(model_dir), reference=strategy, lora=lora, beta=0.5, gradient_checkpointing=args.checkpointing
    )
    datamodule = PreferenceDataModule(
        train=DataSource(path="builtin:quickstart/train", limit=args.pairs),
        tokenizer_name_or_path=str(model_dir),
        max_length=128,
        max_prompt_length=64,
        batch_size=args.batch_size,
        cache_dir=str(cache_dir),
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - started
    result = {
        "weights_mb": _weight_bytes(module) / 2**20,
        "trainable_k": sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e3,
        "step_s": statistics.mean(timer.times[args.warmup :]),
        "fit_s": total,
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    """Parse options, build the model once, measure each strategy in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady when shared)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(
            Path(tmp) / "model",
            quickstart_corpus(),
            vocab_size=2000,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=max(1, args.hidden // 64),
        )
        cache_dir = Path(tmp) / "cache"
        rows = {}
        for strategy in REFERENCE_STRATEGIES:
            rows[strategy] = run(strategy, model_dir, cache_dir, args)
        rows["precomputed (cache hit)"] = run("precomputed", model_dir, cache_dir, args)
    setting = f"{args.device}, {args.precision}, hidden {args.hidden}, {args.layers} layers"
    print(f"\n{setting}, batch {args.batch_size} pairs, checkpointing {args.checkpointing}")
    print(f"{'strategy':<24} {'weights MB':>10} {'trainable':>10} {'step s':>8} {'fit s':>7}", end="")
    print(f" {'peak GPU MB':>12}" if args.device == "cuda" else "")
    for name, row in rows.items():
        line = f"{name:<24} {row['weights_mb']:>10.1f} {row['trainable_k']:>9.0f}k"
        line += f" {row['step_s']:>8.3f} {row['fit_s']:>7.1f}"
        print(line + (f" {row['peak_gpu_mb']:>12.0f}" if "peak_gpu_mb" in row else ""))


if __name__ == "__main__":
    main()
