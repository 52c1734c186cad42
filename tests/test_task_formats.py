"""Task data in every format (JSONL, CSV, parquet, Arrow, Hugging Face save_to_disk folders), written by
the libraries that write them (pyarrow, datasets); known layouts and --fields; bad input in each is one
line naming the file and the line or row, exit 2."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_local.errors import UserError
from moe_local.tuning.data import read_records, read_task
from moe_local.tuning.layouts import hellaswag_preprocess

from helpers import run_main, task_records, write_jsonl

MMLU = [
    {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0, "subject": "geo"},
    {"question": "Largest?", "choices": ["1", "9", "5", "3"], "answer": 1, "subject": "math"},
]


def _one_line_error(call, *parts) -> str:
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, (part, message)
    return message


def _save_to_disk(folder, splits: dict, num_shards: int = 1):
    """A Dataset folder (one split) or a DatasetDict folder, written by `datasets` itself."""
    import datasets

    if len(splits) == 1 and "_" in splits:
        datasets.Dataset.from_list(splits["_"]).save_to_disk(str(folder), num_shards=num_shards)
    else:
        dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
        dd.save_to_disk(str(folder))
    return folder


# -- text files --------------------------------------------------------------------------------


def test_jsonl_with_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in MMLU).encode() + b"\r\n")
    records = read_records(path)
    assert [r.question for r in records] == [r["question"] for r in MMLU]
    assert [r.task for r in records] == ["math", "geo", "math"] and records[2].line == 3


def test_invalid_utf8_is_named_by_line_and_a_json_line_separator_is_no_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps(r) for r in MMLU]
    rows[0] = json.dumps(dict(MMLU[0], question="What\u2028is 2+2?"), ensure_ascii=False)
    path.write_bytes("\n".join(rows[:2]).encode() + b'\n{"question": "\xff"}\n')
    _one_line_error(lambda: read_records(path), f"{path}:3: not UTF-8 text")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert [r.line for r in read_records(path)] == [1, 2, 3]  # U+2028 inside a string is not a line break


def test_fifo_and_devices_are_refused_by_what_they_are(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    _one_line_error(lambda: read_records(fifo), f"{fifo} is a named pipe (FIFO)")
    _one_line_error(lambda: read_records("/dev/zero"), "/dev/zero is a character device")
    for data in (fifo, "/dev/zero"):
        code, out, err = run_main(capsys, "eval", "--data", data)
        assert code == 2 and "not found" not in err and len(err.strip().splitlines()) == 1, err


def test_mmlu_csv_without_a_header(tmp_path):
    path = tmp_path / "abstract_algebra_dev.csv"
    path.write_text(
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.,0,1,2,3,B\n"
        '"Statement 1, with a comma.\nAnd a second line.",True,False,Both,Neither,D\n'
        "\n"
        "Largest?,1,9,5,3,B\n"
    )
    records = read_records(path)
    assert [r.answer for r in records] == [1, 3, 1]
    assert records[1].question == "Statement 1, with a comma.\nAnd a second line."
    assert records[1].choices == ("True", "False", "Both", "Neither")
    assert [r.line for r in records] == [1, 2, 5]  # the line a row starts on (the second spans two)
    path.write_text("Q,a,b,c,d,E\n")
    _one_line_error(lambda: read_records(path), f"{path}:1: answer 'E' is out of range for 4 choices")


def test_csv_with_a_header_and_a_byte_order_mark_tsv_and_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeffquestion,A,B,C,answer,subject\nWhat is 2+2?,3,4,5,1,math\nLargest?,1,9,5,B,math\n")
    records = read_records(path)
    assert [(r.choices, r.answer, r.task) for r in records] == [
        (("3", "4", "5"), 1, "math"),
        (("1", "9", "5"), 1, "math"),
    ]
    tsv = tmp_path / "d.tsv"
    tsv.write_text("prompt\topt1\topt2\tgold\nWhich is larger?\t7\t9\t1\n")
    (r,) = read_records(tsv, fields="question=prompt,choices=opt1+opt2,answer=gold")
    assert (r.question, r.choices, r.answer) == ("Which is larger?", ("7", "9"), 1)
    path.write_text("question,A,B,answer\nQ,a,b\n")
    _one_line_error(lambda: read_records(path), f"{path}:2: 3 cells, but the header names 4 columns")


# -- parquet and Arrow -------------------------------------------------------------------------


def test_parquet_limit_and_its_bad_rows(tmp_path):
    path = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist(MMLU * 3), path, row_group_size=2)
    assert len(read_records(path)) == 9
    assert [r.question for r in read_records(path, limit=4)] == [r["question"] for r in (MMLU * 2)[:4]]
    bad = [dict(r) for r in MMLU]
    bad[2]["answer"] = 7
    pq.write_table(pa.Table.from_pylist(bad), path)
    _one_line_error(lambda: read_records(path), f"{path} row 2: answer 7 is out of range for 4 choices")
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "options": ["a", "b"], "gold": 0}]), path)
    _one_line_error(lambda: read_records(path), path, "unknown layout (columns: prompt, options, gold)", "--fields")
    (r,) = read_records(path, fields="question=prompt,choices=options,answer=gold")
    assert r.choices == ("a", "b") and r.where == f"{path} row 0"
    _one_line_error(lambda: read_records(path, fields="question=prompt,choices=opts,answer=gold"), "'opts'", "gold")
    pq.write_table(pa.Table.from_pylist(MMLU), path)
    path.write_bytes(path.read_bytes()[:-30])  # the footer cut off
    _one_line_error(lambda: read_records(path), path, "not a readable parquet file")


def test_save_to_disk_folders_splits_shards_and_a_lone_arrow_file(tmp_path):
    rows = [dict(r, question=f"{r['question']} ({i})") for i, r in enumerate(MMLU * 4)]
    one = _save_to_disk(tmp_path / "one", {"_": rows}, num_shards=3)
    assert [r.question for r in read_records(one)] == [r["question"] for r in rows]  # shards in order
    both = _save_to_disk(tmp_path / "both", {"test": rows[:5], "dev": rows[5:7]})
    assert len(read_records(both, "test")) == 5 and len(read_records(both, "dev")) == 2
    _one_line_error(lambda: read_records(both), both, "has the splits test, dev; pick one with --split")
    _one_line_error(lambda: read_records(both, "train"), both, "no split 'train'")
    (arrow,) = (both / "dev").glob("*.arrow")
    assert [r.question for r in read_records(arrow)] == [r["question"] for r in rows[5:7]]
    _one_line_error(lambda: read_records(tmp_path / "none.jsonl", "test"), "not found")
    _one_line_error(lambda: read_records(write_jsonl(tmp_path / "d.jsonl", MMLU), "test"), "is a file")


def test_bad_datasets_folders(tmp_path, capsys):
    empty = _save_to_disk(tmp_path / "empty", {"test": MMLU, "validation": []})
    _one_line_error(lambda: read_records(empty, "validation"), empty / "validation", "holds no records")
    missing = _save_to_disk(tmp_path / "missing", {"_": [{"question": "Q", "choices": ["a", "b"]}]})
    _one_line_error(lambda: read_records(missing), missing, "unknown layout (columns: question, choices)")
    label = _save_to_disk(tmp_path / "label", {"_": [ARC, dict(ARC, answerKey="E")]})
    (shard,) = label.glob("*.arrow")
    _one_line_error(lambda: read_records(label), f"{shard} row 1: answer 'E' is not one of the labels")
    corrupt = _save_to_disk(tmp_path / "corrupt", {"_": MMLU * 50})
    (shard,) = corrupt.glob("*.arrow")
    shard.write_bytes(shard.read_bytes()[:-100])
    _one_line_error(lambda: read_records(corrupt), shard, "not a readable Arrow file")
    shard.write_bytes(b"not arrow at all")
    _one_line_error(lambda: read_records(corrupt), shard, "not a readable Arrow file")
    for data, split, where in ((empty, "validation", "holds no records"), (corrupt, None, str(shard))):
        args = ["eval", "--data", data] + (["--split", split] if split else [])
        code, _, err = run_main(capsys, *args)
        assert code == 2 and where in err and len(err.strip().splitlines()) == 1, err


# -- layouts -----------------------------------------------------------------------------------

ARC = {"id": "a1", "question": "Which is a mammal?", "choices": {"text": ["cat", "fish"], "label": ["A", "B"]}}
ARC["answerKey"] = "A"
LAYOUT_ROWS = {  # one row as each dataset spells it -> (question, choices, answer, context, cloze)
    "arc": (ARC, ("Which is a mammal?", ("cat", "fish"), 0, None, "question-answer")),
    "arc, numeric labels": (
        dict(ARC, choices={"text": ["cat", "fish"], "label": ["1", "2"]}, answerKey="2"),
        ("Which is a mammal?", ("cat", "fish"), 1, None, "question-answer"),
    ),
    "openbookqa": (
        {"id": "o", "question_stem": "Plants need", "choices": {"text": ["light", "salt"], "label": ["A", "B"]}}
        | {"answerKey": " A"},
        ("Plants need", ("light", "salt"), 0, None, "plain"),
    ),
    "commonsense_qa": (
        dict(ARC, question_concept="mammal", answerKey="B"),
        ("Which is a mammal?", ("cat", "fish"), 1, None, "question-answer"),
    ),
    "hellaswag": (
        {
            "activity_label": "Roof shingle removal",
            "ctx_a": "A man is sitting on a roof.",
            "ctx_b": "he [title] starts",
            "ctx": "unused",
            "endings": ["is  using [step] wrap.", "pulls up roofing."],
            "label": "1",
        },
        ("Roof shingle removal: A man is sitting on a roof. He. starts", ("is using wrap.", "pulls up roofing."), 1)
        + (None, "plain"),
    ),
    "piqa": (
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shake it", "label": 0},
        ("Open a jar", ("twist the lid", "shake it"), 0, None, "question-answer"),
    ),
    "social_iqa": (
        {"context": "Tracy left.", "question": "Why?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"},
        ("Tracy left. Why?", ("a", "b", "c"), 2, None, "q-a"),
    ),
    "sciq": (
        {"question": "Q?", "distractor1": "x", "distractor2": "y", "distractor3": "z", "correct_answer": "w"}
        | {"support": "  Some support."},
        ("Q?", ("x", "y", "z", "w"), 3, "Some support.", "question-answer"),
    ),
    "winogrande": (
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
        ("Sarah beat Maria so _ won.", ("Sarah", "Maria"), 0, None, "blank"),
    ),
    "boolq": (
        {"question": "is water wet", "answer": True, "passage": "Water is wet."},
        ("is water wet?", ("no", "yes"), 1, "Water is wet.", "question-answer"),
    ),
    "mmlu": (MMLU[0], ("What is 2+2?", ("3", "4", "5", "6"), 1, None, "question-answer")),
}


@pytest.mark.parametrize("name", list(LAYOUT_ROWS))
def test_known_layouts_as_lm_eval_reads_them(tmp_path, name):
    row, expected = LAYOUT_ROWS[name]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    (r,) = read_records(path)
    assert (r.question, r.choices, r.answer, r.context, r.cloze) == expected


def test_hellaswag_preprocessing_is_lm_eval_s():
    from lm_eval.tasks.hellaswag.utils import preprocess

    for text in ("A man [title] is on a roof. [step] He  climbs.", "  plain  ", "[header] How to [title] x"):
        assert hellaswag_preprocess(text) == preprocess(text)


def test_fields_errors_are_one_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Q", "opts": {"text": ["a", "b"], "label": ["x", "y"]}, "k": "y"}])
    (r,) = read_records(path, fields="question=q,choices=opts.text,answer=k,labels=opts.label")
    assert r.answer == 1
    for fields, message in (
        ("question=q,choices=opts.text", "'answer' is missing"),
        ("question=q,choices=opts.text,answer=k,colour=c", "unknown field 'colour'"),
        ("question=q,choices", "is not FIELD=COLUMN"),
        ("question=q,choices=opts.text,answer=k,answer=k", "'answer' is given twice"),
        ("question=q,choices=opts.text,answer=gold", "--fields names 'gold', not a column here (columns: q, opts, k)"),
    ):
        _one_line_error(lambda f=fields: read_records(path, fields=f), message)
    without_labels = "question=q,choices=opts.text,answer=k"
    _one_line_error(lambda: read_records(path, fields=without_labels), f"{path}:1: answer 'y' is out of range")


def test_label_and_answer_errors_name_the_row(tmp_path):
    cases = [
        ({"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "answer 2 is out of range for 2 choices"),
        ({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "no '_'"),
        ({"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""}, "answer must be 1 or 2"),
        (dict(LAYOUT_ROWS["hellaswag"][0], label=""), "the label '' is not an integer"),
        (dict(LAYOUT_ROWS["hellaswag"][0], ctx_b=None), "'ctx_b' must be a string, got None"),
        (dict(LAYOUT_ROWS["sciq"][0], support=3), "'support' must be a string, got 3"),
    ]
    for row, message in cases:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist([row, row]), path)
        if "no '_'" in message:  # a Winogrande sentence without its blank is refused where rc needs it
            _one_line_error(lambda p=path: read_records(p), f"{path} row 0", message)
            continue
        _one_line_error(lambda p=path: read_records(p), f"{path} row 0: ", message)


def test_few_shot_examples_come_from_dev_else_the_first_records(tmp_path):
    rows = [dict(r, question=f"Q{i}") for i, r in enumerate(task_records(6))]
    folder = _save_to_disk(tmp_path / "mmlu", {"test": rows[:4], "dev": rows[4:]})
    records, asked = read_task(folder, "test", num_fewshot=2)
    assert [e.question for e in asked.examples_for(0)] == ["Q4", "Q5"] and not asked.own_split
    _one_line_error(
        lambda: read_task(folder, "test", num_fewshot=3), "--num-fewshot 3 needs 3 records in the dev split"
    )
    records, asked = read_task(folder, "dev", num_fewshot=1)  # the dev split itself: its own first records
    assert asked.own_split and [e.question for e in asked.examples_for(0)] == ["Q5"]
    alone = _save_to_disk(tmp_path / "alone", {"_": rows[:4]})
    records, asked = read_task(alone, limit=1, num_fewshot=3)  # the pool is the split's, not the limit's
    assert len(records) == 1 and [e.question for e in asked.examples_for(0)] == ["Q1", "Q2", "Q3"]
    assert [e.question for e in asked.examples_for(2)] == ["Q0", "Q1", "Q3"]
    _one_line_error(lambda: read_task(alone, num_fewshot=4), "needs 5 records in the data; it has 4")


def test_json_nested_too_deep_or_an_integer_too_long_is_one_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    _one_line_error(lambda: read_records(path), f"{path}:1: not valid JSON (RecursionError")
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": ' + "1" * 5000 + "}\n")
    _one_line_error(lambda: read_records(path), f"{path}:1: not valid JSON (ValueError")
