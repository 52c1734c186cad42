"""RoMA (shared/PAPERS.md §1): neighbours, Gaussian weights, the routing bank, and the loss.

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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import AtomicFolder, atomic_write_text

BANK_TENSORS = "bank.safetensors"
BANK_META = "bank.json"
# Squared distances closer than this count as equal, so ties break by index, not by rounding.
TIE_DECIMALS = 10


def tuned_layers(spec, layers, oracle: bool = False) -> tuple:
    """The tuned layers: an explicit sequence, or how many of the last MoE layers (RoMA: 5).

    ``oracle``: the layers are where the evaluation's oracle steers the routers, and errors say so.
    """
    if isinstance(layers, int):
        have = len(spec.moe)
        if layers < 1:
            what = "--layers" if oracle else "the number of tuned layers"
            raise UserError(f"{what} must be at least 1, got {layers}")
        if layers > have:
            doing = "the oracle cannot steer" if oracle else "cannot tune"
            raise UserError(f"the model has {have} MoE layers; {doing} the last {layers} "
                            f"(give --layers {have} or fewer)")
        layers = spec.last_moe_layers(layers)
    layers = tuple(int(i) for i in layers)
    spec.fingerprint(layers)   # each must be an MoE layer
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


def nearest_successful(embeddings: np.ndarray, correct: np.ndarray, k: int,
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(index [N, k], squared distance [N, k]) of each sample's k nearest successful samples."""
    emb = np.asarray(embeddings, dtype=np.float64)
    success = np.flatnonzero(np.asarray(correct).astype(bool))   # ascending: stable sort keeps lowest index first
    if len(success) == 0:
        raise UserError("no successful sample for the neighbour search: the base model answers none of the "
                        f"{len(emb)} reference samples correctly (use more or easier data, or --method router)")
    n = len(emb)
    index = np.full((n, k), -1, dtype=np.int64)
    dist2 = np.full((n, k), np.inf)
    cand = emb[success]
    cand_sq = (cand * cand).sum(1)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        q = emb[rows]
        d2 = (q * q).sum(1)[:, None] + cand_sq[None, :] - 2.0 * q @ cand.T
        d2 = np.round(np.maximum(d2, 0.0), TIE_DECIMALS)
        d2[rows[:, None] == success[None, :]] = np.inf          # self excluded
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


def neighbours(embeddings, correct, k: int, sigma: float) -> Neighbours:
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    index, dist2 = nearest_successful(embeddings, correct, k)
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


# ---------------------------------------------------------------------------------------------
# The routing bank
# ---------------------------------------------------------------------------------------------

@dataclass
class Bank:
    """Per reference sample: answered correctly by the base model, its routing, its embedding."""

    correct: np.ndarray     # [N] uint8
    routing: np.ndarray     # [N, layers, experts] float32
    embeddings: np.ndarray  # [N, D] float32
    meta: dict              # fingerprint, layers, data file and hash

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])


def check_bank_folder(folder, overwrite: bool = True) -> Path:
    """Refuse a bank path that is a file or a folder of other files; an old bank is replaced only with ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"bank path {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / BANK_META).is_file():
            raise UserError(f"bank folder {folder} holds files that are not a routing bank; give a new folder")
        if not overwrite:
            raise UserError(f"bank folder {folder} exists; pass --overwrite to replace it")
    return folder


def write_bank(folder, bank: Bank) -> Path:
    """Write ``bank.safetensors`` and ``bank.json`` into a new folder atomically (replacing an old bank)."""
    from .files import atomic_save_numpy_safetensors

    folder = check_bank_folder(folder)
    tensors = {"correct": np.ascontiguousarray(bank.correct, dtype=np.uint8),
               "routing": np.ascontiguousarray(bank.routing, dtype=np.float32),
               "embeddings": np.ascontiguousarray(bank.embeddings, dtype=np.float32)}
    if folder.is_dir():   # an old bank: replace file by file, each atomically
        atomic_save_numpy_safetensors(folder / BANK_TENSORS, tensors)
        atomic_write_text(folder / BANK_META, json.dumps(bank.meta, indent=2) + "\n")
        return folder
    with AtomicFolder(folder) as tmp:
        atomic_save_numpy_safetensors(tmp / BANK_TENSORS, tensors)
        (tmp / BANK_META).write_text(json.dumps(bank.meta, indent=2) + "\n")
    return folder


def read_bank(folder) -> Bank:
    folder = Path(folder)
    meta_path, tensor_path = folder / BANK_META, folder / BANK_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise UserError(f"{folder} is not a routing bank (it needs {BANK_META} and {BANK_TENSORS}); "
                        "make one with `moe-local prepare`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    from safetensors.numpy import load_file

    try:
        t = load_file(str(tensor_path))
    except Exception:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{tensor_path} is not a readable safetensors file") from None
    for key in ("correct", "routing", "embeddings"):
        if key not in t:
            raise UserError(f"{tensor_path} lacks the '{key}' tensor")
    if not isinstance(meta, dict) or "layers" not in meta or "fingerprint" not in meta:
        raise UserError(f"{meta_path} is not a routing bank description (no 'layers'/'fingerprint')")
    n = len(t["correct"])
    if t["routing"].ndim != 3 or t["routing"].shape[0] != n or t["routing"].shape[1] != len(meta["layers"]) \
            or t["embeddings"].ndim != 2 or t["embeddings"].shape[0] != n:
        raise UserError(f"{tensor_path}: tensor shapes disagree with each other or with {BANK_META}")
    return Bank(t["correct"], t["routing"], t["embeddings"], meta)


def check_bank(bank: Bank, spec, layers, data_sha256: str, where) -> None:
    """A bank must come from this model, these tuned layers and this data file."""
    try:
        ours = spec.fingerprint(bank.layers)
    except UserError:   # a layer that is not an MoE layer here
        ours = None
    if bank.meta["fingerprint"] != ours:
        raise UserError(f"the routing bank {where} was made for another model; run `moe-local prepare` again")
    if list(layers) != bank.layers:
        raise UserError(f"the routing bank {where} covers layers {bank.layers}, the tune asks for {list(layers)}")
    if bank.meta.get("data_sha256") != data_sha256:
        raise UserError(f"the routing bank {where} was made from other data ({bank.meta.get('data_file')}); "
                        "run `moe-local prepare` again")
