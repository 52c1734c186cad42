"""The tune/eval operations of the torch backend (``moe_local.loaded.TuningOps``).

The model is run in two halves around the first tuned layer: ``prefix_hidden`` (no grad, model
dtype, ragged per sequence) and ``suffix_forward`` (grad enabled). The suffix drives transformers'
own decoder layers with transformers' own causal mask and RoPE tables, the way
``Qwen3MoeModel.forward`` / ``OlmoeModel.forward`` do; only the gates of the tuned layers are swapped,
for the duration of one call, for :class:`LiveGate`, which computes the router logits from the
given float32 weights (and adds per-sample offsets for the oracle) and records the routing
distribution (router.py, the block's own rule) at each sample's last prompt token.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from moe_local.tuning.data import MISSING_SCORE, Batch

from ..shared import check_suffix_layers, swapped_gate
from .model import positions_from_mask
from .router import routing_distribution


class LiveGate(nn.Module):
    """Stands in for a tuned layer's ``Router`` during one suffix call.

    logits = x @ weightᵀ (+ bias) in float32 (or the layer's own gate when ``router`` is None), plus
    ``offsets`` added at ``offset_rows``; the routing distribution at ``capture_rows`` goes to ``sink``.
    ``router``: the weight, or (weight, bias) for routers with a bias. Rows index the flattened
    [sequences · T] tokens the MoE block sees. The selection-only bias stays the base gate's.
    """

    def __init__(self, base, router, offset_rows, offsets, capture_rows, sink: list):
        super().__init__()
        self.base = base
        self.e_score_correction_bias = base.e_score_correction_bias
        weight, bias = router if isinstance(router, tuple) else (router, None)
        self.live_weight, self.live_bias = weight, bias
        self.offset_rows = offset_rows
        self.offsets = offsets
        self.capture_rows = capture_rows
        self.sink = sink

    @property
    def weight(self) -> torch.Tensor:
        """What the block's kernels would read as the gate weight."""
        return self.base.weight if self.live_weight is None else self.live_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.live_weight is None:
            logits = self.base(x)
        else:
            logits = F.linear(x.to(self.live_weight.dtype), self.live_weight, self.live_bias)
        if self.offsets is not None:
            logits = logits.float().index_add(0, self.offset_rows, self.offsets)
        self.sink.append(routing_distribution(logits.index_select(0, self.capture_rows), self.base.rule))
        return logits


class TorchTuning:
    """Mixed into ``TorchModel``: needs ``self.model``, ``self.spec``, ``self.device``, ``self.dtype``."""

    # -- shared pieces --------------------------------------------------------------------------
    def _run_layers(self, hidden, mask, start: int, stop: int):
        """Decoder layers ``start .. stop-1`` as the model's own forward runs them: each with the causal
        mask of its attention type (``config.layer_types``; full attention where a config has none)."""
        config = self.model.config
        positions = positions_from_mask(mask)
        types = getattr(config, "layer_types", None) or ["full_attention"] * len(self.model.model.layers)
        masks = {}
        for kind in set(types[start:stop]):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(
                config=config, inputs_embeds=hidden, attention_mask=mask, past_key_values=None, position_ids=positions
            )
        rope = self.model.model.rotary_emb(hidden, positions)
        for i in range(start, stop):
            hidden = self.model.model.layers[i](
                hidden,
                attention_mask=masks[types[i]],
                position_ids=positions,
                past_key_values=None,
                use_cache=False,
                position_embeddings=rope,
            )
        return hidden

    def _mask(self, batch: Batch) -> torch.Tensor:
        return torch.as_tensor(batch.mask, device=self.device)

    # -- the contract ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefix_hidden(self, batch: Batch, layer: int) -> list[torch.Tensor]:
        ids = torch.as_tensor(batch.ids, device=self.device)
        mask = self._mask(batch)
        hidden = self.model.model.embed_tokens(ids)
        if layer > 0:
            hidden = self._run_layers(hidden, mask, 0, layer)
        flat = hidden[mask.bool()]  # row-major: sequence after sequence, real tokens only
        return list(torch.split(flat, batch.lengths.tolist()))

    def suffix_forward(self, hidden, batch: Batch, layer: int, layers, router_weights=None, offsets=None):
        check_suffix_layers(self.spec, layer, layers)
        S, T = batch.ids.shape
        mask = self._mask(batch)
        flat = torch.cat(list(hidden)) if len(hidden) > 1 else hidden[0]
        real = torch.as_tensor(np.flatnonzero(batch.mask.reshape(-1)), device=self.device)
        padded = flat.new_zeros(S * T, flat.shape[-1]).index_copy(0, real, flat).view(S, T, -1)
        seq_rows = torch.as_tensor(np.arange(S) * T + batch.prompt_pos, device=self.device)
        capture = torch.as_tensor(batch.sample_seq * T + batch.prompt_pos[batch.sample_seq], device=self.device)
        seq_sample = torch.as_tensor(batch.seq_sample, device=self.device)
        sink: dict[int, list] = {i: [] for i in layers}
        with contextlib.ExitStack() as stack:
            for n, i in enumerate(layers):
                weight = None if router_weights is None else router_weights[i]
                off = None if offsets is None else offsets[:, n].index_select(0, seq_sample)
                gate = LiveGate(self.moe_block(i).gate, weight, seq_rows, off, capture, sink[i])
                stack.enter_context(swapped_gate(self.moe_block(i), gate))
            out = self._run_layers(padded, mask, layer, self.spec.num_layers)
        rows = out[
            torch.as_tensor(batch.head_seq, device=self.device), torch.as_tensor(batch.head_pos, device=self.device)
        ]
        logp = F.log_softmax(self.model.lm_head(self.model.model.norm(rows)).float(), dim=-1)
        tok = logp[
            torch.as_tensor(batch.cand_row, device=self.device), torch.as_tensor(batch.cand_tok, device=self.device)
        ]
        scores = (tok * torch.as_tensor(batch.cand_tokmask, device=self.device)).sum(-1)
        scores = scores.masked_fill(~torch.as_tensor(batch.cand_valid, device=self.device), MISSING_SCORE)
        routing = torch.stack([sink[i][0] for i in layers], dim=1)
        return scores, routing

    @torch.no_grad()
    def suffix_scores(self, hidden, batch: Batch, layer: int, layers, router_weights=None, offsets=None):
        weights = None if router_weights is None else self._router_tensors(router_weights, False)
        off = None if offsets is None else torch.as_tensor(offsets, dtype=torch.float32, device=self.device)
        scores, routing = self.suffix_forward(hidden, batch, layer, layers, weights, off)
        return scores.cpu().numpy(), routing.cpu().numpy()

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
        self.model.requires_grad_(False)  # only the given routers or offsets are differentiated
        weights = None if router_weights is None else self._router_tensors(router_weights, wrt == "router_weights")
        off = (
            None
            if offsets is None
            else torch.tensor(np.asarray(offsets, dtype=np.float32), device=self.device, requires_grad=wrt == "offsets")
        )
        with torch.enable_grad():
            scores, routing = self.suffix_forward(hidden, batch, layer, layers, weights, off)
            args = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in inputs.items()}
            loss, aux = loss_fn(scores, routing, **args)
            if wrt == "router_weights":
                per_layer = [weights[i] if isinstance(weights[i], tuple) else (weights[i],) for i in layers]
                targets = [t for parts in per_layer for t in parts]
            else:
                targets = [off]
            grads = [g.cpu().numpy() for g in torch.autograd.grad(loss, targets)]
        aux = {k: v.detach().cpu().numpy() for k, v in aux.items()}
        aux["scores"] = scores.detach().cpu().numpy()
        aux["routing"] = routing.detach().cpu().numpy()
        if wrt == "router_weights":  # in the form they were given: a weight, or (weight, bias)
            out = {}
            for i, parts in zip(layers, per_layer):
                taken, grads = grads[: len(parts)], grads[len(parts) :]
                out[i] = tuple(taken) if isinstance(weights[i], tuple) else taken[0]
            grads = out
        else:
            grads = grads[0]
        return float(loss.detach()), aux, grads

    def _router_tensors(self, router_weights: dict, trainable: bool) -> dict:
        """{layer: weight or (weight, bias)} as float32 tensors on the device."""

        def tensor(array):
            return torch.tensor(np.asarray(array, dtype=np.float32), device=self.device, requires_grad=trainable)

        return {
            int(i): tuple(tensor(a) for a in w) if isinstance(w, (tuple, list)) else tensor(w)
            for i, w in router_weights.items()
        }

    # -- host copies of cached hidden states (memory-mapped prefix cache) ------------------------
    def hidden_to_host(self, hidden: torch.Tensor) -> np.ndarray:
        """Exact bytes as numpy (bfloat16 travels as its int16 bit pattern)."""
        t = hidden.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return t.cpu().numpy()

    def hidden_from_host(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.to(self.device)

    # -- memory ---------------------------------------------------------------------------------
    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
