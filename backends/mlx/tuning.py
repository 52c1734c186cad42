"""The tune/eval operations of the MLX backend (``moe_local.loaded.TuningOps``).

The model is run in two halves around the first tuned layer: ``prefix_hidden`` (model dtype, ragged
per sequence) and ``suffix_forward`` (differentiated by ``mx.value_and_grad``). Both drive mlx-lm's
own decoder layers the way its ``Qwen3MoeModel`` / ``OlmoeModel`` do, left padding included: a row
with padding gets mlx-lm's ``BatchKVCache`` per layer (RoPE offsets ``-padding``, a causal mask that
hides the padding), as ``MLXModel.logits`` and mlx-lm's batched generation do. Only the gates of the
tuned layers are swapped, for the duration of one call, for :class:`LiveGate`, which computes the
router logits from the given float32 weights (plus the oracle's offsets) and records the routing
distribution (router.py, the block's own rule) at each sample's last prompt token. MoE blocks stay in
eval mode: our blocks call ``gather_mm`` / ``gather_qmm`` directly, and their gradients need no
training mode (checked by the tests against a full-model ``nn.value_and_grad`` and against the torch
backend).
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask

from moe_local.tuning.data import MISSING_SCORE, Batch

from ..shared import check_suffix_layers, swapped_gate
from .router import routing_distribution


class LiveGate(nn.Module):
    """Stands in for a tuned layer's gate during one suffix call.

    logits = x.float32 @ weightᵀ (+ bias) (or the layer's own gate when ``weight`` is None), plus
    ``offsets`` [rows, E] added at ``offset_rows``; the routing distribution at ``capture_rows`` goes
    to ``sink``. ``weight``: the weight, or (weight, bias) for routers with a bias. Rows index the
    flattened [sequences · T] tokens the MoE block sees.
    """

    def __init__(self, base, rule, weight, offset_rows, offsets, capture_rows, sink: list):
        super().__init__()
        # Plain attributes, not module parameters: nothing here is the model's.
        object.__setattr__(self, "_state", (base, rule, weight, offset_rows, offsets, capture_rows, sink))

    @property
    def e_score_correction_bias(self):
        """The base gate's selection-only bias (the block reads it for the choice of experts)."""
        return self._state[0].e_score_correction_bias

    def __call__(self, x: mx.array) -> mx.array:
        base, rule, weight, offset_rows, offsets, capture_rows, sink = self._state
        if weight is None:
            logits = base(x)
        elif isinstance(weight, tuple):
            logits = x.astype(mx.float32) @ weight[0].T + weight[1]
        else:
            logits = x.astype(mx.float32) @ weight.T
        if offsets is not None:
            logits = logits.astype(mx.float32).at[offset_rows].add(offsets)
        sink.append(routing_distribution(logits[capture_rows], rule))
        return logits


class MLXTuning:
    """Mixed into ``MLXModel``: needs ``self.model``, ``self.spec``, ``self.batch_caches``, ``self.dtype``."""

    # -- shared pieces --------------------------------------------------------------------------
    def _run_layers(self, hidden: mx.array, padding: np.ndarray, start: int, stop: int) -> mx.array:
        """Decoder layers ``start .. stop-1`` on left-padded ``hidden`` [S, T, H], masks and RoPE as mlx-lm's:
        one mask per attention type (sliding-window layers see ``spec.sliding_window`` tokens)."""
        layers = self.model.model.layers[start:stop]
        caches = self.batch_caches(padding.tolist())[start:stop] if padding.any() else [None] * len(layers)
        masks = {}
        for i, (layer, cache) in enumerate(zip(layers, caches), start):
            kind = self.spec.layer_type(i)
            if kind not in masks:
                window = self.spec.sliding_window if kind == "sliding_attention" else None
                masks[kind] = create_attention_mask(hidden, cache, window_size=window)
            hidden = layer(hidden, masks[kind], cache)
        return hidden

    def _lm_head(self, x: mx.array) -> mx.array:
        if self.spec.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(x)
        return self.model.lm_head(x)

    @staticmethod
    def _padding(batch: Batch) -> np.ndarray:
        return batch.mask.shape[1] - batch.lengths

    # -- the contract ---------------------------------------------------------------------------
    def prefix_hidden(self, batch: Batch, layer: int) -> list:
        S, T = batch.ids.shape
        hidden = self.model.model.embed_tokens(mx.array(batch.ids.astype(np.int32)))
        if layer > 0:
            hidden = self._run_layers(hidden, self._padding(batch), 0, layer)
        flat = hidden.reshape(S * T, -1)[mx.array(np.flatnonzero(batch.mask.reshape(-1)))]
        out = mx.split(flat, np.cumsum(batch.lengths)[:-1].tolist()) if S > 1 else [flat]
        mx.eval(out)
        return out

    def suffix_forward(self, hidden, batch: Batch, layer: int, layers, router_weights=None, offsets=None):
        check_suffix_layers(self.spec, layer, layers)
        S, T = batch.ids.shape
        flat = mx.concatenate(list(hidden)) if len(hidden) > 1 else hidden[0]
        # Each padded slot reads its real row; padding reads an extra zero row (as torch's zeros).
        slot = np.full(S * T, flat.shape[0], dtype=np.int32)
        slot[np.flatnonzero(batch.mask.reshape(-1))] = np.arange(flat.shape[0], dtype=np.int32)
        padded = mx.concatenate([flat, mx.zeros((1, flat.shape[1]), flat.dtype)])[mx.array(slot)]
        padded = padded.reshape(S, T, -1)
        seq_rows = mx.array((np.arange(S) * T + batch.prompt_pos).astype(np.int32))
        capture = mx.array((batch.sample_seq * T + batch.prompt_pos[batch.sample_seq]).astype(np.int32))
        seq_sample = mx.array(batch.seq_sample.astype(np.int32))
        sink: dict[int, list] = {i: [] for i in layers}
        with contextlib.ExitStack() as stack:
            for n, i in enumerate(layers):
                weight = None if router_weights is None else router_weights[i]
                off = None if offsets is None else offsets[:, n][seq_sample]
                block = self.moe_block(i)
                gate = LiveGate(block.gate, block.spec.router, weight, seq_rows, off, capture, sink[i])
                stack.enter_context(swapped_gate(block, gate))
            out = self._run_layers(padded, self._padding(batch), layer, self.spec.num_layers)
        rows = out[mx.array(batch.head_seq.astype(np.int32)), mx.array(batch.head_pos.astype(np.int32))]
        logits = self._lm_head(self.model.model.norm(rows)).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = logp[mx.array(batch.cand_row.astype(np.int32)), mx.array(batch.cand_tok.astype(np.int32))]
        scores = (tok * mx.array(batch.cand_tokmask)).sum(-1)
        scores = mx.where(mx.array(batch.cand_valid), scores, MISSING_SCORE)
        routing = mx.stack([sink[i][0] for i in layers], axis=1)
        return scores, routing

    def suffix_scores(self, hidden, batch: Batch, layer: int, layers, router_weights=None, offsets=None):
        weights = None if router_weights is None else _arrays(router_weights)
        off = None if offsets is None else mx.array(np.asarray(offsets, dtype=np.float32))
        scores, routing = self.suffix_forward(hidden, batch, layer, layers, weights, off)
        return np.array(scores), np.array(routing)

    def suffix_value_and_grad(
        self,
        hidden,
        batch: Batch,
        layer: int,
        layers,
        loss_fn,
        inputs: dict,
        router_weights=None,
        offsets=None,
        wrt: str = "router_weights",
    ):
        if wrt not in ("router_weights", "offsets"):
            raise ValueError(f"wrt must be 'router_weights' or 'offsets', got {wrt!r}")
        weights = None if router_weights is None else _arrays(router_weights)
        off = None if offsets is None else mx.array(np.asarray(offsets, dtype=np.float32))
        args = {k: mx.array(np.asarray(v)) for k, v in inputs.items()}

        def run(target):
            w, o = (target, off) if wrt == "router_weights" else (weights, target)
            scores, routing = self.suffix_forward(hidden, batch, layer, layers, w, o)
            loss, aux = loss_fn(scores, routing, **args)
            return loss, aux, scores, routing

        target = weights if wrt == "router_weights" else off
        (loss, aux, scores, routing), grads = mx.value_and_grad(run)(target)
        mx.eval(loss, aux, scores, routing, grads)
        aux = {k: np.array(v) for k, v in aux.items()}
        aux["scores"], aux["routing"] = np.array(scores), np.array(routing)
        if wrt == "router_weights":  # in the form they were given: a weight, or (weight, bias)
            grads = {i: _host(grads[i]) for i in layers}
        else:
            grads = np.array(grads)
        return loss.item(), aux, grads

    # -- host copies of cached hidden states (memory-mapped prefix cache) ------------------------
    def hidden_to_host(self, hidden: mx.array) -> np.ndarray:
        """Exact bytes as numpy (bfloat16 travels as its int16 bit pattern)."""
        return np.array(hidden.view(mx.int16) if hidden.dtype == mx.bfloat16 else hidden)

    def hidden_from_host(self, array: np.ndarray) -> mx.array:
        out = mx.array(np.ascontiguousarray(array))
        return out.view(mx.bfloat16) if self.dtype == mx.bfloat16 else out

    # -- memory ---------------------------------------------------------------------------------
    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()


def _host(grad):
    """A layer's gradient as numpy: an array, or a tuple (weight, bias)."""
    return tuple(np.array(g) for g in grad) if isinstance(grad, (tuple, list)) else np.array(grad)


def _arrays(router_weights: dict) -> dict:
    """{layer: weight or (weight, bias)} as float32 MLX arrays."""

    def array(w):
        return mx.array(np.asarray(w, dtype=np.float32))

    return {
        int(i): tuple(array(a) for a in w) if isinstance(w, (tuple, list)) else array(w)
        for i, w in router_weights.items()
    }
