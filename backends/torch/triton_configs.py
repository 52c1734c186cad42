"""Launch configurations of the fused MoE kernels: a small table keyed by shape, as vLLM keeps one.

One entry per layer shape ``(experts, expert size, hidden size)``; inside it, configurations keyed
by token count, of which the nearest to the batch's is used. Shapes not in the table get a rule
of thumb. No autotuning at run time (Triton's interpreter cannot run ``@triton.autotune`` with
several configurations, and a tuned table is reproducible).

The entries below are starting points chosen from the shapes' arithmetic, not measurements: no GPU
was at hand when they were written. ``scripts/bench_kernels.py --tune`` sweeps a few candidates on
a CUDA machine and prints rows to paste here.

Fields: ``BLOCK_M`` rows per tile (each expert's rows are padded to a multiple of it; both GEMMs
and the alignment share it), ``BLOCK_N1``/``BLOCK_K1`` the SwiGLU GEMM's tile over the expert size
and the hidden size, ``BLOCK_N2``/``BLOCK_K2`` the down GEMM's tile over the hidden size and the
expert size, ``num_warps``/``num_stages`` as Triton takes them. Every block is at least 16 (the
smallest ``tl.dot`` a GPU accepts).
"""

from __future__ import annotations

# Decode streams each touched expert once: small M tiles, many programs along N to keep the memory
# system busy. Prefill has hundreds of rows per expert: large tiles, compute-bound.
CONFIGS = {
    "decode": dict(BLOCK_M=16, BLOCK_N1=32, BLOCK_K1=128, BLOCK_N2=64, BLOCK_K2=128, num_warps=4, num_stages=4),
    "small": dict(BLOCK_M=16, BLOCK_N1=64, BLOCK_K1=64, BLOCK_N2=64, BLOCK_K2=64, num_warps=4, num_stages=4),
    "medium": dict(BLOCK_M=32, BLOCK_N1=64, BLOCK_K1=64, BLOCK_N2=128, BLOCK_K2=64, num_warps=4, num_stages=4),
    "large": dict(BLOCK_M=64, BLOCK_N1=128, BLOCK_K1=64, BLOCK_N2=128, BLOCK_K2=64, num_warps=8, num_stages=3),
    "prefill": dict(BLOCK_M=128, BLOCK_N1=128, BLOCK_K1=64, BLOCK_N2=128, BLOCK_K2=64, num_warps=8, num_stages=3),
}

# (experts, expert size, hidden size) -> {tokens: name in CONFIGS}
TABLE: dict[tuple[int, int, int], dict[int, str]] = {
    # Qwen3-30B-A3B, GroveMoE (the adjugate tiles run with the ordinary experts' configuration)
    (128, 768, 2048): {1: "decode", 8: "decode", 64: "small", 512: "medium", 4096: "prefill"},
    # OLMoE-1B-7B
    (64, 1024, 2048): {1: "decode", 8: "decode", 64: "small", 512: "large", 4096: "prefill"},
}

# Up to this many (token, slot) rows the alignment runs as one Triton program (one launch: decode);
# above it, as a handful of torch ops that parallelise over the rows (prefill).
ALIGN_ONE_PROGRAM_MAX_ROWS = 512


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def rule_of_thumb(tokens: int, top_k: int, num_experts: int) -> dict:
    """Tiles sized by the average rows per expert, for shapes the table does not hold."""
    rows_per_expert = tokens * top_k / max(1, num_experts)
    if rows_per_expert <= 4:
        return CONFIGS["small"]
    if rows_per_expert <= 32:
        return CONFIGS["medium"]
    if rows_per_expert <= 128:
        return CONFIGS["large"]
    return CONFIGS["prefill"]


def config_for(
    tokens: int, top_k: int, num_experts: int, expert_size: int, hidden_size: int, interpreted: bool = False
) -> dict:
    """The launch configuration for one layer call."""
    if interpreted:
        # Triton's interpreter runs programs one after another in numpy: few, large tiles are fastest.
        n1, k = min(64, next_power_of_2(expert_size)), min(128, next_power_of_2(hidden_size))
        return dict(
            BLOCK_M=16,
            BLOCK_N1=max(16, n1),
            BLOCK_K1=max(16, k),
            BLOCK_N2=max(16, k),
            BLOCK_K2=max(16, n1),
            num_warps=4,
            num_stages=1,
        )
    by_tokens = TABLE.get((num_experts, expert_size, hidden_size))
    if by_tokens is None:
        return rule_of_thumb(tokens, top_k, num_experts)
    nearest = min(by_tokens, key=lambda m: abs(m - tokens))
    return CONFIGS[by_tokens[nearest]]
