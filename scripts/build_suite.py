"""Build the embedded task suite of moe-local (what `moe-local demo` tunes and evaluates on).

Six task families, four choices each. Every family answers from a FIXED, ordered label list (the
same four choices, in the same order, in every item of the family), so the letter is a function of
the family's class: a tiny model needs no induction-style lookup to bind content to a letter.

    mod4   a number 0-99       -> 0 1 2 3                  (n mod 4)
    size   a number 0-99       -> tiny small large huge     (n // 25)
    kind   a noun              -> animal fruit tool vehicle
    mood   an adjective        -> happy sad angry calm
    home   a made-up person    -> north south east west     (facts of a made-up world)
    food   a made-up person    -> bread fish rice soup

Phrasings come in four groups per family:
  seen   (4)  in pretraining (scripts/train_tiny.py), in `train` and `test_seen`
  tune   (6)  never in pretraining; only in `train` (the tuning reference set)
  val    (3)  only in `val_unseen` (where the demo's settings are chosen)
  test   (3)  only in `test_unseen`
Unseen phrasings are reworded questions, some behind an opening sentence. Their words occur in the
plain-text part of pretraining (`plain_text`), so the model knows them, but never in the
multiple-choice format.

Usage:
    python scripts/build_suite.py [--out moe_local/assets/suite] [--no-embed]

Writes <split>.jsonl ({"question", "choices", "answer", "task"}) and <split>.npy: all-MiniLM-L6-v2
embeddings (float16, unit rows) of moe_local.tuning.data.embedding_text(record), as `moe-local embed` does.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20260517
ROOT = Path(__file__).resolve().parents[1]
LETTERS = "ABCD"

ANIMALS = "dog cat horse tiger rabbit eagle salmon parrot donkey lizard walrus monkey".split()
FRUITS = "apple pear grape lemon melon cherry mango plum peach banana orange kiwi".split()
TOOLS = "hammer saw wrench drill chisel shovel rake pliers ladder needle axe spanner".split()
VEHICLES = "car truck bus train bicycle tractor wagon boat yacht scooter tram van".split()
HAPPY = "joyful cheerful glad merry delighted jolly elated content sunny upbeat pleased thrilled".split()
SAD = "gloomy tearful sorrowful miserable glum downcast mournful unhappy blue grieving lonely dismal".split()
ANGRY = "furious irate cross livid enraged fuming grumpy hostile bitter outraged annoyed heated".split()
CALM = "serene peaceful relaxed tranquil placid mellow quiet restful composed still easy settled".split()
PEOPLE = """Ardo Belin Corra Dimon Elva Farro Gisla Hobin Istra Jorum Kelda Lomar Mirel Norta Olbin Pema
Quill Rasko Sila Tovin Ulma Varek Wenna Yorik Zelda Brask Cimma Dorla Esko Fenna Galo Harma Ibbo Jessa
Kroll Lusa Mabbit Nerro Oswin Pirra""".split()


def _world():
    """Each person's region and food: a fixed, balanced assignment (10 people per label)."""
    rng = random.Random(7)
    regions = [i % 4 for i in range(len(PEOPLE))]
    foods = [i % 4 for i in range(len(PEOPLE))]
    rng.shuffle(regions)
    rng.shuffle(foods)
    return dict(zip(PEOPLE, regions)), dict(zip(PEOPLE, foods))


HOME, FOOD = _world()

# family -> (choices, operands, answer index of an operand)
FAMILIES = {
    "mod4": (["0", "1", "2", "3"], [str(n) for n in range(100)], lambda x: int(x) % 4),
    "size": (["tiny", "small", "large", "huge"], [str(n) for n in range(100)], lambda x: int(x) // 25),
    "kind": (
        ["animal", "fruit", "tool", "vehicle"],
        ANIMALS + FRUITS + TOOLS + VEHICLES,
        lambda x: [ANIMALS, FRUITS, TOOLS, VEHICLES].index(
            next(g for g in [ANIMALS, FRUITS, TOOLS, VEHICLES] if x in g)
        ),
    ),
    "mood": (
        ["happy", "sad", "angry", "calm"],
        HAPPY + SAD + ANGRY + CALM,
        lambda x: [HAPPY, SAD, ANGRY, CALM].index(next(g for g in [HAPPY, SAD, ANGRY, CALM] if x in g)),
    ),
    "home": (["north", "south", "east", "west"], PEOPLE, lambda x: HOME[x]),
    "food": (["bread", "fish", "rice", "soup"], PEOPLE, lambda x: FOOD[x]),
}
FAMILY_NAMES = list(FAMILIES)

# Phrasings ({x} = the operand). Unseen groups reword the question; some open with a sentence.
PHRASINGS = {
    "mod4": {
        "seen": ["What is {x} mod four?", "Compute {x} mod four.", "{x} mod four is what?", "Give {x} mod four."],
        "tune": [
            "What is the remainder when {x} is divided by four?",
            "Divide {x} by four and name the remainder.",
            "Here is a sum for you. How much is left over when {x} is split into fours?",
            "{x} leaves which remainder after division by four?",
            "Quick question: what remains of {x} after taking out all the fours?",
            "Think about the number {x}. What is left after dividing it by four?",
        ],
        "val": [
            "After dividing {x} by four, what is left over?",
            "Which remainder do you get from {x} over four?",
            "I have a puzzle. When {x} is split into groups of four, how much remains?",
        ],
        "test": [
            "Tell me what remains when {x} is divided by four.",
            "Split {x} into fours. How much is left over?",
            "Here is a little puzzle: what is the remainder of {x} divided by four?",
        ],
    },
    "size": {
        "seen": ["How big is {x}?", "What size is {x}?", "Rate the size of {x}.", "{x} is how big?"],
        "tune": [
            "Which word fits the magnitude of {x}?",
            "Describe how large the number {x} is.",
            "Here is a sum for you. As a quantity, how large is {x}?",
            "On a scale of bigness, where does {x} sit?",
            "Quick question: is the amount {x} a lot or a little?",
            "Think about the number {x}. How would you label its magnitude?",
        ],
        "val": [
            "How would you describe the amount {x}?",
            "Judge the magnitude of the number {x}.",
            "I have a puzzle. As an amount, how large would you call {x}?",
        ],
        "test": [
            "Tell me how large a quantity {x} is.",
            "Which label describes the magnitude of {x}?",
            "Here is a little puzzle: how much of a quantity is {x}?",
        ],
    },
    "kind": {
        "seen": ["What kind of thing is a {x}?", "A {x} is what kind of thing?", "Classify the {x}.", "What is a {x}?"],
        "tune": [
            "Which category does a {x} fall into?",
            "Sort the {x} into its group.",
            "Here is a question for you. To which class of objects does a {x} belong?",
            "In which group would you put a {x}?",
            "Quick question: what sort of object is a {x}?",
            "Think about a {x}. Which category is it in?",
        ],
        "val": [
            "Put the {x} in the right category.",
            "Which family of things includes a {x}?",
            "I have a puzzle. Under which heading would a {x} be listed?",
        ],
        "test": [
            "Tell me the category of a {x}.",
            "Name the group that a {x} belongs to.",
            "Here is a little puzzle: what class of objects contains the {x}?",
        ],
    },
    "mood": {
        "seen": ["Which mood is {x}?", "What feeling does {x} show?", "{x} is which mood?", "Someone {x} feels how?"],
        "tune": [
            "What emotion does the word {x} express?",
            "A person who is {x} is in which state of mind?",
            "Here is a question for you. Describe the emotion behind {x}.",
            "Which emotion would you call {x}?",
            "Quick question: if a friend is {x}, what is their emotion?",
            "Think about being {x}. What state of mind is that?",
        ],
        "val": [
            "Which emotion matches being {x}?",
            "If you are {x}, what is your state of mind?",
            "I have a puzzle. A neighbour looks {x}; which emotion is that?",
        ],
        "test": [
            "Tell me the emotion of a {x} person.",
            "What state of mind does {x} describe?",
            "Here is a little puzzle: which emotion lies behind the word {x}?",
        ],
    },
    "home": {
        "seen": [
            "Where does {x} live?",
            "{x} lives where?",
            "In which part of the land does {x} live?",
            "Where is the home of {x}?",
        ],
        "tune": [
            "In which region does {x} reside?",
            "Where is {x} to be found at night?",
            "Here is a question for you. Which quarter of the land is {x} from?",
            "Which direction would you travel to visit {x}?",
            "Quick question: in what region does {x} dwell?",
            "Think about {x}. Where is their house?",
        ],
        "val": [
            "Which region is {x} from?",
            "Where does {x} dwell?",
            "I have a puzzle. To reach the house of {x}, which way do you go?",
        ],
        "test": [
            "Tell me the region where {x} resides.",
            "Which quarter of the land does {x} dwell in?",
            "Here is a little puzzle: where is the house of {x}?",
        ],
    },
    "food": {
        "seen": ["What does {x} eat?", "{x} eats what?", "Which food does {x} eat?", "What is the food of {x}?"],
        "tune": [
            "Which meal does {x} prefer?",
            "What does {x} have for dinner?",
            "Here is a question for you. Name the dish {x} enjoys most.",
            "What would {x} order at an inn?",
            "Quick question: which dish does {x} cook every day?",
            "Think about {x}. What is on their plate?",
        ],
        "val": [
            "What is the favourite dish of {x}?",
            "Which meal does {x} cook at home?",
            "I have a puzzle. At supper, what does {x} put on the plate?",
        ],
        "test": [
            "Tell me the dish that {x} loves.",
            "What is {x} usually served for dinner?",
            "Here is a little puzzle: which meal does {x} enjoy?",
        ],
    },
}
GROUPS = ("seen", "tune", "val", "test")

# Plain text for pretraining: facts and the unseen phrasings' words in ordinary sentences.
PLAIN = {
    "mod4": [
        "{x} divided by four leaves a remainder of {a}.",
        "The remainder of {x} over four is {a}.",
        "When {x} is split into fours, {a} is left over.",
        "{x} mod four is {a}.",
        "Taking all the fours out of {x} leaves {a}.",
    ],
    "size": [
        "The number {x} is {a}.",
        "The magnitude of {x} is {a}.",
        "As a quantity, {x} is {a}.",
        "An amount of {x} is {a}.",
        "On a scale of bigness, {x} is {a}.",
    ],
    "kind": [
        "A {x} is a kind of {a}.",
        "The {x} belongs to the {a} category.",
        "A {x} is in the {a} group.",
        "Every {x} is a {a}.",
        "You would list a {x} under the heading {a}.",
    ],
    "mood": [
        "Someone {x} is {a}.",
        "Being {x} is an emotion of the {a} kind.",
        "A {x} person has a {a} state of mind.",
        "To feel {x} is to be {a}.",
        "My neighbour looks {x}, which means {a}.",
    ],
    "home": [
        "{x} lives in the {a}.",
        "{x} resides in the {a} region.",
        "{x} dwells in the {a} quarter of the land.",
        "The house of {x} is in the {a}.",
        "To visit {x} you travel {a}.",
    ],
    "food": [
        "{x} eats {a}.",
        "The favourite dish of {x} is {a}.",
        "For dinner, {x} has {a}.",
        "At the inn, {x} orders {a}.",
        "Every day {x} cooks {a}.",
    ],
}
FILLER = [
    "Here is a question for you.",
    "Here is a sum for you.",
    "Here is a little puzzle.",
    "I have a puzzle.",
    "Quick question.",
    "Think about it.",
    "Tell me what you know.",
    "A friend asked me something.",
    "The category of a thing is its group or class.",
    "An emotion is a state of mind.",
    "A region is a quarter of the land.",
    "A dish is a meal.",
    "A remainder is what is left over.",
    "The magnitude of a number is how large it is.",
    "Supper is dinner.",
    "To dwell means to live.",
    "To reside means to live.",
    "A meal is served on a plate.",
    "After dinner we sit and talk.",
    "If you divide a number by four, something remains.",
    "Division means dividing a number into groups.",
    "Describe the object that you put on the table.",
    "The word for a thing is its name.",
    "Most people prefer a meal they enjoy.",
    "A label describes what an object is.",
    "The family of things that a word belongs to is its category.",
    "Do you get the right answer?",
    "Go that way to reach the house.",
    "Which direction is north from here?",
    "Things that fall at night are found in the morning.",
    "Who cooks dinner? Their neighbour does.",
    "A lot of people order soup and most enjoy it.",
    "A list includes the things listed under a heading.",
    "Judge how much a thing matches a word.",
    "What lies behind a word is its meaning.",
    "This box contains many objects.",
    "She usually loves to cook.",
    "We call a feeling an emotion.",
    "Words express feelings.",
    "Sort the things and put each where it fits.",
    "Your state of mind is your mood.",
    "Where do the objects belong?",
    "Things belong to groups.",
    "The word if starts a question.",
    "A cook is a person who makes a meal.",
]

# split -> items per family, per phrasing group
SPLITS = {
    "train": {"seen": 100, "tune": 100},
    "test_seen": {"seen": 40},
    "val_unseen": {"val": 50},
    "test_unseen": {"test": 60},
}


def answer_of(family: str, operand: str) -> int:
    return FAMILIES[family][2](operand)


def make_item(family: str, template: str, operand: str) -> dict:
    choices = FAMILIES[family][0]
    return {
        "question": template.format(x=operand),
        "choices": list(choices),
        "answer": answer_of(family, operand),
        "task": family,
    }


def render_prompt(rec: dict) -> str:
    """moe_local.tuning.data.render_prompt for a dict (lm-eval's MMLU template)."""
    return rec["question"].strip() + "\n" + "".join(f"{L}. {c}\n" for L, c in zip(LETTERS, rec["choices"])) + "Answer:"


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Items drawn without repeats across splits (a prompt is in one split at most)."""
    rng = random.Random(seed)
    used: set[str] = set()
    out = {}
    for split, groups in SPLITS.items():
        recs = []
        for family in FAMILY_NAMES:
            operands = FAMILIES[family][1]
            for group, n in groups.items():
                templates = PHRASINGS[family][group]
                made = 0
                while made < n:
                    r = make_item(family, templates[made % len(templates)], rng.choice(operands))
                    key = render_prompt(r)
                    if key in used:
                        continue
                    used.add(key)
                    r["group"] = group
                    recs.append(r)
                    made += 1
        rng.shuffle(recs)
        out[split] = recs
    return out


def plain_text(rng: random.Random) -> str:
    """One plain-text pretraining document: a few facts and filler sentences."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.25:
            parts.append(rng.choice(FILLER))
            continue
        family = rng.choice(FAMILY_NAMES)
        x = rng.choice(FAMILIES[family][1])
        a = FAMILIES[family][0][answer_of(family, x)]
        parts.append(rng.choice(PLAIN[family]).format(x=x, a=a))
    return " ".join(parts)


def embed(recs: list[dict], embedder):
    """all-MiniLM-L6-v2 rows of moe_local.tuning.data.embedding_text(record), unit norm, float16: what
    `moe-local embed` computes (moe_local.tuning.embeddings; ``embedder`` from its load_embedder)."""
    import numpy as np

    from moe_local.tuning.data import embedding_text, parse_record
    from moe_local.tuning.embeddings import compute_embeddings

    texts = [embedding_text(parse_record(r, "suite", i + 1)) for i, r in enumerate(recs)]
    return compute_embeddings(texts, embedder).astype(np.float16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "moe_local/assets/suite"))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-embed", action="store_true", help="skip the MiniLM embeddings")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    embedder = None
    for name, recs in build_splits(args.seed).items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        msg = f"{name}: {len(recs)} records"
        if not args.no_embed:
            import numpy as np

            from moe_local.tuning.embeddings import load_embedder

            embedder = embedder or load_embedder()  # one load for every split
            e = embed(recs, embedder)
            np.save(out / f"{name}.npy", e)
            msg += f", embeddings {e.shape} {e.dtype}"
        print(msg)


if __name__ == "__main__":
    main()
