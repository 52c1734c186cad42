"""Mixtral (8x7B, 8x22B): every layer is MoE; softmax over all experts, top-k, always renormalised
(transformers' rule; mlx-lm takes the top-k of the logits and a softmax over them, the same function);
``intermediate_size`` is the expert size. Checkpoints keep the original names:
``block_sparse_moe.gate``, ``block_sparse_moe.experts.E.w1/w3/w2`` (gate, up, down).
transformers' ``MixtralForCausalLM``, mlx-lm's ``mixtral``."""

from __future__ import annotations

from ..checkpoint.names import TensorNames
from ..spec import ModelSpec, MoESpec, RouterSpec
from .base import Family, LibraryModel
from .config import Config, common_config, common_fields

# What transformers' MixtralConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
ROUTER = RouterSpec(scoring="softmax", renormalize=True)


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, qk_norm=None)
    c.refuse("sliding_window", why="(sliding-window attention) is not supported")  # mlx-lm's Mixtral has none
    experts = c.num_experts()
    moe = tuple(
        MoESpec(
            layer=i,
            num_experts=experts,
            top_k=c.top_k(experts),
            expert_size=c.positive("intermediate_size"),
            router=ROUTER,
        )
        for i in range(fields["num_layers"])
    )
    return ModelSpec(family=FAMILY.name, dense_size=None, moe=moe, names=FAMILY.names, **fields)


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    c["intermediate_size"] = spec.moe[0].expert_size
    c["model_type"] = "mixtral"
    return c


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "MixtralForCausalLM", "MixtralConfig", "mixtral"),
    mlx=LibraryModel("mlx_lm.models.mixtral", "Model", "ModelArgs", "mixtral", block="block_sparse_moe"),
    names=TensorNames(block="block_sparse_moe", projections=("w1", "w3", "w2")),
)
