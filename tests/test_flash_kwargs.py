"""flash-attention's padding-free row: its varlen boundaries, as transformers' flattening collator builds
them, passed to the model's attention layers (flash-attn itself cannot run here: the kwargs' path is
checked on the real model with sdpa, which ignores them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from ipo_lightning.batching import batch_scores, build_layout, layout_logits
from ipo_lightning.data.collator import PairwiseCollator
from tests.test_batching import UNEVEN, _pairs

FLASH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = PairwiseCollator(pad_token_id=0)(_pairs(vocab, UNEVEN))
    return batch["input_ids"], batch["attention_mask"], batch["completion_mask"]


@pytest.fixture(scope="module")
def sdpa_model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_single_row_equals_transformers_flattening_collator(attn: str) -> None:
    input_ids, attention_mask, completion_mask = _rows(400)
    layout = build_layout(
        "padding_free", input_ids, attention_mask, completion_mask, attn_implementation=attn
    )
    # The same sequences, each without its padding, through transformers' own padding-free collator.
    lengths = attention_mask.sum(dim=1).tolist()
    features = [{"input_ids": row[:length].tolist()} for row, length in zip(input_ids, lengths, strict=True)]
    expected = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert torch.equal(layout.input_ids, expected["input_ids"])
    assert torch.equal(layout.position_ids, expected["position_ids"])
    assert layout.flash_kwargs is not None and set(layout.flash_kwargs) == set(FLASH_KEYS)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert layout.flash_kwargs[key].dtype == expected[key].dtype == torch.int32
        assert torch.equal(layout.flash_kwargs[key], expected[key]), key
    for key in ("max_length_q", "max_length_k"):
        assert type(layout.flash_kwargs[key]) is int  # flash_attn_varlen_func wants a Python int
        assert layout.flash_kwargs[key] == expected[key] == max(lengths), key


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_row_packing_passes_no_flash_kwargs(attn: str) -> None:
    layout = build_layout("padding_free", *_rows(400), attn_implementation=attn)
    assert layout.input_ids.shape[0] > 1 and layout.flash_kwargs is None


def test_flash_kwargs_reach_every_attention_layer(sdpa_model: torch.nn.Module) -> None:
    layout = build_layout(
        "padding_free", *_rows(sdpa_model.config.vocab_size), attn_implementation="flash_attention_2"
    )
    seen: list[dict[str, object]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append({key: kwargs.get(key) for key in FLASH_KEYS})

    layers = sdpa_model.model.layers
    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            layout_logits(sdpa_model, layout)
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == len(layers)
    for kwargs in seen:  # the very objects the layout built, in every attention call
        assert all(kwargs[key] is layout.flash_kwargs[key] for key in FLASH_KEYS)


def test_single_row_scores_equal_padded_rows(sdpa_model: torch.nn.Module) -> None:
    """The flash-attention row (one row, collator order) scored with sdpa, which masks it block-diagonally
    from the restarting positions: the padded rows' log-probs."""
    rows = _rows(sdpa_model.config.vocab_size)
    layout = build_layout("padding_free", *rows, attn_implementation="flash_attention_2")
    assert layout.input_ids.shape[0] == 1
    with torch.no_grad():
        packed = layout_logits(sdpa_model, layout).scores()
        padded = batch_scores(sdpa_model, *rows, batching="padded")
    assert packed.sequence_ids.tolist() == padded.sequence_ids.tolist()
    assert torch.allclose(packed.token_logps, padded.token_logps, atol=1e-5, rtol=0)
    assert torch.allclose(packed.sums, padded.sums, atol=1e-4, rtol=0)
