"""Reading config.json for the family modules, and writing it back in both spellings.

transformers 4 and 5 (and mlx-lm) spell some keys differently (``num_experts`` / ``num_local_experts``,
``rope_theta`` / ``rope_parameters``); a folder may hold either or both. :class:`Config` reads any of
them and refuses a wrong type or an inconsistency with a one-line error naming the file and key;
:func:`common_config` writes both, so transformers 5 and mlx-lm read what this package writes.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "an object",
}


class Config:
    """A config.json object with typed, checked access; ``where`` names the file in errors."""

    def __init__(self, values: Mapping, where: str = "config.json"):
        if not isinstance(values, Mapping):
            raise UserError(f"{where} must hold a JSON object")
        self.values = dict(values)
        self.where = where

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def get(self, key: str, types, default=...):
        """The value of ``key`` (of ``types``); absent or null gives ``default``, or an error without one."""
        if not self.has(key):
            if default is ...:
                raise UserError(f"{self.where} has no '{key}'")
            return default
        value = self.values[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise UserError(f"{self.where}: '{key}' must be {_type_names(allowed)}, got {value!r}")
        return value

    def positive(self, key: str, default=...) -> int:
        value = self.get(key, int, default)
        if value < 1:
            raise UserError(f"{self.where}: '{key}' must be at least 1, got {value}")
        return value

    def number(self, key: str, default=...) -> float:
        return float(self.get(key, (int, float), default))

    def layer_list(self, key: str) -> list[int]:
        values = self.get(key, list, [])
        if any(not isinstance(i, int) or isinstance(i, bool) for i in values):
            raise UserError(f"{self.where}: '{key}' must list layer numbers")
        return values

    def spelled(self, *keys: str, default=...):
        """A value that transformers 4 and 5 spell differently; when several are present they must agree."""
        present = {k: self.values[k] for k in keys if self.has(k)}
        if not present:
            if default is ...:
                raise UserError(f"{self.where} has none of {', '.join(repr(k) for k in keys)}")
            return default
        if len(set(present.values())) > 1:
            listed = ", ".join(f"'{k}'={v}" for k, v in present.items())
            raise UserError(f"{self.where}: inconsistent {listed}")
        return next(iter(present.values()))

    def num_experts(self) -> int:
        value = self.spelled("num_experts", "num_local_experts")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{self.where}: 'num_experts' must be a positive integer, got {value!r}")
        return value

    def top_k(self, num_experts: int) -> int:
        k = self.positive("num_experts_per_tok")
        if k > num_experts:
            raise UserError(f"{self.where}: 'num_experts_per_tok' ({k}) exceeds the number of experts ({num_experts})")
        return k

    def rope(self, default_theta: float, types=("default",)) -> dict:
        """The RoPE parameters as transformers 5 spells them (``rope_type``, ``rope_theta`` and the
        type's own keys), from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4);
        ``types``: the RoPE types the family's libraries implement (the libraries apply them)."""
        params = self.values.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise UserError(f"{self.where}: 'rope_parameters' must be an object")
        scaling = self.values.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise UserError(f"{self.where}: 'rope_scaling' must be an object")
        rope = {k: v for k, v in (scaling or {}).items() if k != "type"}
        rope.update(params or {})
        rope_type = rope.get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in types:
            raise UserError(
                f"{self.where}: RoPE type '{rope_type}' is not supported for this family "
                f"(supported: {', '.join(types)})"
            )
        theta, from_params = self.values.get("rope_theta"), (params or {}).get("rope_theta")
        if theta is not None and from_params is not None and float(theta) != float(from_params):
            raise UserError(
                f"{self.where}: inconsistent 'rope_theta'={theta} and rope_parameters.rope_theta={from_params}"
            )
        theta = theta if theta is not None else from_params
        if theta is None:
            theta = default_theta
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise UserError(f"{self.where}: 'rope_theta' must be a positive number, got {theta!r}")
        return {**rope, "rope_type": rope_type, "rope_theta": float(theta)}

    def dtype(self) -> str:
        name = str(self.values.get("dtype") or self.values.get("torch_dtype") or "float32").replace("torch.", "")
        if name not in DTYPES:
            raise UserError(f"{self.where}: dtype '{name}' is not supported ({', '.join(DTYPES)})")
        return name

    def refuse(self, key: str, unless=None, why: str = "is not supported") -> None:
        """A one-line error when ``key`` is set to anything but ``unless`` (absent and null are fine)."""
        value = self.values.get(key)
        if value is not None and value != unless and value is not False:
            raise UserError(f"{self.where}: '{key}' {why}" + ("" if unless is None else f" (only {unless!r})"))


def _type_names(types: tuple) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def attention_shape(c: Config, head_dim_key: bool = True) -> dict:
    """Heads, KV heads and head size; ``head_dim_key``: the family reads ``head_dim`` (else hidden / heads)."""
    hidden = c.positive("hidden_size")
    heads = c.positive("num_attention_heads")
    kv_heads = c.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserError(
            f"{c.where}: 'num_attention_heads' ({heads}) is not a multiple of 'num_key_value_heads' ({kv_heads})"
        )
    if head_dim_key:
        head_dim = c.positive("head_dim", hidden // heads if hidden % heads == 0 else ...)
    else:
        if hidden % heads:
            raise UserError(f"{c.where}: 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads})")
        head_dim = hidden // heads
    return {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def attention_parameters(shape: dict, bias: bool, qk_norm: str | None, o_bias: bool | None = None) -> int:
    """Parameters of one attention block: q, k, v, o (+ their biases: ``bias`` on q/k/v, ``o_bias`` on
    o, the same as ``bias`` unless given) and the q/k norms, which normalise one head (``"head"``,
    Qwen3) or the whole projection (``"projection"``, OLMoE)."""
    h, d = shape["hidden_size"], shape["head_dim"]
    q, kv = shape["num_heads"] * d, shape["num_kv_heads"] * d
    count = h * (q + 2 * kv) + q * h
    if bias:
        count += q + 2 * kv
    if bias if o_bias is None else o_bias:
        count += h
    count += {"head": 2 * d, "projection": q + kv, None: 0}[qk_norm]
    return count


def common_fields(
    c: Config, defaults: Mapping, head_dim_key: bool = True, qk_norm: str | None = "head", rope_types=("default",)
) -> dict:
    """The ModelSpec fields every family reads the same way; ``defaults`` are what the family's
    transformers config class assumes when a key is absent."""
    rope = c.rope(defaults["rope_theta"], rope_types)
    if c.values.get("hidden_act", "silu") != "silu":
        raise UserError(f"{c.where}: hidden_act '{c.values.get('hidden_act')}' is not supported (only 'silu')")
    c.refuse("use_sliding_window")
    shape = attention_shape(c, head_dim_key)
    bias = bool(c.values.get("attention_bias", False))
    return {
        "num_layers": c.positive("num_hidden_layers"),
        **shape,
        "vocab_size": c.positive("vocab_size"),
        "attention_parameters": attention_parameters(shape, bias, qk_norm),
        "rope": rope,
        "rope_theta": rope["rope_theta"],
        "rms_norm_eps": float(c.values.get("rms_norm_eps", defaults["rms_norm_eps"])),
        "tie_word_embeddings": bool(c.values.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(c.values.get("max_position_embeddings", defaults["max_position_embeddings"])),
        "attention_bias": bias,
        "dtype": c.dtype(),
        "config": dict(c.values),
    }


def common_config(spec) -> dict:
    """The spec's config.json with the keys every family shares, in both spellings."""
    c = dict(spec.config)
    rope = dict(spec.rope)
    c.pop("rope_scaling", None)
    if rope["rope_type"] != "default":  # transformers 4 and mlx-lm read the scaling from here
        c["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_theta"}, "type": rope["rope_type"]}
    first = spec.moe[0]
    c.update(
        {
            "hidden_size": spec.hidden_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads,
            "vocab_size": spec.vocab_size,
            "rms_norm_eps": spec.rms_norm_eps,
            "tie_word_embeddings": spec.tie_word_embeddings,
            "max_position_embeddings": spec.max_position_embeddings,
            "num_experts": first.num_experts,
            "num_local_experts": first.num_experts,
            "num_experts_per_tok": first.top_k,
            "rope_theta": spec.rope_theta,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": spec.attention_bias,
        }
    )
    return c
