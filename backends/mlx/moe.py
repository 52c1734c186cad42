"""The project's MoE block for MLX: router, grouped expert execution, Grove adjugates.

Routing follows the reference implementations (the same rules as the torch block):

- qwen3_moe / olmoe: softmax in fp32 over all experts, top-k of the probabilities, optional
  renormalisation, weights cast to the activations' dtype.
- GroveMoE: top-k of ``sigmoid(logits)`` selects, the softmax probabilities of the selected experts
  are always renormalised, and ``y = Σ w_i E_i(x) + λ Σ_groups (Σ_{i in group} w_i) A_group(x)``.

Parameter names are mlx-lm's (``gate``, ``switch_mlp.{gate,up,down}_proj`` stacked ``[E, out, in]``),
so mlx-lm's ``sanitize`` and mlx-lm-quantized folders load as they are; Grove's adjugates are
stacked the same way under ``chunk_experts``. The expert layers are mlx-lm's ``SwitchLinear`` (and
``QuantizedSwitchLinear`` after ``nn.quantize``), i.e. ``mx.gather_mm`` / ``mx.gather_qmm``.

Grouped execution: each (token, slot) is one row. From ``SORT_MIN_ROWS`` rows on, rows are sorted by
expert and the gathers get ``sorted_indices=True`` (MLX's segmented path); below it they stay
unsorted. ``reference`` is the per-slot loop with dense matmuls, kept for checking.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from moe_local.spec import ROUTER_SIGMOID_SELECT, MoESpec

# "grouped": gather_mm / gather_qmm over expert-sorted rows (the default);
# "reference": the per-slot loop of the reference formula with dense matmuls.
MOE_IMPLS = ("grouped", "reference")

# mlx-lm sorts from 64 rows on (indices.size >= 64) and we keep its threshold: on MLX's CPU build
# sorted and unsorted gathers time the same within noise at every shape of scripts/bench_moe_mlx.py
# (the CPU gather runs one matrix-vector product per row either way), so there is nothing to gain
# from moving it, and on a Mac mlx-lm's threshold is the one that was measured on Metal.
SORT_MIN_ROWS = 64

# Adjugate strategies (DESIGN §3), all exact:
#   "per-slot":  adjugates ride in the experts' sorted rows: each (token, slot) row also runs its
#                group's adjugate, weighted by w_i (Σ_i w_i λ A_g(i) = λ Σ_g (Σ_{i∈g} w_i) A_g).
#                No extra sort, no host synchronisation; computes an adjugate k times per token.
#   "per-group": once per (token, group) with summed weights; the distinct pairs are counted on the
#                host (one synchronisation per layer), so only the rows that exist are computed.
# A third strategy, adjugates merged into the experts' weights (one gather for both), was measured
# in scripts/bench_moe_mlx.py and is not shipped; see ADJUGATE_PER_GROUP_MIN_ROWS for the numbers.
ADJUGATE_STRATEGIES = ("auto", "per-slot", "per-group")
# "auto" picks "per-group" from this many (token, slot) rows on, "per-slot" below. Why: MLX's CPU
# build is compute-bound at every T (a flat ~2.4 GFLOP/s), so cost follows rows computed. With
# random routing at the GroveMoE shape (E=128, k=8, 64 groups) a token's 8 experts share a group
# only ~0.2 times, and per-group saves ~3% of adjugate rows, which is within noise; with co-activated
# groups (what Grove is trained for; all 8 experts in 4 groups) it halves them. The host
# synchronisation costs well under a millisecond, nothing next to a 128-token layer (seconds on this
# CPU), but it would stall mlx-lm's asynchronous decode (T=1, 8 rows), so decode stays per-slot.
# Merged weights measured no faster than per-slot on the CPU (same FLOPs, and the CPU is not
# launch-bound) and cost a second copy of every expert, so they are not shipped.
# Measured numbers: see the comment above `choose_adjugate` and the report of issue 3.
ADJUGATE_PER_GROUP_MIN_ROWS = SORT_MIN_ROWS


class Experts(nn.Module):
    """SwiGLU experts stacked as mlx-lm stores them: ``gate_proj``/``up_proj`` ``[E, I, H]``, ``down_proj`` ``[E, H, I]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=False)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """Rows ``x[..., 1, H]`` through experts ``indices`` (gather_mm / gather_qmm)."""
        up = self.up_proj(x, indices, sorted_indices=sorted_indices)
        gate = self.gate_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(swiglu(gate, up), indices, sorted_indices=sorted_indices)

    def one(self, e: int, x: mx.array) -> mx.array:
        """Expert ``e`` on rows ``x [n, H]`` with dense matmuls (the reference path)."""
        gate, up = dense(self.gate_proj, e, x), dense(self.up_proj, e, x)
        return dense(self.down_proj, e, nn.silu(gate) * up)


def expert_weight(layer, e: int) -> mx.array:
    """Expert ``e``'s float weight ``[out, in]`` of a (possibly quantized) switch layer."""
    if isinstance(layer, QuantizedSwitchLinear):
        biases = layer.get("biases")
        return mx.dequantize(layer.weight[e], layer.scales[e], None if biases is None else biases[e],
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return layer.weight[e]


def dense(layer, e: int, x: mx.array) -> mx.array:
    return x @ expert_weight(layer, e).astype(x.dtype).T


def route(logits: mx.array, probs: mx.array, moe: MoESpec) -> tuple[mx.array, mx.array]:
    """(top-k expert ids [T, k], their fp32 weights [T, k]); ``probs`` = fp32 softmax of ``logits``."""
    k = moe.top_k
    if moe.router == ROUTER_SIGMOID_SELECT:
        score = mx.sigmoid(logits.astype(mx.float32))
    else:
        score = probs
    idx = mx.stop_gradient(mx.argpartition(-score, kth=k - 1, axis=-1)[..., :k])
    weights = mx.take_along_axis(probs, idx, axis=-1)
    if moe.renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return idx, weights


def choose_adjugate(strategy: str, rows: int) -> str:
    if strategy != "auto":
        return strategy
    return "per-group" if rows >= ADJUGATE_PER_GROUP_MIN_ROWS else "per-slot"


class MoEBlock(nn.Module):
    """Drop-in for mlx-lm's sparse MoE blocks (and GroveMoE's), with mlx-lm's parameter names."""

    def __init__(self, moe: MoESpec, hidden_size: int, impl: str = "grouped"):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        self.spec = moe
        self.impl = impl
        self.adjugate = "auto"          # one of ADJUGATE_STRATEGIES (benchmarks and tests set it)
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.switch_mlp = Experts(moe.num_experts, hidden_size, moe.expert_size)
        if moe.grove:
            self.chunk_experts = Experts(moe.num_groups, hidden_size, moe.grove.adjugate_size)
        # Set by callers that need routing (RoMA): receives the fp32 router probabilities [..., E],
        # inside the graph (differentiable in the gate).
        self.on_routing = None

    def __call__(self, hidden_states: mx.array) -> mx.array:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
        if self.on_routing is not None:
            self.on_routing(probs.reshape(*shape[:-1], -1))
        idx, weights = route(logits, probs, self.spec)
        weights = weights.astype(x.dtype)
        if self.impl == "reference":
            out = self._per_slot(x, idx, weights)
        else:
            out = self._grouped(x, idx, weights)
        return out.reshape(shape)

    # -- grouped execution ------------------------------------------------------------------------
    def _grouped(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        tokens, k = idx.shape
        rows = tokens * k
        grove = self.spec.grove
        strategy = choose_adjugate(self.adjugate, rows) if grove else None
        if rows >= SORT_MIN_ROWS:
            flat = idx.flatten()
            order = mx.argsort(flat)
            xs = x[order // k][:, None, :]                     # [rows, 1, H], sorted by expert
            ids = flat[order]
            y = self.switch_mlp(xs, ids, True)
            if strategy == "per-slot":                         # sorted by expert = sorted by group
                y = y + grove.scale * self.chunk_experts(xs, ids // grove.experts_per_group, True)
            y = y[mx.argsort(order)].reshape(tokens, k, -1)
        else:
            xs = mx.expand_dims(x, (-2, -3))                   # [T, 1, 1, H]
            y = self.switch_mlp(xs, idx, False)
            if strategy == "per-slot":
                y = y + grove.scale * self.chunk_experts(xs, idx // grove.experts_per_group, False)
            y = y.reshape(tokens, k, -1)
        out = (y * weights[..., None]).sum(axis=1)
        if strategy == "per-group":
            out = out + grove.scale * self._adjugates_per_group(x, idx, weights)
        return out

    def _adjugates_per_group(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """Σ_groups (Σ_{i in group} w_i) A_group(x), each adjugate once per (token, group)."""
        tokens, k = idx.shape
        groups = self.spec.num_groups
        gid = idx // self.spec.grove.experts_per_group
        same = gid[:, :, None] == gid[:, None, :]                            # [T, k, k]
        earlier = mx.tril(mx.ones((k, k), dtype=mx.bool_), k=-1)
        first = ~mx.any(same & earlier, axis=-1)           # the slot opens its group in this token
        summed = mx.where(same, weights[:, None, :], 0).sum(axis=-1)        # its group's weight
        key = mx.where(first, gid, groups).flatten()       # repeats sort after every real group
        order = mx.argsort(key)
        n = int(first.sum().item())                        # host sync: rows that exist
        keep = order[:n]
        a = self.chunk_experts(x[keep // k][:, None, :], key[keep], True)[:, 0]
        a = a * summed.flatten()[keep][:, None]
        # Back to (token, slot) layout with zero rows for the repeats, then sum over slots: gathers
        # only, so the result is deterministic and differentiable.
        padded = mx.concatenate([a, mx.zeros((tokens * k - n, a.shape[-1]), dtype=a.dtype)])
        return padded[mx.argsort(order)].reshape(tokens, k, -1).sum(axis=1)

    # -- the reference ----------------------------------------------------------------------------
    def _per_slot(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """Every (token, slot) on its own, adjugates once per selected expert (the reference loop)."""
        out = mx.zeros_like(x)
        small = mx.zeros_like(x)
        per_group = self.spec.grove.experts_per_group if self.spec.grove else 0
        chosen = np.array(idx)
        for slot in range(chosen.shape[1]):
            for e in np.unique(chosen[:, slot]).tolist():
                rows = mx.array(np.nonzero(chosen[:, slot] == e)[0])
                w = weights[rows, slot][:, None]
                xr = x[rows]
                out = out.at[rows].add(self.switch_mlp.one(e, xr) * w)
                if per_group:
                    small = small.at[rows].add(self.chunk_experts.one(e // per_group, xr) * w)
        if per_group:
            out = self.spec.grove.scale * small + out
        return out
