"""Records -> the one place prompts are rendered, candidate encoding and padded batches.

Records come from any task source through tasks.py (formats.py reads JSONL, CSV, parquet, Arrow and
datasets folders; layouts.py maps known benchmark layouts and ``--fields``; records.py holds the rules a
record meets; docs/architecture.md, task data), with the prompting (tasks.Prompting): the format and
the few-shot examples.

Two formats, as lm-eval scores multiple choice (a candidate's score is the summed log-probability of
its continuation tokens after its context):

- ``mc`` (lm-eval's MMLU template): the question, lettered choices and ``Answer:``; the candidates
  are " A", " B", ... ::

      <question>\\nA. <choice 0>\\nB. <choice 1>\\n...Answer:

- ``rc`` (cloze): the record's lm-eval template (``Question: <q>\\nAnswer:`` for most; records.CLOZE_STYLES)
  and each choice's text as the continuation, `` <choice>``; Winogrande's blank is filled by each
  choice in turn and the rest of the sentence is scored (lm-eval's partial scoring).

``acc`` is the argmax of the scores, ``acc_norm`` the argmax of score / the choice's length in
characters (lm-eval's ``completion_len``: the letter in mc, the choice's text in rc, the filled-in
context for a blank). With ``--num-fewshot K`` each prompt starts with K worked examples, each its
context and right continuation followed by a blank line, as lm-eval joins them.

Tokens follow lm-eval's ``_encode_pair``: trailing whitespace of a context moves to its continuation,
the whole string is tokenized and the context's tokens are split off; the model's special prefix (a
BOS) goes first. Sequences to run are deduplicated: candidates of one token share a single pass over
the prompt, and candidates that share their leading tokens share one sequence too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .records import BLANK, LETTERS, MAX_CHOICES, MIN_CHOICES, Record
from .tasks import FORMATS, Prompting, parse_record, read_records, read_task, source_sha256

# What callers have always imported from here, and the reading side they now live beside.
__all__ = [
    "FORMATS",
    "LETTERS",
    "MAX_CHOICES",
    "MIN_CHOICES",
    "Prompting",
    "Record",
    "parse_record",
    "read_records",
    "read_task",
    "source_sha256",
]

ANSWER_CUE = "Answer:"
FEWSHOT_DELIMITER = "\n\n"
# Score of a candidate a sample does not have (fewer choices than the batch's widest): finite, so
# that ``score * one_hot`` stays 0 and log-softmax gives it probability exactly 0.
MISSING_SCORE = -1e9


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def _preamble(record: Record, skip_empty: bool) -> str:
    if record.context is None or (skip_empty and not record.context):
        return ""
    return record.context + "\n"


def render_prompt(record: Record) -> str:
    """lm-eval's MMLU prompt: the (stripped) question, lettered choices, and ``Answer:``."""
    return embedding_text(record) + ANSWER_CUE


def embedding_text(record: Record) -> str:
    """The text the task embedding is computed from: the mc prompt without its final ``Answer:``."""
    lines = [record.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(record.choices)]
    return _preamble(record, skip_empty=True) + "\n".join(lines) + "\n"


def candidates(n: int) -> list[str]:
    return [f" {LETTERS[i]}" for i in range(n)]


def cloze_context(record: Record) -> str:
    """The rc context of a record that is not a blank: its lm-eval template (records.CLOZE_STYLES)."""
    question = {
        "question-answer": f"Question: {record.question}\n{ANSWER_CUE}",
        "q-a": f"Q: {record.question}\nA:",
        "plain": record.question,
    }[record.cloze]
    return _preamble(record, skip_empty=False) + question


def requests(record: Record, format: str) -> tuple[list[tuple[str, str]], list[int]]:
    """lm-eval's loglikelihood requests for a record, one (context, continuation) per choice, and the
    characters ``acc_norm`` divides each score by."""
    if format == "mc":
        prompt = render_prompt(record)
        return [(prompt, c) for c in candidates(len(record.choices))], [1] * len(record.choices)
    if record.cloze == "blank":
        at = record.question.index(BLANK)
        contexts = [_preamble(record, False) + record.question[:at] + choice for choice in record.choices]
        rest = " " + record.question[at + 1 :].strip()
        return [(c, rest) for c in contexts], [len(c) - len(_preamble(record, False)) for c in contexts]
    context = cloze_context(record)
    return [(context, " " + choice) for choice in record.choices], [len(choice) for choice in record.choices]


def prompt_requests(record: Record, prompting: Prompting, index: int) -> tuple[list[tuple[str, str]], list[int]]:
    """:func:`requests` with the record's few-shot examples (``index``: its place in the data) before each
    context: every example's context and right continuation, then a blank line."""
    pairs, chars = requests(record, prompting.format)
    shots = ""
    for example in prompting.examples_for(index):
        context, continuation = requests(example, prompting.format)[0][example.answer]
        shots += context + continuation + FEWSHOT_DELIMITER
    return [(shots + context, continuation) for context, continuation in pairs], chars


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One record as token sequences to run and, per candidate, where its tokens are scored.

    ``sequences[s]`` = a context (``prompt_lens[s]`` tokens, the special prefix included) + some
    continuation tokens (all but a candidate's last). Candidate c is scored in ``sequences[cand_seq[c]]``:
    the log-probabilities of ``cand_tokens[c][l]`` predicted at position ``prompt_lens[s] - 1 + l`` are
    summed. In mc and in rc every sequence starts with the same prompt (a Winogrande blank gives each
    candidate its own context); the sample's routing is read at the last prompt token of its first
    sequence. ``chars[c]`` is what ``acc_norm`` divides candidate c's score by.
    """

    sequences: tuple[tuple[int, ...], ...]
    prompt_lens: tuple[int, ...]
    cand_seq: tuple[int, ...]
    cand_tokens: tuple[tuple[int, ...], ...]
    answer: int
    chars: tuple[int, ...] = ()


def _special_prefix(tokenizer, text: str, plain: list[int]) -> list[int]:
    """Tokens the tokenizer puts before a text by default (a BOS), none if it adds only after it."""
    full = tokenizer(text)["input_ids"]
    for k in range(0, min(3, len(full)) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's ``_encode_pair``: whitespace that ends the context starts the continuation instead."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_records(tokenizer, records: list[Record], prompting: Prompting | None = None) -> list[Encoded]:
    """Tokenize every record's requests (lm-eval's split of context + continuation: whole minus context)."""
    prompting = prompting or Prompting()
    asked = [prompt_requests(r, prompting, i) for i, r in enumerate(records)]
    pairs = [_move_trailing_space(c, k) for reqs, _ in asked for c, k in reqs]
    contexts = list(dict.fromkeys(c for c, _ in pairs))
    context_ids = dict(zip(contexts, tokenizer(contexts, add_special_tokens=False)["input_ids"])) if pairs else {}
    wholes = tokenizer([c + k for c, k in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    prefix = _special_prefix(tokenizer, contexts[0], context_ids[contexts[0]]) if pairs else []
    out, at = [], 0
    for r, (reqs, chars) in zip(records, asked):
        seqs: dict[tuple, int] = {}
        cand_seq, cand_tokens = [], []
        for c in range(len(reqs)):
            if not pairs[at][0]:
                raise UserError(f"{r.where or f'record on line {r.line}'}: choice {c} leaves its prompt empty")
            context = context_ids[pairs[at][0]]
            continuation = wholes[at][len(context) :]
            at += 1
            if not continuation:
                raise UserError(f"{r.where or f'record on line {r.line}'}: choice {c} has no tokens after its prompt")
            key = (tuple(prefix + list(context) + list(continuation[:-1])), len(prefix) + len(context))
            cand_seq.append(seqs.setdefault(key, len(seqs)))
            cand_tokens.append(tuple(continuation))
        out.append(
            Encoded(
                tuple(k[0] for k in seqs),
                tuple(k[1] for k in seqs),
                tuple(cand_seq),
                tuple(cand_tokens),
                r.answer,
                tuple(chars),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Padded numpy arrays for a group of samples; backends read only these fields.

    Sequences (S of them, left-padded to T):
      ids [S, T] int64, mask [S, T] int64 (1 = real token), lengths [S],
      seq_sample [S] (which sample a sequence belongs to), prompt_pos [S] (padded position of the
      last prompt token).
    Samples (B of them):
      sample_seq [B] (the sequence whose last prompt token gives the sample's routing),
      answers [B], num_choices [B], index [B] (record indices in the data set).
    Candidate scores: the lm-head runs on R distinct (sequence, position) rows ``head_seq``/``head_pos``
    [R]; ``score[b, c] = Σ_l cand_tokmask[b, c, l] · logp[cand_row[b, c, l], cand_tok[b, c, l]]``;
    ``cand_valid [B, C]`` is False where a sample has fewer choices (score = MISSING_SCORE).
    """

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    seq_sample: np.ndarray
    prompt_pos: np.ndarray
    sample_seq: np.ndarray
    answers: np.ndarray
    num_choices: np.ndarray
    index: np.ndarray
    head_seq: np.ndarray
    head_pos: np.ndarray
    cand_row: np.ndarray
    cand_tok: np.ndarray
    cand_tokmask: np.ndarray
    cand_valid: np.ndarray

    @property
    def size(self) -> int:
        return len(self.answers)

    def answer_onehot(self, answers=None) -> np.ndarray:
        answers = self.answers if answers is None else np.asarray(answers)
        onehot = np.zeros(self.cand_valid.shape, dtype=np.float32)
        onehot[np.arange(len(answers)), answers] = 1.0
        return onehot


def make_batch(encoded: list[Encoded], index, pad_id: int = 0) -> Batch:
    """Left-pad the samples' sequences into one batch (positions restart at each row's first token)."""
    seqs = [s for e in encoded for s in e.sequences]
    S, T = len(seqs), max(len(s) for s in seqs)
    ids = np.full((S, T), pad_id, dtype=np.int64)
    mask = np.zeros((S, T), dtype=np.int64)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    pad = T - lengths
    B = len(encoded)
    C = max(len(e.cand_seq) for e in encoded)
    L = max(len(t) for e in encoded for t in e.cand_tokens)
    seq_sample = np.repeat(np.arange(B), [len(e.sequences) for e in encoded])
    first = np.concatenate([[0], np.cumsum([len(e.sequences) for e in encoded])[:-1]]).astype(np.int64)
    prompt_pos = pad + np.array([n - 1 for e in encoded for n in e.prompt_lens], dtype=np.int64)
    rows: dict[tuple[int, int], int] = {}
    cand_row = np.zeros((B, C, L), dtype=np.int64)
    cand_tok = np.zeros((B, C, L), dtype=np.int64)
    cand_tokmask = np.zeros((B, C, L), dtype=np.float32)
    cand_valid = np.zeros((B, C), dtype=bool)
    for b, e in enumerate(encoded):
        for c, (s, toks) in enumerate(zip(e.cand_seq, e.cand_tokens)):
            seq = first[b] + s
            cand_valid[b, c] = True
            for l, tok in enumerate(toks):
                key = (int(seq), int(pad[seq] + e.prompt_lens[s] - 1 + l))
                cand_row[b, c, l] = rows.setdefault(key, len(rows))
                cand_tok[b, c, l] = tok
                cand_tokmask[b, c, l] = 1.0
    head = np.array(list(rows), dtype=np.int64).reshape(-1, 2)
    return Batch(
        ids=ids,
        mask=mask,
        lengths=lengths,
        seq_sample=seq_sample,
        prompt_pos=prompt_pos,
        sample_seq=first,
        answers=np.array([e.answer for e in encoded], dtype=np.int64),
        num_choices=np.array([len(e.cand_seq) for e in encoded], dtype=np.int64),
        index=np.asarray(index, dtype=np.int64),
        head_seq=head[:, 0],
        head_pos=head[:, 1],
        cand_row=cand_row,
        cand_tok=cand_tok,
        cand_tokmask=cand_tokmask,
        cand_valid=cand_valid,
    )


def batches(encoded: list[Encoded], order, batch_size: int, pad_id: int = 0):
    """Batches of ``batch_size`` samples in the given order (the last one may be smaller)."""
    order = np.asarray(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield make_batch([encoded[i] for i in idx], idx, pad_id)


# ---------------------------------------------------------------------------------------------
# Scores -> predictions (the differentiable CE over candidates is roma.candidate_ce)
# ---------------------------------------------------------------------------------------------


def predictions(scores: np.ndarray) -> np.ndarray:
    """argmax over candidates; ties go to the first (lowest letter)."""
    return np.asarray(scores).argmax(-1)


def norm_predictions(scores: np.ndarray, encoded: list[Encoded], index) -> np.ndarray:
    """lm-eval's ``acc_norm`` choice: argmax of score / characters (float64), ties to the first."""
    chars = np.ones(np.shape(scores), dtype=np.float64)
    for b, i in enumerate(np.asarray(index)):
        chars[b, : len(encoded[i].chars)] = encoded[i].chars
    return (np.asarray(scores, dtype=np.float64) / chars).argmax(-1)
