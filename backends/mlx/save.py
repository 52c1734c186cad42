"""Write a loaded MLX model back as a model folder (what ``moe-local fuse`` writes).

A float model becomes an ordinary Hugging Face folder: experts per expert
(``mlp.experts.E.*_proj.weight``, GroveMoE's ``mlp.chunk_experts.J.*``), or stacked and fused where the
family stores them so (gpt-oss), as transformers writes them, so transformers and the torch backend
read it (and mlx-lm, where its sanitize reads the family's layout). A quantized model keeps mlx-lm's
format (stacked ``switch_mlp`` experts with ``.scales``/``.biases``, mlx-lm's names inside the block),
and its config's per-layer quantization entries are dropped for layers that are no longer quantized:
float gates installed by ``set_router_weights`` are then loaded as float by mlx-lm (no ``.scales``).
Floating tensors are written in the checkpoint's dtype, as they came.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from moe_local.checkpoint import carried_tensor_names, write_model
from moe_local.families import config_for_writing, family

from .model import DTYPES

_PARTS = ("gate_proj", "up_proj", "down_proj")


def checkpoint_tensors(model, spec) -> dict[str, mx.array]:
    """The model's weights under checkpoint names, floating ones in the checkpoint's dtype."""
    params = dict(tree_flatten(model.parameters()))
    quantized = any(name.endswith(".scales") for name in params)
    dtype = DTYPES[spec.dtype]
    block = re.escape(family(spec.family).mlx.block)
    stacked = re.compile(
        rf"^model\.layers\.(\d+)\.{block}\.(switch_mlp|chunk_experts)\.((?:gate|up|down)_proj)\.(weight|bias)$"
    )
    router = re.compile(rf"^model\.layers\.(\d+)\.{block}\.gate\.(weight|bias)$")
    out, fused = {}, {}
    for name, value in params.items():
        if spec.tie_word_embeddings and name.startswith("lm_head."):
            continue
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        m = None if quantized else stacked.match(name)
        r = None if quantized else router.match(name)
        if m and spec.names.fused:
            fused[(int(m.group(1)), m.group(3), m.group(4))] = value
        elif m and m.group(4) == "weight":
            out.update(_per_expert(spec, m, value))
        elif r:
            out[f"{spec.names.block_prefix(int(r.group(1)))}.{spec.names.router}.{r.group(2)}"] = value
        else:
            out[library_name(name, spec) if quantized else name] = value
    out.update(_fused(spec, fused))
    return out


def _per_expert(spec, m, value) -> dict:
    """One stacked projection as transformers writes it: one tensor per expert (biases have none here)."""
    layer, part = int(m.group(1)), _PARTS.index(m.group(3))
    group = spec.names.experts if m.group(2) == "switch_mlp" else spec.names.adjugates
    return {spec.names.expert(layer, e, part, group=group): value[e] for e in range(value.shape[0])}


def _fused(spec, parts: dict) -> dict:
    """Stacked projections ``(layer, part, weight|bias) -> [E, out, in]`` as a fused checkpoint stores them
    (``TensorNames.fused``: gpt-oss's ``experts.gate_up_proj [E, H, 2I]`` interleaved, ``down_proj [E, I, H]``)."""
    layout, out = spec.names.fused, {}
    for (layer, part, kind), value in parts.items():
        if part == "up_proj":
            continue
        suffix = "_bias" if kind == "bias" else ""
        if part == "gate_proj":
            up = parts[(layer, "up_proj", kind)]
            if layout.interleaved:  # gate = even rows, up = odd ones
                value = mx.stack([value, up], axis=2).flatten(1, 2)
            else:
                value = mx.concatenate([value, up], axis=1)
            name = "gate_up_proj"
        else:
            name = "down_proj"
        if kind == "weight" and layout.in_out:
            value = value.swapaxes(1, 2)
        out[spec.names.fused_expert(layer, name, suffix)] = mx.contiguous(value)
    return out


def library_name(name: str, spec) -> str:
    """A quantized model's parameter under mlx-lm's own name (gpt-oss: ``router``, ``experts``), so
    mlx-lm reads the folder; the inverse of model.our_names."""
    lib = family(spec.family).mlx
    for ours, theirs in (("gate", lib.router), ("switch_mlp", lib.experts)):
        name = name.replace(f".{lib.block}.{ours}.", f".{lib.block}.{theirs}.")
    return name


def carried_tensors(folder: Path, spec) -> dict[str, mx.array]:
    """Checkpoint tensors the model does not load but a written folder keeps (GroveMoE's ``expert_bias``)."""
    out = {}
    for path, names in carried_tensor_names(folder, spec.is_carried).items():
        arrays = mx.load(str(path))
        out.update({name: arrays[name] for name in names})
    return out


def quantization_config(config: dict, tensors: dict) -> dict:
    """The config's quantization entries without the layers written in float."""
    out = {}
    for key in ("quantization", "quantization_config"):
        if isinstance(config.get(key), dict):
            out[key] = {
                k: v for k, v in config[key].items() if not (isinstance(v, dict) and f"{k}.scales" not in tensors)
            }
    return out


def save_model(loaded, out: Path) -> Path:
    tensors = {**carried_tensors(loaded.folder, loaded.spec), **checkpoint_tensors(loaded.model, loaded.spec)}
    config = config_for_writing(loaded.spec, loaded.spec.dtype)
    config.update(quantization_config(dict(loaded.spec.config), tensors))
    return write_model(out, config, tensors, tokenizer_src=loaded.folder)
