"""Generating completions from a causal LM: ancestral sampling at temperature 1 or greedy, batched.

One sampling path for everything that judges what a model writes (the generation evaluation, the
``evaluate`` command, the gold task's data). Rows are left-padded into batches and generated with
``model.generate`` and its KV cache. What is drawn does not depend on how rows are batched:

- **Ancestral sampling** at temperature 1 from the full softmax: no top-k, top-p, repetition
  penalty or any other setting of the model's own generation config (it is set aside during the
  call). Each step draws one uniform number u from the row's own ``torch.Generator`` and takes the
  token where the cumulative softmax passes u (inverse-CDF sampling).
- Completion j of the prompt with index i draws from a generator seeded by ``(seed, i, j)``
  (:func:`row_seed`), so it is the same whatever batch size, padding width, prompts sharing its
  batch or process count (ranks that split the prompts pass their ``prompt_indices``), up to the
  float rounding of padded attention.
- **Greedy** (``greedy=True``): the argmax at every step.

A completion ends at an EOS token (the model's generation-config ``eos_token_id``, else the
tokenizer's; kept in ``token_ids``, nothing after it) or after ``max_new_tokens`` tokens. The
global torch RNG is never drawn from, and the model's train/eval mode and generation config are
restored afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Completion:
    """One generated completion.

    Attributes:
        text: decoded, special tokens skipped.
        token_ids: generated tokens, EOS included when one was generated.
        ended: an EOS token was generated (within ``max_new_tokens``).
    """

    text: str
    token_ids: list[int]
    ended: bool


def row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The generator seed of sample ``sample`` of prompt ``prompt_index`` (a 63-bit hash of all three)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RowSampler(LogitsProcessor):
    """Draw each row's next token from softmax(scores) with the row's own generator (None: argmax).

    Returns scores that are ``-inf`` everywhere but at the chosen token, so greedy decoding in
    ``model.generate`` picks exactly that token. One uniform number per sampled row and step.
    """

    def __init__(self, generators: Sequence[torch.Generator | None]) -> None:
        self.generators = list(generators)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        uniforms = torch.cat(
            [
                torch.rand(1, generator=g, dtype=torch.float64)
                if g is not None
                else torch.zeros(1, dtype=torch.float64)
                for g in self.generators
            ]
        )
        tokens = inverse_cdf_tokens(scores, uniforms.to(scores.device))
        greedy = torch.tensor([g is None for g in self.generators], device=scores.device)
        tokens = torch.where(greedy, scores.argmax(dim=-1), tokens)
        mask = torch.full_like(scores, float("-inf"))
        mask.scatter_(1, tokens[:, None], 0.0)
        return mask


def inverse_cdf_tokens(scores: Tensor, uniforms: Tensor) -> Tensor:
    """Per row, the first token whose cumulative softmax(scores) exceeds its uniform number in [0, 1)."""
    cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
    # Scaled by the row's total so that rounding in the cumulative sum never leaves u past the end.
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    return tokens.clamp_(max=scores.shape[-1] - 1)


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the model's generation-config EOS, else the tokenizer's."""
    eos = getattr(getattr(_hf_model(model), "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model whose ``generate`` runs (a PEFT wrapper's base model)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _cut(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The generated tokens up to and including the first stop token, and whether there is one."""
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1], True
    return tokens, False


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    k: int = 1,
    greedy: bool = False,
    seed: int = 0,
    max_new_tokens: int,
    batch_size: int = 64,
    prompt_indices: Sequence[int] | None = None,
) -> list[list[Completion]]:
    """``k`` completions per prompt (module docstring: how they are drawn).

    Args:
        model: causal LM (transformers, or a PEFT wrapper of one).
        tokenizer: its tokenizer (padding id, EOS fallback, decoding).
        prompt_ids: each prompt's token ids, as the model is to continue them.
        k: completions per prompt (1 when ``greedy``).
        greedy: argmax decoding instead of sampling.
        seed: base seed of the per-completion generators.
        max_new_tokens: longest completion.
        batch_size: rows (prompt x sample) per ``generate`` call.
        prompt_indices: each prompt's index in the full prompt list (default ``0..len-1``); what the
            generators are seeded with, so processes splitting the prompts draw what one process would.

    Returns:
        ``completions[i][j]``: completion j of prompt i.
    """
    if greedy and k != 1:
        raise ValueError(f"greedy decoding gives one completion per prompt, got k={k}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    rows = [(i, None if greedy else j) for i in range(len(prompt_ids)) for j in range(k)]
    flat = _generate_rows(
        model, tokenizer, prompt_ids, rows, seed, prompt_indices, max_new_tokens, batch_size
    )
    return [flat[i * k : (i + 1) * k] for i in range(len(prompt_ids))]


@torch.no_grad()
def generate_with_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    k: int,
    seed: int = 0,
    max_new_tokens: int,
    batch_size: int = 64,
    prompt_indices: Sequence[int] | None = None,
) -> tuple[list[list[Completion]], list[Completion]]:
    """:func:`generate_completions`'s ``k`` samples and greedy completion of every prompt, together.

    The greedy rows share the sampled rows' batches (one ``generate`` call instead of two), and each
    row is what :func:`generate_completions` gives it alone.

    Returns:
        ``(samples, greedy)``: ``samples[i][j]`` as in :func:`generate_completions`, ``greedy[i]``.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    rows = [(i, j) for i in range(len(prompt_ids)) for j in [*range(k), None]]
    flat = _generate_rows(
        model, tokenizer, prompt_ids, rows, seed, prompt_indices, max_new_tokens, batch_size
    )
    per_prompt = [flat[i * (k + 1) : (i + 1) * (k + 1)] for i in range(len(prompt_ids))]
    return [row[:k] for row in per_prompt], [row[k] for row in per_prompt]


def _generate_rows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    rows: Sequence[tuple[int, int | None]],
    seed: int,
    prompt_indices: Sequence[int] | None,
    max_new_tokens: int,
    batch_size: int,
) -> list[Completion]:
    """One completion per row ``(prompt i, sample j)``; ``j`` None is a greedy row. In row order."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be positive, got {max_new_tokens}, {batch_size}"
        )
    indices = list(range(len(prompt_ids))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompt_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(indices)} prompt_indices")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    hf_model = _hf_model(model)
    stop = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=stop or None,
    )
    device = next(model.parameters()).device
    tokens: list[list[int]] = []
    was_training = model.training
    own_config = hf_model.generation_config
    # Set aside: generate() fills every option left unset from it (top_k, repetition_penalty, ...).
    hf_model.generation_config = GenerationConfig()
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            input_ids, attention_mask = _left_padded([prompt_ids[i] for i, _ in batch], pad_id)
            processors = LogitsProcessorList()
            if any(j is not None for _, j in batch):
                generators = [
                    None if j is None else torch.Generator().manual_seed(row_seed(seed, indices[i], j))
                    for i, j in batch
                ]
                processors.append(RowSampler(generators))
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=processors,
            )
            tokens.extend(output[:, input_ids.shape[1] :].tolist())
    finally:
        hf_model.generation_config = own_config
        model.train(was_training)
    stop_set = set(stop)
    completions = []
    for generated in tokens:
        kept, ended = _cut(generated, stop_set)
        completions.append(Completion(tokenizer.decode(kept, skip_special_tokens=True), kept, ended))
    return completions


def sample_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    k: int,
    seed: int,
    max_new_tokens: int,
    *,
    batch_size: int = 256,
) -> list[list[str]]:
    """Texts of :func:`generate_completions` sampling ``k`` per prompt from the prompt strings.

    Prompts are tokenised the way training tokenises a plain prompt
    (``tokenizer(prompt, add_special_tokens=True)``), so samples continue the token rows a policy is
    trained on.

    Returns:
        ``completions[i][j]``: the j-th completion of prompt ``i``, decoded without special tokens.
    """
    prompt_ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    drawn = generate_completions(
        model, tokenizer, prompt_ids, k=k, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [[completion.text for completion in row] for row in drawn]
