"""Build a family's mlx-lm model class with the project's MoE blocks and load a checkpoint into it.

Attention, norms, RoPE and caches are mlx-lm's own (the module the family names, ``Family.mlx``); every
MoE layer's block is replaced by :class:`MoEBlock`. The models stay mlx-lm model objects
(``__call__(inputs, cache)``, ``layers``, ``sanitize``), so mlx-lm's generation runs on them.

Loading is mlx-lm's ``load_model`` with our classes and the config rebuilt from the spec (both
spellings, so transformers-5-only folders load too): its quantization handling (per-layer bits,
mlx-lm's gate predicates) applies unchanged.
"""

from __future__ import annotations

import importlib
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path
from mlx_lm.utils import load_model

from moe_local.checkpoint.names import FusedExperts
from moe_local.errors import UserError
from moe_local.families import config_for_writing, family
from moe_local.spec import ModelSpec

from .moe import MoEBlock, SwiGLU

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_PARTS = ("gate_proj", "up_proj", "down_proj")
_SUFFIXES = ("weight", "scales", "biases")


class WithProjectBlocks:
    """Mixed in before an mlx-lm model class: its MoE layers get the project's blocks, its sanitize
    drops the checkpoint tensors no model reads and stacks GroveMoE's adjugates as mlx-lm stacks experts."""

    def __init__(self, args, spec: ModelSpec, impl: str):
        super().__init__(args)
        self.spec = spec
        attribute = family(spec.family).mlx.block
        for i, layer in enumerate(self.model.layers):
            moe = spec.moe_at(i)
            if moe is not None:
                setattr(layer, attribute, MoEBlock(moe, spec.hidden_size, impl, spec.names))
            elif hasattr(getattr(layer, attribute), "switch_mlp"):  # a dense layer mlx-lm built sparse
                setattr(layer, attribute, SwiGLU(spec.hidden_size, spec.dense_size))

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if not self.spec.is_unused(k)}
        if self.spec.names.fused:
            weights = unfuse_experts(weights, self.spec)
        return our_names(stack_per_expert(super().sanitize(weights), self.spec), self.spec)


def our_names(weights: dict, spec: ModelSpec) -> dict:
    """mlx-lm's names inside the MoE block -> the project's block's (``gate``, ``switch_mlp``): gpt-oss's
    mlx-lm model calls them ``router`` and ``experts``. save.py renames them back."""
    lib = family(spec.family).mlx
    renames = [
        (f".{lib.block}.{lib.router}.", f".{lib.block}.gate."),
        (f".{lib.block}.{lib.experts}.", f".{lib.block}.switch_mlp."),
    ]
    renames = [(a, b) for a, b in renames if a != b]
    if not renames:
        return weights
    out = {}
    for name, value in weights.items():
        for a, b in renames:
            name = name.replace(a, b)
        out[name] = value
    return out


def unfuse_experts(weights: dict, spec: ModelSpec) -> dict:
    """Fused experts (``TensorNames.fused``: gpt-oss's ``experts.gate_up_proj``, ``down_proj`` and their
    ``_bias``; MXFP4 ``_blocks``/``_scales``) as mlx-lm's sanitized layout: ``experts.<part>.weight``
    ``[E, out, in]`` (MXFP4 blocks as uint32 words, the scales beside them), ``experts.<part>.bias``.
    mlx-lm's own sanitize reads the MXFP4 release but not the bf16 layout transformers writes."""
    layout, names = spec.names.fused, spec.names
    for moe in spec.moe:
        for part in FusedExperts.PARTS:
            for suffix in FusedExperts.SUFFIXES:
                name = names.fused_expert(moe.layer, part, suffix)
                if name not in weights:
                    continue
                value = weights.pop(name)
                if suffix == "":
                    value = value.swapaxes(1, 2) if layout.in_out else value
                elif suffix == "_blocks":
                    value = value.view(mx.uint32).flatten(-2)
                prefix = name[: -len(part + suffix)]
                kind = "bias" if suffix == "_bias" else "scales" if suffix == "_scales" else "weight"
                if part == "down_proj":
                    weights[f"{prefix}down_proj.{kind}"] = value
                else:
                    gate, up = (value[:, 0::2], value[:, 1::2]) if layout.interleaved else mx.split(value, 2, axis=1)
                    weights[f"{prefix}gate_proj.{kind}"] = mx.contiguous(gate)
                    weights[f"{prefix}up_proj.{kind}"] = mx.contiguous(up)
    return weights


def stack_per_expert(weights: dict, spec: ModelSpec) -> dict:
    """Per-expert tensors mlx-lm's own sanitize left (it stacks none for GroveMoE's adjugates, and none at
    all when layer 0 is dense in Qwen2-MoE) stacked as it stacks experts: ``<block>.experts.E.<part>`` ->
    ``<block>.switch_mlp.<part>`` and ``<block>.chunk_experts.J.<part>`` -> ``<block>.chunk_experts.<part>``,
    ``[count, out, in]``."""
    names, block = spec.names, family(spec.family).mlx.block
    for moe in spec.moe:
        groups = [(names.experts, "switch_mlp", moe.num_experts)]
        if moe.grove:
            groups.append((names.adjugates, "chunk_experts", moe.num_groups))
        for source, target, count in groups:
            for part, name in zip(names.projections, _PARTS):
                for suffix in _SUFFIXES:
                    first = f"{names.block_prefix(moe.layer)}.{source}.0.{part}.{suffix}"
                    if first not in weights:
                        continue
                    keys = [first.replace(f".{source}.0.", f".{source}.{j}.") for j in range(count)]
                    missing = [k for k in keys if k not in weights]
                    if missing:
                        raise KeyError(missing[0])  # reported like mlx-lm's own missing experts
                    stacked = mx.stack([weights.pop(k) for k in keys])
                    weights[f"model.layers.{moe.layer}.{block}.{target}.{name}.{suffix}"] = stacked
    return weights


def library_classes(spec: ModelSpec):
    """(model class with the project's blocks, ModelArgs class) of the family's mlx-lm module."""
    lib = family(spec.family).mlx
    module = importlib.import_module(lib.module)
    base = getattr(module, lib.model)
    cls = type(f"{base.__name__}WithProjectBlocks", (WithProjectBlocks, base), {})
    return cls, getattr(module, lib.config)


def mlx_config(spec: ModelSpec) -> dict:
    """The config mlx-lm's ModelArgs read, from the spec (one parser: moe_local.spec)."""
    config = config_for_writing(spec)
    config["model_type"] = family(spec.family).mlx.model_type
    return config


def load_mlx_model(folder: Path, spec: ModelSpec, impl: str, dtype):
    """The mlx-lm model with our MoE blocks, weights loaded (quantized as the folder is), cast to ``dtype``."""
    cls, args_cls = library_classes(spec)
    config = mlx_config(spec)
    try:
        model, _ = load_model(
            Path(folder),
            model_config=config,
            get_model_classes=lambda config: (partial(cls, spec=spec, impl=impl), args_cls),
        )
    except KeyError as e:  # a sanitize step popping a tensor the folder lacks
        raise UserError(f"{folder} lacks tensor {e.args[0]}") from None
    except (ValueError, FileNotFoundError) as e:  # mlx-lm's strict load: missing / extra / mis-shaped
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot load {folder} with the mlx backend: {message}") from None
    cast_floats(model, dtype)
    return model


# Kept in float32 whatever the model's dtype, as the libraries keep them (a selection bias of a few
# thousandths decides between experts whose scores differ by less than bfloat16 resolves).
FLOAT32_PARAMETERS = ("e_score_correction_bias",)


def cast_floats(model: nn.Module, dtype) -> None:
    """Cast floating parameters (quantization scales included, packed weights not) to ``dtype``."""

    def cast(path, v):
        if path.endswith(FLOAT32_PARAMETERS) or not mx.issubdtype(v.dtype, mx.floating):
            return v
        return v.astype(dtype) if v.dtype != dtype else v

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval(model.parameters())
