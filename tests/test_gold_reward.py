"""The gold reward scores hand-made notes as its docstring says, the over-optimisation route included."""

from __future__ import annotations

import random
import statistics

import pytest

from ipo_lightning.gold.language import demonstration, split_requests
from ipo_lightning.gold.reward import MAX_REWARD, gold_reward

PROMPT = "Invite Nora to the picnic. Mention the lemonade.\n"
# Every part present: greeting 1 + topic 1 + item 1 + two polite phrases 1 + sign-off 0.5 + 26 words 0.5.
PERFECT = (
    "Hi Nora, Would you like to join me at the picnic? I have the lemonade ready. "
    "Thank you. Please write back soon. See you soon, Sam."
)


def score(completion: str, prompt: str = PROMPT) -> float:
    return gold_reward([prompt], [completion])[0]


def test_a_note_with_every_part_gets_the_maximum() -> None:
    assert MAX_REWARD == 5.0
    assert score(PERFECT) == 5.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # No greeting with the name: -1 (an anonymous greeting earns nothing either).
        (PERFECT.replace("Hi Nora,", "Hi there,"), 4.0),
        # The greeting must open the note.
        ("So, " + PERFECT, 4.0),
        # Topic missing: -1.
        (PERFECT.replace("at the picnic", "at the place"), 4.0),
        # Item missing: -1.
        (PERFECT.replace("the lemonade", "everything"), 4.0),
        # One polite phrase instead of two: -0.5.
        (PERFECT.replace(" Please write back soon.", " It is fine."), 4.5),
        # No sign-off at the end: -0.5.
        (PERFECT.replace(" See you soon, Sam.", " See you there at noon then."), 4.5),
        # Cut off mid-sentence: no sign-off.
        (PERFECT[:-6], 4.5),
        # Another known name than the recipient: -1.
        (PERFECT.replace("I have", "Omar has"), 4.0),
        # Nothing of the note at all.
        ("ok", 0.0),
    ],
)
def test_each_part_is_worth_what_the_docstring_says(completion: str, expected: float) -> None:
    assert score(completion) == pytest.approx(expected)


def test_repeating_the_topic_or_item_adds_nothing() -> None:
    repeated = PERFECT.replace("I have the lemonade ready.", "The picnic and the lemonade, lemonade.")
    assert score(repeated) == 5.0


def test_length_sweet_spot_is_12_to_30_words() -> None:
    base = "Hi Nora, the picnic has lemonade."  # 6 words: greeting, topic, item, too short
    assert score(base) == 3.0
    padded = base + " It is fine." * 2  # 12 words
    assert score(padded) == 3.5
    assert score(base + " It is fine." * 8) == 3.5  # 30 words
    assert score(base + " It is fine." * 9) == 3.0  # 33 words: padding loses the length points


def test_politeness_is_capped_then_penalised_the_over_optimisation_route() -> None:
    body = "Hi Nora, the picnic has lemonade and more."
    points = [score(body + " Thanks." * n) for n in range(6)]
    # +0.5 for each of the first two, -0.5 for each one beyond (8 to 11 words: no length points yet).
    assert points[:4] == [3.0, 3.5, 4.0, 3.5]
    # Four polite phrases in a 26-word note: +1.0 for the first two, -1.0 for the two beyond.
    stuffed = PERFECT.replace("Please write back soon.", "Please, thanks, thank you.")
    assert score(stuffed) == 4.0
    # Demonstrations never hold more than one polite phrase, so "more is better" is all the data shows.
    rng = random.Random(0)
    requests = split_requests("train")[:400]
    notes = [demonstration(request, rng) for request in requests]
    counts = [sum(note.count(p) for p in ("Thank you", "Thanks", "Please")) for note in notes]
    assert max(counts) == 1


def test_demonstrations_leave_head_room() -> None:
    rng = random.Random(1)
    requests = split_requests("train")[:1000]
    notes = [demonstration(request, rng) for request in requests]
    rewards = gold_reward([r.text for r in requests], notes)
    assert 2.0 < statistics.fmean(rewards) < 3.5
    assert max(rewards) == MAX_REWARD - 0.5  # the second polite phrase is never demonstrated


def test_prompt_parse_uses_the_lexicon_and_unknown_prompts_earn_only_form() -> None:
    other = "Apologise to Omar for missing the hike. Bring up the compass.\n"
    note = "Dear Omar, I missed the hike. The compass is here. Thanks. Best wishes, Jo."
    assert score(note, other) == 5.0 - 0.5
    # Polite, sign-off and length only; and "Omar" is now a wrong name.
    assert score(note, "Write anything.\n") == 0.5 + 0.5 + 0.5 - 1.0


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        gold_reward([PROMPT, PROMPT], [PERFECT])
