"""DeepSeekMoE (DeepSeekMoE-16B base and chat): softmax over all experts, top-k, renormalised only
when ``norm_topk_prob`` (false for the 16B models); ``n_shared_experts`` shared experts of
``moe_intermediate_size`` each, ungated, summed; the first ``first_k_dense_replace`` layers (and those
``moe_layer_freq`` skips) are dense MLPs of ``intermediate_size``. Its attention, norms and RoPE are
Llama's, so the torch backend builds it from transformers' Llama classes (its own modelling code is
remote code on the hub, which this package never runs); mlx-lm's ``deepseek``."""

from __future__ import annotations

from ..checkpoint.names import TensorNames
from ..errors import UserError
from ..spec import ModelSpec, MoESpec, RouterSpec, SharedExperts
from .base import Family, LibraryModel
from .config import Config, common_config, common_fields

# What DeepSeekMoE's own config class (and transformers' LlamaConfig) assume for absent keys.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}


def moe_layers(c: Config, num_layers: int, frequency: bool = True) -> list[int]:
    """DeepSeek's layout: sparse from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer
    (``frequency``: whether the family's libraries read that key)."""
    first = c.get("first_k_dense_replace", int, 0)
    step = c.positive("moe_layer_freq", 1)
    if not frequency and step != 1:
        raise UserError(f"{c.where}: 'moe_layer_freq' {step} is not supported (only 1)")
    layers = [i for i in range(num_layers) if i >= first and i % step == 0]
    if not layers:
        raise UserError(f"{c.where}: no layer is an MoE layer (check 'first_k_dense_replace' and 'moe_layer_freq')")
    return layers


def routed_experts(c: Config) -> tuple[int, int, int]:
    """(experts, top-k, expert size) of DeepSeek-style configs (``n_routed_experts``)."""
    experts = c.positive("n_routed_experts")
    return experts, c.top_k(experts), c.positive("moe_intermediate_size")


def shared_experts(c: Config) -> SharedExperts | None:
    count = c.get("n_shared_experts", int, 0)
    return SharedExperts(count=count, size=c.positive("moe_intermediate_size"), gated=False) if count else None


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    fields = common_fields(c, DEFAULTS, qk_norm=None)
    if c.values.get("scoring_func", "softmax") != "softmax":
        raise UserError(f"{c.where}: 'scoring_func' {c.values['scoring_func']!r} is not supported (only 'softmax')")

    def router(experts, top_k):
        return RouterSpec(scoring="softmax", renormalize=c.get("norm_topk_prob", bool, False) and top_k > 1)

    dense, moe = moe_blocks(c, fields["num_layers"], router)
    return ModelSpec(family=FAMILY.name, dense_size=dense, moe=moe, names=FAMILY.names, **fields)


def moe_blocks(c: Config, num_layers: int, make_router, frequency: bool = True) -> tuple[int | None, tuple]:
    """(dense MLP size, MoE layers) of the DeepSeekMoE line (DeepSeekMoE, DeepSeek-V3, GLM-4.5): the routed
    experts and the ungated shared ones at the config's MoE layers; ``make_router(experts, top_k)`` is the
    family's rule (``frequency``: whether ``moe_layer_freq`` counts, see :func:`moe_layers`)."""
    experts, top_k, size = routed_experts(c)
    router = make_router(experts, top_k)
    layers = moe_layers(c, num_layers, frequency=frequency)
    dense = c.positive("intermediate_size") if len(layers) < num_layers else None
    shared = shared_experts(c)
    moe = tuple(
        MoESpec(layer=i, num_experts=experts, top_k=top_k, expert_size=size, router=router, shared=shared)
        for i in layers
    )
    return dense, moe


def write_config(spec: ModelSpec) -> dict:
    c = common_config(spec)
    first = spec.moe[0]
    c.update(
        n_routed_experts=first.num_experts,
        moe_intermediate_size=first.expert_size,
        n_shared_experts=first.shared.count if first.shared else 0,
        norm_topk_prob=first.router.renormalize,
        scoring_func="softmax",
        model_type="deepseek",
    )
    if spec.dense_size is not None:
        c["intermediate_size"] = spec.dense_size
    return c


FAMILY = Family(
    name="deepseek",
    model_types=("deepseek",),
    architectures=("DeepseekForCausalLM",),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "LlamaForCausalLM", "LlamaConfig", "llama"),
    mlx=LibraryModel("mlx_lm.models.deepseek", "Model", "ModelArgs", "deepseek"),
    names=TensorNames(shared="shared_experts"),
    display_name="deepseek (DeepSeekMoE)",
)
