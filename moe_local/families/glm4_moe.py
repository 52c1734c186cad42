"""GLM-4.5, GLM-4.5-Air, GLM-4.6: DeepSeek-V3's router (sigmoid scores, selection-only bias, groups,
renormalised, scaled) and ungated shared experts, dense layers before ``first_k_dense_replace``;
attention with q/k/v biases (``attention_bias``), optional per-head q/k norms (``use_qk_norm``) and
RoPE on the first ``partial_rotary_factor`` of each head. transformers' ``Glm4MoeForCausalLM``,
mlx-lm's ``glm4_moe`` (which needs ``head_dim``, ``partial_rotary_factor`` and ``rope_scaling``
spelled out in config.json)."""

from __future__ import annotations

from ..checkpoint.names import TensorNames
from ..spec import ModelSpec
from . import deepseek, deepseek_v3
from .base import Family, LibraryModel
from .config import Config, attention_parameters, common_fields

# What transformers' Glm4MoeConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072}
PARTIAL_ROTARY_FACTOR = 0.5


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, qk_norm=None, rope_types=deepseek_v3.ROPE_TYPES)
    shape = {k: fields[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim")}
    qk_norm = "head" if c.get("use_qk_norm", bool, False) else None
    fields["attention_parameters"] = attention_parameters(shape, fields["attention_bias"], qk_norm, o_bias=False)
    dense, moe = deepseek.moe_blocks(
        c, fields["num_layers"], lambda experts, _: deepseek_v3.sigmoid_router(c, experts), frequency=False
    )
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def partial_rotary_factor(spec: ModelSpec) -> float:
    """transformers 5 keeps it in ``rope_parameters``, transformers 4 and mlx-lm at the top level."""
    return float(
        spec.config.get("partial_rotary_factor") or spec.rope.get("partial_rotary_factor") or PARTIAL_ROTARY_FACTOR
    )


def write_config(spec: ModelSpec) -> dict:
    c = deepseek_v3.write_config(spec)
    c["model_type"] = "glm4_moe"
    c["head_dim"] = spec.head_dim
    c["partial_rotary_factor"] = c["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor(spec)
    c.setdefault("rope_scaling", None)
    c.setdefault("use_qk_norm", False)
    return c


FAMILY = Family(
    name="glm4_moe",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "Glm4MoeForCausalLM", "Glm4MoeConfig", "glm4_moe"),
    mlx=LibraryModel("mlx_lm.models.glm4_moe", "Model", "ModelArgs", "glm4_moe"),
    names=TensorNames(shared="shared_experts"),
)
