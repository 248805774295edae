"""Generate the quickstart preference data shipped in ``ipo_lightning/quickstart/``.

The task
--------
A user asks an assistant for practical advice ("How do I brew a good cup of green tea?",
"Any tips on how to fix a squeaky door? Thanks!"). Each record pairs two assistant replies:

- ``chosen`` is helpful and polite: it answers the request on topic with a concrete, correct tip,
  in one or two short sentences, usually with a friendly opener ("Happy to help.") and closer
  ("Hope this helps!").
- ``rejected`` shows one of six common failure modes of chat assistants:

  * **rude**: the same useful tip, wrapped in contempt ("Seriously? ... Look it up next time."),
    sometimes only at one end ("Sure! ... Figure out the rest yourself.");
  * **off-topic**: derails to advice about some other subject ("Never mind bread. ...");
  * **wrong answer**: friendly and concrete, but a tip for a different request (about 12% of
    pairs). This is the hard case: no word is wrong in itself, only the mismatch with the prompt, so
    bag-of-words scores sit at chance on it and a tiny model needs longer to learn it;
  * **refusal**: an unhelpful refusal of a harmless request ("Sorry, I can't help with that.");
  * **rambling**: repetitive filler that never gets to the point ("Well, rice, hmm, rice is rice...");
  * **vague**: polite but empty ("Sure! Just do it the usual way. Good luck!").

So the preference is the familiar "helpful, harmless, concise" rule, and it is visible in words and
short phrases, which a tiny randomly initialised model can pick up in a few minutes of CPU training.
It is not a single-token giveaway: chosen and rejected share openers, closers and tips (a rude
reply contains the very tip the chosen one gives; vague and wrong-answer replies have the same
friendly frame; some refusals start with "Sorry" or "Good question!"), and every part has several
phrasings.

The splits
----------
- ``train.jsonl``: 1400 pairs over 30 topics x 12 request templates, with optional greetings and
  sign-offs around the request.
- ``val.jsonl``: 200 pairs from the same distribution, but only from (topic, template)
  combinations that never occur in train, so every val prompt is unseen.
- ``ood.jsonl``: 200 pairs that keep the same preference while the surface shifts: 12 new topics
  (new vocabulary and tips), 8 new request templates (casual, lower-case, longer), new greetings and
  sign-offs, and half of every phrase pool (openers, closers, insults, refusals, fillers, ...) is
  replaced by phrasings never seen in train.

The output is deterministic (``random.Random`` with a fixed seed, stdlib only);
``tests/test_quickstart_data.py`` checks that the committed files match this script.

Usage::

    python scripts/make_quickstart_data.py [--out ipo_lightning/quickstart] [--seed 1234]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ipo_lightning" / "quickstart"
SEED = 1234
SIZES = {"train": 1400, "val": 200, "ood": 200}
VAL_COMBO_FRACTION = 0.15
MAX_WORDS = 25

# (task phrase used in the request, short subject noun, three correct tips)
ID_TOPICS: list[tuple[str, str, list[str]]] = [
    (
        "brew a good cup of green tea",
        "green tea",
        [
            "Use water just below boiling and steep the leaves for about two minutes.",
            "Take the leaves out after two or three minutes so the tea does not turn bitter.",
            "One teaspoon of leaves per cup is plenty, with water around 80 degrees.",
        ],
    ),
    (
        "boil a soft egg",
        "eggs",
        [
            "Lower the egg into boiling water and cook it for six minutes.",
            "Cook it for six minutes, then cool it in cold water so it peels easily.",
            "Start with eggs at room temperature and keep the water at a gentle boil.",
        ],
    ),
    (
        "keep a basil plant alive",
        "basil",
        [
            "Give it lots of sun and water it when the top of the soil feels dry.",
            "Pinch off the flowers and the top leaves so the plant grows bushy.",
            "Keep it in a sunny window and never let the pot sit in water.",
        ],
    ),
    (
        "fall asleep faster",
        "sleep",
        [
            "Keep the same bedtime every night and put your phone away an hour before.",
            "A cool, dark room and no coffee after lunch make a big difference.",
            "If you cannot sleep after twenty minutes, get up and read until you feel tired.",
        ],
    ),
    (
        "remember new vocabulary",
        "vocabulary",
        [
            "Review new words with flash cards a little every day instead of all at once.",
            "Use each new word in a sentence of your own, then review it the next day.",
            "Short daily reviews work better than one long session each week.",
        ],
    ),
    (
        "clean a cast iron pan",
        "cast iron",
        [
            "Rinse it with hot water, scrub it with salt, then dry it fully on the stove.",
            "Skip the dishwasher, dry it right away and rub in a thin layer of oil.",
            "Wipe it while it is warm, dry it on low heat and add a drop of oil.",
        ],
    ),
    (
        "start running as a beginner",
        "running",
        [
            "Start with short runs mixed with walking, three times a week.",
            "Run slowly enough to talk, and add only a few minutes each week.",
            "Alternate one minute of running with two minutes of walking for twenty minutes.",
        ],
    ),
    (
        "save money on groceries",
        "groceries",
        [
            "Plan your meals for the week and shop with a list.",
            "Buy store brands, cook in bulk and never shop when you are hungry.",
            "Check what is already in your fridge before you write a shopping list.",
        ],
    ),
    (
        "fix a squeaky door",
        "the door",
        [
            "Put a few drops of oil on the hinges and swing the door a few times.",
            "Lift out the hinge pin, rub it with soap or oil, and tap it back in.",
            "A little petroleum jelly on each hinge pin usually stops the squeak.",
        ],
    ),
    (
        "take better photos with my phone",
        "phone photos",
        [
            "Clean the lens, use natural light and tap the screen to focus.",
            "Shoot near a window, keep the horizon level and avoid the digital zoom.",
            "Turn on the grid and place your subject on one of the lines.",
        ],
    ),
    (
        "learn to juggle",
        "juggling",
        [
            "Start with one ball, tossing it from hand to hand at eye level.",
            "Get comfortable with two balls before you add the third one.",
            "Practice over a bed so dropped balls do not roll away.",
        ],
    ),
    (
        "keep bread fresh",
        "bread",
        [
            "Store it in a paper bag at room temperature and freeze what you will not eat soon.",
            "Slice it, freeze the slices and toast them straight from the freezer.",
            "Keep it out of the fridge, which makes bread go stale faster.",
        ],
    ),
    (
        "remove a coffee stain",
        "coffee stains",
        [
            "Blot it right away with cold water, then wash it with a little dish soap.",
            "Rinse the back of the fabric with cold water and dab on some liquid detergent.",
            "Do not rub it; blot it with cold water and a drop of vinegar.",
        ],
    ),
    (
        "stretch after sitting all day",
        "stretching",
        [
            "Stand up every hour and do slow neck rolls and shoulder circles.",
            "Try a standing forward fold and a gentle hip stretch for thirty seconds each.",
            "Reach your arms overhead, lean to each side and breathe slowly.",
        ],
    ),
    (
        "pack a small carry-on bag",
        "packing",
        [
            "Roll your clothes, pick one pair of shoes and use small pouches for cables.",
            "Lay everything out on the bed, then pack only half of it.",
            "Wear your bulkiest clothes on the trip and put liquids in one clear bag.",
        ],
    ),
    (
        "tune a guitar",
        "guitars",
        [
            "Use a clip-on tuner and turn each peg slowly until the note reads correctly.",
            "Tune the low E string first, then match each string to the one above it.",
            "Pluck one string at a time and tune up to the note, not down to it.",
        ],
    ),
    (
        "speed up a slow laptop",
        "laptops",
        [
            "Close programs you do not need and stop apps from opening at startup.",
            "Free up disk space, install updates and restart it once in a while.",
            "Check which program uses the most memory and close it.",
        ],
    ),
    (
        "make a to-do list that works",
        "to-do lists",
        [
            "Write down only three important tasks for today and start with the hardest.",
            "Break big tasks into small steps you can finish in under an hour.",
            "Keep one list, review it every morning and cross things off.",
        ],
    ),
    (
        "stay focused while studying",
        "studying",
        [
            "Study for twenty-five minutes, take a short break, and keep your phone in another room.",
            "Pick one clear goal for each session and turn off notifications.",
            "Work in short blocks with breaks, at the same desk every day.",
        ],
    ),
    (
        "cook rice on the stove",
        "rice",
        [
            "Rinse the rice, use one and a half cups of water per cup, and simmer it covered.",
            "Bring it to a boil, cover it, simmer on low for fifteen minutes, then let it rest.",
            "Do not lift the lid while it simmers, and let it sit five minutes before serving.",
        ],
    ),
    (
        "prepare for a job interview",
        "job interviews",
        [
            "Research the company and practice short answers about your past work.",
            "Prepare two stories that show your skills, and one question to ask them.",
            "Practice out loud with a friend and plan to arrive ten minutes early.",
        ],
    ),
    (
        "wash a wool sweater",
        "wool sweaters",
        [
            "Hand wash it in cool water with a gentle soap and dry it flat.",
            "Do not wring it; press the water out with a towel and lay it flat to dry.",
            "Use cool water and wool soap, and never put it in the dryer.",
        ],
    ),
    (
        "fix a flat bike tire",
        "bike tires",
        [
            "Take out the tube, find the hole in a bowl of water, and patch it.",
            "Remove the wheel, pry off the tire, and check inside for anything sharp.",
            "Carry a spare tube; swapping it is faster than patching on the road.",
        ],
    ),
    (
        "start a compost bin",
        "compost",
        [
            "Mix green scraps like peels with brown material like dry leaves, and keep it damp.",
            "Add fruit and vegetable scraps with dry leaves, and turn the pile once a week.",
            "Leave out meat and dairy, and keep the pile about as damp as a sponge.",
        ],
    ),
    (
        "get better at public speaking",
        "public speaking",
        [
            "Practice out loud several times and slow down when you feel nervous.",
            "Know your first minute by heart and look at a few friendly faces.",
            "Record yourself once, watch it, and fix one habit at a time.",
        ],
    ),
    (
        "make cold brew coffee",
        "cold brew",
        [
            "Mix coarse ground coffee with cold water, leave it in the fridge overnight, then strain it.",
            "Use one part coffee to eight parts water and steep it for twelve hours.",
            "Steep coarse grounds in cold water for half a day and filter it through paper.",
        ],
    ),
    (
        "back up my photos",
        "photo backups",
        [
            "Keep one copy on an external drive and another in cloud storage.",
            "Turn on automatic cloud backup and copy everything to a drive each month.",
            "Keep three copies: two at home on different drives and one somewhere else.",
        ],
    ),
    (
        "choose a ripe avocado",
        "avocados",
        [
            "Press it gently; a ripe one gives a little but is not mushy.",
            "Flick off the small stem; green underneath means it is ready.",
            "Pick one that is dark and slightly soft, and let hard ones ripen on the counter.",
        ],
    ),
    (
        "tie a bowline knot",
        "knots",
        [
            "Make a small loop, pass the end up through it, around the rope, and back down.",
            "Think of the rabbit coming out of the hole, around the tree, and back in.",
            "Form a loop, thread the end through, wrap it behind the line and pull it tight.",
        ],
    ),
    (
        "keep my houseplants healthy",
        "houseplants",
        [
            "Water only when the soil is dry an inch down, and give them bright, indirect light.",
            "Use pots with drainage holes, and water less often in winter.",
            "Wipe the dust off the leaves and turn the pots a little each week.",
        ],
    ),
]

OOD_TOPICS: list[tuple[str, str, list[str]]] = [
    (
        "teach a dog to sit",
        "dogs",
        [
            "Hold a treat above its nose, move it back until it sits, then reward it.",
            "Say sit once, guide it down with a treat, and praise it right away.",
            "Keep sessions to five minutes and reward every correct sit.",
        ],
    ),
    (
        "sharpen a kitchen knife",
        "knives",
        [
            "Hold the blade at a low angle on a whetstone and use smooth, even strokes.",
            "Soak the stone, keep a steady angle, and give each side the same number of strokes.",
            "Use a honing rod every week and a whetstone a few times a year.",
        ],
    ),
    (
        "write a thank-you note",
        "thank-you notes",
        [
            "Name the gift or favor, say how you will use it, and keep it short.",
            "Thank them by name, mention one detail, and send it within a week.",
            "Three warm sentences are enough: thanks, a detail, and a kind wish.",
        ],
    ),
    (
        "set up a small fish tank",
        "fish tanks",
        [
            "Run the filter for a few weeks before adding fish so the water can cycle.",
            "Use a water conditioner, add only a few fish at first, and test the water.",
            "Place it away from direct sun and change a quarter of the water every week.",
        ],
    ),
    (
        "bake banana bread",
        "banana bread",
        [
            "Use very ripe bananas, mix the batter gently, and bake for about an hour.",
            "Mash three brown bananas, fold in the flour without overmixing, and bake until set.",
            "Bake it until a toothpick comes out clean, then cool it before slicing.",
        ],
    ),
    (
        "lower my phone bill",
        "phone bills",
        [
            "Call your provider, ask about cheaper plans, and mention offers from competitors.",
            "Check how much data you really use and switch to a smaller plan.",
            "Ask for a loyalty discount and cancel extras you never use.",
        ],
    ),
    (
        "learn to touch type",
        "typing",
        [
            "Keep your fingers on the home row and practice ten minutes a day without looking.",
            "Use a free typing tutor and focus on accuracy before speed.",
            "Cover your hands with a cloth so you cannot look at the keys.",
        ],
    ),
    (
        "stop a nosebleed",
        "nosebleeds",
        [
            "Sit up, lean forward, and pinch the soft part of your nose for ten minutes.",
            "Lean forward, not back, and press the soft part of the nose firmly.",
            "Pinch just below the bony part and breathe through your mouth until it stops.",
        ],
    ),
    (
        "paint a small room",
        "painting",
        [
            "Tape the edges, use a primer, and roll on two thin coats of paint.",
            "Move the furniture out, cover the floor, and paint the corners with a brush first.",
            "Paint the ceiling first, then the walls, and let each coat dry.",
        ],
    ),
    (
        "pick a good watermelon",
        "watermelons",
        [
            "Look for a yellow spot where it sat on the ground, and pick a heavy one.",
            "Knock on it; a deep, hollow sound usually means it is ripe.",
            "Choose a heavy one with dull skin and a creamy yellow spot.",
        ],
    ),
    (
        "organize a messy closet",
        "closets",
        [
            "Take everything out, donate what you have not worn in a year, and group the rest.",
            "Sort clothes by type, use matching hangers, and keep daily items at eye level.",
            "Clear it in small sections, one shelf at a time.",
        ],
    ),
    (
        "calm down before an exam",
        "exams",
        [
            "Breathe in for four counts and out for six, and repeat a few times.",
            "Sleep well the night before, eat breakfast, and arrive early.",
            "Focus on one question at a time and remind yourself that you prepared.",
        ],
    ),
]

# Request templates; "{t}" is the task phrase.
ID_TEMPLATES = [
    "How do I {t}?",
    "Can you tell me how to {t}?",
    "What is the best way to {t}?",
    "Any tips on how to {t}?",
    "I want to {t}. Where should I start?",
    "Please explain how to {t}.",
    "Quick question: how should I {t}?",
    "What should I know to {t}?",
    "Could you help me {t}?",
    "I never know how to {t}. Any advice?",
    "Give me a simple way to {t}.",
    "Is there an easy way to {t}?",
]
OOD_TEMPLATES = [
    "hey, how would someone {t}?",
    "Need help: trying to {t} this weekend. Ideas?",
    "Walk me through how to {t}, step by step.",
    "My sister wants to {t}. What would you tell her?",
    "Is it hard to {t}? What matters most?",
    "Looking for advice on how to {t}.",
    "In a sentence or two, how does one {t}?",
    "so what's the trick to {t}?",
]

ID_PREAMBLES = [
    "",
    "",
    "",
    "Hi.",
    "Hello!",
    "I am a beginner.",
    "This is my first time.",
    "Sorry if this is basic.",
]
OOD_PREAMBLES = ["", "", "Good morning.", "Random question.", "Okay, so.", "Asking for a friend."]
ID_SUFFIXES = ["", "", "", "Thanks!", "Thank you.", "Keep it short, please."]
OOD_SUFFIXES = ["", "", "Cheers.", "Appreciate it.", "Short answer is fine."]

# Phrase pools: train/val draw from "shared" + "id", ood from "shared" + "ood".
POOLS: dict[str, dict[str, list[str]]] = {
    # Friendly frame of a good (or a politely vague) reply. "" means no opener/closer.
    "opener": {
        "shared": ["", "Sure!", "Happy to help.", "Good question!"],
        "id": ["Of course.", "Great question.", "Sure thing."],
        "ood": ["Absolutely.", "Gladly!", "Nice question."],
    },
    "closer": {
        "shared": ["", "Hope this helps!", "Good luck!"],
        "id": ["Hope that works for you.", "You've got this.", "Let me know how it goes."],
        "ood": ["Hope that is useful.", "Best of luck!", "Happy to help again."],
    },
    "rude_open": {
        "shared": ["Seriously?", "Ugh, fine.", "Obviously,"],
        "id": ["Wow, really?", "Come on.", "Whatever."],
        "ood": ["Are you kidding me?", "Oh great, this again.", "Sigh."],
    },
    "rude_close": {
        "shared": ["Look it up next time.", "Figure out the rest yourself.", "It's not that hard."],
        "id": ["Stop asking me basic stuff.", "Don't bother me again.", "Even a child knows that."],
        "ood": ["Do your own homework.", "What a waste of my time.", "Try using your brain."],
    },
    # Rude replies without any tip; "{t}" is the task phrase in second person.
    "rude_bare": {
        "shared": [
            "That is a dumb question. Everyone knows how to {t}.",
            "Why would I waste my time on that?",
        ],
        "id": ["Figure it out yourself. I am not your servant.", "You can't even {t}? Pathetic."],
        "ood": ["Nobody cares how you {t}. Go away.", "Honestly, that is a silly question. Stop it."],
    },
    # Off-topic derails; "{s}" is the asked subject, "{o}" the other subject, "{tip}" the other tip.
    "off_topic": {
        "shared": ["Never mind {s}. {tip}", "Forget about {s}, let's talk about {o} instead. {tip}"],
        "id": [
            "Honestly, {o} is more interesting. {tip}",
            "Instead of {s}, here is something else: {tip_lc}",
        ],
        "ood": ["Who cares about {s}? {tip}", "Let's change the subject to {o}. {tip}"],
    },
    "refusal": {
        "shared": [
            "Sorry, I can't help with that.",
            "I'd rather not answer that.",
            "I don't know. Ask someone else.",
        ],
        "id": [
            "That is not something I can help with.",
            "I won't answer questions about {s}.",
            "No idea, sorry. Try searching online.",
            "Happy to help with other things, but not with {s}.",
        ],
        "ood": [
            "I'm not going to help with that.",
            "Can't answer that one, sorry.",
            "Questions about {s} are not my thing. Ask somebody else.",
            "Good question! But I can't help with {s}, sorry.",
        ],
    },
    "ramble": {
        "shared": [
            "Well, {s}, hmm, {s} is {s}, you know, it really depends, it depends, it depends.",
            "So, um, basically, basically you just, um, you know, basically do the thing with {s}.",
        ],
        "id": [
            "Hmm, let me think, let me think, let me think about {s}, well, well, well, hmm.",
            "{S}? Oh, {s}, yes, {s}. {S} is a thing. Yes, {s}, {s}, {s}.",
        ],
        "ood": [
            "Right, so, right, {s}, right, it's like, it's like, you know, right, right.",
            "Okay okay okay, {s}, okay, so {s} is, um, okay, {s}, okay.",
        ],
    },
    # Polite but empty: no concrete advice.
    "vague": {
        "shared": ["Just do it the usual way.", "It depends on many things, so try what feels right."],
        "id": ["There are lots of ways; just pick one.", "You will figure it out as you go."],
        "ood": ["Just follow your instincts.", "Anything works, really, so just give it a try."],
    },
}

MODES = ["rude", "off_topic", "wrong_answer", "refusal", "ramble", "vague"]
MODE_WEIGHTS = [0.25, 0.15, 0.12, 0.18, 0.15, 0.15]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _second_person(task: str) -> str:
    return re.sub(r"\bmy\b", "your", task)


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _words(text: str) -> int:
    return len(text.split())


def _pool(name: str, split: str) -> list[str]:
    pool = POOLS[name]
    return pool["shared"] + pool["ood" if split == "ood" else "id"]


def _fit(*parts: str) -> str:
    """Join ``[opener, body, closer]``, dropping the closer, then the opener, to stay short."""
    opener, body, closer = parts
    for candidate in ((opener, body, closer), (opener, body, ""), ("", body, "")):
        text = _join(*candidate)
        if _words(text) <= MAX_WORDS:
            return text
    raise ValueError(f"reply too long: {body!r}")


def _chosen(rng: random.Random, split: str, task: str, tips: list[str]) -> str:
    opener = rng.choice(_pool("opener", split))
    closer = rng.choice(_pool("closer", split))
    tip = rng.choice(tips)
    form = rng.randrange(3)
    if form == 0:
        body = tip
    elif form == 1:
        body = f"To {_second_person(task)}, {_lower_first(tip)}"
    else:
        body = f"Try this: {_lower_first(tip)}"
    if _words(_join(opener, body)) > MAX_WORDS:
        body = tip
    return _fit(opener, body, closer)


def _rejected(
    rng: random.Random,
    split: str,
    mode: str,
    topic: tuple[str, str, list[str]],
    topics: list[tuple[str, str, list[str]]],
) -> str:
    task, subject, tips = topic
    if mode == "rude":
        if rng.random() < 0.3:
            return rng.choice(_pool("rude_bare", split)).format(t=_second_person(task))
        # Often only one end is rude and the other is a friendly stock phrase (passive-aggressive).
        opener = rng.choice(_pool("rude_open" if rng.random() < 0.7 else "opener", split))
        closer = rng.choice(_pool("rude_close" if rng.random() < 0.7 else "closer", split))
        if opener not in _pool("rude_open", split) and closer not in _pool("rude_close", split):
            closer = rng.choice(_pool("rude_close", split))
        return _fit(opener, rng.choice(tips), closer)
    if mode == "off_topic":
        other = rng.choice([t for t in topics if t[1] != subject])
        template = rng.choice(_pool("off_topic", split))
        tip = rng.choice(other[2])
        text = template.format(s=subject, o=other[1], tip=tip, tip_lc=_lower_first(tip))
        if _words(text) > MAX_WORDS:
            text = f"Never mind {subject}. {rng.choice(other[2])}"
        return text
    if mode == "wrong_answer":
        other = rng.choice([t for t in topics if t[1] != subject])
        return _chosen(rng, split, other[0], other[2])
    if mode == "refusal":
        return rng.choice(_pool("refusal", split)).format(s=subject)
    if mode == "ramble":
        return rng.choice(_pool("ramble", split)).format(s=subject, S=subject[:1].upper() + subject[1:])
    if mode == "vague":
        return _fit(
            rng.choice(_pool("opener", split)),
            rng.choice(_pool("vague", split)),
            rng.choice(_pool("closer", split)),
        )
    raise ValueError(mode)


def _prompt(rng: random.Random, split: str, task: str, template: str) -> str:
    preambles, suffixes = (OOD_PREAMBLES, OOD_SUFFIXES) if split == "ood" else (ID_PREAMBLES, ID_SUFFIXES)
    text = _join(rng.choice(preambles), template.format(t=task), rng.choice(suffixes))
    if _words(text) > MAX_WORDS:
        raise ValueError(f"prompt too long: {text!r}")
    return text


def _split_records(
    rng: random.Random,
    split: str,
    size: int,
    combos: list[tuple[int, int]],
    topics: list[tuple[str, str, list[str]]],
    templates: list[str],
    taken: set[tuple[str, str]],
) -> list[dict[str, str]]:
    """Draw ``size`` unique pairs, cycling through ``combos`` (topic, template) in shuffled rounds."""
    records: list[dict[str, str]] = []
    order: list[tuple[int, int]] = []
    attempts = 0
    while len(records) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError(f"cannot draw {size} unique pairs for {split}")
        if not order:
            order = list(combos)
            rng.shuffle(order)
        topic_index, template_index = order.pop()
        topic = topics[topic_index]
        prompt = _prompt(rng, split, topic[0], templates[template_index])
        chosen = _chosen(rng, split, topic[0], topic[2])
        mode = rng.choices(MODES, weights=MODE_WEIGHTS)[0]
        rejected = _rejected(rng, split, mode, topic, topics)
        key = (prompt, chosen)
        if key in taken or chosen == rejected:
            continue
        taken.add(key)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def generate(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """All three splits as lists of ``{"prompt", "chosen", "rejected"}`` records."""
    rng = random.Random(seed)
    id_combos = [(i, j) for i in range(len(ID_TOPICS)) for j in range(len(ID_TEMPLATES))]
    rng.shuffle(id_combos)
    n_val = round(VAL_COMBO_FRACTION * len(id_combos))
    val_combos, train_combos = sorted(id_combos[:n_val]), sorted(id_combos[n_val:])
    ood_combos = [(i, j) for i in range(len(OOD_TOPICS)) for j in range(len(OOD_TEMPLATES))]
    taken: set[tuple[str, str]] = set()
    return {
        "train": _split_records(rng, "train", SIZES["train"], train_combos, ID_TOPICS, ID_TEMPLATES, taken),
        "val": _split_records(rng, "val", SIZES["val"], val_combos, ID_TOPICS, ID_TEMPLATES, taken),
        "ood": _split_records(rng, "ood", SIZES["ood"], ood_combos, OOD_TOPICS, OOD_TEMPLATES, taken),
    }


def write(out: Path, seed: int = SEED) -> dict[str, Path]:
    """Write ``train.jsonl``, ``val.jsonl`` and ``ood.jsonl`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, records in generate(seed).items():
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    for split, path in write(args.out, args.seed).items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{split}: {count} pairs -> {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
