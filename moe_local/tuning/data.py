"""Task files (JSONL) -> records, the one prompt renderer, candidate encoding and padded batches.

Rules (docs/architecture.md, task data): one JSON object per non-blank line (blank lines are skipped
and are not records);
``question`` (str), ``choices`` (2-10 strings, lettered A, B, ...), ``answer`` (0-based int or a
letter), optional ``task`` (or cais/mmlu's ``subject``); other keys are ignored. A bad line is a
one-line error naming the file and line.

Prompt (lm-eval's MMLU template)::

    <question>\\nA. <choice 0>\\nB. <choice 1>\\n...Answer:

Each candidate " A", " B", ... is scored by the summed log-probability of its continuation tokens
after the prompt; the task loss is CE = -log softmax over the candidate scores. Continuations are
split from the prompt the way lm-eval does (tokenize prompt + candidate, drop the prompt's tokens),
so a tokenizer whose " A" is two tokens is scored correctly. Sequences to run are deduplicated: when
every candidate is one token there is a single forward pass over the prompt; when candidates share
their leading tokens (e.g. "Ġ" then "A") they share one sequence too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

LETTERS = "ABCDEFGHIJ"
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
ANSWER_CUE = "Answer:"
# Score of a candidate a sample does not have (fewer choices than the batch's widest): finite, so
# that ``score * one_hot`` stays 0 and log-softmax gives it probability exactly 0.
MISSING_SCORE = -1e9


@dataclass(frozen=True)
class Record:
    question: str
    choices: tuple[str, ...]
    answer: int
    task: str | None
    line: int  # 1-based line number in its file


def _fail(path, line, message):
    raise UserError(f"{path}:{line}: {message}")


def parse_record(obj, path, line) -> Record:
    if not isinstance(obj, dict):
        _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in obj:
            _fail(path, line, f"missing field '{key}'")
    question, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(question, str) or not question.strip():
        _fail(path, line, "'question' must be a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        _fail(path, line, "'choices' must be a list of strings")
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        _fail(path, line, f"'choices' has {len(choices)} entries; {MIN_CHOICES} to {MAX_CHOICES} are allowed")
    n = len(choices)
    valid = f"0-{n - 1} or A-{LETTERS[n - 1]}"
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if (
        isinstance(answer, bool)
        or not isinstance(answer, (int, str))
        or (letter is not None and not (len(letter) == 1 and "A" <= letter <= "Z"))
    ):
        _fail(path, line, f"'answer' must be a 0-based integer or a letter ({valid}), got {answer!r}")
    if letter is not None:
        if letter not in LETTERS[:n]:
            _fail(path, line, f"answer {answer!r} is out of range for {n} choices ({valid})")
        answer = LETTERS.index(letter)
    elif not 0 <= answer < n:
        _fail(path, line, f"answer {answer} is out of range for {n} choices ({valid})")
    task = obj.get("task", obj.get("subject"))
    if task is not None and not isinstance(task, str):
        _fail(path, line, "'task' (or 'subject') must be a string")
    return Record(question, tuple(choices), int(answer), task, line)


def read_records(path) -> list[Record]:
    """All records of a JSONL task file, validated; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    records = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            _fail(path, number, f"not valid JSON ({e.msg} at column {e.colno})")
        records.append(parse_record(obj, path, number))
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def render_prompt(record: Record) -> str:
    """lm-eval's MMLU prompt: the (stripped) question, lettered choices, and ``Answer:``."""
    return embedding_text(record) + ANSWER_CUE


def embedding_text(record: Record) -> str:
    """The text the task embedding is computed from: the prompt without its final ``Answer:``."""
    lines = [record.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(record.choices)]
    return "\n".join(lines) + "\n"


def candidates(n: int) -> list[str]:
    return [f" {LETTERS[i]}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One record as token sequences to run and, per candidate, where its tokens are scored.

    ``sequences[s]`` = prompt + some continuation tokens (all but each candidate's last).
    Candidate c is scored in ``sequences[cand_seq[c]]``: the log-probabilities of ``cand_tokens[c][l]``
    predicted at position ``prompt_len - 1 + l`` are summed. Every sequence starts with the prompt,
    so position ``prompt_len - 1`` (the last prompt token) holds the same state in all of them.
    """

    sequences: tuple[tuple[int, ...], ...]
    prompt_len: int
    cand_seq: tuple[int, ...]
    cand_tokens: tuple[tuple[int, ...], ...]
    answer: int


def _special_prefix(tokenizer, text: str, plain: list[int]) -> list[int]:
    """Tokens the tokenizer puts before a text by default (a BOS), none if it adds only after it."""
    full = tokenizer(text)["input_ids"]
    for k in range(0, min(3, len(full)) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


def encode_records(tokenizer, records: list[Record]) -> list[Encoded]:
    """Tokenize prompts and candidate continuations (lm-eval's split: whole minus prompt)."""
    prompts = [render_prompt(r) for r in records]
    plain = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prefix = _special_prefix(tokenizer, prompts[0], plain[0]) if records else []
    widest = max(len(r.choices) for r in records)
    lone = tokenizer(candidates(widest), add_special_tokens=False)["input_ids"]
    wholes = tokenizer(
        [p + c for p, r in zip(prompts, records) for c in candidates(len(r.choices))], add_special_tokens=False
    )["input_ids"]
    out, at = [], 0
    for r, ctx in zip(records, plain):
        prompt = list(prefix) + list(ctx)
        seqs: dict[tuple, int] = {}
        cand_seq, cand_tokens = [], []
        for c in range(len(r.choices)):
            whole = wholes[at]
            at += 1
            cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else lone[c]
            if not cont:
                raise UserError(f"record on line {r.line}: candidate {candidates(widest)[c]!r} has no tokens")
            seq = tuple(prompt + list(cont[:-1]))
            cand_seq.append(seqs.setdefault(seq, len(seqs)))
            cand_tokens.append(tuple(cont))
        out.append(Encoded(tuple(seqs), len(prompt), tuple(cand_seq), tuple(cand_tokens), r.answer))
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
    prompt_pos = pad + np.repeat([e.prompt_len - 1 for e in encoded], [len(e.sequences) for e in encoded])
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
                key = (int(seq), int(pad[seq] + e.prompt_len - 1 + l))
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
