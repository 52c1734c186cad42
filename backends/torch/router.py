"""The router of every family (``moe_local.spec.RouterSpec``) on torch: the only place its rule is written.

``Router`` computes the logits; :func:`route` turns them into each token's experts and weights;
:func:`routing_distribution` is the distribution over all experts that RoMA reads. Both go through
:func:`scores`, so the routing RoMA aligns is the one the block routes with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.spec import RouterSpec


class Router(nn.Module):
    """The gate: ``logits = x @ weightᵀ (+ bias)``, with DeepSeek-V3's selection-only bias as a buffer
    (``e_score_correction_bias``) when the rule has one. Parameter names are transformers'."""

    def __init__(self, num_experts: int, hidden_size: int, rule: RouterSpec):
        super().__init__()
        self.rule = rule
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if rule.bias else None
        if rule.selection_bias:
            self.register_buffer("e_score_correction_bias", torch.empty(num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_logits(x, self.weight, self.bias, self.rule)


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rule: RouterSpec) -> torch.Tensor:
    if rule.float32_logits:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x, weight, bias)


def scores(logits: torch.Tensor, rule: RouterSpec) -> torch.Tensor:
    """float32 scores over all experts: the softmax or the sigmoid of the logits."""
    if rule.scoring == "sigmoid":
        return torch.sigmoid(logits.float())
    return F.softmax(logits, dim=-1, dtype=torch.float32)


def routing_distribution(logits: torch.Tensor, rule: RouterSpec) -> torch.Tensor:
    """RoMA's routing vector: the scores as a distribution over all experts (sigmoid scores normalised
    to sum 1, without the selection bias)."""
    s = scores(logits, rule)
    return s if rule.scoring == "softmax" else s / s.sum(dim=-1, keepdim=True)


def route(
    logits: torch.Tensor, rule: RouterSpec, top_k: int, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, k], their weights [T, k] in the logits' dtype) of logits [T, E]."""
    if rule.order == "topk-score":
        top, idx = torch.topk(logits, top_k, dim=-1)
        weights = F.softmax(top, dim=-1, dtype=torch.float32)
    else:
        s = scores(logits, rule)
        choice = torch.sigmoid(logits.float()) if rule.selection == "sigmoid" else s
        if selection_bias is not None:
            choice = choice + selection_bias.float()
        if rule.groups > 1:
            choice = best_groups_only(choice, rule.groups, rule.groups_kept)
        _, idx = torch.topk(choice, top_k, dim=-1)
        weights = s.gather(-1, idx)
    if rule.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if rule.scaling != 1.0:
        weights = weights * rule.scaling
    return idx, weights.to(logits.dtype)


def best_groups_only(choice: torch.Tensor, groups: int, kept: int) -> torch.Tensor:
    """``choice`` with the experts outside each token's ``kept`` best groups set to -inf (DeepSeek-V3's
    group-limited routing: a group is scored by the sum of its two highest choice scores). -inf, as
    DeepSeek's own code and transformers: with biased scores below 0, a 0 would let dropped groups win."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, groups, experts // groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(kept, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, experts)
