"""Preference pairs of the ``builtin:gold`` task: two reference samples per prompt, gold-labelled.

``builtin:gold/<split>[?knob=value&...]`` names a set; the splits are ``train`` (training prompts),
``val`` (held-out prompts of the training families) and ``ood`` (prompts of new families), and
the knobs are:

- ``pairs``: number of pairs, 50 to 10000 (default 2000 for ``train``, 200 for ``val``/``ood``).
- ``temperature``: Bradley-Terry temperature T of the labels, >= 0 (default 0.5 for ``train``,
  0 for ``val``/``ood``, whose labels are then exact).
- ``seed``: which draw of samples and labels, an integer (default 0).

For each prompt the reference samples two completions (ancestral sampling at temperature 1);
pairs whose completions get the same gold reward are skipped (they carry no preference). The
first completion is *chosen* with probability ``p = sigmoid((r1 - r2) / T)`` (T = 0: the higher
reward always wins). So the label noise is known exactly: each record stores the rewards
(``gold_chosen``, ``gold_rejected``), the probability ``flip_prob = sigmoid(-|r1 - r2| / T)`` that
its label disagrees with the gold reward, and whether it does (``gold_flipped``). Records are
plain pairs (``prompt``, ``chosen``, ``rejected`` as text); the extra fields are ignored by training.

Sets are built on first use into the cache folder, next to the reference model they were sampled
from, and are the same on every later use (same machine and torch version).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ipo_lightning.errors import ConfigError
from ipo_lightning.gold.language import split_requests
from ipo_lightning.gold.reward import gold_reward

DATA_VERSION = 2
"""Part of the cache folder name: bumped whenever the drawn samples change (2: per-row generators)."""
SPLITS = ("train", "val", "ood")
PAIRS_RANGE = (50, 10000)
DEFAULT_PAIRS = {"train": 2000, "val": 200, "ood": 200}
DEFAULT_TEMPERATURE = {"train": 0.5, "val": 0.0, "ood": 0.0}
MAX_NEW_TOKENS = 80
"""Longest sampled completion in tokens; demonstrations need at most about 60."""


@dataclass(frozen=True)
class GoldSetSpec:
    """One ``builtin:gold/...`` data set: split plus knobs, validated."""

    split: str
    pairs: int
    temperature: float
    seed: int

    @property
    def file_name(self) -> str:
        """Cache file name; every knob is in it, so each set has its own file."""
        return f"{self.split}-pairs{self.pairs}-temperature{self.temperature:g}-seed{self.seed}.jsonl"


def parse_spec(name: str) -> GoldSetSpec:
    """Parse ``gold/<split>[?pairs=N&temperature=T&seed=S]`` (the part after ``builtin:``).

    Raises:
        ConfigError: unknown split or knob, a value that is not a number, or one out of range; the
            message names the data source.
    """
    source = f"builtin:{name}"
    path, _, query = name.partition("?")
    split = path.partition("/")[2]
    if split not in SPLITS:
        choices = ", ".join(f"builtin:gold/{s}" for s in SPLITS)
        raise ConfigError(f"unknown built-in data source {source!r}; available: {choices}")
    knobs: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, equals, value = part.partition("=")
        if key not in ("pairs", "temperature", "seed") or not equals:
            raise ConfigError(
                f"data source {source!r}: bad knob {part!r}; use pairs=N, temperature=T or seed=S, "
                "joined with '&'"
            )
        knobs[key] = value
    try:
        pairs = int(knobs.get("pairs", DEFAULT_PAIRS[split]))
        temperature = float(knobs.get("temperature", DEFAULT_TEMPERATURE[split]))
        seed = int(knobs.get("seed", 0))
    except ValueError:
        raise ConfigError(
            f"data source {source!r}: pairs and seed must be integers, temperature a number"
        ) from None
    if not PAIRS_RANGE[0] <= pairs <= PAIRS_RANGE[1]:
        raise ConfigError(f"data source {source!r}: pairs must be in [{PAIRS_RANGE[0]}, {PAIRS_RANGE[1]}]")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"data source {source!r}: temperature must be a finite number >= 0")
    return GoldSetSpec(split, pairs, temperature, seed)


def flip_probability(reward_a: float, reward_b: float, temperature: float) -> float:
    """Probability that a Bradley-Terry draw prefers the lower-reward completion of a pair."""
    gap = abs(reward_a - reward_b)
    if temperature == 0:
        return 0.5 if gap == 0 else 0.0
    return 1.0 / (1.0 + math.exp(gap / temperature))


def bradley_terry_labels(
    rewards_a: Sequence[float], rewards_b: Sequence[float], temperature: float, rng: random.Random
) -> list[bool]:
    """For each pair, whether ``a`` is chosen: a draw with ``P(a) = sigmoid((r_a - r_b) / temperature)``.

    ``temperature == 0`` gives the exact labels (the higher reward wins; a tie is a fair coin).
    One ``rng.random()`` is drawn per pair, whatever the temperature.
    """
    labels = []
    for reward_a, reward_b in zip(rewards_a, rewards_b, strict=True):
        flip = flip_probability(reward_a, reward_b, temperature)
        p_a = flip if reward_a < reward_b else 1.0 - flip if reward_a > reward_b else 0.5
        labels.append(rng.random() < p_a)
    return labels


def build_pairs(model_dir: str | Path, spec: GoldSetSpec) -> list[dict]:
    """The records of ``spec``, sampled from the reference model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipo_lightning.generation import sample_completions
    from ipo_lightning.tiny import one_thread

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = split_requests(spec.split)
    # Seeds differ per split, so val and ood samples are independent of the training samples.
    seed = spec.seed * 1000 + SPLITS.index(spec.split) * 100
    candidates: list[tuple[str, str, str, float, float]] = []
    position = 0
    with torch.inference_mode(), one_thread():
        while len(candidates) < spec.pairs:
            # About a fifth of the pairs are ties: draw a quarter more than still needed.
            count = math.ceil(1.25 * (spec.pairs - len(candidates))) + 8
            prompts = [requests[(position + i) % len(requests)].text for i in range(count)]
            completions = sample_completions(model, tokenizer, prompts, 2, seed + position, MAX_NEW_TOKENS)
            position += count
            firsts = [pair[0] for pair in completions]
            seconds = [pair[1] for pair in completions]
            rewards_a, rewards_b = gold_reward(prompts, firsts), gold_reward(prompts, seconds)
            for prompt, a, b, r_a, r_b in zip(prompts, firsts, seconds, rewards_a, rewards_b, strict=True):
                if r_a != r_b:
                    candidates.append((prompt, a, b, r_a, r_b))
    candidates = candidates[: spec.pairs]
    rng = random.Random(f"gold-labels-{spec.split}-{spec.seed}")
    rewards_a, rewards_b = [c[3] for c in candidates], [c[4] for c in candidates]
    labels = bradley_terry_labels(rewards_a, rewards_b, spec.temperature, rng)
    records = []
    for (prompt, a, b, r_a, r_b), a_chosen in zip(candidates, labels, strict=True):
        chosen, rejected, r_chosen, r_rejected = (a, b, r_a, r_b) if a_chosen else (b, a, r_b, r_a)
        records.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "gold_chosen": r_chosen,
                "gold_rejected": r_rejected,
                "flip_prob": flip_probability(r_a, r_b, spec.temperature),
                "gold_flipped": r_chosen < r_rejected,
            }
        )
    return records


def write_pairs(model_dir: str | Path, spec: GoldSetSpec, folder: Path) -> Path:
    """``folder / spec.file_name``, built unless it exists; written to a temporary file, then renamed."""
    target = folder / spec.file_name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    records = build_pairs(model_dir, spec)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        # Atomic: a concurrent builder writes the same content, whichever rename lands last.
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def bayes_accuracy(path: str | Path) -> float:
    """The best held-out accuracy any scorer can expect on a pairs file with known label noise.

    That is ``mean(1 - flip_prob)`` over its records: a record's ``flip_prob`` is the probability that
    its label disagrees with the gold reward, so the gold reward itself matches a label with
    probability ``1 - flip_prob``, and no scorer does better on average. ``path`` is a JSONL file or a
    ``builtin:gold/<split>[?knobs]`` source (built on first use).

    Raises:
        DataError: no records, a line that is not a JSON object, or a ``flip_prob`` that is not a
            number in [0, 1]; the message names the file and line.
    """
    from ipo_lightning.builtin import resolve_data_path
    from ipo_lightning.errors import DataError

    file = Path(resolve_data_path(str(path)))
    total, count = 0.0, 0
    with file.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{file}, line {line_number}: not a JSON object") from None
            flip = record.get("flip_prob") if isinstance(record, dict) else None
            if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0.0 <= flip <= 1.0:
                raise DataError(f"{file}, line {line_number}: field 'flip_prob': expected a number in [0, 1]")
            total += 1.0 - float(flip)
            count += 1
    if count == 0:
        raise DataError(f"{file}: no records")
    return total / count
