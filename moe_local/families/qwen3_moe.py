"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, ...): softmax over all experts, top-k, renormalised when
``norm_topk_prob``; a dense MLP (``intermediate_size``) in the layers ``mlp_only_layers`` names and
those ``decoder_sparse_step`` skips; per-head q/k norms. transformers' ``Qwen3MoeForCausalLM``,
mlx-lm's ``qwen3_moe``."""

from __future__ import annotations

from ..errors import UserError
from ..spec import ModelSpec, MoESpec, RouterSpec
from .base import Family, LibraryModel
from .config import Config, common_config, common_fields

# What transformers' Qwen3MoeConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


def moe_layers(c: Config, num_layers: int) -> list[int]:
    """Layers whose MLP is sparse: every ``decoder_sparse_step``-th, except ``mlp_only_layers``."""
    step = c.positive("decoder_sparse_step", 1)
    mlp_only = c.layer_list("mlp_only_layers")
    layers = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    if not layers:
        raise UserError(f"{c.where}: no layer is an MoE layer (check 'decoder_sparse_step' and 'mlp_only_layers')")
    return layers


def spec_from_config(c: Config, tensor_shapes=None, grove=None, router=None) -> ModelSpec:
    """``grove`` and ``router``: GroveMoE's adjugates and rule (grove_moe.py builds on this family)."""
    fields = common_fields(c, DEFAULTS)
    experts = c.num_experts()
    top_k = c.top_k(experts)
    renormalize = c.get("norm_topk_prob", bool, False)
    router = router or RouterSpec(scoring="softmax", renormalize=renormalize)
    expert_size = c.positive("moe_intermediate_size")
    layers = moe_layers(c, fields["num_layers"])
    dense = c.positive("intermediate_size") if len(layers) < fields["num_layers"] else c.values.get("intermediate_size")
    moe = tuple(
        MoESpec(layer=i, num_experts=experts, top_k=top_k, expert_size=expert_size, router=router, grove=grove)
        for i in layers
    )
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    first = spec.moe[0]
    c["norm_topk_prob"] = first.router.renormalize
    c["head_dim"] = spec.head_dim
    c["moe_intermediate_size"] = first.expert_size
    c["intermediate_size"] = spec.dense_size if spec.dense_size is not None else c.get("intermediate_size", 0)
    c.setdefault("decoder_sparse_step", 1)
    c["mlp_only_layers"] = list(c.get("mlp_only_layers") or [])
    c["model_type"] = "qwen3_moe"
    return c


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "qwen3_moe"),
    mlx=LibraryModel("mlx_lm.models.qwen3_moe", "Model", "ModelArgs", "qwen3_moe"),
)
