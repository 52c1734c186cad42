"""Records whose prompts fit the model's context, checked before any model work.

Every sequence the model runs for a record is a context (the prompt, after its few-shot examples) plus
all but the last token of a continuation (data.py); it must fit the model's context
(``max_position_embeddings``). A record that does not is refused, naming where it is (file and line, or
row) and the limit: there is no silent truncation.

Counting the tokens of a huge prompt costs time and memory in proportion to its length (a 5 MB
question: about a minute and 3.5 GB to tokenize with the tiny model's tokenizer), so before the records
are encoded, a request whose UTF-8 bytes exceed the context (a token covers at least one byte in
byte-level BPE and in SentencePiece with byte fallback) is counted piece by piece, and the count stops as
soon as it is certainly past the limit: the refusal costs what a prompt of the context's length costs.
"""

from __future__ import annotations

import contextlib

from ..errors import UserError
from .data import Encoded, Record, encode_records, prompt_requests
from .tasks import Prompting

PIECE_CHARS = 4096
# Tokens a cut between two pieces can add to their summed count over the whole text's (a piece's own
# leading word marker; a word cut in two): the piece-wise count, less this per cut, is a lower bound.
CUT_SLACK = 8
# Tokens around the prompt that the bytes do not pay for: the tokenizer's leading special tokens and
# the candidate's tokens.
EXTRA_TOKENS = 16


def _pieces(text: str):
    """Pieces of about PIECE_CHARS characters, cut before a space where there is one near the end."""
    start = 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            space = text.rfind(" ", end - PIECE_CHARS // 4, end)
            end = space if space > start else end
        yield text[start:end]
        start = end


def tokens_at_least(tokenizer, text: str, limit: int) -> int:
    """A lower bound on the tokens of ``text``, exact when the text is one piece; it exceeds ``limit``
    when the text certainly does, and no more of the text is tokenized than is needed to tell."""
    total = count = 0
    for piece in _pieces(text):
        total += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        count += 1
        bound = total - count * CUT_SLACK  # at most one cut after each piece read
        if bound > limit:
            return bound
    return total if count == 1 else max(total - (count - 1) * CUT_SLACK, 0)


def _where(data_file, record: Record) -> str:
    return record.where or f"{data_file or 'record'}:{record.line}"


def check_prompts(tokenizer, records: list[Record], context: int, data_file=None, prompting=None) -> None:
    """Refuse, without tokenizing it all, the first record whose longest request (context and
    continuation, as ``prompting`` asks it) is certainly over ``context`` tokens."""
    prompting = prompting or Prompting()
    for index, record in enumerate(records):
        pairs, _ = prompt_requests(record, prompting, index)
        text = max((c + k for c, k in pairs), key=lambda t: len(t.encode("utf-8")))
        if len(text.encode("utf-8")) + EXTRA_TOKENS <= context:
            continue
        n = tokens_at_least(tokenizer, text, context)
        if n > context:
            raise UserError(
                f"{_where(data_file, record)}: the prompt is over {context} tokens (at least {n}); "
                f"the model's context is {context} tokens"
            )


def check_encoded(encoded: list[Encoded], records: list[Record], context: int, data_file=None) -> None:
    """Refuse the first record with a sequence (prompt and candidate) longer than the context."""
    for e, record in zip(encoded, records):
        longest = max(len(s) for s in e.sequences)
        if longest > context:
            raise UserError(
                f"{_where(data_file, record)}: the prompt and its answer are {longest} tokens; "
                f"the model's context is {context} tokens"
            )


@contextlib.contextmanager
def _no_length_warning():
    """transformers warns when a text is longer than the tokenizer's own ``model_max_length``, which is
    not the model's context: the limit that counts is checked here, in one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def encode_fitting(model, records: list[Record], data_file=None, prompting: Prompting | None = None) -> list[Encoded]:
    """``encode_records`` for ``model``, after and with the checks that every record fits its context."""
    context = model.spec.max_position_embeddings
    with _no_length_warning():
        check_prompts(model.tokenizer, records, context, data_file, prompting)
        encoded = encode_records(model.tokenizer, records, prompting)
    check_encoded(encoded, records, context, data_file)
    return encoded
