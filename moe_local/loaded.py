"""What a loaded model offers, whatever its backend: the interface the rest of the package is written against.

Two roles, two classes:

- :class:`LoadedModel` — the user API (``moe_local.load`` returns one): ``spec``, ``tokenizer``,
  ``logits``, ``generate`` / ``stream`` / ``chat``, ``save``, the router weights; and the five
  generation primitives ``moe_local.chat`` builds generate, stream and chat from.
- :class:`TuningOps` — the operations the tuner and the evaluation call (``moe_local.tuning``): the
  model run in two halves around the first tuned layer, with the routers as data.

A backend's model class implements both (``backends/torch``, ``backends/mlx``). Arrays cross the
interface as numpy; "backend array" means a torch.Tensor or an mx.array that core passes back to the
backend without looking inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import load_tokenizer


class LoadedModel(ABC):
    """The user API of a loaded model. Subclasses set ``spec``, ``folder``, ``backend`` and ``moe_impl``."""

    backend: str
    spec = None
    folder: Path
    moe_impl: str

    _tokenizer = None

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the folder (loaded on first use), on both backends."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    @property
    @abstractmethod
    def execution(self) -> str:
        """One line: the backend, the device and how the MoE layers run (grouped, Triton, gather_mm)."""

    @abstractmethod
    def logits(self, ids, attention_mask=None):
        """ids: int [batch, seq] (1-D = one sequence), left padding -> float32 numpy [batch, seq, vocab]."""

    @abstractmethod
    def get_router_weights(self, layers=None) -> dict:
        """float32 numpy router tensors of ``layers`` (all MoE layers by default), keyed by their
        checkpoint names (``spec.router_tensors(layer)``: the weight, and the bias where the router has
        one); quantized gates dequantized."""

    @abstractmethod
    def set_router_weights(self, weights: dict) -> None:
        """Install router weights (and biases) given as numpy arrays keyed by checkpoint names."""

    @abstractmethod
    def save(self, out: Path) -> Path:
        """Write the model, with its current routers, as a new model folder (what ``fuse`` writes)."""

    # -- generation, written once in moe_local/chat.py over the primitives below ------------------
    def generate(self, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True) -> str:
        """The whole answer to ``prompt`` (a string, or a list of ``{"role", "content"}`` messages)."""
        return "".join(self.stream(prompt, max_tokens, temp, top_p, seed, chat_template))

    def stream(self, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True):
        """The answer's text pieces as they are generated (greedy when ``temp`` is 0), as a
        :class:`moe_local.chat.TextStream`: iterate it; its ``stats`` and ``answer_ids`` are the
        run's once it ends. ``chat_template=False`` feeds a string as it is."""
        from .chat import stream

        return stream(self, prompt, max_tokens, temp, top_p, seed, chat_template)

    def chat(self, system_prompt: str | None = None, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True):
        """A multi-turn :class:`moe_local.chat.Conversation` over one KV cache kept across turns."""
        from .chat import Conversation

        return Conversation(
            self,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temp=temp,
            top_p=top_p,
            seed=seed,
            chat_template=chat_template,
        )

    @abstractmethod
    def new_cache(self):
        """An empty KV cache of the backend's own kind."""

    @abstractmethod
    def cache_length(self, cache) -> int:
        """How many tokens' keys and values the cache holds."""

    @abstractmethod
    def trim_cache(self, cache, length: int) -> None:
        """Keep the first ``length`` tokens of the cache (no-op when it holds no more). A cache that cannot
        be cut there (a sliding-window layer past its window: gpt-oss) is emptied instead; callers read
        ``cache_length`` for what it holds."""

    @abstractmethod
    def stream_tokens(self, ids, cache, max_tokens, temp=0.0, top_p=1.0, seed=None, eos_ids=()) -> Iterator[int]:
        """Yield new token ids continuing ``ids`` (a list of ints) with the library's own generation loop.

        ``cache`` holds the keys and values of a prefix ``ids[:cache_length(cache)]`` (shorter than
        ``ids``): only the rest is prefilled, and the cache grows with the answer. Sampling: greedy when
        ``temp`` is 0, else temperature and top-p; ``seed`` (None: leave the generator as it is) seeds
        it first. Stops after ``max_tokens`` or after yielding a token of ``eos_ids``; the consumer may
        also close the generator early. Afterwards the cache holds a prefix of ``ids`` + the tokens
        yielded (and possibly one more, which the caller trims).
        """

    @abstractmethod
    def peak_memory(self) -> int:
        """Peak memory in bytes so far (the accelerator's, else the process's)."""

    def peak_memory_gb(self) -> float:
        """``peak_memory`` in GiB (since ``reset_peak_memory`` where the device allows it)."""
        return self.peak_memory() / 1024**3


class TuningOps(ABC):
    """The tune and eval operations (moe_local.tuning). ``batch`` is a :class:`moe_local.tuning.data.Batch`
    (numpy only; its docstring defines every field): S left-padded sequences [S, T] with their mask,
    B samples, candidate rows to score, and each sample's routing position (the last prompt token of
    its sequence ``sample_seq[b]``). ``layers`` is the tuple of tuned MoE layers, all at or after the
    suffix start ``layer``. Router weights are ``{layer: float32 [E, H]}``; for a router with a bias
    (``RouterSpec.bias``: gpt-oss) ``{layer: (weight [E, H], bias [E])}``, both tuned, and its gradients
    come back in the same form."""

    @abstractmethod
    def prefix_hidden(self, batch, layer: int) -> list:
        """Hidden states at the input of decoder layer ``layer`` (0 = the token embeddings), no grad.

        One backend array ``[lengths[s], hidden]`` per sequence s, real tokens only (ragged, no
        padding), in the model's dtype. Positions restart at 0 on each row's first real token.
        """

    @abstractmethod
    def suffix_scores(self, hidden, batch, layer: int, layers, router_weights=None, offsets=None):
        """Decoder layers ``layer`` .. end, the final norm and the LM head on ``hidden``, no gradient.

        hidden: per-sequence arrays as ``prefix_hidden`` returns them (re-padded to ``batch``).
        router_weights: None (the model's own gates, in its dtype) or numpy ``{layer: float32 [E, H]}``
            (``(weight, bias)`` for routers with a bias) for every tuned layer; the router logits are then
            ``x.float32 @ Wᵀ (+ b)`` (fp32 routers whatever the model dtype).
        offsets: None or numpy float32 ``[B, len(layers), E]`` added to the router logits of the
            tuned layers at the last prompt token of every sequence of sample b (the oracle).
        Top-k selection and expert weights follow the model's router rule from those logits.
        Returns float32 numpy ``(scores [B, C], routing [B, len(layers), E])``:
        ``scores[b, c] = Σ_l cand_tokmask · log_softmax(logits[head_seq[r], head_pos[r]])[cand_tok]``
        with ``r = cand_row[b, c, l]``; ``MISSING_SCORE`` where ``cand_valid`` is False; routing =
        the router's distribution over all experts (its routing_distribution) of the (offset)
        logits at ``(sample_seq[b], prompt_pos[...])``.
        """

    @abstractmethod
    def suffix_value_and_grad(
        self,
        hidden,
        batch,
        layer: int,
        layers,
        loss_fn,
        inputs: dict,
        router_weights=None,
        offsets=None,
        wrt: str = "router_weights",
    ):
        """One differentiable suffix pass: ``loss, aux = loss_fn(scores, routing, **inputs)``.

        inputs: numpy arrays, converted to backend arrays before the call. loss_fn uses only
        operations torch and mlx share (``moe_local.tuning.roma.roma_loss``): arithmetic,
        ``.sum(axis)``, ``.logsumexp(axis)``, ``.reshape``, ``[:, None]``; ``aux`` is a dict of arrays.
        wrt: "router_weights" (numpy ``{layer: float32 [E, H]}``, required) or "offsets" (numpy
        float32 ``[B, len(layers), E]``, required; router_weights may then be None).
        Returns ``(loss float, aux as numpy plus "scores" and "routing", grads)`` with grads
        ``{layer: float32 numpy [E, H]}`` (``(weight grad, bias grad)`` where ``(weight, bias)`` were
        given) or a float32 numpy array shaped like ``offsets``.
        The model's own parameters are never trained (the optimiser is numpy, in moe_local.tuning).
        """

    @abstractmethod
    def hidden_to_host(self, hidden):
        """A numpy array holding the exact bytes of a hidden-state array (bfloat16 as its bit pattern)."""

    @abstractmethod
    def hidden_from_host(self, array):
        """The inverse of ``hidden_to_host``: a backend array in the model's dtype, on the model's device."""

    @abstractmethod
    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window where the device allows it (CUDA, MLX); else a no-op."""
