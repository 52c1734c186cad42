"""Pieces both backends' models use: checking an ids/mask batch, and swapping a layer's router for a call."""

from __future__ import annotations

import contextlib

import numpy as np

from moe_local.errors import UserError


def checked_batch(ids, attention_mask, vocab_size: int):
    """(ids int64 [B, L], mask int64 [B, L] or None): 1-D ids are one sequence; the mask must be left
    padding (each row zeros, then ones), as the Python API promises; anything else is a one-line error."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise UserError(f"ids must be [batch, seq] or [seq] with seq >= 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"ids must be integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise UserError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    if attention_mask is None:
        return ids.astype(np.int64), None
    mask = np.asarray(attention_mask)
    if mask.size != ids.size:
        raise UserError(f"attention_mask has shape {mask.shape}, ids {ids.shape}")
    mask = mask.reshape(ids.shape)
    if not np.isin(mask, (0, 1)).all():
        raise UserError("attention_mask must hold only 0 and 1")
    if (np.diff(mask.astype(np.int64), axis=-1) < 0).any():
        raise UserError("attention_mask must be left padding (each row: zeros, then ones)")
    return ids.astype(np.int64), mask.astype(np.int64)


@contextlib.contextmanager
def swapped_gate(block, gate):
    """``block`` (an MoE block) runs with ``gate`` as its router for the duration."""
    original = block.gate
    block.gate = gate
    try:
        yield
    finally:
        block.gate = original


def check_suffix_layers(spec, layer: int, layers) -> None:
    for i in layers:
        if i < layer or spec.moe_at(i) is None:
            raise ValueError(f"tuned layer {i} must be an MoE layer at or after the suffix start {layer}")
