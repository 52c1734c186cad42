"""Qwen3.5-MoE (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B): Qwen3-Next's text model (gated DeltaNet and
gated attention layers, zero-centred norms, partial RoPE) with every layer MoE: softmax over all experts,
top-k, always renormalised; one shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

The releases are vision-language checkpoints (``Qwen3_5MoeForConditionalGeneration``): the text model's
config under ``text_config``, its tensors under ``model.language_model.``, experts stacked and fused
(``experts.gate_up_proj [E, 2I, H]`` gate half first, ``down_proj [E, H, I]``), plus a vision tower
(``model.visual.*``) and a multi-token-prediction head (``mtp.*``). Only the text model is loaded and
tuned; the vision tower and the MTP head are carried through ``fuse`` byte for byte. A text-only folder
(``qwen3_5_moe_text``, ``Qwen3_5MoeForCausalLM``; per-expert tensors as transformers writes them by
default) loads too. transformers' ``Qwen3_5MoeForCausalLM`` (its text model, which reads the
vision-language checkpoints as well), mlx-lm's ``qwen3_5`` ``TextModel`` (what its ``qwen3_5_moe`` model
runs); adapters name the routers as mlx-lm's ``qwen3_5_moe`` model does (``language_model.model.layers``)
so that ``mlx_lm --adapter-path`` loads them on the release."""

from __future__ import annotations

import dataclasses

from ..checkpoint.names import FusedExperts, TensorNames
from ..spec import ModelSpec, RouterSpec
from . import qwen2_moe
from .base import Family, LibraryModel
from .config import Config, common_config
from .qwen3_next import hybrid_config, hybrid_fields

# What transformers' Qwen3_5MoeTextConfig assumes when config.json leaves a key out.
DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
ROUTER = RouterSpec(scoring="softmax", renormalize=True)  # no norm_topk_prob: always renormalised
TEXT = TensorNames(fused=FusedExperts(), carried_prefixes=("mtp.",))
VISION_LANGUAGE = dataclasses.replace(
    TEXT,
    prefix="model.language_model",
    adapter_prefix="language_model.model",
    carried_prefixes=("mtp.", "model.visual."),
)


def text_values(config) -> dict:
    """The text model's config: a vision-language config's ``text_config``, or the config itself."""
    return dict(config["text_config"]) if "text_config" in config else dict(config)


def spec_from_config(c: Config, tensor_shapes=None) -> ModelSpec:
    vision_language = c.has("text_config")
    text = Config(
        text_values(c.get("text_config", dict, c.values)), f"{c.where} text_config" if vision_language else c.where
    )
    text.values.setdefault("dtype", c.dtype())  # the release names its dtype at the top level
    fields = hybrid_fields(text, DEFAULTS)
    fields["config"] = dict(c.values)  # written back whole: the vision tower's config too
    moe = qwen2_moe.gated_shared_moe(text, range(fields["num_layers"]), ROUTER)  # every layer is MoE
    names = VISION_LANGUAGE if vision_language else TEXT
    return ModelSpec(family=FAMILY.name, dense_size=None, moe=moe, names=names, **fields)


def write_config(spec: ModelSpec) -> dict:
    """The text model's keys (in ``text_config`` when the folder is vision-language: everything else of
    the config, the vision tower's included, as it was)."""
    text = hybrid_config(spec, common_config(dataclasses.replace(spec, config=text_values(spec.config))))
    first = spec.moe[0]
    text.update(
        moe_intermediate_size=first.expert_size,
        shared_expert_intermediate_size=first.shared.size,
        model_type="qwen3_5_moe_text",
    )
    if "text_config" not in spec.config:
        return text
    return {**spec.config, "text_config": text}


def library_config(config: dict) -> dict:
    """The text model's config, which both libraries' text-model classes read."""
    text = text_values(config)
    text["dtype"] = text["torch_dtype"] = config["dtype"]
    return text


FAMILY = Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
    architectures=("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
    spec_from_config=spec_from_config,
    write_config=write_config,
    torch=LibraryModel("transformers", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", "qwen3_5_moe_text"),
    mlx=LibraryModel("mlx_lm.models.qwen3_5", "TextModel", "TextModelArgs", "qwen3_5_moe"),
    names=TEXT,
    display_name="qwen3_5_moe (Qwen3.5-MoE)",
    library_config=library_config,
)
