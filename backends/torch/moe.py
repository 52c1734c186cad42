"""The project's MoE block for PyTorch: router, grouped expert execution, Grove adjugates.

Routing is the family's rule as data (router.py). GroveMoE's adjugates follow its released code,
``y = Σ w_i E_i(x) + λ Σ_groups (Σ_{i in group} w_i) A_group(x)``, with each adjugate run once per
(token, group) with the summed weight instead of once per selected expert.

Grouped execution: the (token, slot) rows are sorted by expert so that each expert present runs
one matmul pair over a contiguous block; ``reference`` is the per-slot loop, kept for checking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.checkpoint.names import TensorNames
from moe_local.spec import ClampedSwiGLU, MoESpec

from .router import Router, route

# "grouped": rows sorted by expert, then a matmul pair per expert present. Without a gradient on the CPU,
# one torch._grouped_mm per projection instead, for the experts up to GROUPED_MM_MAX_TOKENS tokens and
# for Grove's small adjugates always (interleaved timings at the OLMoE and Qwen3-30B-A3B shapes: 2-8 %
# faster up to 16 tokens, even at 128, the expert loop up to 25 % faster at 1024 on OLMoE; adjugates
# 10-15 % faster at every size). torch._grouped_mm has no CPU backward in torch 2.13.
# "reference": the per-slot loop of the reference formula. "triton": fused kernels (CUDA or the
# Triton interpreter).
MOE_IMPLS = ("grouped", "reference", "triton")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_MM_MAX_TOKENS = 64


def execution(spec, impl: str, device) -> str:
    """How a model's MoE layers run on this backend (what ``info`` and the logs say)."""
    routed = {
        "grouped": "grouped: rows sorted by expert, one torch._grouped_mm per projection without a gradient "
        "on the CPU, a matmul pair per expert otherwise",
        "triton": "the fused Triton op (Grove's adjugates once per (token, group) in the same launches); "
        "the grouped path where a gradient is needed",
        "reference": "the per-slot reference loop",
    }[impl]
    if any(m.expert_bias or m.activation for m in spec.moe):
        where = "in the Triton kernels' epilogues" if impl == "triton" else "on this path"
        routed += f"; the experts' biases and clamped SwiGLU {where}"
    shared = "; shared experts as a dense MLP beside them" if any(m.shared for m in spec.moe) else ""
    return f"torch on {device}: routed experts {routed}{shared}"


def glu(gate: torch.Tensor, up: torch.Tensor, activation: ClampedSwiGLU | None) -> torch.Tensor:
    """The experts' gated unit: ``silu(gate) · up``, or gpt-oss's clamped form (spec.ClampedSwiGLU)."""
    if activation is None:
        return F.silu(gate) * up
    gate = gate.clamp(max=activation.limit)
    up = up.clamp(-activation.limit, activation.limit)
    return (up + 1) * (gate * torch.sigmoid(activation.alpha * gate))


class Experts(nn.Module):
    """SwiGLU experts stored fused as transformers 5 does: ``gate_up_proj [E, 2I, H]`` (gate half first),
    ``down_proj [E, H, I]``; with ``bias``, ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``;
    ``activation``: None (SwiGLU) or gpt-oss's :class:`ClampedSwiGLU`."""

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
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        has_bias = self.gate_up_proj_bias is not None
        gate_up = F.linear(x, self.gate_up_proj[e], self.gate_up_proj_bias[e] if has_bias else None)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(glu(gate, up, self.activation), self.down_proj[e], self.down_proj_bias[e] if has_bias else None)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (the shared experts): ``down(silu(gate(x)) · up(x))``, Hugging Face's names."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_swiglu(
    x: torch.Tensor, row_token: torch.Tensor, row_weight: torch.Tensor, counts: list[int], experts: Experts
) -> torch.Tensor:
    """Σ over rows of ``weight · expert(x[token])`` into [T, H]; rows are sorted by expert, ``counts`` per expert."""
    xs = x.index_select(0, row_token)
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n:
            pieces.append(experts.one(e, xs[start : start + n]))
            start += n
    ys = torch.cat(pieces) * row_weight.unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, row_token, ys.to(x.dtype))


def grouped_swiglu_mm(
    x: torch.Tensor, row_token: torch.Tensor, row_weight: torch.Tensor, counts: list[int], experts: Experts
) -> torch.Tensor:
    """``grouped_swiglu`` through ``torch._grouped_mm`` (one call per projection; forward only on CPU)."""
    xs = x.index_select(0, row_token)
    per_expert = torch.tensor(counts, device=x.device)
    offsets = per_expert.cumsum(0).to(torch.int32)
    gate_up = torch._grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), offs=offsets)
    row_expert = None
    if experts.gate_up_proj_bias is not None:  # each row adds its expert's biases
        row_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), per_expert)
        gate_up = gate_up + experts.gate_up_proj_bias.index_select(0, row_expert)
    gate, up = gate_up.chunk(2, dim=-1)
    ys = torch._grouped_mm(glu(gate, up, experts.activation), experts.down_proj.transpose(1, 2), offs=offsets)
    if row_expert is not None:
        ys = ys + experts.down_proj_bias.index_select(0, row_expert)
    return torch.zeros_like(x).index_add(0, row_token, (ys * row_weight.unsqueeze(-1)).to(x.dtype))


def expert_rows(idx: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """(token, slot) rows sorted by expert: (row token, row weight, rows per expert)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order // k, weights.reshape(-1).index_select(0, order), counts


def group_rows(idx: torch.Tensor, weights: torch.Tensor, moe: MoESpec):
    """(token, group) rows, deduplicated, weights summed over the token's experts in the group, sorted by group."""
    groups = moe.num_groups
    gid = torch.div(idx, moe.grove.experts_per_group, rounding_mode="floor")
    summed = torch.zeros(idx.shape[0], groups, dtype=weights.dtype, device=idx.device).scatter_add(1, gid, weights)
    present = torch.zeros(idx.shape[0], groups, dtype=torch.bool, device=idx.device).scatter(1, gid, True)
    group, token = present.t().nonzero(as_tuple=True)
    counts = present.sum(0).tolist()
    return token, summed[token, group], counts


class MoEBlock(nn.Module):
    """Drop-in for transformers' sparse MoE blocks (and GroveMoE's), same parameter names as the checkpoints."""

    def __init__(self, moe: MoESpec, hidden_size: int, impl: str = "grouped", names: TensorNames | None = None):
        super().__init__()
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        self.spec = moe
        self.impl = impl
        self.gate = Router(moe.num_experts, hidden_size, moe.router)
        self.experts = Experts(moe.num_experts, hidden_size, moe.expert_size, moe.expert_bias, moe.activation)
        if moe.grove:
            self.chunk_experts = Experts(moe.num_groups, hidden_size, moe.grove.adjugate_size)
        # Shared experts under the family's own names (Qwen2-MoE: shared_expert + shared_expert_gate;
        # DeepSeek: shared_experts), so checkpoint names are the parameter names.
        names = names or TensorNames()
        self.shared_names = (names.shared, names.shared_gate)
        if moe.shared:
            setattr(self, names.shared, SwiGLU(hidden_size, moe.shared.count * moe.shared.size))
            if moe.shared.gated:
                setattr(self, names.shared_gate, nn.Linear(hidden_size, 1, bias=False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        idx, weights = route(logits, self.spec.router, self.spec.top_k, self.gate.e_score_correction_bias)
        if self.impl == "reference":
            out = self._per_slot(x, idx, weights)
        elif self.impl == "triton" and not self._needs_grad(x, weights):
            from .triton_moe import fused_moe

            out = fused_moe(x, idx, weights, self)
        else:
            mm = self._grouped_mm_applies(x, weights)
            swiglu = grouped_swiglu_mm if mm and x.shape[0] <= GROUPED_MM_MAX_TOKENS else grouped_swiglu
            out = swiglu(x, *expert_rows(idx, weights, self.spec.num_experts), self.experts)
            if self.spec.grove:
                swiglu = grouped_swiglu_mm if mm else grouped_swiglu
                adjugates = swiglu(x, *group_rows(idx, weights, self.spec), self.chunk_experts)
                out = out + self.spec.grove.scale * adjugates
        if self.spec.shared:
            out = out + self._shared(x)
        return out.reshape(shape)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts, a dense SwiGLU beside the routed ones (scaled by their gate when gated)."""
        shared, gate = self.shared_names
        y = getattr(self, shared)(x)
        return torch.sigmoid(getattr(self, gate)(x)) * y if self.spec.shared.gated else y

    def _grouped_mm_applies(self, x, weights) -> bool:
        return x.device.type == "cpu" and x.dtype in GROUPED_MM_DTYPES and not self._needs_grad(x, weights)

    def _needs_grad(self, x, weights) -> bool:
        """The Triton kernels have no backward: when a gradient is needed (RoMA trains routers
        through the blocks) the grouped path runs instead, with the same semantics."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or weights.requires_grad or any(p.requires_grad for p in self.parameters())

    def _per_slot(self, x, idx, weights):
        """The reference: every (token, slot) on its own, adjugates once per selected expert."""
        out = torch.zeros_like(x)
        small = torch.zeros_like(x)
        per_group = self.spec.grove.experts_per_group if self.spec.grove else 0
        for slot in range(idx.shape[1]):
            for e in idx[:, slot].unique().tolist():
                rows = (idx[:, slot] == e).nonzero(as_tuple=True)[0]
                w = weights[rows, slot].unsqueeze(-1)
                out = out.index_add(0, rows, (self.experts.one(e, x[rows]) * w).to(x.dtype))
                if per_group:
                    small = small.index_add(0, rows, (self.chunk_experts.one(e // per_group, x[rows]) * w).to(x.dtype))
        if per_group:
            out = self.spec.grove.scale * small + out
        return out


class TupleMoEBlock(MoEBlock):
    """:class:`MoEBlock` for decoder layers that unpack ``(hidden, router scores)`` from their MoE block
    (gpt-oss's ``hidden_states, _ = self.mlp(...)``: a plain tensor would be unpacked along the batch)."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(hidden_states), None
