"""Tiny Llama-architecture models and byte-level BPE tokenizers built offline.

Used by the quickstart (``builtin:`` models), the tests and the benchmarks: a model built from a
config with random weights and a tokenizer trained on a small corpus, saved with ``save_pretrained``
and loaded back by path exactly as a hub model would be.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, IM_START, IM_END]

# ChatML, the template of Qwen and SmolLM. `{% generation %}` marks assistant text so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works as with real chat models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers.

    Args:
        corpus: texts to learn merges from.
        vocab_size: target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
        A fast tokenizer with pad/eos tokens and a ChatML chat template.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """Build a small ``LlamaForCausalLM`` with random weights drawn from ``seed``.

    The model is returned in eval mode, as ``from_pretrained`` would return it.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def save_tiny_model(
    directory: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    seed: int = 0,
    **model_kwargs: int | str,
) -> Path:
    """Build a tokenizer and a tiny Llama, save both to ``directory`` and return it.

    The folder then loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` like any hub checkpoint.
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    model = build_tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        **model_kwargs,  # type: ignore[arg-type]
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on a single CPU thread inside the block, then restore the thread count.

    The matrices of a tiny model are too small to split across threads: one thread is as fast on an
    idle machine and many times faster on a busy one, and results do not depend on the core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
