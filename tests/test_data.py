"""Task files, the prompt, candidate scoring (checked against transformers' own model), CE."""

import json
import shutil

import numpy as np
import pytest
import torch

import moe_local
from moe_local.errors import UserError
from moe_local.tuning import data

from helpers import single_token_letters_tokenizer, task_records, write_jsonl


def test_rules_blank_lines_letters_and_subject(tmp_path):
    rows = [
        {"question": "Q1", "choices": ["a", "b"], "answer": 1, "subject": "math", "extra": 3},
        {"question": "Q2", "choices": ["a", "b", "c"], "answer": "C"},
        {"question": "Q3", "choices": list("abcdefghij"), "answer": "b", "task": "t"},
    ]
    records = data.read_records(write_jsonl(tmp_path / "d.jsonl", rows, blank_lines=True))
    assert [r.answer for r in records] == [1, 2, 1]
    assert [r.task for r in records] == ["math", None, "t"]
    assert [r.line for r in records] == [1, 3, 5]  # blank lines are skipped, not counted as records


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "Q", "choices": ["a", "b"], "answer": 0', "2: not valid JSON"),
        ('{"choices": ["a", "b"], "answer": 0}', "2: missing field 'question'"),
        ('{"question": "Q", "answer": 0}', "2: missing field 'choices'"),
        ('{"question": "Q", "choices": ["a", "b"]}', "2: missing field 'answer'"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": 2}', "2: answer 2 is out of range for 2 choices"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": "C"}', "2: answer 'C' is out of range"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": -1}', "out of range"),
        ('{"question": "Q", "choices": ["a"], "answer": 0}', "2: 'choices' has 1 entries; 2 to 10"),
        ('{"question": "Q", "choices": ' + json.dumps(list("abcdefghijk")) + ', "answer": 0}', "has 11 entries"),
        ('{"question": "Q", "choices": ["a", 2], "answer": 0}', "list of strings"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": true}', "0-based integer or a letter"),
        (
            '{"question": "Q", "choices": ["a", "b"], "answer": "1"}',
            "'answer' must be a 0-based integer or a letter (0-1 or A-B), got '1'",
        ),
        ('{"question": "Q", "choices": ["a", "b"], "answer": "AB"}', "must be a 0-based integer or a letter"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "Q", "choices": ["a", "b"], "answer": 0})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        data.read_records(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        data.read_records(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no records"):
        data.read_records(tmp_path / "empty.jsonl")


def test_prompt_is_lm_eval_mmlu_template():
    r = data.Record("  What is 2+2?  ", ("3", "4", "5"), 1, None, 1)
    assert data.render_prompt(r) == "What is 2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    assert data.embedding_text(r) == "What is 2+2?\nA. 3\nB. 4\nC. 5\n"
    assert data.candidates(3) == [" A", " B", " C"]


def _reference_scores(hf, tokenizer, record):
    """lm-eval's way, run by transformers' own model: one sequence per candidate, summed log-probs."""
    prompt = data.render_prompt(record)
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for cand in data.candidates(len(record.choices)):
        whole = tokenizer(prompt + cand, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def _check_scores(folder, rows, single_token: bool):
    from transformers import AutoModelForCausalLM

    m = moe_local.load(str(folder), backend="torch")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    records = [data.parse_record(r, "t", i + 1) for i, r in enumerate(rows)]
    encoded = data.encode_records(m.tokenizer, records)
    assert all(len(t) == 1 for e in encoded for t in e.cand_tokens) == single_token
    # one forward pass per sample when candidates are single tokens or share their leading tokens
    assert all(len(e.sequences) == 1 for e in encoded)
    batch = data.make_batch(encoded, range(len(records)))
    assert len(batch.ids) == len(records)
    ref = [_reference_scores(hf, m.tokenizer, r) for r in records]
    last = m.spec.moe_layers[-1]
    for start in (0, last):  # the whole model, and a prefix + suffix split
        scores, routing = m.suffix_scores(m.prefix_hidden(batch, start), batch, start, (last,))
        for b, r in enumerate(records):
            np.testing.assert_allclose(scores[b, : len(r.choices)], ref[b], atol=1e-4)
            assert (scores[b, len(r.choices) :] == data.MISSING_SCORE).all()
        np.testing.assert_allclose(routing.sum(-1), 1.0, atol=1e-5)


def test_scores_multi_token_candidates_match_transformers(qwen3_dir):
    # The test tokenizer splits " A" into "Ġ" + "A": every candidate is two tokens.
    rows = task_records(3, seed=1)
    rows[1]["choices"] = rows[1]["choices"][:2]
    rows[1]["answer"] = 0
    _check_scores(qwen3_dir, rows, single_token=False)


def test_scores_single_token_candidates_match_transformers(qwen3_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(qwen3_dir, folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    single_token_letters_tokenizer(folder, 128)
    _check_scores(folder, task_records(3, seed=2), single_token=True)


def test_candidates_with_different_lengths_use_their_own_sequences():
    class Tok:  # " B" is two tokens, " A" one: two sequences, positions as lm-eval scores them
        def __call__(self, texts, add_special_tokens=True):
            def enc(t):
                ids = [ord(c) for c in t.replace(" B", "\x01\x02").replace(" A", "\x03")]
                return ids

            if isinstance(texts, str):
                return {"input_ids": enc(texts)}
            return {"input_ids": [enc(t) for t in texts]}

    r = data.Record("Q", ("x", "y"), 1, None, 1)
    (e,) = data.encode_records(Tok(), [r])
    prompt = [ord(c) for c in data.render_prompt(r)]
    assert e.sequences == (tuple(prompt), tuple(prompt + [1]))
    assert e.cand_seq == (0, 1) and e.cand_tokens == ((3,), (1, 2))
    b = data.make_batch([e], [0])
    T = b.ids.shape[1]
    rows = {(int(s), int(p)) for s, p in zip(b.head_seq, b.head_pos)}
    assert rows == {(0, T - 1), (1, T - 2), (1, T - 1)}  # seq 0 is left-padded by one
    assert b.prompt_pos.tolist() == [T - 1, T - 2]


# -- formats, cloze styles and few-shot prompts (lm-eval's templates; tests/test_lm_eval.py runs lm-eval) --


def _record(question, choices, answer=0, context=None, cloze="question-answer"):
    return data.Record(question, tuple(choices), answer, None, 1, context, cloze, "t:1")


def test_requests_in_each_format_and_cloze_style():
    arc = _record("Which is a mammal? ", ["cat", "fish"])
    assert data.requests(arc, "mc") == (
        [
            ("Which is a mammal?\nA. cat\nB. fish\nAnswer:", " A"),
            ("Which is a mammal?\nA. cat\nB. fish\nAnswer:", " B"),
        ],
        [1, 1],
    )
    assert data.requests(arc, "rc") == (
        [("Question: Which is a mammal? \nAnswer:", " cat"), ("Question: Which is a mammal? \nAnswer:", " fish")],
        [3, 4],
    )
    sciq = _record("Q?", ["x", "yy"], context="")  # SciQ's empty support still opens with a newline, as lm-eval's
    assert data.requests(sciq, "rc")[0][0] == ("\nQuestion: Q?\nAnswer:", " x")
    assert data.render_prompt(sciq) == "Q?\nA. x\nB. yy\nAnswer:"
    siqa = _record("Tracy left. Why?", ["a", "b"], cloze="q-a")
    assert data.requests(siqa, "rc")[0][0] == ("Q: Tracy left. Why?\nA:", " a")
    assert data.requests(_record("He climbs", ["up.", "down."], cloze="plain"), "rc")[0][0] == ("He climbs", " up.")
    wino = _record("Sarah beat Maria so _ won the game. ", ["Sarah", "Maria"], cloze="blank")
    assert data.requests(wino, "rc") == (
        [("Sarah beat Maria so Sarah", " won the game."), ("Sarah beat Maria so Maria", " won the game.")],
        [len("Sarah beat Maria so Sarah"), len("Sarah beat Maria so Maria")],
    )


def test_few_shot_prompts_join_solved_examples_with_blank_lines():
    records = [_record(f"Q{i}", ["a", "b"], answer=i % 2) for i in range(3)]
    asked = data.Prompting("rc", 2, tuple(records), own_split=True)
    context, continuation = data.prompt_requests(records[1], asked, 1)[0][0]
    assert context == "Question: Q0\nAnswer: a\n\nQuestion: Q2\nAnswer: a\n\nQuestion: Q1\nAnswer:"
    assert continuation == " a"
    mc = data.Prompting("mc", 1, tuple(records[1:]), own_split=False)
    assert data.prompt_requests(records[0], mc, 0)[0][0][0] == "Q1\nA. a\nB. b\nAnswer: B\n\nQ0\nA. a\nB. b\nAnswer:"
    wino = [_record("x _ y", ["p", "q"], answer=1, cloze="blank")] * 2
    blank = data.Prompting("rc", 1, tuple(wino), own_split=True)
    assert data.prompt_requests(wino[1], blank, 1)[0] == [("x q y\n\nx p", " y"), ("x q y\n\nx q", " y")]


def test_trailing_whitespace_moves_to_the_continuation_and_blanks_get_their_own_contexts():
    class Tok:  # one token per character
        def __call__(self, texts, add_special_tokens=True):
            enc = lambda t: [ord(c) for c in t]  # noqa: E731
            return {"input_ids": enc(texts) if isinstance(texts, str) else [enc(t) for t in texts]}

    (e,) = data.encode_records(Tok(), [_record("Q ", ["ab", "c"], cloze="plain")], data.Prompting("rc"))
    assert e.prompt_lens == (1, 1) and e.cand_tokens == (tuple(map(ord, "  ab")), tuple(map(ord, "  c")))
    (e,) = data.encode_records(Tok(), [_record("x _ y", ["p", "qq"], cloze="blank")], data.Prompting("rc"))
    assert e.sequences == (tuple(map(ord, "x p ")), tuple(map(ord, "x qq ")))
    assert e.prompt_lens == (3, 4) and e.cand_seq == (0, 1) and e.chars == (3, 4)
    b = data.make_batch([e], [0])
    T = b.ids.shape[1]
    assert b.prompt_pos.tolist() == [T - 2, T - 2]  # the last context token of each sequence
    assert b.sample_seq.tolist() == [0]


def test_acc_norm_divides_by_characters_and_ties_go_first():
    class E:
        chars = (1, 4, 2)

    scores = np.array([[-3.0, -8.0, -5.0], [-2.0, -8.0, -4.0]], np.float32)
    np.testing.assert_array_equal(data.predictions(scores), [0, 0])
    np.testing.assert_array_equal(data.norm_predictions(scores, [E(), E()], [0, 1]), [1, 0])  # -2 vs -2: first


def test_plain_records_keep_their_identity():
    """Banks and checkpoints made before other formats existed still match their data."""
    import hashlib
    import json as js

    from moe_local.tuning.prepare import records_sha256

    records = [data.parse_record(r, "t", i + 1) for i, r in enumerate(task_records(3))]
    old = hashlib.sha256()
    for r in records:
        old.update(js.dumps([r.question, list(r.choices), r.answer], ensure_ascii=False).encode() + b"\n")
    assert records_sha256(records) == records_sha256(records, data.Prompting()) == old.hexdigest()
    assert records_sha256(records, data.Prompting("rc")) != old.hexdigest()


def test_rc_scores_match_transformers_for_multi_token_continuations_and_blanks(qwen3_dir):
    """Each request scored as lm-eval scores it, by transformers' own model: whole minus context."""
    from transformers import AutoModelForCausalLM

    m = moe_local.load(str(qwen3_dir), backend="torch")
    hf = AutoModelForCausalLM.from_pretrained(str(qwen3_dir), attn_implementation="eager").eval()
    records = [
        _record("What is 3 plus 4?", ["seven", "eight or nine", "10"], answer=0),
        _record("Which is larger, 7 _ 9?", ["or", "and"], answer=0, cloze="blank"),
    ]
    asked = data.Prompting("rc", 1, tuple(records), own_split=True)
    encoded = data.encode_records(m.tokenizer, records, asked)
    batch = data.make_batch(encoded, range(2))
    scores, _ = m.suffix_scores(m.prefix_hidden(batch, 0), batch, 0, (m.spec.moe_layers[-1],))
    for b, r in enumerate(records):
        for c, (context, continuation) in enumerate(data.prompt_requests(r, asked, b)[0]):
            ctx = m.tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = m.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].float(), -1)
            expected = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
            assert len(whole) - len(ctx) > 1  # several continuation tokens
            np.testing.assert_allclose(scores[b, c], expected, atol=1e-4)
