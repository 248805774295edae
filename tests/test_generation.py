"""Batched ancestral sampling: shapes, reproducibility, and the caller's RNG and threads left alone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipo_lightning.generation import sample_completions
from ipo_lightning.tiny import one_thread


def test_samples_are_k_per_prompt_reproducible_and_leave_the_global_rng(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["Write a short poem", "What is the capital of France?", "Thank you"]
    state = torch.random.get_rng_state()
    first = sample_completions(model, tokenizer, prompts, 3, seed=5, max_new_tokens=6, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [len(row) for row in first] == [3, 3, 3]
    # Other batching, same seed: the first batch of four rows is drawn identically.
    again = sample_completions(model, tokenizer, prompts, 3, seed=5, max_new_tokens=6, batch_size=4)
    assert again == first
    other = sample_completions(model, tokenizer, prompts, 3, seed=6, max_new_tokens=6, batch_size=4)
    assert other != first


def test_one_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
