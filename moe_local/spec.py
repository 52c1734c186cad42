"""The one description of a model that every other part reads: ModelSpec, MoESpec, GroveSpec.

Built from a Hugging Face ``config.json`` (transformers 4 and 5 spellings) plus, for GroveMoE,
the tensor shapes of the checkpoint (the adjugate size is not in GroveMoE's own config).
Pure Python: importing this module never imports torch or mlx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import UserError

FAMILIES = ("qwen3_moe", "olmoe", "grove_moe")
GROVE_ARCHITECTURE = "GroveMoeForCausalLM"
# GroveMoE's released model hard-codes these (PAPERS §2); our checkpoints write them to config.json.
GROVE_DEFAULT_EXPERTS_PER_GROUP = 2
GROVE_DEFAULT_SCALE = 0.05

# What transformers' config classes assume when config.json leaves a key out (Grove = Qwen3-MoE's).
LIBRARY_DEFAULTS = {
    "qwen3_moe": {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "olmoe": {"rope_theta": 10_000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
}
LIBRARY_DEFAULTS["grove_moe"] = LIBRARY_DEFAULTS["qwen3_moe"]

ROUTER_SOFTMAX = "softmax-topk"        # softmax over all experts, top-k of the probabilities
ROUTER_SIGMOID_SELECT = "sigmoid-select"  # Grove: top-k of sigmoid(logits), softmax weights renormalised


@dataclass(frozen=True)
class GroveSpec:
    """Adjugate experts: one SwiGLU of ``adjugate_size`` per group of ``experts_per_group`` experts."""

    experts_per_group: int
    adjugate_size: int
    scale: float

    def num_groups(self, num_experts: int) -> int:
        return num_experts // self.experts_per_group


@dataclass(frozen=True)
class MoESpec:
    """One sparse MoE layer."""

    layer: int
    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    router: str = ROUTER_SOFTMAX
    grove: GroveSpec | None = None

    @property
    def renormalize(self) -> bool:
        """Whether the top-k weights are divided by their sum (always, for Grove)."""
        return self.norm_topk_prob or self.grove is not None

    @property
    def num_groups(self) -> int:
        return self.grove.num_groups(self.num_experts) if self.grove else 0


@dataclass(frozen=True)
class ModelSpec:
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dense_size: int | None          # intermediate size of the dense MLP layers, if any
    moe: tuple[MoESpec, ...]        # one per MoE layer, in layer order
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool
    dtype: str                      # the checkpoint's dtype name: float32, bfloat16, float16
    config: Mapping = field(compare=False, hash=False, repr=False)  # the config.json it came from

    # -- layers -------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(m.layer for m in self.moe)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    def moe_at(self, layer: int) -> MoESpec | None:
        for m in self.moe:
            if m.layer == layer:
                return m
        return None

    def last_moe_layers(self, n: int) -> tuple[int, ...]:
        """The last ``n`` MoE layers (RoMA tunes these)."""
        if n < 1:
            raise UserError(f"the number of tuned layers must be at least 1, got {n}")
        if n > len(self.moe):
            raise UserError(f"the model has {len(self.moe)} MoE layers; cannot tune the last {n}")
        return self.moe_layers[-n:]

    @property
    def is_grove(self) -> bool:
        return self.family == "grove_moe"

    # -- identity -----------------------------------------------------------------------------
    def fingerprint(self, layers=None) -> dict:
        """What an adapter must match: independent of dtype, quantization and backend."""
        layers = self.moe_layers if layers is None else tuple(layers)
        gates = {}
        for layer in layers:
            m = self.moe_at(layer)
            if m is None:
                raise UserError(f"layer {layer} is not an MoE layer of this model")
            gates[str(layer)] = [m.num_experts, self.hidden_size]
        return {"family": self.family, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "gates": gates}

    # -- size ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict:
        """Total and active parameter counts (embeddings and head included).

        Grove's active count is a range: a token's top-k experts touch between ceil(k / g) and
        min(k, groups) adjugates, depending on how many of them share a group.
        """
        h = self.hidden_size
        attn = h * self.head_dim * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * self.head_dim * h
        if self.attention_bias:
            attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads) + h
        if self.family == "olmoe":   # q/k norms over the whole projection
            attn += self.num_heads * self.head_dim + self.num_kv_heads * self.head_dim
        else:                        # Qwen3: q/k norms over one head
            attn += 2 * self.head_dim
        per_layer_common = attn + 2 * h  # two RMSNorms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = active_min = active_max = embed + head + h + self.num_layers * per_layer_common
        for layer in self.dense_layers:
            dense = 3 * h * (self.dense_size or 0)
            total += dense
            active_min += dense
            active_max += dense
        for m in self.moe:
            expert = 3 * h * m.expert_size
            total += m.num_experts * h + m.num_experts * expert
            active = m.num_experts * h + m.top_k * expert
            lo = hi = 0
            if m.grove:
                adjugate = 3 * h * m.grove.adjugate_size
                total += m.num_groups * adjugate
                lo = -(-m.top_k // m.grove.experts_per_group) * adjugate
                hi = min(m.top_k, m.num_groups) * adjugate
            active_min += active + lo
            active_max += active + hi
        return {"total": total, "active_min": active_min, "active_max": active_max}


# ---------------------------------------------------------------------------------------------
# Parsing config.json
# ---------------------------------------------------------------------------------------------

def _get(config: Mapping, key: str, types, default=..., where="config.json"):
    if key not in config or config[key] is None:
        if default is ...:
            raise UserError(f"{where} has no '{key}'")
        return default
    value = config[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise UserError(f"{where}: '{key}' must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise UserError(f"{where}: '{key}' must be {_type_names(types)}, got {value!r}")
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", bool: "true or false", str: "a string",
                        list: "a list", dict: "an object"}.get(t, t.__name__) for t in types)


def _positive(config, key, default=..., where="config.json") -> int:
    value = _get(config, key, int, default, where)
    if value < 1:
        raise UserError(f"{where}: '{key}' must be at least 1, got {value}")
    return value


def _one_of_spellings(config, keys, where="config.json", default=...):
    """A value that transformers 4 and 5 spell differently; both present must agree."""
    present = {k: config[k] for k in keys if config.get(k) is not None}
    if not present:
        if default is ...:
            raise UserError(f"{where} has none of {', '.join(repr(k) for k in keys)}")
        return default
    values = set(present.values())
    if len(values) > 1:
        listed = ", ".join(f"'{k}'={v}" for k, v in present.items())
        raise UserError(f"{where}: inconsistent {listed}")
    return next(iter(values))


def family_of(config: Mapping, where="config.json") -> str:
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if GROVE_ARCHITECTURE in architectures or model_type in ("grove_moe", "grovemoe"):
        return "grove_moe"
    if model_type is None:
        raise UserError(f"{where} has no 'model_type'")
    if model_type not in ("qwen3_moe", "olmoe"):
        raise UserError(f"{where}: model_type '{model_type}' is not supported "
                        f"(supported: qwen3_moe, olmoe, GroveMoE)")
    return model_type


def rope_theta_of(config: Mapping, where="config.json") -> float:
    params = config.get("rope_parameters")
    from_params = None
    if params is not None:
        if not isinstance(params, dict):
            raise UserError(f"{where}: 'rope_parameters' must be an object")
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise UserError(f"{where}: rope_parameters.rope_type '{rope_type}' is not supported (only 'default')")
        from_params = params.get("rope_theta")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise UserError(f"{where}: rope_scaling type '{scaling.get('rope_type', scaling.get('type'))}' "
                        "is not supported (only 'default')")
    theta = config.get("rope_theta")
    if theta is not None and from_params is not None and float(theta) != float(from_params):
        raise UserError(f"{where}: inconsistent 'rope_theta'={theta} and rope_parameters.rope_theta={from_params}")
    theta = theta if theta is not None else from_params
    if theta is None:
        return LIBRARY_DEFAULTS[family_of(config, where)]["rope_theta"]
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise UserError(f"{where}: 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def dtype_of(config: Mapping) -> str:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"config.json: dtype '{name}' is not supported (float32, bfloat16, float16)")
    return name


def spec_from_config(config: Mapping, tensor_shapes: Mapping[str, tuple] | None = None,
                     where: str = "config.json") -> ModelSpec:
    """Build the spec; ``tensor_shapes`` (name -> shape) gives Grove's adjugate size."""
    if not isinstance(config, Mapping):
        raise UserError(f"{where} must hold a JSON object")
    family = family_of(config, where)
    hidden = _positive(config, "hidden_size", where=where)
    layers = _positive(config, "num_hidden_layers", where=where)
    heads = _positive(config, "num_attention_heads", where=where)
    kv_heads = _positive(config, "num_key_value_heads", heads, where)
    if heads % kv_heads:
        raise UserError(f"{where}: 'num_attention_heads' ({heads}) is not a multiple of "
                        f"'num_key_value_heads' ({kv_heads})")
    if family == "olmoe":
        if hidden % heads:
            raise UserError(f"{where}: 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads})")
        head_dim = hidden // heads
    else:
        head_dim = _positive(config, "head_dim", hidden // heads if hidden % heads == 0 else ..., where)
    vocab = _positive(config, "vocab_size", where=where)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act '{act}' is not supported (only 'silu')")
    if config.get("use_sliding_window"):
        raise UserError(f"{where}: 'use_sliding_window' is not supported")
    if family == "olmoe" and config.get("clip_qkv") is not None:
        raise UserError(f"{where}: 'clip_qkv' is not supported")

    num_experts = _one_of_spellings(config, ("num_experts", "num_local_experts"), where)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise UserError(f"{where}: 'num_experts' must be a positive integer, got {num_experts!r}")
    top_k = _positive(config, "num_experts_per_tok", where=where)
    if top_k > num_experts:
        raise UserError(f"{where}: 'num_experts_per_tok' ({top_k}) exceeds the number of experts ({num_experts})")
    norm_topk = _get(config, "norm_topk_prob", bool, False, where)

    if family == "olmoe":
        expert_size = _positive(config, "intermediate_size", where=where)
        dense_size = None
        moe_layer_ids = list(range(layers))
    else:
        expert_size = _positive(config, "moe_intermediate_size", where=where)
        step = _positive(config, "decoder_sparse_step", 1, where)
        mlp_only = _get(config, "mlp_only_layers", list, [], where)
        if any(not isinstance(i, int) or isinstance(i, bool) for i in mlp_only):
            raise UserError(f"{where}: 'mlp_only_layers' must list layer numbers")
        moe_layer_ids = [i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0]
        dense_size = _positive(config, "intermediate_size", where=where) if len(moe_layer_ids) < layers \
            else config.get("intermediate_size")

    grove = None
    router = ROUTER_SOFTMAX
    if family == "grove_moe":
        grove = _grove_spec(config, tensor_shapes, moe_layer_ids, num_experts, hidden, where)
        router = ROUTER_SIGMOID_SELECT

    moe = tuple(MoESpec(layer=i, num_experts=num_experts, top_k=top_k, expert_size=expert_size,
                        norm_topk_prob=norm_topk, router=router, grove=grove) for i in moe_layer_ids)
    defaults = LIBRARY_DEFAULTS[family]
    if not moe:
        raise UserError(f"{where}: no layer is an MoE layer (check 'decoder_sparse_step' and 'mlp_only_layers')")
    return ModelSpec(
        family=family, num_layers=layers, hidden_size=hidden, vocab_size=vocab, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, dense_size=dense_size, moe=moe,
        rope_theta=rope_theta_of(config, where),
        rms_norm_eps=float(config.get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", defaults["max_position_embeddings"])),
        attention_bias=bool(config.get("attention_bias", False)),
        dtype=dtype_of(config), config=dict(config))


def _grove_spec(config, tensor_shapes, moe_layers, num_experts, hidden, where) -> GroveSpec:
    per_group = _positive(config, "grove_experts_per_group", GROVE_DEFAULT_EXPERTS_PER_GROUP, where)
    if num_experts % per_group:
        raise UserError(f"{where}: {num_experts} experts do not split into groups of {per_group}")
    scale = _get(config, "grove_scale", (int, float), GROVE_DEFAULT_SCALE, where)
    size = config.get("grove_adjugate_intermediate_size")
    if size is None:
        size = _adjugate_size_from_tensors(tensor_shapes, moe_layers[0], hidden, where)
    elif not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"{where}: 'grove_adjugate_intermediate_size' must be a positive integer, got {size!r}")
    return GroveSpec(experts_per_group=per_group, adjugate_size=size, scale=float(scale))


def _adjugate_size_from_tensors(tensor_shapes, layer, hidden, where) -> int:
    if not tensor_shapes:
        raise UserError(f"{where} has no 'grove_adjugate_intermediate_size' and no checkpoint tensors to read it from")
    for name in (f"model.layers.{layer}.mlp.chunk_experts.0.gate_proj.weight",
                 f"model.layers.{layer}.mlp.chunk_experts.gate_up_proj"):
        shape = tensor_shapes.get(name)
        if shape is None:
            continue
        if name.endswith("gate_proj.weight"):
            return int(shape[0])
        return int(shape[1]) // 2
    raise UserError(f"the checkpoint has no adjugate experts for layer {layer} "
                    f"(expected 'model.layers.{layer}.mlp.chunk_experts.0.gate_proj.weight')")


# ---------------------------------------------------------------------------------------------
# Writing config.json: both spellings, so that transformers 5 and mlx-lm read what we write
# ---------------------------------------------------------------------------------------------

def config_for_writing(spec: ModelSpec, dtype: str | None = None) -> dict:
    """The spec's config.json with every key both transformers 5 and mlx-lm need, both spellings."""
    c = dict(spec.config)
    if not c.get("rope_scaling"):
        c.pop("rope_scaling", None)
    first = spec.moe[0]
    c.update({
        "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "vocab_size": spec.vocab_size, "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_experts": first.num_experts, "num_local_experts": first.num_experts,
        "num_experts_per_tok": first.top_k, "norm_topk_prob": first.norm_topk_prob,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "hidden_act": "silu", "attention_bias": spec.attention_bias,
    })
    if spec.family == "olmoe":
        c["model_type"] = "olmoe"
        c["intermediate_size"] = first.expert_size
    else:
        c["head_dim"] = spec.head_dim
        c["moe_intermediate_size"] = first.expert_size
        c["intermediate_size"] = spec.dense_size if spec.dense_size is not None else c.get("intermediate_size", 0)
        c.setdefault("decoder_sparse_step", 1)
        c.setdefault("mlp_only_layers", [])
        c["mlp_only_layers"] = list(c["mlp_only_layers"] or [])
    if spec.family == "qwen3_moe":
        c["model_type"] = "qwen3_moe"
    if spec.family == "grove_moe":
        g = first.grove
        c["model_type"] = "grove_moe"
        c["architectures"] = [GROVE_ARCHITECTURE]
        c["grove_experts_per_group"] = g.experts_per_group
        c["grove_scale"] = g.scale
        c["grove_adjugate_intermediate_size"] = g.adjugate_size
    c["dtype"] = c["torch_dtype"] = dtype or spec.dtype
    return c
