"""Fused MoE on Triton: ordinary experts and Grove's once-per-group adjugates in the same launches.

The op computes the function ``moe.py``'s grouped path computes (the reference formula, adjugates
once per (token, group)), accumulating in fp32 throughout::

    y[t] = Σ_s w[t,s] E_{idx[t,s]}(x[t])  +  λ Σ_{groups g of t} (Σ_{s: idx[t,s]//p = g} w[t,s]) A_g(x[t])

in four launches: align → GEMM1 (gate and up, SwiGLU in the epilogue) → GEMM2 (down, times the row
weight) → combine. Accumulation is fp32; weights may be fp32, fp16 or bf16. gpt-oss's experts run in
the same launches: their biases are added in the GEMM epilogues and its clamped SwiGLU replaces SwiGLU
in GEMM1's.

Worked example of the data layout
---------------------------------
T = 3 tokens, top-k = 2, E = 4 experts in groups of p = 2 (G = 2 adjugates), BLOCK_M = 4 (the
kernels use at least 16; 4 keeps the picture small)::

    idx = [[1, 0],        weights w = [[w00, w01],
           [3, 1],                     [w10, w11],
           [0, 1]]                     [w20, w21]]

*Rows.* Every (token, slot) is an ordinary row ``r = t·k + s`` (rows 0..5). With adjugates, every
(token, slot) also has an adjugate row ``r = T·k + t·k + s`` (rows 6..11); the row of a token's
first slot in a group stands for the whole group with the summed weight, later slots of the same
group are skipped (``adj_valid = 0``)::

    row  0  1  2  3  4  5 |  6        7     8    9    10       11
    tok  0  0  1  1  2  2 |  0        0     1    1    2        2
    key  1  0  3  1  0  1 |  4 (g0)   skip  5    4    4 (g0)   skip
    wt   w00 w01 w10 w11 w20 w21 | λ(w00+w01)  -  λw10  λw11  λ(w20+w21)  -

Keys number ordinary experts 0..E-1 and adjugates E..E+G-1, so one sort serves both; λ is
folded into the adjugate rows' weights, applied once per (token, group).

*Align.* Rows are grouped by key, each key's run padded to a multiple of BLOCK_M with the
sentinel R = 12. Ordinary runs start at position 0; adjugate runs start at block ``blocks_o``,
the most blocks the ordinary rows can need (here min(6, (6 + 4·3) // 4) = 4), so the grid is known
without reading the counts back to the host (no device-to-host sync)::

    block         0             1            2              3         | 4            5              6
    sorted_ids    1 4 12 12 |   0 3 5 12 |   2 12 12 12 |   12 x4     | 6 9 10 12 |  8 12 12 12 |  12 x4
    block_expert  0             1            3              -1        | 4            5              -1

*GEMM1* runs one program per (M-block, N-block): ``blocks_o × cdiv(I, BLOCK_N)`` ordinary tiles,
then ``blocks_a × cdiv(Ia, BLOCK_N)`` adjugate tiles, in one grid; a tile whose block is -1 returns
at once. A tile gathers its rows' tokens from x, streams its expert's gate and up rows in K-blocks,
and writes ``silu(gate) * up`` into ``act`` (row r at ``r·I``, adjugate rows after all ordinary rows
at ``T·k·I + (r - T·k)·Ia``).

*GEMM2* runs ``(blocks_o + blocks_a) × cdiv(H, BLOCK_N)`` tiles over the down projections (K = I or
Ia by segment) and writes ``weight[r] · act[r] · Wd^T`` into ``rows[r]`` ([R, H], x's dtype).

*Combine* sums each token's rows in fp32: ``y[t] = Σ_s rows[t·k+s] + Σ_s adj_valid[t,s]·rows[T·k+t·k+s]``.

Gradients: there is no backward. ``MoEBlock`` runs its grouped torch path when a gradient is needed
(RoMA trains routers through the blocks), so training is unaffected and inference uses the kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import triton_kernels
from .triton_configs import ALIGN_ONE_PROGRAM_MAX_ROWS, config_for, next_power_of_2

# Multiply-adds fused into FMAs, as Triton has done by default (said explicitly: Triton 3.9 warns
# that its default will change).
FUSION = dict(enable_fp_fusion=True)


def fused_moe(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, block) -> torch.Tensor:
    """The MoE block's output for x [T, H] routed to ``idx``/``weights`` [T, k] (MoEBlock's hook)."""
    grove, experts = block.spec.grove, block.experts
    if grove is None:
        return moe_forward(
            x,
            idx,
            weights,
            experts.gate_up_proj,
            experts.down_proj,
            biases=None if experts.gate_up_proj_bias is None else (experts.gate_up_proj_bias, experts.down_proj_bias),
            activation=experts.activation,
        )
    return moe_forward(
        x,
        idx,
        weights,
        block.experts.gate_up_proj,
        block.experts.down_proj,
        block.chunk_experts.gate_up_proj,
        block.chunk_experts.down_proj,
        experts_per_group=grove.experts_per_group,
        scale=grove.scale,
    )


def moe_forward(
    x,
    idx,
    weights,
    gate_up,
    down,
    adj_gate_up=None,
    adj_down=None,
    experts_per_group: int = 1,
    scale: float = 1.0,
    config: dict | None = None,
    align: str = "auto",
    biases=None,
    activation=None,
) -> torch.Tensor:
    """The fused op on plain tensors: ``gate_up [E, 2I, H]``, ``down [E, H, I]``, and for Grove the
    adjugates' ``[G, 2Ia, H]``, ``[G, H, Ia]`` with ``E = G · experts_per_group`` and λ = ``scale``;
    gpt-oss's ``biases`` ``([E, 2I], [E, H])`` and ``activation`` (``spec.ClampedSwiGLU``), see ExpertForm.

    ``align``: "auto" (one Triton program for small batches, torch ops above), "triton" or "torch".
    """
    (T, H), k = x.shape, idx.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    grove = adj_gate_up is not None
    form = ExpertForm.of(biases, activation, grove)  # gpt-oss's biases and clamped SwiGLU
    tensors = (gate_up, down) + ((adj_gate_up, adj_down) if grove else ()) + form.biases
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"expert weights must be in x's dtype {x.dtype}, got {[t.dtype for t in tensors]}")
    # Without adjugates the adjugate arguments repeat the ordinary ones; no tile reads them.
    G, Ia = (adj_gate_up.shape[0], adj_gate_up.shape[1] // 2) if grove else (0, I)
    if T == 0:
        return torch.zeros_like(x)
    kernels, interpreted = kernels_for(x.device)
    cfg = config or config_for(T, k, E, I, H, interpreted=interpreted)
    bm = cfg["BLOCK_M"]
    layout = Layout(T, k, E, G, bm)
    if align == "auto":
        align = "triton" if layout.R <= ALIGN_ONE_PROGRAM_MAX_ROWS else "torch"
    align_rows = align_rows_triton if align == "triton" else align_rows_torch
    sorted_ids, block_expert, row_weight, adj_valid = align_rows(
        idx, weights, layout, experts_per_group, scale, kernels
    )
    x = x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    gate_up_bias, down_bias = (b.contiguous() for b in form.biases) if form.biases else (gate_up, down)  # or unread
    adj_gate_up = gate_up if not grove else adj_gate_up.contiguous()
    adj_down = down if not grove else adj_down.contiguous()
    interp_bf16 = interpreted and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **FUSION)
    R, Ro = layout.R, layout.rows_o

    # The three launches: operands in the kernels' signature order, grouped as there.
    # fmt: off
    act = torch.empty(Ro * I + (R - Ro) * Ia, dtype=x.dtype, device=x.device)
    nb_o, nb_a = triton.cdiv(I, cfg["BLOCK_N1"]), triton.cdiv(Ia, cfg["BLOCK_N1"])
    tiles_o = layout.blocks_o * nb_o
    grid1 = (tiles_o + layout.blocks_a * nb_a,)
    kernels.swiglu_kernel[grid1](
        x, gate_up, adj_gate_up, gate_up_bias, sorted_ids, block_expert, act,
        Ro, R, k, E, H, I, Ia, layout.blocks_o, tiles_o, nb_o, nb_a, form.alpha, form.limit,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"], INTERP_BF16=interp_bf16, PRECISION=precision,
        HAS_BIAS=bool(form.biases), CLAMPED=form.clamped, **launch)

    rows = torch.empty(R, H, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(H, cfg["BLOCK_N2"])
    kernels.down_kernel[(layout.blocks * nb,)](
        act, down, adj_down, down_bias, sorted_ids, block_expert, row_weight, rows,
        Ro, R, k, E, H, I, Ia, layout.blocks_o, nb,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"], INTERP_BF16=interp_bf16, PRECISION=precision,
        HAS_BIAS=bool(form.biases), **launch)

    y = torch.empty_like(x)
    block_h = min(1024, next_power_of_2(H))
    kernels.combine_kernel[(T, triton.cdiv(H, block_h))](
        rows, adj_valid, y, Ro, k, H, GROVE=grove, KP=next_power_of_2(k), BLOCK_H=block_h,
        INTERP_BF16=interp_bf16, **FUSION)
    # fmt: on
    return y


class ExpertForm(NamedTuple):
    """What the experts add to plain SwiGLU: gpt-oss's biases and clamped SwiGLU, as the kernels take them."""

    biases: tuple  # (gate_up_bias [E, 2I], down_bias [E, H]), or () without
    clamped: bool
    alpha: float
    limit: float

    @staticmethod
    def of(biases, activation, grove: bool) -> ExpertForm:
        """Checked: neither with Grove's adjugates (no family combines them)."""
        biases = tuple(biases or ())
        if grove and (biases or activation is not None):
            raise ValueError("the fused op runs expert biases and the clamped SwiGLU without adjugates only")
        if activation is None:
            return ExpertForm(biases, False, 1.0, 0.0)
        return ExpertForm(biases, True, float(activation.alpha), float(activation.limit))


class Layout:
    """Row and block counts of one call, all known on the host before any kernel runs."""

    def __init__(self, tokens: int, top_k: int, num_experts: int, num_groups: int, block_m: int):
        self.tokens, self.top_k, self.block_m = tokens, top_k, block_m
        self.E, self.G = num_experts, num_groups
        self.X = num_experts + num_groups  # keys; X itself marks a skipped row
        self.rows_o = tokens * top_k
        self.R = self.rows_o * (2 if num_groups else 1)
        self.blocks_o = max_blocks(self.rows_o, num_experts, block_m)
        self.blocks_a = max_blocks(self.R - self.rows_o, num_groups, block_m)
        self.blocks = self.blocks_o + self.blocks_a


def max_blocks(rows: int, keys: int, block_m: int) -> int:
    """The most M-blocks ``rows`` rows over ``keys`` keys can fill once each key's run is padded."""
    used = min(rows, keys)
    return min(rows, (rows + used * (block_m - 1)) // block_m)


def align_rows_triton(idx, weights, layout: Layout, experts_per_group: int, scale: float, kernels):
    """(sorted_ids, block_expert, row_weight, adj_valid) from the one-program align kernel."""
    device = idx.device
    sorted_ids = torch.empty(layout.blocks * layout.block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(layout.blocks, dtype=torch.int32, device=device)
    row_weight = torch.empty(layout.R, dtype=torch.float32, device=device)
    adj_valid = torch.empty(max(1, layout.R - layout.rows_o), dtype=torch.int8, device=device)
    kernels.align_kernel[(1,)](
        idx.contiguous(),
        weights.contiguous(),
        sorted_ids,
        block_expert,
        row_weight,
        adj_valid,
        layout.rows_o,
        layout.R,
        layout.top_k,
        layout.E,
        layout.X,
        experts_per_group,
        float(scale),
        layout.blocks_o,
        layout.blocks,
        GROVE=layout.G > 0,
        KP=next_power_of_2(layout.top_k),
        BLOCK_M=layout.block_m,
        BLOCK_R=32,
        BLOCK_X=next_power_of_2(layout.X + 1),
        num_warps=4,
        **FUSION,
    )
    return sorted_ids, block_expert, row_weight, adj_valid


def align_rows_torch(idx, weights, layout: Layout, experts_per_group: int, scale: float, kernels=None):
    """The same four arrays as ``align_rows_triton`` from torch ops that parallelise over the rows
    (a stable counting sort; nothing is read back to the host)."""
    device, k = idx.device, layout.top_k
    E, X, bm = layout.E, layout.X, layout.block_m
    keys = idx.reshape(-1)
    row_weight = weights.reshape(-1).float()
    adj_valid = torch.zeros(1, dtype=torch.int8, device=device)
    if layout.G:
        group = torch.div(idx, experts_per_group, rounding_mode="floor")
        same = group[:, :, None] == group[:, None, :]  # [T, k, k]
        earlier = torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)
        dup = (same & earlier).any(-1)
        summed = (same * weights.float()[:, None, :]).sum(-1)
        keys = torch.cat([keys, torch.where(dup, X, E + group).reshape(-1)])
        row_weight = torch.cat([row_weight, scale * summed.reshape(-1)])
        adj_valid = (~dup).reshape(-1).to(torch.int8)
    keys = keys.long()
    counts = torch.zeros(X + 1, dtype=torch.long, device=device).scatter_add_(0, keys, torch.ones_like(keys))[:X]
    padded = (counts + bm - 1) // bm * bm
    before = padded.cumsum(0) - padded
    segment = torch.arange(X, device=device) >= E
    starts = torch.where(segment, layout.blocks_o * bm + before - padded[:E].sum(), before)

    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    real = sorted_keys < X
    key = sorted_keys.clamp(max=X - 1)
    rank = torch.arange(layout.R, device=device) - (counts.cumsum(0) - counts)[key]
    dump = layout.blocks * bm  # where skipped rows go
    pos = torch.where(real, starts[key] + rank, dump)
    sorted_ids = torch.full((dump + 1,), layout.R, dtype=torch.int32, device=device)
    sorted_ids[pos] = order.to(torch.int32)

    # the owner of block b: the key whose padded run covers position b·BLOCK_M in b's segment
    ends = starts + padded
    first = torch.arange(layout.blocks, device=device) * bm
    in_adj = first >= layout.blocks_o * bm
    owner_o = torch.searchsorted(ends[:E].contiguous(), first, right=True)
    owner_a = E + torch.searchsorted(ends[E:].contiguous(), first, right=True)
    owner = torch.where(in_adj, owner_a, owner_o)
    limit = torch.where(in_adj, X, E)
    block_expert = torch.where(owner < limit, owner, -1).to(torch.int32)
    return sorted_ids[:dump], block_expert, row_weight, adj_valid


# -- which kernels: compiled for a GPU, or Triton's interpreter for CPU tensors ------------------
def kernels_for(device: torch.device):
    """(the kernels, interpreted?) for tensors on ``device``.

    Triton chooses compiled or interpreted when ``@triton.jit`` runs, from ``TRITON_INTERPRET`` —
    for its own library functions (``tl.sum``, ``tl.zeros``, ...) too, when ``triton`` is first
    imported, which transformers does early. CPU tensors need the interpreter whatever the
    environment said then, so for them every launch runs the kernel's Python source in the
    interpreter and, for that launch only, sends calls of jitted functions there as well.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton_kernels.swiglu_kernel, InterpretedFunction):  # TRITON_INTERPRET=1 at import
        return triton_kernels, True
    if device.type != "cpu":
        return triton_kernels, False
    return _INTERPRETED, True


class _InterpretedKernels:
    def __getattr__(self, name):
        return _Interpreted(getattr(triton_kernels, name))


class _Interpreted:
    """``kernel[grid](...)`` for a compiled-mode ``@triton.jit`` kernel, run by the interpreter."""

    def __init__(self, kernel):
        self.fn = _interpreted(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.jit import JITFunction

            call = JITFunction.__call__
            JITFunction.__call__ = _device_call
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = call

        return launch


def _device_call(jitted, *args, **kwargs):
    """A jitted function (ours or triton.language's) called from interpreted code: its source runs in
    the interpreter, and the patches of triton.language made for it are undone when it returns.
    (Triton's own interpreted calls leave them in place, which breaks compiling any kernel later
    in the process.)"""
    from triton.runtime.interpreter import _patch_lang

    fn = _interpreted(jitted)
    scope = _patch_lang(fn.fn)
    try:
        return fn.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


_INTERPRETED = _InterpretedKernels()
_interpreted_cache: dict = {}


def _interpreted(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    # keyed by id: hashing a JITFunction walks its source, which fails while the interpreter patches tl
    key = id(kernel)
    if key not in _interpreted_cache:
        _interpreted_cache[key] = InterpretedFunction(kernel.fn, do_not_specialize=kernel.do_not_specialize)
    return _interpreted_cache[key]
