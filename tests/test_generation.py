"""Batched generation: ancestral at temperature 1 whatever the generation config says, independent of
batching, greedy equal to step-by-step argmax, EOS handling, and the caller's RNG, mode and threads left
alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ipo_lightning.generation import (
    generate_completions,
    generate_with_greedy,
    inverse_cdf_tokens,
    row_seed,
    sample_completions,
)
from ipo_lightning.tiny import one_thread

PROMPTS = ["Write a short poem", "What is the capital of France? Paris is", "Thank", "The quick brown fox"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def either_model(
    request: pytest.FixtureRequest, model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The tiny Llama (rotary positions: a uniform shift cancels) or a tiny GPT-2 (learned absolute
    positions: left padding changes the logits unless positions count real tokens only)."""
    if request.param == "llama":
        return model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    gpt2 = GPT2LMHeadModel(config).eval()
    gpt2.generation_config.update(eos_token_id=eos, pad_token_id=pad)
    return gpt2


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [tiny_tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def _step_by_step(
    model: PreTrainedModel, prompt: list[int], max_new_tokens: int, pick, stop: set[int]
) -> list[int]:
    """Unbatched, uncached decoding: ``pick(logits)`` chooses each next token from the full forward."""
    ids = list(prompt)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        token = int(pick(logits))
        generated.append(token)
        ids.append(token)
        if token in stop:
            break
    return generated


def _inverse_cdf(generator: torch.Generator):
    """A token picker: one uniform u from ``generator``, the first token whose cumulative softmax passes u."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        probs = torch.softmax(logits.double(), -1)
        return torch.searchsorted(probs.cumsum(-1), u * probs.sum(), right=True)[0]

    return pick


def test_samples_do_not_depend_on_batch_size_or_batch_company(
    either_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    model = either_model
    kwargs = {"k": 3, "seed": 7, "max_new_tokens": 10}
    together = generate_completions(model, tiny_tokenizer, prompt_ids, batch_size=12, **kwargs)
    one_by_one = generate_completions(model, tiny_tokenizer, prompt_ids, batch_size=1, **kwargs)
    # Prompts 1 and 3 alone, with their indices: what a second DDP rank draws.
    apart = generate_completions(
        model, tiny_tokenizer, [prompt_ids[3], prompt_ids[1]], prompt_indices=[3, 1], batch_size=5, **kwargs
    )
    assert together == one_by_one
    assert apart == [together[3], together[1]]
    assert [len(row) for row in together] == [3, 3, 3, 3]
    other_seed = generate_completions(
        model, tiny_tokenizer, prompt_ids, batch_size=12, k=3, seed=8, max_new_tokens=10
    )
    assert other_seed != together
    # The samples of one prompt differ from each other (own generators, not one shared draw).
    assert len({tuple(c.token_ids) for c in together[0]}) == 3


def test_each_sample_is_the_inverse_cdf_draw_of_its_own_generator_at_temperature_1(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    """An independent, uncached, unbatched decoder with the same per-row generator draws the same tokens,
    even with a generation config that asks for top-k, top-p, a low temperature and a repetition penalty."""
    model.generation_config.update(
        top_k=3, top_p=0.5, temperature=0.2, repetition_penalty=5.0, do_sample=True
    )
    try:
        drawn = generate_completions(model, tiny_tokenizer, prompt_ids, k=2, seed=3, max_new_tokens=8)
    finally:
        model.generation_config.update(
            top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0, do_sample=False
        )
    for index, prompt in enumerate(prompt_ids):
        for sample in range(2):
            generator = torch.Generator().manual_seed(row_seed(3, index, sample))
            expected = _step_by_step(model, prompt, 8, _inverse_cdf(generator), {tiny_tokenizer.eos_token_id})
            assert drawn[index][sample].token_ids == expected


def test_first_tokens_follow_the_full_softmax(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    """Over many samples the first token's mean log-probability is -H(softmax): no truncation, T = 1."""
    prompt = prompt_ids[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    # Sharpen the model's head so a truncation (top-k 50 is transformers' default) would show.
    log_p = torch.log_softmax(logits * 8, -1)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(8)
    try:
        drawn = generate_completions(
            model, tiny_tokenizer, [prompt], k=3000, seed=0, max_new_tokens=1, batch_size=3000
        )
    finally:
        with torch.no_grad():
            head.weight.div_(8)
    values = torch.stack([log_p[c.token_ids[0]] for c in drawn[0]])
    probs = log_p.exp()
    entropy = -(probs * log_p).sum()
    spread = math.sqrt(float((probs * log_p**2).sum() - entropy**2))
    assert abs(float(values.mean() + entropy)) < 4 * spread / math.sqrt(3000)
    top50 = set(torch.topk(log_p, 50).indices.tolist())
    outside = sum(c.token_ids[0] not in top50 for c in drawn[0]) / 3000
    expected_outside = 1 - float(probs[list(top50)].sum())
    assert expected_outside > 0.05  # the test can tell a top-50 sampler apart
    assert abs(outside - expected_outside) < 4 * math.sqrt(expected_outside / 3000)


def test_inverse_cdf_never_picks_a_token_of_zero_probability() -> None:
    scores = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]] * 3)
    tokens = inverse_cdf_tokens(scores, torch.tensor([0.0, 0.4999, 0.99999999], dtype=torch.float64))
    assert tokens.tolist() == [1, 1, 3]


def test_greedy_is_step_by_step_argmax(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    greedy = generate_completions(
        model, tiny_tokenizer, prompt_ids, greedy=True, max_new_tokens=9, batch_size=3
    )
    for prompt, (completion,) in zip(prompt_ids, greedy, strict=True):
        expected = _step_by_step(model, prompt, 9, torch.argmax, {tiny_tokenizer.eos_token_id})
        assert completion.token_ids == expected
        assert completion.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    with pytest.raises(ValueError, match="greedy decoding gives one completion per prompt"):
        generate_completions(model, tiny_tokenizer, prompt_ids, greedy=True, k=2, max_new_tokens=3)


def test_greedy_rows_batched_with_sampled_rows_are_what_each_gives_alone(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    kwargs = {"seed": 4, "max_new_tokens": 7, "prompt_indices": [5, 6, 7, 8]}
    samples, greedy = generate_with_greedy(model, tiny_tokenizer, prompt_ids, k=2, batch_size=5, **kwargs)
    assert samples == generate_completions(model, tiny_tokenizer, prompt_ids, k=2, **kwargs)
    alone = generate_completions(model, tiny_tokenizer, prompt_ids, greedy=True, **kwargs)
    assert greedy == [row[0] for row in alone]


def test_completions_end_at_the_first_eos_which_is_kept(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    """The model's generation-config EOS ends a completion (EOS kept, nothing after it); without one,
    ``max_new_tokens`` tokens and ``ended`` false."""
    (free,) = generate_completions(model, tiny_tokenizer, prompt_ids[:1], greedy=True, max_new_tokens=8)[0]
    assert not free.ended and len(free.token_ids) == 8
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    own_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        (ended,) = generate_completions(model, tiny_tokenizer, prompt_ids[:1], greedy=True, max_new_tokens=8)[
            0
        ]
        # In a batch with a longer-running row the finished row is padded: the padding is not kept.
        batched = generate_completions(
            model, tiny_tokenizer, [prompt_ids[0], prompt_ids[1]], greedy=True, max_new_tokens=8
        )
    finally:
        model.generation_config.eos_token_id = own_eos
    assert ended.ended and ended.token_ids == free.token_ids[: first + 1]
    assert batched[0][0] == ended
    assert model.generation_config.eos_token_id == own_eos


def test_global_rng_mode_and_generation_config_are_left_alone(
    model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]]
) -> None:
    model.train()
    config = model.generation_config
    state = torch.random.get_rng_state()
    try:
        generate_completions(model, tiny_tokenizer, prompt_ids, k=2, max_new_tokens=4)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert model.training and model.generation_config is config
    finally:
        model.eval()


def test_sample_completions_are_the_texts_of_generate_completions(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = sample_completions(model, tokenizer, PROMPTS[:3], 3, seed=5, max_new_tokens=6, batch_size=4)
    ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in PROMPTS[:3]]
    drawn = generate_completions(model, tokenizer, ids, k=3, seed=5, max_new_tokens=6)
    assert texts == [[c.text for c in row] for row in drawn]


def test_one_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
