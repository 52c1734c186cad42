"""Streaming generation on the MLX backend: mlx-lm's ``stream_generate`` with the project's MoE blocks inside.

The model is an mlx-lm model object (backends/mlx/model.py), so mlx-lm's own loop runs it: chunked
prefill, ``generate_step``'s one-step lookahead (the next token is computed before the current one is
handed out), its samplers (``make_sampler``: argmax at temperature 0, else top-p then a categorical
draw from ``mx.random``) and its KV cache (``make_prompt_cache``, trimmed with ``trim_prompt_cache``).
Given a cache that holds a prefix of the ids, only the rest is passed as the prompt, so the cache is
prefilled from where it ends (moe_local/chat.py decides what to keep).

What ``stream_generate`` leaves for its caller: each response carries one token; the last response
carries the token that ended the run (an end token of ``eos_token_ids`` or the ``max_tokens``-th), and
the cache then holds every token handed out, that one included (the lookahead has fed it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import mlx.core as mx
from mlx_lm.generate import generation_stream, stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper


class _NoText(StreamingDetokenizer):
    """moe_local/chat.py turns the tokens into text itself; mlx-lm's text pieces would decode them twice
    (its default detokenizer re-decodes the current line at every token)."""

    def __init__(self, tokenizer=None):
        self.reset()

    def reset(self):
        self.text, self.tokens, self.offset = "", [], 0

    def add_token(self, token):
        pass

    def finalize(self):
        pass


class MLXGeneration:
    """The generation primitives of LoadedModel for MLXModel (``self.model``, ``self.device``)."""

    _wrapper = None
    _stream = None

    def new_cache(self):
        return make_prompt_cache(self.model)

    @staticmethod
    def cache_length(cache) -> int:
        return cache[0].offset

    def trim_cache(self, cache, length: int) -> None:
        """Keep ``length`` tokens; a sliding-window layer's ``RotatingKVCache`` past its window cannot be cut
        back (mlx-lm trims nothing then), so the cache is emptied instead and everything is prefilled again."""
        excess = self.cache_length(cache) - length
        if excess > 0 and trim_prompt_cache(cache, excess) != excess:
            cache[:] = make_prompt_cache(self.model)

    def _generation_stream(self):
        """mlx-lm's generation stream when it lives on the model's device, else one there: mlx-lm makes
        its stream on the default device at import, which on a Mac is the GPU even for a CPU model."""
        if self._stream is None:
            device = mx.Device(mx.gpu if self.device == "gpu" else mx.cpu)
            self._stream = (
                generation_stream if generation_stream.device == device else mx.new_thread_local_stream(device)
            )
        return self._stream

    def stream_tokens(
        self, ids, cache, max_tokens: int, temp: float = 0.0, top_p: float = 1.0, seed: int | None = None, eos_ids=()
    ) -> Iterator[int]:
        if self._wrapper is None:  # built once: the constructor inspects the vocabulary
            self._wrapper = TokenizerWrapper(self.tokenizer, detokenizer_class=_NoText)
        # A copy per call, so that two conversations on one model keep their own end tokens; set after
        # construction because the constructor always adds the tokenizer's own end token.
        wrapper = copy.copy(self._wrapper)
        wrapper.eos_token_ids = eos_ids
        if seed is not None:
            mx.random.seed(seed)
        prompt = mx.array(list(ids)[self.cache_length(cache) :], dtype=mx.int32)
        for response in stream_generate(
            self.model,
            wrapper,
            prompt,
            max_tokens=max_tokens,
            sampler=make_sampler(temp=temp, top_p=top_p),
            prompt_cache=cache,
            stream=self._generation_stream(),
        ):
            yield response.token

    @staticmethod
    def peak_memory() -> int:
        """Bytes: MLX's peak allocation (Metal's on a Mac, the CPU allocator's otherwise)."""
        return mx.get_peak_memory()
