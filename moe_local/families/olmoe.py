"""OLMoE (OLMoE-1B-7B): softmax over all experts, top-k, renormalised when ``norm_topk_prob``; every
layer is MoE and ``intermediate_size`` is the expert size; q/k norms over the whole projection.
transformers' ``OlmoeForCausalLM``, mlx-lm's ``olmoe``."""

from __future__ import annotations

from ..spec import ModelSpec, MoESpec, RouterSpec
from .base import Family, LibraryModel
from .config import Config, common_config, common_fields

# What transformers' OlmoeConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, head_dim_key=False, qk_norm="projection")
    c.refuse("clip_qkv")
    experts = c.num_experts()
    top_k = c.top_k(experts)
    router = RouterSpec(scoring="softmax", renormalize=c.get("norm_topk_prob", bool, False))
    expert_size = c.positive("intermediate_size")
    moe = tuple(
        MoESpec(layer=i, num_experts=experts, top_k=top_k, expert_size=expert_size, router=router)
        for i in range(fields["num_layers"])
    )
    return ModelSpec(family=FAMILY.name, dense_size=None, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    c["norm_topk_prob"] = spec.moe[0].router.renormalize
    c["model_type"] = "olmoe"
    c["intermediate_size"] = spec.moe[0].expert_size
    return c


FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    architectures=("OlmoeForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "OlmoeForCausalLM", "OlmoeConfig", "olmoe"),
    mlx=LibraryModel("mlx_lm.models.olmoe", "Model", "ModelArgs", "olmoe"),
)
