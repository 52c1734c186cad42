"""The family registry: which family claims a config.json, and the spec it makes.

Each family is one module here (as mlx-lm's ``models/<type>.py``) whose ``FAMILY`` says which
``model_type`` / ``architectures`` it claims, how its config becomes a :class:`ModelSpec` (router rule,
shared experts, dense layers), how a spec is written back, its checkpoint tensor names and the
library classes each backend builds it from. Adding a family is adding a module and a line below.
Nothing else in the package names a family.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..checkpoint.folder import has_weights, read_config, tensor_index
from ..errors import UserError
from ..spec import ModelSpec
from . import deepseek, deepseek_v3, glm4_moe, gpt_oss, grove_moe, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Family, LibraryModel
from .config import Config

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        qwen3_moe.FAMILY,
        olmoe.FAMILY,
        grove_moe.FAMILY,
        mixtral.FAMILY,
        qwen2_moe.FAMILY,
        deepseek.FAMILY,
        deepseek_v3.FAMILY,
        glm4_moe.FAMILY,
        gpt_oss.FAMILY,
    )
}


def family(name: str) -> Family:
    """The family a spec names."""
    return FAMILIES[name]


def family_for(config: Mapping, where: str = "config.json") -> Family:
    """The family claiming a config: by ``architectures`` first (a GroveMoE release names its
    architecture, whatever its ``model_type``), then by ``model_type``."""
    architectures = config.get("architectures") or []
    for f in FAMILIES.values():
        if any(a in f.architectures for a in architectures):
            return f
    model_type = config.get("model_type")
    if model_type is None:
        raise UserError(f"{where} has no 'model_type'")
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    supported = ", ".join(f.display_name or f.model_types[0] for f in FAMILIES.values())
    raise UserError(f"{where}: model_type '{model_type}' is not supported (supported: {supported})")


def spec_from_config(
    config: Mapping, tensor_shapes: Mapping[str, tuple] | None = None, where: str = "config.json"
) -> ModelSpec:
    """The spec of a config.json object; ``tensor_shapes`` (name -> shape) for what configs leave out."""
    c = Config(config, where)
    return family_for(c.values, where).spec_from_config(c, tensor_shapes)


def load_spec(folder: Path) -> ModelSpec:
    """The spec of a model folder (its config.json and the shapes in its safetensors headers)."""
    folder = Path(folder)
    shapes = {n: v[2] for n, v in tensor_index(folder).items()} if has_weights(folder) else {}
    return spec_from_config(read_config(folder), shapes, where=str(folder / "config.json"))


def config_for_writing(spec: ModelSpec, dtype: str | None = None) -> dict:
    """The spec's config.json: every key transformers 5 and mlx-lm need, in both spellings."""
    c = family(spec.family).write_config(spec)
    c["dtype"] = c["torch_dtype"] = dtype or spec.dtype
    return c


__all__ = [
    "FAMILIES",
    "Family",
    "LibraryModel",
    "config_for_writing",
    "family",
    "family_for",
    "load_spec",
    "spec_from_config",
]
