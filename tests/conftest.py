"""Shared fixtures: an offline environment and a tiny saved model/tokenizer loaded by path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# No network, ever: W&B offline, hub lookups off. Set before transformers/datasets are imported.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# A suite started inside a SLURM job must not make the fits it runs in this process SLURM tasks of
# that job (children get an environment without them too: tests.helpers.subprocess_env).
for _name in [name for name in os.environ if name.startswith("SLURM_")]:
    del os.environ[_name]

# Two cores are shared with subprocess tests: one thread each keeps timings sane.
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question politely and helpfully.",
    "Thank you for asking, here is a clear answer.",
    "No. Figure it out yourself, that is a stupid question.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea and the sky.",
    "The sea is blue, the sky is wide, the wind is calm tonight.",
    "Human: how do I bake bread? Assistant: mix flour, water, salt and yeast.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep datasets/W&B/builtin caches of the test session out of the user's home."""
    root = tmp_path_factory.mktemp("caches")
    for var, sub in [
        ("HF_DATASETS_CACHE", "hf_datasets"),
        ("IPO_LIGHTNING_CACHE", "ipo_lightning"),
        ("WANDB_DIR", "wandb"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ]:
        os.environ[var] = str(root / sub)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (random weights) and BPE tokenizer with a chat template, saved by path."""
    from ipo_lightning.tiny import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny_model")
    return save_tiny_model(directory, CORPUS, vocab_size=400, hidden_size=32, num_layers=2, num_heads=4)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of ``tiny_model_dir`` loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A one-process gloo group, enough for FSDP (1 or 2) to wrap and gather (destroyed afterwards)."""
    from tests.ranks import free_port

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
