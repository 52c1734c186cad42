"""Talking to a loaded model, written once for every backend: ``generate``, ``stream`` and ``chat``.

A backend supplies five generation primitives (see ``moe_local.loaded.LoadedModel``):
``new_cache()``, ``cache_length(cache)``, ``trim_cache(cache, length)``,
``stream_tokens(ids, cache, max_tokens, temp, top_p, seed, eos_ids)`` and ``peak_memory()``.
This module turns them into text: the chat template (or a plain ``User:``/``Assistant:`` format
when the tokenizer has none), a KV cache kept across turns of which only the tokens that differ
from what it holds are prefilled, incremental detokenization, stop tokens, and the stats line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import UserError

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"  # a base model in the plain format goes on to write the user's next line
_WARNED_PLAIN: set = set()  # model folders whose missing chat template was reported (once per process)


@dataclass
class GenerationStats:
    """One answer: tokens prefilled (cached ones not counted), tokens generated, rates, peak memory."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str = ""  # "stop" (end token or stop text) or "length"

    def footer(self) -> str:
        return (
            f"[{self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | prompt "
            f"{self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | peak memory "
            f"{self.peak_memory_gb:.2f} GiB]"
        )


def check_sampling(max_tokens: int, temp: float, top_p: float) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not 0 <= temp < math.inf:  # NaN fails every comparison
        raise UserError(f"--temp must be 0 (greedy) or a finite positive number, got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def as_messages(prompt) -> list[dict]:
    """A string is one user message; a list of ``{"role", "content"}`` dicts is a conversation."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise UserError("a conversation is a list of {'role': 'system'|'user'|'assistant', 'content': str}")
    return messages


def plain_text(messages: list[dict]) -> str:
    lines = [f"{PLAIN_ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(model, messages: list[dict], chat_template: bool = True) -> tuple[str, bool]:
    """(the prompt text of a conversation, whether encoding it adds the tokenizer's special tokens): the
    chat template, or the plain format when the tokenizer has none (one warning per model)."""
    tok = model.tokenizer
    if chat_template and has_chat_template(tok):
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
        except Exception as e:  # jinja2 raises its own errors for templates that reject a conversation
            raise UserError(
                f"the chat template of {model.folder} rejects this conversation: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    if chat_template and model.folder not in _WARNED_PLAIN:
        _WARNED_PLAIN.add(model.folder)
        print(
            f"moe-local: warning: the tokenizer of {model.folder} has no chat template; "
            "using a plain 'User:'/'Assistant:' format",
            file=sys.stderr,
        )
    return plain_text(messages), True


def prompt_ids(model, prompt, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt (a string or a conversation) rendered by ``render``; with
    ``chat_template=False`` a string is encoded as it is."""
    if not chat_template and isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    text, specials = render(model, as_messages(prompt), chat_template)
    return model.tokenizer.encode(text, add_special_tokens=specials)


def eos_token_ids(model) -> frozenset[int]:
    """Tokens that end an answer: the tokenizer's end token and ``eos_token_id`` of config.json and of
    generation_config.json (an int or a list), as mlx-lm and transformers both read them."""
    ids = set()
    if model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    sources = [model.spec.config]
    gen = model.folder / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"{gen} is not valid JSON") from None
    for source in sources:
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and 0 <= v < model.spec.vocab_size:
                ids.add(v)
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------
# Text from tokens
# ---------------------------------------------------------------------------------------------


class Detokenizer:
    """Text pieces from tokens as they come: each piece is the difference between decoding the window
    since the last emitted piece with and without the new tokens, held back while it ends in an
    incomplete UTF-8 sequence. Decoding a small window keeps it linear in the answer's length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def split_stop(text: str, stops) -> tuple[str, str, bool]:
    """(text to emit now, text held back because it may begin a stop string, whether a stop string was met)."""
    for s in stops:
        i = text.find(s)
        if i >= 0:
            return text[:i], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------


class Conversation:
    """A multi-turn chat over one KV cache. ``ask`` streams an answer and records the turn; ``complete``
    streams a continuation of any token ids, reusing the cache for the prefix it shares with them.

    A new turn continues the tokens the model actually saw: the previous prompt's ids, the answer's
    generated ids, then the encoding of the text the template adds after them (end of turn, the new
    message). Re-encoding the whole conversation instead could split the answer into other tokens than
    the generated ones and miss the cache from there on. When the template renders earlier turns
    differently (e.g. it drops reasoning), the whole conversation is encoded and the cache keeps the
    prefix it shares with it.
    """

    def __init__(
        self,
        model,
        system_prompt: str | None = None,
        max_tokens: int = 256,
        temp: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = 0,
        chat_template: bool = True,
    ):
        check_sampling(max_tokens, temp, top_p)
        self.model, self.system_prompt, self.chat_template = model, system_prompt, chat_template
        self.max_tokens, self.temp, self.top_p, self.seed = max_tokens, temp, top_p, seed
        self.eos_ids = eos_token_ids(model)
        self.stats = GenerationStats()  # of the last answer
        self.answer_ids: list[int] = []  # the last answer's tokens (end token excluded)
        self.cache = None
        self.tokens: list[int] = []  # the tokens whose keys and values the cache holds
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and restart the sampler's seed."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self._pending_seed = self.seed
        self._history = None  # (text so far, the token ids the model saw for it)
        if self.cache is not None:
            self.model.trim_cache(self.cache, 0)
        self.tokens = []

    def turn_ids(self, messages: list[dict]) -> tuple[str, list[int]]:
        text, specials = render(self.model, messages, self.chat_template)
        if self._history is not None and text.startswith(self._history[0]):
            rest = text[len(self._history[0]) :]
            return text, self._history[1] + self.model.tokenizer.encode(rest, add_special_tokens=False)
        return text, self.model.tokenizer.encode(text, add_special_tokens=specials)

    def ask(self, text: str) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": text}]
        prompt, ids = self.turn_ids(messages)
        plain = not (self.chat_template and has_chat_template(self.model.tokenizer))
        pieces = []
        for piece in self.complete(ids, stops=(PLAIN_STOP,) if plain else ()):
            pieces.append(piece)
            yield piece
        # Recorded only when the answer finished: an interrupted turn leaves the conversation as it was.
        answer = "".join(pieces)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        same = self.model.tokenizer.decode(self.answer_ids, skip_special_tokens=True) == answer
        self._history = (prompt + answer, ids + self.answer_ids) if same else None  # not after a stop text

    def complete(self, ids: list[int], stops=(), eos_ids=None) -> Iterator[str]:
        model, ids = self.model, [int(i) for i in ids]
        context = model.spec.max_position_embeddings
        if not ids:
            raise UserError("the prompt is empty")
        if len(ids) >= context:
            raise UserError(
                f"the prompt is {len(ids)} tokens; the model's context is {context} tokens"
                + (" (r resets the conversation)" if len(self.messages) > 1 else "")
            )
        max_tokens = min(self.max_tokens, context - len(ids))
        eos_ids = self.eos_ids if eos_ids is None else frozenset(eos_ids)
        if self.cache is None:
            self.cache = model.new_cache()
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)  # at least one token to prefill
        model.trim_cache(self.cache, keep)
        keep = model.cache_length(self.cache)  # less when the cache could not be cut there (sliding windows)
        self.tokens = self.tokens[:keep]
        stats = GenerationStats(prompt_tokens=len(ids) - keep, cached_tokens=keep)
        seed, self._pending_seed = self._pending_seed, None  # seeded once per conversation
        detok, held, generated, ended = Detokenizer(model.tokenizer), "", [], []
        start = time.perf_counter()
        first = None
        tokens = model.stream_tokens(
            ids, self.cache, max_tokens=max_tokens, temp=self.temp, top_p=self.top_p, seed=seed, eos_ids=eos_ids
        )
        stats.finish_reason, stopped = "length", False
        try:
            for token in tokens:
                if first is None:
                    first = time.perf_counter()
                if token in eos_ids:
                    ended.append(token)
                    stats.finish_reason = "stop"
                    break
                generated.append(token)
                emit, held, stopped = split_stop(held + detok.add(token), stops)
                if emit:
                    yield emit
                if stopped:
                    stats.finish_reason = "stop"
                    break
            if not stopped:  # the end of the answer: what was held back is not a stop string after all
                text = held + detok.flush()
                emit, _, hit = split_stop(text, stops)
                emit = emit if hit else text
                if emit:
                    yield emit
        finally:
            tokens.close()
            end = time.perf_counter()
            self._settle_cache(ids + generated + ended)
            self.answer_ids = generated
            stats.generation_tokens = len(generated)
            if first is not None:
                stats.prompt_tps = stats.prompt_tokens / max(first - start, 1e-9)
                if len(generated) > 1:
                    stats.generation_tps = (len(generated) - 1) / max(end - first, 1e-9)
            stats.peak_memory_gb = model.peak_memory_gb()
            self.stats = stats

    def _settle_cache(self, known: list[int]) -> None:
        """Record which tokens the cache now holds; a backend whose cache holds more than the tokens it
        handed out is trimmed back to them (neither transformers nor mlx-lm does so today)."""
        n = self.model.cache_length(self.cache)
        if n > len(known):
            self.model.trim_cache(self.cache, len(known))
            n = self.model.cache_length(self.cache)
        self.tokens = known[:n]


class TextStream:
    """One answer's text pieces, as ``model.stream`` returns them: iterate it; once it ends, ``stats``
    (:class:`GenerationStats`) and ``answer_ids`` (the generated tokens, end token excluded) are the run's."""

    def __init__(self, conversation: Conversation, pieces: Iterator[str]):
        self._conversation = conversation
        self._pieces = pieces

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (as leaving a loop over it early does, once it is collected)."""
        self._pieces.close()

    @property
    def stats(self) -> GenerationStats:
        return self._conversation.stats

    @property
    def answer_ids(self) -> list[int]:
        return self._conversation.answer_ids


def stream(model, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True) -> TextStream:
    """``model.stream``: one answer on a fresh cache."""
    conversation = Conversation(
        model, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, chat_template=chat_template
    )
    ids = prompt_ids(model, prompt, chat_template)
    # The plain format (no template, or a conversation fed without one) stops at the next "User:" line.
    templated = chat_template and has_chat_template(model.tokenizer)
    plain = not templated and (chat_template or not isinstance(prompt, str))
    return TextStream(conversation, conversation.complete(ids, stops=(PLAIN_STOP,) if plain else ()))
