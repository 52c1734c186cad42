"""Experts stored stacked and fused (``TensorNames.fused``: gpt-oss), to the model's layout and back.

The model keeps every family's experts one way (moe.py ``Experts``): ``gate_up_proj [E, 2I, H]`` with the
gate half first, ``down_proj [E, H, I]``, and ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]``
when the experts have biases. A fused checkpoint may store the float tensors ``[E, in, out]``
(``in_out``) and gate and up interleaved (gate = even rows, ``interleaved``), or MXFP4 blocks and scales,
which are dequantized here (mxfp4.py) and written back by ``fuse`` as they were read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from moe_local.checkpoint import tensor_index
from moe_local.checkpoint.names import FusedExperts
from moe_local.errors import UserError

from .mxfp4 import BLOCK, BYTES, dequantize


def pattern(names) -> re.Pattern:
    """Matches a fused tensor's name: groups (experts prefix, part, suffix)."""
    parts = "|".join(FusedExperts.PARTS)
    suffixes = "|".join(s for s in FusedExperts.SUFFIXES if s)
    return re.compile(
        rf"^(model\.layers\.\d+\.{re.escape(names.block)}\.{re.escape(names.experts)})\.({parts})({suffixes})?$"
    )


def halves(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Gate and up along axis 1 as halves (gate first) from the stored order."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1) if interleaved else t


def interleave(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The inverse of :func:`halves`."""
    if not interleaved:
        return t
    gate, up = t.chunk(2, dim=1)
    return torch.stack([gate, up], dim=2).flatten(1, 2)


def expected_shapes(part: str, experts: int, hidden: int, size: int, layout: FusedExperts) -> dict[str, tuple]:
    """suffix -> the stored shape of one fused part."""
    out, inp = (2 * size, hidden) if part == "gate_up_proj" else (hidden, size)
    return {
        "": (experts, inp, out) if layout.in_out else (experts, out, inp),
        "_bias": (experts, out),
        "_blocks": (experts, out, inp // BLOCK, BYTES),
        "_scales": (experts, out, inp // BLOCK),
    }


def to_model(where, name: str, pieces: dict, moe, hidden: int, layout: FusedExperts, dtype) -> dict:
    """One fused part's stored tensors (``pieces``: suffix -> tensor, read from ``where``) as the model's
    ``{name: weight, name_bias: bias}``; ``name`` is the part's checkpoint name, ``moe`` its layer's MoESpec."""
    part = name.rsplit(".", 1)[1]
    shapes = expected_shapes(part, moe.num_experts, hidden, moe.expert_size, layout)
    for suffix, tensor in pieces.items():
        if tuple(tensor.shape) != shapes[suffix]:
            raise UserError(
                f"{where}: tensor {name}{suffix} has shape {tuple(tensor.shape)}, expected {shapes[suffix]}"
            )
    if ("_bias" in pieces) != moe.expert_bias:
        raise UserError(f"{where} {'lacks' if moe.expert_bias else 'has'} tensor {name}_bias")
    order = halves if part == "gate_up_proj" else (lambda t, _: t)  # gate and up as the model keeps them
    out = {name: order(_weight(where, name, pieces, layout, dtype), layout.interleaved).contiguous()}
    if moe.expert_bias:
        out[f"{name}_bias"] = order(pieces["_bias"].to(dtype), layout.interleaved).contiguous()
    return out


def _weight(where, name: str, pieces: dict, layout: FusedExperts, dtype) -> torch.Tensor:
    """A part's weight ``[E, out, in]`` in ``dtype``: the float tensor, or the MXFP4 blocks dequantized."""
    if "_blocks" in pieces and "_scales" in pieces:
        return dequantize(pieces["_blocks"], pieces["_scales"], dtype)
    if "_blocks" in pieces or "_scales" in pieces:
        raise UserError(f"{where} lacks tensor {name}{'_scales' if '_blocks' in pieces else '_blocks'}")
    if "" not in pieces:
        raise UserError(f"{where} lacks tensor {name}")
    weight = pieces[""].to(dtype)
    return weight.transpose(1, 2) if layout.in_out else weight


def to_checkpoint(name: str, tensor: torch.Tensor, layout: FusedExperts) -> torch.Tensor:
    """A model tensor (``...experts.gate_up_proj``, ``..._bias``, ``down_proj``...) as the checkpoint stores it."""
    if name.endswith("gate_up_proj") or name.endswith("gate_up_proj_bias"):
        tensor = interleave(tensor, layout.interleaved)
    if layout.in_out and name.endswith("_proj"):
        tensor = tensor.transpose(1, 2)
    return tensor.contiguous()


def mxfp4_tensors(folder: Path, names) -> dict[str, torch.Tensor]:
    """The MXFP4 blocks and scales of a folder's fused experts as stored (``fuse`` writes them back as
    they were: the experts are never tuned)."""
    if names.fused is None:
        return {}
    fused, by_file = pattern(names), {}
    for name, (path, _, _) in tensor_index(folder).items():
        m = fused.match(name)
        if m and m.group(3) in ("_blocks", "_scales"):
            by_file.setdefault(path, []).append(name)
    out = {}
    for path, tensors in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in tensors})
    return out
