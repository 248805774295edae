"""Small builders shared by tests: preference files and pairs with an obvious, learnable preference."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

GOOD = ["thank you", "here is a clear answer", "please", "happy to help"]
BAD = ["no", "figure it out yourself", "stupid question", "go away"]
TOPICS = ["the sea", "bread", "the sky", "a fox", "France", "a poem"]


def polite_pairs(count: int, offset: int = 0) -> list[dict[str, str]]:
    """``count`` plain pairs: the chosen reply is polite, the rejected one rude (deterministic)."""
    records = []
    for i in range(offset, offset + count):
        topic = TOPICS[i % len(TOPICS)]
        records.append(
            {
                "prompt": f"Human: tell me about {topic}. Assistant:",
                "chosen": f" {GOOD[i % len(GOOD)]}, {topic} is lovely.",
                "rejected": f" {BAD[i % len(BAD)]}, {topic}.",
            }
        )
    return records


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write ``records`` as JSON lines and return ``path``."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
