"""Gold-task data names and labels: ``builtin:gold/...`` parsing and the Bradley-Terry label noise."""

from __future__ import annotations

import math
import random

import pytest

from ipo_lightning.builtin import resolve_data_path, resolve_model_path
from ipo_lightning.errors import ConfigError
from ipo_lightning.gold.language import NAMES, TOPICS, split_requests
from ipo_lightning.gold.pairs import GoldSetSpec, bradley_terry_labels, flip_probability, parse_spec


def test_spec_defaults_and_knobs() -> None:
    assert parse_spec("gold/train") == GoldSetSpec("train", 2000, 0.5, 0)
    assert parse_spec("gold/val") == GoldSetSpec("val", 200, 0.0, 0)
    assert parse_spec("gold/ood?pairs=300") == GoldSetSpec("ood", 300, 0.0, 0)
    spec = parse_spec("gold/train?pairs=1000&temperature=0.25&seed=3")
    assert spec == GoldSetSpec("train", 1000, 0.25, 3)
    assert spec.file_name == "train-pairs1000-temperature0.25-seed3.jsonl"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("builtin:gold/test", "source 'builtin:gold/test'; available: builtin:gold/train, builtin:gold/val"),
        ("builtin:gold", "unknown built-in data source 'builtin:gold'"),
        ("builtin:gold/train?pair=10", "bad knob 'pair=10'; use pairs=N, temperature=T or seed=S"),
        ("builtin:gold/train?pairs", "bad knob 'pairs'"),
        ("builtin:gold/train?pairs=20000", "pairs must be in [50, 10000]"),
        ("builtin:gold/train?pairs=many", "pairs and seed must be integers, temperature a number"),
        ("builtin:gold/val?temperature=-1", "temperature must be a finite number >= 0"),
        ("builtin:gold/val?temperature=nan", "temperature must be a finite number >= 0"),
    ],
)
def test_bad_names_are_one_clear_error_before_anything_is_built(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_data_path(name)
    assert message in str(error.value)
    assert str(error.value).startswith(("unknown built-in data source", f"data source {name!r}"))


def test_unknown_builtin_model_lists_gold() -> None:
    with pytest.raises(ConfigError, match="available: builtin:quickstart, builtin:gold"):
        resolve_model_path("builtin:golden")


def test_flip_probability_is_the_bradley_terry_probability_of_the_worse_completion() -> None:
    assert flip_probability(3.0, 2.0, 0.5) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert flip_probability(2.0, 3.0, 0.5) == flip_probability(3.0, 2.0, 0.5)
    assert flip_probability(1.0, 1.0, 0.5) == 0.5
    assert flip_probability(3.0, 2.0, 0.0) == 0.0


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0])
def test_empirical_flip_rate_matches_the_configured_noise(temperature: float) -> None:
    """Over many pairs of gold-like rewards, flips match the sum of flip_prob within binomial error."""
    values = [0.5 * i for i in range(11)]  # 0.0 .. 5.0, the gold reward's grid
    draw = random.Random(7)
    pairs = [(draw.choice(values), draw.choice(values)) for _ in range(40000)]
    pairs = [(a, b) for a, b in pairs if a != b]
    labels = bradley_terry_labels([a for a, _ in pairs], [b for _, b in pairs], temperature, random.Random(8))
    flips = sum((a < b) == a_chosen for (a, b), a_chosen in zip(pairs, labels, strict=True))
    probs = [flip_probability(a, b, temperature) for a, b in pairs]
    expected = sum(probs)
    sd = math.sqrt(sum(p * (1 - p) for p in probs))
    assert abs(flips - expected) < 4 * sd, (flips, expected, sd)
    # And per gap, e.g. a one-point gap alone: rate sigmoid(-1 / T) within four binomial sd.
    one = [i for i, (a, b) in enumerate(pairs) if abs(a - b) == 1.0]
    p = flip_probability(1.0, 0.0, temperature)
    rate = sum((pairs[i][0] < pairs[i][1]) == labels[i] for i in one) / len(one)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(one))


def test_temperature_zero_gives_exact_labels() -> None:
    labels = bradley_terry_labels([1.0, 0.0, 2.5], [0.5, 3.0, 1.0], 0.0, random.Random(0))
    assert labels == [True, False, True]


def test_val_prompts_are_new_and_ood_prompts_are_new_families() -> None:
    train = {r.text for r in split_requests("train")}
    val = {r.text for r in split_requests("val")}
    ood = split_requests("ood")
    assert train and val and not train & val
    assert {r.family for r in ood} == {"remind", "apology"}
    assert not {r.family for r in split_requests("train")} & {"remind", "apology"}
    # The slots of every family come from the same lexicon.
    assert {r.name for r in ood} == set(NAMES) and {r.topic for r in ood} == set(TOPICS)
