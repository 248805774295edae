"""The synthetic task language of the ``builtin:gold`` task: short notes written on request.

A prompt asks for a note to a named person about a topic and names one item the note should
mention, e.g. ``"Invite Nora to the picnic. Mention the lemonade.\\n"``. A demonstration completion
is a short note built from optional parts, each present only some of the time, so the
demonstrations (and a model trained on them) vary in quality::

    [greeting] [topic sentence] [item sentence] [fillers] [polite phrase] [sign-off]
    Hi Nora, Would you like to join me at the picnic? I have the lemonade ready. Thank you.
    See you soon, Sam.

Prompts come in *families* (kinds of request, each with two templates): ``note``, ``thanks`` and
``invite`` are in-distribution (the reference model is trained on them; ``train`` and ``val``
prompts), ``remind`` and ``apology`` are out-of-distribution (``ood`` prompts only; never seen in
training). All names, topics and items are shared by every family. Which in-distribution prompts
are held out for ``val`` is fixed by :data:`SEED`: every val prompt is a (template, name, topic,
item) combination that no training prompt or demonstration uses.

Everything here is stdlib ``random`` with string seeds, so it is the same on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SEED = 20251201
VAL_FRACTION = 0.15

NAMES = [
    "Mira", "Omar", "Lena", "Theo", "Ines", "Ravi", "Nora", "Felix",
    "Ada", "Hugo", "Zoe", "Ivan", "Lucia", "Kai", "Elsa", "Milo",
]  # fmt: skip
"""Recipients. A note that names anyone else than the recipient is penalised by the gold reward."""

TOPICS: dict[str, list[str]] = {
    "garden": ["roses", "tomatoes", "hose"],
    "picnic": ["sandwiches", "blanket", "lemonade"],
    "concert": ["tickets", "violin", "seats"],
    "trip": ["train", "map", "suitcase"],
    "party": ["cake", "music", "balloons"],
    "meeting": ["report", "slides", "agenda"],
    "dinner": ["soup", "wine", "dessert"],
    "move": ["boxes", "van", "keys"],
    "game": ["ball", "team", "score"],
    "class": ["homework", "books", "exam"],
    "wedding": ["flowers", "dress", "rings"],
    "hike": ["boots", "trail", "compass"],
}
"""Topic -> the items a prompt about it may ask to mention. Every word occurs in one place only."""

ITEMS = [item for items in TOPICS.values() for item in items]

ID_FAMILIES: dict[str, list[str]] = {
    "note": [
        "Write a note to {name} about the {topic}. Mention the {item}.",
        "Send {name} a short note about the {topic}, and mention the {item}.",
    ],
    "thanks": [
        "Thank {name} for helping with the {topic}. Mention the {item}.",
        "Write {name} a thank-you note for the {topic}. Do mention the {item}.",
    ],
    "invite": [
        "Invite {name} to the {topic}. Mention the {item}.",
        "Ask {name} to come to the {topic}, and mention the {item}.",
    ],
}
OOD_FAMILIES: dict[str, list[str]] = {
    "remind": [
        "Remind {name} about the {topic}. Do not forget the {item}.",
        "Write {name} a reminder for the {topic} that mentions the {item}.",
    ],
    "apology": [
        "Apologise to {name} for missing the {topic}. Bring up the {item}.",
        "Say sorry to {name} about the {topic}, and bring up the {item}.",
    ],
}

GREETINGS = ["Dear {name},", "Hi {name},", "Hello {name},"]
ANONYMOUS_GREETINGS = ["Hi there,", "Hello,"]
TOPIC_SENTENCES: dict[str, list[str]] = {
    "note": ["I wanted to tell you about the {topic}.", "Here is some news about the {topic}."],
    "thanks": ["I am grateful for your help with the {topic}.", "The {topic} went well because of you."],
    "invite": ["Would you like to join me at the {topic}?", "I am planning the {topic} for Sunday."],
}
ITEM_SENTENCES = ["The {item} will be there.", "Do not forget the {item}.", "I have the {item} ready."]
FILLERS = [
    "It has been a busy week.",
    "The weather is lovely today.",
    "I hope you are well.",
    "All is fine here.",
]
POLITE_PHRASES = ["Thank you.", "Please write back soon.", "Thanks a lot."]
SENDERS = ["Sam", "Alex", "Jo"]
SIGN_OFFS = ["Best wishes, {sender}.", "See you soon, {sender}.", "Kind regards, {sender}."]

# How often each part is in a demonstration: the reference learns these rates, which leaves
# head-room for preference tuning (see ipo_lightning.gold.reward for what each part is worth).
P_NAMED_GREETING = 0.6
P_ANONYMOUS_GREETING = 0.2
P_TOPIC_SENTENCE = 0.75
P_ITEM_SENTENCE = 0.5
P_POLITE = 0.5
P_SIGN_OFF = 0.6
FILLER_COUNT_WEIGHTS = [0.3, 0.3, 0.25, 0.15]  # 0, 1, 2 or 3 filler sentences


@dataclass(frozen=True)
class Request:
    """One prompt: its family, template index and the slots filled in."""

    family: str
    template: int
    name: str
    topic: str
    item: str

    @property
    def text(self) -> str:
        """The prompt text; the trailing newline separates it from the completion."""
        templates = {**ID_FAMILIES, **OOD_FAMILIES}[self.family]
        return templates[self.template].format(name=self.name, topic=self.topic, item=self.item) + "\n"


def _requests(families: dict[str, list[str]]) -> list[Request]:
    return [
        Request(family, index, name, topic, item)
        for family, templates in families.items()
        for index in range(len(templates))
        for name in NAMES
        for topic, items in TOPICS.items()
        for item in items
    ]


def split_requests(split: str) -> list[Request]:
    """All prompts of ``split`` (``train``, ``val`` or ``ood``) in a fixed shuffled order.

    ``train`` and ``val`` partition the in-distribution combinations; ``ood`` uses the new families.
    """
    if split == "ood":
        requests = _requests(OOD_FAMILIES)
        random.Random(f"gold-ood-{SEED}").shuffle(requests)
        return requests
    requests = _requests(ID_FAMILIES)
    random.Random(f"gold-split-{SEED}").shuffle(requests)
    held_out = round(VAL_FRACTION * len(requests))
    if split == "val":
        return requests[:held_out]
    if split == "train":
        return requests[held_out:]
    raise ValueError(f"unknown split {split!r}")


def demonstration(request: Request, rng: random.Random) -> str:
    """A demonstration note answering ``request`` (an in-distribution family), parts drawn from ``rng``."""
    parts: list[str] = []
    draw = rng.random()
    if draw < P_NAMED_GREETING:
        parts.append(rng.choice(GREETINGS).format(name=request.name))
    elif draw < P_NAMED_GREETING + P_ANONYMOUS_GREETING:
        parts.append(rng.choice(ANONYMOUS_GREETINGS))
    body: list[str] = []
    if rng.random() < P_TOPIC_SENTENCE:
        body.append(rng.choice(TOPIC_SENTENCES[request.family]).format(topic=request.topic))
    if rng.random() < P_ITEM_SENTENCE:
        body.append(rng.choice(ITEM_SENTENCES).format(item=request.item))
    fillers = rng.choices(range(len(FILLER_COUNT_WEIGHTS)), weights=FILLER_COUNT_WEIGHTS)[0]
    for _ in range(fillers):
        body.insert(rng.randrange(len(body) + 1), rng.choice(FILLERS))
    if not body:
        body.append(rng.choice(FILLERS))
    parts.extend(body)
    if rng.random() < P_POLITE:
        parts.append(rng.choice(POLITE_PHRASES))
    if rng.random() < P_SIGN_OFF:
        parts.append(rng.choice(SIGN_OFFS).format(sender=rng.choice(SENDERS)))
    return " ".join(parts)


def demonstrations(count: int, seed: int = SEED) -> list[tuple[str, str]]:
    """``count`` (prompt, demonstration) pairs over the training prompts, cycling through them."""
    rng = random.Random(f"gold-demos-{seed}")
    requests = split_requests("train")
    chosen = [requests[i % len(requests)] for i in range(count)]
    return [(request.text, demonstration(request, rng)) for request in chosen]


def corpus() -> list[str]:
    """Texts the tokenizer is trained on: every prompt of every family plus a few thousand notes."""
    texts = [request.text for request in _requests(ID_FAMILIES) + _requests(OOD_FAMILIES)]
    texts.extend(completion for _, completion in demonstrations(3000, seed=SEED + 1))
    return texts
