"""Small builders shared by tests: preference files and pairs with an obvious, learnable preference."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

GOOD = ["thank you", "here is a clear answer", "please", "happy to help"]
BAD = ["no", "figure it out yourself", "stupid question", "go away"]
TOPICS = ["the sea", "bread", "the sky", "a fox", "France", "a poem"]


def polite_pairs(count: int, offset: int = 0) -> list[dict[str, str]]:
    """``count`` plain pairs: the chosen reply is polite, the rejected one rude (deterministic)."""
    records = []
    for i in range(offset, offset + count):
        topic = TOPICS[i % len(TOPICS)]
        records.append(
            {
                "prompt": f"Human: tell me about {topic}. Assistant:",
                "chosen": f" {GOOD[i % len(GOOD)]}, {topic} is lovely.",
                "rejected": f" {BAD[i % len(BAD)]}, {topic}.",
            }
        )
    return records


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines and return ``path``."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


class StepPacer(Callback):
    """Test callback for multi-process runs: after each optimizer step, record the step and sleep.

    The sleep widens the window in which a test can signal a running job; the marker file (one line
    per step, from rank 0) tells the test how far training has got. It draws no random numbers.

    Args:
        marker: file that rank 0 appends the global step to after each batch.
        seconds: sleep after each batch.
    """

    def __init__(self, marker: str, seconds: float = 0.3) -> None:
        self.marker = marker
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.is_global_zero:
            with open(self.marker, "a") as handle:
                handle.write(f"{trainer.global_step}\n")
        time.sleep(self.seconds)


def quiet_trainer(root: Path, max_steps: int = 1, **kwargs: Any) -> L.Trainer:
    """A CPU trainer without logger, progress bar, summary, checkpoints or sanity check."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return L.Trainer(**options)


class ScaleLogits(Callback):
    """Test callback: multiply the policy's logits by ``factor`` in the given optimizer steps.

    ``inf`` makes the loss and every gradient of those steps NaN, the way an overflow does; a large
    finite factor makes the loss jump. It acts through a forward hook on the real output layer, only on
    the processes in ``ranks`` (all when None).

    Args:
        steps: optimizer steps (``trainer.global_step`` when the step starts) to act in.
        factor: what the logits are multiplied by.
        ranks: global ranks to act on; None: every rank.
    """

    def __init__(
        self, steps: list[int], factor: float = float("inf"), ranks: list[int] | None = None
    ) -> None:
        self.steps = set(steps)
        self.factor = factor
        self.ranks = ranks
        self._handle: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        acting = self.ranks is None or trainer.global_rank in self.ranks
        if acting and trainer.global_step in self.steps and self._handle is None:
            head = pl_module.policy.get_output_embeddings()
            self._handle = head.register_forward_hook(lambda module, inputs, output: output * self.factor)

    def on_train_batch_end(self, *args: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
