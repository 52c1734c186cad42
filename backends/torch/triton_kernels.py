"""Triton kernels of the fused MoE op; the data layout they share is described in ``triton_moe``.

- ``align_kernel``: one program turns (expert ids, weights) into the padded row order, the owner of
  every M-block, the row weights (λ·summed weight for adjugate rows) and the adjugate rows' validity.
- ``swiglu_kernel``: GEMM1, ``silu(x Wg^T) * (x Wu^T)`` per tile, SwiGLU in the epilogue; with
  ``HAS_BIAS`` the experts' gate/up biases are added first, with ``CLAMPED`` gpt-oss's clamped SwiGLU
  ``(clamp(u, ±limit) + 1) · g · sigmoid(alpha · g)``, ``g = min(gate, limit)``, replaces it.
- ``down_kernel``: GEMM2, ``h Wd^T`` (+ the down bias with ``HAS_BIAS``) times the row weight.
- ``combine_kernel``: the sum over a token's rows.

Ordinary and adjugate tiles run in the same launch: a tile's M-block says which segment it is in,
and the segment picks the weight tensor and the expert size. Accumulation is fp32.

``INTERP_BF16`` is set when Triton's interpreter runs bf16 tensors. It casts the dot operands to fp32
(the interpreter multiplies bf16 as raw 16-bit integers) and rounds results to bf16 by hand (the
interpreter truncates where a GPU rounds to nearest even), so the interpreter computes what a GPU does.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_keys(rows, idx_ptr, w_ptr, rows_o, R, k, E, X, per_group, scale, GROVE: tl.constexpr, KP: tl.constexpr):
    """(key, row weight) of rows ``rows``: key = the expert (ordinary rows), E + group (an
    adjugate row that is its token's first slot in that group), X (skipped)."""
    in_range = rows < R
    is_adj = rows >= rows_o
    slot_row = tl.where(is_adj, rows - rows_o, rows)  # the (token, slot) a row comes from
    e = tl.load(idx_ptr + slot_row, mask=in_range, other=0).to(tl.int32)
    w = tl.load(w_ptr + slot_row, mask=in_range, other=0.0).to(tl.float32)
    key = e
    if GROVE:
        s = slot_row % k
        first = slot_row - s  # the token's slot 0
        slots = tl.arange(0, KP)
        both = in_range[:, None] & (slots[None, :] < k)
        others = tl.load(idx_ptr + first[:, None] + slots[None, :], mask=both, other=0).to(tl.int32)
        other_w = tl.load(w_ptr + first[:, None] + slots[None, :], mask=both, other=0.0).to(tl.float32)
        g = e // per_group
        same = both & (others // per_group == g[:, None])
        dup = tl.sum((same & (slots[None, :] < s[:, None])).to(tl.int32), 1) > 0
        summed = tl.sum(tl.where(same, other_w, 0.0), 1)
        key = tl.where(is_adj, tl.where(dup, X, E + g), e)
        w = tl.where(is_adj, scale * summed, w)
    key = tl.where(in_range, key, X)
    return key, w


# Scalars that can be 1 are not specialised: Triton would turn them into constants, and both arms
# of an ``if`` on the segment must assign values of one type.
_COUNTS = ["rows_o", "R", "k", "E", "X", "per_group", "blocks_o", "blocks", "tiles_o", "nb_o", "nb_a", "nb"]


def _jit(fn):
    names = set(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    return triton.jit(fn, do_not_specialize=[n for n in _COUNTS if n in names])


@_jit
def align_kernel(
    idx_ptr,
    w_ptr,
    sorted_ptr,
    block_expert_ptr,
    row_weight_ptr,
    adj_valid_ptr,
    rows_o,
    R,
    k,
    E,
    X,
    per_group,
    scale,
    blocks_o,
    blocks,
    GROVE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """Counting sort of the rows by key in one program (decode sizes): three passes over the rows."""
    xs = tl.arange(0, BLOCK_X)
    lane = tl.arange(0, BLOCK_R)
    # 1. rows per key; row weights and adjugate validity on the way
    counts = tl.zeros([BLOCK_X], dtype=tl.int32)
    for start in range(0, R, BLOCK_R):
        rows = start + lane
        key, w = _row_keys(rows, idx_ptr, w_ptr, rows_o, R, k, E, X, per_group, scale, GROVE, KP)
        counts += tl.sum((key[:, None] == xs[None, :]).to(tl.int32), 0)
        tl.store(row_weight_ptr + rows, w, mask=rows < R)
        if GROVE:
            adj = (rows >= rows_o) & (rows < R)
            tl.store(adj_valid_ptr + rows - rows_o, (key != X).to(tl.int8), mask=adj)
    # 2. each key's padded run: ordinary experts from position 0, adjugates from block blocks_o
    counts = tl.where(xs < X, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    before = tl.cumsum(padded, 0) - padded
    ordinary_total = tl.sum(tl.where(xs < E, padded, 0), 0)
    starts = tl.where(xs < E, before, blocks_o * BLOCK_M + before - ordinary_total)
    ends = starts + padded
    # owner of each M-block (-1: beyond the last run of its segment); padding positions get R
    for p0 in range(0, blocks * BLOCK_M, BLOCK_R):
        pos = p0 + lane
        owner = (pos[:, None] >= starts[None, :]) & (pos[:, None] < ends[None, :])
        expert = tl.sum(tl.where(owner, xs[None, :] + 1, 0), 1) - 1
        filled = tl.sum((owner & (pos[:, None] - starts[None, :] < counts[None, :])).to(tl.int32), 1) > 0
        inside = pos < blocks * BLOCK_M
        tl.store(sorted_ptr + pos, R, mask=inside & ~filled)
        tl.store(block_expert_ptr + pos // BLOCK_M, expert, mask=inside & (pos % BLOCK_M == 0))
    # 3. scatter: a row goes after its key's earlier rows (stable, so the order is deterministic)
    cursor = starts
    for start in range(0, R, BLOCK_R):
        rows = start + lane
        key, w = _row_keys(rows, idx_ptr, w_ptr, rows_o, R, k, E, X, per_group, scale, GROVE, KP)
        onehot = key[:, None] == xs[None, :]
        base = tl.sum(tl.where(onehot, cursor[None, :], 0), 1)
        rank = tl.sum(((key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), 1)
        tl.store(sorted_ptr + base + rank, rows, mask=(rows < R) & (key < X))
        cursor += tl.sum(onehot.to(tl.int32), 0)


@triton.jit
def _rounded(v, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """fp32 ``v`` in ``dtype``, rounded to nearest even."""
    if INTERP_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _block_rows(sorted_ptr, m_block, rows_o, R, k, BLOCK_M: tl.constexpr):
    """The rows of an M-block, which are real (not padding), and their tokens."""
    rows = tl.load(sorted_ptr + m_block * BLOCK_M + tl.arange(0, BLOCK_M))
    real = rows < R
    token = tl.where(rows >= rows_o, rows - rows_o, rows) // k
    return rows, real, token.to(tl.int64)


@triton.jit
def _gemm1_tile(pid, tiles_o, blocks_o, nb_o, nb_a):
    """(adjugate tile?, M-block, N-block) of GEMM1's program ``pid``: ordinary tiles first."""
    if pid >= tiles_o:
        local = pid - tiles_o
        return True, blocks_o + local // nb_a, local % nb_a
    return False, pid // nb_o, pid % nb_o


@triton.jit
def _gated(acc_g, acc_u, bias_ptr, N, offs_n, n_ok, alpha, limit, HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr):
    """GEMM1's epilogue in fp32: the gate and up biases (``bias_ptr``: the expert's ``[2N]``) when
    ``HAS_BIAS``, then ``silu(g) · u`` or, when ``CLAMPED``, gpt-oss's ``(clamp(u, ±limit) + 1) · g ·
    sigmoid(alpha · g)`` with ``g = min(gate, limit)``. Ordinary experts only: the op refuses either
    with Grove's adjugates."""
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bias_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(alpha * g))
    return acc_g * tl.sigmoid(acc_g) * acc_u


@_jit
def swiglu_kernel(
    x_ptr,
    gate_up_ptr,
    adj_gate_up_ptr,
    gate_up_bias_ptr,
    sorted_ptr,
    block_expert_ptr,
    act_ptr,
    rows_o,
    R,
    k,
    E,
    H,
    I,
    Ia,
    blocks_o,
    tiles_o,
    nb_o,
    nb_a,
    alpha,
    limit,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CLAMPED: tl.constexpr,
):
    """act[row, n] = silu(x[token] · Wg[e, n]) * (x[token] · Wu[e, n]) for one (M-block, N-block) tile.

    Weights [experts, 2N, H] (gate rows then up rows), contiguous. Tiles ``< tiles_o`` are the
    ordinary experts' (N = I), the rest the adjugates' (N = Ia). gpt-oss's epilogue: see ``_gated``.
    """
    is_adj, m_block, n_block = _gemm1_tile(tl.program_id(0), tiles_o, blocks_o, nb_o, nb_a)
    expert = tl.load(block_expert_ptr + m_block)
    if expert >= 0:
        rows, real, token = _block_rows(sorted_ptr, m_block, rows_o, R, k, BLOCK_M)
        if is_adj:
            w_ptr = adj_gate_up_ptr
            e = expert - E
            N = Ia
            act_row = rows_o * I + (rows - rows_o).to(tl.int64) * Ia
        else:
            w_ptr = gate_up_ptr
            e = expert
            N = I
            act_row = rows.to(tl.int64) * I
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        a_ptrs = x_ptr + token[:, None] * H + offs_k[None, :]
        g_ptrs = w_ptr + e.to(tl.int64) * 2 * N * H + offs_n[None, :] * H + offs_k[:, None]
        u_ptrs = g_ptrs + N * H
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if INTERP_BF16:
                a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        h = _gated(
            acc_g, acc_u, gate_up_bias_ptr + e.to(tl.int64) * 2 * N, N, offs_n, n_ok, alpha, limit, HAS_BIAS, CLAMPED
        )
        tl.store(
            act_ptr + act_row[:, None] + offs_n[None, :],
            _rounded(h, act_ptr.dtype.element_ty, INTERP_BF16),
            mask=real[:, None] & n_ok[None, :],
        )


@_jit
def down_kernel(
    act_ptr,
    down_ptr,
    adj_down_ptr,
    down_bias_ptr,
    sorted_ptr,
    block_expert_ptr,
    row_weight_ptr,
    out_ptr,
    rows_o,
    R,
    k,
    E,
    H,
    I,
    Ia,
    blocks_o,
    nb,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """out[row, n] = row_weight[row] · (act[row] · Wd[e, n] (+ bd[e, n])) for one (M-block, N-block) tile.

    Weights [experts, H, K] contiguous, K = I for ordinary M-blocks and Ia for adjugate ones; the down
    biases ``[experts, H]`` with ``HAS_BIAS`` (ordinary experts only).
    """
    pid = tl.program_id(0)
    m_block = pid // nb
    n_block = pid % nb
    expert = tl.load(block_expert_ptr + m_block)
    if expert >= 0:
        rows, real, token = _block_rows(sorted_ptr, m_block, rows_o, R, k, BLOCK_M)
        if m_block >= blocks_o:
            w_ptr = adj_down_ptr
            e = expert - E
            K = Ia
            act_row = rows_o * I + (rows - rows_o).to(tl.int64) * Ia
        else:
            w_ptr = down_ptr
            e = expert
            K = I
            act_row = rows.to(tl.int64) * I
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < H
        a_ptrs = act_ptr + act_row[:, None] + offs_k[None, :]
        b_ptrs = w_ptr + e.to(tl.int64) * H * K + offs_n[None, :] * K + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if INTERP_BF16:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(down_bias_ptr + e.to(tl.int64) * H + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = acc * tl.load(row_weight_ptr + rows, mask=real, other=0.0)[:, None]
        tl.store(
            out_ptr + rows.to(tl.int64)[:, None] * H + offs_n[None, :],
            _rounded(acc, out_ptr.dtype.element_ty, INTERP_BF16),
            mask=real[:, None] & n_ok[None, :],
        )


@_jit
def combine_kernel(
    rows_ptr,
    adj_valid_ptr,
    y_ptr,
    rows_o,
    k,
    H,
    GROVE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """y[t] = Σ_s out[t·k + s] + Σ_s valid[t, s] · out[rows_o + t·k + s], summed in fp32."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    slots = tl.arange(0, KP)
    ok = (slots[:, None] < k) & (offs[None, :] < H)
    row = (t * k + slots).to(tl.int64)
    acc = tl.sum(tl.load(rows_ptr + row[:, None] * H + offs[None, :], mask=ok, other=0.0).to(tl.float32), 0)
    if GROVE:
        valid = tl.load(adj_valid_ptr + t * k + slots, mask=slots < k, other=0) != 0
        adj = tl.load(rows_ptr + (rows_o + row)[:, None] * H + offs[None, :], mask=ok & valid[:, None], other=0.0)
        acc += tl.sum(adj.to(tl.float32), 0)
    tl.store(y_ptr + t.to(tl.int64) * H + offs, _rounded(acc, y_ptr.dtype.element_ty, INTERP_BF16), mask=offs < H)
