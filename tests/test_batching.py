"""Padding-free and prefix-shared batching against the plain padded path and a one-row-at-a-time oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ipo_lightning.batching import (
    BATCHING_CHOICES,
    BatchingTarget,
    batch_scores,
    build_layout,
    check_batching_option,
    check_model_batching,
    resolve_batching,
)
from ipo_lightning.data.collator import PairwiseCollator
from ipo_lightning.errors import ConfigError

PAD = 0


def _pairs(vocab: int, spans: list[tuple[int, int, int]], seed: int = 0) -> list[dict[str, list[int]]]:
    """Pairs of (prompt, chosen, rejected) lengths with random tokens, as the tokenizer would give them."""
    generator = torch.Generator().manual_seed(seed)

    def ids(count: int) -> list[int]:
        return torch.randint(5, vocab, (count,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in spans]


# Very different lengths: a 1-token prompt, a 1-token completion, a long pair beside short ones.
UNEVEN = [(3, 5, 2), (1, 9, 1), (20, 2, 17), (6, 1, 1), (2, 30, 4)]


def _oracle(model: torch.nn.Module, features: list[dict[str, list[int]]]) -> list[list[float]]:
    """Completion-token log-probs of every sequence (chosen ones, then rejected), one unpadded row each."""
    sequences = [(f["prompt_ids"], f["chosen_ids"]) for f in features]
    sequences += [(f["prompt_ids"], f["rejected_ids"]) for f in features]
    out = []
    for prompt, completion in sequences:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
        out.append([logp[t - 1, ids[0, t]].item() for t in range(max(len(prompt), 1), ids.shape[1])])
    return out


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest, tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    ).eval()


@pytest.mark.parametrize("batching", BATCHING_CHOICES)
@pytest.mark.parametrize("spans", [UNEVEN, [(4, 6, 3)]], ids=["uneven", "one_pair"])
def test_token_logprobs_match_oracle(model: torch.nn.Module, batching: str, spans) -> None:
    features = _pairs(model.config.vocab_size, spans)
    batch = PairwiseCollator(pad_token_id=PAD)(features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        scores = batch_scores(model, *rows, batching=batching)
    expected = _oracle(model, features)
    assert scores.counts.tolist() == [len(tokens) for tokens in expected]
    assert scores.sequence_ids.tolist() == [i for i, tokens in enumerate(expected) for _ in tokens]
    flat = [value for tokens in expected for value in tokens]
    assert scores.token_logps.dtype == torch.float32
    assert scores.token_logps.tolist() == pytest.approx(flat, abs=1e-5)
    # float32 sums of up to 30 tokens against float64 sums: 1e-5 per token.
    sums = [sum(tokens) for tokens in expected]
    assert scores.sums.tolist() == pytest.approx(sums, abs=1e-5 * max(map(len, expected)))
    means = [sum(tokens) / len(tokens) for tokens in expected]
    assert scores.sequence_logps(length_normalize=True).tolist() == pytest.approx(means, abs=1e-5)


@pytest.mark.parametrize("batching", ["padding_free", "prefix_shared"])
def test_equal_to_padded_path_values_and_gradients(model: torch.nn.Module, batching: str) -> None:
    features = _pairs(model.config.vocab_size, UNEVEN, seed=1)
    batch = PairwiseCollator(pad_token_id=PAD)(features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    weights = torch.linspace(-1.0, 2.0, 2 * len(features))  # distinct weights per sequence

    def run(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        scores = batch_scores(model, *rows, batching=mode, chunk_size=7)
        (scores.sequence_logps(length_normalize=True) * weights).sum().backward()
        return scores.token_logps.detach(), [p.grad.clone() for p in model.parameters()]

    padded_tokens, padded_grads = run("padded")
    tokens, grads = run(batching)
    model.zero_grad()
    assert torch.allclose(tokens, padded_tokens, atol=1e-5, rtol=0)
    assert all(g.abs().sum() > 0 for g in padded_grads[-3:])  # the comparison below is not vacuous
    for mine, theirs in zip(grads, padded_grads, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)


def test_padding_free_rows_are_no_wider_than_longest_sequence(tiny_model_dir: Path) -> None:
    features = _pairs(400, UNEVEN)
    batch = PairwiseCollator(pad_token_id=PAD)(features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    layout = build_layout("padding_free", *rows, attn_implementation="sdpa")
    real_tokens = int(batch["attention_mask"].sum())
    assert layout.input_ids.shape[1] == batch["input_ids"].shape[1]  # the longest sequence
    assert layout.input_ids.numel() < batch["input_ids"].numel()  # less padding than the padded rows
    assert layout.attention_mask is None
    # Every real token appears exactly once, and positions restart at 0 for every sequence.
    assert int((layout.position_ids == 0).sum()) >= batch["input_ids"].shape[0]
    assert layout.input_ids.numel() >= real_tokens
    single = build_layout("padding_free", *rows, attn_implementation="flash_attention_2")
    assert single.input_ids.shape == (1, real_tokens)


def test_prefix_shared_mask_hides_chosen_from_rejected() -> None:
    features = _pairs(400, [(2, 3, 2)])
    batch = PairwiseCollator(pad_token_id=PAD)(features)
    rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    layout = build_layout("prefix_shared", *rows, attn_implementation="eager", dtype=torch.float32)
    f = features[0]
    assert layout.input_ids[0].tolist() == f["prompt_ids"] + f["chosen_ids"] + f["rejected_ids"]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    allowed = (layout.attention_mask[0, 0] == 0).int().tolist()
    assert allowed[5] == [1, 1, 0, 0, 0, 1, 0]  # first rejected token: prompt and itself
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0]  # last chosen token: plain causal
    bool_mask = build_layout("prefix_shared", *rows, attn_implementation="sdpa").attention_mask
    assert bool_mask.dtype == torch.bool and torch.equal(bool_mask[0, 0].int(), torch.tensor(allowed))


def test_prefix_shared_rejects_rows_without_a_common_prompt() -> None:
    batch = PairwiseCollator(pad_token_id=PAD)(_pairs(400, [(3, 2, 2)]))
    batch["input_ids"][1, 0] += 1  # the rejected row's prompt differs
    with pytest.raises(ValueError, match="pair 0: chosen and rejected rows do not share their prompt"):
        build_layout("prefix_shared", batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_prefix_shared_with_an_unsuitable_attention_is_one_config_error(attn: str) -> None:
    with pytest.raises(ConfigError, match=f"model.batching=prefix_shared .*attn_implementation='{attn}'"):
        check_batching_option("prefix_shared", attn)
    check_batching_option("padding_free", attn)  # packed rows work with every kernel


def test_unknown_batching_is_a_config_error() -> None:
    expected = "model.batching must be one of auto, padded, padding_free, prefix_shared, got 'packed'"
    with pytest.raises(ConfigError, match=expected):
        check_batching_option("packed", "sdpa")


class _NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no position_ids (as some remote-code models)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        raise AssertionError("not called")


@pytest.mark.parametrize("batching", ["padding_free", "prefix_shared"])
def test_model_without_position_ids_is_a_config_error(batching: str) -> None:
    expected = f"model.batching={batching}: _NoPositions.forward takes no position_ids"
    with pytest.raises(ConfigError, match=expected):
        check_model_batching(_NoPositions(), batching)
    check_model_batching(_NoPositions(), "padded")


# ------------------------------------------------------------------ auto


@pytest.mark.parametrize(
    ("attention", "expected"),
    [
        ("sdpa", "prefix_shared"),
        ("eager", "prefix_shared"),
        (None, "prefix_shared"),  # transformers' default kernel: sdpa, else eager
        ("flash_attention_2", "padding_free"),
        ("flash_attention_3", "padding_free"),
        ("flex_attention", "padded"),
    ],
)
def test_auto_resolves_to_the_fastest_layout_of_the_attention(attention: str | None, expected: str) -> None:
    from transformers import LlamaForCausalLM

    target = BatchingTarget(name="llama", model_class=LlamaForCausalLM, attention=attention)
    assert resolve_batching("auto", [target]) == expected
    # An explicit choice is kept as it is (its own checks reject what does not fit).
    assert resolve_batching("padded", [target]) == "padded"


def test_auto_takes_the_best_layout_every_model_runs() -> None:
    from transformers import LlamaForCausalLM

    sdpa = BatchingTarget(name="policy", model_class=LlamaForCausalLM, attention="sdpa")
    flash = BatchingTarget(name="reference", model_class=LlamaForCausalLM, attention="flash_attention_2")
    assert resolve_batching("auto", [sdpa, flash]) == "padding_free"
    unknown = BatchingTarget(name="reference", model_class=None, attention="sdpa")
    assert resolve_batching("auto", [sdpa, unknown]) == "padded"
