"""The gold reference and the pairs sampled from it: fluent enough to score well, with head-room.

These tests build a reference with :data:`QUICK_RECIPE` (half the SFT steps of the shipped recipe,
under a minute on one core) once per session; the shipped ``builtin:gold`` is the same code run
longer, and scores higher (see the gold-task docs for its numbers).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipo_lightning.builtin import gold_data_path, gold_model_folder, gold_model_path
from ipo_lightning.gold.evaluate import sampled_rewards
from ipo_lightning.gold.pairs import build_pairs, parse_spec
from ipo_lightning.gold.reference import ReferenceRecipe
from ipo_lightning.gold.reward import MAX_REWARD, gold_reward
from ipo_lightning.tiny import build_tiny_llama

QUICK_RECIPE = ReferenceRecipe(steps=300)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def gold_reference_dir() -> Path:
    """The quick-recipe gold reference, built into the session's cache folder."""
    return gold_model_path(QUICK_RECIPE)


def test_reference_scores_far_above_random_weights_and_below_the_maximum(gold_reference_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gold_reference_dir)
    reference = AutoModelForCausalLM.from_pretrained(gold_reference_dir)
    config = reference.config
    random_model = build_tiny_llama(
        config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=1,
    )
    for split in ("val", "ood"):
        trained = statistics.fmean(sampled_rewards(reference, tokenizer, split, prompts=48, k=2))
        untrained = statistics.fmean(sampled_rewards(random_model, tokenizer, split, prompts=48, k=2))
        assert untrained < 0.5, (split, untrained)
        assert trained > untrained + 1.0, (split, trained, untrained)
        assert trained < MAX_REWARD - 1.5, (split, trained)


def test_reference_is_built_once_and_loads_by_path(gold_reference_dir: Path) -> None:
    stamp = (gold_reference_dir / "model.safetensors").stat().st_mtime_ns
    assert gold_model_path(QUICK_RECIPE) == gold_reference_dir
    assert (gold_reference_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert gold_model_folder(ReferenceRecipe()) != gold_reference_dir  # another recipe, another folder
    assert AutoTokenizer.from_pretrained(gold_reference_dir).eos_token == "<|endoftext|>"


def test_pairs_are_identical_when_built_twice_and_their_labels_are_recorded(gold_reference_dir: Path) -> None:
    spec = parse_spec("gold/train?pairs=60&temperature=0.5&seed=2")
    first = build_pairs(gold_reference_dir, spec)
    assert build_pairs(gold_reference_dir, spec) == first
    assert len(first) == 60
    for record in first:
        assert record["chosen"] != record["rejected"]
        assert record["gold_chosen"] != record["gold_rejected"]
        assert record["gold_flipped"] == (record["gold_chosen"] < record["gold_rejected"])
    prompts = [r["prompt"] for r in first]
    assert gold_reward(prompts, [r["chosen"] for r in first]) == [r["gold_chosen"] for r in first]
    assert gold_reward(prompts, [r["rejected"] for r in first]) == [r["gold_rejected"] for r in first]
    # Another seed, another draw.
    assert build_pairs(gold_reference_dir, parse_spec("gold/train?pairs=60&seed=3")) != first


def test_builtin_name_writes_the_set_into_the_cache_once(gold_reference_dir: Path) -> None:
    path = gold_data_path("gold/val?pairs=50", QUICK_RECIPE)
    assert path.parent.parent == gold_reference_dir.parent
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == build_pairs(gold_reference_dir, parse_spec("gold/val?pairs=50"))
    # Held-out labels are exact: the chosen note has the higher gold reward.
    assert all(r["gold_chosen"] > r["gold_rejected"] and r["flip_prob"] == 0.0 for r in records)
    stamp = path.stat().st_mtime_ns
    assert gold_data_path("gold/val?pairs=50", QUICK_RECIPE) == path
    assert path.stat().st_mtime_ns == stamp
