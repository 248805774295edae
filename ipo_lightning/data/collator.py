"""Batching tokenised pairs for one policy forward pass: chosen rows first, then rejected rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ipo_lightning.data.eval_shards import WEIGHT
from ipo_lightning.reference import PRECOMPUTED_KEYS as REF_LOGP_KEYS


@dataclass
class PairwiseCollator:
    """Pads a list of tokenised pairs into one batch of ``2B`` rows.

    Each feature is a mapping with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of ints) and
    optionally ``preference_prob`` (default 1.0). The batch holds:

    - ``input_ids`` LongTensor [2B, T]: rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt +
      rejected, pairs in the same order; right-padded with ``pad_token_id``; T is the longest row in
      this batch (dynamic padding), not ``max_length``.
    - ``attention_mask`` LongTensor [2B, T]: 1 on real tokens, 0 on padding.
    - ``completion_mask`` BoolTensor [2B, T]: True exactly at completion tokens (not prompt, not padding).
      It marks the tokens to score; the log-prob code shifts it by one against the logits.
    - ``preference_prob`` FloatTensor [B].
    - ``ref_{chosen,rejected}_logp_sum`` and ``ref_{chosen,rejected}_token_count`` FloatTensor [B], only
      if every feature carries them (precomputed reference log-prob sums and scored token counts, see
      ``ipo_lightning.precompute``).
    - ``weight`` FloatTensor [B], only if every feature carries one: 1.0 for a pair that counts in the
      evaluation metrics, 0.0 for a repeat that pads a rank's share (:mod:`ipo_lightning.data.eval_shards`).

    Padding is located by lengths, never by token id, so a pad id equal to EOS is safe.

    Args:
        pad_token_id: Token id written into padding positions.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (B pairs) into the batch described above."""
        if not features:
            raise ValueError("cannot collate an empty list of pairs")
        rows: list[tuple[list[int], list[int]]] = [(f["prompt_ids"], f["chosen_ids"]) for f in features]
        rows += [(f["prompt_ids"], f["rejected_ids"]) for f in features]
        width = max(len(prompt) + len(completion) for prompt, completion in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (prompt, completion) in enumerate(rows):
            start, end = len(prompt), len(prompt) + len(completion)
            input_ids[row, :start] = torch.as_tensor(prompt, dtype=torch.long)
            input_ids[row, start:end] = torch.as_tensor(completion, dtype=torch.long)
            attention_mask[row, :end] = 1
            completion_mask[row, start:end] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "preference_prob": torch.tensor(
                [float(f.get("preference_prob", 1.0)) for f in features], dtype=torch.float32
            ),
        }
        if all(key in f for f in features for key in REF_LOGP_KEYS):
            for key in REF_LOGP_KEYS:
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        if all(WEIGHT in f for f in features):
            batch[WEIGHT] = torch.tensor([float(f[WEIGHT]) for f in features], dtype=torch.float32)
        return batch
