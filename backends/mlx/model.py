"""Build mlx-lm's model classes with the project's MoE blocks and load a checkpoint into them.

Attention, norms, RoPE and caches are mlx-lm's own (``mlx_lm.models.qwen3_moe`` / ``olmoe``); every
MoE layer's ``mlp`` is replaced by :class:`MoEBlock`. GroveMoE is mlx-lm's Qwen3-MoE model with Grove
blocks, loaded from GroveMoE-format folders. The models stay mlx-lm model objects (``__call__(inputs,
cache)``, ``layers``, ``sanitize``), so mlx-lm's generation runs on them.

Loading is mlx-lm's ``load_model`` with our classes and the config rebuilt from the spec (both
spellings, so transformers-5-only folders load too): its quantization handling (per-layer bits,
mlx-lm's gate predicates) applies unchanged.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models import olmoe, qwen3_moe
from mlx_lm.utils import load_model

from moe_local.checkpoint import UNUSED_TENSORS
from moe_local.errors import UserError
from moe_local.spec import ModelSpec, config_for_writing

from .moe import MoEBlock

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_PARTS = ("gate_proj", "up_proj", "down_proj")
_SUFFIXES = ("weight", "scales", "biases")


def _install_blocks(model, spec: ModelSpec, impl: str) -> None:
    for moe in spec.moe:
        layer = model.model.layers[moe.layer]
        if not hasattr(layer.mlp, "switch_mlp"):
            raise UserError(f"layer {moe.layer}: the spec says MoE, mlx-lm built a dense MLP")
        layer.mlp = MoEBlock(moe, spec.hidden_size, impl)


class _WithProjectBlocks:
    """Mixed in before an mlx-lm model class: its MoE layers get the project's blocks."""

    def __init__(self, args, spec: ModelSpec, impl: str):
        super().__init__(args)
        self.spec = spec
        _install_blocks(self, spec, impl)

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if not UNUSED_TENSORS.search(k)}
        return super().sanitize(weights)


class Qwen3MoeModel(_WithProjectBlocks, qwen3_moe.Model):
    pass


class OlmoeModel(_WithProjectBlocks, olmoe.Model):
    pass


class GroveMoeModel(Qwen3MoeModel):
    """GroveMoE: mlx-lm's Qwen3-MoE model whose MoE blocks run Grove's adjugate experts."""

    def sanitize(self, weights):
        """Stack ``mlp.chunk_experts.J.*`` into ``mlp.chunk_experts.*`` ([groups, out, in]), as mlx-lm does experts."""
        weights = super().sanitize(weights)
        for moe in self.spec.moe:
            prefix = f"model.layers.{moe.layer}.mlp.chunk_experts"
            for part in _PARTS:
                for suffix in _SUFFIXES:
                    if f"{prefix}.0.{part}.{suffix}" not in weights:
                        continue
                    names = [f"{prefix}.{j}.{part}.{suffix}" for j in range(moe.num_groups)]
                    missing = [n for n in names if n not in weights]
                    if missing:
                        raise KeyError(missing[0])   # reported like mlx-lm's own missing experts
                    weights[f"{prefix}.{part}.{suffix}"] = mx.stack([weights.pop(n) for n in names])
        return weights


CLASSES = {"qwen3_moe": (Qwen3MoeModel, qwen3_moe.ModelArgs), "olmoe": (OlmoeModel, olmoe.ModelArgs),
           "grove_moe": (GroveMoeModel, qwen3_moe.ModelArgs)}


def mlx_config(spec: ModelSpec) -> dict:
    """The config mlx-lm's ModelArgs read, from the spec (one parser: moe_local.spec)."""
    config = config_for_writing(spec)
    config["model_type"] = "olmoe" if spec.family == "olmoe" else "qwen3_moe"
    return config


def load_mlx_model(folder: Path, spec: ModelSpec, impl: str, dtype):
    """The mlx-lm model with our MoE blocks, weights loaded (quantized as the folder is), cast to ``dtype``."""
    cls, args_cls = CLASSES[spec.family]
    config = mlx_config(spec)
    try:
        model, _ = load_model(Path(folder), model_config=config,
                              get_model_classes=lambda config: (partial(cls, spec=spec, impl=impl), args_cls))
    except KeyError as e:          # a sanitize step popping a tensor the folder lacks
        raise UserError(f"{folder} lacks tensor {e.args[0]}") from None
    except (ValueError, FileNotFoundError) as e:   # mlx-lm's strict load: missing / extra / mis-shaped
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"cannot load {folder} with the mlx backend: {message}") from None
    cast_floats(model, dtype)
    return model


def cast_floats(model: nn.Module, dtype) -> None:
    """Cast floating parameters (quantization scales included, packed weights not) to ``dtype``."""
    def cast(v):
        return v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v

    model.update(tree_map(cast, model.parameters()))
    mx.eval(model.parameters())
