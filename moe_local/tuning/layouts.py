"""Rows of known benchmark layouts -> records, without flags; ``--fields`` maps any other layout.

A layout is recognised by its columns (the first that fits, most specific first) and turns one row into
a record's values, as lm-eval's task definitions read the same datasets: which column is the question,
the choices and the answer, how labels become indices, HellaSwag's text preprocessing, and the cloze
style (records.CLOZE_STYLES) ``--format rc`` asks it in. Today's JSONL is the ``mmlu`` layout
(``question``, ``choices``, ``answer``, optional ``task``/``subject`` and ``context``), and a JSONL file
whose first object fits no other layout is read with it, so its errors stay per line.

``--fields question=COL,choices=COL,answer=COL`` (optional ``task=``, ``context=``, ``labels=``) maps any
other layout: ``choices`` is a list column or several columns joined with ``+`` (``sol1+sol2``);
``answer`` is a 0-based index, a letter, or one of ``labels`` (a column of the choices' labels); a
dotted name reaches into a struct column (``choices.text``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from .records import LETTERS, Record, fail, make_record

FIELD_KEYS = ("question", "choices", "answer", "task", "context", "labels")
REQUIRED_FIELDS = ("question", "choices", "answer")


@dataclass(frozen=True)
class Layout:
    name: str
    needs: tuple[str, ...]  # the columns that identify it
    values: Callable[[dict, str], dict]  # (row, where) -> make_record's keyword arguments


def _label_index(value, where: str, offset: int = 0) -> int:
    """An integer label (or its digits, as several datasets store labels), minus ``offset``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        fail(where, f"the label {value!r} is not an integer")
    return int(value) - offset


def _text(row, key: str, where: str) -> str:
    """A column the layout builds text from: it must hold a string."""
    value = row[key]
    if not isinstance(value, str):
        fail(where, f"'{key}' must be a string, got {value!r}")
    return value


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (tasks/hellaswag/utils.py): WikiHow's bracketed artefacts out."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row, where):
    text = {key: _text(row, key, where) for key in ("ctx_a", "ctx_b", "ctx", "activity_label") if key in row}
    ctx = text["ctx_a"] + " " + text["ctx_b"].capitalize() if "ctx_a" in text and "ctx_b" in text else text["ctx"]
    query = text["activity_label"] + ": " + ctx if "activity_label" in text else ctx
    endings = row["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        fail(where, "'endings' must be a list of strings")
    return dict(
        question=hellaswag_preprocess(query),
        choices=[hellaswag_preprocess(e) for e in endings],
        answer=_label_index(row["label"], where),
        cloze="plain",
    )


def _struct_choices(row, where, question_key, cloze):
    """ARC, OpenBookQA, CommonsenseQA: ``choices`` {text, label}, ``answerKey`` one of the labels."""
    choices = row["choices"]
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        fail(where, "'choices' must hold 'text' and 'label' lists")
    key = row["answerKey"].lstrip() if isinstance(row["answerKey"], str) else row["answerKey"]
    return dict(question=row[question_key], choices=choices["text"], answer=key, labels=choices["label"], cloze=cloze)


def _mmlu(row, where):
    return dict(
        question=row["question"],
        choices=row["choices"],
        answer=row["answer"],
        task=row.get("task", row.get("subject")),
        context=row.get("context"),
    )


def _lettered(row, where):
    """MMLU's CSV with a header (question or input, A, B, ..., answer or target)."""
    letters = [letter for letter in LETTERS if letter in row]
    return dict(
        question=row.get("question", row.get("input")),
        choices=[row[letter] for letter in letters],
        answer=row.get("answer", row.get("target")),
        task=row.get("subject", row.get("task")),
    )


def _boolq(row, where):
    answer = row["answer"] if "answer" in row else _label_index(row["label"], where)
    if not isinstance(answer, (bool, int)) or isinstance(answer, int) and answer not in (0, 1):
        fail(where, f"BoolQ's answer must be true or false, got {answer!r}")
    question = _text(row, "question", where) + "?"  # lm-eval's template adds the question mark
    return dict(question=question, choices=["no", "yes"], answer=int(answer), context=row["passage"])


def _winogrande(row, where):
    answer = row["answer"]
    if answer not in ("1", "2", 1, 2):
        fail(where, f"Winogrande's answer must be 1 or 2, got {answer!r}")
    return dict(
        question=row["sentence"], choices=[row["option1"], row["option2"]], answer=int(answer) - 1, cloze="blank"
    )


def _sciq(row, where):
    support = _text(row, "support", where) if row.get("support") is not None else ""
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return dict(question=row["question"], choices=choices, answer=3, context=support.lstrip())


LAYOUTS = (
    Layout("hellaswag", ("ctx", "endings", "label"), _hellaswag),
    Layout("winogrande", ("sentence", "option1", "option2", "answer"), _winogrande),
    Layout(
        "piqa",
        ("goal", "sol1", "sol2", "label"),
        lambda r, w: dict(question=r["goal"], choices=[r["sol1"], r["sol2"]], answer=_label_index(r["label"], w)),
    ),
    Layout(
        "social_iqa",
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        lambda r, w: dict(
            question=f"{_text(r, 'context', w)} {_text(r, 'question', w)}",
            choices=[r["answerA"], r["answerB"], r["answerC"]],
            answer=_label_index(r["label"], w, offset=1),
            cloze="q-a",
        ),
    ),
    Layout("sciq", ("question", "distractor1", "distractor2", "distractor3", "correct_answer"), _sciq),
    Layout(
        "openbookqa",
        ("question_stem", "choices", "answerKey"),
        lambda r, w: _struct_choices(r, w, "question_stem", "plain"),
    ),
    Layout(
        "commonsense_qa",
        ("question", "question_concept", "choices", "answerKey"),
        lambda r, w: _struct_choices(r, w, "question", "question-answer"),
    ),
    Layout(
        "arc", ("question", "choices", "answerKey"), lambda r, w: _struct_choices(r, w, "question", "question-answer")
    ),
    Layout("boolq", ("question", "passage", "answer"), _boolq),
    Layout("boolq", ("question", "passage", "label"), _boolq),
    Layout("mmlu", ("question", "choices", "answer"), _mmlu),
    Layout("mmlu-csv", ("question", "A", "B", "answer"), _lettered),
    Layout("mmlu-csv", ("input", "A", "B", "target"), _lettered),
)
NATIVE = next(layout for layout in LAYOUTS if layout.name == "mmlu")


def known_layout(columns) -> Layout | None:
    names = set(columns)
    return next((layout for layout in LAYOUTS if names.issuperset(layout.needs)), None)


def _headerless(cells: list, where):
    """MMLU's original CSV files: ``question, choice..., answer`` without a header."""
    if len(cells) < 4:
        fail(where, f"{len(cells)} cells; a CSV without a header has question, 2 to 10 choices and answer")
    return dict(question=cells[0], choices=list(cells[1:-1]), answer=cells[-1])


def to_record(layout, row, line: int, where: str, text_cells: bool = False) -> Record:
    """One row as a checked record (``layout``: a Layout, a FieldMap, or None for a headerless CSV row)."""
    if layout is None:
        values = _headerless(row, where)
    else:
        if not isinstance(row, dict):
            fail(where, f"expected a JSON object, got {type(row).__name__}")
        for name in layout.needs:
            if lookup(row, name) is MISSING:
                fail(where, f"missing field '{name}'")
        values = layout.values(row, where)
    return make_record(where, line, text_cells=text_cells, **values)


MISSING = object()


def lookup(row: dict, name: str):
    """``row[name]``, or a dotted path into struct columns (``choices.text``); MISSING if neither."""
    if name in row:
        return row[name]
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


@dataclass(frozen=True)
class FieldMap:
    """``--fields``: which column (or columns, or struct member) holds each of a record's values."""

    columns: dict  # field -> a column name, or a list of names (choices from several columns)
    name = "--fields"

    @property
    def needs(self) -> tuple[str, ...]:
        names = []
        for value in self.columns.values():
            names += value if isinstance(value, list) else [value]
        return tuple(names)

    def values(self, row, where) -> dict:
        out = {key: lookup(row, column) for key, column in self.columns.items() if key != "choices"}
        choices = self.columns["choices"]
        out["choices"] = [lookup(row, c) for c in choices] if isinstance(choices, list) else lookup(row, choices)
        return out


def parse_fields(text: str) -> FieldMap:
    """``question=COL,choices=COL|COL+COL,answer=COL[,task=COL][,context=COL][,labels=COL]``."""
    columns = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise UserError(f"--fields: '{item}' is not FIELD=COLUMN (fields: {', '.join(FIELD_KEYS)})")
        if key not in FIELD_KEYS:
            raise UserError(f"--fields: unknown field '{key}' (fields: {', '.join(FIELD_KEYS)})")
        if key in columns:
            raise UserError(f"--fields: '{key}' is given twice")
        parts = [p.strip() for p in value.split("+")]
        columns[key] = parts if key == "choices" and len(parts) > 1 else value
    missing = [k for k in REQUIRED_FIELDS if k not in columns]
    if missing:
        raise UserError(f"--fields must map {', '.join(REQUIRED_FIELDS)}; '{missing[0]}' is missing")
    return FieldMap(columns)


def choose(columns, name: str, fields: FieldMap | None, jsonl: bool = False):
    """The layout of a source with these columns: ``fields`` when given (each column it names must be
    there, or the struct column a dotted name reaches into), else the first known layout that fits;
    for JSONL, today's layout when none fits (its errors are then per line)."""
    columns = [str(c) for c in columns]
    if fields is not None:
        absent = [c for c in fields.needs if c not in columns and c.split(".")[0] not in columns]
        if absent:
            raise UserError(f"{name}: --fields names '{absent[0]}', not a column here (columns: {', '.join(columns)})")
        return fields
    layout = known_layout(columns)
    if layout is None and jsonl:
        return NATIVE
    if layout is None:
        raise UserError(
            f"{name}: unknown layout (columns: {', '.join(columns)}); "
            "map it with --fields question=COL,choices=COL,answer=COL"
        )
    return layout
