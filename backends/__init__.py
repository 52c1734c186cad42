"""Backends: the interface the rest of the package is written against, the registry, the auto choice.

A backend turns a spec plus a checkpoint folder into a loaded model (``LoadedModel``). Importing
this module imports neither torch nor mlx; a backend's module is imported when it is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import platform
import sys
from pathlib import Path

from ..checkpoint import load_spec, load_tokenizer, resolve_model
from ..errors import UserError

BACKENDS = ("torch", "mlx")


def on_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def auto_backend() -> str:
    """MLX on Apple silicon (when installed), torch everywhere else."""
    if on_apple_silicon() and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "torch"


def resolve_backend(backend: str) -> str:
    if backend in (None, "auto"):
        return auto_backend()
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (choose auto, {', '.join(BACKENDS)})")
    return backend


def backend_module(name: str):
    """The backend's package; a missing engine is a user error naming the extra to install."""
    engine = {"torch": "torch", "mlx": "mlx"}[name]
    if importlib.util.find_spec(engine) is None:
        raise UserError(f"the {name} backend needs {engine}: pip install 'moe-local[{name}]'")
    return importlib.import_module(f"{__name__}.{name}")


def load_model(model, backend="auto", adapter_path=None, moe_impl=None, dtype=None, device=None):
    folder = resolve_model(model)
    name = resolve_backend(backend)
    loaded = backend_module(name).load(folder, moe_impl=moe_impl, dtype=dtype, device=device)
    if adapter_path is not None:
        from ..adapter import apply_adapter

        apply_adapter(loaded, adapter_path)
    return loaded


class LoadedModel:
    """What every backend's loaded model offers (DESIGN §9).

    Subclasses set ``spec``, ``folder``, ``backend`` and ``moe_impl`` and implement the methods that
    raise here. Arrays cross the interface as numpy (ids, logits, router weights).
    """

    backend: str
    spec = None
    folder: Path
    moe_impl: str

    _tokenizer = None

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer of the folder (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    def logits(self, ids, attention_mask=None):
        """ids: int [batch, seq] (1-D = one sequence), left padding -> float32 numpy [batch, seq, vocab]."""
        raise NotImplementedError

    def get_router_weights(self, layers=None) -> dict:
        """float32 numpy gate weights keyed ``model.layers.N.mlp.gate.weight`` (all MoE layers by default)."""
        raise NotImplementedError

    def set_router_weights(self, weights: dict) -> None:
        """Install float gate weights given as numpy arrays keyed by checkpoint names."""
        raise NotImplementedError

    # -- generation (DESIGN §9); written once in moe_local/chat.py over the primitives below ----------
    def generate(self, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True) -> str:
        """The whole answer to ``prompt`` (a string, or a list of ``{"role", "content"}`` messages)."""
        return "".join(self.stream(prompt, max_tokens, temp, top_p, seed, chat_template))

    def stream(self, prompt, max_tokens=256, temp=0.0, top_p=1.0, seed=0, chat_template=True):
        """Yield the answer's text pieces as they are generated (greedy when ``temp`` is 0); the run's
        ``GenerationStats`` are left in ``self.last_stats``. ``chat_template=False`` feeds a string as is."""
        from ..chat import stream

        return stream(self, prompt, max_tokens, temp, top_p, seed, chat_template)

    def new_cache(self):
        """An empty KV cache of the backend's own kind."""
        raise NotImplementedError

    def cache_length(self, cache) -> int:
        """How many tokens' keys and values the cache holds."""
        raise NotImplementedError

    def trim_cache(self, cache, length: int) -> None:
        """Keep the first ``length`` tokens of the cache (no-op when it holds no more)."""
        raise NotImplementedError

    def stream_tokens(self, ids, cache, max_tokens, temp=0.0, top_p=1.0, seed=None, eos_ids=()):
        """Yield new token ids continuing ``ids`` (a list of ints) with the library's own generation loop.

        ``cache`` holds the keys and values of a prefix ``ids[:cache_length(cache)]`` (shorter than
        ``ids``): only the rest is prefilled, and the cache grows with the answer. Sampling: greedy when
        ``temp`` is 0, else temperature and top-p; ``seed`` (None: leave the generator as it is) seeds
        it first. Stops after ``max_tokens`` or after yielding a token of ``eos_ids``; the consumer may
        also close the generator early. Afterwards the cache holds a prefix of ``ids`` + the tokens
        yielded (and possibly one more, which the caller trims).
        """
        raise NotImplementedError

    def peak_memory(self) -> int:
        """Peak memory in bytes so far (the accelerator's, else the process's)."""
        raise NotImplementedError

    # -- tune/eval operations (moe_local.tune, moe_local.evaluate) ------------------------------
    # ``batch`` is a ``moe_local.data.Batch`` (numpy only; its docstring defines every field):
    # S left-padded sequences [S, T] with their mask, B samples, candidate rows to score, and
    # each sample's routing position (the last prompt token of its sequence ``sample_seq[b]``).
    # ``layers`` is the tuple of tuned MoE layers, all at or after the suffix start ``layer``.
    # "Backend array" = torch.Tensor / mx.array; tune.py never looks inside one.

    def check_suffix_layers(self, layer: int, layers) -> None:
        for i in layers:
            if i < layer or self.spec.moe_at(i) is None:
                raise ValueError(f"tuned layer {i} must be an MoE layer at or after the suffix start {layer}")

    @contextlib.contextmanager
    def swapped_gate(self, layer: int, gate):
        """Layer ``layer``'s MoE block runs with ``gate`` as its router for the duration (the backends'
        ``moe_block(layer)`` returns the block)."""
        block = self.moe_block(layer)
        original = block.gate
        block.gate = gate
        try:
            yield
        finally:
            block.gate = original

    def prefix_hidden(self, batch, layer: int) -> list:
        """Hidden states at the input of decoder layer ``layer`` (0 = the token embeddings), no grad.

        One backend array ``[lengths[s], hidden]`` per sequence s, real tokens only (ragged, no
        padding), in the model's dtype. Positions restart at 0 on each row's first real token.
        """
        raise NotImplementedError

    def suffix_forward(self, hidden, batch, layer: int, layers, router_weights=None, offsets=None):
        """Run decoder layers ``layer`` .. end, the final norm and the LM head on ``hidden``.

        hidden: per-sequence arrays as ``prefix_hidden`` returns them (re-padded here to ``batch``).
        router_weights: None (the model's own gates, in its dtype) or ``{layer: float32 array [E, H]}``
            for every tuned layer; the router logits are then ``x.float32 @ Wᵀ`` (fp32 routers
            whatever the model dtype); differentiable in these arrays.
        offsets: None or float32 ``[B, len(layers), E]`` added to the router logits of the tuned
            layers at the last prompt token of every sequence of sample b (the oracle); differentiable.
        Top-k selection and expert weights follow the model's router rule from those logits.
        Returns backend arrays ``(scores [B, C] float32, routing [B, len(layers), E] float32)``:
        ``scores[b, c] = Σ_l cand_tokmask · log_softmax(logits[head_seq[r], head_pos[r]])[cand_tok]``
        with ``r = cand_row[b, c, l]``; ``MISSING_SCORE`` where ``cand_valid`` is False; routing =
        fp32 softmax over all experts of the (offset) logits at ``(sample_seq[b], prompt_pos[...])``.
        """
        raise NotImplementedError

    def suffix_scores(self, hidden, batch, layer: int, layers, router_weights=None, offsets=None):
        """``suffix_forward`` without gradients, as float32 numpy ``(scores, routing)``;
        ``router_weights`` values and ``offsets`` given as numpy."""
        raise NotImplementedError

    def suffix_value_and_grad(self, hidden, batch, layer: int, layers, loss_fn, inputs: dict,
                              router_weights=None, offsets=None, wrt: str = "router_weights"):
        """One differentiable suffix pass: ``loss, aux = loss_fn(scores, routing, **inputs)``.

        inputs: numpy arrays, converted to backend arrays before the call. loss_fn uses only
        operations torch and mlx share (``moe_local.roma.roma_loss``): arithmetic, ``.sum(axis)``,
        ``.logsumexp(axis)``, ``.reshape``, ``[:, None]``; ``aux`` is a dict of arrays.
        wrt: "router_weights" (numpy ``{layer: float32 [E, H]}``, required) or "offsets" (numpy
        float32 ``[B, len(layers), E]``, required; router_weights may then be None).
        Returns ``(loss float, aux as numpy plus "scores" and "routing", grads)`` with grads
        ``{layer: float32 numpy [E, H]}`` or a float32 numpy array shaped like ``offsets``.
        The model's own parameters are never trained (the optimiser is numpy, in moe_local.tune).
        """
        raise NotImplementedError

    def hidden_to_host(self, hidden):
        """A numpy array holding the exact bytes of a hidden-state array (bfloat16 as its bit pattern)."""
        raise NotImplementedError

    def hidden_from_host(self, array):
        """The inverse of ``hidden_to_host``: a backend array in the model's dtype, on the model's device."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window where the device allows it (CUDA, MLX); else a no-op."""
        raise NotImplementedError

    def peak_memory_gb(self) -> float:
        """``peak_memory`` in GiB (since ``reset_peak_memory`` where the device allows it)."""
        return self.peak_memory() / 1024**3


def checked_batch(ids, attention_mask, vocab_size: int):
    """(ids int64 [B, L], mask int64 [B, L] or None): 1-D ids are one sequence; the mask must be left
    padding (each row zeros, then ones), as DESIGN §9 says; anything else is a one-line error."""
    import numpy as np

    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UserError(f"ids must be [batch, seq] or [seq] with seq >= 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise UserError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    if attention_mask is None:
        return ids.astype(np.int64), None
    mask = np.asarray(attention_mask)
    if mask.size != ids.size:
        raise UserError(f"attention_mask has shape {mask.shape}, ids {ids.shape}")
    mask = mask.reshape(ids.shape)
    if not np.isin(mask, (0, 1)).all():
        raise UserError("attention_mask must hold only 0 and 1")
    if (np.diff(mask.astype(np.int64), axis=-1) < 0).any():
        raise UserError("attention_mask must be left padding (each row: zeros, then ones)")
    return ids.astype(np.int64), mask.astype(np.int64)


def gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def layer_of_gate(name: str) -> int:
    parts = name.split(".")
    if len(parts) != 6 or parts[:2] != ["model", "layers"] or parts[3:] != ["mlp", "gate", "weight"] \
            or not parts[2].isdigit():
        raise UserError(f"'{name}' is not a router weight name (model.layers.N.mlp.gate.weight)")
    return int(parts[2])


def check_router_weights(spec, weights: dict) -> dict[int, object]:
    """layer -> array, after checking names and shapes against the spec."""
    out = {}
    for name, array in weights.items():
        layer = layer_of_gate(name)
        m = spec.moe_at(layer)
        if m is None:
            raise UserError(f"layer {layer} is not an MoE layer of this model ({name})")
        if tuple(array.shape) != (m.num_experts, spec.hidden_size):
            raise UserError(f"{name} has shape {tuple(array.shape)}; the model's gate is "
                            f"{(m.num_experts, spec.hidden_size)}")
        out[layer] = array
    return out


__all__ = ["BACKENDS", "LoadedModel", "auto_backend", "backend_module", "check_router_weights", "checked_batch",
           "gate_name", "layer_of_gate", "load_model", "load_spec", "resolve_backend"]
