"""The project's MoE block for MLX: router, grouped expert execution, Grove adjugates.

Routing is the family's rule as data (router.py, the same rule as the torch block's), the weights
cast to the activations' dtype. GroveMoE: ``y = Σ w_i E_i(x) + λ Σ_groups (Σ_{i in group} w_i) A_group(x)``.

Parameter names are mlx-lm's (``gate``, ``switch_mlp.{gate,up,down}_proj`` stacked ``[E, out, in]``),
so mlx-lm's ``sanitize`` and mlx-lm-quantized folders load as they are; Grove's adjugates are
stacked the same way under ``chunk_experts``. The expert layers are mlx-lm's ``SwitchLinear`` (and
``QuantizedSwitchLinear`` after ``nn.quantize``), i.e. ``mx.gather_mm`` / ``mx.gather_qmm``.

Grouped execution: each (token, slot) is one row. From ``SORT_MIN_ROWS`` rows on, rows are sorted by
expert and the gathers get ``sorted_indices=True`` (MLX's segmented path); below it they stay
unsorted. ``reference`` is the per-slot loop with dense matmuls, kept for checking.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu, swiglu_oai
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from moe_local.checkpoint.names import TensorNames
from moe_local.spec import ClampedSwiGLU, MoESpec

from .router import route

# "grouped": gather_mm / gather_qmm over expert-sorted rows (the default);
# "reference": the per-slot loop of the reference formula with dense matmuls.
MOE_IMPLS = ("grouped", "reference")

# Rows are sorted by expert from 64 rows on, mlx-lm's threshold (indices.size >= 64). On MLX's CPU
# build sorting never measured faster or slower beyond noise: rows always vs never sorted, at
# T = 1, 4, 8, 16 (8 to 128 rows) on both bench shapes, were within ±11% either way (the CPU
# gather_mm runs every row at the same ~1 GFLOP/s). mlx-lm's threshold was chosen on Metal; keep it.
SORT_MIN_ROWS = 64

# Adjugate strategies (docs/methods.md, GroveMoE), all exact:
#   "per-slot":  adjugates ride in the experts' sorted rows: each (token, slot) row also runs its
#                group's adjugate, weighted by w_i (Σ_i w_i λ A_g(i) = λ Σ_g (Σ_{i∈g} w_i) A_g).
#                No second sort, no host read; an adjugate runs once per selected expert.
#   "per-group": once per (token, group) with the group's summed weight; the distinct pairs are
#                counted on the host (one read per layer) so that only existing rows are computed.
#   merged weights (each expert concatenated with its group's adjugate, λ folded into the
#                down projection, one gather for both) is measured by scripts/bench_moe_mlx.py only.
# Choice (measured by scripts/bench_moe_mlx.py on MLX's CPU build at the GroveMoE shape; the table
# is in README.md): from ADJUGATE_PER_GROUP_MIN_ROWS (token, slot) rows on, per-group — the CPU is
# compute-bound, time follows FLOPs, and per-group is never worse beyond noise and wins when a
# token's experts share groups (what Grove's routing favours). Merged weights bought nothing for a
# second copy of every expert: not shipped. Below that (decode) per-slot: per-group's host read per
# layer cost nothing on the CPU, but on a GPU it would serialise mlx-lm's asynchronous decode once per
# layer, which no Mac here could measure; decode loses at most its duplicate adjugate rows (about 8%
# of the layer's FLOPs at GroveMoE's shape). Time `bench_moe_mlx.py --tokens 1` on a Mac to revisit.
# Inside mx.compile (mlx-lm compiles its training step) host reads are forbidden: per-slot there.
ADJUGATE_STRATEGIES = ("auto", "per-slot", "per-group")
ADJUGATE_PER_GROUP_MIN_ROWS = SORT_MIN_ROWS


def execution(spec, impl: str, device) -> str:
    """How a model's MoE layers run on this backend (what ``info`` and the logs say)."""
    routed = "through gather_mm (gather_qmm when quantized), rows sorted by expert from 64 rows on"
    if impl == "reference":
        routed = "the per-slot reference loop"
    if any(m.expert_bias or m.activation for m in spec.moe):
        routed += ", the experts' biases and clamped SwiGLU as mlx-lm's SwitchGLU(bias=True) and swiglu_oai"
    shared = "; shared experts as a dense MLP beside them" if any(m.shared for m in spec.moe) else ""
    return f"mlx on {device}: routed experts {routed}{shared}"


def glu(gate: mx.array, up: mx.array, activation: ClampedSwiGLU | None) -> mx.array:
    """The experts' gated unit: mlx-lm's ``swiglu``, or its ``swiglu_oai`` with the spec's alpha and limit."""
    if activation is None:
        return swiglu(gate, up)
    return swiglu_oai(gate, up, alpha=activation.alpha, limit=activation.limit)


class Experts(nn.Module):
    """SwiGLU experts stacked as mlx-lm stores them: gate/up ``[E, I, H]``, down ``[E, H, I]``, each with a
    per-expert ``bias`` when ``bias`` (gpt-oss, mlx-lm's ``SwitchGLU(bias=True)``); ``activation``: None
    (SwiGLU) or gpt-oss's :class:`ClampedSwiGLU`."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        activation: ClampedSwiGLU | None = None,
    ):
        super().__init__()
        self.activation = activation
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=bias)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts, bias=bias)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts, bias=bias)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        """Rows ``x[..., 1, H]`` through experts ``indices`` (gather_mm / gather_qmm)."""
        up = self.up_proj(x, indices, sorted_indices=sorted_indices)
        gate = self.gate_proj(x, indices, sorted_indices=sorted_indices)
        return self.down_proj(glu(gate, up, self.activation), indices, sorted_indices=sorted_indices)

    def one(self, e: int, x: mx.array) -> mx.array:
        """Expert ``e`` on rows ``x [n, H]`` with dense matmuls (the reference path)."""
        gate, up = dense(self.gate_proj, e, x), dense(self.up_proj, e, x)
        return dense(self.down_proj, e, glu(gate, up, self.activation))


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (shared experts, dense layers): ``down(silu(gate(x)) · up(x))``, mlx-lm's names."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class SelectionGate(nn.Module):
    """A router with DeepSeek-V3's selection-only bias (mlx-lm's ``MoEGate`` parameters: ``weight``,
    ``e_score_correction_bias``); like mlx-lm's, never quantized."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, hidden_size))
        self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


def expert_weight(layer, e: int) -> mx.array:
    """Expert ``e``'s float weight ``[out, in]`` of a (possibly quantized) switch layer."""
    if isinstance(layer, QuantizedSwitchLinear):
        biases = layer.get("biases")
        return mx.dequantize(
            layer.weight[e],
            layer.scales[e],
            None if biases is None else biases[e],
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    return layer.weight[e]


def dense(layer, e: int, x: mx.array) -> mx.array:
    y = x @ expert_weight(layer, e).astype(x.dtype).T
    return y + layer["bias"][e].astype(x.dtype) if "bias" in layer else y


class GroupPlan(NamedTuple):
    """The distinct (token, group) pairs of a routing, as rows of the flattened [T, k] slots."""

    same: mx.array  # [T, k, k]: slots i and j of a token chose experts of the same group
    group: mx.array  # [T*k]: each slot's group, or num_groups where an earlier slot has it
    order: mx.array  # [T*k]: slots sorted by that key: the first `rows` are the distinct pairs
    rows: int


def group_plan(idx: mx.array, experts_per_group: int, num_groups: int) -> GroupPlan | None:
    """The (token, group) rows of a routing; None inside mx.compile / vmap, which forbid the host
    read that counts them (mlx-lm compiles its training step)."""
    k = idx.shape[1]
    gid = idx // experts_per_group
    same = gid[:, :, None] == gid[:, None, :]
    earlier = mx.tril(mx.ones((k, k), dtype=mx.bool_), k=-1)
    first = ~mx.any(same & earlier, axis=-1)  # the slot opens its group in this token
    group = mx.where(first, gid, num_groups).flatten()  # repeats sort after every real group
    try:
        rows = int(first.sum().item())
    except ValueError:  # "[eval] ... during function transformations"
        return None
    return GroupPlan(same, group, mx.argsort(group), rows)


def choose_adjugate(strategy: str, rows: int) -> str:
    if strategy != "auto":
        return strategy
    return "per-group" if rows >= ADJUGATE_PER_GROUP_MIN_ROWS else "per-slot"


class MoEBlock(nn.Module):
    """Drop-in for mlx-lm's sparse MoE blocks (and GroveMoE's), with mlx-lm's parameter names."""

    def __init__(self, moe: MoESpec, hidden_size: int, impl: str = "grouped", names: TensorNames | None = None):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        names = names or TensorNames()
        self.spec = moe
        self.impl = impl
        self.adjugate = "auto"  # one of ADJUGATE_STRATEGIES (benchmarks and tests set it)
        self.sort_min_rows = SORT_MIN_ROWS  # benchmarks set it to time always/never sorted rows
        if moe.router.selection_bias:
            self.gate = SelectionGate(hidden_size, moe.num_experts)
        else:
            self.gate = nn.Linear(hidden_size, moe.num_experts, bias=moe.router.bias)
        self.switch_mlp = Experts(moe.num_experts, hidden_size, moe.expert_size, moe.expert_bias, moe.activation)
        if moe.grove:
            self.chunk_experts = Experts(moe.num_groups, hidden_size, moe.grove.adjugate_size)
        # Shared experts under the family's own names, as mlx-lm's models name them.
        self.shared_name, self.shared_gate_name = names.shared, names.shared_gate
        if moe.shared:
            setattr(self, names.shared, SwiGLU(hidden_size, moe.shared.count * moe.shared.size))
            if moe.shared.gated:
                setattr(self, names.shared_gate, nn.Linear(hidden_size, 1, bias=False))

    def __call__(self, hidden_states: mx.array) -> mx.array:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x.astype(mx.float32) if self.spec.router.float32_logits else x)
        bias = self.gate.e_score_correction_bias if self.spec.router.selection_bias else None
        idx, weights = route(logits, self.spec.router, self.spec.top_k, bias)
        weights = weights.astype(x.dtype)
        if self.impl == "reference":
            out = self._per_slot(x, idx, weights)
        else:
            out = self._grouped(x, idx, weights)
        if self.spec.shared:
            out = out + self._shared(x)
        return out.reshape(shape)

    def _shared(self, x: mx.array) -> mx.array:
        """The shared experts, a dense SwiGLU beside the routed ones (scaled by their gate when gated)."""
        y = self[self.shared_name](x)
        return mx.sigmoid(self[self.shared_gate_name](x)) * y if self.spec.shared.gated else y

    # -- grouped execution ------------------------------------------------------------------------
    def _grouped(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        tokens, k = idx.shape
        rows = tokens * k
        grove = self.spec.grove
        strategy = choose_adjugate(self.adjugate, rows) if grove else None
        plan = None
        if strategy == "per-group":
            plan = group_plan(idx, grove.experts_per_group, self.spec.num_groups)
            if plan is None:  # inside mx.compile: no host reads
                strategy = "per-slot"
        if rows >= self.sort_min_rows:
            flat = idx.flatten()
            order = mx.argsort(flat)
            xs = x[order // k][:, None, :]  # [rows, 1, H], sorted by expert
            ids = flat[order]
            y = self.switch_mlp(xs, ids, True)
            if strategy == "per-slot":  # sorted by expert = sorted by group
                y = y + grove.scale * self.chunk_experts(xs, ids // grove.experts_per_group, True)
            y = y[mx.argsort(order)].reshape(tokens, k, -1)
        else:
            xs = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, H]
            y = self.switch_mlp(xs, idx, False)
            if strategy == "per-slot":
                y = y + grove.scale * self.chunk_experts(xs, idx // grove.experts_per_group, False)
            y = y.reshape(tokens, k, -1)
        out = (y * weights[..., None]).sum(axis=1)
        if strategy == "per-group":
            out = out + grove.scale * self._adjugates_per_group(x, weights, plan)
        return out

    def _adjugates_per_group(self, x: mx.array, weights: mx.array, plan: GroupPlan) -> mx.array:
        """Σ_groups (Σ_{i in group} w_i) A_group(x), each adjugate once per (token, group)."""
        tokens, k = weights.shape
        keep = plan.order[: plan.rows]
        summed = mx.where(plan.same, weights[:, None, :], 0).sum(axis=-1)  # each slot's group weight
        a = self.chunk_experts(x[keep // k][:, None, :], plan.group[keep], True)[:, 0]
        a = a * summed.flatten()[keep][:, None]
        # Back to (token, slot) layout with zero rows for the repeats, then sum over slots: gathers
        # only, so the result is deterministic and differentiable.
        padded = mx.concatenate([a, mx.zeros((tokens * k - plan.rows, a.shape[-1]), dtype=a.dtype)])
        return padded[mx.argsort(plan.order)].reshape(tokens, k, -1).sum(axis=1)

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
