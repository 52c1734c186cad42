"""Build `test_fresh`: a second test set for the embedded suite, phrased by a different generator.

`scripts/build_suite.py` phrases every question from one table of whole-sentence templates. This script
shares none of them: it reuses the suite's *world* only (the six families, their label lists, operands
and answer functions: `build_suite.FAMILIES`, `answer_of`), so a question's correct choice is decided
exactly as in the suite, and writes the questions from its own grammar:

    [opener] core [closer]

* cores (eight per family) are new sentence structures: imperatives and questions, word problems
  ("Pack 37 eggs four to a box ..."), the choices named in the question, possessives ("Ardo's house"),
  a scene before the question ("My aunt seemed glum this morning. ..."), different synonyms
  ("modulo", "residue", "compass point", "lunch", "type of thing");
* openers and closers are distractor sentences that carry no information about the answer and use no
  word of any family's label list ("No tricks here:", "My cousin asked me this yesterday.");
* the four forms (core alone, opener + core, core + closer, both) are spread evenly over each family.

tests/test_fresh_suite.py checks that no question matches any phrasing of build_suite (with its slot
filled by any word, anywhere in the question) and that word n-gram overlap with them stays low.

60 questions per family, 15 per answer; every prompt is new (none in any split of the suite).

Usage:
    python scripts/build_fresh.py [--out moe_local/assets/suite] [--no-embed]

Writes test_fresh.jsonl ({"question", "choices", "answer", "task", "group": "fresh"}) and test_fresh.npy
(all-MiniLM-L6-v2, float16, unit rows, computed as build_suite.embed does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_suite as suite  # noqa: E402  (the world only: FAMILIES, answer_of, render_prompt, embed)

SEED = 4417
ROOT = Path(__file__).resolve().parents[1]
PER_ANSWER = 15  # x 4 answers x 6 families = 360 records, the size of test_unseen
SPLIT = "test_fresh"

# {x} = the operand, {ax} = the operand with its article ("an apple"), {xs} = its possessive ("Ardo's").
CORES = {
    "mod4": [
        "Work out {x} modulo 4.",
        "{x} modulo four equals which value?",
        "Find the residue of {x} modulo four.",
        "Share {x} sweets equally among four children. How many sweets are not handed out?",
        "Pack {x} eggs four to a box; how many eggs stay loose?",
        "Which digit do you get for {x} modulo 4?",
        "Take fours away from {x} until you cannot. What is the leftover?",
        "Four friends split {x} coins evenly. How many coins does nobody get?",
    ],
    "size": [
        "Is {x} tiny, small, large or huge?",
        "Counting from zero to ninety-nine, where does {x} land?",
        "Pick a size word for the number {x}.",
        "Give a one-word size for {x}.",
        "On a hundred-point ruler, {x} is which size?",
        "A pile of {x} stones: which size word suits it?",
        "Choose the size that suits the value {x}.",
        "{x} out of a hundred counts as which size?",
    ],
    "kind": [
        "Is {ax} an animal, a fruit, a tool or a vehicle?",
        "Pick the label that fits {ax}.",
        "You spot {ax} at the market. Which type of thing did you see?",
        "Decide which type of thing {ax} is.",
        "Label this object: {x}.",
        "What type of thing would you call {ax}?",
        "Choose the right type for the noun {x}.",
        "Where does {ax} go: with the animals, the fruits, the tools or the vehicles?",
    ],
    "mood": [
        "Someone described as {x} is feeling which way?",
        "Pick the feeling closest to {x}.",
        "My aunt seemed {x} this morning. How was she feeling?",
        "Choose the mood that matches the adjective {x}.",
        "Name the feeling of a person who looks {x}.",
        "Feeling {x} today means feeling what, roughly?",
        "The adjective {x} points to which feeling?",
        "After the news, Tom was {x}. Which feeling describes Tom?",
    ],
    "home": [
        "Which compass point is home for {x}?",
        "Point me toward {xs} home.",
        "I am sending a letter to {x}. Which way should it travel?",
        "{xs} house stands on which side of the country?",
        "To drop in on {x}, head which way?",
        "Give the compass direction of {xs} village.",
        "Where on the map would you find {xs} front door?",
        "{x} is at home right now. In which direction is that?",
    ],
    "food": [
        "{xs} favourite food is which one?",
        "Guess what {x} has for lunch.",
        "If you cook for {x}, what should you make?",
        "{x} opens the lunch box. What is inside?",
        "Choose the food that {x} always picks.",
        "At a picnic, {x} reaches for which food?",
        "Name {xs} usual lunch.",
        "Which food keeps {x} going all day?",
    ],
}
OPENERS = [
    "No tricks here:",
    "Another one now.",
    "Okay, next one.",
    "Read carefully.",
    "Be honest:",
    "Try this one.",
    "Let us see.",
    "Here goes:",
]
CLOSERS = [
    "Take your time.",
    "Only one option is right.",
    "My cousin asked me this yesterday.",
    "It is raining today, by the way.",
    "Answer with a letter.",
    "I keep forgetting this.",
    "Do not overthink it.",
    "The kettle is on.",
]
FORMS = ("core", "opener", "closer", "both")


def slots(operand: str) -> dict:
    article = "an" if operand[0].lower() in "aeiou" else "a"
    return {"x": operand, "ax": f"{article} {operand}", "xs": f"{operand}'s"}


def phrase(core: str, operand: str, form: str, rng: random.Random) -> str:
    text = core.format(**slots(operand))
    if form in ("opener", "both"):
        text = rng.choice(OPENERS) + " " + text
    if form in ("closer", "both"):
        text = text + " " + rng.choice(CLOSERS)
    return text


def balanced_operands(family: str, rng: random.Random) -> list[str]:
    """PER_ANSWER operands for each answer; each operand once before any operand repeats."""
    choices, operands, _ = suite.FAMILIES[family]
    picked = []
    for answer in range(len(choices)):
        pool = [x for x in operands if suite.answer_of(family, x) == answer]
        rounds = -(-PER_ANSWER // len(pool))
        order = [x for _ in range(rounds) for x in rng.sample(pool, len(pool))]
        picked += order[:PER_ANSWER]
    return picked


def suite_prompts() -> set[str]:
    return {suite.render_prompt(r) for recs in suite.build_splits().values() for r in recs}


def build(seed: int = SEED) -> list[dict]:
    """The records of test_fresh, shuffled; raises if a prompt repeats or appears in the suite."""
    rng = random.Random(seed)
    taken = suite_prompts()
    records = []
    for family in suite.FAMILY_NAMES:
        operands = balanced_operands(family, rng)
        rng.shuffle(operands)
        cores = CORES[family]
        plan = itertools.cycle(itertools.product(range(len(cores)), FORMS))  # every core in every form
        start = rng.randrange(len(cores) * len(FORMS))
        plan = itertools.islice(plan, start, None)
        for operand in operands:
            while True:  # a repeated operand gets the next (core, form): a new prompt
                core, form = next(plan)
                record = suite.make_item(family, phrase(cores[core], operand, form, rng), operand)
                if suite.render_prompt(record) not in taken:
                    break
            taken.add(suite.render_prompt(record))
            record["group"] = "fresh"
            records.append(record)
    rng.shuffle(records)
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "moe_local/assets/suite"))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-embed", action="store_true", help="skip the MiniLM embeddings")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = build(args.seed)
    (out / f"{SPLIT}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    msg = f"{SPLIT}: {len(records)} records"
    if not args.no_embed:
        import numpy as np

        from moe_local.tuning.embeddings import load_embedder

        embeddings = suite.embed(records, load_embedder())
        np.save(out / f"{SPLIT}.npy", embeddings)
        msg += f", embeddings {embeddings.shape} {embeddings.dtype}"
    print(msg)


if __name__ == "__main__":
    main()
