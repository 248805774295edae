"""The reference model of the ``builtin:gold`` task: a tiny Llama trained by SFT on demonstrations.

The build is a plain torch loop: a byte-level BPE tokenizer trained on the task language, a tiny
Llama with random weights from a seed, then next-token cross-entropy on the completion tokens of
demonstration notes (the prompt tokens are context only). Rows are tokenised as the training
pipeline tokenises a plain pair (prompt ids, then completion ids plus EOS), so the reference and a
policy tuned from it see the same token rows. The result is saved with ``save_pretrained``.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ipo_lightning.gold.language import SEED, corpus, demonstrations
from ipo_lightning.tiny import build_tiny_llama, build_tokenizer, one_thread

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ReferenceRecipe:
    """Everything that decides the reference model; its hash names the cache folder.

    The default takes about a minute and a half on one CPU core (the SFT runs on one thread).
    """

    vocab_size: int = 768
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 256
    demonstrations: int = 20000
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = SEED

    def as_dict(self) -> dict[str, int | float]:
        """The recipe as plain values (what the cache key and ``gold_recipe.json`` hold)."""
        return asdict(self)


def _rows(tokenizer, count: int) -> list[tuple[list[int], int]]:
    """Token rows of ``count`` demonstrations with the length of their prompt part."""
    rows = []
    for prompt, completion in demonstrations(count):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + completion_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return rows


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _learning_rate(recipe: ReferenceRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_reference(directory: str | Path, recipe: ReferenceRecipe = ReferenceRecipe()) -> list[float]:
    """Build the tokenizer and the model, run SFT, save both to ``directory``; return the losses.

    The SFT runs on one thread (:func:`ipo_lightning.tiny.one_thread`) and the global torch RNG is
    restored afterwards; the result depends only on ``recipe`` (for one torch version and CPU type).
    """
    tokenizer = build_tokenizer(corpus(), vocab_size=recipe.vocab_size)
    model = build_tiny_llama(
        len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=recipe.seed,
    )
    rows = _rows(tokenizer, recipe.demonstrations)
    order = random.Random(f"gold-sft-{recipe.seed}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    losses: list[float] = []
    state = torch.random.get_rng_state()
    model.train()
    try:
        with one_thread():
            torch.manual_seed(recipe.seed)
            for step in range(recipe.steps):
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(recipe, step)
                batch = _batch(order.sample(rows, recipe.batch_size), tokenizer.pad_token_id)
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                losses.append(loss.item())
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return losses
