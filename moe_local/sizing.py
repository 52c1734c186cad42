"""Memory needed to chat with a model and to tune its routers, from the spec alone.

Estimates, stated with their assumptions: weights at the model's dtype, a KV cache for the chat
context, and for tuning the activations kept for the backward pass through the tuned suffix plus
the fp32 routers with their gradients and AdamW state.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    chat: int
    tune: int
    chat_context: int
    tune_batch: int
    tune_seq: int
    tune_layers: int


def estimate_memory(
    spec,
    dtype: str | None = None,
    chat_context: int = 4096,
    tune_batch: int = 32,
    tune_seq: int = 256,
    tune_layers: int = 5,
    weights: int | None = None,
) -> MemoryEstimate:
    """``weights``: the checkpoint's own weight bytes when known (quantized folders), else counted."""
    b = BYTES[dtype or spec.dtype]
    counts = spec.parameter_counts()
    weights = counts["total"] * b if weights is None else weights
    width = spec.kv_width or 2 * spec.num_kv_heads * spec.head_dim  # MLA caches its compressed latent
    sliding = sum(spec.layer_type(i) == "sliding_attention" for i in range(spec.num_layers))
    window = min(chat_context, spec.sliding_window or chat_context)  # a sliding layer keeps its window only
    kv_cache = width * b * ((spec.num_layers - sliding) * chat_context + sliding * window)
    chat = weights + kv_cache + spec.vocab_size * 4 * 2  # plus fp32 logits of the last step
    layers = spec.last_moe_layers(min(tune_layers, len(spec.moe)))
    tokens = tune_batch * tune_seq
    h = spec.hidden_size
    activations = 0
    router_state = 0
    for layer in range(layers[0], spec.num_layers):
        moe = spec.moe_at(layer)
        # Kept for backward per token: norms, q/k/v/o, attention probabilities, the MLP's inputs and
        # intermediates (k experts of 3·I each, or one dense MLP).
        attn = (6 * h + spec.num_heads * spec.head_dim * 2 + spec.num_heads * tune_seq) * b
        if moe is not None:
            mlp = (moe.num_experts * 2 + moe.top_k * (h + 3 * moe.expert_size)) * b
            if moe.grove:
                mlp += min(moe.top_k, moe.num_groups) * 3 * moe.grove.adjugate_size * b
            if moe.shared:
                mlp += (h + 3 * moe.shared.count * moe.shared.size) * b
            if layer in layers:
                router_state += 4 * moe.num_experts * h * 4  # fp32 weight, grad, two AdamW moments
        else:
            mlp = (h + 3 * (spec.dense_size or 0)) * b
        activations += tokens * (attn + mlp)
    tune = weights + activations + router_state + tune_batch * spec.vocab_size * 4
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv_cache,
        chat=chat,
        tune=tune,
        chat_context=chat_context,
        tune_batch=tune_batch,
        tune_seq=tune_seq,
        tune_layers=len(layers),
    )
