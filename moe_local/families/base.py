"""What a family module declares: :class:`Family` and the library classes each backend builds it from."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..checkpoint.names import TensorNames
from ..spec import ModelSpec
from .config import Config


@dataclass(frozen=True)
class LibraryModel:
    """The library classes a backend builds a family's model from (named, so that nothing is imported
    until a backend asks). ``model_type``: what the library calls the family's config."""

    module: str  # transformers: "transformers"; mlx-lm: "mlx_lm.models.<name>"
    model: str  # the causal-LM class
    config: str  # its config (transformers) or ModelArgs (mlx-lm) class
    model_type: str
    block: str = "mlp"  # the MoE block's attribute in the library's decoder layer
    # transformers: the attention the model is built with (gpt-oss's sinks are eager-only there), and
    # whether the decoder layer unpacks a tuple from its MoE block (gpt-oss: ``hidden, _ = self.mlp(x)``)
    attn_implementation: str = "sdpa"
    block_returns_tuple: bool = False
    # mlx-lm: the router's and the stacked experts' attributes in its MoE block (gpt-oss: router, experts)
    router: str = "gate"
    experts: str = "switch_mlp"


@dataclass(frozen=True)
class Family:
    """One model family: which configs it claims, how they become a spec, how it is written back, its
    checkpoint tensor names, and the library classes of each backend.

    ``spec_from_config(config, tensor_shapes)``: ``tensor_shapes`` (name -> shape, from the
    safetensors headers; None without weights) is for what a config does not say (GroveMoE's
    adjugate size). ``write_config(spec)``: the family's config.json keys over
    :func:`moe_local.families.config.common_config`, in both spellings.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    spec_from_config: Callable[[Config, Mapping | None], ModelSpec]
    write_config: Callable[[ModelSpec], dict]
    torch: LibraryModel
    mlx: LibraryModel
    names: TensorNames = TensorNames()
    display_name: str = ""  # how error messages list it (default: its model_type)
