"""Qwen1.5-MoE and Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax over all experts, top-k,
renormalised when ``norm_topk_prob``; one shared expert of ``shared_expert_intermediate_size`` scaled
by ``sigmoid(shared_expert_gate(x))``; dense layers as Qwen3-MoE (``decoder_sparse_step``,
``mlp_only_layers``); q/k/v biases (``qkv_bias``). transformers' ``Qwen2MoeForCausalLM``, mlx-lm's
``qwen2_moe`` (whose own block never renormalises and builds every layer sparse: the project's block
and dense MLP take their place)."""

from __future__ import annotations

from ..spec import ModelSpec, MoESpec, RouterSpec, SharedExperts
from . import qwen3_moe
from .base import Family, LibraryModel
from .config import Config, attention_parameters, common_config, common_fields

# What transformers' Qwen2MoeConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, qk_norm=None)
    qkv_bias = c.get("qkv_bias", bool, True)
    shape = {k: fields[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim")}
    fields["attention_parameters"] = attention_parameters(shape, qkv_bias, None, o_bias=False)
    router = RouterSpec(scoring="softmax", renormalize=c.get("norm_topk_prob", bool, False))
    layers = qwen3_moe.moe_layers(c, fields["num_layers"])
    dense = c.positive("intermediate_size") if len(layers) < fields["num_layers"] else c.values.get("intermediate_size")
    moe = gated_shared_moe(c, layers, router)
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def gated_shared_moe(c: Config, layers, router: RouterSpec) -> tuple[MoESpec, ...]:
    """The MoE layers of the Qwen2-MoE line (Qwen1.5/2-MoE, Qwen3-Next, Qwen3.5-MoE): the config's routed
    experts at ``layers`` and one shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""
    experts = c.num_experts()
    shared = SharedExperts(count=1, size=c.positive("shared_expert_intermediate_size"), gated=True)
    return tuple(
        MoESpec(
            layer=i,
            num_experts=experts,
            top_k=c.top_k(experts),
            expert_size=c.positive("moe_intermediate_size"),
            router=router,
            shared=shared,
        )
        for i in layers
    )


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    first = spec.moe[0]
    c["norm_topk_prob"] = first.router.renormalize
    c["moe_intermediate_size"] = first.expert_size
    c["shared_expert_intermediate_size"] = first.shared.size
    if spec.dense_size is not None:
        c["intermediate_size"] = spec.dense_size
    c.setdefault("decoder_sparse_step", 1)
    c["mlp_only_layers"] = list(c.get("mlp_only_layers") or [])
    c["model_type"] = "qwen2_moe"
    return c


FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", "qwen2_moe"),
    mlx=LibraryModel("mlx_lm.models.qwen2_moe", "Model", "ModelArgs", "qwen2_moe"),
)
