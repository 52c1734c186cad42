"""RoMA (docs/methods.md): which layers are tuned, neighbours, Gaussian weights, λ warm-up and the loss.

- Neighbours of sample i: its k nearest *successful* samples (answered correctly by the base model)
  in embedding space, i itself excluded; ties go to the lowest index.
- Weights: ``W_ij = exp(-d_ij² / 2σ²) / Σ_j' exp(-d_ij'² / 2σ²)`` over i's neighbours.
- Loss per sample: ``CE_i + λ Σ_j W_ij ||r_i - r_j||²``; ``r_i`` is the *live* routing (post-softmax
  over all experts, last prompt token, tuned layers concatenated) from the routers being trained,
  ``r_j`` the base model's routing recorded in the bank. The batch loss is the sum over samples
  divided by the global batch size, so data-parallel shards can all-reduce their gradients.

:func:`roma_loss` uses only operations that torch tensors and mlx arrays share (arithmetic,
``.sum(axis)``, ``.logsumexp(axis)``, ``[:, None]``), so both backends train the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# Squared distances closer than this count as equal, so ties break by index, not by rounding.
TIE_DECIMALS = 10
# How many of the last MoE layers are tuned unless told (the paper's 5), or all of a model with fewer.
DEFAULT_LAYERS = 5


def tuned_layers(spec, layers, oracle: bool = False) -> tuple:
    """The tuned layers: an explicit sequence, how many of the last MoE layers, or None (the default:
    the last :data:`DEFAULT_LAYERS`, or every MoE layer when the model has fewer).

    ``oracle``: the layers are where the evaluation's oracle steers the routers, and errors say so.
    """
    if layers is None:
        layers = min(DEFAULT_LAYERS, len(spec.moe))
    if isinstance(layers, int):
        have = len(spec.moe)
        if layers < 1:
            what = "--layers" if oracle else "the number of tuned layers"
            raise UserError(f"{what} must be at least 1, got {layers}")
        if layers > have:
            doing = "the oracle cannot steer" if oracle else "cannot tune"
            raise UserError(
                f"the model has {have} MoE layers; {doing} the last {layers} (give --layers {have} or fewer)"
            )
        layers = spec.last_moe_layers(layers)
    layers = tuple(int(i) for i in layers)
    spec.fingerprint(layers)  # each must be an MoE layer
    if len({spec.moe_at(i).num_experts for i in layers}) != 1:
        raise UserError(f"the tuned layers {list(layers)} differ in expert count; tune layers of one width")
    return layers


# ---------------------------------------------------------------------------------------------
# Neighbours
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbours:
    """``index [N, k]`` (-1 where a sample has fewer than k), ``weight [N, k]`` (0 there), ``dist2``."""

    index: np.ndarray
    weight: np.ndarray
    dist2: np.ndarray


def nearest_successful(
    embeddings: np.ndarray, correct: np.ndarray, k: int, chunk: int = 1024, queries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(index [N, k], squared distance [N, k]) of each sample's k nearest successful samples, itself
    excluded; with ``queries`` [Q, D] (samples from elsewhere, C3PO's test samples), of each query's
    k nearest successful samples among ``embeddings``, nothing excluded."""
    emb = np.asarray(embeddings, dtype=np.float64)
    query = emb if queries is None else np.asarray(queries, dtype=np.float64)
    success = np.flatnonzero(np.asarray(correct).astype(bool))  # ascending: stable sort keeps lowest index first
    if len(success) == 0:
        raise UserError(
            "no successful sample for the neighbour search: the base model answers none of the "
            f"{len(emb)} reference samples correctly (use more or easier data, or --method router)"
        )
    n = len(query)
    index = np.full((n, k), -1, dtype=np.int64)
    dist2 = np.full((n, k), np.inf)
    cand = emb[success]
    cand_sq = (cand * cand).sum(1)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        q = query[rows]
        d2 = (q * q).sum(1)[:, None] + cand_sq[None, :] - 2.0 * q @ cand.T
        d2 = np.round(np.maximum(d2, 0.0), TIE_DECIMALS)
        if queries is None:
            d2[rows[:, None] == success[None, :]] = np.inf  # self excluded
        take = min(k, len(success))
        order = np.argsort(d2, axis=1, kind="stable")[:, :take]
        picked = np.take_along_axis(d2, order, axis=1)
        ok = np.isfinite(picked)
        index[rows, :take] = np.where(ok, success[order], -1)
        dist2[rows, :take] = picked
    return index, dist2


def gaussian_weights(dist2: np.ndarray, index: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised ``exp(-d²/2σ²)`` over each row's real neighbours (a softmax, so no underflow to 0/0)."""
    if sigma <= 0:
        raise UserError(f"--sigma must be positive, got {sigma}")
    logits = np.where(index >= 0, -np.asarray(dist2, dtype=np.float64) / (2.0 * sigma * sigma), -np.inf)
    top = logits.max(1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(logits - top)
    total = w.sum(1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)


def neighbours(embeddings, correct, k: int, sigma: float, queries=None) -> Neighbours:
    """Each sample's (or query's, see :func:`nearest_successful`) successful neighbours and weights."""
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    index, dist2 = nearest_successful(embeddings, correct, k, queries=queries)
    return Neighbours(index, gaussian_weights(dist2, index, sigma), dist2)


def neighbour_targets(bank_routing: np.ndarray, nb: Neighbours, rows) -> tuple[np.ndarray, np.ndarray]:
    """(targets [B, k, layers·E] float32, weights [B, k] float32) for the samples ``rows``."""
    idx = nb.index[rows]
    flat = bank_routing.reshape(len(bank_routing), -1)
    targets = flat[np.maximum(idx, 0)]
    weights = np.where(idx >= 0, nb.weight[rows], 0.0).astype(np.float32)
    return targets.astype(np.float32), weights


# ---------------------------------------------------------------------------------------------
# Loss (generic over torch tensors and mlx arrays)
# ---------------------------------------------------------------------------------------------


def candidate_ce(scores, onehot):
    """Per-sample CE over candidate scores [B, C]; ``onehot`` [B, C] marks the target candidate."""
    return scores.logsumexp(-1) - (scores * onehot).sum(-1)


def manifold_term(routing, targets, weights):
    """Per-sample ``Σ_j W_ij ||r_i - r_j||²``; routing [B, n, E] or [B, n·E], targets [B, k, n·E], weights [B, k]."""
    r = routing.reshape(routing.shape[0], -1)
    diff = r[:, None, :] - targets
    return (weights * (diff * diff).sum(-1)).sum(-1)


def roma_loss(scores, routing, onehot, targets, weights, lam: float, ce_weight: float, global_batch: int):
    """(loss, per-sample CE, per-sample manifold term); loss = Σ_i (ce_w·CE_i + λ·M_i) / global batch.

    λ = 0 leaves the manifold term out of the graph (it is still returned, for the metrics), so
    ``--method router`` and ``roma`` with λ = 0 take identical steps.
    """
    ce = candidate_ce(scores, onehot)
    manifold = manifold_term(routing, targets, weights)
    total = ce.sum() * ce_weight if ce_weight != 1.0 else ce.sum()
    if lam != 0.0:
        total = total + lam * manifold.sum()
    return total / global_batch, ce, manifold


def lam_at(step: int, lam: float, warmup: int) -> float:
    """λ(t) rising linearly over ``warmup`` steps (step counts from 1); no warm-up when warmup <= 0."""
    if warmup <= 0:
        return float(lam)
    return float(lam) * min(1.0, step / warmup)
