"""One multiple-choice task record and the rules every reader's output must meet.

A record is what the prompts are rendered from (tuning/data.py): a question, 2-10 choices, the
0-based index of the right one, an optional task name for per-task reports, an optional passage
shown before the question, and the cloze style ``--format rc`` asks it in (the layout's lm-eval
template). ``where`` names its file and line (or row) for messages. The layouts (layouts.py) turn a
row of any known shape into the raw values; :func:`make_record` checks them, whatever file they
came from, and stops at the first bad one with a one-line error naming the file and line or row.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

LETTERS = "ABCDEFGHIJ"
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
# How --format rc asks a record, after lm-eval's task templates (data.rc_requests renders them):
#   question-answer  "Question: <q>\nAnswer:" (ARC, PIQA, SciQ, BoolQ, MMLU's cloze variant, plain data)
#   q-a              "Q: <q>\nA:" (SocialIQA)
#   plain            "<q>" as it is (HellaSwag's preprocessed context, OpenBookQA's question stem)
#   blank            each choice fills the question's "_", the rest is scored (Winogrande's partial scoring)
CLOZE_STYLES = ("question-answer", "q-a", "plain", "blank")
BLANK = "_"


@dataclass(frozen=True)
class Record:
    question: str
    choices: tuple[str, ...]
    answer: int
    task: str | None
    line: int  # the 1-based line of a text file (JSONL, CSV), the 0-based row of a table (parquet, Arrow)
    context: str | None = None  # a passage before the question (SciQ's support, BoolQ's passage)
    cloze: str = "question-answer"  # how --format rc asks it (CLOZE_STYLES)
    where: str = ""  # "FILE:LINE" or "FILE row N", for messages

    @property
    def simple(self) -> bool:
        """Nothing beyond what JSONL records always had (no passage, the default cloze style)."""
        return self.context is None and self.cloze == "question-answer"


def fail(where: str, message: str):
    raise UserError(f"{where}: {message}")


def _answer_index(answer, n: int, where: str, labels, text_cells: bool) -> int:
    """A 0-based integer, a letter, one of ``labels`` or (from a text cell) a decimal integer -> index."""
    valid = f"0-{n - 1} or A-{LETTERS[n - 1]}"
    if labels is not None:
        if answer in labels:
            return labels.index(answer)
        fail(where, f"answer {answer!r} is not one of the labels {list(labels)}")
    if text_cells and isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if (
        isinstance(answer, bool)
        or not isinstance(answer, (int, str))
        or (letter is not None and not (len(letter) == 1 and "A" <= letter <= "Z"))
    ):
        fail(where, f"'answer' must be a 0-based integer or a letter ({valid}), got {answer!r}")
    if letter is not None:
        if letter not in LETTERS[:n]:
            fail(where, f"answer {answer!r} is out of range for {n} choices ({valid})")
        return LETTERS.index(letter)
    if not 0 <= answer < n:
        fail(where, f"answer {answer} is out of range for {n} choices ({valid})")
    return int(answer)


def make_record(
    where: str,
    line: int,
    question,
    choices,
    answer,
    task=None,
    context=None,
    cloze: str = "question-answer",
    labels=None,
    text_cells: bool = False,
) -> Record:
    """A checked record. ``labels``: the choices' labels ``answer`` names (ARC's ``choices.label``);
    ``text_cells``: the values come from a text table (CSV), where an index is spelled as digits."""
    if not isinstance(question, str) or not question.strip():
        fail(where, "'question' must be a non-empty string")
    if isinstance(choices, tuple):
        choices = list(choices)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        fail(where, "'choices' must be a list of strings")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        fail(where, f"'choices' has {len(choices)} entries; {MIN_CHOICES} to {MAX_CHOICES} are allowed")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(choices)):
        fail(where, f"the labels {labels!r} do not name the {len(choices)} choices one each")
    index = _answer_index(answer, len(choices), where, labels, text_cells)
    if task is not None and not isinstance(task, str):
        fail(where, "'task' (or 'subject') must be a string")
    if context is not None and not isinstance(context, str):
        fail(where, "'context' must be a string")
    if cloze == "blank" and question.count(BLANK) < 1:
        fail(where, f"the sentence has no '{BLANK}' for the choices to fill")
    return Record(question, tuple(choices), index, task, line, context, cloze, where)
