"""`suite/test_fresh`: the second test set of the embedded suite, phrased by scripts/build_fresh.py.

Checked against scripts/build_suite.py, the definition of the suite's world: every answer is what the
suite's answer function gives for the question's operand, and no question reuses a phrasing of the
suite's tables (no template matches with its slot filled by any word; little word n-gram overlap). The
reuse check is shown to fire on the suite's own held-out phrasings.
"""

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moe_local.checkpoint import ASSETS, BUILTIN_MODELS
from moe_local.demo import load_split
from moe_local.tuning.data import embedding_text, read_records, render_prompt

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_fresh  # noqa: E402
import build_suite  # noqa: E402

FRESH = ASSETS / "suite" / "test_fresh.jsonl"
SLOT = "xslotx"  # an operand, in n-grams
MAX_SHARED_RUN = 4  # words in a row that a fresh question may share with a suite phrasing
MAX_TRIGRAM_SHARE = 0.08  # the suite's own `test` group shares 26 % of its trigrams with its other groups


def fresh_rows() -> list[dict]:
    return [json.loads(line) for line in FRESH.read_text().splitlines()]


def suite_templates() -> list[str]:
    """Every phrasing of build_suite's tables, and its pretraining sentences."""
    plain = [t for family in build_suite.PLAIN.values() for t in family]
    phrasings = [t for family in build_suite.PHRASINGS.values() for g in family.values() for t in g]
    return phrasings + plain + build_suite.FILLER


def template_pattern(template: str) -> re.Pattern:
    """The template with each slot filled by any one word, found anywhere, case and spacing ignored."""
    parts = re.split(r"\{[xa]\}", template.strip())
    return re.compile(r"[\w']+".join(r"\s+".join(map(re.escape, p.split(" "))) for p in parts), re.IGNORECASE)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(seq: list[str], n: int) -> set[tuple]:
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}


def phrasing_ngrams(phrasings: dict) -> set[tuple]:
    """Word n-grams (every n) of phrasing tables like build_suite.PHRASINGS, the slot as one word."""
    pool = set()
    for family in phrasings.values():
        for template in (t for g in family.values() for t in g):
            seq = words(template.format(x=SLOT))
            pool |= {g for n in range(1, len(seq) + 1) for g in ngrams(seq, n)}
    return pool


def slotted(question: str, family: str) -> list[str]:
    operands = {x.lower() for x in build_suite.FAMILIES[family][1]}
    return [SLOT if w in operands else w for w in words(question)]


def reuse(rows: list[dict], phrasings: dict = build_suite.PHRASINGS) -> dict:
    """What a set of questions takes from the suite's phrasings: template matches, longest shared run of
    words per question, and the share of all its word trigrams found in the phrasing tables."""
    patterns = [(t, template_pattern(t)) for t in suite_templates()]
    pool = phrasing_ngrams(phrasings)
    matches, runs, shared, total = [], [], 0, 0
    for row in rows:
        matches += [(row["question"], t) for t, p in patterns if p.search(row["question"])]
        seq = slotted(row["question"], row["task"])
        runs.append(max((n for n in range(1, len(seq) + 1) if ngrams(seq, n) & pool), default=0))
        trigrams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
        shared += sum(g in pool for g in trigrams)
        total += len(trigrams)
    return {"matches": matches, "runs": runs, "trigram_share": shared / total}


def operand_of(row: dict) -> str:
    """The one operand of the row's family that the question names (the number, noun, adjective or person)."""
    family = row["task"]
    if family in ("mod4", "size"):
        found = re.findall(r"\b\d+\b", row["question"].replace("modulo 4", "modulo four"))
    else:
        operands = set(build_suite.FAMILIES[family][1])
        found = [w for w in re.findall(r"[A-Za-z]+", row["question"]) if w in operands]
    assert len(found) == 1, (row["question"], found)
    return found[0]


def test_fresh_set_is_what_its_builder_writes():
    assert FRESH.read_text() == "".join(json.dumps(r) + "\n" for r in build_fresh.build())


def test_fresh_answers_are_the_suite_world_balanced_and_new():
    rows = fresh_rows()
    assert len(rows) == 360 and {r["group"] for r in rows} == {"fresh"}
    for row in rows:
        choices, _, _ = build_suite.FAMILIES[row["task"]]
        assert row["choices"] == choices
        assert row["answer"] == build_suite.answer_of(row["task"], operand_of(row)), row["question"]
    counts = Counter((r["task"], r["answer"]) for r in rows)
    assert set(counts.values()) == {15} and len(counts) == 6 * 4
    records = read_records(FRESH)
    prompts = {render_prompt(r) for r in records}
    assert len(prompts) == len(records), "a prompt repeats"
    suite = {
        render_prompt(r) for split in ("train", "test_seen", "val_unseen", "test_unseen") for r in load_split(split)[0]
    }
    assert not prompts & suite


def test_no_fresh_question_reuses_a_suite_phrasing():
    found = reuse(fresh_rows())
    assert not found["matches"], found["matches"][:3]
    assert max(found["runs"]) <= MAX_SHARED_RUN
    assert found["trigram_share"] <= MAX_TRIGRAM_SHARE, found["trigram_share"]


def test_the_reuse_check_fires_on_suite_phrasings():
    unseen = [json.loads(line) for line in (ASSETS / "suite" / "test_unseen.jsonl").read_text().splitlines()]
    found = reuse(unseen)
    assert {q for q, _ in found["matches"]} == {r["question"] for r in unseen}
    assert min(found["runs"]) >= 4 and found["trigram_share"] == 1.0
    # a suite phrasing behind a fresh opener, with a different operand, is caught too
    hidden = {"question": "No tricks here: which remainder do you get from 41 over four?", "task": "mod4"}
    assert reuse([hidden])["matches"] and reuse([hidden])["runs"][0] > MAX_SHARED_RUN
    # and so is the suite's own held-out group against its other groups: 26 % of its trigrams
    held_out = {f: {g: t for g, t in groups.items() if g != "test"} for f, groups in build_suite.PHRASINGS.items()}
    assert reuse(unseen, held_out)["trigram_share"] > MAX_TRIGRAM_SHARE


def test_fresh_prompts_fit_the_tiny_models_context():
    from transformers import AutoTokenizer

    context = json.loads((BUILTIN_MODELS["tiny"] / "config.json").read_text())["max_position_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(str(BUILTIN_MODELS["tiny"]))
    lengths = [len(tokenizer.encode(render_prompt(r), add_special_tokens=False)) for r in read_records(FRESH)]
    assert max(lengths) <= context // 2, max(lengths)


@pytest.mark.slow
def test_fresh_embeddings_are_minilm_of_the_embedding_text():
    """Every row recomputed (float16 rounding may differ in the last bit between machines)."""
    from moe_local.tuning.embeddings import compute_embeddings

    records, shipped = load_split("test_fresh")
    assert np.load(ASSETS / "suite" / "test_fresh.npy").dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(shipped, axis=1), 1.0, atol=2e-3)
    recomputed = compute_embeddings([embedding_text(r) for r in records])
    np.testing.assert_allclose(shipped, recomputed, atol=2e-3)


def test_eval_fresh_summary_is_mean_and_std_over_seeds():
    import eval_fresh

    rows = [
        {"model": "tiny", "split": "test_fresh", "method": m, "accuracy": a, "n": 360, "seed": s}
        for s, (router, roma) in enumerate([(0.50, 0.61), (0.70, 0.62), (0.60, 0.66)])
        for m, a in (("base", 0.25), ("router", router), ("roma", roma))
    ]
    head, rule, line = eval_fresh.summary(rows)
    assert "seeds 0, 1, 2" in head and rule.count("---") == 4 + len(eval_fresh.COLUMNS)
    # sample std: router 50, 70, 60 -> 10.0; roma 61, 62, 66 -> 2.6; paired differences 11, -8, 6 -> 3.0 ± 9.8
    assert line == "| tiny | test_fresh | 360 | 25.0 ± 0.0 | 60.0 ± 10.0 | 63.0 ± 2.6 |  |  | 3.0 ± 9.8 |"
