"""The router of every family (``moe_local.spec.RouterSpec``) on MLX: the only place its rule is written.

:func:`route` turns logits into each token's experts and weights; :func:`routing_distribution` is the
distribution over all experts that RoMA reads. Both go through :func:`scores`, so the routing RoMA
aligns is the one the block routes with. The choice of experts carries no gradient (as in mlx-lm);
weights and distribution are differentiable in the logits.
"""

from __future__ import annotations

import mlx.core as mx

from moe_local.spec import RouterSpec


def scores(logits: mx.array, rule: RouterSpec) -> mx.array:
    """float32 scores over all experts: the softmax or the sigmoid of the logits."""
    if rule.scoring == "sigmoid":
        return mx.sigmoid(logits.astype(mx.float32))
    return mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)


def routing_distribution(logits: mx.array, rule: RouterSpec) -> mx.array:
    """RoMA's routing vector: the scores as a distribution over all experts (sigmoid scores normalised
    to sum 1, without the selection bias)."""
    s = scores(logits, rule)
    return s if rule.scoring == "softmax" else s / s.sum(axis=-1, keepdims=True)


def top_k_indices(choice: mx.array, k: int) -> mx.array:
    """The k largest entries' indices along the last axis (in no particular order), without gradient."""
    return mx.stop_gradient(mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k])


def route(logits: mx.array, rule: RouterSpec, top_k: int, selection_bias: mx.array | None = None):
    """(expert ids [T, k], their float32 weights [T, k]) of logits [T, E]."""
    if rule.order == "topk-score":
        idx = top_k_indices(logits, top_k)
        weights = mx.softmax(mx.take_along_axis(logits, idx, axis=-1).astype(mx.float32), axis=-1, precise=True)
    else:
        s = scores(logits, rule)
        choice = mx.sigmoid(logits.astype(mx.float32)) if rule.selection == "sigmoid" else s
        if selection_bias is not None:
            choice = choice + selection_bias.astype(mx.float32)
        if rule.groups > 1:
            choice = best_groups_only(choice, rule.groups, rule.groups_kept)
        idx = top_k_indices(choice, top_k)
        weights = mx.take_along_axis(s, idx, axis=-1)
    if rule.renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    if rule.scaling != 1.0:
        weights = weights * rule.scaling
    return idx, weights


def best_groups_only(choice: mx.array, groups: int, kept: int) -> mx.array:
    """``choice`` with the experts outside each token's ``kept`` best groups set to -inf (DeepSeek-V3's
    group-limited routing: a group is scored by the sum of its two highest choice scores). -inf, as
    DeepSeek's own code and transformers (mlx-lm writes 0, which lets dropped groups win when biased
    scores fall below 0)."""
    if kept == groups:
        return choice
    grouped = choice.reshape(*choice.shape[:-1], groups, -1)
    group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)  # [T, groups, 1]
    dropped = mx.argpartition(group_scores, kth=groups - kept - 1, axis=-2)[..., : groups - kept, :]
    return mx.put_along_axis(grouped, mx.stop_gradient(dropped), mx.array(-mx.inf), axis=-2).reshape(choice.shape)
