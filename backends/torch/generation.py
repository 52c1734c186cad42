"""Streaming generation on the torch backend: transformers' ``generate`` with the project's MoE blocks inside.

``generate`` runs in a worker thread and hands each new token to a queue through a streamer; the
caller iterates over the queue, and stopping early sets a flag that a stopping criterion reads, so
the worker ends after the current step. The KV cache is transformers' ``DynamicCache``: given the
full token list and a cache that holds a prefix of it, ``generate`` prefills only the rest, which is
how a conversation's cache is reused from turn to turn (moe_local/chat.py decides what to keep).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

_DONE = object()


class _QueueStreamer(BaseStreamer):
    """Puts each generated token id on a queue; ``generate`` first puts the prompt, which is skipped."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self):
        self.queue.put(_DONE)


class _StopFlag(StoppingCriteria):
    """Ends ``generate`` after the current step once the consumer stops reading."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generation_config(max_tokens: int, temp: float, top_p: float, eos_ids, pad_id) -> GenerationConfig:
    """Explicit settings: nothing from a checkpoint's generation_config.json or transformers' defaults
    (top_k=50) leaks in, so sampling is temperature and top-p only, as in mlx-lm."""
    sample = temp > 0
    return GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temp if sample else None,
        top_p=top_p if sample else None,
        top_k=0 if sample else None,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )


class TorchGeneration:
    """The generation primitives of LoadedModel for TorchModel (``self.model``, ``self.device``)."""

    def new_cache(self):
        return DynamicCache(config=self.model.config)

    @staticmethod
    def cache_length(cache) -> int:
        return cache.get_seq_length()

    @staticmethod
    def trim_cache(cache, length: int) -> None:
        """Keep ``length`` tokens; a sliding-window layer past its window cannot be cut back (it has
        dropped the tokens before), so the cache is emptied instead and everything is prefilled again."""
        excess = cache.get_seq_length() - length
        if excess > 0:
            try:
                cache.crop(-excess)
            except RuntimeError:  # transformers' DynamicSlidingWindowLayer past its window
                cache.reset()

    def stream_tokens(
        self, ids, cache, max_tokens: int, temp: float = 0.0, top_p: float = 1.0, seed: int | None = None, eos_ids=()
    ) -> Iterator[int]:
        eos_ids = sorted(eos_ids)
        pad = self.tokenizer.pad_token_id
        config = generation_config(
            max_tokens, temp, top_p, eos_ids, pad if pad is not None else (eos_ids[0] if eos_ids else 0)
        )
        if seed is not None:
            torch.manual_seed(seed)
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        streamer, stop, failure = _QueueStreamer(), _StopFlag(), []

        def work():
            try:
                if self.device.type == "cuda" and self.device.index is not None:
                    torch.cuda.set_device(self.device)  # kernels (Triton) launch on the thread's device
                self.model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    past_key_values=cache,
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([stop]),
                )
            except BaseException as e:  # handed to the consumer's thread
                failure.append(e)
                streamer.queue.put(_DONE)

        return self._drain(threading.Thread(target=work, daemon=True), streamer, stop, failure)

    @staticmethod
    def _drain(worker, streamer, stop, failure) -> Iterator[int]:
        worker.start()
        try:
            while (token := streamer.queue.get()) is not _DONE:
                yield token
        finally:
            stop.event.set()
            worker.join()
        if failure:
            raise failure[0]

    def peak_memory(self) -> int:
        """Bytes: CUDA's peak allocation on a GPU, else the process's peak resident memory."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            import resource
        except ImportError:  # Windows
            return 0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
