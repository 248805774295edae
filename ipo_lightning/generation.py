"""Sampling completions from a causal LM: plain ancestral sampling, batched, with the KV cache.

Prompts are tokenised the way the training pipeline tokenises a plain prompt
(``tokenizer(prompt, add_special_tokens=True)``), so samples continue exactly the token rows a
policy is trained on. Completions end at the tokenizer's EOS token or after ``max_new_tokens``.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    k: int,
    seed: int,
    max_new_tokens: int,
    *,
    batch_size: int = 256,
) -> list[list[str]]:
    """Draw ``k`` completions per prompt at temperature 1 (no top-k, no top-p).

    Rows are left-padded into batches of ``batch_size`` and generated with ``model.generate``
    (KV cache on). Batch ``b`` is drawn after seeding torch with ``seed + b``; the global torch RNG
    state is restored afterwards, so calling this does not disturb the caller's randomness. The same
    arguments give the same samples on the same machine and torch version.

    Returns:
        ``completions[i][j]``: the j-th completion of prompt ``i``, decoded without special tokens.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    device = next(model.parameters()).device
    encoded = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    rows = [ids for ids in encoded for _ in range(k)]
    texts: list[str] = []
    state = torch.random.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        for batch_index, start in enumerate(range(0, len(rows), batch_size)):
            batch = rows[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            torch.manual_seed(seed + batch_index)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(state)
        model.train(was_training)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
