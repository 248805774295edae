"""A plain-text retention set: text the policy should keep predicting as well as the reference does.

Preference training can cost general capability. Scoring a held-out plain-text sample (e.g. a slice
of the pre-training or instruction data) under policy and reference shows it as a drop in per-token
log-likelihood. Files: ``.txt`` (one text per non-empty line) or ``.jsonl`` (a ``text`` field).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ipo_lightning.errors import ConfigError, DataError


def read_texts(path: str | Path, limit: int) -> list[str]:
    """The first ``limit`` texts of a ``.txt`` or ``.jsonl`` file (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"divergence.retention_file {str(path)!r}: no such file")
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if len(texts) == limit:
                break
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: needs a non-empty string field 'text'")
            texts.append(text)
    if not texts:
        raise DataError(f"{path}: no texts in the file")
    return texts


def text_batches(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, *, max_length: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Right-padded batches scoring every token after the first (cut to ``max_length`` tokens).

    The keys are those of a pairwise batch (``input_ids``, ``attention_mask``, ``completion_mask``),
    so the same scoring code serves both.
    """
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    rows = [row for row in rows if len(row) >= 2]  # a one-token text predicts nothing
    if not rows:
        raise DataError("divergence.retention_file: every text is shorter than two tokens")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(row) for row in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for index, row in enumerate(chunk):
            input_ids[index, : len(row)] = torch.tensor(row)
            attention_mask[index, : len(row)] = 1
        completion_mask = attention_mask.bool()
        completion_mask[:, 0] = False  # the first token has no prediction
        batches.append(
            {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        )
    return batches
