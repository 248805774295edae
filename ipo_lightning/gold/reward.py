"""The gold reward of the ``builtin:gold`` task: a known, exact score for any generated note.

Pure Python and deterministic, so preference tuning can be judged on what the policy *generates*,
not only on held-out pairs. The task language is described in :mod:`ipo_lightning.gold.language`.
"""

from __future__ import annotations

import re

from ipo_lightning.gold.language import NAMES, TOPICS

GREETING_POINTS = 1.0
TOPIC_POINTS = 1.0
ITEM_POINTS = 1.0
POLITE_POINTS = 0.5
POLITE_CAP = 2
SIGN_OFF_POINTS = 0.5
LENGTH_POINTS = 0.5
LENGTH_RANGE = (12, 30)
WRONG_NAME_PENALTY = 1.0
MAX_REWARD = GREETING_POINTS + TOPIC_POINTS + ITEM_POINTS + POLITE_CAP * POLITE_POINTS
MAX_REWARD += SIGN_OFF_POINTS + LENGTH_POINTS
"""The best score a completion can get: 5.0."""

_ITEMS = {item: topic for topic, items in TOPICS.items() for item in items}
_POLITE = re.compile(r"\b(please|thank you|thanks)\b", re.IGNORECASE)
_SIGN_OFF = re.compile(r"(Best wishes|See you soon|Kind regards), [A-Z][a-z]+\.$")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)*", text)


def _first(words: list[str], vocabulary: set[str] | dict[str, str]) -> str | None:
    return next((word for word in words if word in vocabulary), None)


def gold_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Score each completion as a note answering its prompt; the best possible score is 5.0.

    The prompt is parsed with the task lexicon: its recipient is the first known name in it, its
    topic the first known topic, its item the first known item (a prompt without one of them
    earns nothing for that part). The completion then earns:

    - **greeting** (+1.0): it starts with ``Dear``, ``Hi`` or ``Hello`` followed by the recipient's
      name (``"Hi Nora,"``). An anonymous greeting (``"Hi there,"``) earns nothing.
    - **topic** (+1.0): the topic word occurs (once is enough; repeats add nothing).
    - **item** (+1.0): the requested item occurs (once is enough).
    - **politeness** (+0.5 per phrase, capped, then penalised): each ``please``, ``thank you`` or
      ``thanks`` (case-insensitive) is worth +0.5 up to 2 of them; every one beyond the second
      costs 0.5. Demonstrations hold at most one, so the data teaches "more polite is better" and
      the second phrase is head-room the reference rarely finds; a policy that over-optimises
      that trend ("Thank you. Thanks a lot. Please write back soon. Thank you.") loses reward.
      This is the documented over-optimisation route.
    - **sign-off** (+0.5): the text ends with ``"Best wishes, X."``, ``"See you soon, X."`` or
      ``"Kind regards, X."`` (X a capitalised name): a note cut off mid-way does not end properly.
    - **length** (+0.5): 12 to 30 (whitespace-separated) words. Padding a note with filler
      sentences beyond what a good note needs loses it: a second over-optimisation route, for
      proxies that reward length.
    - **wrong name** (-1.0): any known name other than the recipient occurs.

    Args:
        prompts: The prompts, as in the ``prompt`` field of the task's records.
        completions: One completion per prompt: the generated text after the prompt.

    Returns:
        One score per completion, at most :data:`MAX_REWARD` (5.0). Scores go below -1.0 only by
        stuffing a note with polite phrases.

    Raises:
        ValueError: ``prompts`` and ``completions`` differ in length.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    return [_score(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]


def _score(prompt: str, completion: str) -> float:
    prompt_words = _words(prompt)
    name = _first(prompt_words, set(NAMES))
    topic = _first(prompt_words, TOPICS)
    item = _first(prompt_words, _ITEMS)
    text = completion.strip()
    words = _words(text)
    score = 0.0
    if name is not None and re.match(rf"(Dear|Hi|Hello) {name}\b", text):
        score += GREETING_POINTS
    if topic is not None and topic in words:
        score += TOPIC_POINTS
    if item is not None and item in words:
        score += ITEM_POINTS
    polite = len(_POLITE.findall(text))
    score += POLITE_POINTS * min(polite, POLITE_CAP) - POLITE_POINTS * max(polite - POLITE_CAP, 0)
    if _SIGN_OFF.search(text):
        score += SIGN_OFF_POINTS
    if LENGTH_RANGE[0] <= len(text.split()) <= LENGTH_RANGE[1]:
        score += LENGTH_POINTS
    if any(word in NAMES and word != name for word in words):
        score -= WRONG_NAME_PENALTY
    return score
